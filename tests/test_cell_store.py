"""The cell store writes large datasets in parts (bounded memory) and reads back exactly what was written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasengine.store import cells
from atlasengine.store.cells import CellStore, row_chunks


def test_row_chunks_cover_every_row_once_within_the_budget():
    rng = np.random.default_rng(0)
    per_row = rng.integers(0, 30, size=500)
    per_row[[0, 17, 499]] = [0, 250, 0]  # empty rows and one row above the budget
    indptr = np.concatenate([[0], np.cumsum(per_row)])
    parts = list(row_chunks(indptr, 100))
    assert parts[0][0] == 0 and parts[-1][1] == 500
    assert all(a < b for a, b in parts) and all(p[1] == q[0] for p, q in zip(parts, parts[1:]))
    for a, b in parts:
        assert indptr[b] - indptr[a] <= 100 or b == a + 1


def test_counts_written_in_parts_read_back_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(cells, "WRITE_CHUNK_NNZ", 500)  # ~25 parts for this matrix
    counts = sp.random(400, 60, density=0.5, format="csr", dtype=np.float32, random_state=1)
    counts.data = np.ceil(counts.data * 20)
    keep = np.ones(400, dtype=np.float32)
    keep[5] = 0  # one cell without counts
    counts = sp.csr_matrix(sp.diags(keep) @ counts)
    counts.eliminate_zeros()
    obs = pd.DataFrame({"obs_id": [f"c{i}" for i in range(400)], "dataset": "d", "batch": "b",
                        "label": ["t"] * 400, "version_added": 1})
    store = CellStore.create(str(tmp_path / "cells"), [f"g{j}" for j in range(60)])
    start, stop = store.append(obs, counts)
    assert stop - start == 400
    back = store.read_counts(np.arange(start, stop), 60)
    assert (back != counts).nnz == 0
    some = np.array([399, 3, 5, 200])
    assert (store.read_counts(start + some, 60) != counts[some]).nnz == 0
    assert store.read_obs([(start, stop)])["obs_id"].tolist() == obs["obs_id"].tolist()


def test_more_genes_than_one_tile_write_and_read_back(tmp_path, monkeypatch):
    # TileDB's global order goes tile by tile: a row's genes past the first 2,048-gene tile come
    # after the next rows' genes of that tile. Written row by row, 2,049 genes or more were refused.
    monkeypatch.setattr(cells, "WRITE_CHUNK_NNZ", 20_000)  # parts that start inside a cell tile
    n_cells, n_genes = 300, 5_000
    counts = sp.random(n_cells, n_genes - 1, density=0.05, format="csr", dtype=np.float32, random_state=2)
    counts.data = np.ceil(counts.data * 9)
    last = sp.csr_matrix(np.full((n_cells, 1), 3, dtype=np.float32))  # every cell has a count in the last tile
    counts = sp.csr_matrix(sp.hstack([counts, last]))
    obs = pd.DataFrame({"obs_id": [f"c{i}" for i in range(n_cells)], "dataset": "d", "batch": "b",
                        "label": ["t"] * n_cells, "version_added": 1})
    store = CellStore.create(str(tmp_path / "cells"), [f"g{j}" for j in range(n_genes)])
    for _ in range(2):  # the second dataset starts at joinid 300, inside the first cell tile
        start, stop = store.append(obs.assign(obs_id=obs["obs_id"] + f"_{_}"), counts)
        assert (store.read_counts(np.arange(start, stop), n_genes) != counts).nnz == 0


def test_global_order_only_moves_what_lies_past_the_first_gene_tile():
    rows = np.array([5, 5, 5, 6, 6, 7])
    cols = np.array([0, 2, 3, 1, 3, 0])
    assert cells.global_order(rows, cols, (8, 4)) is None  # one gene tile: row by row is global order
    order = cells.global_order(rows, cols, (8, 2))
    assert list(zip(rows[order], cols[order])) == [(5, 0), (6, 1), (7, 0), (5, 2), (5, 3), (6, 3)]
    order = cells.global_order(np.array([6, 6, 7, 9]), np.array([0, 3, 0, 3]), (8, 2))  # rows in two cell tiles
    assert order.tolist() == [0, 2, 1, 3]
