"""What a training run tells its user: each slow phase announced, and what it leaves behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_activations import make_tiny_lm, write_corpus
from test_training_e2e import TINY_SAE, tiny_config

from hf_deepsae.activations import load_language_model
from hf_deepsae.training import train
from hf_deepsae.training import trainer as trainer_module


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny GPT-2 and its corpus, as `test_training_e2e.tiny_config` takes them."""
    folder = tmp_path_factory.mktemp("lm")
    corpus = write_corpus(folder)
    return make_tiny_lm(folder, corpus), corpus


def test_loading_the_language_model_says_from_where(lm, capsys):
    load_language_model(str(lm[0]), verbose=True)
    assert f"Loading {lm[0]} from {lm[0]}" in capsys.readouterr().err


def test_the_held_out_evaluation_shows_its_progress(lm, tmp_path, capsys):
    train(tiny_config(lm, tmp_path), TINY_SAE)
    errors = capsys.readouterr().err
    assert f"Loading {lm[0]}" in errors
    assert "Held-out evaluation: 100%" in errors and "tok/s" in errors


@pytest.mark.parametrize("checkpointing_steps", [4, 0])
def test_a_finished_run_says_which_checkpoints_it_leaves(lm, tmp_path, capsys,
                                                         checkpointing_steps):
    train(tiny_config(lm, tmp_path, checkpointing_steps=checkpointing_steps,
                      save_total_limit=1), TINY_SAE)
    printed = capsys.readouterr().out
    said = f"1 training checkpoint (0 MB) remain in {tmp_path / 'checkpoints'}"
    assert (said in printed) == (checkpointing_steps > 0)


def test_the_saved_record_names_weights_that_are_not_the_hub_checkpoint(lm, tmp_path,
                                                                       monkeypatch):
    def load_from_gguf(*args, **kwargs):  # what load_language_model does for the embedded GGUF
        model, tokenizer = load_language_model(*args, **kwargs)
        model.config.weights_source = "model.Q4_1.gguf, de-quantised"
        return model, tokenizer

    monkeypatch.setattr(trainer_module, "load_language_model", load_from_gguf)
    monkeypatch.setenv("HF_DEEPSAE_FAST_BF16", "0")
    saes = train(tiny_config(lm, tmp_path), TINY_SAE)
    record = next(iter(saes.values())).config.training_config
    assert record["model_weights"] == "model.Q4_1.gguf, de-quantised"
    assert record["mixed_precision"] == "auto" and "output_dir" not in record
    assert record["precision"]["mixed_precision"] == "no"
