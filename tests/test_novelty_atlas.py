"""The calibrated novelty score travels with label transfer and ingest predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd

from atlasengine import Atlas
from atlasengine.transfer.novelty import CALIBRATION_FILE, NoveltyCalibration


def test_predictions_carry_calibrated_novelty_and_the_rule_is_selectable(two_version_atlas, pancreas_query):
    atlas = Atlas.open(two_version_atlas)
    assert CALIBRATION_FILE in atlas.info.files  # stored with the version, checksummed
    obs = atlas.obs()
    stored = atlas.predictions()
    for col in ("novelty", "novelty_pvalue", "is_novel"):
        assert col in stored.columns
    assert stored["novelty_pvalue"].between(0, 1).all()
    paper = atlas.transfer_labels(pancreas_query, batch_key="tech", config={"unknown_rule": "uncertainty"})
    assert (paper["is_unknown"] == (paper["uncertainty"] > 0.3)).all()
    calibrated = atlas.transfer_labels(pancreas_query, batch_key="tech")  # the default rule since format 7
    assert atlas.config.transfer.unknown_rule == "novelty" == calibrated.attrs["unknown_rule"]
    assert (calibrated["is_unknown"] == calibrated["is_novel"]).all()
    assert (calibrated.loc[calibrated["is_unknown"], "label"] == "Unknown").all()
    thr = calibrated.attrs["novelty_threshold"]
    np.testing.assert_array_equal(calibrated["is_novel"].to_numpy(), calibrated["novelty"].to_numpy() > thr)
    # same embedding, same ranking: the two rules differ only in the cut
    np.testing.assert_allclose(paper["novelty"], calibrated["novelty"])
    assert len(obs) == 500
    # the default takes the query's shift off; the reference threshold is one setting away
    assert calibrated.attrs["novelty_calibration"] in ("query", "reference")  # reference: too few cells per label
    plain = atlas.transfer_labels(pancreas_query, batch_key="tech",
                                  config={"unknown_rule": "novelty", "novelty_calibration": "reference"})
    np.testing.assert_allclose(plain["novelty"], calibrated["novelty"])
    assert plain.attrs["novelty_calibration"] == "reference" and plain.attrs["novelty_query_shift"] == 0
    assert (plain["is_unknown"] == plain["is_novel"]).all()
    np.testing.assert_array_equal(plain["is_novel"].to_numpy(),
                                  plain["novelty"].to_numpy() > plain.attrs["novelty_threshold"])


def test_a_stored_calibration_without_predicted_labels_is_recomputed(two_version_atlas, monkeypatch):
    """Versions written before the calibration kept each cell's predicted label still centre on
    the query: the calibration is recomputed from the stored embeddings."""
    atlas = Atlas.open(two_version_atlas)
    fresh = atlas.novelty_calibration()
    load = NoveltyCalibration.load

    def old_style(path):
        cal = load(path)
        cal.predicted = None
        return cal

    monkeypatch.setattr(NoveltyCalibration, "load", staticmethod(old_style))
    again = Atlas.open(two_version_atlas).novelty_calibration()
    assert again.predicted is not None
    np.testing.assert_array_equal(again.predicted, fresh.predicted)
    np.testing.assert_allclose(again.distance, fresh.distance)


def test_a_labelled_fold_in_is_scored_against_the_cells_before_it(atlas_path, pancreas_query):
    """Cells folded in with their labels join the index for later queries; their stored predictions
    (and the transfer summary built from them) come from the cells the atlas held before, under the
    new embedding, never from their own labelled neighbours."""
    from atlasengine.transfer import NeighborIndex, label_probabilities

    query = pancreas_query[pancreas_query.obs["tech"] == "smartseq2"].copy()
    res = Atlas.open(atlas_path).ingest(query, batch_key="tech", label_key="celltype", strategy="surgery",
                                        training={"max_epochs": 2})
    atlas = Atlas.open(atlas_path)
    obs, z, index = atlas.obs(), atlas.latent(), atlas.neighbor_index()
    labelled = obs["label"].notna().to_numpy()
    assert index.n == labelled.sum() and labelled[obs["version_added"] == 2].all()  # the query's cells joined it
    before = labelled & (obs["version_added"] < 2).to_numpy()
    cfg = atlas.config.transfer
    earlier = NeighborIndex.build(z[before], obs["label"][before].astype(str).to_numpy(), cfg)
    rows = obs.index.get_indexer([str(c) for c in query.obs_names])
    d, i = earlier.search(z[rows], cfg.k)
    expected = 1.0 - label_probabilities(d, earlier.neighbor_codes(i), len(earlier.categories)).max(axis=1)
    np.testing.assert_allclose(res.predictions.loc[obs.index[rows], "uncertainty"], expected, atol=1e-6)


def test_a_transfer_config_with_other_neighbours_gets_its_own_calibration_once(two_version_atlas, pancreas_query,
                                                                               monkeypatch):
    atlas = Atlas.open(two_version_atlas)
    atlas.novelty_calibration()  # the stored one
    calls = []
    import atlasengine.api.atlas as api

    calibrate = api.calibrate

    def counted(*args):
        calls.append(args[2].novelty_k)
        return calibrate(*args)

    monkeypatch.setattr(api, "calibrate", counted)
    first = atlas.transfer_labels(pancreas_query, batch_key="tech", config={"novelty_k": 20})
    again = atlas.transfer_labels(pancreas_query, batch_key="tech", config={"novelty_k": 20})
    default = atlas.transfer_labels(pancreas_query, batch_key="tech")
    assert calls == [20]  # computed once for k 20, never for the stored default
    pd.testing.assert_frame_equal(first, again)
    assert not np.allclose(first["novelty"], default["novelty"])
