"""The HTML audit report: one self-contained file that opens on a summary with a status per check."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atlasengine.config import DriftConfig
from atlasengine.drift import (
    DriftStore,
    QueryView,
    compute_initial_drift,
    compute_version_drift,
    flags,
    render_report,
    umap_coordinates,
    unknown_groups,
    version_checks,
)
from atlasengine.drift.summary import mixing_of_first_batches


def _history(tmp_path: Path) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Three stored versions (steady, then scrambled) and a 2-d frame of the last embedding."""
    rng = np.random.default_rng(0)
    n = 150
    x = rng.normal(size=(n, 5)) + np.repeat(np.eye(5)[:3] * 8, 50, axis=0)
    obs = pd.DataFrame(
        {"batch": np.tile(["b1", "b2", "b3"], 50), "label": np.repeat(["alpha", "beta", "<gamma>"], 50),
         "version_added": 1},
        index=[f"c{i}" for i in range(n)],
    )
    cfg = DriftConfig(k=10, max_cells=100)
    store = DriftStore()
    embeddings = [x, x + 0.05 * rng.normal(size=x.shape), x[rng.permutation(n)]]
    for v in (1, 2, 3):
        t = (compute_initial_drift(1, x, obs, cfg) if v == 1
             else compute_version_drift(v, embeddings[v - 2], x, embeddings[v - 1], obs, cfg))
        ts = pd.DataFrame({"dataset": [f"q{v}"], "query_cell_type": ["alpha"], "assigned_label": ["alpha"],
                           "n_cells": [10], "share": [1.0]})
        store.write_version({"version": v, "strategy": "ewc", "datasets": [f"q{v}"], "n_cells": n}, t,
                            flags(t, cfg), ts)
    coords, method = umap_coordinates(embeddings[-1], seed=0, return_method=True)
    umap = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "cell": obs.index.to_numpy(),
                         "version_added": obs["version_added"].to_numpy(),
                         "batch": obs["batch"].to_numpy(), "label": obs["label"].to_numpy(),
                         "displacement": np.r_[np.nan, rng.random(n - 1)]})
    umap.attrs["method"] = method
    return store.report_tables(3), umap


def _query(version: int) -> QueryView:
    """A transfer of 60 cells: 20 of a type the reference lacks, called Unknown and nearest to 'beta'."""
    cells = [f"q{version}_{i}" for i in range(60)]
    unknown = np.r_[np.zeros(40, bool), np.ones(20, bool)]
    preds = pd.DataFrame({"label": np.where(unknown, "Unknown", "alpha"), "predicted_label": ["alpha"] * 40 + ["beta"] * 20,
                          "uncertainty": np.r_[np.full(40, 0.1), np.full(20, 0.6)], "is_unknown": unknown,
                          "novelty": np.r_[np.full(40, 1.0), np.full(20, 9.0)], "is_novel": unknown}, index=cells)
    preds.attrs.update(uncertainty_threshold=0.3, unknown_rule="uncertainty", novelty_threshold=5.0)
    annotation = pd.Series(["alpha"] * 40 + ["<delta>"] * 20, index=cells)
    return QueryView(version, f"q{version}", preds, annotation)


def test_report_opens_on_a_summary_and_is_self_contained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "umap", None)  # PCA keeps this test fast
    tables, umap = _history(tmp_path)
    assert not tables["drift_flags"].empty
    report = render_report(tmp_path / "out" / "report.html", tables, umap, [_query(2), _query(3)], "Drift <audit>",
                           config=DriftConfig(), atlas_name="a&b", n_cells=10_000)
    out = report.path
    assert out.exists() and list(out.parent.iterdir()) == [out]
    text = out.read_text(encoding="utf-8")
    # one Plotly bundle, inlined; no MathJax; nothing the page would fetch
    assert text.count("<script") == 1 + text.count("Plotly.newPlot") and text.count("Plotly.newPlot") == 5
    assert "mathjax" not in text.lower().split("</head>")[1] and "cdn.plot.ly/plotly" not in text
    assert not re.search(r"<(script|link|img)[^>]+(src|href)\s*=", text, flags=re.I)
    assert "default-src 'none'" in text and "<img" not in text
    # the summary comes first: the version, the checks against their thresholds, the query's headline
    summary = text.index('id="summary"')
    assert summary < text.index('id="fig-embedding"') < text.index('id="versions"')
    assert "version <b>3</b> (versions 1 to 3 shown)" in text and "added <b>q3</b>" in text
    assert report.version == 3 and [c.measure for c in report.checks] == [
        "displacement_mean_aligned", "knn_preservation_mean", "label_accuracy_drop", "ilisi_norm_drop"]
    assert report.status == "red" and report.checks[0].status == "red"  # version 3 is scrambled
    for c in report.checks:
        assert f'data-check="{c.measure}" data-status="{c.status}"' in text
    assert "red above 0.5" in text and "red below 0.5" in text
    assert "33.3%" in text and "20</b> cells nearest to <b>beta</b>" in text and "&lt;delta&gt; (100%)" in text
    assert any("33.3% called Unknown" in line for line in report.headline)
    assert any(line.startswith("Reference drift is red: mean aligned displacement") for line in report.headline)
    # names are plain text: escaped in the page and for Plotly's pseudo-HTML
    assert "Drift &lt;audit&gt;" in text and "a&amp;b" in text and "<gamma>" not in text
    assert "&lt;gamma&gt;" in text and "<delta>" not in text
    # subsampling said, tables rounded and collapsed, flagged rows first, settings as key-value lists
    assert "150 of 10,000 cells are drawn (a random sample" in text
    assert "<details><summary>Per cell type table (" in text and 'class="flag"' in text
    assert re.search(r"<td>\d\.\d{3}</td>", text) and not re.search(r"<td>\d\.\d{5,}", text)
    cell_table = text[text.index("Per cell type table"):]
    assert cell_table.index('class="flag"') < cell_table.index("<tr>", cell_table.index("<tbody>"))
    body = text.split("</head>")[1]
    assert "&quot;" not in body and ">None<" not in body  # no raw JSON, no None
    for q in ("query-v2", "query-v3"):
        assert f'id="{q}"' in text and f'id="fig-{q}-distributions"' in text


def test_report_without_optional_parts(tmp_path: Path) -> None:
    report = render_report(tmp_path / "empty.html", {}, None, None, "Nothing yet")
    text = report.path.read_text(encoding="utf-8")
    assert "No drift rows for this version" in text and "Plotly.newPlot" not in text
    assert report.checks == [] and report.status == "grey"


def test_checks_compare_the_tables_numbers_with_the_thresholds() -> None:
    vd = pd.DataFrame({"version": [1, 2, 2], "scope": ["vs_first", "vs_previous", "vs_first"],
                       "displacement_mean_aligned": [0.0, 0.2, 0.45], "knn_preservation_mean": [1.0, 0.9, 0.4],
                       "label_accuracy_current": [0.9, 0.9, 0.9], "label_accuracy_compared": [0.9, 0.91, 0.92],
                       "ilisi_norm_mean": [0.5, 0.35, 0.35]})
    fl = pd.DataFrame({"version": [2], "scope": ["vs_first"], "cell_type": ["beta"],
                       "measure": ["label_accuracy_drop"], "value": [0.2], "threshold": [0.05]})
    checks = {c.measure: c for c in version_checks(vd, fl, DriftConfig(), 2)}
    assert checks["displacement_mean_aligned"].status == "amber"  # 0.45 is within 20% of 0.5
    assert checks["displacement_mean_aligned"].value == 0.45
    assert checks["knn_preservation_mean"].status == "red" and checks["knn_preservation_mean"].value == 0.4
    assert checks["label_accuracy_drop"].status == "amber" and "beta" in checks["label_accuracy_drop"].note
    assert checks["label_accuracy_drop"].value == pytest.approx(0.02)
    assert checks["ilisi_norm_drop"].status == "red" and checks["ilisi_norm_drop"].value == pytest.approx(0.15)
    assert {c.status for c in version_checks(vd, None, DriftConfig(), 1)} == {"green"}
    one_batch = vd.assign(ilisi_norm_mean=np.nan)
    assert {c.measure: c for c in version_checks(one_batch, None, DriftConfig(), 2)}["ilisi_norm_drop"].status == "grey"
    assert version_checks(vd, None, DriftConfig(), 5) == []


def test_batch_mixing_is_judged_on_the_cells_of_version_1s_batches() -> None:
    # version 3's rows cover version 2's query batch q too: it mixes little (raw iLISI 1.0) and
    # pulls the whole version's normalised iLISI down (0.5 -> 0.3), while the cells of a and b
    # mix as well as before; version 4's a and b mix less
    vd = pd.DataFrame({"version": [1, 3, 3, 4, 4], "scope": ["vs_first"] + ["vs_previous", "vs_first"] * 2,
                       "displacement_mean_aligned": [0.0, 0.0, 0.1, 0.0, 0.1], "knn_preservation_mean": 1.0,
                       "label_accuracy_current": 0.9, "label_accuracy_compared": 0.9,
                       "ilisi_norm_mean": [0.5, 0.3, 0.3, 0.3, 0.3]})
    bd = pd.DataFrame({"version": [1, 1, 3, 3, 3, 4, 4, 4], "batch": ["a", "b", "a", "b", "q", "a", "b", "q"],
                       "n_cells_knn": [100, 300, 150, 450, 200, 150, 450, 200],
                       "ilisi_mean": [1.6, 1.4667, 1.7, 1.5, 1.0, 1.3, 1.3, 1.0]})
    assert mixing_of_first_batches(bd, 3) == pytest.approx((0.5, 0.55), abs=1e-4)
    v3 = {c.measure: c for c in version_checks(vd, None, DriftConfig(), 3, bd)}["ilisi_norm_drop"]
    assert v3.status == "green" and v3.value == pytest.approx(-0.05, abs=1e-4)
    assert {c.measure: c for c in version_checks(vd, None, DriftConfig(), 3)}["ilisi_norm_drop"].status == "red"
    v4 = {c.measure: c for c in version_checks(vd, None, DriftConfig(), 4, bd)}["ilisi_norm_drop"]
    assert v4.status == "red" and v4.value == pytest.approx(0.2, abs=1e-4)
    one_batch = bd[bd["batch"] != "b"]
    assert np.isnan(mixing_of_first_batches(one_batch, 3)[1])
    # a third batch of version 1 that the kNN sample missed (no sampled cell, iLISI NaN) is left
    # out of the mean, not turned into NaN and the whole version's figure
    tiny = pd.DataFrame({"version": [1, 3, 4], "batch": "tiny", "n_cells_knn": 0, "ilisi_mean": np.nan})
    base, now = mixing_of_first_batches(pd.concat([bd, tiny], ignore_index=True), 3)
    assert (base, now) == pytest.approx((0.5 * 1 / 2, 0.55 * 1 / 2), abs=1e-4)  # normalised by 3 batches


def test_two_first_batches_that_separate_read_red_even_when_a_later_batch_mixes_with_both() -> None:
    # version 1: batches a and b evenly mixed. Version 3: a and b in two far clusters, and version
    # 2's batch c split over both. Counting every batch's cells as neighbours, a's cells still see
    # two batches (a and c), so the old figure hid the separation; among version 1's cells only
    # each sees its own batch.
    rng = np.random.default_rng(0)
    cfg = DriftConfig(k=15, max_cells=1000)
    x1 = rng.normal(size=(200, 4))
    obs1 = pd.DataFrame({"batch": np.tile(["a", "b"], 100), "version_added": 1}, index=[f"c{i}" for i in range(200)])
    obs3 = pd.concat([obs1, pd.DataFrame({"batch": "c", "version_added": 2}, index=[f"q{i}" for i in range(200)])])
    far = np.r_[np.zeros(4), 50 * np.ones(4)].reshape(2, 4)
    x3 = np.r_[rng.normal(size=(200, 4)) + far[np.tile([0, 1], 100)],
               rng.normal(size=(200, 4)) + far[np.repeat([0, 1], 100)]]
    base = rng.normal(size=(400, 4))
    t1 = compute_initial_drift(1, x1, obs1, cfg)
    t3 = compute_version_drift(3, base, base, x3, obs3, cfg)
    bd = pd.concat([t1.batch_drift, t3.batch_drift], ignore_index=True)
    vd = pd.concat([t1.version_drift, t3.version_drift], ignore_index=True)
    first = t1.batch_drift.set_index("batch")
    np.testing.assert_allclose(first["ilisi_first_version_mean"], first["ilisi_mean"])  # the same at version 1
    now = t3.batch_drift.set_index("batch")
    assert now.loc[["a", "b"], "ilisi_mean"].min() > 1.8  # a and c, b and c: looks mixed
    assert now.loc[["a", "b"], "ilisi_first_version_mean"].max() == pytest.approx(1.0)
    assert np.isnan(now.loc["c", "ilisi_first_version_mean"])
    before, after = mixing_of_first_batches(bd, 3)
    assert before > 0.8 and after == pytest.approx(0.0)
    check = {c.measure: c for c in version_checks(vd, None, DriftConfig(), 3, bd)}["ilisi_norm_drop"]
    assert check.status == "red" and check.value > 0.8
    # the figure of the format-8 tables (every batch's cells as neighbours) read it as mixed, and
    # the check's note says which figure it read
    old = mixing_of_first_batches(bd.drop(columns="ilisi_first_version_mean"), 3)
    assert old[1] > 0.8
    for rows in (bd.drop(columns="ilisi_first_version_mean"), bd.assign(ilisi_first_version_mean=np.nan)):
        check = {c.measure: c for c in version_checks(vd, None, DriftConfig(), 3, rows)}["ilisi_norm_drop"]
        assert check.status == "green" and "every batch's cells counted as neighbours" in check.note
        assert "among themselves" not in check.note
    from atlasengine.drift.plots import drift_figure

    trace = [t for t in drift_figure(vd, bd, DriftConfig()).data if "among themselves" in t.name]
    assert len(trace) == 1 and list(trace[0].x) == [1, 3] and trace[0].y[1] == pytest.approx(0.0)


def test_unknown_groups_by_nearest_label() -> None:
    q = _query(2)
    coords = pd.DataFrame({"x": np.arange(60.0), "y": np.ones(60)}, index=q.predictions.index)
    groups = unknown_groups(q.predictions, q.annotation, coords.iloc[::2])
    assert groups["nearest_label"].tolist() == ["beta"] and groups["n_cells"].tolist() == [20]
    assert groups.loc[0, "annotated_as"] == "<delta> (100%)" and groups.loc[0, "x"] == 49.0
    assert groups.loc[0, "uncertainty_median"] == 0.6 and groups.loc[0, "share"] == 1.0
    assert unknown_groups(q.predictions.assign(is_unknown=False)).empty


def test_projection_falls_back_to_pca(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "umap", None)  # makes `import umap` raise ImportError
    x = np.random.default_rng(1).normal(size=(60, 6)) * np.arange(1, 7)
    coords, method = umap_coordinates(x, seed=0, return_method=True)
    assert method == "PCA" and coords.shape == (60, 2)
    assert np.abs(coords[:, 0]).std() > np.abs(coords[:, 1]).std()  # first axis carries most variance
    assert umap_coordinates(x[:, :1], seed=0).shape == (60, 2)



class _FakeUMAP:
    """Stands in for umap.UMAP: a real fit still costs seconds of numba compilation."""

    def __init__(self, n_components: int, n_neighbors: int, random_state: int, precomputed_knn=None) -> None:
        self.args = (n_components, n_neighbors, random_state)
        self.knn = precomputed_knn

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        # the engine hands UMAP its own exact neighbours (faiss), each cell first, nearest first
        idx, dist, _ = self.knn
        n, k = idx.shape
        assert k == self.args[1] and (idx[:, 0] == np.arange(n)).all() and (dist[:, 0] == 0).all()
        assert (np.diff(dist, axis=1) >= 0).all()
        exact = np.sort(np.linalg.norm(x[:, None] - x[None], axis=2), axis=1)[:, :k]
        np.testing.assert_allclose(dist, exact, rtol=1e-4, atol=1e-5)
        return x[:, :2] * 2.0


def test_umap_used_when_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=_FakeUMAP))
    x = np.random.default_rng(2).normal(size=(80, 6)).astype(np.float32)
    coords, method = umap_coordinates(x, seed=0, return_method=True)
    assert method == "UMAP" and coords.shape == (80, 2)
    np.testing.assert_allclose(coords, x[:, :2] * 2.0)
    assert umap_coordinates(x[:10], seed=0, return_method=True)[1] == "PCA"  # too few cells for UMAP
