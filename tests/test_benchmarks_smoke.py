"""Every benchmark script runs end to end (`--smoke`: a few tiny steps) on a tiny random model,
from an empty activation cache, writing its JSON where told. No timing is asserted."""

from __future__ import annotations

import importlib
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from test_activations import make_tiny_lm, write_corpus

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
HOOKPOINT = "transformer.h.1.mlp.c_proj"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tiny_lm")
    corpus = write_corpus(folder)
    return make_tiny_lm(folder, corpus), corpus


def source_flags(tiny_lm: tuple[Path, Path], tmp_path: Path) -> list[str]:
    model, corpus = tiny_lm
    return ["--model_name_or_path", str(model), "--dataset_name", str(corpus), "--hookpoint",
            HOOKPOINT, "--context_length", "16", "--max_cached_tokens", "4096",
            "--cache_dir", str(tmp_path / "cache")]


def run_benchmark(script: str, flags: list[str], tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run `benchmarks/<script>` as `__main__` in this process (no second interpreter to import
    torch into); the JSON it wrote into `tmp_path/results`."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [script, "--smoke", "--results_dir",
                                      str(tmp_path / "results"), *flags])
    try:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    written = list((tmp_path / "results").glob("*.json"))
    assert len(written) == 1, written
    results = json.loads(written[0].read_text())
    assert results["machine"]["precision"]["bfloat16"]["decided_by"]
    assert results["machine"]["torch_threads"] >= 1
    return results


def test_bench_train_step(tiny_lm, tmp_path, monkeypatch):
    pytest.importorskip("sparsify", reason="compares with sparsify (pip install eai-sparsify)")
    flags = [*source_flags(tiny_lm, tmp_path), "--modes", "fp32", "bf16"]
    results = run_benchmark("bench_train_step.py", flags, tmp_path, monkeypatch)
    assert set(results["modes"]) == {"fp32", "bf16"}
    libraries = [row["library"] for row in results["modes"]["fp32"]["rows"]]
    assert libraries == ["hf_deepsae", "sparsify"]
    assert {row["policy_picks"] for row in results["modes"]["bf16"]["architectures"]} == {
        results["machine"]["precision"]["bfloat16"]["fast"]}
    assert "policy: its best pick within 5% of the fastest mode measured" in results["targets"]


def test_bench_scaling(tiny_lm, tmp_path, monkeypatch):
    results = run_benchmark("bench_scaling.py", source_flags(tiny_lm, tmp_path), tmp_path,
                            monkeypatch)
    assert [row["n_latents"] for row in results["widths"]] == [64]
    assert results["stream"] and (tmp_path / "results" / "scaling.png").is_file()


def test_study_deep_vs_shallow(tiny_lm, tmp_path, monkeypatch):
    flags = [*source_flags(tiny_lm, tmp_path), "--work_dir", str(tmp_path / "work")]
    results = run_benchmark("study_deep_vs_shallow.py", flags, tmp_path, monkeypatch)
    architectures = ["shallow", "deep", "stacked-2", "matryoshka"]
    assert [row["architecture"] for row in results["runs"]] == [
        *architectures, *(f"{architecture}+kl" for architecture in architectures)]
    for row in results["runs"]:
        assert row["kl_spliced"] >= 0 and "ce_loss_score" in row
        assert 0 <= row["sparse_probing_top_1_accuracy"] <= 1 and row["details"]["absorption"]
    assert (tmp_path / "results" / "fvu_vs_l0.png").is_file()


def test_study_interpretability(tiny_lm, tmp_path, monkeypatch):
    flags = [*source_flags(tiny_lm, tmp_path), "--architectures", "shallow", "deep-2x",
             "--work_dir", str(tmp_path / "work")]
    results = run_benchmark("study_interpretability.py", flags, tmp_path, monkeypatch)
    assert [row["name"] for row in results["runs"]] == ["shallow k=8", "deep-2x k=8"]
    for row in results["runs"]:
        assert set(row["details"]) == {"absorption", "sparse_probing"}
        assert 0 <= row["sparse_probing_top_1_accuracy"] <= 1
    assert (tmp_path / "results" / "study_interpretability.png").is_file()


def test_bench_default_run(tiny_lm, tmp_path, monkeypatch):
    model, corpus = tiny_lm
    results = run_benchmark("bench_default_run.py", [
        "--compare_adam", "--", "--model_name_or_path", str(model), "--dataset_name",
        str(corpus), "--layers", "1", "--context_length", "16", "--expansion_factor", "2",
        "--k", "4", "--encoder_hidden", "16", "--decoder_hidden", "16"], tmp_path, monkeypatch)
    muon, adam = results["runs"]
    assert (muon["optimizer"], adam["optimizer"]) == ("muon", "adam")
    assert set(muon["parts_s"]) == {"corpus", "model load", "tokenising", "activation caching",
                                    "SAE setup", "training", "held-out evaluation", "saving",
                                    "other"}
    assert muon["steps"] == 1280 // 64 and muon["held_out"]["fvu"] > 0
    assert muon["precision"]["lm_dtype"] == "float32"
    assert results["first_10_steps_over_adam"] > 0


def test_a_complete_cache_is_read_without_loading_the_model(tiny_lm, tmp_path, monkeypatch):
    """The benchmarks' activation cache is built once, then reused (it used to be looked for in
    a folder it was never written to, and its builder handed a `PartialState` for an
    `Accelerator`)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    common = importlib.import_module("common")

    model, corpus = tiny_lm
    source = common.ActivationSource(str(model), HOOKPOINT, str(corpus), context_length=16,
                                     max_cached_tokens=2048, cache_dir=str(tmp_path))
    try:
        first = source.cached()
        monkeypatch.setattr(common.ActivationSource, "live", lambda *args: pytest.fail("rebuilt"))
        second = source.cached()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert first.shape == (2048, 32) and torch.equal(first, second)
