"""Scale: time and peak memory of create, a 10k-cell ingest, latent() and report() on big atlases.

Generated atlases of 10k, 100k and 1M cells x 2000 genes.

    python -m benchmarks.scale [--quick] [--out DIR] [--sizes 10000,100000,1000000]

Each step runs in its own subprocess; peak memory is that process's peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), which includes the Python interpreter, torch and
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

import pandas as pd

from benchmarks import common as C

REF_EPOCHS, QUERY_EPOCHS, N_QUERY = 1, 2, 10_000
BASE = 100_000  # larger atlases are copies of the 100k generated cells (renamed)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(step: str, atlas_path: str, data_path: str, report_path: str) -> dict:
    """One measured step, in a fresh process; returns its timings and peak RSS."""
    import anndata as ad

    from atlasengine import Atlas

    C.quiet()
    adata = ad.read_h5ad(data_path) if data_path else None
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
        atlas = Atlas.open(atlas_path)
        if not hasattr(atlas, "report"):
            return {"skipped": "Atlas.report not available in this version of atlasengine"}
        atlas.report(report_path)
        extra = {"report_bytes": Path(report_path).stat().st_size}
    return {"seconds": time.perf_counter() - t0, "rss_before_mb": before, "peak_rss_mb": rss_mb(), "detail": extra}


def run_child(step: str, atlas_path: Path, data_path: Path | None, report_path: Path | None = None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.scale", "--child", step, str(atlas_path), str(data_path or ""), str(report_path or "")]
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


def make_data(out: Path, sizes: list[int], quick: bool) -> dict[int, Path]:
    gen = C.generator_atlas(out, 10 if quick else C.GENERATOR_EPOCHS)
    d = out / "work" / "scale_data"
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    q = d / "query_10k.h5ad"
    if not q.exists():
        C.generate_cells(gen, N_QUERY, seed=99, prefix="q").write_h5ad(q)
    paths[0] = q
    base = None
    for n in sizes:
        p = d / f"ref_{n}.h5ad"
        if not p.exists():
            t0 = time.perf_counter()
            if n <= BASE:
                C.generate_cells(gen, n, seed=n, prefix="r").write_h5ad(p)
            else:
                if base is None:
                    import anndata as ad

                    bp = d / f"ref_{BASE}.h5ad"
                    base = ad.read_h5ad(bp) if bp.exists() else C.generate_cells(gen, BASE, seed=BASE, prefix="r")
                C.tile_cells(base, n // BASE, prefix="r").write_h5ad(p)
            print(f"generated {n:,} cells in {time.perf_counter() - t0:.0f}s", flush=True)
        paths[n] = p
    return paths


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        step, atlas_path, data_path, report_path = sys.argv[2:6]
        print(json.dumps(C.json_ready(child(step, atlas_path, data_path, report_path))))
        return
    import argparse

    extra = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    extra.add_argument("--sizes", type=str)
    known, rest = extra.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args = C.parse_args(__doc__.splitlines()[0], default_seeds=1)
    sizes = [int(s) for s in known.sizes.split(",")] if known.sizes else ([10_000] if args.quick else [10_000, 100_000, 1_000_000])
    t_start = time.perf_counter()
    paths = make_data(args.out, sizes, args.quick)
    rows = []
    for n in sizes:
        work = C.work_dir(args.out, f"scale_{n}")
        atlas = work / "atlas"
        steps = [("create", paths[n]), ("ingest", paths[0]), ("latent", None)]
        if not args.quick:  # the report (UMAP of up to 20k cells) alone takes minutes: full mode only
            steps.append(("report", None))
        for step, data in steps:
            r = run_child(step, atlas, data, work / "report.html")
            r["n_cells"] = n
            rows.append(r)
            print(f"  {n:>9,} {step:7s} {r.get('seconds', float('nan')):8.1f}s peak {r.get('peak_rss_mb', float('nan')):8.0f} MB "
                  f"{r.get('error', '') or r.get('skipped', '')}", flush=True)
            write(args, sizes, rows, time.perf_counter() - t_start, partial=True)
            if "error" in r and step == "create":
                break
        shutil.rmtree(work, ignore_errors=True)
    write(args, sizes, rows, time.perf_counter() - t_start)


def write(args, sizes: list[int], rows: list[dict], wall: float, partial: bool = False) -> None:
    df = pd.DataFrame(rows)
    for col in ("seconds", "rss_before_mb", "peak_rss_mb", "error", "skipped"):
        if col not in df:
            df[col] = None
    df["peak_minus_before_mb"] = df["peak_rss_mb"] - df["rss_before_mb"]
    tab = df[["n_cells", "step", "seconds", "peak_rss_mb", "rss_before_mb", "peak_minus_before_mb", "error", "skipped"]]
    tab = tab.dropna(axis=1, how="all")
    ing = df[(df.step == "ingest") & (df.n_cells == max(sizes))]
    target = ""
    if len(ing) and pd.notna(ing.peak_rss_mb.iloc[0]):
        peak = float(ing.peak_rss_mb.iloc[0])
        target = (f"Target (ingest of 10k into the {max(sizes):,}-cell atlas under 4 GB peak): peak RSS {peak / 1024:.2f} GB "
                  f"-> {'met' if peak < 4096 else 'MISSED by ' + format((peak - 4096) / 1024, '.2f') + ' GB'}"
                  + ("" if max(sizes) >= 1_000_000 else " (the 1M atlas was not run here)") + ".")
    md = [
        "# Scale" + (" (QUICK MODE: 10k only, no report step)" if args.quick else ""),
        "",
        C.GENERATOR_NOTE.format(epochs=10 if args.quick else C.GENERATOR_EPOCHS)
        + f" Atlases above {BASE:,} cells are {BASE:,} generated cells repeated (renamed), which costs the engine the same.",
        "",
        f"Reference trained {REF_EPOCHS} epoch (few epochs on purpose: this measures storage, embedding, Fisher and index "
        f"costs, not model quality); query = {N_QUERY:,} generated cells in 3 new batches, ewc with the atlas defaults "
        f"({C.continual_defaults()}), "
        f"{QUERY_EPOCHS} epochs, early stopping off. seconds = the call itself; peak_rss_mb = peak RSS of the step's process "
        "(interpreter + torch + input AnnData included; rss_before_mb = after loading them).",
        "",
        C.md_table(tab, 1),
        "",
        target,
        "",
        f"Total wall time {wall / 60:.1f} min." + (" PARTIAL: the run was still going when this was written." if partial else ""),
    ]
    C.write_outputs(args.out, "scale", {"quick": args.quick, "sizes": sizes, "records": df.to_dict("records"), "partial": partial,
                                        "wall_seconds": wall}, "\n".join(md))


if __name__ == "__main__":
    main()
