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
