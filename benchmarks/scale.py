"""Scale: time and peak memory of create, a 10k-cell ingest, latent() and report() on big atlases.

Generated atlases of 10k to 3M cells x 2000 genes at current 10x depth (about 500 non-zeros per
cell), created two ways: from an AnnData in memory (the path before streaming) and from a
backed h5ad (``anndata.read_h5ad(path, backed="r")``: counts read, checked and written in parts,
training reading shuffled blocks back from the cell store).

    python -m benchmarks.scale [--quick] [--out DIR] [--runs memory:10000,backed:3000000]

Each step runs in its own subprocess; peak memory is that process's peak resident set size
(``VmHWM`` of ``/proc/self/status``), which includes the Python interpreter, torch and
the input AnnData (the RSS after loading them is reported as ``rss_before_mb``). The reference is
trained for 1 epoch only (this measures the engine's plumbing, not model quality); the query
fold-in is ewc with the atlas defaults and 2 epochs, early stopping off.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import common as C

REF_EPOCHS, QUERY_EPOCHS, N_QUERY = 1, 2, 10_000
BASE = 100_000  # larger atlases are copies of the 100k generated cells (renamed)
TARGET_NNZ = 500  # non-zeros per cell of current 10x data over 2,000 variable genes
GB4 = 4096


def rss_mb() -> float:
    """Peak resident memory of this process so far (VmHWM), in MiB (2**20 bytes; "MB" in the tables).

    Not ``getrusage``'s ``ru_maxrss``: Linux keeps that across ``exec``, so a step's process
    would report its parent's peak (the benchmark's own, after generating the data) when that
    was higher.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(step: str, atlas_path: str, data_path: str, report_path: str, mode: str) -> dict:
    """One measured step, in a fresh process; returns its timings and peak RSS."""
    import anndata as ad

    from atlasengine import Atlas

    C.quiet()
    adata = None
    if data_path:
        adata = ad.read_h5ad(data_path, backed="r") if mode == "backed" else ad.read_h5ad(data_path)
    before = rss_mb()
    t0 = time.perf_counter()
    extra = {}
    if step == "create":
        Atlas.create(atlas_path, adata, batch_key="tech", label_key="celltype", config={
            "reference_training": {"max_epochs": REF_EPOCHS, "early_stopping": False},
            "query_training": {"max_epochs": QUERY_EPOCHS, "early_stopping": False}})
        extra = Atlas.open(atlas_path).info.training
    elif step == "ingest":
        res = Atlas.open(atlas_path).ingest(adata, batch_key="tech", strategy="ewc")
        extra = res.version.training
    elif step == "latent":
        z = Atlas.open(atlas_path).latent()
        extra = {"shape": list(z.shape)}
    elif step == "report":
        Atlas.open(atlas_path).report(report_path)
        extra = {"report_bytes": Path(report_path).stat().st_size}
    return {"seconds": time.perf_counter() - t0, "rss_before_mb": before, "peak_rss_mb": rss_mb(), "detail": extra}


def run_child(step: str, atlas_path: Path, data_path: Path | None, report_path: Path | None = None,
              mode: str = "memory") -> dict:
    cmd = [sys.executable, "-m", "benchmarks.scale", "--child", step, str(atlas_path), str(data_path or ""),
           str(report_path or ""), mode]
    import os

    import torch

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=C.BENCH_DIR.parent, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        print(p.stderr[-3000:], flush=True)
        return {"step": step, "error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}",
                "process_seconds": wall}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return {"step": step, **out, "process_seconds": wall}


def find_depth(gen, target: float = TARGET_NNZ) -> tuple[float, float]:
    """Return the library-size factor at which generated cells carry about ``target`` non-zeros (bisection on 2,000 cells)."""
    def nnz(depth: float) -> float:
        return C.generate_cells(gen, 2_000, seed=7, prefix="d", depth=depth).X.getnnz(axis=1).mean()

    low, high = 1.0, 2.0
    while nnz(high) < target:
        low, high = high, high * 2
    for _ in range(6):
        mid = (low + high) / 2
        low, high = (mid, high) if nnz(mid) < target else (low, mid)
    return high, float(nnz(high))


def make_data(out: Path, sizes: list[int], quick: bool) -> tuple[dict[int, Path], dict]:
    gen = C.generator_atlas(out, 10 if quick else C.GENERATOR_EPOCHS)
    d = out / "work" / "scale_data"
    d.mkdir(parents=True, exist_ok=True)
    meta_path = d / "depth.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
    else:
        depth, nnz = find_depth(gen)
        meta = {"depth": depth, "nnz_per_cell_sample": nnz}
        meta_path.write_text(json.dumps(meta))
    depth = meta["depth"]
    paths = {}
    q = d / "query_10k.h5ad"
    if not q.exists():
        C.generate_cells(gen, N_QUERY, seed=99, prefix="q", depth=depth).write_h5ad(q)
    paths[0] = q
    base = None
    for n in sizes:
        p = d / f"ref_{n}.h5ad"
        if not p.exists():
            t0 = time.perf_counter()
            if n <= BASE:
                C.generate_cells(gen, n, seed=n, prefix="r", depth=depth).write_h5ad(p)
            else:
                if base is None:
                    import anndata as ad

                    bp = d / f"ref_{BASE}.h5ad"
                    base = ad.read_h5ad(bp) if bp.exists() else C.generate_cells(gen, BASE, seed=BASE, prefix="r",
                                                                                   depth=depth)
                C.write_tiled_h5ad(base, n, p, prefix="r")
            print(f"generated {n:,} cells in {time.perf_counter() - t0:.0f}s", flush=True)
        paths[n] = p
    import anndata as ad

    probe = ad.read_h5ad(paths[min(sizes)], backed="r")
    meta["nnz_per_cell"] = float(np.diff(probe.X.group["indptr"][:]).mean())
    probe.file.close()
    return paths, meta


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        step, atlas_path, data_path, report_path, mode = sys.argv[2:7]
        print(json.dumps(C.json_ready(child(step, atlas_path, data_path, report_path, mode))))
        return
    import argparse

    extra = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    extra.add_argument("--runs", type=str)
    known, rest = extra.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args = C.parse_args(__doc__.splitlines()[0], default_seeds=1)
    if known.runs:
        runs = [(m, int(n)) for m, n in (r.split(":") for r in known.runs.split(","))]
    elif args.quick:
        runs = [("memory", 10_000), ("backed", 10_000)]
    else:
        runs = [("memory", 10_000), ("backed", 10_000), ("memory", 1_000_000), ("backed", 1_000_000),
                ("backed", 3_000_000)]
    bad = [m for m, _ in runs if m not in ("memory", "backed")]
    if bad:
        raise SystemExit(f"--runs modes are 'memory' and 'backed', got {bad}")
    sizes = sorted({n for _, n in runs})
    t_start = time.perf_counter()
    paths, meta = make_data(args.out, sizes, args.quick)
    rows = []
    for mode, n in runs:
        work = C.work_dir(args.out, f"scale_{mode}_{n}")
        atlas = work / "atlas"
        steps = [("create", paths[n]), ("ingest", paths[0]), ("latent", None)]
        if not args.quick:  # the report (UMAP of up to 20k cells) is in full mode only
            steps.append(("report", None))
        for step, data in steps:
            r = run_child(step, atlas, data, work / "report.html", mode)
            r["n_cells"], r["input"] = n, mode if step == "create" else "memory"
            r["run"] = f"{mode} {n:,}"
            rows.append(r)
            print(f"  {mode:7s} {n:>9,} {step:7s} {r.get('seconds', float('nan')):8.1f}s peak "
                  f"{r.get('peak_rss_mb', float('nan')):8.0f} MB {r.get('error', '')}", flush=True)
            write(args, runs, meta, rows, time.perf_counter() - t_start, partial=True)
            if "error" in r and step == "create":
                break
        shutil.rmtree(work, ignore_errors=True)
    write(args, runs, meta, rows, time.perf_counter() - t_start)


def write(args, runs: list[tuple[str, int]], meta: dict, rows: list[dict], wall: float, partial: bool = False) -> None:
    df = pd.DataFrame(rows)
    for col in ("seconds", "rss_before_mb", "peak_rss_mb", "error"):
        if col not in df:
            df[col] = None
    df["peak_minus_before_mb"] = df["peak_rss_mb"] - df["rss_before_mb"]
    tab = df[["run", "step", "input", "seconds", "peak_rss_mb", "rss_before_mb", "peak_minus_before_mb", "error"]]
    tab = tab.dropna(axis=1, how="all")
    verdicts = []
    for mode, n in runs:
        if mode != "backed" or n < 1_000_000:
            continue
        mine = df[df["run"] == f"{mode} {n:,}"]
        for step in ("create", "ingest"):
            r = mine[mine.step == step]
            if len(r) and pd.notna(r.peak_rss_mb.iloc[0]):
                peak = float(r.peak_rss_mb.iloc[0])
                verdicts.append(f"- {step} ({'from a backed h5ad' if step == 'create' else '10k cells'}) with {n:,} "
                                f"cells: peak RSS {peak / 1024:.2f} GiB -> {'met' if peak < GB4 else 'MISSED'} "
                                "(target: under 4 GiB = 4,096 MiB)")
    md = [
        "# Scale" + (" (QUICK MODE: 10k only, no report step)" if args.quick else ""),
        "",
        C.GENERATOR_NOTE.format(epochs=10 if args.quick else C.GENERATOR_EPOCHS)
        + f" Library sizes are scaled by {meta['depth']:.2f} to current 10x depth: {meta['nnz_per_cell']:.0f} non-zeros "
        f"per cell on average (target {TARGET_NNZ}). Atlases above {BASE:,} cells are {BASE:,} generated cells repeated "
        "(renamed), which costs the engine the same.",
        "",
        f"Reference trained {REF_EPOCHS} epoch (few epochs on purpose: this measures reading, storage, training "
        f"throughput, embedding, Fisher and index costs, not model quality); query = {N_QUERY:,} generated cells in 3 "
        f"new batches, in memory, ewc with the atlas defaults ({C.continual_defaults()}), {QUERY_EPOCHS} epochs, early "
        "stopping off. `input` of create: `memory` = `anndata.read_h5ad(path)` (the whole matrix in memory, as before "
        "streaming), `backed` = `read_h5ad(path, backed='r')` (counts read in parts, training from the cell store in "
        "shuffled blocks of 65,536 cells). seconds = the call itself; peak_rss_mb = peak RSS of the step's process "
        "(interpreter + torch + input AnnData included; rss_before_mb = after loading them).",
        "",
        C.md_table(tab, 1),
        "",
        *verdicts,
        "",
        f"Total wall time {wall / 60:.1f} min." + (" PARTIAL: the run was still going when this was written." if partial else ""),
    ]
    C.write_outputs(args.out, "scale", {"quick": args.quick, "runs": [list(r) for r in runs], "data": meta,
                                        "records": df.to_dict("records"), "partial": partial, "wall_seconds": wall},
                    "\n".join(md))


if __name__ == "__main__":
    main()
