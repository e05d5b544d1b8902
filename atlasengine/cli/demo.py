"""``atlasengine demo``: a reference atlas from real data, two queries folded in, what happened printed.

The data are the 500-cell pancreas set the package carries (:mod:`atlasengine.datasets`), split
as in the paper: reference = celseq, fluidigmc1 and indrop without the ductal cells; queries =
celseq2, then smartseq2, ductal cells included, so that the Unknown calls can be checked. No
network and no other files are needed.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd

from atlasengine.cli.output import versions_table

REFERENCE = ("celseq", "fluidigmc1", "indrop")
QUERIES = ("celseq2", "smartseq2")
HELD_OUT = "ductal"


def _refuse_unless_the_demos(path: Path) -> None:
    """Refuse to remove ``path`` unless it is an atlas the demo wrote and nothing else was folded into."""
    from atlasengine import Atlas
    from atlasengine.errors import AtlasError

    try:
        atlas = Atlas.open(path)  # an older demo atlas is upgraded (and then replaced), not taken for another's
        ours = atlas.version <= 1 + len(QUERIES) and set(atlas.batches) <= {*REFERENCE, *QUERIES}
    except AtlasError as exc:
        ours, why = False, f" ({exc})"
    else:
        why = f" (version {atlas.version}, batches {', '.join(atlas.batches)})"
    if not ours:
        raise AtlasError(f"{path} is not an atlas the demo wrote, or more was folded into it{why}: it is left as it "
                         "is; move it away or pass another --out")


def query_summary(predictions: pd.DataFrame, truth: pd.Series) -> list[str]:
    """Lines a biologist reads about one folded-in query: accuracy and the Unknown calls under both rules."""
    from atlasengine.transfer import evaluate_transfer

    threshold = predictions.attrs.get("uncertainty_threshold", 0.3)
    paper = evaluate_transfer(predictions.assign(is_unknown=predictions["uncertainty"] > threshold), truth, {HELD_OUT})
    novelty = evaluate_transfer(predictions.assign(is_unknown=predictions["is_novel"].astype(bool)), truth, {HELD_OUT})
    target = predictions.attrs.get("novelty_target", 0.05)

    def rule(name: str, ev: dict) -> str:
        return (f"{name}: {ev['novel_unknown_share']:.0%} of the {ev['n_novel']} held-out {HELD_OUT} cells called "
                f"Unknown, {ev['known_false_unknown']:.0%} of known cells")

    return [
        f"{len(predictions)} cells mapped; known-type accuracy {paper['known_accuracy']:.1%}",
        rule(f"paper's rule (kNN uncertainty > {threshold:g})", paper),
        rule(f"calibrated novelty ({target:.0%} false-alarm target)", novelty),
    ]


def run_demo(out: Path, quick: bool = False) -> None:
    """Build ``out/demo.atlas``, fold in two queries with EWC, print a summary, write the report."""
    from atlasengine import Atlas
    from atlasengine.datasets import pancreas

    t0 = time.perf_counter()
    data = pancreas()
    # the set's own 'dataset' column names each cell's sample; the atlas's 'dataset' is the fold-in
    data.obs = data.obs.rename(columns={"dataset": "sample"})
    tech = data.obs["tech"].astype(str)
    ref = data[(tech.isin(REFERENCE) & (data.obs["celltype"] != HELD_OUT)).to_numpy()].copy()
    print(f"data: the pancreas set the package carries ({data.n_obs} cells, {data.n_vars} genes, 5 technologies); "
          f"{HELD_OUT} cells held out of the reference")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo.atlas"
    if path.exists():
        _refuse_unless_the_demos(path)
        shutil.rmtree(path)  # an earlier demo's atlas: the demo starts again
    cfg = {"reference_training": {"max_epochs": 20}, "query_training": {"max_epochs": 15}} if quick else None
    print(f"1. reference: {ref.n_obs} cells of {', '.join(REFERENCE)}")
    atlas = Atlas.create(path, ref, batch_key="tech", label_key="celltype", config=cfg)
    print(f"   version 1 trained ({atlas.info.training['epochs']} epochs, {atlas.info.training['seconds']:.1f} s)")
    for n, name in enumerate(QUERIES, start=2):
        query = data[(tech == name).to_numpy()].copy()
        print(f"{n}. folding in {query.n_obs} {name} cells with EWC")
        res = atlas.ingest(query, batch_key="tech", strategy="ewc", dataset=name)
        print(f"   version {res.version.number} ({res.training['epochs']} epochs, {res.training['seconds']:.1f} s)")
        for line in query_summary(res.predictions, query.obs["celltype"]):
            print(f"   {line}")
    drift = atlas.drift()
    print("reference drift (mean aligned displacement from version 1): "
          + ", ".join(f"v{r.version}: {r.displacement_mean_aligned:.2f}"
                      for r in drift[drift.scope == "vs_first"].itertuples()))
    print(f"drift flags raised: {len(atlas.drift(by='flags'))}")
    audit = atlas.audit(out / "audit.html")
    report = audit.path
    print("report status:")
    for line in audit.headline:
        print(f"   {line}")
    print(f"versions:\n{versions_table(atlas)}")
    print(f"report: {report}; atlas: {path}; total {time.perf_counter() - t0:.0f} s")
