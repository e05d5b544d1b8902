"""Label transfer through the Atlas on the hard pbmc scenario (NK and Mono_CD16 absent from the reference)."""

from __future__ import annotations

import pytest

from atlasengine import Atlas
from atlasengine.transfer import evaluate_transfer
from conftest import read_data

NOVEL = {"NK", "Mono_CD16"}
SETTINGS = {
    "model": {"n_hidden": 64},
    "reference_training": {"max_epochs": 60, "progress_bar": False},
    "query_training": {"max_epochs": 40, "progress_bar": False},
    "continual": {"fisher_max_cells": 300, "replay_max_cells": 500},
}
# Bars measured on this machine with SETTINGS over several engine revisions: known accuracy of the
# zero-batch projection 0.86-0.91; of the ewc fold-in (lambda 1000, 40 epochs, small model)
# 0.64-0.90. The novel-vs-known AUROC of the label uncertainty swung between 0.40 and 0.82 across
# the same runs: label entropy cannot see NK among CD8 T cells (FACTS.md: scvi-tools 0.51), so it
# is reported by benchmarks/mapping.py (3 seeds) rather than asserted here.
PROJECTION_ACCURACY_BAR = 0.85
FOLD_IN_ACCURACY_BAR = 0.60


@pytest.fixture(scope="module")
def pbmc_atlas(tmp_path_factory):
    a = read_data("pbmc_3chemistries.h5ad")
    ref = a[a.obs["donor"].isin(["3pv1", "3pv2"]) & ~a.obs["cell_type"].isin(NOVEL)].copy()
    query = a[a.obs["donor"] == "5p"].copy()
    path = tmp_path_factory.mktemp("pbmc") / "pbmc.atlas"
    Atlas.create(path, ref, batch_key="donor", label_key="cell_type", config=SETTINGS)
    return path, query


def test_transfer_without_fold_in_and_with_ewc(pbmc_atlas, tmp_path):
    import shutil

    path, query = pbmc_atlas
    truth = query.obs["cell_type"].astype(str)
    before = Atlas.open(path).transfer_labels(query, batch_key="donor")
    ev0 = evaluate_transfer(before, truth, NOVEL)
    work = tmp_path / "a.atlas"
    shutil.copytree(path, work)
    atlas = Atlas.open(work)
    res = atlas.ingest(query, batch_key="donor", strategy="ewc")
    ev = evaluate_transfer(res.predictions, truth, NOVEL)
    print("pbmc transfer, zero-batch projection:", ev0)
    print("pbmc transfer, ewc fold-in:", ev)
    assert ev0["known_accuracy"] > PROJECTION_ACCURACY_BAR
    assert ev["known_accuracy"] > FOLD_IN_ACCURACY_BAR
    for e in (ev0, ev):
        assert 0.0 <= e["auroc_novel"] <= 1.0 and e["n_novel"] == 42 and e["n_known"] == 388
    # predictions are stored with the version and carried by obs()
    obs = atlas.obs()
    new = obs[obs["version_added"] == 2]
    assert new["predicted_label"].notna().all() and new["uncertainty"].between(0, 1).all()
    assert (new["predicted_label"] == res.predictions.loc[new.index, "predicted_label"]).all()
    # the index is stored with the version, not rebuilt per call
    idx = atlas.neighbor_index()
    assert idx is atlas.neighbor_index() and idx.n == int(obs["label"].notna().sum())
