"""Novelty scores (issue 6): each signal and their combination vs the scArches kNN uncertainty.

    python -m benchmarks.novelty [--quick] [--out DIR] [--seeds N]

Per scenario and seed a reference is trained (held-out types removed) and the query is folded
in blind with ``ewc``. Every signal of :mod:`atlasengine.transfer.novelty` is scored on the
query: novel-vs-known AUROC, the share of KNOWN query cells called Unknown at the calibrated
5% target (``fa@5%``) and the share of NOVEL cells called Unknown there (``novel@5%``).
Calibration uses reference cells only (leave-one-out); query labels are used for scoring only.

Signals: ``uncertainty`` (the anchor: scArches weighted-kNN uncertainty, also shown at its own
0.3 cut-off), ``distance`` (mean distance to the 10 nearest reference cells, from the transfer's search), ``distance_label``
(the same, calibrated within the predicted label: a measured alternative), ``elbo_gain``
(log nELBO_old / nELBO_new), ``novelty`` (default combination: Fisher of distance +
uncertainty p-values) and ``novelty+gain`` (Fisher of all three).

:func:`atlas_novelty` is the reference wiring: what ``Atlas.ingest`` has to compute.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pandas as pd

from benchmarks import common as C

TARGET = 0.05
SIGNAL_ORDER = ["uncertainty", "distance", "distance_label", "elbo_gain", "novelty", "novelty_reference",
                "novelty_global_centred", "novelty_label_median", "novelty+gain", "novelty_query_adaptive", "novelty_k20", "novelty_k50"]
METRICS = ["auroc", "fa@5%", "novel@5%"]


# ------------------------------------------------------------------------------- wiring
def atlas_novelty(atlas, query, ref, batch_key: str, predictions: pd.DataFrame, k: int | None = None,
                  max_cells: int = 5000, seed: int = 0) -> tuple[pd.DataFrame, object]:
    """Novelty of the ``query`` just folded into ``atlas`` (its newest version): (scores, calibration).

    ``ref``: the reference AnnData (raw counts; the atlas would read these cells from its store).

    What ``Atlas.ingest`` needs, all available inside ``_write_version``:
    ``z`` (all cells under the new model), the labelled mask / index, the new and the parent
    model, the query counts aligned to the atlas genes and the batch indices.
    """
    import scipy.sparse as sp

    from atlasengine import Atlas
    from atlasengine.transfer import novelty as N

    prev = Atlas.open(atlas.path, version=atlas.info.parent)
    tcfg = atlas.config.transfer
    k = tcfg.novelty_k if k is None else k
    obs, z = atlas.obs(), atlas.latent()
    labelled = obs["label"].notna().to_numpy()
    index = atlas.neighbor_index()
    new_model, old_model = atlas.model(), prev.model()
    lookup_new, lookup_old = pd.Index(atlas.batches), pd.Index(prev.batches)

    # calibration: leave-one-out scores of a sample of labelled (reference) cells + their own ELBO gain
    cells = N.calibration_cells(index.n, max_cells, seed)
    ref_obs = obs[labelled].iloc[cells]
    ref_counts = sp.csr_matrix(ref[list(ref_obs.index), atlas.genes].X, dtype=np.float32)
    gain_ref = N.elbo_gain(old_model, new_model, ref_counts, lookup_old.get_indexer(ref_obs["batch"]),
                           lookup_new.get_indexer(ref_obs["batch"]))
    cal = N.reference_calibration(index, z[labelled], k=k, k_transfer=tcfg.k, kernel=tcfg.kernel, cells=cells,
                                  elbo_gain=gain_ref, gain_groups=ref_obs["batch"].to_numpy())

    # the query: distances to the reference (the transfer's search), its uncertainty, its ELBO gain
    q_names = [str(c) for c in query.obs_names]
    pos = obs.index.get_indexer(q_names)
    dist, _ = index.search(z[pos], max(k, tcfg.k))
    counts = sp.csr_matrix(query[:, atlas.genes].X, dtype=np.float32)
    q_batch = query.obs[batch_key].astype(str).to_numpy()
    gain = N.elbo_gain(old_model, new_model, counts, np.full(len(q_names), -1), lookup_new.get_indexer(q_batch))
    unc = predictions.loc[q_names, "uncertainty"].to_numpy()
    scores = N.novelty_scores(dist, unc, cal, elbo_gain=gain, gain_groups=q_batch, target_rate=TARGET, obs_names=q_names,
                              centre_on_query=tcfg.novelty_calibration == "query",
                              predicted=predictions.loc[q_names, "predicted_label"].astype(str).to_numpy())
    return scores, cal


# ------------------------------------------------------------------------------ scoring
def groups_of(labels: np.ndarray, min_cells: int) -> np.ndarray:
    """Labels with fewer than ``min_cells`` cells pooled into one group."""
    lab = np.asarray(labels).astype(object)
    vals, counts = np.unique(lab.astype(str), return_counts=True)
    small = set(vals[counts < min_cells])
    return np.array(["<small>" if str(v) in small else str(v) for v in lab])


def per_label_distance(cal, pred_r: np.ndarray, dist_q: np.ndarray, predicted: np.ndarray, min_cells: int = 10):
    """Compute distance p-values calibrated within the predicted label.

    Reference cells are grouped by their leave-one-out predicted label; labels with fewer than
    ``min_cells`` calibration cells use all.
    """
    from atlasengine.transfer import novelty as N

    p = np.empty(len(dist_q))
    for lab in np.unique(predicted):
        m = predicted == lab
        ref = cal.distance[pred_r == lab]
        p[m] = N.conformal_pvalues(ref if len(ref) >= min_cells else cal.distance, dist_q[m])
    return p


def query_adaptive(cal, pred_r: np.ndarray, scores: pd.DataFrame, predicted: np.ndarray, min_cells: int = 10):
    """Score with a measured alternative calibration that adapts to the query.

    Log distance as a robust z-score within the predicted label, computed on the query's own
    cells (reference cells: within their leave-one-out predicted label), then conformal + Fisher
    with the uncertainty as in the default. Returns (Fisher statistic, conformal p-value).
    Assumes novel cells are a minority of each label.
    """
    from atlasengine.transfer import novelty as N

    zq = N.robust_z(np.log(scores["distance"].to_numpy()), groups_of(predicted, min_cells))
    zr = N.robust_z(np.log(cal.distance), groups_of(pred_r, min_cells))
    stat = N.fisher_statistic([N.conformal_pvalues(zr, zq), scores["uncertainty_pvalue"].to_numpy()])
    ref = N.fisher_statistic([N.loo_pvalues(zr), N.loo_pvalues(cal.uncertainty)])
    return stat, N.conformal_pvalues(ref, stat)


def novelty_at_k(atlas, names: list[str], predictions: pd.DataFrame, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Score with the default combination and calibration, the distance over ``k`` neighbours: (statistic, p-value)."""
    from atlasengine.transfer import novelty as N

    obs, z, tcfg = atlas.obs(), atlas.latent(), atlas.config.transfer
    index = atlas.neighbor_index()
    cal = N.reference_calibration(index, z[obs["label"].notna().to_numpy()], k=k, k_transfer=tcfg.k, kernel=tcfg.kernel)
    dist, _ = index.search(z[obs.index.get_indexer(names)], max(k, tcfg.k))
    s = N.novelty_scores(dist, predictions.loc[names, "uncertainty"].to_numpy(), cal, target_rate=TARGET,
                         centre_on_query=tcfg.novelty_calibration == "query",
                         predicted=predictions.loc[names, "predicted_label"].astype(str).to_numpy())
    return s["novelty"].to_numpy(), s["novelty_pvalue"].to_numpy()


def evaluate(scores: pd.DataFrame, predictions: pd.DataFrame, truth: np.ndarray, novel_labels, p_label, adaptive,
             cal, other_k: dict[int, tuple[np.ndarray, np.ndarray]]) -> list[dict]:
    from sklearn.metrics import roc_auc_score

    from atlasengine.transfer import novelty as N

    novel = np.isin(truth, sorted(novel_labels))
    known = ~novel

    def row(name, score, pvals, **extra):
        called = pvals <= TARGET
        return {"signal": name, "auroc": float(roc_auc_score(novel, score)), "fa@5%": float(called[known].mean()),
                "novel@5%": float(called[novel].mean()), **extra}

    unc = predictions.loc[scores.index, "uncertainty"].to_numpy()
    thr = predictions.attrs.get("uncertainty_threshold", 0.3)
    pv = {s: scores[f"{s}_pvalue"].to_numpy() for s in ("distance", "uncertainty", "elbo_gain")}
    both, cal_both = N.combine(pv, cal, ("distance", "uncertainty", "elbo_gain"))
    p_both = N.conformal_pvalues(cal_both, both)
    dist = scores["distance"].to_numpy()
    cal_default = cal.combined()
    stat = scores["novelty"].to_numpy()
    shifts = N.label_shifts(stat, predictions.loc[scores.index, "predicted_label"].astype(str).to_numpy(), cal_default,
                            cal.predicted)
    label_median = float(np.median(list(shifts.values()))) if shifts else 0.0
    return [
        row("uncertainty", unc, pv["uncertainty"], fa_at_cutoff=float((unc > thr)[known].mean()),
            novel_at_cutoff=float((unc > thr)[novel].mean())),
        row("distance", dist, pv["distance"]),
        # ties in the discrete per-label p-value broken by the distance itself
        row("distance_label", -p_label + 1e-9 * dist / max(dist.max(), 1e-12), p_label),
        row("elbo_gain", scores["elbo_gain"].to_numpy(), pv["elbo_gain"]),
        row("novelty", scores["novelty"].to_numpy(), scores["novelty_pvalue"].to_numpy()),
        row("novelty_reference", stat, N.conformal_pvalues(cal_default, stat)),
        # the median over all query cells instead of over labels (measured alternative)
        row("novelty_global_centred", stat,
            N.conformal_pvalues(cal_default, stat - (np.median(stat) - np.median(cal_default)))),
        row("novelty_label_median", stat, N.conformal_pvalues(cal_default, stat - label_median)),
        row("novelty+gain", both, p_both),
        row("novelty_query_adaptive", *adaptive),
        *[row(f"novelty_k{k}", *v) for k, v in sorted(other_k.items())],
    ]


def run_one(sc, ref, query, seed: int, cfg: dict, work) -> tuple[list[dict], dict]:
    from atlasengine.transfer import evaluate_transfer

    C.create_reference(work / "ref.atlas", sc, ref, seed, cfg["ref_epochs"], cfg["query_epochs"],
                       fisher_max_cells=cfg["fisher_max_cells"])
    atlas, res, wall = C.fold_in(work / "ref.atlas", work / "ewc.atlas", query, sc, "ewc",
                                 continual={"fisher_max_cells": cfg["fisher_max_cells"]})
    t0 = time.perf_counter()
    scores, cal = atlas_novelty(atlas, query, ref, sc.batch_key, res.predictions)
    secs = time.perf_counter() - t0
    truth = query.obs[sc.label_key].astype(str).loc[scores.index].to_numpy()
    pred = res.predictions.loc[scores.index, "predicted_label"].astype(str).to_numpy()
    pred_r = cal.predicted  # each calibration cell's leave-one-out predicted label
    p_label = per_label_distance(cal, pred_r, scores["distance"].to_numpy(), pred)
    adaptive = query_adaptive(cal, pred_r, scores, pred)
    other_k = {k: novelty_at_k(atlas, list(scores.index), res.predictions, k) for k in (20, 50) if k != cal.k}
    rows = evaluate(scores, res.predictions, truth, sc.novel, p_label, adaptive, cal, other_k)
    ev = evaluate_transfer(res.predictions, query.obs[sc.label_key], set(sc.novel))
    for r in rows:
        r.update(novelty_seconds=secs, fold_in_seconds=wall, known_accuracy=ev["known_accuracy"],
                 n_known=ev["n_known"], n_novel=ev["n_novel"], n_calibration=cal.n)
    fig = {"scores": scores, "novel": np.isin(truth, sorted(sc.novel)), "cal": cal}
    return rows, fig


# ------------------------------------------------------------------------------- output
def plot(fig_data: dict, name: str, path) -> None:
    """Histograms of each signal, known vs novel query cells, with the reference calibration."""
    from atlasengine.transfer import novelty as N

    plt = C.matplotlib_agg()
    s, novel, cal = fig_data["scores"], fig_data["novel"], fig_data["cal"]
    panels = [("uncertainty", s["uncertainty"], cal.uncertainty), (f"distance (k={cal.k})", s["distance"], cal.distance),
              ("ELBO gain (log ratio)", s["elbo_gain"], None),
              ("novelty (Fisher: dist+unc)", s["novelty"], cal.combined(N.DEFAULT_COMBINATION))]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.2))
    for ax, (title, v, ref) in zip(axes, panels):
        v = np.asarray(v, dtype=float)
        lo, hi = np.nanmin(v), np.nanmax(v)
        if ref is not None:
            lo, hi = min(lo, ref.min()), max(hi, ref.max())
        bins = np.linspace(lo, hi, 30)
        if ref is not None:
            ax.hist(ref, bins, density=True, histtype="step", color="0.5", label="reference (LOO)")
        ax.hist(v[~novel], bins, density=True, alpha=0.5, label="known query")
        ax.hist(v[novel], bins, density=True, alpha=0.5, label="novel query")
        if title.startswith("novelty"):
            ax.axvline(s.attrs["novelty_threshold"], color="k", lw=0.8, ls="--")
        ax.set_title(title, fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0].legend(fontsize=5)
    fig.suptitle(f"{name}: known vs novel query cells (seed 0)", fontsize=8)
    fig.tight_layout()
    C.save_fig(fig, path)


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], default_seeds=3)
    cfg = ({"ref_epochs": 10, "query_epochs": 5, "fisher_max_cells": 200} if args.quick
           else {"ref_epochs": 150, "query_epochs": 100, "fisher_max_cells": 2000})
    C.quiet()
    t_start = time.perf_counter()
    rows, figs = [], {}
    for seed in range(args.seeds):
        for name, sc in C.SCENARIOS.items():
            ref, query = C.load_scenario(name)
            work = C.work_dir(args.out, f"novelty_{name}_s{seed}")
            t0 = time.perf_counter()
            out, fig = run_one(sc, ref, query, seed, cfg, work)
            shutil.rmtree(work, ignore_errors=True)
            rows += [{"scenario": name, "seed": seed, **r} for r in out]
            if seed == 0:
                figs[name] = fig
            print(f"{name} seed {seed} ({time.perf_counter() - t0:.0f}s): " + "  ".join(
                f"{r['signal']} {r['auroc']:.3f}/{r['fa@5%']:.3f}" for r in out), flush=True)
    df = pd.DataFrame(rows)
    wall = time.perf_counter() - t_start
    summary = C.mean_sd(df, ["scenario", "signal"], METRICS + ["fa_at_cutoff", "novel_at_cutoff"])
    wide = {}
    for (scen, sig), g in df.groupby(["scenario", "signal"], sort=False):
        for m in METRICS:
            v = g[m].astype(float)
            wide.setdefault(sig, {})[f"{scen} {m}"] = (f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1
                                                       else f"{v.mean():.3f}")
    table = pd.DataFrame([{"signal": s, **wide[s]} for s in SIGNAL_ORDER if s in wide])
    means = df.groupby(["scenario", "signal"])[["auroc", "fa@5%"]].mean()
    checks = {
        "pbmc_novelty_auroc": float(means.loc[("pbmc", "novelty"), "auroc"]),
        "auroc_not_lower": {s: bool(means.loc[(s, "novelty"), "auroc"] >= means.loc[(s, "uncertainty"), "auroc"])
                            for s in C.SCENARIOS},
        "fa_within_2_points": {s: bool(abs(means.loc[(s, "novelty"), "fa@5%"] - TARGET) <= 0.02 + 1e-9)
                               for s in C.SCENARIOS},
        "fa_within_2_points_reference": {
            s: bool(abs(means.loc[(s, "novelty_reference"), "fa@5%"] - TARGET) <= 0.02 + 1e-9) for s in C.SCENARIOS},
    }
    md = [
        "# Novelty scores vs the scArches kNN uncertainty" + (" (QUICK MODE: smoke run, numbers not meaningful)" if args.quick else ""),
        "",
        f"{args.seeds} seed(s), mean ± sd over seeds. Reference {cfg['ref_epochs']} epochs, ewc fold-in {cfg['query_epochs']} "
        "epochs (atlas defaults otherwise), query ingested blind. `auroc`: novel vs known query cells; `fa@5%`: share of "
        "KNOWN query cells called Unknown at the calibrated 5% target (conformal p <= 0.05 against leave-one-out "
        "reference cells, after the query's shift for `novelty`; target 0.05, goal within 0.02); `novel@5%`: share of "
        "NOVEL query cells called Unknown there.",
        "",
        "- `uncertainty`: scArches weighted-kNN uncertainty (the anchor). At its own 0.3 cut-off it called "
        + ", ".join(f"{s}: {df[(df.scenario == s) & (df.signal == 'uncertainty')].fa_at_cutoff.mean():.1%} of known / "
                    f"{df[(df.scenario == s) & (df.signal == 'uncertainty')].novel_at_cutoff.mean():.1%} of novel"
                    for s in C.SCENARIOS) + " cells Unknown.",
        "- `distance`: mean Euclidean distance to the 10 nearest reference cells (new version's latent; "
        "`TransferConfig.novelty_k`, 10 / 20 / 50 compared in `atlasengine.transfer.novelty.DEFAULT_K`), "
        "calibrated by reference cells' leave-one-out distances.",
        "- `distance_label`: the same distance calibrated within the predicted label (reference cells grouped by "
        "their leave-one-out predicted label; < 10 cells -> all).",
        "- `elbo_gain`: log(nELBO old model, zero batch input / nELBO new model, own batch), nELBO at the "
        "posterior mean; p-value: within-batch robust z vs reference cells' within-batch robust z of their own gain.",
        "- `novelty` (the default): Fisher's -2 sum log p of distance + uncertainty. Threshold: conformal against "
        "the reference cells' Fisher statistics from leave-one-out p-values, applied to the query's statistics minus "
        "the query's shift (`novelty_calibration='query'`: the median difference between query and reference cells, "
        "kept within the quartiles of the per-label median differences; `atlasengine.transfer.novelty.query_shift`).",
        "- `novelty_reference` (`novelty_calibration='reference'`): the same score and threshold without the shift "
        "(exact when known query cells are exchangeable with reference cells). Same ranking, so the same AUROC.",
        "- `novelty_global_centred` (measured alternative): the shift without the cap; a new type that is a large "
        "share of the query moves it (tests/test_novelty.py), so it is not offered.",
        "- `novelty_label_median` (measured alternative): the shift as the median of the per-label differences.",
        "- `novelty+gain`: Fisher of all three signals, reference threshold.",
        "- `novelty_k20`, `novelty_k50`: the default combination and calibration with the distance over 20 / 50 "
        "neighbours (measured alternatives to `novelty_k` 10).",
        "- `novelty_query_adaptive` (measured alternative, not the default): log distance as a robust z-score within "
        "the predicted label on the query's own cells (reference: within the leave-one-out predicted label), then "
        "Fisher with the uncertainty; adapts the threshold to batch shift, assumes novel cells are a minority of "
        "every predicted label.",
        "",
        C.md_table(table),
        "",
        f"Checks: pbmc novelty AUROC {checks['pbmc_novelty_auroc']:.3f} (goal >= 0.80); novelty AUROC >= uncertainty "
        f"AUROC: {checks['auroc_not_lower']}; novelty fa@5% within 2 points of 5%: {checks['fa_within_2_points']}; "
        f"the same with the reference threshold: {checks['fa_within_2_points_reference']}.",
        "",
        f"Novelty scoring took {df.novelty_seconds.mean():.1f} s per fold-in on average (calibration + ELBO gains; "
        f"the fold-in itself {df.fold_in_seconds.mean():.0f} s). Total wall time {wall / 60:.1f} min.",
        "",
        *[f"![{s}](novelty_{s}.png)" for s in figs],
    ]
    C.write_outputs(args.out, "novelty", {"quick": args.quick, "settings": cfg, "seeds": args.seeds, "target": TARGET,
                                          "checks": checks, "records": df.to_dict("records"),
                                          "summary": summary.to_dict("records"), "wall_seconds": wall}, "\n".join(md))
    for name, fig in figs.items():
        plot(fig, name, args.out / f"novelty_{name}.png")


if __name__ == "__main__":
    main()
