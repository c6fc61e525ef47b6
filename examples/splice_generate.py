"""Steer a language model with one SAE latent: generate without, through and with an edited SAE.

    python examples/splice_generate.py                   # the SAE examples/train.py wrote
    python examples/splice_generate.py --sae outputs/deepsae --prompt "A Python list" \
        --mode clamp --value 40 --max_new_tokens 32     # --latent N edits latent N instead

`--sae` is an SAE folder or Hub id, or a folder holding one SAE per subfolder (as `train.py`
writes it; pick one with `--subfolder` when there are several). The SAE runs on its base model
(`base_model_name_or_path` in its config, else `--model`) at the hookpoint it was trained on.

The script prints the latents that fire most strongly on the prompt, then three continuations:
the model alone; the model with the SAE spliced in `error` mode, which must reproduce it exactly
(the reconstruction error is added back, so outputs are bit-identical); and the same splice with
one latent edited before decoding. Because the error term is kept, the steered run differs from
the original by exactly the edit's effect on the reconstruction, not by the SAE's error.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Literal

import torch
from transformers import BatchEncoding, HfArgumentParser, PreTrainedModel, set_seed

import hf_deepsae
from hf_deepsae import (
    DeepSAEModel,
    add_to_latents,
    clamp_latents,
    scale_latents,
    splice,
    zero_latents,
)
from hf_deepsae.activations import EMBEDDED_MODEL_NAME, load_language_model
from hf_deepsae.splice import LatentEdit
from hf_deepsae.training import TrainingConfig

STEERING_STRENGTH = 10.0
"""Default `--value`: the factor for `scale`; for `clamp` and `add`, this many times the latent's
peak activation on the prompt (a latent pinned at its usual peak barely changes the text)."""

EDITS: dict[str, Callable[[int, float], LatentEdit]] = {
    "clamp": lambda latent, value: clamp_latents(latent, min=value, max=value),
    "add": add_to_latents,
    "scale": scale_latents,
    "zero": lambda latent, _: zero_latents(latent),
}
"""`--mode` → the `hf_deepsae.splice` edit of one latent, given `--value`."""


@dataclasses.dataclass
class SpliceGenerateArguments:
    """Which SAE and model, which prompt, and which latent to edit how."""

    sae: str = dataclasses.field(default=TrainingConfig.output_dir, metadata={
        "help": "SAE folder or Hub id, or a folder with one SAE per subfolder."})
    subfolder: str | None = dataclasses.field(default=None, metadata={
        "help": "The SAE's subfolder (its hookpoint) where --sae holds several SAEs."})
    model_name_or_path: str | None = dataclasses.field(default=None, metadata={
        "aliases": ["--model"],
        "help": f"The language model. Default: the SAE's base model, else {EMBEDDED_MODEL_NAME}."})
    prompt: str = dataclasses.field(default="The for statement in Python", metadata={
        "help": "Text to continue."})
    max_new_tokens: int = dataclasses.field(default=24, metadata={
        "help": "Tokens to generate per continuation."})
    latent: int | None = dataclasses.field(default=None, metadata={
        "help": "Latent id to edit. Default: the one with the highest activation on the prompt."})
    mode: Literal["clamp", "add", "scale", "zero"] = dataclasses.field(default="clamp", metadata={
        "help": "clamp: set the latent to --value at every token; add: add --value; scale: "
                "multiply by --value; zero: switch it off (ablation)."})
    value: float | None = dataclasses.field(default=None, metadata={
        "help": f"Value of the edit. Default: {STEERING_STRENGTH:g} for scale, else "
                f"{STEERING_STRENGTH:g} times the latent's peak activation on the prompt."})
    top_latents: int = dataclasses.field(default=10, metadata={
        "help": "How many of the prompt's strongest latents to print."})
    do_sample: bool = dataclasses.field(default=False, metadata={
        "help": "Sample instead of greedy decoding; every run starts from --seed."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Random seed of each generation."})
    device: str | None = dataclasses.field(default=None, metadata={
        "help": "Device of the models. Default: cuda if available, else cpu."})


@dataclasses.dataclass
class SteeringResult:
    """What the script printed: the prompt's latents, the edit, and the generated tokens."""

    top_latents: list[tuple[int, float]]
    """`(latent id, peak activation on the prompt)`, strongest first."""
    latent: int
    value: float
    continuations: dict[str, list[int]]
    """`"original"`, `"spliced"` (error mode, no edit) and `"steered"` → generated token ids."""
    texts: dict[str, str]


def check_latent(latent: int | None, sae: DeepSAEModel) -> None:
    """Fail before the language model loads: the edit itself would only fail mid-generation."""
    n_latents = sae.config.n_total_latents
    if latent is not None and not 0 <= latent < n_latents:
        raise ValueError(f"--latent {latent} is out of range: the SAE has {n_latents} latents, "
                         f"ids 0 to {n_latents - 1}")


def prompt_latents(model: PreTrainedModel, sae: DeepSAEModel,
                   inputs: BatchEncoding) -> torch.Tensor:
    """Dense latents `[prompt tokens, n_total_latents]` of the prompt, recorded in capture mode."""
    with splice(model, sae, mode="capture") as handle, torch.no_grad():
        model(**inputs)
    (latents,) = handle.latents.values()
    return sae.densify(*latents)[0]


def strongest_latents(peaks: torch.Tensor, n_top: int) -> list[tuple[int, float]]:
    """`(latent id, peak)` of the `n_top` latents with the highest `peaks` `[n_total_latents]`."""
    return [(latent, peaks[latent].item())
            for latent in peaks.argsort(descending=True)[:n_top].tolist()]


def print_top_latents(latents: torch.Tensor, top: list[tuple[int, float]],
                      token_texts: list[str]) -> None:
    """One line per latent: its peak, the token it peaks on, and how many tokens it fires on."""
    positions = latents.argmax(dim=0).tolist()
    fired = (latents > 0).sum(dim=0).tolist()
    print(f"Latents firing most strongly on the prompt ({len(token_texts)} tokens):")
    for latent, peak in top:
        print(f"  latent {latent:>6}  peak {peak:8.3f} on {token_texts[positions[latent]]!r:<16}"
              f"  fires on {fired[latent]} tokens")


def choose_edit(args: SpliceGenerateArguments, peaks: torch.Tensor) -> tuple[int, float]:
    """`--latent` (default: the prompt's strongest) and `--value` (default: `default_value`).

    A chosen latent that stays silent on the prompt gets a warning: it is likely from another run
    (latent ids mean nothing across SAEs), and zeroing or scaling it changes nothing.
    """
    latent = int(peaks.argmax()) if args.latent is None else args.latent
    if peaks[latent] <= 0:
        effect = ("changes nothing" if args.mode in ("zero", "scale")
                  else "injects a feature the prompt doesn't have")
        print(f"Warning: latent {latent} does not fire on the prompt, so --mode {args.mode} "
              f"{effect}. Latent ids differ from one SAE to the next: the list above shows the "
              f"ones that fire, and without --latent the strongest is edited.", file=sys.stderr)
    if args.value is not None:
        return latent, args.value
    return latent, default_value(args.mode, peaks[latent].item(), peaks.max().item())


def default_value(mode: str, latent_peak: float, strongest_peak: float) -> float:
    """`STEERING_STRENGTH` as a factor, or times the latent's peak (the prompt's strongest
    activation if the latent stays silent, so the default edit does something)."""
    if mode == "scale":
        return STEERING_STRENGTH
    return STEERING_STRENGTH * (latent_peak if latent_peak > 0 else strongest_peak)


def generate(model: PreTrainedModel, inputs: BatchEncoding, args: SpliceGenerateArguments,
             pad_token_id: int | None) -> list[int]:
    """The continuation's token ids; every call starts from `--seed`, so runs compare fairly."""
    set_seed(args.seed)
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens,
                            do_sample=args.do_sample, pad_token_id=pad_token_id)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def generate_three_ways(model: PreTrainedModel, sae: DeepSAEModel, inputs: BatchEncoding,
                        args: SpliceGenerateArguments, pad_token_id: int | None,
                        edit: LatentEdit) -> dict[str, list[int]]:
    """Continuations of the model alone, through the SAE (error mode), and with `edit`."""
    continuations = {"original": generate(model, inputs, args, pad_token_id)}
    with splice(model, sae, mode="error"):
        continuations["spliced"] = generate(model, inputs, args, pad_token_id)
    with splice(model, sae, mode="error", edit=edit):
        continuations["steered"] = generate(model, inputs, args, pad_token_id)
    return continuations


def print_continuations(prompt: str, texts: dict[str, str], identical: bool) -> None:
    """The continuations one per line, quoted so that whitespace and newlines show."""
    print(f"Prompt: {prompt!r}")
    for name, text in texts.items():
        print(f"  {name:>8}: {text!r}")
    print(f"The error-mode splice reproduces the original exactly: {'yes' if identical else 'NO'}")


def main(argv: list[str] | None = None) -> SteeringResult:
    (args,) = HfArgumentParser(SpliceGenerateArguments).parse_args_into_dataclasses(
        args=list(sys.argv[1:] if argv is None else argv)
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sae = hf_deepsae.load_sae(args.sae, args.subfolder).to(device).eval()
    check_latent(args.latent, sae)
    model, tokenizer = load_language_model(
        args.model_name_or_path or sae.config.base_model_name_or_path or EMBEDDED_MODEL_NAME,
        device=device, verbose=True,
    )
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)

    latents = prompt_latents(model, sae, inputs)
    peaks = latents.amax(dim=0)
    top = strongest_latents(peaks, args.top_latents)
    print_top_latents(latents, top, [tokenizer.decode(token) for token in inputs["input_ids"][0]])
    latent, value = choose_edit(args, peaks)
    print(f"Editing latent {latent}: {args.mode}" + ("" if args.mode == "zero" else f" {value:g}"))

    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    continuations = generate_three_ways(model, sae, inputs, args, pad_token_id,
                                        EDITS[args.mode](latent, value))
    texts = {name: tokenizer.decode(ids, skip_special_tokens=True)
             for name, ids in continuations.items()}
    print_continuations(args.prompt, texts, continuations["spliced"] == continuations["original"])
    return SteeringResult(top_latents=top, latent=latent, value=value,
                          continuations=continuations, texts=texts)


if __name__ == "__main__":
    main()
