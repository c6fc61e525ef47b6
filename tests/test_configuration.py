"""DeepSAEConfig: defaults resolve, every inconsistency is a ValueError naming field and fix."""

import pytest

from hf_deepsae import DeepSAEConfig


def test_defaults_resolve_widths():
    config = DeepSAEConfig(d_in=64, expansion_factor=8, k=16)
    assert config.n_latents == 512
    assert config.d_out == 64
    assert config.n_total_latents == 512
    assert config.k_aux == 32
    assert config.architecture == "shallow"


@pytest.mark.parametrize(
    ("kwargs", "architecture"),
    [
        ({"encoder_hidden": [128]}, "mlp-encoder"),
        ({"encoder_hidden": [128], "decoder_hidden": [96]}, "deep"),
        ({"n_stacked": 3}, "stacked"),
        ({"transcoder": True, "d_out": 32}, "shallow-transcoder"),
    ],
)
def test_architecture_names(kwargs, architecture):
    assert DeepSAEConfig(d_in=64, n_latents=256, k=8, **kwargs).architecture == architecture


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "invalid k=0"),
        ({"k": -3}, "invalid k=-3"),
        ({"k": 300}, "at most n_latents=256"),
        ({"encoder_hidden": [64, -1]}, "invalid encoder_hidden"),
        ({"decoder_hidden": [0]}, "invalid decoder_hidden"),
        ({"sparsity": "gated"}, "invalid sparsity='gated'"),
        ({"hidden_act": "swishy"}, "invalid hidden_act='swishy'"),
        ({"d_out": 32}, "set transcoder=True"),
        ({"d_in": 0}, "invalid d_in=0"),
        ({"n_latents": -5}, "invalid n_latents=-5"),
        ({"n_stacked": 0}, "invalid n_stacked=0"),
        ({"n_stacked": 2, "transcoder": True}, "stacked residual stages need transcoder=False"),
        ({"hook_site": "attn"}, "invalid hook_site='attn'"),
        ({"std_coefficient": -1.0}, "loss coefficients must be >= 0"),
        ({"batchtopk_threshold_momentum": 1.0}, "invalid batchtopk_threshold_momentum"),
        ({"topk_selection_dtype": "int8"}, "invalid topk_selection_dtype='int8'; choose one of"),
        ({"topk_selection_dtype": "bfloat16", "sparsity": "jumprelu"},
         "applies to sparsity='topk' only"),
    ],
)
def test_invalid_settings_raise_with_field_and_fix(kwargs, message):
    settings = {"d_in": 64, "n_latents": 256, "k": 8} | kwargs
    with pytest.raises(ValueError, match=message):
        DeepSAEConfig(**settings)


def test_k_is_not_checked_for_threshold_sparsities():
    assert DeepSAEConfig(d_in=8, n_latents=16, k=999, sparsity="relu").k == 999


def test_round_trip_through_dict_and_folder(tmp_path):
    config = DeepSAEConfig(d_in=32, n_latents=64, k=4, encoder_hidden=[48], hookpoint="h.0.mlp")
    config.save_pretrained(tmp_path)
    loaded = DeepSAEConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_config_of_another_model_type_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a 'gpt2' config, not a 'deepsae' SAE"):
        DeepSAEConfig.from_pretrained(tmp_path)
