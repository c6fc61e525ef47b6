"""circuit-tracer transcoder sets both ways: per-layer (skip) transcoders for attribution graphs.

circuit-tracer (Ameisen et al. 2025's attribution graphs, whose graphs open on Neuronpedia) replaces
every MLP of a model with a transcoder. A set is a folder (or Hub repo) with `config.yaml`
(`model_kind: transcoder_set`, `model_name`, `feature_input_hook`, `feature_output_hook`) and one
`layer_{i}.safetensors` per layer, 0 to L-1 without gaps, holding `W_enc` `[n, d]`, `W_dec`
`[n, d]`, `b_enc`, `b_dec`, an optional `activation_function.threshold` `[n]` (JumpReLU, else
ReLU) and an optional `W_skip` `[d, d]`. A transcoder computes `act(x @ W_encᵀ + b_enc) @ W_dec +
b_dec (+ x @ W_skipᵀ)` from the MLP input `x` (TransformerLens `blocks.L.mlp.hook_in`).

circuit-tracer's loader (0.5) builds only ReLU and JumpReLU transcoders from these files. ReLU,
JumpReLU and BatchTopK (with its learned inference threshold) transcoders cross exactly. A top-k
transcoder would load there as ReLU and fire every positive latent, so writing one needs
`allow_topk=True`: its `k` goes to `config.yaml`, and `load_circuit_tracer_set` (circuit-tracer's
loader plus the top-k activation) or `from_circuit_tracer` read it correctly. Deep, MLP-encoder
and stacked SAEs have no `W_enc`/`W_dec` and don't cross.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import snapshot_download
from torch import nn

from ..files import FileFormatError, atomic_write_text, load_safetensors
from ..modeling_deepsae import DeepSAEModel
from .linear import build_sae, check_linear, check_tensors, folded_linear_state, linear_config
from .linear import write_checkpoint as write_weights

CONFIG_FILE = "config.yaml"
DEFAULT_INPUT_HOOK, DEFAULT_OUTPUT_HOOK = "mlp.hook_in", "mlp.hook_out"
_FIX = "re-export the set with to_circuit_tracer (or circuit-tracer's TranscoderSet.to_safetensors)"
_SHAPES = {"W_enc": 2, "W_dec": 2, "b_enc": 1, "b_dec": 1, "W_skip": 2,
           "activation_function.threshold": 1}
_LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors")


class TopKActivation(nn.Module):
    """ReLU of the k largest pre-activations per row: a top-k transcoder's rule for circuit-tracer.

    `load_circuit_tracer_set` puts it in place of the ReLU that circuit-tracer's loader builds.
    """

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, pre_acts: torch.Tensor) -> torch.Tensor:
        values, indices = pre_acts.topk(self.k, dim=-1)
        return torch.zeros_like(pre_acts).scatter(-1, indices, values.relu())


def to_circuit_tracer(transcoders: Mapping[int, DeepSAEModel], folder: str | Path, *,
                      model_name: str | None = None,
                      feature_input_hook: str = DEFAULT_INPUT_HOOK,
                      feature_output_hook: str = DEFAULT_OUTPUT_HOOK,
                      allow_topk: bool = False) -> Path:
    """Write `{layer: transcoder}` for every layer 0..L-1 as a circuit-tracer transcoder set.

    Upload the folder to the Hub and `ReplacementModel.from_pretrained(model_name, repo_id)`
    builds the replacement model; locally, `load_circuit_tracer_set(folder)`.

    Args:
        transcoders: one single-stage linear transcoder per layer (d_out == d_in), e.g.
            `{sae.config.layer: sae for sae in load_saes(folder).values()}`.
        model_name: the base model (defaults to the transcoders' `base_model_name_or_path`).
        feature_input_hook, feature_output_hook: TransformerLens hooks (relative to a block)
            the transcoders read and write: the MLP input and output.
        allow_topk: write top-k transcoders, which circuit-tracer's own loader would read as ReLU
            (see the module docstring).
    """
    layers = sorted(transcoders)
    if layers != list(range(len(layers))) or not layers:
        raise ValueError(f"circuit-tracer needs one transcoder for every layer 0..L-1; got layers "
                         f"{layers}. Train the missing ones (train.py --layers ...)")
    topk_k: dict[int, int] = {}
    for layer in layers:
        _check_transcoder(transcoders[layer], layer, allow_topk)
        if _topk(transcoders[layer]):
            topk_k[layer] = transcoders[layer].config.k
    folder = Path(folder)
    for layer in layers:
        write_weights(folder, {f"layer_{layer}.safetensors": _circuit_tracer_state(
            transcoders[layer])})
    first = transcoders[layers[0]].config
    config: dict[str, Any] = {
        "model_name": model_name or first.base_model_name_or_path,
        "model_kind": "transcoder_set",
        "feature_input_hook": feature_input_hook,
        "feature_output_hook": feature_output_hook,
    }
    if topk_k:
        config["topk_k"] = topk_k  # read by hf_deepsae; circuit-tracer 0.5 ignores it
    atomic_write_text(folder / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
    return folder


def from_circuit_tracer(path_or_repo: str | Path, subfolder: str | None = None, *,
                        revision: str | None = None, token: str | None = None
                        ) -> dict[int, DeepSAEModel]:
    """Load a circuit-tracer transcoder set (folder or Hub repo) as `{layer: DeepSAEModel}`.

    Each transcoder's `layer` is set and it reads the MLP input and writes the MLP output, so
    `splice(model, from_circuit_tracer(repo))` runs the replacement model in `transformers`.
    Without `config.yaml` (as `TranscoderSet.to_safetensors` writes) the files alone say everything
    but the base model's name.
    """
    folder = _local_folder(path_or_repo, subfolder, revision, token)
    config, files = _read_set(folder)
    topk_k = {int(layer): k for layer, k in (config.get("topk_k") or {}).items()}
    return {layer: _load_layer(path, layer, topk_k.get(layer), config.get("model_name"),
                               str(path_or_repo)) for layer, path in files.items()}


def load_circuit_tracer_set(path: str | Path, *, device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32) -> Any:
    """circuit-tracer's own `load_transcoder_set` on a local set, with top-k layers made top-k.

    Returns a `circuit_tracer.transcoder.TranscoderSet` for
    `ReplacementModel.from_pretrained_and_transcoders(model_name, transcoders)`.
    """
    from circuit_tracer.transcoder import load_transcoder_set

    config, files = _read_set(Path(path))
    transcoder_set = load_transcoder_set(
        {layer: str(file) for layer, file in files.items()}, scan=str(path),
        device=torch.device(device), dtype=dtype,
        feature_input_hook=config.get("feature_input_hook", DEFAULT_INPUT_HOOK),
        feature_output_hook=config.get("feature_output_hook", DEFAULT_OUTPUT_HOOK),
        lazy_encoder=False, lazy_decoder=False)
    for layer, k in (config.get("topk_k") or {}).items():
        transcoder_set[int(layer)].activation_function = TopKActivation(int(k))
    return transcoder_set


def _read_set(folder: Path) -> tuple[dict[str, Any], dict[int, Path]]:
    """A set's `config.yaml` (empty if absent) and `{layer: layer_<i>.safetensors}`, 0..L-1."""
    config: dict[str, Any] = {}
    if (folder / CONFIG_FILE).is_file():
        try:
            config = yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}
        except yaml.YAMLError as error:
            raise FileFormatError(folder / CONFIG_FILE, f"not valid YAML ({error})",
                                  _FIX) from None
    files = {int(match.group(1)): path for path in folder.glob("layer_*.safetensors")
             if (match := _LAYER_FILE.fullmatch(path.name))}
    if not files:
        raise FileNotFoundError(f"{folder} holds no layer_<i>.safetensors: not a circuit-tracer "
                                f"transcoder set (cross-layer transcoders don't convert)")
    if sorted(files) != list(range(len(files))):
        raise FileFormatError(folder, f"layers {sorted(files)} have gaps; circuit-tracer needs "
                              f"every layer 0..L-1", _FIX)
    return config, dict(sorted(files.items()))


def _check_transcoder(sae: DeepSAEModel, layer: int, allow_topk: bool) -> None:
    config = sae.config
    check_linear(sae, "circuit-tracer")
    if not config.transcoder or config.d_out != config.d_in:
        kind = f"a transcoder {config.d_in} -> {config.d_out}" if config.transcoder else "an SAE"
        raise ValueError(f"layer {layer}: circuit-tracer sets hold transcoders from the MLP input "
                         f"to the MLP output (d_out == d_in); this is {kind}. Train with "
                         f"--transcoder")
    if _topk(sae) and not allow_topk:
        raise ValueError(f"layer {layer}: circuit-tracer's loader builds ReLU or JumpReLU "
                         f"transcoders, so this top-k transcoder would fire every positive latent "
                         f"there. Pass allow_topk=True and load the set with "
                         f"hf_deepsae.interop.load_circuit_tracer_set, or train with --sparsity "
                         f"jumprelu/relu/batchtopk")


def _topk(sae: DeepSAEModel) -> bool:
    """Whether the transcoder selects the top k per row at inference (no threshold to write)."""
    config = sae.config
    return config.sparsity == "topk" or (config.sparsity == "batchtopk" and bool(
        sae.stages[0].sparsity.threshold < 0))


def _circuit_tracer_state(sae: DeepSAEModel) -> dict[str, torch.Tensor]:
    state = folded_linear_state(sae)
    tensors = {"W_enc": state["W_enc"].T, "W_dec": state["W_dec"], "b_enc": state["b_enc"],
               "b_dec": state["b_dec"]}
    if sae.config.sparsity in ("jumprelu", "batchtopk") and not _topk(sae):
        threshold = sae.stages[0].sparsity.threshold.detach().float()
        tensors["activation_function.threshold"] = threshold.expand(sae.config.n_latents)
    if "W_skip" in state:
        tensors["W_skip"] = state["W_skip"]
    return tensors


def _load_layer(path: Path, layer: int, k: int | None, model_name: str | None,
                source: str) -> DeepSAEModel:
    tensors = load_safetensors(path, fix=_FIX, required=("W_enc", "W_dec", "b_enc", "b_dec"))
    check_tensors(path, tensors, _SHAPES, _FIX)
    state = {"W_enc": tensors["W_enc"].T, "b_enc": tensors["b_enc"], "W_dec": tensors["W_dec"],
             "b_dec": tensors["b_dec"]}
    if "W_skip" in tensors:
        state["W_skip"] = tensors["W_skip"]
    threshold = tensors.get("activation_function.threshold")
    if threshold is not None:
        state["threshold"] = threshold
        sparsity = "jumprelu"
    else:
        sparsity = "topk" if k else "relu"
    config = linear_config(state, transcoder=True, sparsity=sparsity, **({"k": k} if k else {}),
                           layer=layer, base_model_name_or_path=model_name,
                           training_config={"converted_from": "circuit-tracer", "source": source})
    return build_sae(config, state, path, _FIX)


def _local_folder(path_or_repo: str | Path, subfolder: str | None, revision: str | None,
                  token: str | None) -> Path:
    """The set's local folder, downloaded (or found in the local Hub cache) for a repo id."""
    local = Path(path_or_repo)
    if not local.is_dir():
        prefix = f"{subfolder}/" if subfolder else ""
        local = Path(snapshot_download(str(path_or_repo), revision=revision, token=token,
                                       allow_patterns=[f"{prefix}{CONFIG_FILE}",
                                                       f"{prefix}layer_*.safetensors"]))
    return local / (subfolder or "")
