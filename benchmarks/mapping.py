"""Reference mapping on four scenarios: the engine's surgery / finetune / ewc beside scvi-tools and the paper's CLCVAE.

    python -m benchmarks.mapping [--quick] [--out DIR] [--seeds N] [--first-seed S] [--jobs J] [--scenarios a,b] [--scib]

``--first-seed 6`` writes ``mapping_heldout.*``: seeds on which no default of the engine was chosen
(``benchmarks.common.SELECTION_SEEDS``: the replay share, the anchor's strength and the previous
default's lambda were picked on seeds 0-2, today's default by a rule scored on seeds 3-5).

Per scenario and seed the engine trains its reference with its defaults and each strategy folds
the query into its own copy, and so does each of ``benchmarks.common.CANDIDATES``: ewc with the
embedding anchor in place of the EWC penalty, and ewc with the penalty alone at lambda 100 (the
default before 2026-12-06); neither is the default, both are measured beside it. scvi-tools trains its reference with its own defaults and folds the
query in by surgery (``load_query_data``), fine-tuning and the seed paper's CLCVAE
(``benchmarks/scvi_baseline.py``). Every method is labelled by the same scArches weighted kNN
(k = 50, Unknown above uncertainty 0.3) over its reference cells. Query labels are never given to
a fold-in. The two checks of the issue "Prove the method" are computed from the table: parity of
the engine's surgery with scvi-tools' surgery, and ewc against surgery, finetune and CLCVAE.
Needs scvi-tools (the benchmark venv ``.venv-bench``); without it the baselines are reported as
unavailable.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pandas as pd

from benchmarks import common as C
from benchmarks import scvi_baseline as S

TRANSFER = ["auroc_novel", "known_accuracy", "novel_unknown_share", "known_false_unknown", "known_accuracy_called"]
FORGET = ["drift", "ref_loo_before", "ref_loo_after", "forgetting"]
SCIB = ["silhouette_label", "silhouette_batch", "bras", "graph_connectivity", "ilisi", "isolated_labels"]
TIMES = ["reference_epochs", "reference_seconds", "epochs", "fold_in_seconds"]
ENGINE = ["surgery", "finetune", "ewc", *C.CANDIDATES]
SCVI = list(S.METHODS)
CLCVAE_REPLAY = "CLCVAE + replay (scvi-tools)"  # with --clcvae-replay: reference cells as a quarter of its training cells
METHODS = [*ENGINE, *SCVI, CLCVAE_REPLAY]  # every row a run can have, in the page's order
QUICK = {"reference_training": {"max_epochs": 8}, "query_training": {"max_epochs": 4}}


def _score(sc, query, preds, z_v1, z_ref, labels) -> dict:
    from atlasengine.transfer import evaluate_transfer

    row = evaluate_transfer(preds, query.obs[sc.label_key], set(sc.novel))
    before, after = C.loo_knn_accuracy(z_v1, labels), C.loo_knn_accuracy(z_ref, labels)
    row.update(drift=C.procrustes_displacement(z_v1, z_ref), ref_loo_before=before, ref_loo_after=after,
               forgetting=before - after)
    return row


def engine_job(name: str, seed: int, quick: bool, out, scib: bool) -> list[dict]:
    sc = C.SCENARIOS[name]
    ref, query = C.load_scenario(name)
    work = C.work_dir(out, f"mapping_{name}_s{seed}")
    t0 = time.perf_counter()
    ref_atlas = C.create_atlas(work / "ref.atlas", sc, ref, seed, {**(QUICK if quick else {}), **C.SCARCHES_UNKNOWN})
    ref_secs, ref_epochs = time.perf_counter() - t0, ref_atlas.info.training["epochs"]
    names_v1, z_v1, labels_v1 = C.cells_of_version(ref_atlas, 1)
    rows = []
    for method in ENGINE:
        strategy, continual = C.engine_method(method)
        dest = work / f"{C.slug(method)}.atlas"
        atlas, res, wall = C.fold_in(work / "ref.atlas", dest, query, sc, strategy, continual)
        names, z_ref, _ = C.cells_of_version(atlas, 1)
        assert names.equals(names_v1)
        row = {"method": method, "reference_seconds": ref_secs, "reference_epochs": ref_epochs,
               "epochs": res.training["epochs"], "fold_in_seconds": wall}
        row.update(_score(sc, query, res.predictions, z_v1, z_ref, labels_v1))
        if scib:
            obs = atlas.obs()
            truth = pd.concat([ref.obs[sc.label_key], query.obs[sc.label_key]]).astype(str).loc[obs.index].to_numpy()
            row.update(C.scib_scores(atlas.latent(), truth, obs["batch"].to_numpy()))
        rows.append(row)
        shutil.rmtree(dest, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def scvi_job(name: str, seed: int, quick: bool, scib: bool, replay: bool = False) -> list[dict]:
    sc = C.SCENARIOS[name]
    ref, query = C.load_scenario(name)
    epochs = (8, 4) if quick else (None, S.QUERY_EPOCHS)
    model, ref_secs, ref_epochs = S.train_reference(ref, sc.batch_key, seed, epochs[0])
    z_v1 = S.latent(model, ref)
    labels = ref.obs[sc.label_key].astype(str).to_numpy()
    runs = {m: (lambda m=m: S.fold_in(m, model, ref, query, seed, epochs[1])) for m in S.METHODS}
    if replay:
        from atlasengine.config import ContinualConfig

        share = ContinualConfig().replay_fraction  # the engine's ewc replays this share of every minibatch
        runs[CLCVAE_REPLAY] = lambda: S.clcvae(model, ref, query, seed, epochs[1], replay_fraction=share)
    rows = []
    for method, run in runs.items():
        q_model, wall, n_epochs = run()
        z_ref, z_q, preds = S.label_query(q_model, ref, query, labels)
        row = {"method": method, "reference_seconds": ref_secs, "reference_epochs": ref_epochs, "epochs": n_epochs,
               "fold_in_seconds": wall}
        row.update(_score(sc, query, preds, z_v1, z_ref, labels))
        if scib:
            truth = np.concatenate([labels, query.obs[sc.label_key].astype(str).to_numpy()])
            batches = np.concatenate([ref.obs[sc.batch_key].astype(str), query.obs[sc.batch_key].astype(str)])
            row.update(C.scib_scores(np.concatenate([z_ref, z_q]), truth, batches))
        rows.append(row)
    return rows


def job(args: tuple) -> list[dict]:
    """One (part, scenario, seed): the engine's three strategies, or the three scvi-tools methods."""
    part, name, seed, quick, out, scib, replay = args
    rows = engine_job(name, seed, quick, out, scib) if part == "engine" else scvi_job(name, seed, quick, scib, replay)
    for r in rows:
        print(f"  {name} s{seed} {r['method']:28s} auroc={r['auroc_novel']:.3f} known={r['known_accuracy']:.3f} "
              f"drift={r['drift']:.3f} epochs={r['epochs']} {r['fold_in_seconds']:.0f}s", flush=True)
    return [{"scenario": name, "seed": seed, **r} for r in rows]


def checks(df: pd.DataFrame) -> pd.DataFrame:
    """Check the issue's targets per scenario, from the mean over seeds."""
    m = df.groupby(["scenario", "method"])[["auroc_novel", "known_accuracy", "drift"]].mean()
    rows = []
    for scen in dict.fromkeys(df.scenario):
        g = m.loc[scen]
        get = lambda meth, col: float(g.loc[meth, col]) if meth in g.index else np.nan  # noqa: E731
        d_auc = get("surgery", "auroc_novel") - get(S.SURGERY, "auroc_novel")
        d_acc = get("surgery", "known_accuracy") - get(S.SURGERY, "known_accuracy")
        rows.append({"scenario": scen, "check": "1. parity: engine surgery vs scvi-tools surgery",
                     "measured": f"AUROC {d_auc:+.3f}, known accuracy {100 * d_acc:+.3f} pt",
                     # "reach scvi-tools' surgery" (the issue's 'What to build'): above it is not a miss
                     "target": "AUROC within 0.02 (or above), known accuracy within 1 pt (or above)",
                     "met": bool(d_auc >= -0.02 and d_acc >= -0.01)})
        for method, label in (("ewc", "2. ewc at its defaults"), *C.candidate_checks(2)):
            if method in g.index:
                rows.append({"scenario": scen, "check": label, **check2(get, method)})
    return pd.DataFrame(rows)


def check2(get, method: str) -> dict:
    """Check 2 of 'Prove the method' for one engine method: measured, target, met and its three parts."""
    own = {c: get(method, c) for c in ("auroc_novel", "known_accuracy", "drift")}
    rivals = {k: get(k, "auroc_novel") for k in ("surgery", "finetune", S.CLCVAE)}
    ratio = own["drift"] / get("finetune", "drift")
    parts = C.check2_parts(own["auroc_novel"], list(rivals.values()), own["known_accuracy"],
                           get("surgery", "known_accuracy"), ratio)
    return {"measured": (f"AUROC {own['auroc_novel']:.3f} vs surgery {rivals['surgery']:.3f}, finetune "
                         f"{rivals['finetune']:.3f}, CLCVAE {rivals[S.CLCVAE]:.3f}; known "
                         f"accuracy {100 * (own['known_accuracy'] - get('surgery', 'known_accuracy')):+.1f} pt "
                         f"vs surgery; drift {ratio:.2f} of finetune's"
                         + "".join(f"; {k} not measured, its AUROC part not checked" for k, v in rivals.items()
                                   if np.isnan(v))),
            "target": "AUROC >= each; known accuracy >= surgery - 1 pt; drift <= 1/3 of finetune's",
            "met": all(parts.values()), **parts}


def plot(df: pd.DataFrame, path) -> None:
    plt = C.matplotlib_agg()
    panels = [("auroc_novel", "novel AUROC"), ("known_accuracy", "known accuracy"), ("drift", "reference drift")]
    scen = list(dict.fromkeys(df.scenario))
    methods = [m for m in METHODS if m in set(df.method)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 2.8))
    w = 0.8 / len(methods)
    for ax, (col, title) in zip(np.atleast_1d(axes), panels):
        for j, meth in enumerate(methods):
            g = df[df.method == meth].groupby("scenario", sort=False)[col]
            ax.bar(np.arange(len(scen)) + j * w, g.mean().reindex(scen), w, yerr=g.std().reindex(scen).fillna(0),
                   label=meth, capsize=2)
        ax.set_xticks(np.arange(len(scen)) + w * (len(methods) - 1) / 2, scen, fontsize=7)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
    np.atleast_1d(axes)[0].legend(fontsize=5)
    fig.tight_layout()
    C.save_fig(fig, path)


def main() -> None:
    import argparse
    import sys

    extra = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    extra.add_argument("--scib", action="store_true", help="also compute scIB metrics (scib-metrics)")
    extra.add_argument("--clcvae-replay", action="store_true",
                       help="also run the paper's CLCVAE with reference cells replayed (a row beside it)")
    known, rest = extra.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args = C.parse_args(__doc__.splitlines()[0], default_seeds=3)
    scenarios = args.scenarios.split(",") if args.scenarios else (["pancreas"] if args.quick else list(C.SCENARIOS))
    have_scvi, scvi_why = S.available()
    if not have_scvi:
        print(f"NOTE: {scvi_why}", flush=True)
    t_start = time.perf_counter()
    parts = ["engine"] + (["scvi"] if have_scvi else [])
    # the longest jobs (kang) first, so that parallel workers finish together
    jobs = [(part, name, seed, args.quick, args.out, known.scib, known.clcvae_replay) for name in sorted(scenarios, key=lambda n: n != "kang")
            for seed in C.seeds_of(args) for part in parts]
    name = C.output_name("mapping", args)
    df = pd.DataFrame([r for part in C.run_jobs(job, jobs, args.jobs) for r in part])
    wall = time.perf_counter() - t_start
    order = {m: i for i, m in enumerate(METHODS)}
    df = df.sort_values(["scenario", "method", "seed"], key=lambda c: c.map(order) if c.name == "method" else c)
    summary = C.mean_sd(df, ["scenario", "method"], TRANSFER + FORGET + [m for m in SCIB if m in df] + TIMES)
    verdicts = checks(df) if have_scvi else pd.DataFrame()
    from atlasengine.config import AtlasConfig

    d = AtlasConfig()
    md = [
        ("# Reference mapping on held-out seeds: " if C.held_out(args) else
         "# Reference mapping: " if args.first_seed == 0 else f"# Reference mapping, seeds from {args.first_seed}: ")
        + "the engine's surgery / finetune / ewc, scvi-tools and the paper's CLCVAE"
        + (" (QUICK MODE: smoke run, numbers not meaningful)" if args.quick else ""),
        "",
        f"{C.seeds_said(args)}, mean ± sd over seeds; every row from this one run. Engine at its defaults: reference "
        f"epochs by scvi-tools' rule (at most {d.reference_training.epochs_cap}), KL warm-up over the whole run, query "
        f"at most {d.query_training.epochs_cap} epochs, no early stopping; ewc with {C.continual_defaults()}. "
        "scvi-tools at its own defaults (`SCVI` with scArches settings and the NB likelihood, the engine's, where "
        "scvi-tools' default is ZINB; `train()` as it comes; queries 200 epochs, "
        "weight decay 0); CLCVAE = the paper's EWC on scvi-tools (Fisher of minibatch gradients on reference cells, "
        "lambda 1e4, every weight trainable, no replay: the paper's notebooks and the issue's brief replay nothing, "
        "though its text speaks of presenting the query model with examples from the reference; the engine's ewc "
        "replays reference cells). "
        f"{C.candidates_described()}; neither is the default, both are measured beside it. Labels by scArches weighted kNN (k=50, Unknown if uncertainty "
        "> 0.3) over each method's reference cells; novel = the types held out of the reference. drift = mean "
        "aligned (Procrustes) displacement of reference cells from the reference model's embedding.",
        "",
        "Transfer (known_accuracy ignores Unknown calls, known_accuracy_called counts them as wrong):",
        "",
        C.md_table(summary[["scenario", "method", "n", *TRANSFER]]),
        "",
        "The reference (leave-one-out kNN accuracy k=15 before/after, drift):",
        "",
        C.md_table(summary[["scenario", "method", *FORGET]]),
        "",
    ]
    if any(m in summary for m in SCIB):
        md += ["scIB metrics (joint embedding):", "", C.md_table(summary[["scenario", "method", *[m for m in SCIB if m in summary]]]), ""]
    if len(verdicts):
        md += ["Checks (issue 'Prove the method', from the means above):", "",
               C.md_table(verdicts[["scenario", "check", "measured", "target", "met"]]), ""]
    md += ["Cost:", "", C.md_table(summary[["scenario", "method", *TIMES]]), "",
           f"Total wall time {wall / 60:.1f} min ({args.jobs} parallel job(s)).", "", f"![{name}]({name}.png)"]
    C.write_outputs(args.out, name, {"quick": args.quick, "seeds": args.seeds, "first_seed": args.first_seed,
                                     "scenarios": scenarios,
                                          "scvi_available": have_scvi, "scvi_note": scvi_why,
                                          "records": df.to_dict("records"), "summary": summary.to_dict("records"),
                                          "checks": verdicts.to_dict("records"), "wall_seconds": wall},
                    "\n".join(md))
    plot(df, args.out / f"{name}.png")


if __name__ == "__main__":
    main()
