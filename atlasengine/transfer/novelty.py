"""Per-cell novelty: whether a query cell belongs to a type the reference does not hold.

The scArches kNN uncertainty only sees cells that fall *between* reference labels; a novel
type that lands beside one known type (NK beside CD8 T cells) gets a confident label. Three
signals, each turned into a conformal p-value against reference cells, then combined:

1. ``distance``: mean Euclidean distance to the ``k`` nearest reference cells in the shared
   embedding (k = 10, the first 10 of the label transfer's 50 neighbours, so its search is
   reused). Calibrated by the same statistic of reference cells to the *other* reference
   cells (leave-one-out): p = (1 + #{ref >= d}) / (1 + n_ref). One global calibration, not
   one per predicted label: per-label calibration was measured and ranks worse (``distance``
   against ``distance_label`` in ``benchmarks/RESULTS.md``, section 'Novelty scores vs the
   scArches kNN uncertainty'; a novel type beside a diffuse known type is hidden by that type's
   wide spread).
2. ``uncertainty``: the scArches weighted-kNN uncertainty, calibrated by the leave-one-out
   uncertainty of reference cells (same k, same kernel as the label transfer).
3. ``elbo_gain`` (:func:`atlasengine.model.elbo_gain`, computed by the caller, who holds both
   models): log(nELBO_old / nELBO_new), how much better the folded-in model explains
   the cell than the previous version (needs both models; only at fold-in). Every folded-in
   cell gains from its new batch column, so the gain is made comparable by a robust z-score
   within its batch (median / MAD; labels never used) and calibrated against the reference
   cells' within-batch z-scores of their own gain.

The distance and the uncertainty (not the ELBO gain) are averaged over the cell's ``smoothing``
nearest cells of its own batch (itself included; a batch too small for that is pooled with the
other small ones: :func:`neighbourhood_mean`) before their p-values: query cells among the query's
cells of their batch, calibration cells among all indexed reference cells of theirs, by the same
rule, so both sides are treated alike.
A cell of a new type sits among cells of its type, whose scores are high too, while a known cell
that happens to sit far from the reference is pulled back by known neighbours: the averaging
roughly doubled the share of new cells caught at the same false-alarm target
(``benchmarks/novelty.py``, rows ``novelty`` against ``novelty_unsmoothed``). It helps the more
new cells the query holds, the case a query-wide shift correction gets wrong.

``combine`` is Fisher's statistic -2 sum(log p) over the chosen signals (default distance +
uncertainty). Its threshold is conformal too: the combined statistic of every calibration
(reference) cell is built from its leave-one-out p-values, and a query cell is called novel
when (1 + #{ref >= T}) / (1 + n_ref) <= ``target_rate``. On exchangeable data this holds the
false-Unknown rate at ``target_rate``; batch shift between reference and query moves it
(measured by ``benchmarks/novelty.py`` in ``benchmarks/RESULTS.md``, section 'Novelty scores vs
the scArches kNN uncertainty').

Example
-------
>>> import numpy as np
>>> from atlasengine.config import TransferConfig
>>> from atlasengine.transfer import NeighborIndex
>>> rng = np.random.default_rng(0)
>>> ref = rng.normal(size=(400, 5)).astype(np.float32)
>>> idx = NeighborIndex.build(ref, np.array(["a", "b"] * 200), TransferConfig(k=20))
>>> cal = reference_calibration(idx, ref, k=20, k_transfer=20)
>>> q = np.vstack([rng.normal(size=(50, 5)), rng.normal(size=(5, 5)) + 6]).astype(np.float32)
>>> d, i = idx.search(q, 20)
>>> unc = 1 - label_probabilities(d, idx.neighbor_codes(i), 2).max(1)
>>> df = novelty_scores(d, unc, cal)
>>> bool(df["is_novel"].iloc[-5:].all()), float(df["is_novel"].iloc[:50].mean()) <= 0.1
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from atlasengine.errors import AtlasFormatError, InputError
from atlasengine.numerics import as_matrix, sorted_sample
from atlasengine.transfer.index import NeighborIndex
from atlasengine.transfer.knn import label_probabilities

SIGNALS = ("distance", "uncertainty", "elbo_gain")
DEFAULT_COMBINATION = ("distance", "uncertainty")
DEFAULT_K = 10
"""Neighbours of the distance signal, an empirical choice.

k = 10 / 20 / 50 were compared by ``benchmarks/novelty.py`` (6 seeds, 5% target), measured in
``benchmarks/RESULTS.md`` (section 'Novelty scores vs the scArches kNN uncertainty', rows
``novelty``, ``novelty_k20`` and ``novelty_k50``). The AUROCs are close: 10 ranks best on
pancreas and ifnb, 50 on pbmc. With the default calibration (the query's shift taken off) the
false-alarm rates agree closely and 10 calls the most pancreas novel cells. Against the
reference alone it matters more: the more neighbours, the fewer pancreas known cells are called
novel, and over seeds 0-2 the rate at 50 falls below the 3-7% band. With 50 neighbours (a fifth
of the small pancreas reference) a reference cell's distance reaches past its own batch and
type, and known query cells look closer to the reference than its own cells do."""
DEFAULT_TARGET = 0.05
DEFAULT_SMOOTHING = 10
"""Cells each signal is averaged over (the cell and its nearest cells of the same batch).

10 was chosen on seed 0 of the ``benchmarks/novelty.py`` scenarios among 1 / 5 / 10 / 15 (the
benchmark reports 1, 10 and 30 on three seeds): more neighbours rank better where new cells are
many (kang) and worse where a new type has few cells per batch (pancreas: 17 ductal cells in each
of two batches)."""
AVERAGED_MIN_CELLS = 4
"""A group of query cells is averaged over its ``smoothing`` nearest cells only when it holds this many
times ``smoothing`` cells (40 at the default); smaller groups join the other small ones, and a query
with fewer cells in all is scored unaveraged. In a group of a few dozen cells, ten neighbours span
most of it, one outlier moves every cell's score together and the scores stop being comparable
with the reference's: on a query of known cells only (3 Gaussian types, 1,500 reference cells, 20
queries a size, calibrated on the reference) the averaged rule called 16% of 12-cell and 12% of
20-cell queries novel against a 5% target, 5.0% at 40 cells; unaveraged 2% and 6%."""
CALIBRATION_FILE = "novelty_calibration.npz"
FORMAT_VERSION = 2
"""2: the calibration records its ``smoothing`` (1 for format-1 files, which had none)."""


# ------------------------------------------------------------------------- conformal
def conformal_pvalues(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Upper-tail conformal p-values of ``scores`` (larger = more novel) against ``calibration``.

    p = (1 + #{calibration >= s}) / (1 + n): valid (P(p <= a) <= a) when the scored cell and
    the calibration cells are exchangeable.
    """
    cal = np.sort(np.asarray(calibration, dtype=np.float64).ravel())
    s = np.asarray(scores, dtype=np.float64)
    if cal.size == 0:
        raise InputError("conformal p-values need at least one calibration score")
    if np.isnan(cal).any() or np.isnan(s).any():
        raise InputError("scores and calibration scores must not be NaN")
    n = cal.size
    return (1.0 + n - np.searchsorted(cal, s, side="left")) / (1.0 + n)


def loo_pvalues(calibration: np.ndarray) -> np.ndarray:
    """Each calibration score's conformal p-value against the *other* calibration scores."""
    cal = np.asarray(calibration, dtype=np.float64).ravel()
    n = cal.size
    if n < 2:
        raise InputError("leave-one-out p-values need at least two calibration scores")
    srt = np.sort(cal)
    at_least = n - np.searchsorted(srt, cal, side="left")  # includes the cell itself
    return at_least / float(n)  # (1 + #{others >= s}) / (1 + (n - 1))


def fisher_statistic(pvalues: Sequence[np.ndarray]) -> np.ndarray:
    """Fisher's combination -2 * sum(log p) (larger = more novel)."""
    if not len(pvalues):
        raise InputError("nothing to combine: pass at least one p-value array")
    p = np.stack([np.asarray(v, dtype=np.float64) for v in pvalues])
    if (p <= 0).any() or (p > 1).any():
        raise InputError("p-values must lie in (0, 1]")
    return -2.0 * np.log(p).sum(axis=0)


def cut_cells_needed(target_rate: float) -> int:
    """Return the fewest calibration cells whose conformal cut at ``target_rate`` is finite.

    The cut is the ``floor(target * (n + 1))``-th largest calibration score, so it needs
    ``target * (n + 1) >= 1``: ``ceil(1 / target) - 1`` cells.

    >>> cut_cells_needed(0.05), cut_cells_needed(0.01)
    (19, 99)
    """
    return math.ceil(1 / target_rate - 1e-9) - 1


def calibrated_unknown(
    scores: np.ndarray, calibration: np.ndarray, target_rate: float = DEFAULT_TARGET
) -> tuple[np.ndarray, np.ndarray]:
    """(conformal p-values, is_unknown) for novelty ``scores``: Unknown where p <= ``target_rate``.

    With exchangeable calibration cells the share of known cells called Unknown is at most
    ``target_rate`` (and within 1/(n+1) of it).
    """
    if not 0.0 < target_rate < 1.0:
        raise InputError(f"target_rate must lie in (0, 1), got {target_rate}")
    p = conformal_pvalues(calibration, scores)
    return p, p <= target_rate


MIN_LABEL_CELLS = 10
MIN_LABELS = 3


def label_shifts(
    scores: np.ndarray,
    predicted: Sequence[str],
    calibration: np.ndarray,
    calibration_predicted: Sequence[str],
    min_cells: int = MIN_LABEL_CELLS,
) -> dict[str, float]:
    """Return {label: median query score - median calibration score} per predicted label.

    Only predicted labels that hold at least ``min_cells`` query cells and ``min_cells``
    calibration cells count (calibration cells grouped by their leave-one-out predicted label).
    """
    s = np.asarray(scores, dtype=np.float64)
    pred = np.asarray(predicted).astype(str)
    cal = np.asarray(calibration, dtype=np.float64)
    cal_pred = np.asarray(calibration_predicted).astype(str)
    if len(pred) != len(s) or len(cal_pred) != len(cal):
        raise InputError("every score needs its predicted label")
    out = {}
    for label in np.unique(pred):
        q, r = s[pred == label], cal[cal_pred == label]
        if len(q) >= min_cells and len(r) >= min_cells:
            out[str(label)] = float(np.median(q) - np.median(r))
    return out


def query_shift(
    scores: np.ndarray,
    predicted: Sequence[str],
    calibration: np.ndarray,
    calibration_predicted: Sequence[str],
    min_cells: int = MIN_LABEL_CELLS,
    min_labels: int = MIN_LABELS,
) -> float | None:
    """How far the query's known cells sit beyond the reference's own cells, in the statistic.

    The median difference over all query cells (what a query shifted as a whole moves: another
    chemistry, a stimulation), kept within the quartiles of the per-label differences
    (:func:`label_shifts`): a new type that lands in a few labels moves the overall median but
    only its own labels, so the upper quartile keeps it from being taken for a shift. The upper
    bound is at most the second-largest label's difference: of three or four labels the upper
    quartile lies part of the way to the largest, and a new type that lands in one label was
    half taken for a shift (the README's pancreas example at seed 3 of
    ``benchmarks/naming_pancreas.py``: 35 of celseq's 36 ductal cells predicted alpha, one of the
    three labels that count, none of them then called). With five labels or more the bound is the
    upper quartile, as before. A query whose mix of labels differs from the reference's (mostly a
    tight type) moves the overall median down, and the lower quartile keeps that from calling
    more cells. None when fewer than ``min_labels`` labels hold enough cells (then use the
    reference calibration).

    Measured before the bound on the second-largest label, which moved benchmarks/novelty.py's
    default figures by at most 0.1 point (benchmarks/RESULTS.md, the note on the query-shift
    bound). On benchmarks/novelty.py (6 seeds, 5% target), known cells called novel with the
    reference threshold / after this shift: ifnb (stimulated query) 9.9% -> 4.9%, pbmc 6.1% ->
    5.1%, pancreas 4.6% -> 3.4%. The overall median alone gives the same on these, but a query
    of 38% monocytes mapped onto a reference without them is then centred part-way onto the
    monocytes and loses two thirds of them; the per-label median alone keeps them but leaves
    ifnb at 6.9% (8.3% on seeds 0-2). Limit: new cells that fill most labels (71% of a query,
    in two of three labels) look like a shift to every estimate (tests/test_novelty.py).
    """
    per_label = label_shifts(scores, predicted, calibration, calibration_predicted, min_cells)
    if len(per_label) < max(1, min_labels):
        return None
    overall = float(np.median(np.asarray(scores, dtype=np.float64)) - np.median(np.asarray(calibration, dtype=np.float64)))
    differences = np.sort(np.fromiter(per_label.values(), dtype=np.float64))
    low, high = np.quantile(differences, [0.25, 0.75])
    if len(differences) >= 2:  # one label alone is not a shift: of 3 labels the upper quartile is half-way to the largest
        high = max(low, min(high, differences[-2]))  # (of 2 labels the second-largest lies under the lower quartile)
    return float(np.clip(overall, low, high))


def robust_z(values: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """(x - median) / (1.4826 * MAD) within each group (e.g. batch); MAD 0 -> scale 1."""
    x = np.asarray(values, dtype=np.float64)
    g = np.zeros(len(x), dtype=np.int64) if groups is None else np.asarray(groups)
    if len(g) != len(x):
        raise InputError(f"groups has {len(g)} entries for {len(x)} values")
    out = np.empty_like(x)
    for v in pd.unique(g):
        m = g == v
        med = np.median(x[m])
        mad = 1.4826 * np.median(np.abs(x[m] - med))
        out[m] = (x[m] - med) / (mad if mad > 0 else 1.0)
    return out


def neighbourhood_mean(
    embeddings: np.ndarray, values: np.ndarray, groups: np.ndarray | None = None, m: int = DEFAULT_SMOOTHING
) -> np.ndarray:
    """Mean of ``values`` over each cell's ``m`` nearest cells of the same group, itself included.

    The engine's averaging of a query's novelty signals. ``embeddings`` (cells, d); ``values``
    (cells,) or (cells, signals), each column averaged over the same neighbours; ``groups``
    (e.g. batch; None = one group): a group of fewer than ``AVERAGED_MIN_CELLS * m`` cells is
    pooled with the other small ones (:func:`merge_small_groups`), and a group still under ``m``
    cells averages over all of them. ``m = 1`` returns the values unchanged.

    >>> import numpy as np
    >>> z = np.array([[0.0], [0.1], [5.0], [5.1]])
    >>> neighbourhood_mean(z, np.array([1.0, 3.0, 10.0, 20.0]), m=2).tolist()
    [2.0, 2.0, 15.0, 15.0]
    """
    v = np.asarray(values, dtype=np.float64)
    emb = as_matrix(embeddings, "embeddings", dtype=np.float32)
    if len(emb) != len(v):
        raise InputError(f"embeddings has {len(emb)} rows for {len(v)} values")
    if m < 1:
        raise InputError(f"the neighbourhood must hold at least one cell, got m = {m}")
    if groups is not None and len(groups) != len(v):
        raise InputError(f"groups has {len(groups)} entries for {len(v)} values")
    if m == 1 or len(v) == 0:
        return v.copy()
    near = batch_neighbours(emb, merge_small_groups(groups, AVERAGED_MIN_CELLS * m, len(v)), np.arange(len(v)), m)
    return _mean_of(v, near) if v.ndim == 1 else np.column_stack([_mean_of(col, near) for col in v.T])


def _mean_of(values: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    """Return the mean of ``values`` at each row's ``nearest`` positions (-1: none), finite ones only.

    A row whose own value (its first neighbour, itself) is infinite stays infinite: a cell with
    no reference neighbour found keeps that signal and does not spread it to its neighbours.
    """
    picked = values[np.maximum(nearest, 0)]
    use = (nearest >= 0) & np.isfinite(picked)
    mean = np.where(use, picked, 0.0).sum(1) / np.maximum(use.sum(1), 1)
    return np.where(np.isfinite(picked[:, 0]) | (nearest[:, 0] < 0), mean, np.inf)


def merge_small_groups(groups: np.ndarray | None, m: int, n: int) -> np.ndarray:
    """Group labels (as text) with every group of fewer than ``m`` cells merged into one.

    A cell is averaged over ``m`` cells of its batch; a batch too small for that joins the
    other small batches, and if those are still fewer than ``m`` cells, they join the largest
    batch (of equal ones, the first by name; the other batches stay apart); if no batch has
    ``m`` cells, all are one group.
    ``n``: the number of cells (for ``groups=None``).

    >>> import numpy as np
    >>> merge_small_groups(np.array(["a"] * 5 + ["b"] * 4 + ["c"]), 3, 10).tolist()
    ['a', 'a', 'a', 'a', 'a', 'b', 'b', 'b', 'b', 'a']
    """
    g = np.zeros(n, dtype=object) if groups is None else np.asarray(groups).astype(str).astype(object)
    if len(g) != n:
        raise InputError(f"groups has {len(g)} entries for {n} cells")
    values, counts = np.unique(g.astype(str), return_counts=True)
    small = set(values[counts < m])
    if not small:
        return g
    pooled = np.isin(g.astype(str), list(small))
    if pooled.sum() >= m:
        return np.where(pooled, "\x00small batches", g.astype(str)).astype(object)
    if len(small) == len(values):
        return np.zeros(n, dtype=object)
    largest = values[np.argmax(np.where(counts >= m, counts, -1))]
    return np.where(pooled, largest, g.astype(str)).astype(object)


def novel_share(called: np.ndarray, target_rate: float, confidence: float = 0.9, effective_n: float | None = None,
                n_calibration: int | None = None) -> tuple[float, float, float]:
    """Share of new cells among the scored cells that the rule finds, with an interval.

    (c - a) / (1 - a), clipped to [0, 1], where c is the share of cells called novel and a the
    false-alarm target (known cells called novel at rate a): the share of new cells the rule
    catches, so a lower bound of the share of new cells wherever the rule misses some.

    The interval maps the Wilson score interval of c the same way, widened for what makes the
    calls vary beyond independent draws: calls of cells whose scores were averaged over their
    neighbours move together, so the interval counts ``effective_n`` cells (the cells over the
    averaging's neighbours; default all cells); and a cut set at rank ``target * (n + 1)`` among
    ``n_calibration`` cells calls known cells at a rate around the target (its own Wilson
    interval), so the low end is mapped with that rate's upper bound and the high end with its
    lower bound. It is approximate: the query-shift correction, fitted on the same cells, is not
    counted. Returns (share, low, high).

    Storey's estimate from the p-values was measured too and is not used: it assumes the known
    cells' p-values are uniform, and a query whose known cells sit closer to the reference than
    its own cells do (pancreas) makes it 0 whatever the new cells (``benchmarks/RESULTS.md``).

    >>> import numpy as np
    >>> calls = np.r_[np.ones(240, bool), np.zeros(760, bool)]
    >>> share, low, high = novel_share(calls, 0.05)
    >>> round(share, 3), low < share < high
    (0.2, True)
    >>> novel_share(calls, 0.05, effective_n=100, n_calibration=500)[1] < low  # fewer independent calls: wider
    True
    """
    from scipy.stats import norm

    c = np.asarray(called, dtype=bool)
    if not 0.0 < target_rate < 1.0:
        raise InputError(f"target_rate must lie in (0, 1), got {target_rate}")
    n = len(c)
    if n == 0:
        return 0.0, 0.0, 0.0
    z = float(norm.ppf(0.5 + confidence / 2))

    def wilson(p: float, m: float) -> tuple[float, float]:
        centre = (p + z * z / (2 * m)) / (1 + z * z / m)
        half = z * np.sqrt(p * (1 - p) / m + z * z / (4 * m * m)) / (1 + z * z / m)
        return centre - half, centre + half

    phat = float(c.mean())
    c_low, c_high = wilson(phat, max(1.0, min(float(effective_n), n)) if effective_n is not None else n)
    a_low, a_high = wilson(target_rate, n_calibration) if n_calibration else (target_rate, target_rate)

    def found(x: float, a: float) -> float:
        a = min(max(a, 0.0), 1.0 - 1e-9)
        return float(np.clip((x - a) / (1 - a), 0.0, 1.0))

    return found(phat, target_rate), found(c_low, a_high), found(c_high, a_low)


# --------------------------------------------------------------------------- signals
def knn_distance(distances: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
    """Mean Euclidean distance to the ``k`` nearest reference cells (columns nearest first).

    Missing neighbours (inf, approximate indices) are ignored; a cell with none gets inf.
    """
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] < 1:
        raise InputError(f"distances must be (cells, neighbours), got shape {d.shape}")
    d = d[:, : min(k, d.shape[1])]
    ok = np.isfinite(d)
    cnt = ok.sum(axis=1)
    tot = np.where(ok, d, 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.inf)


def leave_one_out_knn(index: NeighborIndex, embeddings: np.ndarray, cells: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """K nearest *other* indexed cells of the indexed ``cells`` (rows of ``embeddings``, index order).

    Returns (distances, indices), nearest first; the cell itself is dropped (where an
    approximate index did not return it, the farthest neighbour is dropped instead).
    """
    cells = np.asarray(cells, dtype=np.int64)
    emb = as_matrix(embeddings, "embeddings", dtype=np.float32, d=index.d)
    if len(emb) != index.n:
        raise InputError(f"embeddings has {len(emb)} rows, the index holds {index.n} cells")
    k = min(int(k), index.n - 1)
    if k < 1:
        raise InputError("leave-one-out neighbours need an index of at least two cells")
    return index.search(emb[cells], k, exclude=cells)


# ----------------------------------------------------------------------- calibration
@dataclass
class NoveltyCalibration:
    """Leave-one-out scores of reference (calibration) cells, aligned per cell.

    ``distance`` and ``uncertainty`` always, each averaged over ``smoothing`` neighbouring
    indexed cells of the same batch (:func:`reference_calibration`); ``predicted`` (each cell's leave-one-out predicted
    label, for :func:`query_shift`) in calibrations written since it exists; ``elbo_gain_z``
    (within-batch robust z of the reference cells' ELBO gain) only where a fold-in computed it.
    Save with :meth:`save`.
    """

    k: int
    k_transfer: int
    kernel: str
    cells: np.ndarray  # calibration cells (positions in the index)
    distance: np.ndarray
    uncertainty: np.ndarray
    elbo_gain_z: np.ndarray | None = None
    predicted: np.ndarray | None = None
    smoothing: int = 1
    distance_unaveraged: np.ndarray | None = None
    uncertainty_unaveraged: np.ndarray | None = None

    @property
    def n(self) -> int:
        """Number of calibration cells."""
        return int(len(self.cells))

    def signals(self) -> tuple[str, ...]:
        """Return the signals this calibration holds scores for (``elbo_gain`` only where computed)."""
        return ("distance", "uncertainty") + (("elbo_gain",) if self.elbo_gain_z is not None else ())

    def scores(self, signal: str) -> np.ndarray:
        """Calibration scores of one signal (larger = more novel)."""
        if signal == "distance":
            return self.distance
        if signal == "uncertainty":
            return self.uncertainty
        if signal == "elbo_gain" and self.elbo_gain_z is not None:
            return self.elbo_gain_z
        raise InputError(f"the calibration holds no {signal!r} scores (it has {self.signals()})")

    def unaveraged(self) -> NoveltyCalibration:
        """Return the same calibration without averaging (for queries of fewer cells than ``smoothing``)."""
        if self.smoothing <= 1:
            return self
        if self.distance_unaveraged is None or self.uncertainty_unaveraged is None:
            raise InputError("this calibration kept no unaveraged scores; recompute it with reference_calibration")
        return NoveltyCalibration(self.k, self.k_transfer, self.kernel, self.cells, self.distance_unaveraged,
                                  self.uncertainty_unaveraged, self.elbo_gain_z, self.predicted, 1)

    def combined(self, signals: Sequence[str] = DEFAULT_COMBINATION) -> np.ndarray:
        """Fisher statistic of every calibration cell from its leave-one-out p-values."""
        return fisher_statistic([loo_pvalues(self.scores(s)) for s in signals])

    def save(self, path: Path) -> Path:
        """Write the calibration to ``path`` as an ``.npz`` file (no pickled objects); return ``path``."""
        arrays = {"format_version": np.array(FORMAT_VERSION), "k": np.array(self.k), "k_transfer": np.array(self.k_transfer),
                  "kernel": np.array(self.kernel), "cells": self.cells, "distance": self.distance, "uncertainty": self.uncertainty,
                  "smoothing": np.array(self.smoothing)}
        if self.elbo_gain_z is not None:
            arrays["elbo_gain_z"] = self.elbo_gain_z
        if self.predicted is not None:
            arrays["predicted"] = np.asarray(self.predicted).astype(str)  # a unicode array: no pickle
        if self.distance_unaveraged is not None and self.uncertainty_unaveraged is not None:
            arrays["distance_unaveraged"] = self.distance_unaveraged
            arrays["uncertainty_unaveraged"] = self.uncertainty_unaveraged
        path = Path(path)
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> NoveltyCalibration:
        """Read a calibration written by :meth:`save` (:class:`AtlasFormatError` if unreadable or of another format)."""
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                fmt = int(z["format_version"])
                if fmt not in (1, FORMAT_VERSION):
                    raise AtlasFormatError(f"unknown novelty calibration format {fmt} (this engine reads 1 and "
                                           f"{FORMAT_VERSION}); upgrade atlasengine")
                return cls(int(z["k"]), int(z["k_transfer"]), str(z["kernel"]), z["cells"], z["distance"], z["uncertainty"],
                           z["elbo_gain_z"] if "elbo_gain_z" in z.files else None,
                           z["predicted"] if "predicted" in z.files else None,
                           int(z["smoothing"]) if fmt >= 2 else 1,
                           z["distance_unaveraged"] if "distance_unaveraged" in z.files else None,
                           z["uncertainty_unaveraged"] if "uncertainty_unaveraged" in z.files else None)
        except (OSError, KeyError, ValueError) as exc:
            raise AtlasFormatError(f"cannot read novelty calibration {path}: {exc}") from exc


def calibration_cells(n: int, max_cells: int = 5000, seed: int = 0) -> np.ndarray:
    """Sorted positions of a uniform sample of at most ``max_cells`` of ``n`` indexed cells."""
    if n < 2:
        raise InputError("novelty calibration needs at least two reference cells")
    return sorted_sample(n, max_cells, seed)


def reference_calibration(
    index: NeighborIndex,
    embeddings: np.ndarray,
    *,
    k: int = DEFAULT_K,
    k_transfer: int = 50,
    kernel: str = "scarches",
    cells: np.ndarray | None = None,
    max_cells: int = 5000,
    seed: int = 0,
    elbo_gain: np.ndarray | None = None,
    gain_groups: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    smoothing: int = 1,
) -> NoveltyCalibration:
    """Leave-one-out novelty scores of reference cells, the null every query cell is ranked in.

    ``embeddings``: the indexed (labelled) cells' embeddings in index order. ``k_transfer``
    and ``kernel`` must match the label transfer (``TransferConfig.k`` / ``.kernel``).
    ``cells``: which indexed cells calibrate (default: a seeded sample of ``max_cells``).
    ``elbo_gain`` / ``gain_groups``: the calibration cells' ELBO gain and batch, if any.
    ``groups``: every indexed cell's batch (index order; batches of fewer than
    ``AVERAGED_MIN_CELLS * smoothing`` cells are merged, as the query's are); ``smoothing``: over how many cells
    each score is averaged (1: none): the calibration cell and its nearest indexed cells of the
    same batch, all of them, not only the sampled ones, so a sampled calibration averages at
    the reference's density. The unaveraged scores are kept too, for queries too small to
    average (:meth:`NoveltyCalibration.unaveraged`).
    """
    cells = calibration_cells(index.n, max_cells, seed) if cells is None else np.asarray(cells, dtype=np.int64)

    def loo_scores(which: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d, i = leave_one_out_knn(index, embeddings, which, max(k, k_transfer))
        probs = label_probabilities(d[:, :k_transfer], index.neighbor_codes(i[:, :k_transfer]), len(index.categories),
                                    kernel)
        return knn_distance(d, k), np.clip(1.0 - probs.max(axis=1), 0.0, None), probs.argmax(axis=1)

    dist, unc, guess = loo_scores(cells)
    gz = None
    if elbo_gain is not None:
        gain = np.asarray(elbo_gain, dtype=np.float64)
        if len(gain) != len(cells):
            raise InputError(f"elbo_gain has {len(gain)} entries for {len(cells)} calibration cells")
        gz = robust_z(gain, gain_groups)
    predicted = np.asarray(index.categories, dtype=str)[guess]
    if smoothing <= 1:
        return NoveltyCalibration(k, k_transfer, kernel, cells, dist, unc, gz, predicted, 1)
    if groups is not None and len(groups) != index.n:
        raise InputError(f"groups has {len(groups)} entries for {index.n} indexed cells")
    # the same rule as a query's batches (signal_pvalues): a batch of fewer than AVERAGED_MIN_CELLS *
    # smoothing cells is averaged together with the other small ones, not within itself
    groups = merge_small_groups(groups, AVERAGED_MIN_CELLS * smoothing, index.n)
    near = batch_neighbours(as_matrix(embeddings, "embeddings", dtype=np.float32), groups, cells, smoothing)
    union = np.unique(near[near >= 0])
    d_u, u_u, _ = loo_scores(union)
    pos = np.where(near >= 0, np.searchsorted(union, np.maximum(near, 0)), -1)
    averaged = [_mean_of(v, pos) for v in (d_u, u_u)]
    return NoveltyCalibration(k, k_transfer, kernel, cells, averaged[0], averaged[1], gz, predicted, int(smoothing),
                              distance_unaveraged=dist, uncertainty_unaveraged=unc)


def batch_neighbours(embeddings: np.ndarray, groups: np.ndarray | None, cells: np.ndarray, m: int) -> np.ndarray:
    """Positions of the ``m`` nearest rows of the same group as each of ``cells`` (the cell itself included).

    Searched among all rows of ``embeddings``, not only ``cells``; -1 where a group has fewer
    than ``m`` rows or an approximate index missed one.
    """
    from atlasengine.config import TransferConfig

    g = np.zeros(len(embeddings), dtype=np.int64) if groups is None else np.asarray(groups)
    out = np.full((len(cells), m), -1, dtype=np.int64)
    for group in pd.unique(g[cells]):
        rows = np.flatnonzero(g == group)
        mine = np.flatnonzero(g[cells] == group)
        index = NeighborIndex.build(embeddings[rows], np.zeros(len(rows), dtype=str), TransferConfig())
        _, nearest = index.search(embeddings[cells[mine]], min(m, len(rows)))
        out[mine, : nearest.shape[1]] = np.where(nearest >= 0, rows[np.maximum(nearest, 0)], -1)
    return out


# ------------------------------------------------------------------------ the scores
def signal_pvalues(
    calibration: NoveltyCalibration,
    distances: np.ndarray,
    uncertainty: np.ndarray,
    elbo_gain: np.ndarray | None = None,
    gain_groups: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{signal: (score, conformal p-value)} for query cells.

    Where the calibration averages its scores (``smoothing`` > 1), the query's distance and
    uncertainty are averaged the same way over the query cells' ``embeddings`` within their
    ``groups`` (batches) first, and those averages are the scores returned.
    """
    if np.ndim(distances) == 2 and np.shape(distances)[1] < calibration.k:
        # a mean over fewer neighbours than the calibration's is smaller: new cells would pass as known
        raise InputError(f"distances has {np.shape(distances)[1]} neighbours per cell; this calibration scores the mean "
                         f"distance to {calibration.k}: search the index for at least k={calibration.k}")
    dist = knn_distance(distances, calibration.k)
    unc = np.asarray(uncertainty, dtype=np.float64)
    if len(unc) != len(dist):
        raise InputError(f"uncertainty has {len(unc)} entries for {len(dist)} cells")
    if calibration.smoothing > 1:
        if embeddings is None:
            raise InputError(f"this calibration averages scores over {calibration.smoothing} neighbouring cells: "
                             "pass the query cells' embeddings (and batches as groups)")
        if len(dist) < AVERAGED_MIN_CELLS * calibration.smoothing:
            raise InputError(f"{len(dist)} query cells are too few to average over {calibration.smoothing} "
                             f"(at least {AVERAGED_MIN_CELLS * calibration.smoothing}): score them with "
                             "calibration.unaveraged()")
        both = neighbourhood_mean(embeddings, np.column_stack([dist, unc]), groups, calibration.smoothing)
        dist, unc = both[:, 0], both[:, 1]  # one search, both signals
    out = {
        "distance": (dist, conformal_pvalues(calibration.distance, dist)),
        "uncertainty": (unc, conformal_pvalues(calibration.uncertainty, unc)),
    }
    if elbo_gain is not None:
        gain = np.asarray(elbo_gain, dtype=np.float64)
        if len(gain) != len(dist):
            raise InputError(f"elbo_gain has {len(gain)} entries for {len(dist)} cells")
        out["elbo_gain"] = (gain, conformal_pvalues(calibration.scores("elbo_gain"), robust_z(gain, gain_groups)))
    return out


def combine(pvalues: dict[str, np.ndarray], calibration: NoveltyCalibration,
            signals: Sequence[str] = DEFAULT_COMBINATION) -> tuple[np.ndarray, np.ndarray]:
    """(Fisher statistic of the query cells, the calibration cells' Fisher statistics)."""
    missing = [s for s in signals if s not in pvalues]
    if missing:
        raise InputError(f"cannot combine {missing}: no query scores for them")
    return fisher_statistic([pvalues[s] for s in signals]), calibration.combined(signals)


def novelty_scores(
    distances: np.ndarray,
    uncertainty: np.ndarray,
    calibration: NoveltyCalibration,
    *,
    elbo_gain: np.ndarray | None = None,
    gain_groups: np.ndarray | None = None,
    signals: Sequence[str] | None = None,
    target_rate: float = DEFAULT_TARGET,
    obs_names: Sequence[str] | None = None,
    centre_on_query: bool = False,
    predicted: Sequence[str] | None = None,
    embeddings: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> pd.DataFrame:
    """Novelty of query cells: one column per signal and its p-value, then the combination.

    ``distances``: (cells, >= calibration.k) Euclidean distances to the nearest reference
    cells, nearest first (``NeighborIndex.search``; the label transfer's k = 50 search can be
    reused, only the first ``calibration.k`` columns are read). ``uncertainty``: the transfer's ``uncertainty`` column. ``elbo_gain`` (optional,
    fold-in only): :func:`elbo_gain` of the cells, ``gain_groups`` their batches.
    ``signals``: what to combine (default distance + uncertainty). ``embeddings`` / ``groups``:
    the query cells' embeddings and batches, needed when the calibration averages its scores
    over neighbours (:func:`neighbourhood_mean`).

    Columns: ``distance``, ``distance_pvalue``, ``uncertainty``, ``uncertainty_pvalue``,
    [``elbo_gain``, ``elbo_gain_pvalue``], ``novelty`` (Fisher statistic, larger = more
    novel), ``novelty_pvalue`` (conformal against the reference cells) and ``is_novel``
    (``novelty_pvalue <= target_rate``, the same as ``novelty > attrs["novelty_threshold"]``).
    ``attrs`` keep the signals, the target, the threshold, the number of calibration cells, the
    calibration used (``"query"`` or ``"reference"``), the ``query_shift``, the ``smoothing`` and
    the share of new cells the rule finds (``novel_share``, ``novel_share_interval``:
    :func:`novel_share` of ``is_novel``).
    ``centre_on_query``: compute ``novelty_pvalue`` from the statistic minus :func:`query_shift`
    (needs ``predicted``, the query's predicted labels, and a calibration that holds its own);
    ``novelty`` itself, so the ranking, is not changed. Where too few labels hold enough cells
    the reference calibration is used and ``attrs["calibration_fallback"]`` says why.
    """
    sig = tuple(signals) if signals is not None else DEFAULT_COMBINATION
    bad = [s for s in sig if s not in SIGNALS]
    if bad or not sig:
        raise InputError(f"signals must be a non-empty subset of {SIGNALS}, got {list(sig)}")
    if len(distances) < AVERAGED_MIN_CELLS * calibration.smoothing:  # too few cells to average (or none)
        calibration = calibration.unaveraged()
    per = signal_pvalues(calibration, distances, uncertainty, elbo_gain, gain_groups, embeddings, groups)
    stat, cal = combine({k: v[1] for k, v in per.items()}, calibration, sig)
    shift, used, fallback = 0.0, "reference", None
    if centre_on_query:
        if predicted is None:
            raise InputError("centring on the query needs the query cells' predicted labels (predicted=...)")
        if len(predicted) != len(stat):
            raise InputError(f"predicted has {len(predicted)} labels for {len(stat)} cells")
        if calibration.predicted is None:
            raise InputError("this calibration holds no predicted labels (written before query centring); "
                             "recompute it with reference_calibration")
        found = query_shift(stat, predicted, cal, calibration.predicted)
        if found is None:
            fallback = (f"fewer than {MIN_LABELS} predicted labels hold {MIN_LABEL_CELLS} query and {MIN_LABEL_CELLS} "
                        "reference cells, so the reference calibration was used")
        else:
            shift, used = found, "query"
    p, unknown = calibrated_unknown(stat - shift, cal, target_rate)
    cols: dict[str, np.ndarray] = {}
    for name, (raw, pv) in per.items():
        cols[name] = raw
        cols[f"{name}_pvalue"] = pv
    cols.update(novelty=stat, novelty_pvalue=p, is_novel=unknown)
    if obs_names is not None and len(obs_names) != len(stat):
        raise InputError(f"obs_names has {len(obs_names)} entries for {len(stat)} cells")
    df = pd.DataFrame(cols, index=pd.Index(obs_names) if obs_names is not None else None)
    srt = np.sort(cal)
    rank = int(np.floor(target_rate * (len(srt) + 1)))  # novel iff fewer than `rank` calibration cells >= T
    reference_called = unknown if shift == 0.0 else conformal_pvalues(cal, stat) <= target_rate
    reference_share = float(reference_called.mean()) if len(stat) else 0.0
    share = novel_share(unknown, target_rate, effective_n=len(stat) / max(1, calibration.smoothing),
                        n_calibration=len(cal))
    df.attrs.update(novel_share=share[0], novel_share_interval=[share[1], share[2]], smoothing=calibration.smoothing)
    df.attrs.update(signals=list(sig), target_rate=float(target_rate), n_calibration=int(len(cal)), query_shift=shift,
                    calibration=used, calibration_fallback=fallback, reference_share_novel=reference_share,
                    novelty_threshold=float(srt[len(srt) - rank]) + shift if rank >= 1 else float("inf"))
    return df


def calibration_note(scores: pd.DataFrame) -> str | None:
    """Return what to tell a user when the reference threshold alone calls more than twice the target novel.

    ``scores``: a :func:`novelty_scores` table. Either many cells are types the reference lacks
    (the reference threshold is right) or the whole query is shifted from the reference (the
    query's shift should come off); the scores cannot tell which, someone who knows the sample
    can. The note says which calibration was used and how to switch. None when the reference
    threshold calls at most twice the target, or when taking the query's shift off changed the
    share called by less than half the target, either way (both calibrations agree: nothing to choose).
    """
    target = float(scores.attrs["target_rate"])
    ref_share = float(scores.attrs["reference_share_novel"])
    if ref_share <= 2 * target:
        return None
    share = float(scores["is_novel"].mean())
    if scores.attrs.get("calibration") == "query" and abs(ref_share - share) < target / 2:
        return None
    if scores.attrs.get("calibration") == "query":
        return (f"{ref_share:.0%} of the query's cells are novel against the reference alone; taking the query's shift "
                f"off (its median difference, within the quartiles of its labels' differences) leaves {share:.0%} at "
                f"the {target:.0%} target. If much of the query may be types the reference lacks, spread over many "
                "labels, calibrating against the reference alone keeps them: label the cells again with "
                "transfer_labels(..., config={'novelty_calibration': 'reference'}) or atlasengine transfer "
                "--novelty-calibration reference")
    why = f" ({scores.attrs['calibration_fallback']})" if scores.attrs.get("calibration_fallback") else ""
    return (f"{share:.0%} of the query's cells are novel at a {target:.0%} false-alarm target against the reference"
            f"{why}: either that many are types the reference lacks, or the whole query is shifted from the reference "
            "(a stimulation, another chemistry)" + ("" if why else "; for a shifted query, novelty_calibration='query' "
                                                    "(atlasengine transfer --novelty-calibration query) takes the shift off"))
