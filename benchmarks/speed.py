"""Speed: training throughput, fold-in and Fisher time, label transfer, against scvi-tools and scikit-learn.

Fold-in time per strategy vs scvi-tools; label transfer (faiss exact / HNSW / IVF) vs scikit-learn brute force.

    python -m benchmarks.speed [--quick] [--out DIR]

Training data are generated (see ``common.GENERATOR_NOTE``): reference = 10k generated cells x
2000 genes in 3 batches, query = another 10k in 3 new batches; the same epochs (early stopping
off) for ours and scvi-tools. kNN data are a synthetic 10-d Gaussian mixture (20 labelled
clusters), 10k queries, k = 50.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pandas as pd

from atlasengine.config import STRATEGIES
from benchmarks import common as C
from benchmarks import scvi_baseline as S

SC = C.Scenario("generated", "", "tech", "celltype", (), (), frozenset())


def settings(quick: bool) -> dict:
    if quick:
        return {"n_cells": 2000, "ref_epochs": 1, "query_epochs": 1, "fisher_cells": 200, "knn_sizes": [10_000],
                "generator_epochs": 10, "fisher_max_cells": 200}
    return {"n_cells": 10_000, "ref_epochs": 10, "query_epochs": 10, "fisher_cells": 10_000,
            "knn_sizes": [10_000, 100_000, 1_000_000], "generator_epochs": C.GENERATOR_EPOCHS, "fisher_max_cells": 2000}


def no_stop(epochs: int, seed: int = 0) -> dict:
    return {"max_epochs": epochs, "early_stopping": False, "seed": seed}


def training_speed(cfg: dict, out, have_scvi: bool) -> tuple[list[dict], dict]:
    from atlasengine import Atlas
    from atlasengine.continual import diagonal_fisher
    from atlasengine.training import CellData

    gen = C.generator_atlas(out, cfg["generator_epochs"])
    ref = C.generate_cells(gen, cfg["n_cells"], seed=1, prefix="r")
    query = C.generate_cells(gen, cfg["n_cells"], seed=2, prefix="q")
    work = C.work_dir(out, "speed")
    rows = []
    config = {"reference_training": {**no_stop(cfg["ref_epochs"]), "kl_warmup_epochs": 20},
              "query_training": no_stop(cfg["query_epochs"]), "continual": {"fisher_max_cells": cfg["fisher_max_cells"]}}
    import torch

    torch.manual_seed(0)
    t0 = time.perf_counter()
    Atlas.create(work / "ref.atlas", ref, batch_key="tech", label_key="celltype", config=config)
    create_wall = time.perf_counter() - t0
    tr = Atlas.open(work / "ref.atlas").info.training
    n_train = int(round(cfg["n_cells"] * 0.9))
    rows.append({"phase": "reference", "method": "ours", "epochs": tr["epochs"], "train_seconds": tr["seconds"],
                 "seconds_per_epoch": tr["seconds"] / tr["epochs"], "cells_per_second": n_train * tr["epochs"] / tr["seconds"],
                 "wall_seconds": create_wall, "fisher_seconds": tr.get("fisher_seconds")})
    for strat in STRATEGIES:
        atlas, res, wall = C.fold_in(work / "ref.atlas", work / f"{strat}.atlas", query, SC, strat)
        t = res.version.training
        rows.append({"phase": "fold-in", "method": strat, "epochs": t["epochs"], "train_seconds": t["seconds"],
                     "seconds_per_epoch": t["seconds"] / t["epochs"], "cells_per_second": t["cells_per_second"],
                     "wall_seconds": wall, "fisher_seconds": t.get("fisher_seconds")})
        print(f"  fold-in {strat}: {rows[-1]}", flush=True)
        import shutil

        shutil.rmtree(work / f"{strat}.atlas", ignore_errors=True)
    if have_scvi:
        model, secs, ep = S.train_reference(ref, "tech", 0, cfg["ref_epochs"])
        rows.append({"phase": "reference", "method": "scvi-tools", "epochs": ep, "train_seconds": secs,
                     "seconds_per_epoch": secs / ep, "cells_per_second": n_train * ep / secs, "wall_seconds": secs})
        q_model, secs, ep = S.surgery(model, query, 0, cfg["query_epochs"])
        rows.append({"phase": "fold-in", "method": "scvi-tools", "epochs": ep, "train_seconds": secs,
                     "seconds_per_epoch": secs / ep, "cells_per_second": n_train * ep / secs, "wall_seconds": secs})
    # Fisher over n cells vs one reference training epoch
    atlas = Atlas.open(work / "ref.atlas")
    model = atlas.model()
    data = CellData(ref.X, pd.Index(atlas.batches).get_indexer(ref.obs["tech"]))
    n_f = min(cfg["fisher_cells"], len(data))
    t0 = time.perf_counter()
    diagonal_fisher(model, data, max_cells=n_f, chunk_size=atlas.config.continual.fisher_chunk_size)
    fisher_secs = time.perf_counter() - t0
    epoch_secs = rows[0]["seconds_per_epoch"]
    fisher = {"cells": n_f, "seconds": fisher_secs, "seconds_per_10k_cells": fisher_secs * 10_000 / n_f,
              "reference_epoch_seconds": epoch_secs,
              "epoch_seconds_per_10k_cells": epoch_secs * 10_000 / n_train,
              "ratio_fisher_to_epoch_10k": (fisher_secs * 10_000 / n_f) / (epoch_secs * 10_000 / n_train)}
    print(f"  fisher: {fisher}", flush=True)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return rows, fisher


def mixture(n: int, centers: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    n_clusters, d = centers.shape
    lab = rng.integers(0, n_clusters, size=n)
    x = centers[lab] + rng.normal(0, 1, size=(n, d)).astype(np.float32)
    return x, np.array([f"type{i:02d}" for i in lab])


def add_speedups(rows: list[dict], sklearn_rows: list[dict]) -> None:
    """Speed-ups against sklearn (fit + query: scArches' kNN refits on every call, the engine does not).

    ``speedup_vs_sklearn``: per ``transfer_labels`` call against sklearn's default neighbours,
    the engine's index being built once per atlas version and stored with it;
    ``speedup_incl_build``: with the one-off build added; ``speedup_vs_sklearn_brute``: per
    call against ``algorithm='brute'`` (what scArches' KNeighborsTransformer uses).
    """
    sk = {r["method"]: r["total_seconds"] for r in sklearn_rows}
    default = sk.get("sklearn NearestNeighbors (default)", float("nan"))
    brute = sk.get("sklearn NearestNeighbors (brute)", float("nan"))
    for r in rows:
        r["speedup_vs_sklearn"] = default / r["transfer_seconds"]
        r["speedup_incl_build"] = default / r["total_seconds"]
        r["speedup_vs_sklearn_brute"] = brute / r["transfer_seconds"]


def knn_speed(sizes: list[int], n_query: int = 10_000, d: int = 10, kinds=("exact", "hnsw", "ivf"),
              sklearn: bool = True) -> list[dict]:
    from sklearn.neighbors import NearestNeighbors

    from atlasengine.config import TransferConfig
    from atlasengine.transfer import NeighborIndex, label_probabilities, transfer_labels

    rows = []
    centers = np.random.default_rng(0).normal(0, 1.5, size=(20, d)).astype(np.float32)
    for n in sizes:
        ref, lab = mixture(n, centers, np.random.default_rng(n))
        q, _ = mixture(n_query, centers, np.random.default_rng(1))
        res = {}
        for kind in kinds:
            tcfg = TransferConfig(index=kind)
            t0 = time.perf_counter()
            idx = NeighborIndex.build(ref, lab, tcfg)
            t1 = time.perf_counter()
            p = transfer_labels(idx, q, tcfg)
            t2 = time.perf_counter()
            res[kind] = p
            rows.append({"n_reference": n, "method": f"atlasengine {kind}", "build_seconds": t1 - t0,
                         "transfer_seconds": t2 - t1, "total_seconds": t2 - t0})
        preds = {f"atlasengine {k}": v["predicted_label"].to_numpy() for k, v in res.items()}
        for algorithm in ("auto", "brute") if sklearn else ():
            name = f"sklearn NearestNeighbors ({'default' if algorithm == 'auto' else algorithm})"
            t0 = time.perf_counter()
            nn = NearestNeighbors(n_neighbors=50, algorithm=algorithm).fit(ref)
            t1 = time.perf_counter()
            dist, ind = nn.kneighbors(q)
            cats, codes = np.unique(lab, return_inverse=True)
            probs = label_probabilities(dist, codes[ind], len(cats), "scarches")
            preds[name] = cats[probs.argmax(1)]
            t2 = time.perf_counter()
            rows.append({"n_reference": n, "method": name, "build_seconds": t1 - t0,
                         "transfer_seconds": t2 - t1, "total_seconds": t2 - t0})
        mine = [r for r in rows if r["n_reference"] == n]
        for r in mine:
            r["labels_equal_exact"] = float((preds[r["method"]] == preds["atlasengine exact"]).mean())
        add_speedups(mine, [r for r in mine if r["method"].startswith("sklearn")])
        print(f"  knn n={n}: " + "; ".join(f"{r['method']} {r['total_seconds']:.2f}s eq={r['labels_equal_exact']:.4f}"
                                           for r in mine), flush=True)
    return rows


def knn_only(args) -> None:
    """Re-measure exact + IVF label transfer and merge into an existing speed.json (other rows kept)."""
    import json

    path = args.out / "speed.json"
    old = json.loads(path.read_text())
    sizes = old["settings"]["knn_sizes"]
    new = knn_speed(sizes, kinds=("exact", "ivf"), sklearn=False)
    keep = [r for r in old["knn"] if r["method"] not in {x["method"] for x in new}]
    for r in new:
        add_speedups([r], [k for k in keep if k["n_reference"] == r["n_reference"] and k["method"].startswith("sklearn")])
    old["knn"] = sorted(keep + new, key=lambda r: (r["n_reference"], r["method"]))
    old["knn_note"] = ("atlasengine exact / ivf rows re-measured by `--knn-only` (labels_equal_exact against that "
                       "exact run); hnsw and sklearn rows from the full run")
    old["knn_only_command"] = C.command_line()
    path.write_text(json.dumps(C.json_ready(old), indent=1))
    render(args, old)


def main() -> None:
    if "--knn-only" in sys.argv:
        sys.argv.remove("--knn-only")
        args = C.parse_args(__doc__.splitlines()[0], default_seeds=1)
        knn_only(args)
        return
    args = C.parse_args(__doc__.splitlines()[0], default_seeds=1)
    cfg = settings(args.quick)
    C.quiet()
    have_scvi, why = S.available()
    if not have_scvi:
        print(f"NOTE: {why}; scvi-tools timings skipped", flush=True)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    train_rows, fisher = training_speed(cfg, args.out, have_scvi)
    knn_rows = knn_speed(cfg["knn_sizes"])
    payload = {"quick": args.quick, "settings": cfg, "scvi_available": have_scvi, "scvi_note": why,
               "training": train_rows, "fisher": fisher, "knn": knn_rows, "load_before": load_before,
               "load_after": os.getloadavg(), "wall_seconds": time.perf_counter() - t_start}
    render(args, payload)


def render(args, payload: dict) -> None:
    """Ratios, Markdown and JSON from the measured rows."""
    cfg, fisher = payload["settings"], payload["fisher"]
    have_scvi, why = payload["scvi_available"], payload["scvi_note"]
    tr = pd.DataFrame(payload["training"])
    kn = pd.DataFrame(payload["knn"])

    def get(phase, method, col):
        v = tr[(tr.phase == phase) & (tr.method == method)][col]
        return float(v.iloc[0]) if len(v) else float("nan")

    ratios = {
        "ours_reference_cells_per_second": get("reference", "ours", "cells_per_second"),
        "scvi_reference_cells_per_second": get("reference", "scvi-tools", "cells_per_second"),
        "throughput_ratio_ours_over_scvi": get("reference", "ours", "cells_per_second") / get("reference", "scvi-tools", "cells_per_second"),
        "ewc_over_surgery_per_epoch": get("fold-in", "ewc", "seconds_per_epoch") / get("fold-in", "surgery", "seconds_per_epoch"),
        "ewc_over_surgery_per_cell": get("fold-in", "surgery", "cells_per_second") / get("fold-in", "ewc", "cells_per_second"),
        "finetune_over_surgery_per_epoch": get("fold-in", "finetune", "seconds_per_epoch") / get("fold-in", "surgery", "seconds_per_epoch"),
        "surgery_over_scvi_per_epoch": get("fold-in", "surgery", "seconds_per_epoch") / get("fold-in", "scvi-tools", "seconds_per_epoch"),
        "ewc_over_scvi_per_epoch": get("fold-in", "ewc", "seconds_per_epoch") / get("fold-in", "scvi-tools", "seconds_per_epoch"),
        "fisher_over_epoch_10k": fisher["ratio_fisher_to_epoch_10k"],
    }
    for _, r in kn[kn.n_reference == 100_000].iterrows():
        if r.method.startswith("atlasengine"):
            kind = r.method.split()[-1]
            ratios[f"knn_100k_speedup_{kind}_vs_sklearn"] = float(r.speedup_vs_sklearn)
            ratios[f"knn_100k_speedup_{kind}_vs_sklearn_brute"] = float(r.get("speedup_vs_sklearn_brute", float("nan")))
            ratios[f"knn_100k_{kind}_labels_equal_exact"] = float(r.labels_equal_exact)
    payload["ratios"] = ratios
    rt = pd.DataFrame([{"measure": k, "value": v} for k, v in ratios.items()])
    md = [
        "# Speed" + (" (QUICK MODE: smoke run, numbers not meaningful)" if args.quick else ""),
        "",
        C.GENERATOR_NOTE.format(epochs=cfg["generator_epochs"]),
        "",
        f"Reference = {cfg['n_cells']:,} generated cells x 2000 genes (3 batches), query = {cfg['n_cells']:,} other generated "
        f"cells (3 new batches). Reference {cfg['ref_epochs']} epochs, fold-in {cfg['query_epochs']} epochs, early stopping "
        "off, batch size 128, 10% validation split, for ours and scvi-tools alike. cells_per_second = training cells x "
        "epochs / training seconds (for ewc the engine's own count, which includes the replayed cells). wall_seconds of "
        "a fold-in = the whole `ingest` call (training + Fisher of the new version + embedding + index + store)."
        + ("" if have_scvi else f" scvi-tools: UNAVAILABLE ({why})."),
        "",
        C.md_table(tr, 2),
        "",
        f"Fisher (`diagonal_fisher`, per-cell gradients) over {fisher['cells']:,} cells: {fisher['seconds']:.1f} s = "
        f"{fisher['seconds_per_10k_cells']:.1f} s per 10k cells, vs {fisher['epoch_seconds_per_10k_cells']:.1f} s for one "
        f"training epoch over 10k cells (ratio {fisher['ratio_fisher_to_epoch_10k']:.2f}).",
        "",
        "Label transfer: synthetic 10-d Gaussian mixture (20 labelled clusters, centres N(0, 1.5^2), unit noise, so "
        "clusters overlap like cell types; not cell data), 10,000 queries, k = 50; build = index construction (sklearn: "
        "fit; ivf: k-means training + add), transfer = search + scArches weighting; labels_equal_exact = share of best "
        "labels equal to the atlasengine exact (faiss IndexFlatL2) result. speedup_vs_sklearn = sklearn fit + query "
        "(scArches refits on every call) / the engine's transfer (its index is built once per atlas version, at ingest, "
        "and stored); speedup_incl_build adds the one-off build to the engine's side; speedup_vs_sklearn_brute: against sklearn with algorithm='brute' (the engine of scArches' kNN). Index settings: TransferConfig defaults "
        "(hnsw M 32, efSearch 128; ivf nlist 1024, nprobe 32)." + (f" {payload['knn_note']}." if payload.get("knn_note") else ""),
        "",
        C.md_table(kn, 3),
        "",
        "Ratios:",
        "",
        C.md_table(rt, 2),
        "",
        f"Load average before the run {tuple(round(x, 2) for x in payload['load_before'])}, after "
        f"{tuple(round(x, 2) for x in payload['load_after'])} (2 cores; other processes on the machine slow every timing).",
        f"Total wall time {payload['wall_seconds'] / 60:.1f} min.",
    ]
    C.write_outputs(args.out, "speed", payload, "\n".join(md))

if __name__ == "__main__":
    main()
