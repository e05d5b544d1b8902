"""``atlasengine demo``: a reference atlas from real data, two queries folded in, what happened printed.

With ``../shared/data`` beside the checkout: the pancreas scenario of the paper (reference =
celseq, fluidigmc1, indrop; queries celseq2 then smartseq2, ductal cells held out of the
reference so the Unknown calls can be checked). Without it: scanpy's bundled PBMC set
(``pbmc68k_reduced``, counts rebuilt from its log-normalised ``raw``), split at random into a
reference and two queries; no network access either way.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import anndata as ad
import numpy as np

from atlasengine.cli.output import versions_table

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pancreas_panc8_small.h5ad"


def _pancreas() -> tuple[ad.AnnData, list[ad.AnnData], str, str, set[str], str]:
    a = ad.read_h5ad(SHARED)
    ref = a[a.obs["tech"].isin(["celseq", "fluidigmc1", "indrop"]) & (a.obs["celltype"] != "ductal")].copy()
    queries = [a[a.obs["tech"] == t].copy() for t in ("celseq2", "smartseq2")]
    return ref, queries, "tech", "celltype", {"ductal"}, f"pancreas ({SHARED.name}; ductal held out of the reference)"


def _scanpy_pbmc() -> tuple[ad.AnnData, list[ad.AnnData], str, str, set[str], str]:
    import scanpy as sc
    import scipy.sparse as sp

    a = sc.datasets.pbmc68k_reduced()  # ships inside scanpy: no download
    logn = a.raw.X.toarray() if sp.issparse(a.raw.X) else np.asarray(a.raw.X)
    counts = np.round(np.expm1(logn) * a.obs["n_counts"].to_numpy()[:, None] / 1e4)
    b = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=a.obs[["bulk_labels"]].copy(), var=a.raw.var[[]].copy())
    b.obs["bulk_labels"] = b.obs["bulk_labels"].astype(str)
    rng = np.random.default_rng(0)
    part = rng.choice(["reference", "query1", "query2"], size=b.n_obs, p=[0.6, 0.2, 0.2])
    b.obs["sample"] = part
    held = "Dendritic"
    ref = b[(part == "reference") & (b.obs["bulk_labels"] != held)].copy()
    queries = [b[part == q].copy() for q in ("query1", "query2")]
    what = "scanpy's bundled pbmc68k_reduced (counts rebuilt from log-normalised raw; random split into 3 samples; Dendritic held out)"
    return ref, queries, "sample", "bulk_labels", {held}, what


def run_demo(out: Path, quick: bool = False) -> None:
    """Build ``out/demo.atlas``, fold in two queries with EWC, print a summary, write the report."""
    from atlasengine import Atlas
    from atlasengine.transfer import evaluate_transfer

    t0 = time.perf_counter()
    if SHARED.exists():
        ref, queries, batch_key, label_key, novel, what = _pancreas()
    else:
        print(f"note: {SHARED} is not here, so the demo uses data that scanpy ships")
        ref, queries, batch_key, label_key, novel, what = _scanpy_pbmc()
    print(f"data: {what}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo.atlas"
    if path.exists():
        shutil.rmtree(path)
    # default settings: epochs by scvi-tools' rule (small data, more passes) with early stopping
    cfg = {"reference_training": {"max_epochs": 20}, "query_training": {"max_epochs": 15}} if quick else None
    print(f"1. reference: {ref.n_obs} cells x {ref.n_vars} genes, batches {sorted(ref.obs[batch_key].unique())}")
    atlas = Atlas.create(path, ref, batch_key=batch_key, label_key=label_key, config=cfg)
    print(f"   version 1 trained ({atlas.info.training['epochs']} epochs, {atlas.info.training['seconds']:.1f} s)")
    for n, q in enumerate(queries, start=2):
        print(f"{n}. folding in {q.n_obs} cells of batch {sorted(q.obs[batch_key].unique())} with EWC")
        res = atlas.ingest(q, batch_key=batch_key, strategy="ewc", dataset="+".join(sorted(q.obs[batch_key].unique())))
        ev = evaluate_transfer(res.predictions, q.obs[label_key].astype(str), novel)
        v1 = Atlas.open(path, version=1).latent()
        moved = float(np.linalg.norm(atlas.latent()[: len(v1)] - v1, axis=1).mean())
        print(
            f"   version {res.version.number}: {res.training['epochs']} epochs, {res.training['seconds']:.1f} s; "
            f"known-type accuracy {ev['known_accuracy']:.1%}; Unknown: {ev['novel_unknown_share']:.0%} of "
            f"{ev['n_novel']} held-out {'/'.join(sorted(novel))} cells, {ev['known_false_unknown']:.0%} of known; "
            f"novel-vs-known AUROC {ev['auroc_novel']:.2f}; reference cells moved {moved:.2f} (latent units)"
        )
        is_novel = q.obs[label_key].astype(str).isin(novel).to_numpy()
        called = res.predictions.loc[[str(c) for c in q.obs_names], "is_novel"].to_numpy()
        print(f"   calibrated novelty at a 5% false-alarm target: {called[is_novel].mean():.0%} of the held-out cells, "
              f"{called[~is_novel].mean():.0%} of known cells (transfer={{'unknown_rule': 'novelty'}} makes it the rule)")
    drift = atlas.drift()
    flagged = atlas.drift(by="flags")
    print("drift of the reference (aligned, vs version 1):",
          ", ".join(f"v{r.version}: {r.displacement_mean_aligned:.2f}" for r in drift[drift.scope == "vs_first"].itertuples()))
    print(f"drift flags raised: {len(flagged)}")
    report = atlas.report(out / "audit.html")
    print(f"versions:\n{versions_table(atlas)}")
    print(f"report: {report}; atlas: {path}; total {time.perf_counter() - t0:.0f} s")

