"""The calibrated novelty score travels with label transfer and ingest predictions."""

from __future__ import annotations

import numpy as np

from atlasengine import Atlas
from atlasengine.transfer.novelty import CALIBRATION_FILE


def test_predictions_carry_calibrated_novelty_and_the_rule_is_selectable(two_version_atlas, pancreas_query):
    atlas = Atlas.open(two_version_atlas)
    assert CALIBRATION_FILE in atlas.info.files  # stored with the version, checksummed
    obs = atlas.obs()
    stored = atlas._predictions(atlas.info)
    for col in ("novelty", "novelty_pvalue", "is_novel"):
        assert col in stored.columns
    assert stored["novelty_pvalue"].between(0, 1).all()
    paper = atlas.transfer_labels(pancreas_query, batch_key="tech")
    assert (paper["is_unknown"] == (paper["uncertainty"] > 0.3)).all()
    calibrated = atlas.transfer_labels(pancreas_query, batch_key="tech", config={"unknown_rule": "novelty"})
    assert (calibrated["is_unknown"] == calibrated["is_novel"]).all()
    assert (calibrated.loc[calibrated["is_unknown"], "label"] == "Unknown").all()
    thr = calibrated.attrs["novelty_threshold"]
    np.testing.assert_array_equal(calibrated["is_novel"].to_numpy(), calibrated["novelty"].to_numpy() > thr)
    # same embedding, same ranking: the two rules differ only in the cut
    np.testing.assert_allclose(paper["novelty"], calibrated["novelty"])
    assert len(obs) == 500
    # the query-centred threshold: same scores, a threshold moved by the query's median shift
    centred = atlas.transfer_labels(pancreas_query, batch_key="tech",
                                    config={"unknown_rule": "novelty", "novelty_calibration": "query"})
    np.testing.assert_allclose(centred["novelty"], calibrated["novelty"])
    assert (centred["is_unknown"] == centred["is_novel"]).all()
    np.testing.assert_array_equal(centred["is_novel"].to_numpy(),
                                  centred["novelty"].to_numpy() > centred.attrs["novelty_threshold"])
