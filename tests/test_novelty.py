"""Novelty scores on real PBMC data: conformal validity, the calibrated threshold, and a small model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats
from sklearn.metrics import roc_auc_score

from atlasengine.config import TransferConfig
from atlasengine.errors import InputError
from atlasengine.model import elbo_gain, negative_elbo
from atlasengine.transfer import NeighborIndex, label_probabilities
from atlasengine.transfer import novelty as N

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NOVEL = ["NK", "Mono_CD16"]


@pytest.fixture(scope="module")
def pbmc() -> ad.AnnData:
    path = DATA / "pbmc_3chemistries.h5ad"
    if not path.exists():
        pytest.fail(f"test data missing: {path} (the shared data folder must sit beside the checkout)")
    return ad.read_h5ad(path)


@pytest.fixture(scope="module")
def embedding(pbmc) -> np.ndarray:
    """10-dim PCA of log-normalised counts (500 most variable genes) of every pbmc cell."""
    x = np.asarray(pbmc.X.toarray(), dtype=np.float64)
    x = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)
    x = x[:, np.argsort(-x.var(axis=0))[:500]]
    x -= x.mean(axis=0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return (u[:, :10] * s[:10]).astype(np.float32)


def binomial_tolerance(rate: float, n: int, sds: float = 3.5) -> float:
    return sds * np.sqrt(rate * (1 - rate) / n) + 1.0 / n


# ------------------------------------------------------------------- conformal p-values
def test_conformal_pvalues_uniform_on_exchangeable_data(embedding):
    """Random splits of real cells are exchangeable: test p-values are uniform, coverage is exact."""
    score = embedding[:, 0].astype(np.float64)  # a continuous real per-cell score (no ties)
    rng = np.random.default_rng(0)
    n_cal = 600
    pooled = []
    for _ in range(20):
        perm = rng.permutation(len(score))
        cal, test = score[perm[:n_cal]], score[perm[n_cal:]]
        p = N.conformal_pvalues(cal, test)
        assert p.min() >= 1 / (n_cal + 1) - 1e-12 and p.max() <= 1.0
        pooled.append(p)
    p = np.concatenate(pooled)
    for a in (0.05, 0.1, 0.25, 0.5):
        exact = np.floor(a * (n_cal + 1)) / (n_cal + 1)  # P(p <= a) under exchangeability
        assert abs((p <= a).mean() - exact) < binomial_tolerance(a, len(p)), a
    assert stats.kstest(pooled[0], "uniform").pvalue > 1e-3
    # leave-one-out p-values of the calibration cells are their ranks: uniform on {1/n, ..., 1}
    loo = N.loo_pvalues(score[:n_cal])
    assert np.allclose(np.sort(loo), np.arange(1, n_cal + 1) / n_cal)


def test_conformal_edge_cases():
    assert N.conformal_pvalues([1.0, 2.0, 3.0], [10.0, 0.0, 2.0]).tolist() == [0.25, 1.0, 0.75]
    with pytest.raises(InputError):
        N.conformal_pvalues([], [1.0])
    with pytest.raises(InputError):
        N.calibrated_unknown(np.ones(3), np.ones(3), target_rate=0.0)
    with pytest.raises(InputError):
        N.fisher_statistic([np.array([0.0])])
    z = N.robust_z(np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0]), np.array(["a"] * 3 + ["b"] * 3))
    assert np.allclose(z[:3], z[3:])  # scale-free within each group


def test_query_shift_follows_the_labels_not_the_label_mix():
    """A query made mostly of a tight type (low scores) has a low overall median even when every
    label sits a little farther from the reference: the quartiles of the per-label differences
    keep the shift near that small rise instead of a large negative value that would call many
    known cells novel; and a label the query fills with new cells cannot pull it up."""
    rng = np.random.default_rng(0)
    ref_labels = np.array(["A"] * 100 + ["B"] * 450 + ["C"] * 450)
    ref = np.where(ref_labels == "A", 1.0, 5.0) + rng.normal(0, 0.3, len(ref_labels))
    q_labels = np.array(["A"] * 900 + ["B"] * 50 + ["C"] * 50)
    query = np.where(q_labels == "A", 1.0, 5.0) + 0.3 + rng.normal(0, 0.3, len(q_labels))
    assert np.median(query) - np.median(ref) < -3  # the label mix alone
    shift = N.query_shift(query, q_labels, ref, ref_labels)
    assert 0.2 < shift < 0.4
    assert N.query_shift(np.where(q_labels == "B", query + 10, query), q_labels, ref, ref_labels) < 0.4
    assert N.query_shift(query[:25], q_labels[:25], ref, ref_labels) is None  # one label: too few to tell


# ---------------------------------------------------------- calibrated threshold (no model)
def split_reference(pbmc, embedding, seed: int, cfg: TransferConfig):
    """Halve the pbmc reference cells at random: (calibration of one half, neighbour distances
    and kNN uncertainty of the other half, held-out count, fitted half size, predicted labels)."""
    is_ref = pbmc.obs["donor"].isin(["3pv1", "3pv2"]).to_numpy()
    emb = embedding[is_ref]
    labels = pbmc.obs["cell_type"].astype(str).to_numpy()[is_ref]
    perm = np.random.default_rng(seed).permutation(len(emb))
    fit, held = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    index = NeighborIndex.build(emb[fit], labels[fit], cfg)
    cal = N.reference_calibration(index, emb[fit], k_transfer=cfg.k, kernel=cfg.kernel)  # the default novelty k
    d, i = index.search(emb[held], cfg.k)
    probs = label_probabilities(d, index.neighbor_codes(i), len(index.categories), cfg.kernel)
    return cal, d, 1.0 - probs.max(axis=1), len(held), len(fit), np.asarray(index.categories)[probs.argmax(axis=1)]


def test_calibrated_threshold_hits_target_on_reference_cells(pbmc, embedding):
    """Held-out reference cells are called novel at the target rate (marginal over random splits).

    The guarantee is marginal: one split of a reference with rare, far-off types (DC, MK, HSC)
    can miss by several points, so the rate is averaged over 12 random halvings.
    """
    cfg = TransferConfig(k=50)
    rates: dict[tuple[str, float], list[float]] = {}
    n_held = 0
    for seed in range(12):
        cal, d, unc, held, fitted, _ = split_reference(pbmc, embedding, seed, cfg)
        assert cal.n == fitted and cal.signals() == ("distance", "uncertainty")
        n_held += held
        for target in (0.05, 0.1):
            df = N.novelty_scores(d, unc, cal, target_rate=target)
            rates.setdefault(("novelty", target), []).append(df["is_novel"].mean())
            for signal in ("distance", "uncertainty"):
                rates.setdefault((signal, target), []).append((df[f"{signal}_pvalue"] <= target).mean())
            # the stored threshold reproduces the call
            assert (df["is_novel"] == (df["novelty"] > df.attrs["novelty_threshold"])).all()
    for (signal, target), r in rates.items():
        assert abs(np.mean(r) - target) < 0.02, (signal, target, np.round(r, 3))
    with pytest.raises(InputError):
        N.novelty_scores(d, unc, cal, signals=["elbo_gain"])  # no gain in this calibration
    with pytest.raises(InputError, match=f"at least k={cal.k}"):
        N.novelty_scores(d[:, : cal.k - 1], unc, cal)  # fewer neighbours than the calibration's mean


# ------------------------------------------------------------------ pbmc with a small model
# (the pbmc_fold_in fixture lives in conftest.py, shared with the label-transfer test)


def test_pbmc_combined_score_beats_uncertainty(pbmc_fold_in, tmp_path):
    atlas, prev, ref, query, preds = pbmc_fold_in
    tcfg = atlas.config.transfer
    obs, z = atlas.obs(), atlas.latent()
    labelled = obs["label"].notna().to_numpy()
    index = atlas.neighbor_index()
    old, new = prev.model(), atlas.model()
    cells = N.calibration_cells(index.n)
    ref_obs = obs[labelled].iloc[cells]
    ref_counts = sp.csr_matrix(ref[list(ref_obs.index), atlas.genes].X)
    b_old = pd.Index(prev.batches).get_indexer(ref_obs["batch"])
    b_new = pd.Index(atlas.batches).get_indexer(ref_obs["batch"])
    gain_ref = elbo_gain(old, new, ref_counts, b_old, b_new)
    cal = N.reference_calibration(index, z[labelled], k_transfer=tcfg.k, kernel=tcfg.kernel, cells=cells,
                                  elbo_gain=gain_ref, gain_groups=ref_obs["batch"].to_numpy())

    names = [str(c) for c in query.obs_names]
    d, _ = index.search(z[obs.index.get_indexer(names)], tcfg.k)
    counts = sp.csr_matrix(query[:, atlas.genes].X)
    q_batch = query.obs["donor"].astype(str).to_numpy()
    gain = elbo_gain(old, new, counts, np.full(len(names), -1), pd.Index(atlas.batches).get_indexer(q_batch))
    assert np.isfinite(gain).all()
    df = N.novelty_scores(d, preds.loc[names, "uncertainty"].to_numpy(), cal, elbo_gain=gain, gain_groups=q_batch,
                          obs_names=names)
    assert list(df.columns) == ["distance", "distance_pvalue", "uncertainty", "uncertainty_pvalue", "elbo_gain",
                                "elbo_gain_pvalue", "novelty", "novelty_pvalue", "is_novel"]
    novel = query.obs["cell_type"].isin(NOVEL).to_numpy()
    auc_unc = roc_auc_score(novel, df["uncertainty"])
    auc_novelty = roc_auc_score(novel, df["novelty"])
    assert auc_novelty > auc_unc + 0.05, (auc_novelty, auc_unc)
    assert df["is_novel"][novel].mean() > df["is_novel"][~novel].mean()
    # what ingest reported (default combination: distance + uncertainty, each averaged over 10
    # neighbouring cells of the batch). Unaveraged (issue 6's bar, within 2 points of the 5% target)
    # it called 5.2% / 4.9% / 5.7% of known cells novel on seeds 0 / 1 / 2; averaged, this fixture
    # calls 7.5% and catches more than twice as many new cells. The benchmark's three seeds: known
    # 6.7% -> 8.2%, new 24% -> 43% (benchmarks/RESULTS.md, 'Novelty rules side by side'): the averaging
    # costs pbmc false alarms, which this bound keeps from growing further; it must still catch more.
    in_preds = preds.loc[names]
    assert roc_auc_score(novel, in_preds["novelty"]) >= 0.80
    assert in_preds["is_novel"][~novel].mean() <= 0.08
    plain = N.novelty_scores(d, in_preds["uncertainty"].to_numpy(), cal, centre_on_query=True,
                             predicted=in_preds["predicted_label"].astype(str).to_numpy())  # unaveraged
    assert in_preds["is_novel"][novel].mean() > plain["is_novel"].to_numpy()[novel].mean()

    # the calibration round-trips through its file
    back = N.NoveltyCalibration.load(cal.save(tmp_path / N.CALIBRATION_FILE))
    again = N.novelty_scores(d, preds.loc[names, "uncertainty"].to_numpy(), back, elbo_gain=gain,
                             gain_groups=q_batch, obs_names=names)
    pd.testing.assert_frame_equal(df, again)


def test_elbo_gain_of_a_model_against_itself_is_zero(pbmc_fold_in):
    atlas, prev, ref, query, _ = pbmc_fold_in
    counts = sp.csr_matrix(query[:50, atlas.genes].X)
    m = atlas.model()
    b = np.full(50, len(atlas.batches) - 1)
    assert np.allclose(elbo_gain(m, m, counts, b, b), 0.0)
    assert np.allclose(elbo_gain(m, m, counts, b.tolist(), b), 0.0)  # a plain list of indices is one candidate
    # several candidate batch inputs: the best (smallest) old nELBO is used
    cands = [np.full(50, j) for j in range(len(prev.batches))]
    best = np.min([negative_elbo(prev.model(), counts, c) for c in cands], axis=0)
    gain = elbo_gain(prev.model(), m, counts, cands, b)
    assert np.allclose(gain, np.log(best / negative_elbo(m, counts, b)))


def test_query_shift_on_exchangeable_and_on_shifted_queries(pbmc, embedding):
    """Held-out reference cells keep the target rate when centred on themselves; a query whose
    cells all sit 20% farther from the reference (another chemistry, a stimulation) floods the
    reference-calibrated call, and taking the query's shift off takes back most of that excess
    (on the real ifnb shift, 9.9% -> 4.9%: benchmarks/novelty.py) without changing the ranking."""
    cal, d, unc, held, _, pred = split_reference(pbmc, embedding, 0, TransferConfig(k=50))
    same = N.novelty_scores(d, unc, cal, centre_on_query=True, predicted=pred)
    assert same.attrs["calibration"] == "query"
    assert abs(same["is_novel"].mean() - 0.05) < binomial_tolerance(0.05, held)
    plain = N.novelty_scores(1.2 * d, unc, cal)
    centred = N.novelty_scores(1.2 * d, unc, cal, centre_on_query=True, predicted=pred)
    assert plain["is_novel"].mean() > 0.10  # the shift alone doubles the known cells called novel
    assert abs(centred["is_novel"].mean() - 0.05) < binomial_tolerance(0.05, held)
    np.testing.assert_array_equal(plain["novelty"], centred["novelty"])  # same score, same ranking
    assert (centred["is_novel"] == (centred["novelty"] > centred.attrs["novelty_threshold"])).all()
    assert centred.attrs["query_shift"] > 0 and plain.attrs["query_shift"] == 0
    # a shifted query is told what the reference threshold alone calls and how to switch; an
    # exchangeable one is told nothing
    assert "novelty_calibration='query'" in N.calibration_note(plain)
    assert "config={'novelty_calibration': 'reference'}" in N.calibration_note(centred)
    assert N.calibration_note(same) is None and N.calibration_note(N.novelty_scores(d, unc, cal)) is None
    # too few cells per label to estimate a shift: the reference threshold, and the reason
    small = N.novelty_scores(1.2 * d[:20], unc[:20], cal, centre_on_query=True, predicted=pred[:20])
    assert small.attrs["calibration"] == "reference" and "fewer than 3 predicted labels" in small.attrs["calibration_fallback"]
    np.testing.assert_array_equal(small["is_novel"], plain["is_novel"][:20])
    with pytest.raises(InputError, match="predicted labels"):
        N.novelty_scores(d, unc, cal, centre_on_query=True)
    old = N.NoveltyCalibration(cal.k, cal.k_transfer, cal.kernel, cal.cells, cal.distance, cal.uncertainty)
    with pytest.raises(InputError, match="recompute it"):
        N.novelty_scores(d, unc, old, centre_on_query=True, predicted=pred)


def held_out_type_query(pbmc, embedding, novel_types: list[str]):
    """Reference: half of the 3pv2 cells of the other types; query: every 3pv2 cell of
    ``novel_types`` plus the other half. Returns (novelty scores with the reference threshold,
    with the query's shift off, is_novel, the calibration)."""
    donor = pbmc.obs["donor"].astype(str).to_numpy()
    labels = pbmc.obs["cell_type"].astype(str).to_numpy()
    new = np.isin(labels, novel_types)
    others = np.random.default_rng(0).permutation(np.flatnonzero((donor == "3pv2") & ~new))
    ref, spare = others[: len(others) // 2], others[len(others) // 2 :]
    cfg = TransferConfig()
    index = NeighborIndex.build(embedding[ref], labels[ref], cfg)
    cal = N.reference_calibration(index, embedding[ref], k_transfer=cfg.k, kernel=cfg.kernel)
    novel = np.flatnonzero((donor == "3pv2") & new)
    query = np.concatenate([novel, spare])
    d, i = index.search(embedding[query], cfg.k)
    probs = label_probabilities(d, index.neighbor_codes(i), len(index.categories), cfg.kernel)
    pred = np.asarray(index.categories)[probs.argmax(axis=1)]
    unc = 1.0 - probs.max(axis=1)
    shifted = N.novelty_scores(d, unc, cal, centre_on_query=True, predicted=pred)
    return N.novelty_scores(d, unc, cal), shifted, np.isin(query, novel), cal


def test_query_shift_is_not_taken_from_a_new_type_that_lands_in_one_of_three_labels():
    """The README's pancreas case in small: three labels count, every one about 0.3 farther than
    in the reference, and a new type, over half the query, lands in one of them (predicted as it)
    1.2 farther out. The overall median rises with the new cells; the upper quartile of three
    per-label differences lies half-way to that label's, so the old bound let half of it through
    as a shift (0.89) and a third of the new cells went uncalled. The bound is now the
    second-largest label's difference: the shift stays the known cells' (0.38) and every new cell
    is called."""
    rng = np.random.default_rng(1)
    ref_labels = np.repeat(["A", "B", "C"], 300)
    ref = rng.normal(5.0, 0.3, len(ref_labels))
    q_labels = np.array(["A"] * 70 + ["B"] * 15 + ["C"] * 15)
    query = rng.normal(5.3, 0.3, len(q_labels))
    query[:55] += 1.2  # the new type: 55 cells, all predicted A
    per_label = N.label_shifts(query, q_labels, ref, ref_labels)
    assert per_label["A"] > 1.2 and max(per_label["B"], per_label["C"]) < 0.5
    assert np.median(query) - np.median(ref) > 1  # the new cells pull the overall median up
    old_bound = np.quantile(list(per_label.values()), 0.75)
    assert old_bound > 0.8 and (N.conformal_pvalues(ref, query - old_bound) <= 0.05)[:55].mean() < 0.7
    shift = N.query_shift(query, q_labels, ref, ref_labels)
    assert 0.2 < shift < 0.5
    called = N.conformal_pvalues(ref, query - shift) <= 0.05
    assert called[:55].all() and called[55:].mean() < 0.15
    two = q_labels != "C"  # of two labels (min_labels=2) the shift still lies within their quartiles
    low, high = np.quantile([per_label["A"], per_label["B"]], [0.25, 0.75])
    assert low <= N.query_shift(query[two], q_labels[two], ref, ref_labels, min_labels=2) <= high


def test_query_shift_keeps_a_new_type_that_lands_in_few_labels(pbmc, embedding):
    """Monocytes (38% of the query) absent from the reference land in two labels (MK, DC) that
    hold too few reference cells to count; the labels that count barely move, their upper
    quartile caps the shift, and every monocyte is still called. The uncapped median over all
    query cells (not offered) centres part-way onto the monocytes and misses most of them."""
    reference, shifted, is_novel, cal = held_out_type_query(pbmc, embedding, ["Mono_CD14", "Mono_CD16"])
    assert shifted.attrs["calibration"] == "query" and abs(shifted.attrs["query_shift"]) < 1.0
    for df in (reference, shifted):
        assert df["is_novel"][is_novel].mean() > 0.95 and df["is_novel"][~is_novel].mean() < 0.1
    stat, ref_stat = shifted["novelty"].to_numpy(), cal.combined()
    whole = N.conformal_pvalues(ref_stat, stat - (np.median(stat) - np.median(ref_stat))) <= 0.05
    assert whole[is_novel].mean() < 0.5


def test_query_shift_limit_new_cells_spread_over_most_labels_and_the_note_says_so(pbmc, embedding):
    """The limit of the default: T cells (71% of the query) absent from the reference land in B
    and NK, two of the three labels with enough cells, so the overall median and the per-label
    differences alike look like a shift and most T cells look ordinary. The reference threshold
    calls them, and the note the predictions carry says so and names the switch."""
    reference, shifted, is_novel, _ = held_out_type_query(pbmc, embedding, ["T_CD4", "T_CD8"])
    assert reference["is_novel"][is_novel].mean() > 0.9
    assert shifted["is_novel"][is_novel].mean() < 0.5
    note = N.calibration_note(shifted)
    assert note is not None and "--novelty-calibration reference" in note


def test_averaged_novelty_keeps_its_target_for_any_batch_size_and_a_sampled_calibration():
    """Known cells (drawn like the reference) are called novel at no more than the target.

    Whether the query comes as one batch, as batches too small to average within (merged), or
    as fewer cells than the averaging takes (scored unaveraged), and whether the calibration is
    a sample of the reference (its cells averaged over neighbours among all reference cells).
    """
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(8000, 6)).astype(np.float32)
    labels = np.array(list("abcd"))[rng.integers(0, 4, len(ref))]
    index = NeighborIndex.build(ref, labels, TransferConfig())
    cal = N.reference_calibration(index, ref, k=10, k_transfer=50, groups=np.zeros(len(ref)), smoothing=10,
                                  max_cells=2000)
    assert cal.smoothing == 10 and cal.n == 2000 and cal.unaveraged().smoothing == 1
    for n, batch in ((3000, 3000), (3000, 1), (3000, 4), (6, 6)):
        q = rng.normal(size=(n, 6)).astype(np.float32)
        d, i = index.search(q, 50)
        unc = 1 - label_probabilities(d, index.neighbor_codes(i), 4).max(1)
        called = N.novelty_scores(d, unc, cal, embeddings=q, groups=np.arange(n) // batch)["is_novel"].mean()
        assert called <= 0.05 + binomial_tolerance(0.05, n), (n, batch, called)
    back = N.NoveltyCalibration.load(cal.save(Path(tempfile.mkdtemp()) / N.CALIBRATION_FILE))
    np.testing.assert_array_equal(back.unaveraged().distance, cal.unaveraged().distance)


def test_a_reference_batch_too_small_to_average_within_is_merged_as_a_query_batch_is():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(600, 5)).astype(np.float32)
    labels = np.array(list("ab"))[rng.integers(0, 2, len(ref))]
    index = NeighborIndex.build(ref, labels, TransferConfig())
    # a 20-cell batch is more than `smoothing` (10) but fewer than a query batch needs to be
    # averaged within itself (AVERAGED_MIN_CELLS * 10 = 40); with the two tiny ones it is still
    # under 40 cells, so all three join the largest batch, here every other cell
    groups = np.array(["big"] * 574 + ["mid"] * 20 + ["tiny"] * 3 + ["tinier"] * 3)
    m = N.AVERAGED_MIN_CELLS * 10
    np.testing.assert_array_equal(N.merge_small_groups(groups, m, len(ref)), np.full(len(ref), "big"))
    small = np.arange(574, 600)
    cal = N.reference_calibration(index, ref, k=10, k_transfer=50, groups=groups, smoothing=10, cells=small)
    one = N.reference_calibration(index, ref, k=10, k_transfer=50, groups=np.zeros(len(ref)), smoothing=10,
                                  cells=small)
    np.testing.assert_allclose(cal.distance, one.distance)
    np.testing.assert_allclose(cal.uncertainty, one.uncertainty)
    # and a query of the same cells in the same batches is averaged the same way
    d, _ = index.search(ref, 50)
    scores = N.signal_pvalues(one, d, np.zeros(len(ref)), embeddings=ref, groups=groups)
    apart = N.signal_pvalues(one, d, np.zeros(len(ref)), embeddings=ref, groups=np.zeros(len(ref)))
    np.testing.assert_allclose(scores["distance"][0], apart["distance"][0])


def test_a_few_stray_cells_join_the_largest_batch_and_leave_the_others_apart():
    # two batches of a query, each averaged within itself, and 3 cells of a third: those 3 once made
    # every cell one group, averaging each cell over both batches
    groups = np.array(["lane1"] * 60 + ["lane2"] * 40 + ["stray"] * 3)
    merged = N.merge_small_groups(groups, 10, len(groups))
    assert merged[:60].tolist() == ["lane1"] * 60 and merged[60:100].tolist() == ["lane2"] * 40
    assert merged[100:].tolist() == ["lane1"] * 3
    # small batches that together reach m are pooled as one group of their own
    pooled = N.merge_small_groups(np.array(["lane1"] * 60 + ["x"] * 6 + ["y"] * 6), 10, 72)
    assert len(set(pooled[60:])) == 1 and pooled[60] != "lane1" and set(pooled[:60]) == {"lane1"}
    # no batch of m cells: one group
    np.testing.assert_array_equal(N.merge_small_groups(np.array(["x"] * 4 + ["y"] * 4), 10, 8), np.zeros(8))


def test_small_queries_of_known_cells_are_not_called_novel_above_the_target():
    # ten neighbours span most of a query of a few dozen cells: averaged over them, one outlier moved
    # every cell's score together (16% of 12-cell queries called novel, 20% of them above 30%)
    from atlasengine.transfer.predict import calibrate, predict

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 3

    def draw(n):
        c = rng.integers(0, 3, n)
        return (centres[c] + rng.normal(size=(n, 6))).astype(np.float32), np.array(list("abc"))[c]

    ref, labels = draw(1500)
    cfg = TransferConfig(k=50, novelty_calibration="reference")
    index = NeighborIndex.build(ref, labels, cfg)
    cal = calibrate(index, ref, cfg)
    for n in (12, 20, 30):
        called = np.concatenate([predict(index, cal, draw(n)[0], cfg, [f"q{i}" for i in range(n)])["is_novel"]
                                 for _ in range(20)])
        assert called.mean() <= 0.05 + binomial_tolerance(0.05, len(called)), (n, called.mean())


def test_an_empty_query_is_scored_as_an_empty_frame_by_an_averaged_calibration():
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(300, 4)).astype(np.float32)
    index = NeighborIndex.build(ref, np.array(list("ab"))[rng.integers(0, 2, len(ref))], TransferConfig())
    cal = N.reference_calibration(index, ref, k=10, k_transfer=50, smoothing=10)
    out = N.novelty_scores(np.zeros((0, 50)), np.zeros(0), cal, embeddings=np.zeros((0, 4), np.float32))
    assert len(out) == 0 and "is_novel" in out.columns


def test_neighbourhood_mean_pools_small_batches_as_the_query_scores_are():
    # the public helper is the engine's averaging: a 15-cell batch (under 4 x 10 cells) is not
    # averaged within itself but with the largest batch, as signal_pvalues scores a query
    rng = np.random.default_rng(6)
    z = rng.normal(size=(60, 3)).astype(np.float32)
    v = rng.normal(size=60)
    groups = np.array(["A"] * 45 + ["B"] * 15)
    np.testing.assert_allclose(N.neighbourhood_mean(z, v, groups, 10), N.neighbourhood_mean(z, v, None, 10))
    both = N.neighbourhood_mean(z, np.column_stack([v, 2 * v]), groups, 10)
    np.testing.assert_allclose(both[:, 1], 2 * both[:, 0])


def test_the_novel_share_interval_holds_0_when_nothing_is_new_and_not_when_a_fifth_is():
    # found by a review: the interval counted every averaged cell as an independent call and the
    # target as the exact false-alarm rate, so with known cells only its low end passed 0 in 5 of
    # 16 simulated queries (a nominal one-sided 5%)
    import faiss

    from atlasengine.config import TransferConfig
    from atlasengine.transfer import NeighborIndex
    from atlasengine.transfer.predict import calibrate, predict

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(2)
    lows = []
    for rep in range(6):
        centres = rng.normal(scale=3.0, size=(4, 6))

        def draw(n):
            lab = rng.integers(0, 4, n)
            return (centres[lab] + rng.normal(size=(n, 6))).astype(np.float32), lab.astype(str)

        x, lab = draw(1500)
        q, _ = draw(1500)
        cfg = TransferConfig(k=30)
        index = NeighborIndex.build(x, lab, cfg)
        cal = calibrate(index, x, cfg)
        names = [str(i) for i in range(len(q))]
        lows.append(predict(index, cal, q, cfg, names).attrs["novel_share_interval"][0])
        if rep == 0:  # a fifth of the query from a place no reference cell sits
            q[:300] += 12.0
            p = predict(index, cal, q, cfg, names)
            low, high = p.attrs["novel_share_interval"]
            assert 0.1 < low <= p.attrs["novel_share"] <= high and low <= 0.2 <= high + 0.02
    assert max(lows) == 0.0


def test_an_atlas_with_too_few_labelled_cells_for_the_cut_still_calibrates_and_says_nothing_can_be_novel(caplog):
    # create refuses fewer than 19 labelled cells at the 5% target; an atlas made before that rule
    # (or a call asking for a 1% target) still calibrates and labels, and says no cell can be novel
    import logging

    from atlasengine.config import TransferConfig
    from atlasengine.transfer import NeighborIndex
    from atlasengine.transfer.predict import calibrate, predict

    rng = np.random.default_rng(0)
    x = rng.normal(size=(15, 4)).astype(np.float32)
    labels = np.array(["a", "b", "c"] * 5)
    cfg = TransferConfig(k=5)
    index = NeighborIndex.build(x, labels, cfg)
    cal = calibrate(index, x, cfg)  # no refusal: 15 >= novelty_k + 1
    far = (x[:4] + 100.0).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="atlasengine"):
        p = predict(index, cal, far, cfg, ["q0", "q1", "q2", "q3"])
    assert not p["is_novel"].any() and "is infinite, so no cell can be called novel" in p.attrs["novelty_note"]
    assert "is infinite" in caplog.text
