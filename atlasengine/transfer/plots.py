"""Figures of a label transfer: uncertainty and calibrated novelty per query type, the assignment heatmap.

Figures are drawn on Agg canvases directly (no pyplot state, no global backend switch); names
are plain text (see :mod:`atlasengine.figures`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from atlasengine.config import TransferConfig
from atlasengine.figures import plain_text
from atlasengine.transfer.evaluate import aligned_truth, label_set
from atlasengine.transfer.knn import UNKNOWN


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def _threshold(predictions: pd.DataFrame, threshold: float | None) -> float:
    if threshold is not None:
        return float(threshold)
    return float(predictions.attrs.get("uncertainty_threshold", TransferConfig().uncertainty_threshold))


def _violins(values: np.ndarray, truth: np.ndarray, novel: set[str], line: float, line_label: str,
             ylabel: str, title: str, ylim: tuple[float, float] | None = None) -> Figure:
    """Violins (with jittered cells) of ``values`` per true query type, one dashed line."""
    types = sorted(set(truth))
    fig = Figure(figsize=(max(6.0, 0.7 * len(types) + 2.0), 4.5))
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    for i, t in enumerate(types):
        vals = values[truth == t]
        color = "tab:orange" if t in novel else "tab:blue"
        if np.unique(vals).size > 1:  # a KDE needs spread
            parts = ax.violinplot([vals], positions=[i], widths=0.8, showextrema=False)
            for body in parts["bodies"]:
                body.set_facecolor(color)
                body.set_alpha(0.35)
        ax.scatter(i + rng.uniform(-0.15, 0.15, vals.size), vals, s=4, color=color, alpha=0.6, lw=0)
        ax.hlines(np.median(vals), i - 0.3, i + 0.3, color="black", lw=1.5)
    ax.axhline(line, color="tab:red", ls="--", lw=1, label=line_label)
    ax.set_xticks(range(len(types)))
    ax.set_xticklabels([f"{t}{' *' if t in novel else ''}\n(n={int((truth == t).sum())})" for t in types],
                       rotation=45, ha="right")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("true query cell type" + (" (* = absent from reference)" if novel else ""))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return fig


@plain_text
def plot_uncertainty_violin(
    predictions: pd.DataFrame,
    true_labels: Iterable[str] | pd.Series,
    path: Path,
    threshold: float | None = None,
    novel_labels: set[str] | None = None,
) -> Path:
    """Violins (with jittered cells) of uncertainty per true query cell type, threshold dashed.

    ``threshold`` defaults to ``predictions.attrs["uncertainty_threshold"]``; types in
    ``novel_labels`` (absent from the reference) are drawn in orange.
    """
    truth = aligned_truth(predictions, true_labels)
    thr = _threshold(predictions, threshold)
    fig = _violins(predictions["uncertainty"].to_numpy(dtype=np.float64), truth, label_set(novel_labels),
                   thr, f"Unknown threshold ({thr:g})", "uncertainty (1 - p_best)",
                   "Label-transfer uncertainty per query cell type", ylim=(-0.03, 1.03))
    return _save(fig, path)


@plain_text
def plot_novelty_violin(
    predictions: pd.DataFrame,
    true_labels: Iterable[str] | pd.Series,
    path: Path,
    target: float = 0.05,
    novel_labels: set[str] | None = None,
) -> Path:
    """Plot violins of the calibrated novelty (-log10 of ``novelty_pvalue``) per true query cell type.

    A line marks the score above which cells are novel at the ``target`` false-alarm rate.
    """
    truth = aligned_truth(predictions, true_labels)
    score = -np.log10(predictions["novelty_pvalue"].to_numpy(dtype=np.float64))
    fig = _violins(score, truth, label_set(novel_labels), -np.log10(target),
                   f"novel at a {target:.0%} false-alarm target", "novelty, -log10 p",
                   "Calibrated novelty per query cell type")
    return _save(fig, path)


@plain_text
def plot_assignment_heatmap(
    predictions: pd.DataFrame, true_labels: Iterable[str] | pd.Series, path: Path
) -> Path:
    """Share of each true query type (columns) assigned to each reference label or Unknown (rows)."""
    truth = aligned_truth(predictions, true_labels)
    called = predictions["label"].to_numpy().astype(str)
    ref = [c[2:] for c in predictions.columns if c.startswith("p_")]
    rows = ref + [r for r in sorted(set(called)) if r not in ref and r != UNKNOWN] + [UNKNOWN]
    cols = sorted(set(truth))
    counts = pd.crosstab(pd.Series(called, name="assigned"), pd.Series(truth, name="true"))
    counts = counts.reindex(index=rows, columns=cols, fill_value=0)
    share = (counts / counts.sum(axis=0).replace(0, 1)).to_numpy(dtype=float)
    fig = Figure(figsize=(max(5.0, 0.65 * len(cols) + 3.0), max(4.0, 0.45 * len(rows) + 2.0)))
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for (r, c), v in np.ndenumerate(share):
        if v > 0:
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v > 0.5 else "black")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"{c} (n={int(counts[c].sum())})" for c in cols], rotation=45, ha="right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows)
    ax.axhline(len(rows) - 1.5, color="grey", lw=0.8)
    ax.set_xlabel("true query cell type")
    ax.set_ylabel("assigned reference label")
    ax.set_title("Label-transfer assignments (share of each query type)")
    fig.colorbar(im, ax=ax, label="share of query cells")
    fig.tight_layout()
    return _save(fig, path)


def plot_transfer(
    predictions: pd.DataFrame,
    true_labels: Iterable[str] | pd.Series,
    outdir: Path,
    novel_labels: set[str] | None = None,
    novelty_target: float | None = None,
) -> dict[str, Path]:
    """Write the transfer figures as PNGs into ``outdir``; return their paths by name.

    The novelty figure is written only where the predictions carry ``novelty_pvalue``, read at
    ``novelty_target`` (default: the target the predictions were called at, ``attrs["novelty_target"]``).
    """
    if novelty_target is None:
        novelty_target = float(predictions.attrs.get("novelty_target", TransferConfig().novelty_target))
    outdir = Path(outdir)
    truth = aligned_truth(predictions, true_labels)  # align once, reuse for every figure
    paths = {
        "uncertainty_violin": plot_uncertainty_violin(
            predictions, truth, outdir / "transfer_uncertainty.png", novel_labels=novel_labels
        ),
    }
    if "novelty_pvalue" in predictions.columns:
        paths["novelty_violin"] = plot_novelty_violin(predictions, truth, outdir / "transfer_novelty.png",
                                                      novelty_target, novel_labels)
    paths["assignment_heatmap"] = plot_assignment_heatmap(predictions, truth, outdir / "transfer_assignment.png")
    return paths
