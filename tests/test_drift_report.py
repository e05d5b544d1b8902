"""The HTML audit report is one self-contained file."""

from __future__ import annotations

import base64
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
    compute_initial_drift,
    compute_version_drift,
    flags,
    render_report,
    umap_coordinates,
)

# a 1x1 PNG, standing in for a label-transfer figure made elsewhere
TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


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
    umap = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "version_added": obs["version_added"].to_numpy(),
                         "batch": obs["batch"].to_numpy(), "label": obs["label"].to_numpy(),
                         "displacement": np.r_[np.nan, rng.random(n - 1)]})
    umap.attrs["method"] = method
    return store.report_tables(3), umap


def test_report_is_self_contained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "umap", None)  # PCA keeps this test fast
    tables, umap = _history(tmp_path)
    assert not tables["drift_flags"].empty
    out = render_report(tmp_path / "out" / "report.html", tables, umap, {"query q2": TINY_PNG}, "Drift <audit>")
    assert out.exists() and list(out.parent.iterdir()) == [out]
    text = out.read_text(encoding="utf-8")
    assert text.count('<img src="data:image/png;base64,') >= 10  # 4 lines, heatmap, 4 embeddings, 1 transfer
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text, flags=re.I)
    assert not re.search(r"https?://|url\(|@import|<script|<link", text, flags=re.I)
    assert "Drift &lt;audit&gt;" in text and "&lt;gamma&gt;" in text and "<gamma>" not in text
    assert 'class="flag"' in text and "threshold" in text
    assert "query q2" in text and "<h2>Embedding (PCA)</h2>" in text and 'alt="PCA coloured by label"' in text


def test_report_without_optional_parts(tmp_path: Path) -> None:
    out = render_report(tmp_path / "empty.html", {}, None, None, "Nothing yet")
    text = out.read_text(encoding="utf-8")
    assert "No version crossed a flag threshold" in text and "<img" not in text


def test_projection_falls_back_to_pca(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "umap", None)  # makes `import umap` raise ImportError
    x = np.random.default_rng(1).normal(size=(60, 6)) * np.arange(1, 7)
    coords, method = umap_coordinates(x, seed=0, return_method=True)
    assert method == "PCA" and coords.shape == (60, 2)
    assert np.abs(coords[:, 0]).std() > np.abs(coords[:, 1]).std()  # first axis carries most variance
    assert umap_coordinates(x[:, :1], seed=0).shape == (60, 2)



class _FakeUMAP:
    """Stands in for umap.UMAP: a real fit costs ~15 s of numba compilation."""

    def __init__(self, n_components: int, n_neighbors: int, random_state: int) -> None:
        self.args = (n_components, n_neighbors, random_state)

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        return x[:, :2] * 2.0


def test_umap_used_when_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=_FakeUMAP))
    x = np.random.default_rng(2).normal(size=(80, 6)).astype(np.float32)
    coords, method = umap_coordinates(x, seed=0, return_method=True)
    assert method == "UMAP" and coords.shape == (80, 2)
    np.testing.assert_allclose(coords, x[:, :2] * 2.0)
    assert umap_coordinates(x[:10], seed=0, return_method=True)[1] == "PCA"  # too few cells for UMAP
