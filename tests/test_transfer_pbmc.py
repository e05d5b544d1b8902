"""Label transfer through the Atlas on the hard pbmc scenario (NK and Mono_CD16 absent from the reference)."""

from __future__ import annotations

from conftest import PBMC_NOVEL

from atlasengine.transfer import evaluate_transfer

# Bars measured with conftest.PBMC_SETTINGS and today's default fold-in (lambda 1 beside the
# embedding anchor), seeds 0 / 1 / 2 (the fixture uses 0), 2026-12-06 on an AVX-512 machine: known
# accuracy 0.918 / 0.928 / 0.920 projected through version 1 and 0.918 / 0.918 / 0.912 after the
# ewc fold-in; novel-vs-known AUROC of the label uncertainty 0.401 / 0.564 / 0.449 projected (the
# frozen reference cannot see NK among CD8 T cells) and 0.494 / 0.578 / 0.523 after the fold-in.
# At these settings the fold-in's uncertainty ranks NK and Mono_CD16 about at chance (seed 0: 0.47
# to 0.54 with other floating-point kernels: ATEN_CPU_CAPABILITY, MKL_CBWR), so the test asserts
# only that it ranks them better than the projection does (by 0.07 or more on seed 0 in each of
# those four environments); the benchmarks measure pbmc at full settings (RESULTS.md).
PROJECTION_ACCURACY_BAR = 0.85
FOLD_IN_ACCURACY_BAR = 0.85


def test_transfer_without_fold_in_and_with_ewc(pbmc_fold_in):
    atlas, reference, _, query, predictions = pbmc_fold_in
    truth = query.obs["cell_type"].astype(str)
    before = reference.transfer_labels(query, batch_key="donor")
    ev0 = evaluate_transfer(before, truth, PBMC_NOVEL)
    ev = evaluate_transfer(predictions, truth, PBMC_NOVEL)
    print("pbmc transfer, zero-batch projection:", ev0)
    print("pbmc transfer, ewc fold-in:", ev)
    assert ev0["known_accuracy"] > PROJECTION_ACCURACY_BAR
    assert ev["known_accuracy"] > FOLD_IN_ACCURACY_BAR
    # novel cells are more uncertain, against known ones, once the query is folded in than
    # through the frozen reference (the paper's claim for continual learning)
    assert ev["auroc_novel"] > ev0["auroc_novel"]
    for e in (ev0, ev):
        assert 0.0 <= e["auroc_novel"] <= 1.0 and e["n_novel"] == 42 and e["n_known"] == 388
    # predictions are stored with the version and carried by obs()
    obs = atlas.obs()
    new = obs[obs["version_added"] == 2]
    assert new["predicted_label"].notna().all() and new["uncertainty"].between(0, 1).all()
    assert (new["predicted_label"] == predictions.loc[new.index, "predicted_label"]).all()
    # the index is stored with the version, not rebuilt per call
    idx = atlas.neighbor_index()
    assert idx is atlas.neighbor_index() and idx.n == int(obs["label"].notna().sum())
