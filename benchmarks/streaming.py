"""Streamed batches (issue 17): the same mapping from cells in memory and from the cell store in shuffled blocks.

    python -m benchmarks.streaming [--quick] [--out DIR] [--seeds N] [--scenarios pancreas,pbmc,ifnb]

Per scenario and seed the reference is created and the query folded in with ewc twice: from
AnnData objects in memory (the path before streaming), and from the same data written to .h5ad
files and read backed (``anndata.read_h5ad(path, backed="r")``), so that the counts go through
the cell store in parts and training reads them back in shuffled blocks of ``BLOCK`` cells
(``runtime={"block_cells": BLOCK}``, far below the default 65,536, so that every scenario's
reference and query span several blocks). Measured: known-type accuracy, novel AUROC of the
default novelty score, reference drift. The bar (issue 17): every mean of the streamed runs
within one standard deviation (over seeds) of the in-memory runs' mean.
"""

from __future__ import annotations

import shutil
import time

import pandas as pd

from benchmarks import common as C

BLOCK = 128
METRICS = ["known_accuracy", "novel_auroc", "reference_drift"]


def run(job: tuple) -> dict:
    """One scenario x seed x mode: create, fold in with ewc, measure."""
    from atlasengine import Atlas

    name, seed, mode, cfg, work = job
    sc = C.SCENARIOS[name]
    ref, query = C.load_scenario(name)
    runtime = {"progress": False}
    if mode == "streamed":
        ref, query_in = C.backed_copies(work / f"{name}_s{seed}_files", ref=ref, query=query)
        runtime["block_cells"] = BLOCK
    else:
        query_in = query
    path = work / f"{name}_s{seed}_{mode}.atlas"
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    atlas = Atlas.create(path, ref, batch_key=sc.batch_key, label_key=sc.label_key,
                         config=C.atlas_config(cfg["ref_epochs"], cfg["query_epochs"], seed), runtime=runtime)
    res = atlas.ingest(query_in, batch_key=sc.batch_key, strategy="ewc", runtime=runtime)
    seconds = time.perf_counter() - t0
    measures = C.fold_in_measures(atlas, res, query, sc)
    shutil.rmtree(path, ignore_errors=True)
    return {"scenario": name, "seed": seed, "mode": mode, **measures, "n_reference": int(ref.n_obs), "n_query": int(query.n_obs), "seconds": seconds}


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], default_seeds=3)
    cfg = {"ref_epochs": 10, "query_epochs": 5} if args.quick else {"ref_epochs": 150, "query_epochs": 100}
    scenarios = args.scenarios.split(",") if args.scenarios else (["pancreas"] if args.quick else
                                                                  ["pancreas", "pbmc", "ifnb"])
    C.quiet()
    work = C.work_dir(args.out, "streaming")
    t0 = time.perf_counter()
    jobs = [(name, seed, mode, cfg, work) for name in scenarios for seed in range(args.seeds)
            for mode in ("memory", "streamed")]
    rows = C.run_jobs(run, jobs, args.jobs)
    shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - t0
    df = pd.DataFrame(rows)
    table = C.mean_sd(df, ["scenario", "mode"], [*METRICS, "seconds"])
    checks, met = [], True
    for name in scenarios:
        mine = df[df.scenario == name]
        for m in METRICS:
            before = mine[mine["mode"] == "memory"][m]
            after = mine[mine["mode"] == "streamed"][m]
            gap, sd = float(after.mean() - before.mean()), float(before.std(ddof=1)) if len(before) > 1 else float("nan")
            ok = abs(gap) <= sd if sd == sd else None
            met = met and bool(ok)
            checks.append({"scenario": name, "measure": m, "in_memory": float(before.mean()),
                           "streamed": float(after.mean()), "difference": gap, "sd_in_memory": sd,
                           "within_one_sd": "n/a (one seed)" if ok is None else ("yes" if ok else "NO")})
    ck = pd.DataFrame(checks)
    md = [
        "# Streamed batches against cells in memory" + (" (QUICK MODE: smoke run, numbers not meaningful)"
                                                        if args.quick else ""),
        "",
        f"{args.seeds} seed(s), mean ± sd. Reference {cfg['ref_epochs']} epochs, ewc fold-in {cfg['query_epochs']} "
        "epochs, atlas defaults otherwise. `memory`: AnnData objects in memory (the path before streaming); "
        f"`streamed`: the same data read backed from .h5ad files, written to the cell store in parts and trained on "
        f"from the store in shuffled blocks of {BLOCK} cells (the default block, 65,536 cells, would hold each of these "
        "data sets whole and give the in-memory minibatches draw for draw).",
        "",
        C.md_table(table),
        "",
        "Streamed minus in-memory, against the in-memory runs' standard deviation over seeds:",
        "",
        C.md_table(ck),
        "",
        f"Bar (every measure within one sd): {'met' if met else 'MISSED'}.",
        "",
        f"Total wall time {wall / 60:.1f} min.",
    ]
    C.write_outputs(args.out, "streaming", {"quick": args.quick, "settings": cfg, "block_cells": BLOCK,
                                            "seeds": args.seeds, "checks": checks, "met": met,
                                            "records": df.to_dict("records"), "wall_seconds": wall}, "\n".join(md))


if __name__ == "__main__":
    main()
