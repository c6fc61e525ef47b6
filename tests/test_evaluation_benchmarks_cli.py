"""`examples/evaluate.py --benchmarks ...` end to end on a tiny model, with a server judge."""

import json

import pytest
import torch
from example_scripts import import_example
from test_interpret_http_judge import ScriptedServer
from tiny_models import ENGLISH_WORDS, tiny_model, word_tokenizer

from hf_deepsae import DeepSAEConfig, DeepSAEModel

HOOKPOINT = "model.layers.0.mlp.down_proj"
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # main() builds an Accelerator


@pytest.fixture(scope="module")
def cli():
    yield from import_example("evaluate")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny llama with an English word-level tokenizer, a corpus, a probing CSV and an SAE."""
    root = tmp_path_factory.mktemp("benchmarks_cli")
    tiny_model("llama").save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(len(ENGLISH_WORDS), (120, 12), generator=generator).tolist()
    (root / "corpus.txt").write_text("\n".join(" ".join(ENGLISH_WORDS[i] for i in row)
                                               for row in rows))
    lines = ["text,label"] + [f"{' '.join(ENGLISH_WORDS[i:i + 5])},{'early' if i < 40 else 'late'}"
                              for i in range(0, 80, 4)]
    (root / "probing.csv").write_text("\n".join(lines))
    torch.manual_seed(0)
    DeepSAEModel(DeepSAEConfig(d_in=32, n_latents=48, k=3, hookpoint=HOOKPOINT,
                               base_model_name_or_path=str(root / "model"))
                 ).save_pretrained(root / "sae")
    return root


@pytest.fixture
def judge_server():
    server = ScriptedServer(lambda messages: "1: yes\n2: no\n3: yes")
    import threading

    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_all_interpretability_benchmarks_reach_json_and_model_card(cli, workspace, judge_server):
    out = workspace / "out"
    result = cli.main([
        "--sae", str(workspace / "sae"), "--dataset_name", str(workspace / "corpus.txt"),
        "--output_dir", str(out), "--save_to_sae",
        "--benchmarks", "absorption", "sparse_probing", "autointerp",
        "--absorption_n_words", "0", "--absorption_min_words_per_letter", "3",
        "--absorption_n_icl_examples", "2", "--absorption_max_k", "3",
        "--probing_dataset", str(workspace / "probing.csv"),
        "--sparse_probing_ks", "1", "2", "--sparse_probing_n_train_per_class", "6",
        "--sparse_probing_n_test_per_class", "3",
        "--autointerp_n_latents", "4", "--autointerp_n_tokens", "1024",
        "--autointerp_context_length", "32",
        "--judge_base_url", judge_server.base_url, "--judge_model", "judge",
    ])
    assert result is None  # no core metrics asked for
    record = json.loads((out / "metrics.json").read_text())
    benchmarks = record["benchmarks"]["sae"]
    assert set(benchmarks) == {"absorption", "sparse_probing", "autointerp"}
    assert len(benchmarks["absorption"]["letters"]) >= 2
    assert benchmarks["absorption"]["decoder"] == "linear"
    assert benchmarks["sparse_probing"]["tasks"][0]["classes"] == ["early", "late"]
    assert set(benchmarks["sparse_probing"]["sae_top_k_accuracy"]) == {"1", "2"}
    autointerp = benchmarks["autointerp"]
    assert autointerp["judge"] == f"judge at {judge_server.base_url}"
    assert len(autointerp["latents"]) == 4 and autointerp["summary"]["n_latents_in_sae"] == 48
    assert autointerp["usage"]["requests"] == len(judge_server.requests) > 0
    metrics = DeepSAEModel.from_pretrained(workspace / "sae").config.metrics
    assert {"first_letter_probe_f1", "sparse_probing_top_1_accuracy"} <= metrics.keys()
    card = (workspace / "sae" / "README.md").read_text()
    assert "Sparse probing, 1 latent" in card and "First-letter probe F1" in card


def test_benchmark_flags_reach_their_configs(cli):
    flags = cli.prefixed(cli.AbsorptionConfig, "absorption")
    assert "absorption_max_k" in flags.__dataclass_fields__
    config = cli.unprefixed(flags(absorption_max_k=3), cli.AbsorptionConfig, "absorption")
    assert config.max_k == 3 and config.n_words == cli.AbsorptionConfig().n_words


def test_an_unknown_benchmark_is_refused(cli, workspace):
    with pytest.raises(SystemExit):
        cli.main(["--sae", str(workspace / "sae"), "--benchmarks", "readability"])
