"""`examples/splice_generate.py` on a tiny random llama: exact error splice, steering, bad input."""

import pytest
import torch
from example_scripts import import_example
from tiny_models import judge_tokenizer, save_tiny_llama, tiny_model

from hf_deepsae import DeepSAEConfig, DeepSAEModel, capture_activations
from hf_deepsae.hub import save_saes

HOOKPOINT = "model.layers.0.mlp.down_proj"
OTHER_HOOKPOINT = "model.layers.1.mlp.down_proj"
N_LATENTS = 48
PROMPT = "w5 w6 w7 w8"


@pytest.fixture(scope="module")
def cli():
    yield from import_example("splice_generate")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny llama with a word-level tokenizer and its layer-0 SAE: alone (`sae/`), as
    `train.py` saves it, in a subfolder named after the hookpoint (`saes/<hookpoint>/`), and next
    to a layer-1 SAE (`two_saes/<hookpoint>/`)."""
    root = tmp_path_factory.mktemp("splice_generate")
    save_tiny_llama(root / "model")
    torch.manual_seed(0)
    sae = DeepSAEModel(DeepSAEConfig(d_in=32, n_latents=N_LATENTS, k=4, hookpoint=HOOKPOINT,
                                     base_model_name_or_path=str(root / "model")))
    sae.save_pretrained(root / "sae")
    save_saes({HOOKPOINT: sae}, root / "saes")
    other = DeepSAEModel(DeepSAEConfig(d_in=32, n_latents=N_LATENTS, k=4, hookpoint=OTHER_HOOKPOINT,
                                       base_model_name_or_path=str(root / "model")))
    save_saes({HOOKPOINT: sae, OTHER_HOOKPOINT: other}, root / "two_saes")
    return root


def run(cli, workspace, *extra, sae="sae"):
    return cli.main(["--sae", str(workspace / sae), "--prompt", PROMPT, "--max_new_tokens", "6",
                     "--top_latents", "5", *extra])


@pytest.mark.parametrize("sae, extra", [("sae", []), ("saes", []),
                                        ("two_saes", ["--subfolder", HOOKPOINT])])
def test_error_mode_splice_reproduces_the_original_continuation(cli, workspace, capsys, sae,
                                                                 extra):
    result = run(cli, workspace, *extra, sae=sae)
    assert len(result.continuations["original"]) == 6
    assert result.continuations["spliced"] == result.continuations["original"]
    assert result.texts["spliced"] == result.texts["original"]
    assert "reproduces the original exactly: yes" in capsys.readouterr().out


@pytest.mark.parametrize("edit", [("clamp", "100"), ("add", "100"), ("scale", "1000")])
def test_a_strong_edit_of_the_prompts_top_latent_changes_the_continuation(cli, workspace, edit):
    mode, value = edit
    result = run(cli, workspace, "--mode", mode, "--value", value)
    assert result.latent == result.top_latents[0][0]
    assert result.continuations["steered"] != result.continuations["original"]


def test_clamping_a_chosen_latent_changes_the_continuation(cli, workspace, capsys):
    result = run(cli, workspace, "--latent", "5", "--value", "100")
    assert (result.latent, result.value) == (5, 100.0)
    assert result.continuations["steered"] != result.continuations["original"]
    assert "Editing latent 5: clamp 100" in capsys.readouterr().out


def test_top_latents_are_the_saes_strongest_on_the_prompt(cli, workspace, capsys):
    result = run(cli, workspace)
    model = tiny_model("llama")
    input_ids = judge_tokenizer()(PROMPT, return_tensors="pt").input_ids
    activations = capture_activations(model, input_ids, [HOOKPOINT])[HOOKPOINT]
    sae = DeepSAEModel.from_pretrained(workspace / "sae")
    peaks = sae.encode_dense(activations)[0].amax(dim=0)
    expected = peaks.topk(5)
    assert [latent for latent, _ in result.top_latents] == expected.indices.tolist()
    assert [peak for _, peak in result.top_latents] == pytest.approx(expected.values.tolist())
    assert f"latent {expected.indices[0].item():>6}" in capsys.readouterr().out


def test_default_value_is_a_multiple_of_the_latents_peak(cli, workspace):
    result = run(cli, workspace)
    latent, peak = result.top_latents[0]
    assert result.latent == latent
    assert result.value == pytest.approx(cli.STEERING_STRENGTH * peak)


@pytest.mark.parametrize("mode, effect", [("zero", "changes nothing"),
                                           ("clamp", "injects a feature")])
def test_a_latent_silent_on_the_prompt_gets_a_warning(cli, workspace, capsys, mode, effect):
    fired = {latent for latent, peak in run(cli, workspace, "--top_latents", "48").top_latents
             if peak > 0}
    silent = min(set(range(N_LATENTS)) - fired)
    capsys.readouterr()
    run(cli, workspace, "--latent", str(silent), "--mode", mode)
    warning = capsys.readouterr().err
    assert f"Warning: latent {silent} does not fire on the prompt, so --mode {mode} {effect}" \
        in warning


def test_the_prompts_strongest_latent_gets_no_warning(cli, workspace, capsys):
    run(cli, workspace)
    assert "Warning" not in capsys.readouterr().err


def test_unknown_latent_names_the_valid_range(cli, workspace):
    with pytest.raises(ValueError, match=rf"--latent {N_LATENTS} .* ids 0 to {N_LATENTS - 1}"):
        run(cli, workspace, "--latent", str(N_LATENTS))


def test_missing_sae_folder_is_a_clear_error(cli, workspace):
    with pytest.raises(ValueError, match="no SAE folder at .*missing.*not a Hub repo id"):
        run(cli, workspace, sae="missing")


def test_missing_default_sae_folder_fails_without_asking_the_hub(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="no SAE folder at 'outputs/deepsae'.*examples/train.py"):
        cli.main(["--prompt", PROMPT])


def test_folder_of_several_saes_asks_for_subfolder(cli, workspace):
    with pytest.raises(ValueError, match=rf"holds 2 SAEs .*{OTHER_HOOKPOINT}.*--subfolder"):
        run(cli, workspace, sae="two_saes")
