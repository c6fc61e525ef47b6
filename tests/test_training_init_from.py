"""`--init_from`: fine-tune an existing SAE of any format hf_deepsae reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_training_e2e import HOOKPOINT, tiny_config

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.interop import from_saelens, from_sparsify, to_saelens, to_sparsify
from hf_deepsae.training import train
from hf_deepsae.training import trainer as trainer_module

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

SHALLOW = {"d_in": 32, "expansion_factor": 2, "k": 4}


def saved_sae(folder: Path, seed: int = 1, **config) -> DeepSAEModel:
    """A random SAE for the tiny GPT-2's layer-1 MLP output, saved to `folder`, with a non-zero
    b_dec and input scale (which a fresh run would fit from data instead)."""
    torch.manual_seed(seed)
    sae = DeepSAEModel(DeepSAEConfig(**{**SHALLOW, "hookpoint": HOOKPOINT, "layer": 1,
                                        **config}))
    with torch.no_grad():
        for stage in sae.stages:
            stage.b_dec.normal_()
        sae.input_scale.fill_(0.5)
        sae.output_scale.fill_(0.5)
    sae.save_pretrained(folder)
    return sae


def step_zero_weights(monkeypatch) -> dict[str, torch.Tensor]:
    """Filled with the SAE's weights as the training loop starts."""
    weights: dict[str, torch.Tensor] = {}
    real_loop = trainer_module._training_loop

    def loop(states, *args, **kwargs):
        sae = states.local[0].sae
        weights.update({name: value.clone() for name, value in sae.state_dict().items()})
        return real_loop(states, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "_training_loop", loop)
    return weights


def assert_starts_from(initial: DeepSAEModel, weights: dict[str, torch.Tensor],
                       trained: DeepSAEModel) -> None:
    expected = initial.state_dict()
    assert weights.keys() == expected.keys()
    for name, value in weights.items():
        assert torch.equal(value, expected[name].to(value.dtype)), name
    assert not torch.equal(trained.state_dict()["stages.0.encoder.weight"],
                           expected["stages.0.encoder.weight"])  # and training continued


@pytest.mark.parametrize("config", [{}, {"encoder_hidden": [16], "decoder_hidden": [16],
                                         "layer_norm": True, "normalize_input": True}],
                         ids=["shallow", "deep"])
def test_init_from_a_saved_sae_starts_from_its_weights_and_trains_on(tiny_lm, tmp_path,
                                                                     monkeypatch, config):
    initial = saved_sae(tmp_path / "initial", **config)
    weights = step_zero_weights(monkeypatch)
    saes = train(tiny_config(tiny_lm, tmp_path / "out", init_from=str(tmp_path / "initial")))
    trained = saes[HOOKPOINT]
    assert_starts_from(initial, weights, trained)
    assert trained.config.encoder_hidden == initial.config.encoder_hidden  # its architecture
    assert trained.config.n_latents == 64 and trained.config.k == 4
    assert trained.config.training_config["init_from"] == str(tmp_path / "initial")


@pytest.mark.parametrize(("export", "load"), [(to_sparsify, from_sparsify),
                                              (to_saelens, from_saelens)],
                         ids=["sparsify", "saelens"])
def test_init_from_a_converted_checkpoint_folder(tiny_lm, tmp_path, monkeypatch, export, load):
    export(saved_sae(tmp_path / "initial"), tmp_path / "exported")
    weights = step_zero_weights(monkeypatch)
    saes = train(tiny_config(tiny_lm, tmp_path / "out", init_from=str(tmp_path / "exported")))
    assert_starts_from(load(tmp_path / "exported"), weights, saes[HOOKPOINT])


def test_an_sae_of_another_width_is_refused_with_the_fix(tiny_lm, tmp_path):
    saved_sae(tmp_path / "initial", d_in=16)
    with pytest.raises(ValueError, match=r"has d_in 16 \(this run's site: 32\).*--hookpoints"):
        train(tiny_config(tiny_lm, tmp_path / "out", init_from=str(tmp_path / "initial")))


def test_an_sae_of_another_site_is_refused_with_the_fix(tiny_lm, tmp_path):
    saved_sae(tmp_path / "initial")
    with pytest.raises(ValueError, match=f"trained at {HOOKPOINT}.*--hookpoints {HOOKPOINT}"):
        train(tiny_config(tiny_lm, tmp_path / "out", init_from=str(tmp_path / "initial"),
                          layers=[0]))


def test_conflicting_architecture_flags_are_listed(tiny_lm, tmp_path):
    saved_sae(tmp_path / "initial")
    with pytest.raises(ValueError, match=r"(?s)another architecture.*--k 8 \(the checkpoint's: "
                                         r"4\).*--encoder_hidden \[16\].*drop these flags"):
        train(tiny_config(tiny_lm, tmp_path / "out", init_from=str(tmp_path / "initial")),
              {"k": 8, "encoder_hidden": [16]})


def test_flags_equal_to_the_checkpoint_and_loss_weights_are_accepted(tiny_lm, tmp_path):
    saved_sae(tmp_path / "initial")
    saes = train(tiny_config(tiny_lm, tmp_path / "out", init_from=str(tmp_path / "initial")),
                 {"k": 4, "encoder_hidden": [], "decoder_hidden": [], "auxk_coefficient": 0.5})
    assert saes[HOOKPOINT].config.auxk_coefficient == 0.5
