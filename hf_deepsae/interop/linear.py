"""What every foreign format shares: linear SAEs as plain `W_enc`/`b_enc`/`W_dec`/`b_dec` tensors.

Other libraries keep one linear sparse layer (plus an optional skip `W_skip`) and apply no stored
input scale. `folded_linear_state` turns a `DeepSAEModel` into that form with its scales folded
into the weights; `build_sae` goes the other way. Checkpoint folders are found (locally or on the
Hub) and written (atomically) here too, so each format module only maps names and rules.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import save_file

from ..configuration_deepsae import DeepSAEConfig
from ..files import FileFormatError, atomic_write_json, check_tensor, chmod_as_new_file
from ..modeling_deepsae import DeepSAEModel

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def check_linear(sae: DeepSAEModel, format_name: str) -> None:
    """Refuse SAEs that a format of one linear sparse layer can't hold, saying what can."""
    config = sae.config
    if config.n_stacked != 1 or config.encoder_hidden or config.decoder_hidden:
        raise ValueError(
            f"{format_name} holds single-stage SAEs with a linear encoder and decoder; this SAE "
            f"is {config.architecture!r} (encoder_hidden={config.encoder_hidden}, decoder_hidden="
            f"{config.decoder_hidden}, n_stacked={config.n_stacked}). Share it with "
            f"push_sae_to_hub or save_pretrained instead"
        )


def folded_linear_state(sae: DeepSAEModel) -> dict[str, torch.Tensor]:
    """`W_enc` `[d, n]`, `b_enc`, `W_dec`, `b_dec` (and `W_skip` `[d_out, d]`) on raw activations.

    The encoder reads `x - b_dec` (raw `x` for transcoders). DeepSAEModel encodes `x·s_in` and
    divides its output by `s_out`; both scales fold into the weights. The shared `b_dec` needs
    `s_in == s_out` unless it is a transcoder.
    """
    stage, config = sae.stages[0], sae.config
    s_in, s_out = float(sae.input_scale), float(sae.output_scale)
    if not config.transcoder and s_in != s_out:
        raise ValueError(f"input_scale {s_in} != output_scale {s_out}: the b_dec shared by the "
                         f"encoder and decoder can't absorb both")
    state = {
        "W_enc": stage.encoder.weight.detach().float().T * s_in,
        "b_enc": stage.encoder.bias.detach().float(),
        "W_dec": stage.W_dec.detach().float() / s_out,
        "b_dec": stage.b_dec.detach().float() / s_out,
    }
    if sae.W_skip is not None:
        state["W_skip"] = sae.W_skip.detach().float() * (s_in / s_out)
    return {name: tensor.contiguous() for name, tensor in state.items()}


def linear_config(state: dict[str, torch.Tensor], **settings) -> DeepSAEConfig:
    """The `DeepSAEConfig` of a single linear layer with these `folded_linear_state` tensors."""
    d_in, n_latents = state["W_enc"].shape
    d_out = state["W_dec"].shape[1]
    transcoder = settings.pop("transcoder", False) or d_out != d_in or "W_skip" in state
    return DeepSAEConfig(d_in=d_in, n_latents=n_latents, d_out=d_out if transcoder else None,
                         transcoder=transcoder, skip_connection="W_skip" in state, **settings)


def build_sae(config: DeepSAEConfig, state: dict[str, torch.Tensor], path: str | Path,
              fix: str) -> DeepSAEModel:
    """A `DeepSAEModel` computing what the linear `state` (as `folded_linear_state`) computes.

    `path` is the file the tensors came from: tensors whose shapes don't fit together raise a
    `FileFormatError` naming it, with `fix`.
    """
    sae = DeepSAEModel(config)
    stage_state = {"encoder.weight": state["W_enc"].T, "encoder.bias": state["b_enc"],
                   "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    if "threshold" in state:
        stage_state["sparsity.threshold"] = state["threshold"]
    full = sae.state_dict() | {f"stages.0.{name}": tensor for name, tensor in stage_state.items()}
    if "W_skip" in state:
        full["W_skip"] = state["W_skip"]
    try:
        sae.load_state_dict(full)
    except RuntimeError as error:
        raise FileFormatError(path, f"its tensor shapes don't fit together ({error})",
                              fix) from None
    return sae.to(state["W_dec"].dtype).eval()


def check_tensors(path: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, int],
                  fix: str) -> None:
    """Every named tensor that is present is floating point with `shapes[name]` dimensions."""
    for name, ndim in shapes.items():
        if name in tensors:
            check_tensor(path, name, tensors[name], fix=fix, ndim=ndim)


def write_checkpoint(path: str | Path, files: dict[str, dict | dict[str, torch.Tensor]]) -> Path:
    """Write JSON configs and safetensors weights (`{filename: content}`) into folder `path`.

    The weights are written to a temporary sibling and renamed, the JSON atomically, so an
    interrupted export never leaves a half-written checkpoint that a loader would accept.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if name.endswith(".safetensors"):
            with tempfile.TemporaryDirectory(dir=path) as scratch:
                save_file({key: tensor.contiguous() for key, tensor in content.items()},
                          Path(scratch) / name)
                chmod_as_new_file(Path(scratch) / name)  # safetensors writes 0600 files
                shutil.move(Path(scratch) / name, path / name)
        else:
            atomic_write_json(path / name, content)
    return path


def checkpoint_folder(path_or_repo: str | Path, subfolder: str | None,
                      filenames: tuple[str, ...], revision: str | None, token: str | None,
                      argument: str) -> Path:
    """The local folder holding `filenames`, downloading them from the Hub if needed.

    When they aren't there, the error lists the subfolders that hold them (pass one as
    `argument`).
    """
    local = Path(path_or_repo)
    if local.is_dir():
        folder = local / (subfolder or "")
        if all((folder / name).is_file() for name in filenames):
            return folder
        found = local.glob(f"*/{filenames[0]}")
        candidates = sorted(str(path.parent.relative_to(local)) for path in found)
    else:
        try:
            paths = [hf_hub_download(str(path_or_repo), name, subfolder=subfolder,
                                     revision=revision, token=token) for name in filenames]
            return Path(paths[0]).parent
        except EntryNotFoundError:
            files = HfApi(token=token).list_repo_files(str(path_or_repo), revision=revision)
            candidates = sorted(file.rsplit("/", 1)[0] for file in files
                                if file.endswith(f"/{filenames[0]}"))
    where = f"{path_or_repo}/{subfolder}" if subfolder else str(path_or_repo)
    hint = (f"; it holds SAEs in {candidates}: pass {argument}=<one of them>" if candidates
            else "; is this the right path or repo?")
    raise FileNotFoundError(f"{where} has no {' + '.join(filenames)}{hint}")


def layer_of(hookpoint: str | None) -> int | None:
    """The layer index in a module path like `model.layers.6.mlp`, if it has one."""
    match = _LAYER.search(hookpoint or "")
    return int(match.group(1)) if match else None
