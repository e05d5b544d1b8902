"""Scores of a label transfer against the query's true labels."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from atlasengine.errors import InputError

_REQUIRED = ("label", "predicted_label", "uncertainty", "is_unknown")


def aligned_truth(predictions: pd.DataFrame, true_labels: Iterable[str] | pd.Series) -> np.ndarray:
    """Return the true labels as a str array in the row order of ``predictions``.

    A Series is aligned on the predictions' index; anything else is taken in row order.
    """
    missing = [c for c in _REQUIRED if c not in predictions.columns]
    if missing:
        raise InputError(f"predictions lack columns {missing}; pass the output of transfer_labels")
    if isinstance(true_labels, pd.Series) and not true_labels.index.equals(predictions.index):
        if not predictions.index.isin(true_labels.index).all():
            raise InputError("true_labels (a Series) does not cover every predicted cell")
        true_labels = true_labels.loc[predictions.index]
    truth = np.asarray(list(true_labels), dtype=object)
    if truth.ndim != 1 or len(truth) != len(predictions):
        raise InputError(f"true_labels has {truth.size} entries for {len(predictions)} predictions")
    if pd.isna(truth).any():
        raise InputError("true_labels contain missing values")
    return truth.astype(str)


def label_set(labels: str | Iterable[str] | None) -> set[str]:
    """Return ``labels`` as a set of str; one label given as a string is that one label, not its letters.

    >>> sorted(label_set("ductal")), sorted(label_set(["NK", "Mono_CD16"])), label_set(None)
    (['ductal'], ['Mono_CD16', 'NK'], set())
    """
    if labels is None:
        return set()
    if isinstance(labels, str):
        return {labels}
    return set(map(str, labels))


def detection_scores(novel: np.ndarray, score: np.ndarray, called: np.ndarray | None = None) -> dict[str, float]:
    """How well ``score`` (higher: more likely new) and the ``called`` cells pick out the ``novel`` ones.

    ``auroc``: AUROC of ``score`` with the novel cells as positives (NaN when either group is
    empty); with ``called``, ``known_called`` and ``novel_caught``: the shares of known and of
    novel cells called.

    >>> detection_scores(np.array([False, False, True]), np.array([0.1, 0.4, 0.9]), np.array([False, True, True]))
    {'auroc': 1.0, 'known_called': 0.5, 'novel_caught': 1.0}
    """
    novel = np.asarray(novel, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    if score.shape != novel.shape:
        raise InputError(f"score has {score.size} entries for {novel.size} cells")
    out = {"auroc": float(roc_auc_score(novel, score)) if novel.any() and (~novel).any() else float("nan")}
    if called is not None:
        called = np.asarray(called, dtype=bool)
        out["known_called"] = float(called[~novel].mean()) if (~novel).any() else float("nan")
        out["novel_caught"] = float(called[novel].mean()) if novel.any() else float("nan")
    return out


def evaluate_transfer(
    predictions: pd.DataFrame, true_labels: Iterable[str] | pd.Series, novel_labels: str | Iterable[str]
) -> dict[str, float | int]:
    """Score Unknown detection and accuracy; ``novel_labels`` are query types absent from the reference.

    - ``auroc_novel``: AUROC of ``uncertainty`` separating novel (positive) from known cells
      (NaN when either group is empty).
    - ``novel_unknown_share``: share of novel cells called Unknown.
    - ``known_accuracy``: share of known cells whose ``predicted_label`` (the best reference
      label, given even when the cell is called Unknown) equals the truth; Unknown calls are
      NOT counted as wrong here.
    - ``known_accuracy_called``: share of known cells whose ``label`` equals the truth, so an
      Unknown call counts as wrong.
    - ``known_false_unknown``: share of known cells called Unknown.
    - ``n_known``, ``n_novel``: cell counts. Shares over an empty group are NaN.
    """
    truth = aligned_truth(predictions, true_labels)
    novel = np.isin(truth, np.asarray(sorted(label_set(novel_labels)), dtype=str))
    known = ~novel
    unc = predictions["uncertainty"].to_numpy(dtype=np.float64)
    unknown = predictions["is_unknown"].to_numpy(dtype=bool)
    predicted = predictions["predicted_label"].to_numpy().astype(str)
    called = predictions["label"].to_numpy().astype(str)

    detection = detection_scores(novel, unc, unknown)
    return {
        "auroc_novel": detection["auroc"],
        "novel_unknown_share": detection["novel_caught"],
        "known_accuracy": float((predicted == truth)[known].mean()) if known.any() else float("nan"),
        "known_accuracy_called": float((called == truth)[known].mean()) if known.any() else float("nan"),
        "known_false_unknown": detection["known_called"],
        "n_known": int(known.sum()),
        "n_novel": int(novel.sum()),
    }
