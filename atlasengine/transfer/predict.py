"""Label predictions as the atlas gives them: weighted-kNN labels plus the calibrated novelty.

Example
-------
>>> import numpy as np
>>> from atlasengine.config import TransferConfig
>>> rng = np.random.default_rng(0)
>>> ref = rng.normal(size=(200, 4)).astype(np.float32)
>>> cfg = TransferConfig(k=15)
>>> index = NeighborIndex.build(ref, np.array(["a", "b"] * 100), cfg)
>>> calibration = calibrate(index, ref, cfg)
>>> preds = predict(index, calibration, ref[:5] + 0.01, cfg, [f"c{i}" for i in range(5)])
>>> list(preds.columns[:4]), len(preds)
(['label', 'predicted_label', 'uncertainty', 'is_unknown'], 5)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from atlasengine.config import TransferConfig
from atlasengine.errors import InputError
from atlasengine.transfer.index import NeighborIndex
from atlasengine.transfer.knn import UNKNOWN, label_probabilities, prediction_table
from atlasengine.transfer.novelty import (
    NoveltyCalibration,
    calibration_note,
    cut_cells_needed,
    novelty_scores,
    reference_calibration,
)

log = logging.getLogger("atlasengine")

CALIBRATION_MAX_CELLS = 5000


INDEX_SETTINGS = ("index", "approximate_above", "hnsw_m", "hnsw_ef_search", "ivf_nlist", "ivf_nprobe")
"""Transfer settings the version's stored neighbour index was built with."""


def refuse_index_changes(stored: TransferConfig, asked: TransferConfig) -> None:
    """Refuse a change of the neighbour index's settings where the stored index is searched.

    A version's index is built once, with the atlas's settings: a call asking for another
    (``index="exact"`` to check an approximate one) would otherwise get the stored index's
    answer under the name of the one it asked for.
    """
    changed = [f"{k}={getattr(asked, k)!r} (the index has {getattr(stored, k)!r})" for k in INDEX_SETTINGS
               if getattr(asked, k) != getattr(stored, k)]
    if changed:
        raise InputError("the version's neighbour index was built with the atlas's settings and is searched as "
                         f"stored; these cannot change per call: {', '.join(changed)}")


def labelled_cells_needed(config: TransferConfig, cut: bool = True) -> int:
    """Return the fewest labelled cells label transfer works with under ``config``.

    ``novelty_k + 1`` (each cell's novelty is its distance to its ``novelty_k`` nearest other
    labelled cells) and, with ``cut`` under the novelty rule, ``ceil(1 / novelty_target) - 1``:
    the conformal cut at the target needs ``target * (cells + 1) >= 1``, or nothing could ever be
    called novel.

    >>> labelled_cells_needed(TransferConfig()), labelled_cells_needed(TransferConfig(), cut=False)
    (19, 11)
    """
    need = config.novelty_k + 1
    if cut and config.unknown_rule == "novelty":
        need = max(need, cut_cells_needed(config.novelty_target))
    return need


def check_labelled_cells(n_labelled: int, config: TransferConfig, cut: bool = True) -> None:
    """Refuse fewer labelled cells than label transfer needs (:func:`labelled_cells_needed`).

    Each labelled cell is scored against its ``novelty_k`` nearest other labelled cells, each
    left out, and (``cut``, at create) the cut at ``novelty_target`` is a rank among them. An
    atlas made before the cut was checked keeps working (``cut=False`` when it calibrates); its
    predictions then warn that nothing can be called novel.
    """
    need = labelled_cells_needed(config, cut)
    if n_labelled < need:
        why = (f"each cell's novelty is its mean distance to its {config.novelty_k} nearest labelled cells "
               "(transfer.novelty_k), calibrated on the labelled cells themselves, each left out")
        fix = "Label more cells (label_key), or set a smaller transfer.novelty_k"
        if need > config.novelty_k + 1:
            why += (f", and the cut that calls {config.novelty_target:.0%} of known cells novel "
                    f"(transfer.novelty_target) is a rank among {need} of them or more")
            fix += " or a larger transfer.novelty_target"
        raise InputError(f"the reference has {n_labelled} labelled cell(s); label transfer needs at least {need}: "
                         f"{why}. {fix}")


def calibrate(index: NeighborIndex, labelled_latent: np.ndarray, config: TransferConfig,
              batches: np.ndarray | None = None) -> NoveltyCalibration:
    """Leave-one-out novelty calibration of the indexed cells for ``config``'s k, kernel and novelty settings.

    ``labelled_latent``: the indexed (labelled) cells' embeddings, in index order; ``batches``
    their batches (scores are averaged within a batch; None = one batch). At most 5,000 cells
    calibrate (a seeded sample).
    """
    check_labelled_cells(index.n, config, cut=False)
    return reference_calibration(index, labelled_latent, k=config.novelty_k, k_transfer=config.k, kernel=config.kernel,
                                 max_cells=CALIBRATION_MAX_CELLS, seed=0, groups=batches,
                                 smoothing=config.novelty_smoothing)


def matches(calibration: NoveltyCalibration, config: TransferConfig) -> bool:
    """Whether ``calibration`` was made for ``config``'s neighbours, kernel and averaging."""
    return ((calibration.k_transfer, calibration.kernel, calibration.k, calibration.smoothing)
            == (config.k, config.kernel, config.novelty_k, config.novelty_smoothing))


def predict(
    index: NeighborIndex,
    calibration: NoveltyCalibration,
    latent: np.ndarray,
    config: TransferConfig,
    obs_names: Sequence[str],
    batches: np.ndarray | None = None,
) -> pd.DataFrame:
    """Weighted-kNN labels plus the calibrated novelty score (distance + uncertainty).

    With ``config.unknown_rule == "novelty"`` a cell is Unknown when its novelty is above the
    threshold calibrated on reference cells for ``config.novelty_target`` false alarms, after
    the query's shift is taken off (``config.novelty_calibration == "query"``, the default);
    otherwise the paper's rule (uncertainty above ``uncertainty_threshold``) decides.

    Parameters
    ----------
    index
        The version's neighbour index over labelled atlas cells.
    calibration
        Reference novelty scores made for ``config`` (see :func:`calibrate`).
    latent
        Embeddings of the cells to label.
    config
        Neighbours, kernel, cut-offs and the Unknown rule.
    obs_names
        Cell names (the table's index).
    batches
        The cells' batches: novelty signals are averaged over neighbouring cells of the same
        batch (``config.novelty_smoothing``); None = all one batch.

    Returns
    -------
    pandas.DataFrame
        ``label``, ``predicted_label``, ``uncertainty``, ``is_unknown``, one ``p_<label>`` per
        reference label, ``nearest_type`` (label of the nearest reference cell), ``novelty``,
        ``novelty_pvalue``, ``is_novel``; the rule, the novelty threshold and the estimated
        share of new cells with its interval (``novel_share``, ``novel_share_interval``) in
        ``attrs``.
    """
    distances, neighbors = index.search(latent, max(calibration.k, config.k))
    probs = label_probabilities(
        distances[:, : config.k], index.neighbor_codes(neighbors[:, : config.k]), len(index.categories), config.kernel
    )
    preds = prediction_table(probs, index.categories, config, obs_names)
    nov = novelty_scores(distances, preds["uncertainty"].to_numpy(), calibration, target_rate=config.novelty_target,
                         obs_names=obs_names, centre_on_query=config.novelty_calibration == "query",
                         predicted=preds["predicted_label"].astype(str).to_numpy(), embeddings=latent,
                         groups=batches)
    nearest = index.neighbor_codes(neighbors[:, :1])[:, 0]
    preds["nearest_type"] = np.where(nearest >= 0, np.asarray(index.categories, dtype=object)[np.maximum(nearest, 0)],
                                     None)
    for col in ("novelty", "novelty_pvalue", "is_novel"):
        preds[col] = nov[col].to_numpy()
    preds.attrs.update(unknown_rule=config.unknown_rule, novelty_target=config.novelty_target,
                       novelty_threshold=nov.attrs["novelty_threshold"], novel_share=nov.attrs["novel_share"],
                       novel_share_interval=nov.attrs["novel_share_interval"],
                       novelty_calibration=nov.attrs["calibration"], novelty_query_shift=nov.attrs["query_shift"])
    if config.unknown_rule == "novelty":
        note = calibration_note(nov)
        if not np.isfinite(nov.attrs["novelty_threshold"]):  # too few calibration cells for a rank at the target
            note = (f"with {calibration.n} labelled reference cells the cut at novelty_target {config.novelty_target:g} "
                    f"is infinite, so no cell can be called novel (it needs at least "
                    f"{cut_cells_needed(config.novelty_target)}): label more cells or raise the target"
                    + (f"; {note}" if note else ""))
        if note:
            log.warning(note)
            preds.attrs["novelty_note"] = note
        preds["is_unknown"] = preds["is_novel"]
        preds["label"] = preds["predicted_label"].where(~preds["is_unknown"], UNKNOWN)
    return preds
