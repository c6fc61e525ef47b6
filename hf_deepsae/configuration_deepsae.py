"""`DeepSAEConfig`: one config for every sparse-autoencoder architecture hf_deepsae knows.

The config is the single source of truth for an SAE's shape, sparsity rule and loss weights, and it
carries the SAE's provenance (base model, hookpoint) so a checkpoint explains itself on the Hub.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

SPARSITY_KINDS = ("topk", "batchtopk", "jumprelu", "relu")
TOPK_KINDS = ("topk", "batchtopk")
HIDDEN_ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "leaky_relu")
HOOK_SITES = ("mlp_out", "mlp_in", "resid")
SELECTION_DTYPES = ("auto", "bfloat16", "float16")


def _fail(field: str, value: Any, fix: str) -> None:
    raise ValueError(f"DeepSAEConfig: invalid {field}={value!r}; {fix}")


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
        normalize_input (`bool`, defaults to `False`): scale inputs by a stored factor (fitted from
            data with `DeepSAEModel.fit_normalization`) so a loaded SAE applies it by itself.
        k_aux (`int`, *optional*): latents used by the AuxK dead-latent loss. Defaults to
            `d_in // 2`.
        auxk_coefficient (`float`, defaults to 1/32): weight of the AuxK loss.
        std_coefficient (`float`, defaults to 0.0): weight of the penalty on the standard deviation
            of the encoder pre-activations (a remedy for dead latents in deep SAEs).
        l1_coefficient (`float`, defaults to 1e-3): weight of the L1 penalty (`relu` only).
        l0_coefficient (`float`, defaults to 1e-3): weight of the L0 penalty (`jumprelu` only).
        jumprelu_bandwidth (`float`, defaults to 1e-3): width of the pseudo-derivative's window.
        jumprelu_init_threshold (`float`, defaults to 1e-3): initial JumpReLU threshold.
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
        initializer_range (`float`, *optional*): std of the dense layers' init; defaults to
            Kaiming-uniform (`nn.Linear`'s own).
        base_model_name_or_path (`str`, *optional*): the language model the SAE was trained on.
        hookpoint (`str`, *optional*): module path in the base model the SAE reads.
        hook_site (`str`, defaults to `"mlp_out"`): what the hookpoint's activations are:
            `"mlp_out"`, `"mlp_in"` or `"resid"`.
        layer (`int`, *optional*): the base model's layer index of the hookpoint.
        training_config (`dict`, *optional*): the training run's settings, recorded for provenance.
        metrics (`dict`, *optional*): evaluation results (FVU, L0, dead %, CE-loss score…).
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
        **kwargs: Any,
    ) -> None:
        self.d_in = d_in
        self.expansion_factor = expansion_factor
        self.n_latents = n_latents if n_latents is not None else expansion_factor * d_in
        self.k = k
        self.sparsity = sparsity
        self.encoder_hidden = list(encoder_hidden or [])
        self.decoder_hidden = list(decoder_hidden or [])
        self.hidden_act = hidden_act
        self.layer_norm = layer_norm
        self.n_stacked = n_stacked
        self.transcoder = transcoder
        self.d_out = d_out if d_out is not None else d_in
        self.normalize_input = normalize_input
        self.k_aux = k_aux if k_aux is not None else max(1, d_in // 2)
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
        self._validate(d_out_given=d_out is not None and d_out != d_in)
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

    def _validate(self, d_out_given: bool) -> None:
        """Reject inconsistent settings up front, naming the field and how to fix it."""
        for field in ("d_in", "n_latents", "d_out", "n_stacked", "k_aux"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(field, value, "it must be a positive integer")
        if self.sparsity not in SPARSITY_KINDS:
            _fail("sparsity", self.sparsity, f"choose one of {list(SPARSITY_KINDS)}")
        if self.sparsity in TOPK_KINDS and not (isinstance(self.k, int) and self.k > 0):
            _fail("k", self.k, "it must be a positive integer (active latents per row)")
        if self.sparsity in TOPK_KINDS and self.k > self.n_latents:
            _fail("k", self.k, f"it must be at most n_latents={self.n_latents}; lower k or widen")
        for field in ("encoder_hidden", "decoder_hidden"):
            for width in getattr(self, field):
                if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
                    _fail(field, getattr(self, field), "every hidden width must be a positive int")
        if self.hidden_act not in HIDDEN_ACTIVATIONS:
            _fail("hidden_act", self.hidden_act, f"choose one of {list(HIDDEN_ACTIVATIONS)}")
        if d_out_given and not self.transcoder:
            _fail("d_out", self.d_out,
                  "set transcoder=True to predict a different width, or drop d_out")
        if self.transcoder and self.n_stacked > 1:
            _fail("n_stacked", self.n_stacked, "stacked residual stages need transcoder=False")
        if self.hook_site not in HOOK_SITES:
            _fail("hook_site", self.hook_site, f"choose one of {list(HOOK_SITES)}")
        for field in ("auxk_coefficient", "std_coefficient", "l1_coefficient", "l0_coefficient"):
            if getattr(self, field) < 0:
                _fail(field, getattr(self, field), "loss coefficients must be >= 0")
        if self.topk_selection_dtype is not None:
            if self.topk_selection_dtype not in SELECTION_DTYPES:
                _fail("topk_selection_dtype", self.topk_selection_dtype,
                      f"choose one of {list(SELECTION_DTYPES)} or None")
            if self.sparsity != "topk" and self.topk_selection_dtype != "auto":
                _fail("topk_selection_dtype", self.topk_selection_dtype,
                      f"it applies to sparsity='topk' only (this config has {self.sparsity!r}); "
                      "drop it")
        if not 0.0 <= self.batchtopk_threshold_momentum < 1.0:
            _fail("batchtopk_threshold_momentum", self.batchtopk_threshold_momentum, "use [0, 1)")

    @classmethod
    def get_config_dict(
        cls, pretrained_model_name_or_path: Any, **kwargs: Any
    ) -> tuple[dict, dict]:
        """Refuse configs of other model types instead of transformers' mere warning."""
        config_dict, unused = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {model_type!r} config, not a "
                f"{cls.model_type!r} SAE; load it with its own class or point at an SAE checkpoint"
            )
        return config_dict, unused
