"""Scores and figures of a label transfer on a small hand-made prediction table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atlasengine.errors import InputError
from atlasengine.transfer import evaluate_transfer, plot_transfer


def _predictions() -> tuple[pd.DataFrame, list[str]]:
    # 4 known cells (A, A, B, B) and 2 novel cells (N) in a reference with labels A, B.
    pred = pd.DataFrame(
        {
            "label": ["A", "Unknown", "A", "B", "Unknown", "A"],
            "predicted_label": ["A", "A", "A", "B", "B", "A"],
            "uncertainty": [0.1, 0.5, 0.2, 0.0, 0.6, 0.25],
            "is_unknown": [False, True, False, False, True, False],
            "p_A": [0.9, 0.5, 0.8, 0.0, 0.4, 0.75],
            "p_B": [0.1, 0.5, 0.2, 1.0, 0.6, 0.25],
        },
        index=[f"c{i}" for i in range(6)],
    )
    pred.attrs["uncertainty_threshold"] = 0.3
    return pred, ["A", "A", "B", "B", "N", "N"]


def test_evaluate_transfer_known_answers() -> None:
    pred, truth = _predictions()
    m = evaluate_transfer(pred, truth, {"N"})
    assert (m["n_known"], m["n_novel"]) == (4, 2)
    # novel uncertainties {0.6, 0.25} vs known {0.1, 0.5, 0.2, 0.0}: 7 of 8 pairs ordered
    assert m["auroc_novel"] == pytest.approx(7 / 8)
    assert m["novel_unknown_share"] == pytest.approx(1 / 2)
    assert m["known_accuracy"] == pytest.approx(3 / 4)  # predicted_label: A A A B vs A A B B
    assert m["known_accuracy_called"] == pytest.approx(2 / 4)  # the Unknown call counts as wrong
    assert m["known_false_unknown"] == pytest.approx(1 / 4)


def test_evaluate_transfer_edge_cases() -> None:
    pred, truth = _predictions()
    m = evaluate_transfer(pred, truth, set())
    assert math.isnan(m["auroc_novel"]) and math.isnan(m["novel_unknown_share"])
    assert m["n_novel"] == 0 and m["known_false_unknown"] == pytest.approx(2 / 6)
    # a Series is aligned on the index, not taken in order
    shuffled = pd.Series(truth, index=pred.index)[::-1]
    assert evaluate_transfer(pred, shuffled, {"N"}) == evaluate_transfer(pred, truth, {"N"})
    # one new type given as a string is that type, not the set of its letters
    named = ["New type" if t == "N" else t for t in truth]
    assert evaluate_transfer(pred, named, "New type") == evaluate_transfer(pred, truth, {"N"})
    with pytest.raises(InputError):
        evaluate_transfer(pred, truth[:-1], {"N"})
    with pytest.raises(InputError):
        evaluate_transfer(pred.drop(columns="uncertainty"), truth, {"N"})


def test_plot_transfer_writes_pngs(tmp_path: Path) -> None:
    pred, truth = _predictions()
    paths = plot_transfer(pred, truth, tmp_path / "figs", novel_labels={"N"})
    assert set(paths) == {"uncertainty_violin", "assignment_heatmap"}
    pred["novelty_pvalue"] = [0.5, 0.01, 0.3, 0.8, 0.002, 0.2]
    paths = plot_transfer(pred, truth, tmp_path / "figs", novel_labels={"N"})
    assert set(paths) == {"uncertainty_violin", "novelty_violin", "assignment_heatmap"}
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_novelty_figure_and_the_reports_violins_draw_the_cut_that_called_unknown(tmp_path: Path, monkeypatch):
    import atlasengine.transfer.plots as plots
    from atlasengine.drift.plots import distributions_figure

    pred, truth = _predictions()
    pred["novelty_pvalue"] = [0.5, 0.01, 0.3, 0.8, 0.002, 0.2]
    pred["novelty"] = -2 * np.log(pred["novelty_pvalue"].to_numpy())
    pred.attrs.update(novelty_target=0.01, unknown_rule="novelty")
    drawn = []
    real = plots.plot_novelty_violin
    monkeypatch.setattr(plots, "plot_novelty_violin", lambda *a: drawn.append(a[3]) or real(*a))
    plots.plot_transfer(pred, truth, tmp_path / "figs")
    assert drawn == [0.01]  # the atlas's target, not 5%
    fig = distributions_figure(pred, None, 0.3, 9.2)
    styles = {(shape.y0, shape.line.dash) for shape in fig.layout.shapes}
    assert styles == {(0.3, "dot"), (9.2, "dash")} and "novelty cut-off that called Unknown" in fig.layout.title.text
