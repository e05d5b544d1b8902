"""Drift measures on synthetic embeddings with known answers, and on real pancreas data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasengine.config import DriftConfig
from atlasengine.drift import (
    DriftTables,
    batch_mixing,
    compute_initial_drift,
    compute_version_drift,
    displacement,
    flags,
    knn_indices,
    knn_preservation,
    loo_knn_correct,
    procrustes_align,
)
from atlasengine.errors import InputError

PANCREAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "pancreas_panc8_small.h5ad"


def _rotation(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def _clusters(n_per: int, n_clusters: int, d: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.eye(d)[:n_clusters] * 50.0
    x = np.concatenate([c + rng.normal(size=(n_per, d)) for c in centres])
    return x, np.repeat(np.arange(n_clusters), n_per)


def test_rotated_copy_is_not_drift_once_aligned() -> None:
    x = np.random.default_rng(1).normal(size=(400, 8))
    moved = x @ _rotation(8, 2) + 3.0
    assert displacement(x, moved, aligned=False).mean() > 1.0
    np.testing.assert_allclose(displacement(x, moved, aligned=True), 0.0, atol=1e-9)
    np.testing.assert_allclose(procrustes_align(moved, x), x, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(2, 12), shift=st.floats(-100, 100))
def test_procrustes_undoes_any_rigid_motion(seed: int, d: int, shift: float) -> None:
    x = np.random.default_rng(seed).normal(size=(60, d))
    moved = x @ _rotation(d, seed + 1) + shift
    assert displacement(x, moved, aligned=True).max() < 1e-6


def test_procrustes_does_not_rescale() -> None:
    x = np.random.default_rng(3).normal(size=(200, 4))
    assert displacement(x, 2.0 * x, aligned=True).mean() > 0.5


def test_identical_embeddings() -> None:
    x = np.random.default_rng(4).normal(size=(300, 6))
    assert displacement(x, x.copy(), aligned=True).max() < 1e-9
    assert displacement(x, x.copy(), aligned=False).max() == 0.0
    assert knn_preservation(x, x.copy(), k=10).min() == 1.0


def test_shuffled_embedding_loses_neighbours() -> None:
    x = np.random.default_rng(5).normal(size=(500, 6))
    shuffled = x[np.random.default_rng(6).permutation(len(x))]
    assert knn_preservation(x, shuffled, k=10).mean() < 0.1


def test_knn_excludes_self_even_with_duplicates() -> None:
    x = np.repeat(np.random.default_rng(7).normal(size=(20, 3)), 3, axis=0)
    nb = knn_indices(x, 4)
    assert nb.shape == (60, 4)
    assert not (nb == np.arange(60)[:, None]).any()
    assert knn_indices(x[:3], 10).shape == (3, 2)  # k capped at n - 1


def test_ilisi_separated_and_mixed() -> None:
    x, cluster = _clusters(100, 3)
    ilisi, norm = batch_mixing(x, cluster.astype(str), k=15)
    assert ilisi.min() == pytest.approx(1.0) and ilisi.max() == pytest.approx(1.0)
    assert norm.max() == pytest.approx(0.0)
    mixed = np.random.default_rng(8).integers(0, 3, size=len(x)).astype(str)
    ilisi, norm = batch_mixing(x, mixed, k=30)
    assert ilisi.mean() > 0.85 * 3 and ilisi.max() <= 3.0 + 1e-9
    assert 0.75 < norm.mean() <= 1.0
    assert np.isnan(batch_mixing(x, np.zeros(len(x)), k=5)[1]).all()  # one batch: no normalised figure


def test_loo_accuracy_on_separated_clusters_and_missing_labels() -> None:
    x, cluster = _clusters(50, 4)
    labels = np.array([f"type{c}" for c in cluster], dtype=object)
    assert loo_knn_correct(x, labels, k=15).min() == 1.0
    labels[[0, 60, 120]] = [None, np.nan, ""]
    out = loo_knn_correct(x, labels, k=15)
    assert np.isnan(out[[0, 60, 120]]).all()
    assert np.nanmin(out) == 1.0 and np.isfinite(out).sum() == len(x) - 3
    swapped = labels.copy()
    swapped[:50] = "type1"  # cluster 0 relabelled: still consistent within its cluster
    assert np.nanmean(loo_knn_correct(x, swapped, k=15)) == 1.0


def test_loo_vote_ties_go_to_the_label_whose_voters_are_nearer_on_the_whole() -> None:
    # cell 0's neighbours at 1..5: labels a, b, b, c, a tie a and b 2-2; b's ranks (2, 3) sum less than a's (1, 5)
    x = np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0]])
    labels = np.array(["b", "a", "b", "b", "c", "a"], dtype=object)
    assert loo_knn_correct(x, labels, k=5)[0] == 1.0
    labels[0] = "a"
    assert loo_knn_correct(x, labels, k=5)[0] == 0.0
    labels[1:] = ["a", "b", "a", "b", "c"]  # a (ranks 1, 3) against b (2, 4): a
    assert loo_knn_correct(x, labels, k=5)[0] == 1.0


def test_input_errors() -> None:
    with pytest.raises(InputError):
        displacement(np.zeros((5, 2)), np.zeros((4, 2)), aligned=False)
    with pytest.raises(InputError):
        knn_preservation(np.full((5, 2), np.nan), np.zeros((5, 2)), k=2)


def _obs(n: int, batches: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {"batch": batches, "label": labels, "dataset": batches, "version_added": 1},
        index=[f"cell{i}" for i in range(n)],
    )


def test_version_drift_tables_and_flags_synthetic() -> None:
    x, cluster = _clusters(80, 3, d=6, seed=9)
    n = len(x)
    labels = np.array([f"t{c}" for c in cluster], dtype=object)
    labels[::10] = None
    obs = _obs(n, np.where(np.arange(n) % 2 == 0, "b0", "b1"), labels)
    cfg = DriftConfig(k=10, max_cells=100)

    base = compute_initial_drift(1, x, obs, cfg)
    assert list(base.version_drift["scope"]) == ["vs_first"]
    row = base.version_drift.iloc[0]
    assert row.displacement_mean_aligned == 0.0 and row.knn_preservation_mean == 1.0
    assert row.label_accuracy_current == 1.0 and row.n_cells == n and row.n_cells_knn == 100

    rotated = x @ _rotation(6, 10) + 1.0
    tables = compute_version_drift(2, x, x, rotated, obs, cfg)
    vd = tables.version_drift.set_index("scope")
    assert set(vd.index) == {"vs_previous", "vs_first"}
    assert vd.loc["vs_first", "displacement_mean_raw"] > 1.0
    assert vd.loc["vs_first", "displacement_mean_aligned"] < 1e-6
    assert vd.loc["vs_first", "knn_preservation_mean"] > 0.99
    assert len(tables.cell_drift) == n and tables.cell_drift["cell"].iloc[0] == "cell0"
    assert set(tables.celltype_drift["cell_type"]) == {"t0", "t1", "t2"}
    assert len(tables.celltype_drift) == 6
    assert sorted(tables.batch_drift["batch"]) == ["b0", "b1"]
    assert flags(tables, cfg).empty

    scrambled = x[np.random.default_rng(11).permutation(n)]
    bad = compute_version_drift(3, rotated, x, scrambled, obs, cfg)
    fl = flags(bad, cfg)
    assert {"displacement_mean_aligned", "knn_preservation_mean", "label_accuracy_drop"} <= set(fl["measure"])
    whole = fl[fl["cell_type"].isna()]
    assert set(whole["scope"]) == {"vs_previous", "vs_first"}
    assert not whole[whole["measure"] == "displacement_mean_aligned"]["scope"].eq("vs_previous").any()
    assert fl["cell_type"].notna().any() and (fl["version"] == 3).all()

    both = DriftTables.concat([base, tables, bad])
    assert sorted(both.version_drift["version"].unique()) == [1, 2, 3]


def _pancreas_pca() -> tuple[np.ndarray, pd.DataFrame]:
    assert PANCREAS.exists(), f"test data missing: {PANCREAS}"
    import anndata

    adata = anndata.read_h5ad(PANCREAS)
    counts = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    logged = np.log1p(counts)
    centred = logged - logged.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    pcs = centred @ vt[:10].T
    obs = pd.DataFrame(
        {
            "batch": adata.obs["tech"].astype(str).to_numpy(),
            "label": adata.obs["celltype"].astype(str).to_numpy(),
            "dataset": adata.obs["dataset"].astype(str).to_numpy(),
            "version_added": 1,
        },
        index=adata.obs_names,
    )
    return pcs, obs


def test_real_pancreas_embedding() -> None:
    pcs, obs = _pancreas_pca()
    cfg = DriftConfig(k=15, max_cells=400)
    assert np.nanmean(loo_knn_correct(pcs, obs["label"], k=15)) > 0.8
    ilisi, _ = batch_mixing(pcs, obs["batch"], k=15)
    shuffled, _ = batch_mixing(pcs, np.random.default_rng(0).permutation(obs["batch"].to_numpy()), k=15)
    assert ilisi.mean() < shuffled.mean() - 1.0  # unintegrated PCA keeps technologies apart

    noisy = pcs @ _rotation(10, 12) + 0.01 * pcs.std() * np.random.default_rng(13).normal(size=pcs.shape)
    tables = compute_version_drift(2, pcs, pcs, noisy, obs, cfg)
    vd = tables.version_drift.set_index("scope")
    assert vd.loc["vs_first", "n_cells_knn"] == 400 and vd.loc["vs_first", "n_cells"] == 500
    assert vd.loc["vs_first", "displacement_mean_aligned"] < 0.1 * vd.loc["vs_first", "displacement_mean_raw"]
    assert vd.loc["vs_first", "knn_preservation_mean"] > 0.8
    assert abs(vd.loc["vs_first", "label_accuracy_current"] - vd.loc["vs_first", "label_accuracy_compared"]) < 0.03
    assert flags(tables, cfg).query("cell_type.isna()", engine="python").empty


def test_batch_mixing_among_version_1s_cells_does_not_change_when_only_later_cells_join() -> None:
    # version 1's cells sampled on their own, as version 1 sampled them: 900 cells added far away,
    # three times the kNN sample, leave the figure exactly as it was (sampled from every cell it
    # would rise from 0.30 towards 0.9 with nothing moved, as the sample of version 1's cells thins)
    rng = np.random.default_rng(0)
    cfg = DriftConfig(k=15, max_cells=300)
    x1 = rng.normal(size=(300, 3)) + np.repeat([[0.0, 0, 0], [2.0, 0, 0]], 150, axis=0)
    obs1 = pd.DataFrame({"batch": np.repeat(["a", "b"], 150), "version_added": 1})
    t1 = compute_initial_drift(1, x1, obs1, cfg)
    x = np.r_[x1, rng.normal(size=(900, 3)) + 100]
    obs = pd.concat([obs1, pd.DataFrame({"batch": "c", "version_added": 2}, index=range(300, 1200))])
    t3 = compute_version_drift(3, x, x, x, obs, cfg)
    before = t1.batch_drift.set_index("batch")["ilisi_mean"]
    now = t3.batch_drift.set_index("batch")["ilisi_first_version_mean"]
    assert 1.1 < before.min() < 1.9
    np.testing.assert_allclose(now[["a", "b"]], before[["a", "b"]])
    assert np.isnan(now["c"]) and t3.batch_drift.set_index("batch").loc["a", "n_cells_knn"] < 150  # the thinned sample


def test_drift_against_version_1_compares_version_1s_cells_in_version_1s_frame() -> None:
    # found by a review: version 2 an exact rotation of version 1, version 3 equal to version 2.
    # Each cell's first embedding is in the frame of the version that added it; one Procrustes fit
    # over cells of both versions read the rotation between the frames as drift (1.8 at version 3)
    x, cluster = _clusters(60, 3, d=6, seed=3)
    n = len(x)
    labels = np.array([f"t{c}" for c in cluster], dtype=object)
    added = np.where(np.arange(n) < n // 2, 1, 2)
    obs = _obs(n, np.where(added == 1, "b0", "b1"), labels).assign(version_added=added)
    cfg = DriftConfig(k=10, max_cells=1000)
    v2 = x @ _rotation(6, 5) + 2.0
    first = np.where((added == 1)[:, None], x, v2)  # each cell as the version that added it placed it
    tables = compute_version_drift(3, v2, first, v2, obs, cfg)
    vd = tables.version_drift.set_index("scope")
    assert vd.loc["vs_first", "displacement_mean_aligned"] < 1e-6
    assert vd.loc["vs_first", "knn_preservation_mean"] > 0.999
    assert vd.loc["vs_first", "n_cells"] == n // 2 and vd.loc["vs_previous", "n_cells"] == n
    cell = tables.cell_drift.set_index("cell")["displacement_aligned_vs_first"]
    assert cell.iloc[n // 2:].isna().all() and (cell.iloc[: n // 2] < 1e-6).all()
    assert flags(tables, cfg).empty


def test_the_knn_sample_keeps_the_same_cells_as_the_atlas_grows() -> None:
    # a fresh draw per version shared 19 of 100 cells between 347 and 447 cells, so flags came and
    # went with no change in the embedding
    from atlasengine.numerics import nested_sample

    names = [f"cell{i}" for i in range(447)]
    before, after = nested_sample(names[:347], 100, seed=0), nested_sample(names, 100, seed=0)
    assert len(np.intersect1d(before, after)) >= 70  # on average 100 * 347 / 447 = 78 of them
    assert set(after[after < 347]) <= set(before)
    shuffled = np.random.default_rng(0).permutation(447)
    again = nested_sample(np.asarray(names)[shuffled], 100, seed=0)
    assert set(np.asarray(names)[shuffled][again]) == set(np.asarray(names)[after])  # order does not matter


def test_version_2_flags_once_and_few_sampled_cells_flag_no_type() -> None:
    x, cluster = _clusters(80, 3, d=6, seed=9)
    n = len(x)
    labels = np.array([f"t{c}" for c in cluster], dtype=object)
    labels[:3] = "rare"  # three cells of a type: a flag on them would be one cell's noise
    obs = _obs(n, np.where(np.arange(n) % 2 == 0, "b0", "b1"), labels)
    cfg = DriftConfig(k=10, max_cells=1000)
    scrambled = x[np.random.default_rng(11).permutation(n)]
    fl = flags(compute_version_drift(2, x, x, scrambled, obs, cfg), cfg)
    assert not fl.empty and set(fl["scope"]) == {"vs_first"}  # vs_previous is the same comparison at version 2
    rare = fl[fl["cell_type"] == "rare"]  # its displacement is a mean over its cells; neighbourhoods need 20
    assert set(rare["measure"]) == {"displacement_mean_aligned"}
    assert {"knn_preservation_mean", "label_accuracy_drop"} <= set(fl[fl["cell_type"] == "t0"]["measure"])
    assert not fl.duplicated(["cell_type", "measure"]).any()
