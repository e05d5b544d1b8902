"""Training in several processes (issue 17): DDP in 2 CPU processes against 1, on pancreas.

    python -m benchmarks.distributed [--quick] [--out DIR] [--seeds N]

Per seed the pancreas reference (celseq, fluidigmc1, indrop without ductal cells) is trained
and the query (celseq2, smartseq2) folded in with ewc, once with ``runtime={"devices": 1}`` and
once with ``{"devices": 2}`` (Lightning's DistributedDataParallel, gloo), the same settings
otherwise; both from AnnData objects in memory (``memory``: processes forked) and from the same
data read backed from .h5ad files (``streamed``: processes spawned, each reading the cell store
in shuffled blocks of ``BLOCK`` cells). Measured: known-type accuracy, novel AUROC of the default
novelty score, reference drift, epochs and wall time. The bar (issue 17): with each input, known-type
accuracy of 2 processes within 2 points of 1 process. Seeds run one after another (two training
processes already take both cores here).
"""

from __future__ import annotations

import shutil
import time

import pandas as pd

from benchmarks import common as C

BLOCK = 128
INPUTS = ("memory", "streamed")


def run(seed: int, devices: int, source: str, cfg: dict, work) -> dict:
    from atlasengine import Atlas

    sc = C.SCENARIOS["pancreas"]
    ref, query = C.load_scenario("pancreas")
    runtime = {"devices": devices, "accelerator": "cpu", "progress": False}
    ref_in, query_in = ref, query
    if source == "streamed":
        ref_in, query_in = C.backed_copies(work, ref=ref, query=query)
        runtime["block_cells"] = BLOCK
    path = work / f"s{seed}_d{devices}_{source}.atlas"
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    atlas = Atlas.create(path, ref_in, batch_key=sc.batch_key, label_key=sc.label_key,
                         config=C.atlas_config(cfg["ref_epochs"], cfg["query_epochs"], seed), runtime=runtime)
    t_ref = time.perf_counter() - t0
    res = atlas.ingest(query_in, batch_key=sc.batch_key, strategy="ewc", runtime=runtime)
    return {"seed": seed, "input": source, "devices": devices, **C.fold_in_measures(atlas, res, query, sc),
            "reference_epochs": Atlas.open(path, version=1).info.training["epochs"], "query_epochs": res.training["epochs"],
            "reference_seconds": t_ref, "query_seconds": res.training["seconds"]}


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], default_seeds=3)
    cfg = {"ref_epochs": 10, "query_epochs": 5} if args.quick else {"ref_epochs": 150, "query_epochs": 100}
    C.quiet()
    work = C.work_dir(args.out, "distributed")
    t0 = time.perf_counter()
    rows = [run(seed, devices, source, cfg, work) for seed in range(args.seeds) for source in INPUTS
            for devices in (1, 2)]
    shutil.rmtree(work, ignore_errors=True)
    df = pd.DataFrame(rows)
    wall = time.perf_counter() - t0
    metrics = ["known_accuracy", "novel_auroc", "reference_drift", "reference_epochs", "query_epochs",
               "reference_seconds", "query_seconds"]
    table = C.mean_sd(df, ["input", "devices"], metrics)
    gaps, lines = {}, []
    for source in INPUTS:
        mine = df[df["input"] == source]
        per_seed = (mine[mine.devices == 2].set_index("seed")["known_accuracy"]
                    - mine[mine.devices == 1].set_index("seed")["known_accuracy"])
        gaps[source] = float(per_seed.mean())
        lines.append(f"- {source}: known-type accuracy, 2 processes minus 1: {gaps[source] * 100:+.1f} points on the "
                     "mean (per seed: " + ", ".join(f"{v * 100:+.1f}" for v in per_seed.to_numpy())
                     + f"). Bar: within 2 points: {'met' if abs(gaps[source]) <= 0.02 else 'MISSED'}.")
    met = all(abs(g) <= 0.02 for g in gaps.values())
    md = [
        "# Training in two processes (DDP) against one, pancreas" + (" (QUICK MODE: smoke run, numbers not meaningful)"
                                                                     if args.quick else ""),
        "",
        f"{args.seeds} seed(s), mean ± sd. Reference {cfg['ref_epochs']} epochs, ewc fold-in {cfg['query_epochs']} epochs, "
        "atlas defaults otherwise; `devices` 2: Lightning's DistributedDataParallel in two CPU processes "
        "(gloo), each taking half of every minibatch (the same cells per optimiser step and steps per epoch as one "
        "process). `memory`: AnnData objects in memory, processes forked; `streamed`: the same data read backed from "
        f".h5ad files, processes spawned, each reading the cell store in shuffled blocks of {BLOCK} cells.",
        "",
        C.md_table(table),
        "",
        *lines,
        "",
        f"Total wall time {wall / 60:.1f} min.",
    ]
    C.write_outputs(args.out, "distributed", {"quick": args.quick, "settings": {**cfg, "block_cells": BLOCK},
                                              "seeds": args.seeds, "accuracy_gap": gaps["memory"],
                                              "accuracy_gaps": gaps, "met": met,
                                              "records": df.to_dict("records"), "wall_seconds": wall}, "\n".join(md))
    print("known accuracy gap (2 processes - 1): " + ", ".join(f"{k} {v * 100:+.1f} points" for k, v in gaps.items()))


if __name__ == "__main__":
    main()
