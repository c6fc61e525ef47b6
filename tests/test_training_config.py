"""`TrainingConfig`, the SAE arguments and the CLI/YAML generated from them."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from hf_deepsae import DeepSAEConfig
from hf_deepsae.training import DEFAULT_SAE_RECIPE, SAEArguments, TrainingConfig, parse_args
from hf_deepsae.training.config import (
    HELP_GROUPS,
    SAE_HELP_GROUP,
    build_parser,
    sae_config_kwargs,
)


def test_no_arguments_give_the_dataclass_defaults_and_the_deep_recipe():
    training, sae = parse_args([])
    assert training == TrainingConfig()
    assert sae == SAEArguments()
    for name, value in DEFAULT_SAE_RECIPE.items():
        assert getattr(sae, name) == value
    assert sae.encoder_hidden and sae.decoder_hidden  # the default SAE is deep


def test_sae_defaults_come_from_deepsaeconfig_unless_the_recipe_changes_them():
    signature = inspect.signature(DeepSAEConfig.__init__).parameters
    for field in dataclasses.fields(SAEArguments):
        if field.name not in DEFAULT_SAE_RECIPE:
            assert field.default == signature[field.name].default, field.name


def test_flags_override_defaults_and_lists_take_several_values():
    training, sae = parse_args(["--layers", "1", "3", "--lr", "1e-3", "--optimizer", "adam",
                                "--k", "8", "--no_layer_norm"])
    assert training.layers == [1, 3] and training.lr == 1e-3 and training.optimizer == "adam"
    assert sae.k == 8 and sae.layer_norm is False


def test_optional_numbers_take_none_and_others_refuse_it():
    config, sae = parse_args(["--save_total_limit", "none", "--k_aux", "None"])
    assert config.save_total_limit is None and sae.k_aux is None
    with pytest.raises(SystemExit):
        parse_args(["--total_tokens", "none"])


def test_an_empty_hidden_flag_means_a_linear_encoder():
    _, sae = parse_args(["--encoder_hidden", "--decoder_hidden"])
    assert sae.encoder_hidden == [] and sae.decoder_hidden == []


def test_matryoshka_flags_take_lists_of_numbers_and_default_to_none():
    _, sae = parse_args(["--matryoshka_prefixes", "512", "2048",
                         "--matryoshka_weights", "1", "2", "0.5"])
    assert sae.matryoshka_prefixes == [512, 2048] and sae.matryoshka_weights == [1.0, 2.0, 0.5]
    assert all(isinstance(prefix, int) for prefix in sae.matryoshka_prefixes)
    _, sae = parse_args([])
    assert sae.matryoshka_prefixes is None and sae.matryoshka_weights is None
    assert "--matryoshka_prefixes" in help_sections()[SAE_HELP_GROUP]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_config_file_sets_defaults_that_flags_override(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    if suffix == ".yaml":
        path.write_text("lr: 0.002\nk: 16\nlayers: [2, 4]\nencoder_hidden: []\n")
    else:
        path.write_text('{"lr": 0.002, "k": 16, "layers": [2, 4], "encoder_hidden": []}')
    training, sae = parse_args([str(path), "--k", "4"])
    assert training.lr == 0.002 and training.layers == [2, 4]
    assert sae.k == 4 and sae.encoder_hidden == []


def test_unknown_fields_in_a_config_file_are_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown fields \['learning_rate'\]"):
        parse_args([str(path)])


@pytest.mark.parametrize(("field", "value", "message"), [
    ("batch_size", 1, "batch_size=1 must be >= 2"),
    ("shuffle_buffer_size", 10, "must be >= batch_size"),
    ("context_length", 0, "must be a positive integer"),
    ("warmup_ratio", 1.0, r"warmup_ratio=1.0 must be in \[0, 1\)"),
])
def test_bad_values_fail_at_construction(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**{field: value})


def test_sae_overrides_apply_on_top_of_the_recipe():
    kwargs = sae_config_kwargs({"k": 4})
    assert kwargs["k"] == 4 and kwargs["encoder_hidden"] == DEFAULT_SAE_RECIPE["encoder_hidden"]
    with pytest.raises(ValueError, match="recorded by the trainer, not chosen"):
        sae_config_kwargs({"d_in": 8})


def help_sections() -> dict[str, str]:
    """`--help` of examples/train.py as `{section title: its text}`."""
    sections, title = {}, None
    for line in build_parser().format_help().splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            sections[title] = ""
        elif title:
            sections[title] += line + "\n"
    return sections


def test_help_groups_every_option_into_its_section():
    sections = help_sections()
    assert list(sections) == ["options", *HELP_GROUPS, SAE_HELP_GROUP]
    for title, names in HELP_GROUPS.items():
        for name in names:
            assert f"  --{name}" in sections[title], (title, name)
    for field in dataclasses.fields(SAEArguments):
        assert f"  --{field.name}" in sections[SAE_HELP_GROUP], field.name


def test_every_training_field_has_exactly_one_help_section():
    grouped = [name for names in HELP_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(field.name for field in dataclasses.fields(TrainingConfig))


def test_negative_flags_say_what_they_switch_off():
    sae_help = help_sections()[SAE_HELP_GROUP]
    entry = sae_help.split("  --no_layer_norm")[1].split("\n  --")[0]
    assert "Switch --layer_norm off (it is on by default)." in " ".join(entry.split())
    assert "default" not in entry.replace("by default", "")
    assert "recipe" not in entry
