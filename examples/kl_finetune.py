"""Fine-tune a trained SAE on the model's KL, then compare it spliced in, before and after.

    accelerate launch examples/train.py              # an SAE trained on its reconstruction
    python examples/kl_finetune.py --sae outputs/deepsae/model.layers.6.mlp.down_proj

`examples/train.py --loss kl` trains SAEs end to end, from the start or, with `--init_from`, from a
trained SAE (with the trainer's checkpoints, resume and DDP); this script is the short loop of the
same objective (`hf_deepsae.training.end_to_end`) that also prints the held-out metrics before the
fine-tune, as Braun et al. (2024) fine-tune theirs (`end_to_end.fine_tune_on_kl`): every step runs
the frozen model clean and with the SAE spliced in on `--lm_batch_size` sequences of
`--context_length` tokens and follows the gradient of KL(clean ‖ spliced) (`--loss fvu+kl` keeps the
SAE's FVU in the loss, weighted against the KL by `--kl_coefficient`). `--total_tokens` sets the
number of steps. It prints the held-out FVU, L0, spliced KL and CE-loss score before and after, and
saves the fine-tuned SAE in `--output_dir`. The flags are `TrainingConfig`'s (those about
activations, batches of rows and checkpoints don't apply here).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import HfArgumentParser

from hf_deepsae import DeepSAEModel, evaluate_saes
from hf_deepsae.activations import (
    TokenChunks,
    load_language_model,
    load_text_dataset,
    tokenize_and_chunk,
)
from hf_deepsae.training import TrainingConfig
from hf_deepsae.training.data import split_chunks
from hf_deepsae.training.end_to_end import KL_FINE_TUNE_RECIPE, fine_tune_on_kl


@dataclasses.dataclass
class FineTuneArguments:
    sae: str = dataclasses.field(metadata={
        "help": "Folder of the trained SAE (one hookpoint's subfolder of train.py's output)."})


FINE_TUNE_DEFAULTS = {**KL_FINE_TUNE_RECIPE, "total_tokens": 65_536, "eval_tokens": 8_192,
                      "output_dir": "outputs/deepsae-kl"}
"""`KL_FINE_TUNE_RECIPE` (Adam at a small learning rate) on few tokens: each step runs the model
twice."""


def held_out_batches(chunks, config: TrainingConfig) -> list[torch.Tensor]:
    """The held-out chunks as token-id batches of `lm_batch_size` sequences."""
    batches = TokenChunks(chunks, config.lm_batch_size, 0)
    return [batches.next_batch() for _ in range(math.ceil(len(chunks) / config.lm_batch_size))]


def report(name: str, sae: DeepSAEModel, model, batches: list[torch.Tensor]) -> dict[str, float]:
    """Held-out FVU, L0 and the model's KL/CE with the SAE spliced in; printed and returned."""
    metrics = evaluate_saes(model, {sae.config.hookpoint: sae.eval()}, batches).scalars()[
        sae.config.hookpoint]
    print(f"{name}: FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}, spliced KL "
          f"{metrics['kl_spliced']:.4f} nats, CE {metrics['ce_loss_increase']:+.4f} nats, CE-loss "
          f"score {metrics['ce_loss_score']:.3f} ({metrics['n_predicted_tokens']:,} tokens)")
    return metrics


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = HfArgumentParser((FineTuneArguments, TrainingConfig))
    parser.set_defaults(**FINE_TUNE_DEFAULTS)
    arguments, config = parser.parse_args_into_dataclasses(args=argv)
    torch.manual_seed(config.seed)
    sae = DeepSAEModel.from_pretrained(arguments.sae)
    model, tokenizer = load_language_model(sae.config.base_model_name_or_path or
                                           config.model_name_or_path, dtype=config.lm_dtype)
    sae = sae.to(model.device)
    dataset = load_text_dataset(config.dataset_name, config_name=config.dataset_config_name,
                                data_files=config.data_files, split=config.dataset_split,
                                text_column=config.text_column)
    chunks = tokenize_and_chunk(dataset, tokenizer, config.context_length, config.text_column)
    train_chunks, eval_chunks = split_chunks(chunks, config, PartialState())
    held_out = held_out_batches(eval_chunks, config)
    before = report("before", sae, model, held_out)

    num_steps = fine_tune_on_kl(model, sae, TokenChunks(train_chunks, config.lm_batch_size,
                                                         config.seed), config)
    after = report("after", sae, model, held_out)
    sae.config.metrics = after
    sae.config.training_config = {**(sae.config.training_config or {}),
                                  "kl_fine_tune": {**config.record(), "num_steps": num_steps}}
    folder = Path(config.output_dir) / sae.config.hookpoint
    sae.save_pretrained(folder)
    print(f"Saved the fine-tuned SAE to {folder}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
