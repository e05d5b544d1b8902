"""One path through an ingest: nothing written is read back, results are what was computed."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from atlasengine import Atlas, AtlasConfig, RuntimeConfig
from atlasengine.config import ModelConfig
from atlasengine.continual import diagonal_fisher
from atlasengine.model import CVAE
from atlasengine.store.cells import CellStore
from atlasengine.training import CellData


def _record_reads(monkeypatch) -> list[np.ndarray]:
    """Patch every reader of the cell store to note the joinids it reads."""
    seen: list[np.ndarray] = []
    for name in ("read_obs_ids", "read_counts"):
        original = getattr(CellStore, name)

        def wrapped(self, joinids, *args, _original=original, **kwargs):
            seen.append(np.asarray(joinids, dtype=np.int64).copy())
            return _original(self, joinids, *args, **kwargs)

        monkeypatch.setattr(CellStore, name, wrapped)
    original_obs = CellStore.read_obs

    def read_obs(self, ranges):
        for a, b in ranges:
            seen.append(np.arange(a, b, dtype=np.int64))
        return original_obs(self, ranges)

    monkeypatch.setattr(CellStore, "read_obs", read_obs)
    original_iter = CellStore.iter_cells

    def iter_cells(self, ranges, *args, **kwargs):
        for a, b in ranges:
            seen.append(np.arange(a, b, dtype=np.int64))
        return original_iter(self, ranges, *args, **kwargs)

    monkeypatch.setattr(CellStore, "iter_cells", iter_cells)
    return seen


@pytest.mark.parametrize("strategy", ["ewc", "surgery"])
def test_ingest_reads_no_cell_it_wrote(atlas_path, pancreas_query, monkeypatch, strategy):
    first_new = CellStore(str(atlas_path / "cells")).high_water()  # the new cells go at and above this joinid
    atlas = Atlas.open(atlas_path)
    seen = _record_reads(monkeypatch)
    res = atlas.ingest(pancreas_query, batch_key="tech", strategy=strategy, label_key="celltype",
                       training={"max_epochs": 2})
    read = np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64)
    assert len(read) > 0  # the committed cells were read (replay, Fisher, embedding, obs)
    assert (read < first_new).all(), f"read back {int((read >= first_new).sum())} cells it wrote"
    assert res.version.number == 2


def test_ingest_returns_what_it_computed(atlas_path, pancreas_query):
    atlas = Atlas.open(atlas_path)
    res = atlas.ingest(pancreas_query, batch_key="tech", strategy="ewc", training={"max_epochs": 2})
    fresh = Atlas.open(atlas_path)
    rows = fresh.obs().index.get_indexer(res.predictions.index)
    assert (rows >= 0).all()
    np.testing.assert_array_equal(res.latent, fresh.latent()[rows])
    pd.testing.assert_frame_equal(res.predictions, fresh.predictions(), check_like=True)
    assert "version=2" in repr(res) and len(repr(res)) < 300  # a summary, not every checksum and epoch
    assert "sha256" not in repr(res.version) and len(repr(fresh.versions)) < 2000
    # the object that ingested shows the new version without reopening it
    assert atlas.version == fresh.version == 2
    np.testing.assert_array_equal(atlas.latent(), fresh.latent())
    pd.testing.assert_frame_equal(atlas.obs(), fresh.obs())


def test_a_query_that_brings_labels_is_predicted_from_the_cells_before_it(atlas_path, pancreas_query):
    # every query cell carries a label no earlier cell has: if the query's own labels voted for it,
    # the label would come back as its prediction (its labelled neighbours are its own dataset)
    query = pancreas_query.copy()
    query.obs["celltype"] = "query_only"
    atlas = Atlas.open(atlas_path)
    before = set(atlas.labels)
    res = atlas.ingest(query, batch_key="tech", strategy="surgery", label_key="celltype", training={"max_epochs": 2})
    assert set(res.predictions["predicted_label"]) <= before
    assert not any(c == "p_query_only" for c in res.predictions.columns)
    summary = atlas.sql("select assigned_label from transfer_summary where version = 2")
    assert "query_only" not in set(summary["assigned_label"])
    # the labels joined the atlas for the queries after it
    assert "query_only" in atlas.neighbor_index().categories
    later = atlas.transfer_labels(pancreas_query, batch_key="tech")
    assert (later["predicted_label"] == "query_only").mean() > 0.5


def test_a_partial_config_keeps_the_atlas_defaults():
    cfg = AtlasConfig.model_validate({"query_training": {"seed": 3}, "reference_training": {"max_epochs": 5}})
    # the query's own defaults: no KL warm-up, at most 200 epochs by the rule
    assert cfg.query_training.seed == 3 and cfg.query_training.kl_warmup_epochs == 0
    assert cfg.query_training.epochs_cap == 200
    assert cfg.reference_training.max_epochs == 5 and cfg.reference_training.kl_warmup_epochs is None


def test_machine_settings_are_given_per_call_and_never_stored(tmp_path, pancreas_ref):
    small = pancreas_ref[:60, :200].copy()
    atlas = Atlas.create(tmp_path / "a.atlas", small, batch_key="tech", label_key="celltype",
                         config={"model": {"n_hidden": 8}, "reference_training": {"max_epochs": 1}},
                         runtime=RuntimeConfig(accelerator="cpu", progress=False))
    raw = json.loads((atlas.path / "manifest.json").read_text())
    for section in ("reference_training", "query_training"):
        assert not {"accelerator", "devices", "progress_bar", "progress"} & set(raw["config"][section])
    assert atlas.info.training["device"] == "cpu"


def test_a_parameter_without_fisher_statistic_raises():
    torch.manual_seed(0)
    m = CVAE(12, 1, ModelConfig(n_hidden=4, n_latent=2))
    m.extra_scale = torch.nn.Parameter(torch.ones(1))  # used nowhere the per-cell hooks see
    data = CellData(sp.csr_matrix(np.ones((6, 12), dtype=np.float32)), np.zeros(6))
    with pytest.raises(RuntimeError, match="extra_scale"):
        diagonal_fisher(m, data, max_cells=6)
