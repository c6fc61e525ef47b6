"""Several SAEs through the interpretability benchmarks, building each benchmark's data once.

`BenchmarkSuite(model, tokenizer, ["absorption", "sparse_probing", "autointerp"])` evaluates any
number of SAEs of `model` one by one (`suite.evaluate(sae)`); what does not depend on the SAE is
built on first use and reused: the first-letter data and letter probes per (read, write) pair of
sites, the probing tasks' activations (and raw-activation probes) per read site, the judge.
`examples/evaluate.py --benchmarks ...` and `benchmarks/study_interpretability.py` run on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ..interpret.judges import JudgeConfig, load_judge
from ..modeling_deepsae import DeepSAEModel
from ..sites import Site, sae_sites
from .absorption import evaluate_absorption
from .first_letter import AbsorptionConfig, FirstLetterData, first_letter_data
from .probing_tasks import TextClassificationTask, default_probing_tasks
from .sparse_probing import (
    ProbingActivations,
    SparseProbingConfig,
    evaluate_sparse_probing,
    probing_activations,
)

BENCHMARKS = ("absorption", "sparse_probing", "autointerp")
"""The interpretability benchmarks a suite runs (`core`, the FVU/CE metrics, is `SAEEvaluator`)."""


class BenchmarkSuite:
    """Run `benchmarks` (a subset of `BENCHMARKS`) on SAEs of `model`.

    Args:
        probing_tasks: sparse-probing tasks; default `default_probing_tasks()` (offline corpora).
        corpus_ids: `[n, ctx]` token ids the autointerp latents are cached on (needed for it).
        judge: the autointerp judge (default: the offline local model).
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 benchmarks: Sequence[str], *, absorption: AbsorptionConfig | None = None,
                 sparse_probing: SparseProbingConfig | None = None,
                 probing_tasks: list[TextClassificationTask] | None = None,
                 autointerp: Any = None, judge: JudgeConfig | None = None,
                 corpus_ids: Tensor | None = None) -> None:
        unknown = sorted(set(benchmarks) - set(BENCHMARKS))
        if unknown:
            raise ValueError(f"unknown benchmarks {unknown}; choose among {list(BENCHMARKS)}")
        if "autointerp" in benchmarks and corpus_ids is None:
            raise ValueError("the autointerp benchmark needs corpus_ids: the token ids to cache "
                             "latent activations on")
        self.model, self.tokenizer, self.benchmarks = model, tokenizer, list(benchmarks)
        self.absorption_config = absorption or AbsorptionConfig()
        self.sparse_probing_config = sparse_probing or SparseProbingConfig()
        self.probing_tasks = probing_tasks
        self.autointerp_config, self.judge_config = autointerp, judge or JudgeConfig()
        self.corpus_ids = corpus_ids
        self._letters: dict[tuple[Site, Site], FirstLetterData] = {}
        self._probing: dict[Site, list[ProbingActivations]] = {}
        self._judge: tuple[Any, str] | None = None

    def first_letter_data(self, sites: tuple[Site, Site]) -> FirstLetterData:
        if sites not in self._letters:
            self._letters[sites] = first_letter_data(self.model, self.tokenizer, sites,
                                                     self.absorption_config)
        return self._letters[sites]

    def probing_activations(self, site: Site) -> list[ProbingActivations]:
        if self.probing_tasks is None:
            self.probing_tasks = default_probing_tasks(seed=self.sparse_probing_config.seed)
        if site not in self._probing:
            self._probing[site] = [probing_activations(self.model, self.tokenizer, site, task,
                                                       self.sparse_probing_config)
                                   for task in self.probing_tasks]
        return self._probing[site]

    def judge(self) -> tuple[Any, str]:
        if self._judge is None:
            self._judge = load_judge(self.judge_config, self.model, self.tokenizer)
        return self._judge

    def evaluate(self, sae: DeepSAEModel) -> dict[str, Any]:
        """`{benchmark: result}` for one SAE (each result has `scalars()` and `to_dict()`)."""
        sites = sae_sites(self.model, sae.config)
        results: dict[str, Any] = {}
        if "absorption" in self.benchmarks:
            results["absorption"] = evaluate_absorption(sae, self.first_letter_data(sites),
                                                        self.absorption_config)
        if "sparse_probing" in self.benchmarks:
            results["sparse_probing"] = evaluate_sparse_probing(
                sae, self.probing_activations(sites[0]), self.sparse_probing_config)
        if "autointerp" in self.benchmarks:
            from .autointerp import evaluate_autointerp

            judge, name = self.judge()
            results["autointerp"] = evaluate_autointerp(
                self.model, self.tokenizer, sae, self.corpus_ids, judge, name,
                self.autointerp_config, max_workers=self.judge_config.max_workers)
        return results


def benchmark_scalars(results: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of all benchmark results of one SAE, under model-card names."""
    return {name: value for result in results.values() for name, value in result.scalars().items()}
