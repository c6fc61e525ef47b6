"""Tiny randomly initialised transformers models, one per supported ``model_type``.

Tests across the package use these instead of downloads: 2 layers, width 32, vocabulary 100.
Each model is built once per session from its config (construction dominates the cost) and
handed out as a deep copy, so a test may modify its model freely.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5EncoderModel,
)

VOCAB_SIZE = 100
HIDDEN_SIZE = 32
NUM_LAYERS = 2

_DECODER = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN_SIZE,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_LLAMA_LIKE = dict(_DECODER, head_dim=8)
_MOE = dict(_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_GEMMA_LIKE = dict(_LLAMA_LIKE, query_pre_attn_scalar=8, sliding_window=16)
_ENCODER = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN_SIZE,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    pad_token_id=0,
)
_GPT2_LIKE = dict(
    vocab_size=VOCAB_SIZE, n_embd=HIDDEN_SIZE, n_layer=NUM_LAYERS, n_head=4, n_positions=64,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

# model_type -> keyword arguments of its config class.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_GPT2_LIKE, n_inner=64),
    "gpt_neo": dict(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, num_layers=NUM_LAYERS, num_heads=4,
        intermediate_size=64, max_position_embeddings=64, window_size=8,
        attention_types=[[["global", "local"], 1]], bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    "gptj": dict(_GPT2_LIKE, n_inner=64, rotary_dim=4),
    "gpt_neox": dict(_DECODER),
    "llama": dict(_LLAMA_LIKE),
    "mistral": dict(_LLAMA_LIKE, sliding_window=16),
    "mixtral": dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(_LLAMA_LIKE),
    "qwen2_moe": dict(_MOE, shared_expert_intermediate_size=32, mlp_only_layers=[1]),
    "qwen3": dict(_LLAMA_LIKE),
    "qwen3_moe": dict(_MOE),
    "gemma": dict(_LLAMA_LIKE),
    "gemma2": dict(_GEMMA_LIKE),
    "gemma3_text": dict(_GEMMA_LIKE),
    "gemma3": dict(  # the multimodal model: text layers next to a (tiny) SigLIP vision tower
        text_config=_GEMMA_LIKE, mm_tokens_per_image=4,
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, image_size=28, patch_size=14),
    ),
    "olmo2": dict(_LLAMA_LIKE),
    "phi": dict(_DECODER),
    "phi3": dict(_LLAMA_LIKE),
    "opt": dict(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4, ffn_dim=64, max_position_embeddings=64,
        word_embed_proj_dim=HIDDEN_SIZE, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    "bloom": dict(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, n_layer=NUM_LAYERS, n_head=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    "falcon": dict(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4, ffn_hidden_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    "bert": dict(_ENCODER),
    "roberta": dict(_ENCODER, max_position_embeddings=80),
    "t5": dict(
        vocab_size=VOCAB_SIZE, d_model=HIDDEN_SIZE, d_kv=8, d_ff=64, num_layers=NUM_LAYERS,
        num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    ),
    # Not in splice's MLP_LAYOUTS table: exercise its generic fallback.
    "olmo": dict(_LLAMA_LIKE),
    "olmoe": dict(_MOE),
    "starcoder2": dict(_DECODER),
    "xglm": dict(
        vocab_size=VOCAB_SIZE, d_model=HIDDEN_SIZE, num_layers=NUM_LAYERS, attention_heads=4,
        ffn_dim=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
}

MODEL_TYPES: tuple[str, ...] = tuple(TINY_CONFIGS)
ENCODER_MODEL_TYPES: tuple[str, ...] = ("bert", "roberta", "t5")
CAUSAL_MODEL_TYPES: tuple[str, ...] = tuple(t for t in MODEL_TYPES if t not in ENCODER_MODEL_TYPES)


@functools.cache
def _build(model_type: str) -> PreTrainedModel:
    config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    torch.manual_seed(0)
    if model_type == "t5":
        model = T5EncoderModel(config)
    elif model_type in ENCODER_MODEL_TYPES:
        model = AutoModelForMaskedLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def tiny_model(model_type: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A fresh copy of the tiny ``model_type`` model in eval mode, cast to ``dtype``."""
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {model_type!r}; known: {list(MODEL_TYPES)}")
    return copy.deepcopy(_build(model_type)).to(dtype)


def tiny_input_ids(batch_size: int = 2, seq_len: int = 8, seed: int = 0) -> torch.Tensor:
    """Token ids in [3, VOCAB_SIZE), avoiding the pad/bos/eos ids 0-2."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (batch_size, seq_len), generator=generator)


def judge_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary: "Yes" 1, "No" 2 (also EOS), "w<i>" i."""
    vocab = {"[UNK]": 0, "Yes": 1, "No": 2} | {f"w{i}": i for i in range(3, VOCAB_SIZE)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="No")


def save_tiny_llama(folder: Any) -> None:
    """The tiny llama with `judge_tokenizer`, saved as a model folder the examples can load."""
    tiny_model("llama").save_pretrained(folder)
    judge_tokenizer().save_pretrained(folder)


ENGLISH_WORDS = (
    "ant", "apple", "arm", "axe", "bag", "ball", "bed", "bee", "cap", "car", "cat", "cow",
    "day", "den", "dog", "dot", "ear", "egg", "elm", "end", "fan", "fig", "fox", "fur", "gap",
    "gas", "gum", "gym", "hat", "hen", "hip", "hut", "ice", "ink", "inn", "ivy", "jam", "jar",
    "jet", "jug", "keg", "key", "kid", "kit", "lab", "leg", "lid", "log", "map", "mat", "mop",
    "mud", "nap", "net", "nut", "nib", "oak", "oar", "oil", "owl", "pan", "pen", "pig", "pot",
    "rag", "rat", "rod", "rug", "sap", "sea", "sun", "sky", "tag", "tea", "tin", "toe", "urn",
    "use", "van", "vet", "vow", "web", "wax", "wig", "yak", "yam", "yew", "zip", "zoo", "zen",
)
"""Three or more English words per letter (most letters), for tasks about spelling."""


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary: ids 0-2 special, then `ENGLISH_WORDS`."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {w: i for i, w in enumerate(ENGLISH_WORDS, 3)}
    assert len(vocab) <= VOCAB_SIZE
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<unk>")
