"""`benchmarks/bench_distributed.py` runs (smoke mode: a tiny SAE on 1 and 2 gloo processes)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench_distributed(monkeypatch):
    """The benchmark as a module; its worker processes import it by name from `benchmarks/`."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    yield importlib.import_module("bench_distributed")
    sys.modules.pop("bench_distributed", None)


@pytest.mark.slow
def test_the_distributed_benchmark_measures_sharded_memory_per_process(bench_distributed,
                                                                        tmp_path, capsys):
    bench_distributed.main(["--smoke", "--results_dir", str(tmp_path)])
    rows = json.loads((tmp_path / "distributed.json").read_text())["results"]
    assert [(row["processes"], row["mode"]) for row in rows] == [(1, "ddp"), (2, "latents")]
    assert rows[1]["state_ratio"] == pytest.approx(0.5, abs=0.02)  # 64 latents + a shared b_dec
    assert all(row["tokens_per_second"] > 0 and row["peak_rss_mib_per_process"] > 0
               for row in rows)
    assert "state_ratio" in capsys.readouterr().out
