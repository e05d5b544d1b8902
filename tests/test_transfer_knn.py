"""Label transfer on real PBMC embeddings: faiss vs numpy, scArches formula vs a loop oracle."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from atlasengine.config import TransferConfig
from atlasengine.errors import AtlasFormatError, InputError
from atlasengine.transfer import NeighborIndex, brute_force_knn, label_probabilities, transfer_labels

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
K = 50


class Split:
    """Reference (3pv1 + 3pv2) and query (5p) in a 10-dim PCA of log-normalised counts."""

    def __init__(self) -> None:
        path = DATA / "pbmc_3chemistries.h5ad"
        if not path.exists():
            pytest.fail(f"test data missing: {path} (the shared data folder must sit beside the checkout)")
        adata = ad.read_h5ad(path)
        x = np.asarray(adata.X.toarray(), dtype=np.float64)
        x = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)
        x -= x.mean(axis=0)
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        emb = (u[:, :10] * s[:10]).astype(np.float32)
        is_ref = adata.obs["donor"].isin(["3pv1", "3pv2"]).to_numpy()
        labels = adata.obs["cell_type"].astype(str).to_numpy()
        self.ref, self.ref_labels = emb[is_ref], labels[is_ref]
        self.query, self.query_labels = emb[~is_ref], labels[~is_ref]
        self.query_names = adata.obs_names[~is_ref]


@pytest.fixture(scope="module")
def split() -> Split:
    return Split()


@pytest.fixture(scope="module")
def exact(split: Split) -> NeighborIndex:
    return NeighborIndex.build(split.ref, split.ref_labels, TransferConfig(index="exact"))


def scarches_loop(distances: np.ndarray, neighbor_labels: np.ndarray, categories: list[str]) -> np.ndarray:
    """Oracle: scArches' weighted_knn_transfer written literally, one cell at a time."""
    probs = np.zeros((len(distances), len(categories)))
    for i in range(len(distances)):
        d = distances[i].astype(np.float64)
        stds = (2.0 / np.std(d)) ** 2
        w = np.exp(-d / stds)
        w = w / w.sum()
        for j, label in enumerate(categories):
            probs[i, j] = w[neighbor_labels[i] == label].sum()
    return probs


def test_exact_index_matches_brute_force(split: Split, exact: NeighborIndex) -> None:
    assert exact.kind == "exact" and exact.n == len(split.ref)
    assert exact.categories == sorted(set(split.ref_labels))
    dist, idx = exact.search(split.query, K)
    bdist, bidx, bcodes = brute_force_knn(split.ref, exact.codes, split.query, K)
    assert dist.shape == idx.shape == (len(split.query), K)
    np.testing.assert_allclose(dist, bdist, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(idx, bidx)
    np.testing.assert_array_equal(exact.neighbor_codes(idx), bcodes)
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_probabilities_equal_scarches_loop(split: Split, exact: NeighborIndex) -> None:
    bdist, bidx, _ = brute_force_knn(split.ref, exact.codes, split.query, K)
    oracle = scarches_loop(bdist, split.ref_labels[bidx], exact.categories)
    # the vectorised formula on the same neighbours
    direct = label_probabilities(bdist, exact.codes[bidx], len(exact.categories))
    np.testing.assert_allclose(direct, oracle, atol=1e-5)
    # the whole pipeline through faiss
    pred = transfer_labels(exact, split.query, TransferConfig(k=K, index="exact"))
    p = pred[[f"p_{c}" for c in exact.categories]].to_numpy()
    np.testing.assert_allclose(p, oracle, atol=1e-5)
    np.testing.assert_allclose(pred["uncertainty"], np.maximum(1 - oracle.max(axis=1), 0), atol=1e-5)
    assert (pred["predicted_label"].to_numpy() == split.query_labels).mean() > 0.9  # sanity: real signal


def test_hnsw_agrees_with_exact(split: Split, exact: NeighborIndex) -> None:
    cfg = TransferConfig(k=K, index="hnsw")
    hnsw = NeighborIndex.build(split.ref, split.ref_labels, cfg)
    assert hnsw.kind == "hnsw"
    a = transfer_labels(exact, split.query, cfg)["predicted_label"].to_numpy()
    b = transfer_labels(hnsw, split.query, cfg)["predicted_label"].to_numpy()
    assert (a == b).mean() >= 0.99


def test_ivf_and_auto_kinds(split: Split) -> None:
    ivf = NeighborIndex.build(split.ref, split.ref_labels, TransferConfig(index="ivf"))
    assert ivf.kind == "ivf"
    _, idx = ivf.search(split.query, K)
    assert idx.shape == (len(split.query), K)
    assert NeighborIndex.build(split.ref, split.ref_labels, TransferConfig()).kind == "exact"
    small = TransferConfig(approximate_above=100)
    assert NeighborIndex.build(split.ref, split.ref_labels, small).kind == "ivf"


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_save_load_round_trip(split: Split, kind: str, tmp_path: Path) -> None:
    cfg = TransferConfig(k=K, index=kind, hnsw_ef_search=77, ivf_nprobe=3)
    built = NeighborIndex.build(split.ref, split.ref_labels, cfg)
    paths = built.save(tmp_path / "knn")
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    json.loads(paths[-1].read_text())  # metadata is plain JSON
    loaded = NeighborIndex.load(tmp_path / "knn")
    assert (loaded.kind, loaded.n, loaded.categories) == (built.kind, built.n, built.categories)
    np.testing.assert_array_equal(loaded.codes, built.codes)
    for a, b in zip(built.search(split.query, K), loaded.search(split.query, K), strict=True):
        np.testing.assert_array_equal(a, b)
    pa = transfer_labels(built, split.query, cfg)
    pb = transfer_labels(loaded, split.query, cfg)
    assert pa.equals(pb)


def test_load_rejects_bad_directory(tmp_path: Path, exact: NeighborIndex) -> None:
    with pytest.raises(AtlasFormatError):
        NeighborIndex.load(tmp_path)
    paths = exact.save(tmp_path)
    meta = json.loads(paths[-1].read_text())
    paths[-1].write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(AtlasFormatError):
        NeighborIndex.load(tmp_path)


def test_unknown_calls_follow_uncertainty(split: Split, exact: NeighborIndex) -> None:
    cfg = TransferConfig(k=K, uncertainty_threshold=0.2)
    pred = transfer_labels(exact, split.query, cfg, obs_names=split.query_names)
    assert list(pred.columns[:4]) == ["label", "predicted_label", "uncertainty", "is_unknown"]
    assert list(pred.columns[4:]) == [f"p_{c}" for c in exact.categories]
    assert pred.index.equals(split.query_names)
    unknown = pred["uncertainty"].to_numpy() > 0.2
    assert 0 < unknown.sum() < len(pred)  # both branches are exercised on this data
    np.testing.assert_array_equal(pred["is_unknown"].to_numpy(), unknown)
    np.testing.assert_array_equal(pred["label"].to_numpy() == "Unknown", unknown)
    known = ~unknown
    np.testing.assert_array_equal(pred["label"][known], pred["predicted_label"][known])
    p = pred.iloc[:, 4:].to_numpy()
    np.testing.assert_allclose(pred["uncertainty"], np.maximum(1 - p.max(axis=1), 0), atol=1e-12)
    np.testing.assert_array_equal(pred["predicted_label"], np.asarray(exact.categories)[p.argmax(axis=1)])


def test_gaussian_kernel_valid(split: Split, exact: NeighborIndex) -> None:
    pred = transfer_labels(exact, split.query, TransferConfig(k=K, kernel="gaussian"))
    p = pred.iloc[:, 4:].to_numpy()
    assert np.isfinite(p).all() and (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    scarches = transfer_labels(exact, split.query, TransferConfig(k=K))
    assert (pred["predicted_label"] == scarches["predicted_label"]).mean() > 0.9


def test_probability_edge_cases() -> None:
    codes = np.array([[0, 1, 1, 2]])
    # sigma = 0 (all distances equal): uniform weights
    np.testing.assert_allclose(label_probabilities(np.full((1, 4), 3.0), codes, 3), [[0.25, 0.5, 0.25]])
    # gaussian with median 0: all weight on the exact matches
    d0 = np.array([[0.0, 0.0, 0.0, 5.0]])
    np.testing.assert_allclose(label_probabilities(d0, codes, 3, kernel="gaussian"), [[1 / 3, 2 / 3, 0.0]])
    # large distances do not underflow to NaN
    far = np.array([[1e4, 1e4 + 50, 1e4 + 100, 1e4 + 200]])
    p = label_probabilities(far, codes, 3)
    assert np.isfinite(p).all() and p.sum() == pytest.approx(1.0)
    # missing neighbours (-1) are ignored; none left -> uniform
    p = label_probabilities(np.array([[1.0, np.inf], [np.inf, np.inf]]), np.array([[2, -1], [-1, -1]]), 3)
    np.testing.assert_allclose(p, [[0, 0, 1], [1 / 3, 1 / 3, 1 / 3]])
    with pytest.raises(InputError):
        label_probabilities(np.ones((1, 2)), np.array([[0, 5]]), 3)
    with pytest.raises(InputError):
        label_probabilities(np.ones((1, 2)), np.array([[0, 1]]), 3, kernel="cosine")  # type: ignore[arg-type]


def test_k_clipped_and_bad_input(split: Split) -> None:
    idx = NeighborIndex.build(split.ref[:7], split.ref_labels[:7], TransferConfig())
    dist, nn = idx.search(split.query[:5], 50)
    assert dist.shape == nn.shape == (5, 7)
    pred = transfer_labels(idx, split.query[:5], TransferConfig(k=50))
    np.testing.assert_allclose(pred.iloc[:, 4:].sum(axis=1), 1.0)
    with pytest.raises(InputError):
        idx.search(split.query[:, :3], 5)
    with pytest.raises(InputError):
        NeighborIndex.build(split.ref, split.ref_labels[:-1], TransferConfig())
    bad = split.ref.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError):
        NeighborIndex.build(bad, split.ref_labels, TransferConfig())


def test_search_can_leave_indexed_query_cells_out():
    """Rows that are indexed cells are answered without themselves, the others as usual, also
    on an index smaller than k (missing neighbours pad, no real one is lost)."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 3)).astype(np.float32)
    for n, k in ((40, 5), (6, 10)):
        idx = NeighborIndex.build(ref[:n], np.array(["a", "b"] * (n // 2)), TransferConfig(index="exact"))
        query = np.vstack([ref[2], rng.normal(size=3).astype(np.float32)])
        d, i = idx.search(query, k, exclude=np.array([2, -1]))
        plain_d, plain_i = idx.search(query, k)
        assert 2 not in i[0] and (d[0, np.isfinite(d[0])] > 0).all()
        np.testing.assert_array_equal(i[1], plain_i[1])  # not an indexed cell: unchanged
        m = plain_i.shape[1] - 1  # plain search finds the cell itself first
        np.testing.assert_array_equal(i[0, :m], plain_i[0, 1:])
        assert i.shape == plain_i.shape
