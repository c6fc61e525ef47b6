"""The code the model cards print runs as printed, for one SAE and for a folder of SAEs.

The `trust_remote_code=True` lines are promised to work without hf_deepsae: they run in a fresh
Python where `import hf_deepsae` fails, from local folders and from a (local) Hub. The hf_deepsae
lines run here, on the tiny llama the SAEs were made for.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_llama

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.hub import push_sae_to_hub, push_saes_to_hub, save_sae, save_saes

pytest_plugins = ["hub_server"]

HOOKPOINTS = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
WITHOUT_HF_DEEPSAE = "import sys\nsys.modules['hf_deepsae'] = None  # import hf_deepsae fails\n"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("base")
    save_tiny_llama(folder)
    return str(folder)


def make_saes(base_model: str) -> dict[str, DeepSAEModel]:
    torch.manual_seed(0)
    return {hookpoint: DeepSAEModel(DeepSAEConfig(
        d_in=32, n_latents=64, k=4, encoder_hidden=[16], decoder_hidden=[16],
        hookpoint=hookpoint, layer=layer, base_model_name_or_path=base_model)).eval()
        for layer, hookpoint in enumerate(HOOKPOINTS)}


def python_blocks(card: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card.read_text(), re.DOTALL)


def remote_code_block(card: Path) -> str:
    (block,) = [block for block in python_blocks(card) if "trust_remote_code=True" in block]
    return block


def check_outputs(name: str, out: Path) -> str:
    """Lines appended to a card's block: save what its `sae` makes of a fixed input."""
    return (f"\nimport torch\nprint({name!r}, type(sae).__module__)\n"
            f"torch.save(sae(torch.ones(2, 32)).reconstruction, {str(out / name)!r})\n")


def run_without_hf_deepsae(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1"}
    result = subprocess.run([sys.executable, "-c", WITHOUT_HF_DEEPSAE + script], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def outputs(sae: DeepSAEModel) -> torch.Tensor:
    with torch.no_grad():
        return sae(torch.ones(2, 32)).reconstruction


def write_both_layouts(saes: dict[str, DeepSAEModel], tmp_path: Path, where: str,
                       hub_user: str) -> tuple[dict[str, Path], str]:
    """One SAE alone and all of them in subfolders, saved (or pushed); returns the cards to read
    `{name: README}` and the folder or repo of the subfolders."""
    single, folder = tmp_path / where / "single", tmp_path / where / "saes"
    repo_ids = {"single": None, "saes": None}
    if where == "hub":
        push_sae_to_hub(saes[HOOKPOINTS[0]], "single")
        push_saes_to_hub(saes, "saes")
        repo_ids = {name: f"{hub_user}/{name}" for name in repo_ids}  # the pushed cards say so
    save_sae(saes[HOOKPOINTS[0]], single, repo_id=repo_ids["single"])
    save_saes(saes, folder, repo_id=repo_ids["saes"])
    cards = {f"{where}-single": single / "README.md", f"{where}-collection": folder / "README.md",
             f"{where}-subfolder": folder / HOOKPOINTS[1] / "README.md"}
    return cards, repo_ids["saes"] or str(folder)


@pytest.mark.slow
def test_remote_code_lines_load_every_layout_without_hf_deepsae(hub, base_model, tmp_path):
    saes = make_saes(base_model)
    out = tmp_path / "out"
    out.mkdir()
    script, roots = "", []
    for where in ("local", "hub"):
        cards, root = write_both_layouts(saes, tmp_path, where, hub.user)
        script += "".join(remote_code_block(card) + check_outputs(name, out)
                          for name, card in cards.items())
        script += (f"try:\n    AutoModel.from_pretrained({root!r}, trust_remote_code=True)\n"
                   f"except ValueError as error:\n    print('top:', error)\n")
        roots.append(root)

    printed = run_without_hf_deepsae(script, tmp_path).stdout
    for where in ("local", "hub"):
        expected = {"single": saes[HOOKPOINTS[0]], "collection": saes[HOOKPOINTS[0]],
                    "subfolder": saes[HOOKPOINTS[1]]}
        for name, sae in expected.items():
            assert f"{where}-{name} transformers_modules." in printed
            torch.testing.assert_close(torch.load(out / f"{where}-{name}"), outputs(sae),
                                       rtol=0, atol=0)
    for root in roots:
        assert f"top: {root!r} holds 2 SAEs, one per hookpoint, in the subfolders " \
               f"{list(HOOKPOINTS)}" in printed


@pytest.mark.parametrize("layout", ["single", "collection"])
def test_hf_deepsae_lines_run_as_printed(base_model, tmp_path, layout):
    saes = make_saes(base_model)
    if layout == "single":
        card = save_sae(saes[HOOKPOINTS[0]], tmp_path / "sae") / "README.md"
    else:
        card = save_saes(saes, tmp_path / "saes") / "README.md"
    (block,) = [block for block in python_blocks(card) if "splice(" in block]
    namespace: dict = {}
    exec(block, namespace)  # noqa: S102 - the card's own code is the thing under test
    assert namespace["logits"].shape[-1] == 100  # the tiny llama's vocabulary
    latents = namespace["handle"].latents
    assert set(latents) == ({HOOKPOINTS[0]} if layout == "single" else set(HOOKPOINTS))
