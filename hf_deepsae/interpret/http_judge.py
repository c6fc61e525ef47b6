"""A judge over HTTP: any OpenAI-compatible chat endpoint, with retries, usage and a response cache.

    chat = OpenAICompatibleChat("http://localhost:8000/v1", "Qwen/Qwen2.5-7B-Instruct",
                                cache_path="outputs/judge_cache.sqlite")
    judge = ChatJudge(chat)               # explain / detect / fuzz
    ... score_latents(..., max_workers=8)  # latents judged concurrently
    print(chat.usage)                      # requests, cached, tokens, cost

Works with vLLM, TGI, llama.cpp's server, `transformers serve`, and hosted APIs, through
`huggingface_hub.InferenceClient(base_url=...)`. Requests are greedy by default (temperature 0) so
that a verdict is a function of its prompt; the cache (SQLite, safe across threads and processes)
stores each prompt's reply under a hash of (model, messages, generation settings), so rerunning
an evaluation costs nothing and returns the same scores. Failed requests are retried with
exponential backoff (rate limits, 5xx, timeouts, dropped connections); other client errors (a
wrong model name, a bad key) fail at once with the server's message.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import InferenceClient

from ..files import FileFormatError

RETRY_STATUSES = frozenset({408, 409, 425, 429})
"""HTTP statuses below 500 worth retrying (timeouts, conflicts, rate limits)."""


@dataclass
class JudgeUsage:
    """What the judge cost so far: requests sent, replies served from the cache, failures after all
    retries, tokens as the server reported them, and the cost at the given prices."""

    requests: int = 0
    cached: int = 0
    failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, **increments: float) -> None:
        """Add to the counters, from any thread."""
        with self._lock:
            for name, value in increments.items():
                setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


class ResponseCache:
    """Prompt → reply, in one SQLite file (readers and writers in any threads or processes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        try:
            with self._connection() as connection:
                connection.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, "
                                   "reply TEXT NOT NULL, prompt_tokens INTEGER, "
                                   "completion_tokens INTEGER)")
                connection.execute("SELECT key, reply, prompt_tokens, completion_tokens "
                                   "FROM responses LIMIT 0")
        except sqlite3.DatabaseError as error:
            raise FileFormatError(self.path, f"is not a cache of judge replies ({error})",
                                  "delete it (its replies are asked again) or name another "
                                  "cache file") from error

    def _connection(self) -> sqlite3.Connection:
        if getattr(self._local, "connection", None) is None:
            self._local.connection = sqlite3.connect(self.path, timeout=60)
            self._local.connection.execute("PRAGMA journal_mode=WAL")
        return self._local.connection

    def get(self, key: str) -> str | None:
        row = self._connection().execute("SELECT reply FROM responses WHERE key = ?",
                                         (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, reply: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._connection() as connection:
            connection.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                               (key, reply, prompt_tokens, completion_tokens))

    def __len__(self) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM responses").fetchone()[0]


def _status(error: Exception) -> int | None:
    try:
        return error.response.status_code  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return None


def _retryable(error: Exception) -> bool:
    """Server trouble and transport errors are worth retrying; a client error (4xx) is not."""
    status = _status(error)
    if status is not None:
        return status >= 500 or status in RETRY_STATUSES
    return not isinstance(error, ValueError | TypeError | KeyError)


class OpenAICompatibleChat:
    """A chat function (`ChatFunction`) over an OpenAI-compatible `/v1/chat/completions` server.

    Args:
        base_url: the server's URL, e.g. `http://localhost:8000/v1` (vLLM, TGI, llama.cpp,
            `transformers serve`) or a hosted API's.
        model: the model name the server expects.
        api_key: bearer token (hosted APIs); local servers usually need none.
        max_tokens, temperature, seed: generation settings of every request (part of the cache
            key).
        max_retries: attempts after the first failure; waits `backoff · 2^attempt` seconds (±25%
            jitter) in between.
        timeout: seconds per request.
        max_concurrency: requests in flight at once across threads (callers such as
            `score_latents(max_workers=...)` bring the threads).
        cache_path: SQLite file of the response cache; None disables caching.
        price_per_million_prompt_tokens, price_per_million_completion_tokens: for `usage.cost`.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 max_tokens: int = 256, temperature: float = 0.0, seed: int | None = 0,
                 max_retries: int = 5, backoff: float = 1.0, timeout: float = 120.0,
                 max_concurrency: int = 8, cache_path: str | Path | None = None,
                 price_per_million_prompt_tokens: float = 0.0,
                 price_per_million_completion_tokens: float = 0.0) -> None:
        self.base_url, self.model, self.api_key, self.timeout = base_url, model, api_key, timeout
        self.settings = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        self.max_retries, self.backoff = max_retries, backoff
        self.prices = (price_per_million_prompt_tokens, price_per_million_completion_tokens)
        self.cache = ResponseCache(cache_path) if cache_path is not None else None
        self.usage = JudgeUsage()
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._local = threading.local()

    def _client(self) -> InferenceClient:
        """One client per thread: connection pools are not shared between threads."""
        if getattr(self._local, "client", None) is None:
            self._local.client = InferenceClient(base_url=self.base_url, api_key=self.api_key,
                                                 timeout=self.timeout)
        return self._local.client

    def cache_key(self, messages: list[dict[str, str]]) -> str:
        request = {"model": self.model, "messages": messages, **self.settings}
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()

    def __call__(self, messages: list[dict[str, str]]) -> str:
        key = self.cache_key(messages)
        if self.cache is not None and (reply := self.cache.get(key)) is not None:
            self.usage.add(cached=1)
            return reply
        with self._slots:
            reply, prompt_tokens, completion_tokens = self._request(messages)
        if self.cache is not None:
            self.cache.put(key, reply, prompt_tokens, completion_tokens)
        return reply

    def _request(self, messages: list[dict[str, str]]) -> tuple[str, int, int]:
        for attempt in range(self.max_retries + 1):
            try:
                output = self._client().chat_completion(messages, model=self.model,
                                                        **self.settings)
                break
            except Exception as error:
                if attempt == self.max_retries or not _retryable(error):
                    self.usage.add(failed=1)
                    raise RuntimeError(
                        f"the judge at {self.base_url} (model {self.model!r}) failed after "
                        f"{attempt + 1} attempt(s): {error}") from error
                self.usage.add(retries=1)
                time.sleep(self.backoff * 2**attempt * random.uniform(0.75, 1.25))
        reply = output.choices[0].message.content or ""
        usage: Any = output.usage
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        self.usage.add(requests=1, prompt_tokens=prompt_tokens,
                       completion_tokens=completion_tokens,
                       cost=(prompt_tokens * self.prices[0]
                             + completion_tokens * self.prices[1]) / 1e6)
        return reply, prompt_tokens, completion_tokens
