"""Training in several processes (issue 17): DDP in 2 CPU processes against 1, on pancreas.

    python -m benchmarks.distributed [--quick] [--out DIR] [--seeds N]

Per seed the pancreas reference (celseq, fluidigmc1, indrop without ductal cells) is trained
and the query (celseq2, smartseq2) folded in with ewc, once with ``runtime={"devices": 1}`` and
once with ``{"devices": 2}`` (Lightning's DistributedDataParallel, processes forked, gloo), the
same settings otherwise. Measured: known-type accuracy, novel AUROC of the default novelty score,
reference drift, epochs and wall time. The bar (issue 17): known-type accuracy within 2 points.
Seeds run one after another (two training processes already take both cores here).
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pandas as pd

from benchmarks import common as C


def run(seed: int, devices: int, cfg: dict, work) -> dict:
    from atlasengine import Atlas

    sc = C.SCENARIOS["pancreas"]
    ref, query = C.load_scenario("pancreas")
    runtime = {"devices": devices, "accelerator": "cpu", "progress": False}
    path = work / f"s{seed}_d{devices}.atlas"
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    atlas = Atlas.create(path, ref, batch_key=sc.batch_key, label_key=sc.label_key,
                         config=C.atlas_config(cfg["ref_epochs"], cfg["query_epochs"], seed), runtime=runtime)
    t_ref = time.perf_counter() - t0
    res = atlas.ingest(query, batch_key=sc.batch_key, strategy="ewc", runtime=runtime)
    return {"seed": seed, "devices": devices, **C.fold_in_measures(atlas, res, query, sc),
            "reference_epochs": Atlas.open(path, version=1).info.training["epochs"], "query_epochs": res.training["epochs"],
            "reference_seconds": t_ref, "query_seconds": res.training["seconds"]}


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], default_seeds=3)
    cfg = {"ref_epochs": 10, "query_epochs": 5} if args.quick else {"ref_epochs": 150, "query_epochs": 100}
    C.quiet()
    work = C.work_dir(args.out, "distributed")
    t0 = time.perf_counter()
    rows = [run(seed, devices, cfg, work) for seed in range(args.seeds) for devices in (1, 2)]
    shutil.rmtree(work, ignore_errors=True)
    df = pd.DataFrame(rows)
    wall = time.perf_counter() - t0
    metrics = ["known_accuracy", "novel_auroc", "reference_drift", "reference_epochs", "query_epochs",
               "reference_seconds", "query_seconds"]
    table = C.mean_sd(df, ["devices"], metrics)
    means = df.groupby("devices")["known_accuracy"].mean()
    gap = float(means.loc[2] - means.loc[1])
    paired = (df[df.devices == 2].set_index("seed")["known_accuracy"] - df[df.devices == 1].set_index("seed")["known_accuracy"])
    md = [
        "# Training in two processes (DDP) against one, pancreas" + (" (QUICK MODE: smoke run, numbers not meaningful)"
                                                                     if args.quick else ""),
        "",
        f"{args.seeds} seed(s), mean ± sd. Reference {cfg['ref_epochs']} epochs, ewc fold-in {cfg['query_epochs']} epochs, "
        "atlas defaults otherwise; `devices` 2: Lightning's DistributedDataParallel in two forked CPU processes "
        "(gloo), each taking half of every minibatch (the same cells per optimiser step and steps per epoch as one process).",
        "",
        C.md_table(table),
        "",
        f"Known-type accuracy, 2 processes minus 1: {gap * 100:+.1f} points on the mean (per seed: "
        + ", ".join(f"{v * 100:+.1f}" for v in paired.to_numpy()) + f"). Bar: within 2 points: "
        f"{'met' if abs(gap) <= 0.02 else 'MISSED'}.",
        "",
        f"Total wall time {wall / 60:.1f} min.",
    ]
    C.write_outputs(args.out, "distributed", {"quick": args.quick, "settings": cfg, "seeds": args.seeds,
                                              "accuracy_gap": gap, "met": bool(abs(gap) <= 0.02),
                                              "records": df.to_dict("records"), "wall_seconds": wall}, "\n".join(md))
    print(f"known accuracy gap {gap * 100:+.1f} points; per seed {np.round(paired.to_numpy() * 100, 1).tolist()}")


if __name__ == "__main__":
    main()
