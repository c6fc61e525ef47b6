"""`DeepSAEConfig`: one config for every sparse-autoencoder architecture hf_deepsae knows.

The config is the single source of truth for an SAE's shape, sparsity rule and loss weights, and it
carries the SAE's provenance (base model, hookpoint) so a checkpoint explains itself on the Hub.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import os
from typing import Any

from transformers import PretrainedConfig

from .files import FileFormatError, read_json

SPARSITY_KINDS = ("topk", "batchtopk", "jumprelu", "relu")
TOPK_KINDS = ("topk", "batchtopk")
HIDDEN_ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "leaky_relu")
HOOK_SITES = ("mlp_out", "mlp_in", "resid")
SELECTION_DTYPES = ("auto", "bfloat16", "float16")
SAVED_FIELDS = ("d_in", "d_out", "n_latents", "sparsity", "encoder_hidden", "decoder_hidden",
                "hidden_act", "layer_norm", "n_stacked", "transcoder", "normalize_input",
                "hook_site")
"""Fields a saved config must carry (plus `k` for top-k kinds): what the SAE computes and where it
reads. Every checkpoint hf_deepsae writes has them; a default filled in for a missing one could
silently be another SAE."""
WEIGHTS_CHECKSUMS_KEY = "weights_sha256"
"""`config.json` key of the weights files' SHA-256 digests (see `integrity.py`): file
bookkeeping, never a config attribute."""
SUBFOLDERS_KEY = "sae_subfolders"
"""The key of the top-level config.json of a folder or repo holding one SAE per hookpoint
(`hf_deepsae.save_saes`, the trainer's output): it lists the subfolders; it describes no SAE."""


def _fail(field: str, value: Any, fix: str) -> None:
    raise ValueError(f"DeepSAEConfig: invalid {field}={value!r}; {fix}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A finite int or float (not a bool, string or NaN)."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


@functools.cache
def _transformers_keys() -> frozenset[str]:
    """Keys `PretrainedConfig` itself writes to or accepts from a config.json."""
    return frozenset(PretrainedConfig().to_dict()) | {
        "auto_map", "torch_dtype", "name_or_path", "num_labels", "attn_implementation",
        "experts_implementation", "per_layer_config", WEIGHTS_CHECKSUMS_KEY,
    }


def unknown_keys(config_class: type, keys: Any) -> list[str]:
    """Each key that is no argument of `config_class` nor a transformers key, with a suggestion.

    A typo such as `n_latnts=` would otherwise be stored as an attribute nobody reads while the
    SAE trains at the default width. Keys starting with `_` are transformers' internals.
    """
    own = [name for name in inspect.signature(config_class.__init__).parameters
           if name not in ("self", "kwargs")]
    problems = []
    for key in keys:
        if key.startswith("_") or key in own or key in _transformers_keys():
            continue
        close = difflib.get_close_matches(key, own, n=1)
        problems.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return problems


class DeepSAEConfig(PretrainedConfig):
    r"""Configuration of a (deep, stacked, or shallow) sparse autoencoder or transcoder.

    The SAE maps `x ∈ R^d_in` to latents `z ∈ R^n_latents` (k active for top-k kinds) and back to
    `x̂ ∈ R^d_out`:
    `x → encoder MLP (encoder_hidden) → Linear → sparsity → z → decoder MLP (decoder_hidden) → x̂`.

    Args:
        d_in (`int`, defaults to 768): width of the activations the encoder reads.
        n_latents (`int`, *optional*): latents per sparse stage. Defaults to
            `expansion_factor * d_in`.
        expansion_factor (`int`, defaults to 16): used only when `n_latents` is not given.
        k (`int`, defaults to 32): active latents per row and per stage for `topk`, and per row on
            average over a batch for `batchtopk`. Ignored by `jumprelu` and `relu`.
        sparsity (`str`, defaults to `"topk"`): `"topk"` (exactly k per row), `"batchtopk"`
            (k·batch over the batch while training, a learned threshold at inference), `"jumprelu"`
            (learned per-latent thresholds trained with a straight-through L0 penalty) or `"relu"`
            (trained with an L1 penalty).
        encoder_hidden (`list[int]`, defaults to `[]`): widths of dense `Linear → act [→ LayerNorm]`
            layers before the sparse layer. Empty: a linear encoder.
        decoder_hidden (`list[int]`, defaults to `[]`): widths of dense layers after the sparse
            layer. Empty: a linear decoder with unit-norm rows `W_dec`, readable by other tools.
        hidden_act (`str`, defaults to `"gelu"`): nonlinearity of the dense layers.
        layer_norm (`bool`, defaults to `False`): a LayerNorm after each dense layer's
            activation.
        n_stacked (`int`, defaults to 1): number of residual sparse stages; stage i encodes what the
            stages before it left unexplained, reconstructions add up and L0 is their sum.
        transcoder (`bool`, defaults to `False`): read the MLP input and predict the MLP output.
        d_out (`int`, *optional*): output width; only for transcoders (otherwise equals `d_in`).
        matryoshka_prefixes (`list[int]`, *optional*): train a Matryoshka SAE (Bussmann et al.
            2025; Nabeshima 2025): for each prefix p, the latents with global id < p must
            reconstruct the target on their own, so early latents learn general features and later
            ones refine them. Strictly increasing latent counts; the full width `n_total_latents`
            is always the last prefix (appended when omitted). A prefix's reconstruction is the
            SAE's output with the later latents switched off (the same top-k latents, truncated;
            the full decoder). Ids are global, stage 0's first: on a stacked SAE a prefix keeps
            whole the stages it passes and truncates the one it ends in (see `matryoshka.py`).
            The loss's FVU term becomes the weighted mean of the prefixes' FVUs. None: an
            ordinary SAE.
        matryoshka_weights (`list[float]`, *optional*): one weight >= 0 per prefix (the full width
            included) of that weighted mean; defaults to equal weights.
        skip_connection (`bool`, defaults to `False`): add a linear skip `W_skip x`
            (`[d_out, d_in]`, zero-initialised) to a transcoder's output, as in skip transcoders
            (Paulo et al. 2025; sparsify, circuit-tracer and SAELens hold the same term), so the
            latents need only explain what a linear map of the input can't. Transcoders only.
        normalize_input (`bool`, defaults to `False`): scale inputs by a stored factor (fitted from
            data with `DeepSAEModel.initialize_from_activations`) so a loaded SAE applies it by
            itself.
        k_aux (`int`, *optional*): latents used by the AuxK dead-latent loss, at most
            `n_latents`. Defaults to `min(d_in // 2, n_latents)`.
        auxk_coefficient (`float`, defaults to 1/32): weight of the AuxK loss.
        std_coefficient (`float`, defaults to 0.0): weight of the penalty on the standard deviation
            of the encoder pre-activations (a remedy for dead latents in deep SAEs).
        l1_coefficient (`float`, defaults to 1e-3): weight of the L1 penalty (`relu` only).
        l0_coefficient (`float`, defaults to 1e-3): weight of the L0 penalty (`jumprelu` only).
        jumprelu_bandwidth (`float`, defaults to 1e-3): width of the pseudo-derivative's window
            (> 0).
        jumprelu_init_threshold (`float`, defaults to 1e-3): initial JumpReLU threshold (>= 0).
        batchtopk_threshold_momentum (`float`, defaults to 0.99): EMA momentum of the inference
            threshold learned by `batchtopk`.
        topk_selection_dtype (`str`, *optional*, defaults to `"auto"`): `"bfloat16"` or
            `"float16"` to *choose* the k latents (`topk` only) with a matmul in that precision,
            while the latents' values, the gradients and the weights stay in the model's dtype.
            The encoder matmul bounds a top-k step and runs ~2x faster in bf16 where bf16 is
            native and fast, but ~100x slower where it is emulated (AVX2 CPUs); the choice can
            differ from full precision only among near-ties at the k-th largest pre-activation.
            `"auto"`: bf16 on devices whose bf16 matmuls `hf_deepsae.precision` finds fast, else
            exact (no effect on other sparsities). `None` (or `"none"`): always in the model's
            dtype (under autocast, in autocast's).
        check_inputs (`bool`, defaults to `True`): reject NaN/inf inputs in `forward` (one cheap
            reduction; switch off for maximum speed).
        initializer_range (`float`, *optional*): std of a normal init of every `Linear` layer's
            weight (encoder, dense layers); defaults to Kaiming-uniform (`nn.Linear`'s own).
        base_model_name_or_path (`str`, *optional*): the language model the SAE was trained on.
        hookpoint (`str`, *optional*): module path in the base model the SAE reads.
        hook_site (`str`, defaults to `"mlp_out"`): what the hookpoint's activations are:
            `"mlp_out"`, `"mlp_in"` or `"resid"`.
        layer (`int`, *optional*): the base model's layer index of the hookpoint.
        training_config (`dict`, *optional*): the training run's settings, recorded for provenance.
        metrics (`dict`, *optional*): evaluation results (FVU, L0, dead %, CE-loss score…).
        neuronpedia_id (`str`, *optional*): the SAE's feature pages on Neuronpedia,
            `"<model_id>/<source>"` (`interop.to_neuronpedia` records it); the model card links
            them.

    Any other keyword argument is an error (with the closest valid name), as is a saved config
    that lacks one of `SAVED_FIELDS`.
    """

    model_type = "deepsae"

    def __init__(
        self,
        d_in: int = 768,
        n_latents: int | None = None,
        expansion_factor: int = 16,
        k: int = 32,
        sparsity: str = "topk",
        encoder_hidden: list[int] | None = None,
        decoder_hidden: list[int] | None = None,
        hidden_act: str = "gelu",
        layer_norm: bool = False,
        n_stacked: int = 1,
        transcoder: bool = False,
        d_out: int | None = None,
        matryoshka_prefixes: list[int] | None = None,
        matryoshka_weights: list[float] | None = None,
        skip_connection: bool = False,
        normalize_input: bool = False,
        k_aux: int | None = None,
        auxk_coefficient: float = 1 / 32,
        std_coefficient: float = 0.0,
        l1_coefficient: float = 1e-3,
        l0_coefficient: float = 1e-3,
        jumprelu_bandwidth: float = 1e-3,
        jumprelu_init_threshold: float = 1e-3,
        batchtopk_threshold_momentum: float = 0.99,
        topk_selection_dtype: str | None = "auto",
        check_inputs: bool = True,
        initializer_range: float | None = None,
        base_model_name_or_path: str | None = None,
        hookpoint: str | None = None,
        hook_site: str = "mlp_out",
        layer: int | None = None,
        training_config: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        neuronpedia_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        unknown = unknown_keys(type(self), kwargs)
        if unknown:
            raise TypeError(f"DeepSAEConfig got unknown arguments {', '.join(unknown)}; see "
                            f"help(DeepSAEConfig) for the valid ones")
        kwargs.pop(WEIGHTS_CHECKSUMS_KEY, None)
        self.d_in = d_in
        self.expansion_factor = expansion_factor
        self.n_latents = n_latents if n_latents is not None else (
            expansion_factor * d_in if _is_int(expansion_factor) and _is_int(d_in) else None)
        self.k = k
        self.sparsity = sparsity
        self.encoder_hidden = _widths("encoder_hidden", encoder_hidden)
        self.decoder_hidden = _widths("decoder_hidden", decoder_hidden)
        self.hidden_act = hidden_act
        self.layer_norm = layer_norm
        self.n_stacked = n_stacked
        self.transcoder = transcoder
        self.d_out = d_out if d_out is not None else d_in
        self.matryoshka_prefixes = _optional_list("matryoshka_prefixes", matryoshka_prefixes)
        self.matryoshka_weights = _optional_list("matryoshka_weights", matryoshka_weights)
        self.skip_connection = skip_connection
        self.normalize_input = normalize_input
        self.k_aux = k_aux if k_aux is not None else _default_k_aux(d_in, self.n_latents)
        self.auxk_coefficient = auxk_coefficient
        self.std_coefficient = std_coefficient
        self.l1_coefficient = l1_coefficient
        self.l0_coefficient = l0_coefficient
        self.jumprelu_bandwidth = jumprelu_bandwidth
        self.jumprelu_init_threshold = jumprelu_init_threshold
        self.batchtopk_threshold_momentum = batchtopk_threshold_momentum
        self.topk_selection_dtype = None if topk_selection_dtype == "none" else topk_selection_dtype
        self.check_inputs = check_inputs
        self.initializer_range = initializer_range
        self.base_model_name_or_path = base_model_name_or_path
        self.hookpoint = hookpoint
        self.hook_site = hook_site
        self.layer = layer
        self.training_config = training_config
        self.metrics = metrics
        self.neuronpedia_id = neuronpedia_id
        self._validate()
        self.matryoshka_prefixes = self._completed_prefixes()
        super().__init__(**kwargs)

    @property
    def is_topk(self) -> bool:
        """Whether latents come as k (values, indices) pairs per row rather than a dense vector."""
        return self.sparsity == "topk"

    @property
    def n_total_latents(self) -> int:
        """Latents over all stacked stages; global latent ids live in `[0, n_total_latents)`."""
        return self.n_stacked * self.n_latents

    @property
    def is_linear_decoder(self) -> bool:
        return not self.decoder_hidden

    @property
    def architecture(self) -> str:
        """A short name for the architecture family, used in tags and model cards."""
        if self.n_stacked > 1:
            family = "stacked"
        elif self.encoder_hidden and self.decoder_hidden:
            family = "deep"
        elif self.encoder_hidden:
            family = "mlp-encoder"
        elif self.decoder_hidden:
            family = "mlp-decoder"
        else:
            family = "shallow"
        return f"{family}-transcoder" if self.transcoder else family

    def _validate(self) -> None:
        """Reject inconsistent settings up front, naming the field and how to fix it."""
        for field in ("d_in", "expansion_factor", "n_latents", "d_out", "n_stacked", "k_aux"):
            value = getattr(self, field)
            if not _is_int(value) or value <= 0:
                _fail(field, value, "it must be a positive integer")
        if self.sparsity not in SPARSITY_KINDS:
            _fail("sparsity", self.sparsity, f"choose one of {list(SPARSITY_KINDS)}")
        if not _is_int(self.k) or self.k <= 0:
            _fail("k", self.k, "it must be a positive integer (active latents per row)")
        if self.sparsity in TOPK_KINDS and self.k > self.n_latents:
            _fail("k", self.k, f"it must be at most n_latents={self.n_latents}; lower k or widen")
        if self.k_aux > self.n_latents:
            _fail("k_aux", self.k_aux, f"AuxK picks at most n_latents={self.n_latents} latents; "
                  "lower k_aux")
        for field in ("encoder_hidden", "decoder_hidden"):
            for width in getattr(self, field):
                if not _is_int(width) or width <= 0:
                    _fail(field, getattr(self, field), "every hidden width must be a positive int")
        if self.hidden_act not in HIDDEN_ACTIVATIONS:
            _fail("hidden_act", self.hidden_act, f"choose one of {list(HIDDEN_ACTIVATIONS)}")
        for field in ("layer_norm", "transcoder", "skip_connection", "normalize_input",
                      "check_inputs"):
            if not isinstance(getattr(self, field), bool):
                _fail(field, getattr(self, field), "it must be True or False")
        if self.d_out != self.d_in and not self.transcoder:
            _fail("d_out", self.d_out,
                  "set transcoder=True to predict a different width, or drop d_out")
        if self.skip_connection and not self.transcoder:
            _fail("skip_connection", self.skip_connection,
                  "a skip connection belongs to transcoders (on an autoencoder W_skip would learn "
                  "the identity); set transcoder=True or drop it")
        if self.transcoder and self.n_stacked > 1:
            _fail("n_stacked", self.n_stacked, "stacked residual stages need transcoder=False")
        if self.hook_site not in HOOK_SITES:
            _fail("hook_site", self.hook_site, f"choose one of {list(HOOK_SITES)}")
        self._validate_numbers()
        self._validate_matryoshka()
        self._validate_provenance()
        if self.topk_selection_dtype is not None:
            if self.topk_selection_dtype not in SELECTION_DTYPES:
                _fail("topk_selection_dtype", self.topk_selection_dtype,
                      f"choose one of {list(SELECTION_DTYPES)} or None")
            if self.sparsity != "topk" and self.topk_selection_dtype != "auto":
                _fail("topk_selection_dtype", self.topk_selection_dtype,
                      f"it applies to sparsity='topk' only (this config has {self.sparsity!r}); "
                      "drop it")

    def _validate_numbers(self) -> None:
        """Loss weights and sparsity settings: finite numbers in the range their formulas need."""
        for field in ("auxk_coefficient", "std_coefficient", "l1_coefficient", "l0_coefficient"):
            if not _is_real(getattr(self, field)) or getattr(self, field) < 0:
                _fail(field, getattr(self, field), "loss coefficients must be >= 0 (and finite)")
        if not _is_real(self.jumprelu_bandwidth) or self.jumprelu_bandwidth <= 0:
            _fail("jumprelu_bandwidth", self.jumprelu_bandwidth,
                  "the pseudo-derivative divides by it: use a finite value > 0 (e.g. 1e-3)")
        if not _is_real(self.jumprelu_init_threshold) or self.jumprelu_init_threshold < 0:
            _fail("jumprelu_init_threshold", self.jumprelu_init_threshold,
                  "use a finite value >= 0")
        momentum = self.batchtopk_threshold_momentum
        if not _is_real(momentum) or not 0.0 <= momentum < 1.0:
            _fail("batchtopk_threshold_momentum", momentum, "use [0, 1)")
        if self.initializer_range is not None and (
                not _is_real(self.initializer_range) or self.initializer_range <= 0):
            _fail("initializer_range", self.initializer_range,
                  "use a finite std > 0, or None for Kaiming-uniform")

    def _completed_prefixes(self) -> list[int] | None:
        """`matryoshka_prefixes` ending in the full width `n_total_latents` (added if omitted)."""
        prefixes = self.matryoshka_prefixes
        if prefixes is None or prefixes[-1] == self.n_total_latents:
            return prefixes
        return [*prefixes, self.n_total_latents]

    def _validate_matryoshka(self) -> None:
        """Prefixes: nested latent counts within the SAE; weights: one usable weight per prefix."""
        prefixes, weights, total = (self.matryoshka_prefixes, self.matryoshka_weights,
                                    self.n_total_latents)
        if prefixes is not None:
            if not prefixes or not all(_is_int(prefix) and prefix > 0 for prefix in prefixes):
                _fail("matryoshka_prefixes", prefixes, "give positive latent counts, e.g. "
                      "[512, 2048], or None for an ordinary SAE")
            too_wide = [prefix for prefix in prefixes if prefix > total]
            if too_wide:
                _fail("matryoshka_prefixes", prefixes,
                      f"prefixes count latents, at most n_total_latents={total} (n_stacked · "
                      f"n_latents); drop {too_wide} or widen the SAE")
            if prefixes != sorted(set(prefixes)):
                _fail("matryoshka_prefixes", prefixes,
                      f"nested prefixes must strictly increase, smallest first: use "
                      f"{sorted(set(prefixes))}")
        if weights is None:
            return
        if prefixes is None:
            _fail("matryoshka_weights", weights, "weights belong to matryoshka_prefixes; set "
                  "those too, or drop the weights")
        completed = self._completed_prefixes()
        if len(weights) != len(completed):
            _fail("matryoshka_weights", weights,
                  f"give one weight per prefix of {completed} (the full width "
                  f"n_total_latents={total} is always the last prefix): {len(completed)} "
                  f"weights, not {len(weights)}")
        if not all(_is_real(weight) and weight >= 0 for weight in weights) or sum(weights) <= 0:
            _fail("matryoshka_weights", weights,
                  "weights must be finite, >= 0 and not all 0 (the loss is their weighted mean)")

    def _validate_provenance(self) -> None:
        for field in ("base_model_name_or_path", "hookpoint", "neuronpedia_id"):
            if getattr(self, field) is not None and not isinstance(getattr(self, field), str):
                _fail(field, getattr(self, field), "it must be a string or None")
        if self.layer is not None and (not _is_int(self.layer) or self.layer < 0):
            _fail("layer", self.layer, "it must be a layer index >= 0, or None")
        for field in ("training_config", "metrics"):
            if getattr(self, field) is not None and not isinstance(getattr(self, field), dict):
                _fail(field, getattr(self, field), "it must be a dict or None")

    @classmethod
    def get_config_dict(
        cls, pretrained_model_name_or_path: Any, **kwargs: Any
    ) -> tuple[dict, dict]:
        """Refuse configs of other model types instead of transformers' mere warning, the top of
        a folder of SAEs (with the subfolders to load instead), and saved configs that are
        unreadable, lack a field of `SAVED_FIELDS` or hold an unknown one."""
        location = str(pretrained_model_name_or_path)
        if not location.endswith(".json"):
            check_not_a_file(location)
        if not os.path.isfile(location):
            location = os.path.join(location, kwargs.get("subfolder") or "", "config.json")
        if os.path.isfile(location):  # a local folder: read it with hf_deepsae's error style
            read_json(location, fix=CONFIG_FIX)
        config_dict, unused = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        refuse_sae_folder(config_dict, str(pretrained_model_name_or_path))
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {model_type!r} config, not a "
                f"{cls.model_type!r} SAE; load it with its own class or point at an SAE checkpoint"
            )
        return config_dict, {**unused, _LOCATION_KEY: location}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """`PretrainedConfig.from_dict` for a saved config: it must carry `SAVED_FIELDS` and no
        unknown field, and its values (with overrides passed as keyword arguments) must be
        valid; problems name the config file when it is known."""
        source = kwargs.get("name_or_path") or config_dict.get("_name_or_path")
        location = kwargs.pop(_LOCATION_KEY, None) or (
            os.path.join(str(source), "config.json") if source else None)
        refuse_sae_folder(config_dict, str(source) if source else None)
        problem = saved_config_problem(cls, config_dict)
        if problem is None:
            try:
                loaded = super().from_dict(config_dict, **kwargs)
                (loaded[0] if isinstance(loaded, tuple) else loaded)._validate()
                return loaded
            except (ValueError, TypeError) as error:
                if location is None:
                    raise
                problem = (str(error), "correct the value, or " + CONFIG_FIX)
        if location is None:
            raise ValueError(f"DeepSAEConfig.from_dict: {problem[0]}; {problem[1]}")
        raise FileFormatError(location, *problem)


_LOCATION_KEY = "_hf_deepsae_config_file"
"""Passed from `get_config_dict` to `from_dict` (and popped there): the file, for messages."""
CONFIG_FIX = ("restore the SAE's config.json (re-download or re-copy the SAE), or re-save the SAE "
              "with DeepSAEModel.save_pretrained")


def check_not_a_file(name_or_path: str | os.PathLike) -> None:
    """An SAE is loaded from its folder (or Hub repo), not from one of its files."""
    if os.path.isfile(name_or_path):
        raise FileFormatError(name_or_path, "a file, not an SAE folder",
                              "pass the folder that holds config.json and model.safetensors")


def saved_config_problem(config_class: type, config_dict: dict[str, Any]
                         ) -> tuple[str, str] | None:
    """`(problem, fix)` if a saved config lacks a field of `SAVED_FIELDS` (or `k`, for top-k
    kinds) or holds an unknown one (a newer hf_deepsae's field, or a hand edit's typo)."""
    required = SAVED_FIELDS + (("k",) if config_dict.get("sparsity") in TOPK_KINDS else ())
    missing = [field for field in required if field not in config_dict]
    if missing:
        return (f"missing {missing}: a saved SAE must record its architecture, and the defaults "
                "may not be what it was trained with",
                "add them with the values the SAE was trained with (e.g. \"k\": <active latents "
                "per row>), or re-save it with DeepSAEModel.save_pretrained")
    unknown = unknown_keys(config_class, config_dict)
    if unknown:
        return (f"unknown fields {', '.join(unknown)}",
                "fix the typo, or upgrade hf_deepsae if a newer version wrote this SAE")
    return None


def _widths(field: str, widths: Any) -> list[int]:
    """Hidden widths as a list (None: no hidden layer)."""
    return _optional_list(field, widths, "give a list of widths, e.g. [1024] (or [] for none)"
                          ) or []


def _optional_list(field: str, values: Any,
                   fix: str = "give a list, e.g. [512, 2048], or None") -> list | None:
    """None, or a copy of a list; a bare number or string is a mistake, not a list."""
    if values is None:
        return None
    if not isinstance(values, list | tuple):
        _fail(field, values, fix)
    return list(values)


def _default_k_aux(d_in: Any, n_latents: Any) -> int | None:
    """`d_in // 2` (Gao et al.), capped at the stage's latents; None (an error) for bad widths."""
    if not (_is_int(d_in) and _is_int(n_latents)):
        return None
    return max(1, min(d_in // 2, n_latents))


def refuse_sae_folder(config_dict: dict[str, Any], path: str | None) -> None:
    """A folder of SAEs has no SAE at its top: say which subfolders to load instead."""
    subfolders = config_dict.get(SUBFOLDERS_KEY)
    if subfolders:
        where = repr(path) if path else "<folder or repo>"
        holds = (f"{len(subfolders)} SAEs, one per hookpoint, in the subfolders {subfolders}"
                 if len(subfolders) > 1 else
                 f"1 SAE, in the subfolder {subfolders[0]!r} named after its hookpoint")
        raise ValueError(
            f"{repr(path) if path else 'this folder or repo'} holds {holds}: load one with "
            f"AutoModel.from_pretrained({where}, subfolder={subfolders[0]!r}) (add "
            f"trust_remote_code=True without hf_deepsae), or all with "
            f"hf_deepsae.load_saes({where})"
        )
