"""Unknown groups: the cells a version called Unknown, clustered on the atlas embedding, with their markers.

Composes :mod:`atlasengine.transfer.groups` with what a version stores: its predictions, the
embedding of every cell under the atlas's model, and counts read (checked) from the cell store.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from atlasengine.errors import InputError
from atlasengine.numerics import sorted_sample
from atlasengine.store.version import VersionReader
from atlasengine.transfer.groups import MarkerTables, cluster, log_normalise, neighbour_scale, rank_markers
from atlasengine.transfer.index import NeighborIndex
from atlasengine.transfer.knn import transfer_labels


def _newest_ingest(reader: VersionReader) -> int:
    """Return the newest version up to the reader's that added cells (a relabel adds none); 1 if none did."""
    added = [v.number for v in reader.manifest.versions if v.n_new_cells > 0]
    return added[-1] if added else 1


GROUP_COLUMNS = ["n_cells", "closest_type", "closest_share", "distance", "markers", "cells"]


def unknown_groups(reader: VersionReader, version: int | None = None, min_size: int | None = None,
                   n_markers: int = 10, max_other_cells: int = 2000, seed: int = 0,
                   gene_key: str | None = None) -> pd.DataFrame:
    """Cluster the cells ``version`` called Unknown or novel; one row per group, largest first.

    ``version`` defaults to the newest version up to the reader's that added cells. Cells a
    relabel has named since are left out.

    The cells are clustered on their embedding under the reader's model (HDBSCAN, groups of at
    least ``min_size`` cells, default 2% of them and at least 5, not split below the reference's
    neighbour distances; cells in no group are left out). For each group: ``n_cells``, the ``closest_type`` (the label its cells' reference
    neighbours point to most: the most common kNN guess, under the labels and model of the
    version shown, so a type renamed since the fold-in is named as it is now), the share of its
    cells with that guess (``closest_share``), the ``distance`` between the group's and the type's embedding
    centroids, ``markers`` (the top ``n_markers`` genes against the closest type's cells, at most
    ``max_other_cells`` cells of each side, a seeded sample, by the Wilcoxon rank-sum statistic
    on log-normalised counts)
    and the group's ``cells``. ``result.attrs["markers"][group]`` holds each marker table, with
    the reference's own gene columns (:meth:`VersionReader.gene_annotations`) beside the gene.
    ``gene_key``: the gene column ``markers`` names genes by (e.g. ``"gene_symbol"``; a gene
    without one keeps its atlas name); None: the atlas's gene names.
    """
    annotations = reader.gene_annotations()
    if gene_key is not None and gene_key not in annotations.columns:
        raise InputError(f"gene_key {gene_key!r} is not a gene column of this atlas (it has "
                         f"{list(annotations.columns) or 'none'}: the columns of the reference AnnData's var)")
    if isinstance(n_markers, bool) or not isinstance(n_markers, (int, np.integer)) or n_markers < 0:
        raise InputError(f"n_markers must be a whole number of genes, 0 or more; got {n_markers!r}")
    if min_size is not None:
        if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)):
            raise InputError(f"min_size must be a whole number of cells (at least 2); got {min_size!r}")
        if min_size < 2:
            raise InputError(f"min_size must be at least 2, got {min_size}")
    number = _newest_ingest(reader) if version is None else int(version)
    if number > reader.number:
        raise InputError(f"version {number} is after the version shown ({reader.number})")
    predictions = reader.predictions(number)
    if predictions is None:
        info = reader.manifest.version(number)
        what = "relabelled cells and added none" if info.strategy == "relabel" else "added the reference cells"
        raise InputError(f"version {number} {what}: it called no cell Unknown")
    called = predictions["is_unknown"].astype(bool).to_numpy()
    if "is_novel" in predictions.columns:  # versions written before novelty scores lack it
        called |= predictions["is_novel"].astype(bool).to_numpy()
    named = set(reader.label_overrides()["cell"])  # a relabel has given these a type since
    unknown = predictions.index[called & ~predictions.index.isin(named)]
    obs = reader.obs()
    z = reader.latent()
    rows = obs.index.get_indexer(unknown)
    size = min_size if min_size is not None else max(5, int(round(0.02 * len(rows))))
    labels = obs["label"]
    # the reference of the guesses and markers: every labelled cell but the grouped query's own
    # annotation (as its fold-in voted), so a labelled query's cells do not vote for themselves;
    # a label a relabel gave its cells since is the atlas's
    own = (pd.to_numeric(obs["version_added"]).to_numpy() == number) & ~obs.index.isin(named)
    labelled = labels.notna().to_numpy() & ~own
    groups = cluster(z[rows], size, lambda: neighbour_scale(z[labelled], seed=seed))  # only if HDBSCAN leaves most cells out
    result = pd.DataFrame(columns=GROUP_COLUMNS, index=pd.Index([], name="group"))
    result.attrs["markers"] = MarkerTables()
    if (groups < 0).all():
        return result
    types = sorted(set(labels[labelled].astype(str)))
    type_rows = {t: np.flatnonzero((labels == t).to_numpy() & labelled) for t in types}
    # each cell's kNN guess under the labels and model of the version shown (a relabel since the
    # fold-in may have renamed the type its neighbours carry; the stored guess has the old name)
    tcfg = reader.manifest.config.transfer
    index = (reader.index() if not (labels.notna().to_numpy() & own).any()
             else NeighborIndex.build(z[labelled], labels[labelled].astype(str).to_numpy(), tcfg))
    guess = transfer_labels(index, z[rows], tcfg)["predicted_label"].to_numpy()
    n_groups = int(groups.max()) + 1
    genes = reader.genes()
    records = []
    for g in range(n_groups):
        members = rows[groups == g]
        guesses = pd.Series(guess[groups == g].astype(str)).value_counts()
        centre = z[members].mean(axis=0)
        closest = min(guesses.index, key=lambda t: (-guesses[t], t))  # ties: the alphabetically first
        if closest not in type_rows:  # a label of the index with no cell left (not expected): the nearest type
            closest = min(type_rows, key=lambda t: np.linalg.norm(centre - z[type_rows[t]].mean(axis=0)))
        distance = float(np.linalg.norm(centre - z[type_rows[closest]].mean(axis=0)))
        pool = np.setdiff1d(type_rows[closest], members)
        others = pool[sorted_sample(len(pool), max_other_cells, seed)]
        ranked = members[sorted_sample(len(members), max_other_cells, seed)]  # both sides dense in the ranking
        both = np.concatenate([ranked, others])
        counts = log_normalise(reader.counts(both))  # only these cells, checked
        markers = rank_markers(counts[: len(ranked)], counts[len(ranked):], genes, n_markers)
        markers = markers.join(annotations, on="gene")
        result.attrs["markers"][g] = markers
        names = markers["gene"] if gene_key is None else markers[gene_key].astype(object).where(
            markers[gene_key].notna(), markers["gene"])
        records.append({
            "n_cells": len(members), "closest_type": closest, "closest_share": float(guesses.get(closest, 0) / len(members)),
            "distance": distance, "markers": [str(n) for n in names], "cells": obs.index[members].tolist(),
        })
    out = pd.DataFrame(records, columns=GROUP_COLUMNS, index=pd.Index(range(n_groups), name="group"))
    out.attrs["markers"] = result.attrs["markers"]
    return out
