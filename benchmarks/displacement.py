"""How far each fold-in strategy moves the reference cells (the atlas issue's figure).

Pancreas as in the paper: reference = celseq, fluidigmc1, indrop (all cell types); query =
celseq2 + smartseq2. Engine defaults (epochs by scvi-tools' rule, early stopping); per seed the
reference is trained once and each strategy folds the query into its own copy. Displacement =
mean Euclidean distance between a reference cell's embedding at version 1 and at version 2,
raw and after orthogonal Procrustes alignment. Rows "ewc lambda=X" repeat ewc at other
penalty strengths (full mode only).

    python -m benchmarks.displacement [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import time

import anndata as ad
import pandas as pd

from benchmarks.common import (
    STRATEGIES,
    Scenario,
    create_reference,
    data_file,
    displacement,
    fold_in,
    md_table,
    mean_sd,
    parse_args,
    procrustes_displacement,
    work_dir,
    write_outputs,
)

SCENARIO = Scenario(
    name="pancreas_all_types", file="pancreas_panc8_small.h5ad", batch_key="tech", label_key="celltype",
    ref_batches=("celseq", "fluidigmc1", "indrop"), query_batches=("celseq2", "smartseq2"), novel=frozenset(),
)
EXTRA_LAMBDAS = (10.0, 100.0, 1000.0)  # besides the default (row "ewc"), to show the trade-off


def main() -> None:
    args = parse_args(__doc__)
    a = ad.read_h5ad(data_file(SCENARIO.file))
    ref = a[a.obs["tech"].isin(SCENARIO.ref_batches)].copy()
    query = a[a.obs["tech"].isin(SCENARIO.query_batches)].copy()
    epochs = (30, 20) if args.quick else (None, None)
    work = work_dir(args.out, "displacement")
    rows = []
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        atlas, _ = create_reference(work / f"ref{seed}", SCENARIO, ref, seed, epochs[0], epochs[1])
        z1 = atlas.latent()
        runs = [(s, s, None) for s in STRATEGIES]
        runs += [] if args.quick else [(f"ewc lambda={lam:g}", "ewc", {"ewc_lambda": lam}) for lam in EXTRA_LAMBDAS]
        for name, strategy, continual in runs:
            folded, res, secs = fold_in(work / f"ref{seed}", work / f"run{seed}", query, SCENARIO, strategy,
                                        continual=continual)
            z2 = folded.latent()[: len(z1)]
            rows.append({"strategy": name, "seed": seed, "displacement": displacement(z1, z2),
                         "displacement_aligned": procrustes_displacement(z1, z2), "epochs": res.training["epochs"],
                         "fold_in_seconds": secs})
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    summary = mean_sd(df, ["strategy"], ["displacement", "displacement_aligned", "epochs", "fold_in_seconds"])
    md = (f"# Reference displacement per strategy\n\n{__doc__.split(chr(10) + chr(10))[1]}\n\n"
          f"{args.seeds} seed(s); epochs {'30/20 (quick)' if args.quick else 'engine defaults'}; "
          f"total {time.perf_counter() - t0:.0f} s.\n\n" + md_table(summary))
    write_outputs(args.out, "displacement", {"quick": args.quick, "rows": rows,
                                             "wall_seconds": time.perf_counter() - t0}, md)


if __name__ == "__main__":
    main()
