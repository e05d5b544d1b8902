"""Sequential fold-ins, one dataset at a time, with ewc, finetune and surgery.

Pancreas: reference = indrop, then celseq, celseq2, fluidigmc1, smartseq2.

    python -m benchmarks.sequential [--quick] [--out DIR] [--seeds N]

After each step: label accuracy of all cells folded in so far (weighted kNN against the
reference cells, both embedded by the current version), the reference's LOO kNN accuracy
(forgetting) and the mean displacement of the indrop cells from version 1, raw and after
orthogonal Procrustes alignment. Query labels are never given to ingest.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pandas as pd

from benchmarks import common as C

REFERENCE = "indrop"
ORDER = ("celseq", "celseq2", "fluidigmc1", "smartseq2")
SCEN = C.Scenario("pancreas_sequential", "pancreas_panc8_small.h5ad", "tech", "celltype", (REFERENCE,), ORDER, frozenset())


def run(strategy: str, seed: int, cfg: dict, data, work) -> list[dict]:
    from atlasengine import Atlas
    from atlasengine.transfer import transfer_labels

    truth = data.obs["celltype"].astype(str)
    ref = data[data.obs.tech == REFERENCE].copy()
    C.create_reference(work / "ref.atlas", SCEN, ref, seed, cfg["ref_epochs"], cfg["query_epochs"],
                       fisher_max_cells=cfg["fisher_max_cells"])
    path = work / f"{strategy}.atlas"
    shutil.rmtree(path, ignore_errors=True)
    shutil.move(work / "ref.atlas", path)
    atlas = Atlas.open(path)
    names_v1, z_v1, labels_v1 = C.cells_of_version(atlas, 1)
    rows = [{"strategy": strategy, "seed": seed, "step": 0, "added": REFERENCE, "accuracy_so_far": np.nan,
             "accuracy_new": np.nan, **C.forgetting(z_v1, z_v1, labels_v1)}]
    for step, tech in enumerate(cfg["order"], start=1):
        q = data[data.obs.tech == tech].copy()
        t0 = time.perf_counter()
        res = atlas.ingest(q, batch_key="tech", strategy=strategy, dataset=tech,
                           continual={"fisher_max_cells": cfg["fisher_max_cells"]})
        wall = time.perf_counter() - t0
        obs, z = atlas.obs(), atlas.latent()
        names, z_ref, _ = C.cells_of_version(atlas, 1)
        assert names.equals(names_v1)
        folded = (obs["version_added"] > 1).to_numpy()
        preds = transfer_labels(atlas.neighbor_index(), z[folded], atlas.config.transfer, obs_names=list(obs.index[folded]))
        acc_all = float((preds["predicted_label"].to_numpy() == truth.loc[preds.index].to_numpy()).mean())
        acc_new = float((res.predictions["predicted_label"].to_numpy() == truth.loc[res.predictions.index].to_numpy()).mean())
        row = {"strategy": strategy, "seed": seed, "step": step, "added": tech, "accuracy_so_far": acc_all,
               "accuracy_new": acc_new, "unknown_share_so_far": float(preds["is_unknown"].mean()),
               **C.forgetting(z_v1, z_ref, labels_v1), "epochs": res.training["epochs"], "fold_in_seconds": wall}
        rows.append(row)
        print(f"  {strategy:8s} s{seed} step {step} +{tech:10s} acc_so_far={acc_all:.3f} acc_new={acc_new:.3f} "
              f"ref_loo={row['ref_loo_after']:.3f} disp={row['displacement']:.3f} aligned={row['displacement_aligned']:.3f} "
              f"{wall:.0f}s", flush=True)
    shutil.rmtree(path, ignore_errors=True)
    return rows


def plot(df: pd.DataFrame, path) -> None:
    plt = C.matplotlib_agg()
    panels = [("accuracy_so_far", "label accuracy, all folded-in cells"), ("ref_loo_after", "indrop LOO kNN accuracy"),
              ("displacement", "indrop displacement (raw)"), ("displacement_aligned", "indrop displacement (Procrustes)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 2.6))
    steps = df.groupby("step")["added"].first()
    for ax, (m, title) in zip(axes, panels):
        for strat, g in df.groupby("strategy", sort=False):
            s = g.groupby("step")[m]
            ax.errorbar(s.mean().index, s.mean(), yerr=s.std().fillna(0), marker="o", ms=3, capsize=2, label=strat)
        ax.set_xticks(steps.index, [f"+{a}" if i else a for i, a in steps.items()], rotation=45, fontsize=6)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    C.save_fig(fig, path)


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], default_seeds=3)
    cfg = ({"ref_epochs": 5, "query_epochs": 3, "fisher_max_cells": 200, "order": ORDER[:2]} if args.quick
           else {"ref_epochs": 100, "query_epochs": 60, "fisher_max_cells": 2000, "order": ORDER})
    C.quiet()
    data = C.read_data(SCEN.file)
    data.obs["tech"] = data.obs["tech"].astype(str)
    t_start = time.perf_counter()
    rows = []
    for seed in range(args.seeds):
        for strat in ("ewc", "finetune", "surgery"):
            rows += run(strat, seed, cfg, data, C.work_dir(args.out, f"sequential_{strat}_s{seed}"))
    df = pd.DataFrame(rows)
    wall = time.perf_counter() - t_start
    metrics = ["accuracy_so_far", "accuracy_new", "unknown_share_so_far", "ref_loo_after", "displacement",
               "displacement_aligned", "epochs", "fold_in_seconds"]
    rank = df["strategy"].map({"ewc": 0, "finetune": 1, "surgery": 2})
    tab = C.mean_sd(df.assign(rank=rank).sort_values(["rank", "step"]), ["strategy", "step", "added"], metrics)
    md = [
        "# Sequential fold-ins (pancreas)" + (" (QUICK MODE: smoke run, numbers not meaningful)" if args.quick else ""),
        "",
        f"Reference = indrop (all cell types), then {', '.join(cfg['order'])} one at a time (blind: no labels "
        f"given). {args.seeds} seed(s), mean ± sd. Reference {cfg['ref_epochs']} epochs, each fold-in {cfg['query_epochs']} "
        f"epochs (max, early stopping), ewc with the atlas defaults ({C.continual_defaults()}). accuracy_so_far: weighted-kNN label accuracy of "
        "every cell folded in so far, embedded by the current version, against the indrop cells embedded by the same "
        "version; accuracy_new: the predictions the step itself returned for its own cells. ref_loo_after: leave-one-out "
        "kNN (k=15) accuracy of the indrop cells (version 1 value at step 0). Displacement: mean |z_t - z_1| of the "
        "indrop cells, raw and after centring + orthogonal Procrustes rotation.",
        "",
        C.md_table(tab),
        "",
        f"Total wall time {wall / 60:.1f} min.",
        "",
        "![sequential](sequential.png)",
    ]
    C.write_outputs(args.out, "sequential", {"quick": args.quick, "settings": {**cfg, "continual": C.continual_defaults()}, "seeds": args.seeds,
                                             "records": df.to_dict("records"), "wall_seconds": wall}, "\n".join(md))
    plot(df, args.out / "sequential.png")


if __name__ == "__main__":
    main()
