"""Reference mapping on the three scenarios: surgery, finetune, ewc (ours) and the scvi-tools baseline.

    python -m benchmarks.mapping [--quick] [--out DIR] [--seeds N] [--ref-epochs E] [--query-epochs E]

Per scenario and seed our reference is trained once and each strategy folds the query into
its own copy. The scvi-tools baseline (scArches settings, ``SCVI.load_query_data``, weight
decay 0) is labelled with the same weighted kNN (``NeighborIndex`` over the reference latent +
``transfer_labels``). Needs scvi-tools / scib-metrics for the baseline / scIB metrics (the
benchmark venv ``.venv-bench``); without them they are reported as unavailable.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pandas as pd

from benchmarks import common as C
from benchmarks import scvi_baseline as S

TRANSFER = ["auroc_novel", "novel_unknown_share", "known_accuracy", "known_accuracy_called", "known_false_unknown"]
FORGET = ["ref_loo_before", "ref_loo_after", "forgetting", "displacement"]
SCIB = ["silhouette_label", "silhouette_batch", "bras", "graph_connectivity", "ilisi", "isolated_labels"]
TIMES = ["reference_epochs", "reference_seconds", "epochs", "train_seconds", "seconds_per_epoch", "fold_in_seconds"]
METHODS = ["surgery", "finetune", "ewc", "scvi-tools"]
FULL_REF_EPOCHS, FULL_QUERY_EPOCHS = 150, 100


def truth_of(obs: pd.DataFrame, ref, query, label_key: str) -> np.ndarray:
    t = pd.concat([ref.obs[label_key].astype(str), query.obs[label_key].astype(str)])
    return t.loc[obs.index].to_numpy()


def ours(sc, ref, query, seed, cfg, work) -> list[dict]:
    from atlasengine import Atlas
    from atlasengine.transfer import evaluate_transfer

    ref_atlas, ref_secs = C.create_reference(work / "ref.atlas", sc, ref, seed, cfg["ref_epochs"], cfg["query_epochs"],
                                     fisher_max_cells=cfg["fisher_max_cells"])
    names_v1, z_v1, labels_v1 = C.cells_of_version(Atlas.open(work / "ref.atlas"), 1)
    rows = []
    for strat in C.STRATEGIES:
        atlas, res, wall = C.fold_in(work / "ref.atlas", work / f"{strat}.atlas", query, sc, strat,
                                     continual={"fisher_max_cells": cfg["fisher_max_cells"]})
        obs, z = atlas.obs(), atlas.latent()
        names, z_ref, _ = C.cells_of_version(atlas, 1)
        assert names.equals(names_v1)
        row = {"method": strat, "reference_seconds": ref_secs, "reference_epochs": ref_atlas.info.training["epochs"]}
        row.update(evaluate_transfer(res.predictions, query.obs[sc.label_key], set(sc.novel)))
        row.update(C.forgetting(z_v1, z_ref, labels_v1))
        row.update(C.scib_scores(z, truth_of(obs, ref, query, sc.label_key), obs["batch"].to_numpy()))
        tr = res.version.training
        row.update(epochs=tr["epochs"], train_seconds=tr["seconds"], seconds_per_epoch=tr["seconds"] / max(tr["epochs"], 1),
                   fisher_seconds=tr.get("fisher_seconds"), cells_per_second=tr.get("cells_per_second"), fold_in_seconds=wall)
        rows.append(row)
        shutil.rmtree(work / f"{strat}.atlas", ignore_errors=True)
    return rows


def baseline(sc, ref, query, seed, cfg) -> dict:
    from atlasengine.config import TransferConfig
    from atlasengine.transfer import NeighborIndex, evaluate_transfer, transfer_labels

    model, ref_secs, ref_epochs = S.train_reference(ref, sc.batch_key, seed, cfg["ref_epochs"])
    z_v1 = S.latent(model, ref)
    q_model, wall, epochs = S.fold_in(model, query, seed, cfg["query_epochs"])
    z_ref, z_q = S.latent(q_model, ref), S.latent(q_model, query)
    labels = ref.obs[sc.label_key].astype(str).to_numpy()
    t0 = time.perf_counter()
    index = NeighborIndex.build(z_ref, labels, TransferConfig(index="exact"))
    preds = transfer_labels(index, z_q, TransferConfig(), obs_names=[str(c) for c in query.obs_names])
    knn_secs = time.perf_counter() - t0
    row = {"method": "scvi-tools", "reference_seconds": ref_secs, "reference_epochs": ref_epochs}
    row.update(evaluate_transfer(preds, query.obs[sc.label_key], set(sc.novel)))
    row.update(C.forgetting(z_v1, z_ref, labels))
    joint = np.concatenate([z_ref, z_q])
    truth = np.concatenate([labels, query.obs[sc.label_key].astype(str).to_numpy()])
    batches = np.concatenate([ref.obs[sc.batch_key].astype(str), query.obs[sc.batch_key].astype(str)])
    row.update(C.scib_scores(joint, truth, batches))
    row.update(epochs=epochs, train_seconds=wall, seconds_per_epoch=wall / max(epochs, 1), fold_in_seconds=wall + knn_secs)
    return row


def plot(df: pd.DataFrame, path) -> None:
    plt = C.matplotlib_agg()
    panels = [("auroc_novel", "novel AUROC"), ("known_accuracy", "known accuracy"), ("forgetting", "forgetting (LOO drop)")]
    if "silhouette_label" in df:
        panels.append(("silhouette_label", "silhouette label"))
    scen = list(dict.fromkeys(df.scenario))
    methods = [m for m in METHODS if m in set(df.method)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.6))
    w = 0.8 / len(methods)
    for ax, (m, title) in zip(np.atleast_1d(axes), panels):
        for j, meth in enumerate(methods):
            g = df[df.method == meth].groupby("scenario", sort=False)[m]
            mean, sd = g.mean().reindex(scen), g.std().reindex(scen).fillna(0)
            ax.bar(np.arange(len(scen)) + j * w, mean, w, yerr=sd, label=meth, capsize=2)
        ax.set_xticks(np.arange(len(scen)) + w * (len(methods) - 1) / 2, scen, fontsize=7)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
    np.atleast_1d(axes)[0].legend(fontsize=6)
    fig.tight_layout()
    C.save_fig(fig, path)


def main() -> None:
    import argparse
    import sys

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--ref-epochs", type=int)
    extra.add_argument("--query-epochs", type=int)
    known, rest = extra.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args = C.parse_args(__doc__.splitlines()[0], default_seeds=3)
    cfg = ({"ref_epochs": 5, "query_epochs": 3, "fisher_max_cells": 200} if args.quick
           else {"ref_epochs": FULL_REF_EPOCHS, "query_epochs": FULL_QUERY_EPOCHS, "fisher_max_cells": 2000})
    if known.ref_epochs:
        cfg["ref_epochs"] = known.ref_epochs
    if known.query_epochs:
        cfg["query_epochs"] = known.query_epochs
    C.quiet()
    have_scvi, scvi_why = S.available()
    have_scib, scib_why = C.scib_available()
    for ok, why in ((have_scvi, scvi_why), (have_scib, scib_why)):
        if not ok:
            print(f"NOTE: {why}", flush=True)
    t_start = time.perf_counter()
    rows = []
    for seed in range(args.seeds):
        for name in C.SCENARIOS:
            sc = C.SCENARIOS[name]
            ref, query = C.load_scenario(name)
            work = C.work_dir(args.out, f"mapping_{name}_s{seed}")
            t0 = time.perf_counter()
            for r in ours(sc, ref, query, seed, cfg, work):
                rows.append({"scenario": name, "seed": seed, **r})
            if have_scvi:
                rows.append({"scenario": name, "seed": seed, **baseline(sc, ref, query, seed, cfg)})
            shutil.rmtree(work, ignore_errors=True)
            for r in rows[-(3 + have_scvi):]:
                print(f"  {name} s{seed} {r['method']:10s} auroc={r['auroc_novel']:.3f} known_acc={r['known_accuracy']:.3f} "
                      f"forget={r['forgetting']:.3f} epochs={r['epochs']} fold-in {r['fold_in_seconds']:.0f}s", flush=True)
            print(f"{name} seed {seed} done in {time.perf_counter() - t0:.0f}s", flush=True)
    df = pd.DataFrame(rows)
    wall = time.perf_counter() - t_start
    metrics = TRANSFER + FORGET + [m for m in SCIB if m in df] + TIMES
    summary = C.mean_sd(df, ["scenario", "method"], metrics)
    md = [
        "# Reference mapping: surgery / finetune / ewc vs scvi-tools" + (" (QUICK MODE: smoke run, numbers not meaningful)" if args.quick else ""),
        "",
        f"{args.seeds} seed(s), mean ± sd over seeds. Reference {cfg['ref_epochs']} epochs, query {cfg['query_epochs']} "
        "epochs (max; early stopping with patience 15 on a 10% validation split, for ours and scvi-tools alike), "
        f"fisher_max_cells {cfg['fisher_max_cells']}, ewc with the atlas defaults ({C.continual_defaults()}). Labels by scArches weighted kNN (k=50, Unknown if uncertainty > 0.3) over the reference "
        "cells embedded with the fold-in model, for every method. Query labels are never given to the fold-in.",
        "",
        "scvi-tools baseline: " + ("`SCVI` (n_latent 10, n_hidden 128, 2 layers, dropout 0.2, nb, layer norm both, no batch "
                                   "norm, encode_covariates) + `SCVI.load_query_data` + train with weight_decay 0, KL warm-up 20 "
                                   "(reference) / 0 (query) like ours." if have_scvi else f"UNAVAILABLE: {scvi_why}"),
        "scIB metrics: " + ("scib-metrics on the joint reference + query embedding with true labels (ilisi: ilisi_knn on "
                            "90 exact neighbours)." if have_scib else f"UNAVAILABLE: {scib_why}"),
        "",
        "Transfer (novel = held-out types; known_accuracy ignores Unknown calls, known_accuracy_called counts them as wrong):",
        "",
        C.md_table(summary[["scenario", "method", "n", *[m for m in TRANSFER if m in summary]]]),
        "",
        "Reference forgetting (LOO kNN k=15 accuracy of reference cells, version 1 vs after the fold-in) and displacement:",
        "",
        C.md_table(summary[["scenario", "method", *FORGET]]),
        "",
    ]
    if have_scib:
        md += ["scIB metrics (joint embedding):", "", C.md_table(summary[["scenario", "method", *[m for m in SCIB if m in summary]]]), ""]
    md += ["Fold-in cost (fold_in_seconds: ours = the whole `ingest` call incl. Fisher, embedding and index; scvi-tools = "
           "load_query_data + train + kNN):", "", C.md_table(summary[["scenario", "method", *TIMES]]), "",
           f"Total wall time {wall / 60:.1f} min.", "", "![mapping](mapping.png)"]
    C.write_outputs(args.out, "mapping", {"quick": args.quick, "settings": {**cfg, "continual": C.continual_defaults()}, "seeds": args.seeds,
                                          "scvi_available": have_scvi, "scvi_note": scvi_why, "scib_available": have_scib,
                                          "scib_note": scib_why, "records": df.to_dict("records"),
                                          "summary": summary.to_dict("records"), "wall_seconds": wall}, "\n".join(md))
    plot(df, args.out / "mapping.png")


if __name__ == "__main__":
    main()
