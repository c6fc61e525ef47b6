"""Token masking: which positions reach the SAE in training, the cache and evaluation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_training_e2e import HOOKPOINT, TINY_SAE, tiny_config
from transformers import AutoTokenizer

from hf_deepsae import DeepSAEModel
from hf_deepsae.activations import KEEP_ROWS, ActivationStream, ModelActivations, TokenChunks
from hf_deepsae.token_mask import TokenMask
from hf_deepsae.training import train
from hf_deepsae.training import trainer as trainer_module
from hf_deepsae.training.activation_cache import complete_builds

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

BOS, EOS, PAD = 5, 1, 0
TOKENIZER = SimpleNamespace(bos_token_id=BOS, all_special_ids=[PAD, EOS, BOS])


@pytest.mark.parametrize(("mask", "expected"), [
    (TokenMask(), [[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]),
    (TokenMask(mask_special_tokens=True), [[0, 0, 1, 0, 1, 1], [0, 0, 1, 1, 1, 1]]),
    (TokenMask(mask_positions_below=3), [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]]),
    (TokenMask(mask_bos=False), [[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]),
], ids=["default", "special-tokens", "positions-below-3", "padding-only"])
def test_the_keep_mask_leaves_out_bos_padding_and_what_is_asked(mask, expected):
    # Row 0: a BOS token mid-sequence and an EOS separator; row 1: left padding, so its first
    # real token (position 0 of that sequence) is at index 1.
    input_ids = torch.tensor([[7, BOS, 8, EOS, 9, 3], [PAD, 4, 6, 7, 8, 9]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    keep = mask.keep(input_ids, mask.masked_token_ids(TOKENIZER), attention_mask)
    assert keep.int().tolist() == expected


def test_a_mask_of_special_tokens_needs_the_tokenizer():
    with pytest.raises(ValueError, match="needs the tokenizer"):
        TokenMask(mask_special_tokens=True).masked_token_ids(SimpleNamespace(bos_token_id=1))


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_mask_positions_below_must_be_a_count(value):
    with pytest.raises(ValueError, match="mask_positions_below"):
        TokenMask(mask_positions_below=value)


def test_a_mask_leaving_out_whole_chunks_is_refused(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="leaves out every position"):
        tiny_config(tiny_lm, tmp_path, mask_positions_below=16)


def tiny_tokenizer(tiny_lm, bos_is_eos: bool):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm[0])
    if bos_is_eos:  # as GPT-2's: the document separator is also the BOS token
        tokenizer.bos_token = tokenizer.eos_token
    return tokenizer


@pytest.mark.parametrize(("mask", "bos_is_eos"), [
    (TokenMask(), False), (TokenMask(), True), (TokenMask(mask_special_tokens=True), False),
    (TokenMask(mask_positions_below=3), False)],
    ids=["default", "bos-is-eos", "special-tokens", "positions-below-3"])
def test_the_stream_drops_and_counts_exactly_the_masked_rows(tiny_lm, mask, bos_is_eos):
    from transformers import AutoModel

    from hf_deepsae.activations import load_text_dataset, tokenize_and_chunk

    tokenizer = tiny_tokenizer(tiny_lm, bos_is_eos)
    model = AutoModel.from_pretrained(tiny_lm[0])
    chunks = tokenize_and_chunk(load_text_dataset(str(tiny_lm[1])), tokenizer, 16)
    read: list[torch.Tensor] = []
    token_chunks = TokenChunks(chunks, 4, seed=0)
    real_next = token_chunks.next_batch
    token_chunks.next_batch = lambda: read.append(real_next()) or read[-1]
    source = ModelActivations(model, {"mlp": 1}, token_chunks,
                              mask.row_filter(tokenizer))
    stream = ActivationStream(source, batch_size=32, buffer_size=64)
    rows = sum(next(stream)["mlp"].shape[0] for _ in range(4))

    ids = torch.cat(read)
    expected = torch.zeros_like(ids, dtype=torch.bool)
    expected[:, :mask.first_kept_position] = True
    if mask.mask_special_tokens or bos_is_eos:
        expected |= ids == tokenizer.eos_token_id
    assert stream.masked_rows == int(expected.sum()) > 0
    assert rows == 4 * 32 and stream.nonfinite_rows == 0


SENTINEL_FIRST, SENTINEL_EOS = 1000.0, 2000.0


def mark_positions(monkeypatch):
    """The tiny LM writes SENTINEL_FIRST at each chunk's position 0 and SENTINEL_EOS at EOS
    tokens of the trained site, and every SAE forward records which sentinels reached it."""
    reached: list[float] = []
    real_load = trainer_module.load_language_model

    def load_marked(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        batch: dict[str, torch.Tensor] = {}

        def remember(_, args, kwargs):
            batch["input_ids"] = kwargs.get("input_ids", args[0] if args else None)

        def mark(_, __, output):
            output = output.clone()
            output[:, 0] = SENTINEL_FIRST
            output[batch["input_ids"] == tokenizer.eos_token_id] = SENTINEL_EOS
            return output

        model.register_forward_pre_hook(remember, with_kwargs=True)
        model.get_submodule(HOOKPOINT).register_forward_hook(mark)
        return model, tokenizer

    real_forward = DeepSAEModel.forward

    def recording_forward(self, x, *args, **kwargs):
        reached.extend(value for value in (SENTINEL_FIRST, SENTINEL_EOS)
                       if (x == value).all(-1).any())
        return real_forward(self, x, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "load_language_model", load_marked)
    monkeypatch.setattr(DeepSAEModel, "forward", recording_forward)
    return reached


@pytest.mark.parametrize("cached", [False, True], ids=["from-model", "from-cache"])
@pytest.mark.parametrize(("overrides", "reaching"), [
    ({}, {SENTINEL_EOS}),
    ({"mask_special_tokens": True}, set()),
    ({"mask_bos": False}, {SENTINEL_FIRST, SENTINEL_EOS}),
], ids=["default", "special-tokens", "unmasked"])
def test_masked_positions_never_reach_the_sae(tiny_lm, tmp_path, monkeypatch, cached, overrides,
                                              reaching):
    reached = mark_positions(monkeypatch)
    cache = str(tmp_path / "cache") if cached else None
    saes = train(tiny_config(tiny_lm, tmp_path / "out", activation_cache_dir=cache, **overrides),
                 TINY_SAE)
    assert set(reached) == reaching  # in training and in the held-out evaluation
    metrics = saes[HOOKPOINT].config.metrics
    assert metrics["masked_rows_skipped"] > 0 if overrides.get("mask_bos", True) else \
        metrics["masked_rows_skipped"] == 0
    assert saes[HOOKPOINT].config.training_config["mask_bos"] == overrides.get("mask_bos", True)


def test_the_cache_is_keyed_by_the_mask_and_stores_it(tiny_lm, tmp_path):
    root = tmp_path / "cache"
    train(tiny_config(tiny_lm, tmp_path / "a", activation_cache_dir=str(root)), TINY_SAE)
    train(tiny_config(tiny_lm, tmp_path / "b", activation_cache_dir=str(root)), TINY_SAE)
    assert len(list(root.iterdir())) == 1  # the same mask reuses the cache
    (folder,) = root.iterdir()
    ((build, _),) = complete_builds(folder)
    from safetensors.torch import load_file

    shard = load_file(next(build.glob("*.safetensors")))
    keep = shard[KEEP_ROWS]
    assert keep.dtype == torch.bool and not keep.view(-1, 16)[:, 0].any() \
        and keep.view(-1, 16)[:, 1:].all()

    train(tiny_config(tiny_lm, tmp_path / "c", activation_cache_dir=str(root),
                      mask_positions_below=2), TINY_SAE)
    assert len(list(root.iterdir())) == 2  # another mask never reuses it


def test_the_mask_flags_parse_and_are_recorded(tiny_lm, tmp_path):
    from hf_deepsae.training import parse_args

    config, _ = parse_args(["--no_mask_bos", "--mask_special_tokens", "true",
                            "--mask_positions_below", "4"])
    assert (config.mask_bos, config.mask_special_tokens, config.mask_positions_below) == \
        (False, True, 4)
    assert config.token_mask() == TokenMask(False, True, 4)
    assert {"mask_bos", "mask_special_tokens", "mask_positions_below"} <= set(config.record())


def test_evaluation_leaves_out_what_the_mask_says(tiny_lm):
    from transformers import AutoModelForCausalLM

    from hf_deepsae import DeepSAEConfig
    from hf_deepsae.evaluation import SAEEvaluator

    model = AutoModelForCausalLM.from_pretrained(tiny_lm[0])
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm[0])
    sae = DeepSAEModel(DeepSAEConfig(d_in=32, expansion_factor=2, k=4, hookpoint=HOOKPOINT))
    input_ids = torch.tensor([[3, 4, EOS, 5, 6, EOS, 7, 8]])
    counts = {}
    for name, mask in {"default": TokenMask(), "special": TokenMask(mask_special_tokens=True),
                       "none": None}.items():
        evaluator = SAEEvaluator(model, {"sae": sae}, language_model_metrics=False,
                                 token_mask=mask, tokenizer=tokenizer)
        evaluator.update(input_ids)
        counts[name] = (evaluator.metrics.activations["sae"].n_tokens, evaluator.masked_tokens)
    assert counts == {"default": (7, 1), "special": (5, 3), "none": (8, 0)}
