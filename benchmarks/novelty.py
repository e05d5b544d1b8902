"""Novelty rules side by side (issue 16), with few and with many new cells in the query.

    python -m benchmarks.novelty [--strategy ewc|finetune|surgery|anchor] [--quick] [--out DIR] [--seeds N] [--jobs N]
                                 [--scenarios a,b]

Per scenario and seed a reference is trained without the held-out types and the query is
folded in blind with ``ewc`` (the engine's default; ``--strategy`` folds it in with finetune or
surgery instead, written to ``novelty_<strategy>.*``: how much of a miss is the strategy's;
``anchor`` is ewc with the embedding anchor in place of the EWC penalty, ``benchmarks.common.ANCHOR``).
Every rule then scores the same fold-in (the same embedding, the same neighbour index); only the
rule changes:

- ``novelty`` (the default): Fisher's combination of the distance to the 10 nearest reference
  cells and the kNN uncertainty, each averaged over the cell's 10 nearest cells of its batch
  (``novelty_smoothing``), calibrated against reference cells averaged the same way, the
  query's shift taken off (``novelty_calibration='query'``).
- ``novelty_reference``: the same, against the reference alone (no shift taken off).
- ``novelty_unsmoothed``: no averaging (``novelty_smoothing=1``): the default before issue 16.
- ``novelty_unsmoothed_reference``: no averaging, the reference alone.
- ``novelty_m30``: averaged over 30 cells.
- ``uncertainty``: the paper's rule, Unknown above 0.3 (scArches; the HLCA notebooks use 0.2);
  the atlas's default ``unknown_rule`` until format 7, ``novelty`` since.
- ``composition`` (not in the engine, measured here only): the neighbourhood's mix of query and
  reference cells (:func:`composition_scores`), called at the same 5% target against the
  reference cells' own mix in the same neighbour graph. A new type forms neighbourhoods of
  query cells only, and a query shifted as a whole should mix as badly on both sides: a
  candidate for telling many new cells from a shift.
- ``novelty_or_composition``: called where either the default rule or ``composition`` calls,
  each at half the target (Bonferroni: p = 2 x the smaller p-value).
- ``distance_only`` (not in the engine, measured here only): the default rule's distance signal
  alone (its -log p-value; ties broken by the default's Fisher statistic), the query's shift taken
  off and the threshold calibrated as the default's (:func:`weighted_rule`).
- ``learned_weights`` (not in the engine, measured here only): the two signals' -log p-values
  weighted by what tells the reference's own types apart: each reference type is held out in turn,
  scored against the other types (the engine's index, kNN vote and averaging), and a logistic
  regression with balanced classes separates those cells from the calibration cells
  (:func:`reference_weights`; negative weights clipped to 0). Scored and called as
  ``distance_only``.

Scenarios: the four of ``benchmarks.common.SCENARIOS`` and two where the new cells are about
half the query (``benchmarks.common.HALF_NOVEL``: kang without CD4 T cells, 63% of donor 1488
new; pbmc without T_CD4, 39% new). Query labels are used for scoring only.

Beside the rules, per scenario and seed, the same held-out types known: a reference of the same
batches with them labelled, the same query folded in with ``ewc``; the summed kNN probability
of the held-out types ranks the query cells (its AUROC and ``best@7%``), and a cell is caught
when its best label is one of them. What an atlas that had the types all along tells apart in
its own embedding: how far the bar is from what the data and the model allow.

Per rule: AUROC (new vs known), the share of known cells called and of new cells caught at the
rule's default, the best share of new cells any cut of the same score catches with at most 7%
of known cells called (``best@7%``: what the ranking allows), and for the default rule the
estimated share of new cells with its 90% interval against the true share. A figure per
scenario plots every rule's operating curve (known cells called against new cells caught as
the target, or the uncertainty cut-off, moves).
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pandas as pd

from benchmarks import common as C

SCENARIOS = (*C.SCENARIOS, *C.HALF_NOVEL)
RULES = {  # name: TransferConfig changes (None: the paper's uncertainty cut-off)
    "novelty": {},
    "novelty_reference": {"novelty_calibration": "reference"},
    "novelty_unsmoothed": {"novelty_smoothing": 1},
    "novelty_unsmoothed_reference": {"novelty_smoothing": 1, "novelty_calibration": "reference"},
    "novelty_m30": {"novelty_smoothing": 30},
    "uncertainty": None,
    "composition": "composition",
    "novelty_or_composition": "novelty_or_composition",
    "distance_only": "distance_only",
    "learned_weights": "learned_weights",
}
COMPOSITION_K = 50
"""Neighbours whose mix of query and reference cells ``composition_scores`` counts (the label transfer's k)."""
TARGETS = np.r_[0.001, 0.0025, np.arange(0.005, 0.05, 0.005), np.arange(0.05, 0.31, 0.01), 0.35, 0.4, 0.5]
CUTOFFS = np.linspace(0.0, 1.0, 101)
BAR_KNOWN, BAR_CAUGHT, BAR_AUROC = 0.07, 0.80, 0.95
DEFAULT_STRATEGY = "ewc"


def scenario(name: str) -> C.Scenario:
    return C.SCENARIOS[name] if name in C.SCENARIOS else C.HALF_NOVEL[name]


# ------------------------------------------------------------------------------ scoring
def rule_scores(atlas, names: list[str], predictions: pd.DataFrame, changes: dict | None) -> pd.DataFrame:
    """Score the folded-in cells ``names`` with the atlas's transfer settings changed by ``changes``.

    Does what the fold-in does (calibrate on the labelled cells, then predict), with the stored
    embedding and neighbour index, so only the rule differs. ``changes=None``: the paper's rule.
    """
    from atlasengine.transfer.predict import calibrate, predict

    if changes is None:
        p = predictions.loc[names]
        return pd.DataFrame({"score": p["uncertainty"].to_numpy(), "pvalue": np.nan,
                             "called": (p["uncertainty"] > p.attrs.get("uncertainty_threshold", 0.3)).to_numpy()},
                            index=names)
    tcfg = atlas.config.transfer.model_copy(update=changes)
    obs, z = atlas.obs(), atlas.latent()
    labelled = obs["label"].notna().to_numpy()
    batches = obs["batch"].astype(str).to_numpy()
    index = atlas.neighbor_index()
    cal = calibrate(index, z[labelled], tcfg, batches[labelled])
    rows = obs.index.get_indexer(names)
    p = predict(index, cal, z[rows], tcfg, names, batches=batches[rows])
    out = pd.DataFrame({"score": p["novelty"].to_numpy(), "pvalue": p["novelty_pvalue"].to_numpy(),
                        "called": (p["novelty_pvalue"] <= tcfg.novelty_target).to_numpy()}, index=names)
    out.attrs.update(novel_share=p.attrs["novel_share"], novel_share_interval=p.attrs["novel_share_interval"])
    return out


def composition_scores(atlas, names: list[str], k: int = COMPOSITION_K) -> pd.DataFrame:
    """Score query cells ``names`` by how much their neighbourhood holds query cells only; p-values against the reference.

    Score: log-odds of the share of query cells among the cell's ``k`` nearest other atlas
    cells (reference and query together), less the log-odds of the query's share of all cells,
    averaged over the cell's nearest query cells (the engine's ``novelty_smoothing``, its own
    ``neighbourhood_mean``). The null is the reference side of the same graph: each reference
    cell's share of reference cells among its ``k`` nearest, against the reference's share of
    all cells, averaged over its nearest reference cells of its batch; p-values are conformal
    (the engine's ``conformal_pvalues``). A query that mixes badly with the reference because
    it is shifted as a whole shows the same lack of mixing on both sides.
    """
    from scipy.special import logit

    from atlasengine.numerics import self_excluding_knn
    from atlasengine.transfer.novelty import conformal_pvalues, neighbourhood_mean

    obs, z = atlas.obs(), atlas.latent()
    is_query = obs.index.isin(names)
    _, nearest = self_excluding_knn(z, k)
    own = (is_query[nearest] == is_query[:, None]).sum(1)
    share = np.where(is_query, is_query.mean(), 1.0 - is_query.mean())
    score = logit((own + 0.5) / (nearest.shape[1] + 1.0)) - logit(share)
    m = atlas.config.transfer.novelty_smoothing
    batches = obs["batch"].astype(str).to_numpy()
    query_score = neighbourhood_mean(z[is_query], score[is_query], None, m)
    reference_score = neighbourhood_mean(z[~is_query], score[~is_query], batches[~is_query], m)
    out = pd.DataFrame({"score": query_score, "pvalue": conformal_pvalues(reference_score, query_score)},
                       index=obs.index[is_query]).loc[names]
    out["called"] = out["pvalue"] <= atlas.config.transfer.novelty_target
    return out


def signal_evidence(atlas, names: list[str], predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, object, dict]:
    """Return the default rule's evidence for query cells ``names``, as the atlas computes it.

    (-log p of distance and uncertainty for the query cells, the same for the calibration cells' own
    leave-one-out scores, the calibration, the labelled cells' data). ``predictions``: the fold-in's,
    whose ``uncertainty`` is the query's kNN uncertainty.
    """
    from atlasengine.transfer.novelty import loo_pvalues, signal_pvalues

    obs, z = atlas.obs(), atlas.latent()
    labelled = obs["label"].notna().to_numpy()
    batches = obs["batch"].astype(str).to_numpy()
    index = atlas.neighbor_index()
    ref = {"z": z[labelled].astype(np.float32), "labels": obs["label"][labelled].astype(str).to_numpy(),
           "batches": batches[labelled]}
    cal = atlas.novelty_calibration()  # stored with the version by the fold-in
    rows = obs.index.get_indexer(names)
    distances, _ = index.search(z[rows], cal.k)
    per = signal_pvalues(cal, distances, predictions.loc[names, "uncertainty"].to_numpy(), embeddings=z[rows],
                         groups=batches[rows])
    query = np.c_[-np.log(per["distance"][1]), -np.log(per["uncertainty"][1])]
    own = np.c_[-np.log(loo_pvalues(cal.distance)), -np.log(loo_pvalues(cal.uncertainty))]
    return query, own, cal, ref


def reference_weights(own: np.ndarray, cal, ref: dict, tcfg, min_cells: int = 10) -> np.ndarray:
    """Weights of the two signals' -log p-values that tell each reference type, held out, from the reference's cells.

    Each type of at least ``min_cells`` cells is held out in turn: its cells are searched among the other types
    (the engine's :class:`NeighborIndex`), their distance and kNN uncertainty averaged over their nearest cells of
    their batch as the calibration's are, and turned into p-values against the calibration; a logistic regression
    (balanced classes) separates them from the calibration cells (``own``: their -log p-values,
    :func:`signal_evidence`). Negative weights are clipped to 0.
    """
    from sklearn.linear_model import LogisticRegression

    from atlasengine.transfer import NeighborIndex, label_probabilities
    from atlasengine.transfer.novelty import conformal_pvalues, knn_distance, neighbourhood_mean

    held = []
    for label in np.unique(ref["labels"]):
        out = ref["labels"] == label
        if out.sum() < min_cells or (~out).sum() <= tcfg.k:
            continue
        rest = NeighborIndex.build(ref["z"][~out], ref["labels"][~out], tcfg)
        d, i = rest.search(ref["z"][out], max(cal.k, tcfg.k))
        probs = label_probabilities(d[:, : tcfg.k], rest.neighbor_codes(i[:, : tcfg.k]), len(rest.categories),
                                    tcfg.kernel)
        dist = neighbourhood_mean(ref["z"][out], knn_distance(d, cal.k), ref["batches"][out], cal.smoothing)
        unc = neighbourhood_mean(ref["z"][out], 1.0 - probs.max(1), ref["batches"][out], cal.smoothing)
        held.append(np.c_[-np.log(conformal_pvalues(cal.distance, dist)),
                          -np.log(conformal_pvalues(cal.uncertainty, unc))])
    if not held:
        return np.ones(2)
    x = np.vstack([own, *held])
    y = np.r_[np.zeros(len(own)), np.ones(len(x) - len(own))]
    return np.maximum(LogisticRegression(class_weight="balanced").fit(x, y).coef_[0], 0.0)


def weighted_rule(query: np.ndarray, own: np.ndarray, weights: np.ndarray, predicted: np.ndarray, cal,
                  target: float, names: list[str]) -> pd.DataFrame:
    """Score cells by ``weights`` . (-log p), ties broken by the Fisher statistic; call them as the default rule does.

    The query's shift is taken off and the threshold calibrated on the calibration cells' own scores.
    """
    from atlasengine.transfer.novelty import calibrated_unknown, query_shift

    tiebreak = 1e-6
    stat = query @ weights + tiebreak * 2 * query.sum(1)
    null = own @ weights + tiebreak * 2 * own.sum(1)
    shift = query_shift(stat, predicted, null, cal.predicted)
    p, called = calibrated_unknown(stat - (shift or 0.0), null, target)
    return pd.DataFrame({"score": stat, "pvalue": p, "called": called}, index=names)


def either_rule(first: pd.DataFrame, second: pd.DataFrame, target: float) -> pd.DataFrame:
    """Call a cell where either rule calls it at half the target: p = min(1, 2 x the smaller p-value)."""
    p = np.minimum(1.0, 2.0 * np.minimum(first["pvalue"].to_numpy(), second["pvalue"].to_numpy()))
    return pd.DataFrame({"score": -p, "pvalue": p, "called": p <= target}, index=first.index)


def operating_curve(s: pd.DataFrame, novel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share of known cells called, share of new cells caught) as the target (or cut-off) moves."""
    if s["pvalue"].isna().all():
        called = s["score"].to_numpy()[None, :] > CUTOFFS[:, None]
    else:
        called = s["pvalue"].to_numpy()[None, :] <= TARGETS[:, None]
    return called[:, ~novel].mean(1), called[:, novel].mean(1)


def best_caught(score: np.ndarray, novel: np.ndarray, max_known: float = BAR_KNOWN) -> float:
    """Largest share of new cells any cut of ``score`` catches with at most ``max_known`` of known cells called."""
    known = np.sort(score[~novel])[::-1]
    allowed = int(np.floor(max_known * len(known)))
    cut = known[allowed] if allowed < len(known) else -np.inf  # call cells strictly above the (allowed+1)-th known
    return float((score[novel] > cut).mean())


def storey_share(pvalues: np.ndarray, lam: float = 0.5) -> float:
    """Storey's estimate of the share of new cells, 1 - #{p > lam} / ((1 - lam) n): a measured alternative.

    It assumes known cells' p-values are uniform; the engine reports the share the rule finds instead
    (:func:`atlasengine.transfer.novelty.novel_share`).
    """
    p = np.asarray(pvalues, dtype=float)
    return float(np.clip(1 - (p > lam).mean() / (1 - lam), 0, 1))


def run_one(job: tuple) -> tuple[list[dict], dict, dict | None]:
    from atlasengine.transfer import detection_scores, evaluate_transfer

    name, seed, cfg, out = job
    strategy = cfg["strategy"]
    sc = scenario(name)
    ref, query = C.load_scenario(name)
    work = C.work_dir(out, f"novelty_{strategy}_{name}_s{seed}")
    t0 = time.perf_counter()
    C.create_reference(work / "ref.atlas", sc, ref, seed, cfg["ref_epochs"], cfg["query_epochs"],
                       fisher_max_cells=cfg["fisher_max_cells"])
    extra = C.ANCHOR if strategy == "anchor" else {}
    atlas, res, wall = C.fold_in(work / "ref.atlas", work / f"{strategy}.atlas", query, sc,
                                 "ewc" if strategy == "anchor" else strategy,
                                 continual={"fisher_max_cells": cfg["fisher_max_cells"], **extra})
    names = [str(c) for c in query.obs_names]
    truth = query.obs[sc.label_key].astype(str).to_numpy()
    novel = np.isin(truth, sorted(sc.novel))
    ev = evaluate_transfer(res.predictions, query.obs[sc.label_key], set(sc.novel))
    rows, curves, scored = [], {}, {}
    evidence = None
    for rule, changes in RULES.items():
        t1 = time.perf_counter()
        if changes == "composition":
            s = composition_scores(atlas, names)
        elif changes == "novelty_or_composition":
            s = either_rule(scored["novelty"], scored["composition"], atlas.config.transfer.novelty_target)
        elif changes in ("distance_only", "learned_weights"):
            if evidence is None:
                evidence = signal_evidence(atlas, names, res.predictions)
            query_x, own_x, cal, ref = evidence
            w = (np.array([1.0, 0.0]) if changes == "distance_only"
                 else reference_weights(own_x, cal, ref, atlas.config.transfer))
            predicted = res.predictions.loc[names, "predicted_label"].astype(str).to_numpy()
            s = weighted_rule(query_x, own_x, w, predicted, cal, atlas.config.transfer.novelty_target, names)
        else:
            s = rule_scores(atlas, names, res.predictions, changes)
        scored[rule] = s
        row = {"scenario": name, "seed": seed, "rule": rule,
               **detection_scores(novel, s["score"].to_numpy(), s["called"].to_numpy()),
               "best@7%": best_caught(s["score"].to_numpy(), novel), "true_share": float(novel.mean()),
               "n_novel": int(novel.sum()), "n_query": len(names), "known_accuracy": ev["known_accuracy"],
               "scoring_seconds": time.perf_counter() - t1, "fold_in_seconds": wall}
        if "novel_share" in s.attrs:
            row.update(share_estimate=s.attrs["novel_share"], share_low=s.attrs["novel_share_interval"][0],
                       share_high=s.attrs["novel_share_interval"][1], storey_estimate=storey_share(s["pvalue"]))
        rows.append(row)
        curves[rule] = operating_curve(s, novel)
    known = types_known(work, name, seed, cfg, query) if strategy == DEFAULT_STRATEGY else None
    shutil.rmtree(work, ignore_errors=True)
    print(f"{name} seed {seed} ({time.perf_counter() - t0:.0f}s): " + "  ".join(
        f"{r['rule']} {r['known_called']:.3f}/{r['novel_caught']:.3f}" for r in rows)
        + (f"  types known {known['known_called']:.3f}/{known['novel_caught']:.3f}" if known else ""), flush=True)
    return rows, curves, known


def types_known(work, name: str, seed: int, cfg: dict, query) -> dict:
    """Fold ``query`` into a reference of the same batches with the held-out types labelled; how well they are told apart."""
    from atlasengine.transfer import detection_scores

    sc = scenario(name)
    ref, _ = C.load_scenario(name, novel_in_reference=True)
    C.create_reference(work / "known.atlas", sc, ref, seed, cfg["ref_epochs"], cfg["query_epochs"],
                       fisher_max_cells=cfg["fisher_max_cells"])
    _, res, _ = C.fold_in(work / "known.atlas", work / "known_ewc.atlas", query, sc, "ewc",
                          continual={"fisher_max_cells": cfg["fisher_max_cells"]})
    p = res.predictions.loc[query.obs_names]
    novel = query.obs[sc.label_key].astype(str).isin(sc.novel).to_numpy()
    score = sum((p[f"p_{t}"].to_numpy() for t in sorted(sc.novel)), np.zeros(len(p)))
    caught = p["predicted_label"].astype(str).isin(sc.novel).to_numpy()
    return {"scenario": name, "seed": seed, **detection_scores(novel, score, caught), "best@7%": best_caught(score, novel)}


# ------------------------------------------------------------------------------- output
def plot(curves: dict[str, list[dict]], means: pd.DataFrame, path, strategy: str = DEFAULT_STRATEGY) -> None:
    """One panel per scenario: every rule's operating curve (seed mean), its default marked."""
    plt = C.matplotlib_agg()
    names = list(curves)
    cols = 3
    fig, axes = plt.subplots(int(np.ceil(len(names) / cols)), cols, figsize=(3.4 * cols, 3.0 * np.ceil(len(names) / cols)),
                             squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        for rule in RULES:
            xs = np.mean([c[rule][0] for c in curves[name]], axis=0)
            ys = np.mean([c[rule][1] for c in curves[name]], axis=0)
            order = np.argsort(xs, kind="stable")
            line, = ax.plot(xs[order], ys[order], lw=1, label=rule)
            m = means.loc[(name, rule)]
            ax.plot(m["known_called"], m["novel_caught"], "o", ms=4, color=line.get_color())
        ax.axvline(BAR_KNOWN, color="0.6", lw=0.6, ls="--")
        ax.axhline(BAR_CAUGHT, color="0.6", lw=0.6, ls="--")
        ax.set_xlim(0, 0.5)
        ax.set_ylim(0, 1.02)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("known cells called", fontsize=7)
        ax.set_ylabel("new cells caught", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=5, loc="lower right")
    fig.suptitle(f"Novelty rules' operating curves, {strategy} fold-in (mean over seeds; dot = the rule's default; "
                 "dashed = the bar)",
                 fontsize=8)
    fig.tight_layout()
    C.save_fig(fig, path)


def checks(means: pd.DataFrame) -> dict:
    """Check the issue's bar for the default rule, per scenario (means over seeds)."""
    out = {}
    for name in means.index.get_level_values(0).unique():
        d, u = means.loc[(name, "novelty")], means.loc[(name, "uncertainty")]
        out[name] = {"known_called<=7%": bool(d["known_called"] <= BAR_KNOWN),
                     "novel_caught>=80%": bool(d["novel_caught"] >= BAR_CAUGHT),
                     "auroc>=0.95_where_uncertainty_below": bool(u["auroc"] >= BAR_AUROC or d["auroc"] >= BAR_AUROC),
                     "ranking_allows_bar": bool(d["best@7%"] >= BAR_CAUGHT)}
    return out


def main() -> None:
    strategy = C.take_choice("--strategy", ("ewc", "finetune", "surgery", "anchor"), DEFAULT_STRATEGY)
    args = C.parse_args(__doc__.splitlines()[0], default_seeds=3)
    out_name = C.output_name("novelty" if strategy == DEFAULT_STRATEGY else f"novelty_{strategy}", args)
    cfg = ({"ref_epochs": 10, "query_epochs": 5, "fisher_max_cells": 200} if args.quick
           else {"ref_epochs": 150, "query_epochs": 100, "fisher_max_cells": 2000})
    cfg["strategy"] = strategy
    C.quiet()
    names = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
    t_start = time.perf_counter()
    jobs = [(name, seed, cfg, args.out) for seed in C.seeds_of(args) for name in names]
    results = C.run_jobs(run_one, jobs, args.jobs)
    df = pd.DataFrame([r for rows, _, _ in results for r in rows])
    known = pd.DataFrame([k for _, _, k in results if k is not None])
    curves: dict[str, list[dict]] = {}
    for job, (_, c, _) in zip(jobs, results):
        curves.setdefault(job[0], []).append(c)
    wall = time.perf_counter() - t_start
    metrics = ["auroc", "known_called", "novel_caught", "best@7%"]
    means = df.groupby(["scenario", "rule"], sort=False)[metrics + ["share_estimate", "true_share"]].mean()
    found = checks(means)
    table = C.mean_sd(df, ["scenario", "rule"], metrics)
    known_table = C.mean_sd(known, ["scenario"], metrics) if len(known) else None
    default = df[df.rule == "novelty"].groupby("scenario", sort=False).agg(
        true_share=("true_share", "mean"), estimate=("share_estimate", "mean"), low=("share_low", "mean"),
        high=("share_high", "mean"), storey=("storey_estimate", "mean")).reset_index()
    bar = pd.DataFrame([{"scenario": s, **{k: "met" if v else "MISSED" for k, v in c.items()}}
                        for s, c in found.items()])
    by = "" if strategy == DEFAULT_STRATEGY else (" (fold-in by ewc with the embedding anchor in place of the EWC penalty: "
                                                  f"{C.ANCHOR})" if strategy == "anchor" else f" (fold-in by {strategy})")
    known_part = [] if known_table is None else [
        "The same held-out types known (a reference of the same batches with them labelled, the same epochs and "
        "seeds, the query folded in with ewc): the summed kNN probability of the held-out types ranks the query "
        "cells (`auroc`, `best@7%`), and `novel_caught` / `known_called` are the shares of new / known cells whose "
        "best label is a held-out type. What the data and the model tell apart when the types are not new.",
        "",
        C.md_table(known_table),
        "",
    ]
    md = [
        "# Novelty rules side by side, with few and with many new cells" + by + (
            " (QUICK MODE: smoke run, numbers not meaningful)" if args.quick else ""),
        "",
        f"{C.seeds_said(args)}, mean ± sd over seeds. Reference {cfg['ref_epochs']} epochs, {strategy} fold-in "
        f"{cfg['query_epochs']} epochs (atlas defaults otherwise), query ingested blind; every rule scores the same "
        "fold-in. `known_called` / `novel_caught`: share of known / new query cells called Unknown at the rule's "
        "default (5% target; the paper's rule at 0.3). `best@7%`: the largest share of new cells any cut of the same "
        "score catches with at most 7% of known cells called (what the ranking allows). Rules: see "
        "`benchmarks/novelty.py`; `kang_half` and `pbmc_half` hold about half new cells.",
        "",
        C.md_table(table),
        "",
        f"The issue's bar for the default rule (`novelty`; means over seeds), at the shorter training above "
        f"({cfg['ref_epochs']} / {cfg['query_epochs']} epochs, where the atlas's own rule gives up to 400 / 200 at "
        "these sizes): the rule at its defaults, the fold-in shortened to keep the run at about 20 minutes"
        + ("" if not by else f", here on the {strategy} fold-in for the cause (the bar is judged on the atlas's "
           f"default, {DEFAULT_STRATEGY})")
        + ". `ranking_allows_bar`: whether any threshold on the default score could meet the first two "
        "(best@7% >= 80%).",
        "",
        C.md_table(bar),
        "",
        *known_part,
        "Share of new cells (default rule, means over seeds) against the true share: `estimate` and its 90% interval "
        "are what the engine reports (`novel_share`: the share called novel less the 5% false-alarm target, over "
        "0.95; Wilson interval): the share of new cells the rule finds, a lower bound where it misses some. "
        "`storey`: Storey's estimate from the novelty p-values (lambda 0.5), a measured alternative that assumes "
        "known cells' p-values are uniform.",
        "",
        C.md_table(default),
        "",
        f"Total wall time {wall / 60:.1f} min.",
        "",
        f"![operating curves]({out_name}_curves.png)",
    ]
    C.write_outputs(args.out, out_name, {"quick": args.quick, "settings": cfg, "seeds": args.seeds, "first_seed": args.first_seed,
                                         "checks": found, "records": df.to_dict("records"),
                                         "types_known": known.to_dict("records"),
                                         "summary": table.to_dict("records"), "wall_seconds": wall}, "\n".join(md))
    plot(curves, means, args.out / f"{out_name}_curves.png", strategy)


if __name__ == "__main__":
    main()
