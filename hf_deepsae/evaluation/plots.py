"""The evaluation plots, as PNG files: feature density of one or several SAEs, and FVU against L0.

Figures are drawn off-screen on matplotlib's Agg canvas (no `pyplot`, no display, no global
backend switch), so they work in scripts, on servers and from worker processes alike. matplotlib
is imported on first use: it is slow to import and most callers never plot.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from .metrics import ActivationMetricsResult

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def plot_feature_density(densities: Tensor | Mapping[str, Tensor], path: str | Path) -> None:
    """Histogram of log10 firing frequency; latents that never fired are counted, not drawn.

    Args:
        densities: per-latent firing frequencies `[n_latents]`
            (`ActivationMetricsResult.feature_density`) of one SAE, drawn as filled bars under a
            title counting its dead latents; or `{name: frequencies}` of several SAEs, overlaid as
            outlines with a legend giving each one's dead fraction.
        path: the PNG file to write.
    """
    if isinstance(densities, Tensor):
        figure, axes = _figure(figsize=(6, 3.5))
        n_latents, alive = _log10_alive(densities)
        axes.hist(alive, bins=50, color="#4C72B0")
        axes.set_title(f"{n_latents - len(alive):,} of {n_latents:,} latents never fired")
    else:
        figure, axes = _figure(figsize=(7, 4))
        for name, density in densities.items():
            n_latents, alive = _log10_alive(density)
            label = f"{name} ({1 - len(alive) / n_latents:.1%} dead)"
            axes.hist(alive, bins=50, histtype="step", label=label)
        axes.legend(fontsize="small")
    axes.set_xlabel("log10 feature density (fraction of tokens a latent fires on)")
    axes.set_ylabel("latents")
    figure.savefig(path, format="png", dpi=110)


def plot_fvu_vs_l0(results: Mapping[str, ActivationMetricsResult], path: str | Path) -> None:
    """FVU against L0, one labelled point per SAE: the sparsity/fidelity trade-off."""
    figure, axes = _figure(figsize=(6, 4))
    for name, metrics in results.items():
        axes.scatter(metrics.l0, metrics.fvu)
        axes.annotate(name, (metrics.l0, metrics.fvu), fontsize="small", xytext=(4, 4),
                      textcoords="offset points")
    axes.margins(0.2)
    axes.set_xlabel("L0 (active latents per token)")
    axes.set_ylabel("FVU (fraction of variance unexplained)")
    figure.savefig(path, format="png", dpi=110)


def check_feature_density(density: object) -> None:
    """A non-empty tensor of firing frequencies in [0, 1] (NaN is not one), one per latent."""
    if not isinstance(density, Tensor) or density.numel() == 0 or density.is_complex() \
            or not ((density >= 0) & (density <= 1)).all():
        raise ValueError("a feature density must be a non-empty tensor of firing frequencies in "
                         "[0, 1] (ActivationMetricsResult.feature_density), one per latent")


def _log10_alive(density: Tensor) -> tuple[int, np.ndarray]:
    """(number of latents, log10 of the non-zero frequencies): log10 of a dead latent is -inf."""
    check_feature_density(density)
    density = density.detach().double().cpu().flatten()
    return len(density), density[density > 0].log10().numpy()


def _figure(figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots()

