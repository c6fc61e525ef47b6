"""A latent browser: one static HTML file per SAE, opened straight from disk (no server).

For each chosen latent it shows the statistics, the explanation and its scores, the top contexts
and a sample from every activation quantile with tokens shaded by activation (relative to the
latent's max), the neighbouring latents and the non-activating contexts (neighbour, same-token,
random). Everything is rendered up front, so the page reads without JavaScript; a small script
adds a filter box (also set from the URL, `browser.html?q=<text>`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from .sampling import Example, LatentExamples, token_strings
from .scoring import LatentScore
from .statistics import LatentStatistics

TEMPLATE = "browser.html.jinja"


def _visible(text: str) -> str:
    """A token alone on screen: spaces and line breaks shown (`␣`, `⏎`), an empty one as `∅`."""
    return text.replace(" ", "␣").replace("\n", "⏎") or "∅"


def _example_view(example: Example, tokenizer: PreTrainedTokenizerBase, scale: float
                  ) -> dict[str, Any]:
    texts = token_strings(tokenizer, example.tokens)
    return {
        "window": example.window,
        "max_activation": example.max_activation,
        "neighbour": example.neighbour,
        "similarity": example.similarity,
        "tokens": [{"text": text.replace("\n", "⏎"), "activation": activation,
                    "shade": min(activation / scale, 1.0) if scale > 0 else 0.0}
                   for text, activation in zip(texts, example.activations, strict=True)],
    }


def _latent_view(examples: LatentExamples, statistics: LatentStatistics,
                 tokenizer: PreTrainedTokenizerBase, score: LatentScore | None,
                 neighbours: tuple[Tensor, Tensor] | None) -> dict[str, Any]:
    latent = examples.latent
    record = statistics.latent_record(latent, tokenizer)
    scale = record["max_activation"]

    def views(items: list[Example]) -> list[dict[str, Any]]:
        return [_example_view(example, tokenizer, scale) for example in items]

    neighbour_list = [] if neighbours is None else [
        {"latent": index, "similarity": similarity}
        for index, similarity in zip(neighbours[0][latent].tolist(),
                                     neighbours[1][latent].tolist(), strict=True) if index >= 0
    ]
    search = " ".join([f"latent {latent}", *(t["text"] for t in record["top_tokens"]),
                       (score.explanation or "") if score else ""])
    return {
        **record,
        "search": search.lower(),
        "score": score.to_dict() if score else None,
        "top": views(examples.top),
        "quantiles": [{"index": q, "range": examples.quantile_ranges[q], "examples": views(bin_)}
                      for q, bin_ in enumerate(examples.quantiles)],
        "neighbours": neighbour_list,
        "negatives": {"neighbour": views(examples.neighbour_negatives),
                      "same-token": views(examples.same_token_negatives),
                      "random": views(examples.random_negatives)},
    }


def render_browser(path: str | Path, examples: Sequence[LatentExamples],
                   statistics: LatentStatistics, tokenizer: PreTrainedTokenizerBase,
                   scores: Sequence[LatentScore] | None = None,
                   neighbours: tuple[Tensor, Tensor] | None = None,
                   title: str = "Latent browser", info: Mapping[str, Any] | None = None) -> Path:
    """Write the browser for the latents in `examples` to `path` (an `.html` file).

    Args:
        scores: detection scores of (some of) these latents, shown with their explanation.
        neighbours: `nearest_latents(...)`, listed per latent and linked when on the page.
        info: provenance shown in the header (model, hookpoint, corpus...).
    """
    by_latent = {score.latent: score for score in scores or []}
    latents = [_latent_view(item, statistics, tokenizer, by_latent.get(item.latent), neighbours)
               for item in examples]
    environment = Environment(loader=FileSystemLoader(Path(__file__).parent),
                              autoescape=select_autoescape(default=True), trim_blocks=True,
                              lstrip_blocks=True)
    environment.filters["visible"] = _visible
    html = environment.get_template(TEMPLATE).render(
        title=title, info=dict(info or {}), summary=statistics.summary(), latents=latents,
        on_page={latent["latent"] for latent in latents})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
