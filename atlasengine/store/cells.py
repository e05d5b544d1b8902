"""The cell store: one TileDB-SOMA experiment with every atlas cell's counts and metadata.

Cells are addressed by ``soma_joinid``. Each ingest writes its cells to a fresh joinid range
above everything ever written (committed or not), and readers only read the ranges the
manifest lists, so the leftovers of a failed ingest are never read and a retry never
overwrites or merges with them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma

from atlasengine.errors import AtlasFormatError
from atlasengine.faults import fault_point

MEASUREMENT = "RNA"
X_LAYER = "counts"
MAX_CELLS = 2**40

OBS_SCHEMA = pa.schema(
    [
        ("soma_joinid", pa.int64()),
        ("obs_id", pa.large_string()),
        ("dataset", pa.large_string()),
        ("batch", pa.large_string()),
        ("label", pa.large_string()),
        ("version_added", pa.int32()),
    ]
)
OBS_COLUMNS = [f.name for f in OBS_SCHEMA if f.name != "soma_joinid"]

Ranges = Sequence[tuple[int, int]]


def joinids_of(ranges: Ranges) -> np.ndarray:
    """All joinids of half-open ``(start, stop)`` ranges, in order."""
    parts = [np.arange(a, b, dtype=np.int64) for a, b in ranges]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# TileDB's default read memory budget is 10 GB: a read of 10k scattered cells (the replay
# sample) from a 1M-cell store peaked at 3.3 GB RSS, 0.6 GB with a 512 MB budget (and ran
# faster). The budget bounds a read's memory whatever the store's size; results stream in parts.
READ_MEMORY_BUDGET = 512 * 2**20


# One write of a whole 100k-cell dataset (15M non-zeros) held about 70 bytes per non-zero at
# its peak (COO copies, the Arrow table, TileDB's sort): 10 GB for 1M cells. Rows go in parts
# of at most this many non-zeros, each part one fragment; obs is written after all of them.
WRITE_CHUNK_NNZ = 4_000_000


def row_chunks(indptr: np.ndarray, max_nnz: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` row ranges of a CSR matrix holding at most ``max_nnz`` non-zeros each.

    A single row with more is a part of its own.
    """
    n = len(indptr) - 1
    start = 0
    while start < n:
        stop = int(np.searchsorted(indptr, indptr[start] + max_nnz, side="right")) - 1
        stop = min(max(stop, start + 1), n)
        yield start, stop
        start = stop


@functools.cache
def _read_context() -> tiledbsoma.SOMATileDBContext:
    return tiledbsoma.SOMATileDBContext(
        tiledb_config={"sm.mem.total_budget": READ_MEMORY_BUDGET, "soma.init_buffer_bytes": 64 * 2**20}
    )


class CellStore:
    """Read and append cells of a SOMA experiment at ``uri``."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    @classmethod
    def create(cls, uri: str, genes: Sequence[str]) -> "CellStore":
        """Create an empty experiment with a fixed gene axis."""
        with tiledbsoma.Experiment.create(uri) as exp:
            exp.add_new_dataframe(
                "obs", schema=OBS_SCHEMA, index_column_names=["soma_joinid"], domain=[(0, MAX_CELLS - 1)]
            )
            ms = exp.add_new_collection("ms")
            rna = ms.add_new_collection(MEASUREMENT, tiledbsoma.Measurement)
            n = len(genes)
            var = rna.add_new_dataframe(
                "var",
                schema=pa.schema([("soma_joinid", pa.int64()), ("var_id", pa.large_string())]),
                index_column_names=["soma_joinid"],
                domain=[(0, max(n - 1, 0))],
            )
            var.write(pa.table({"soma_joinid": np.arange(n, dtype=np.int64), "var_id": list(genes)}))
            X = rna.add_new_collection("X")
            X.add_new_sparse_ndarray(X_LAYER, type=pa.float32(), shape=(MAX_CELLS, n))
        return cls(uri)

    def _open(self) -> tiledbsoma.Experiment:
        try:
            return tiledbsoma.Experiment.open(self.uri, context=_read_context())
        except Exception as exc:  # tiledbsoma raises several types for a missing/corrupt store
            raise AtlasFormatError(f"cannot open the cell store at {self.uri}: {exc}") from exc

    def genes(self) -> list[str]:
        """Return the store's gene names (``var_id``) in ``soma_joinid`` order."""
        with self._open() as exp:
            var = exp.ms[MEASUREMENT].var.read(column_names=["soma_joinid", "var_id"]).concat().to_pandas()
        return var.sort_values("soma_joinid")["var_id"].astype(str).tolist()

    def high_water(self) -> int:
        """One past the largest joinid ever written to obs or X (committed or not)."""
        with self._open() as exp:
            top = -1
            for arr in (exp.obs, exp.ms[MEASUREMENT].X[X_LAYER]):
                ned = arr.non_empty_domain()
                if ned and ned[0] is not None and len(ned[0]) == 2:
                    top = max(top, int(ned[0][1]))
        return top + 1

    def append(self, obs: pd.DataFrame, counts: sp.csr_matrix) -> tuple[int, int]:
        """Write cells to a fresh joinid range; returns ``(start, stop)``."""
        start = self.high_water()
        n = counts.shape[0]
        joinids = np.arange(start, start + n, dtype=np.int64)
        table = pa.table(
            {
                "soma_joinid": joinids,
                "obs_id": obs["obs_id"].astype(str).tolist(),
                "dataset": obs["dataset"].astype(str).tolist(),
                "batch": obs["batch"].astype(str).tolist(),
                "label": [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in obs["label"]],
                "version_added": obs["version_added"].to_numpy(np.int32),
            },
            schema=OBS_SCHEMA,
        )
        counts = sp.csr_matrix(counts)
        with tiledbsoma.Experiment.open(self.uri, "w") as exp:
            # X first, obs second: a cell is only listed once its counts are on disk.
            for a, b in row_chunks(counts.indptr, WRITE_CHUNK_NNZ):
                coo = counts[a:b].tocoo()
                if not coo.nnz:  # rows without counts: nothing to write
                    continue
                exp.ms[MEASUREMENT].X[X_LAYER].write(
                    pa.table(
                        {
                            "soma_dim_0": joinids[a + coo.row],
                            "soma_dim_1": coo.col.astype(np.int64),
                            "soma_data": coo.data.astype(np.float32),
                        }
                    )
                )
                fault_point("cells_x")
            exp.obs.write(table)
        return start, start + n

    def read_obs(self, ranges: Ranges) -> pd.DataFrame:
        """Obs of the cells in ``ranges`` (index: soma_joinid, in range order)."""
        parts = []
        with self._open() as exp:
            for a, b in ranges:
                if b > a:
                    parts.append(exp.obs.read(coords=(slice(a, b - 1),)).concat().to_pandas())
        if not parts:
            return pd.DataFrame(columns=["soma_joinid", *OBS_COLUMNS]).set_index("soma_joinid")
        df = pd.concat(parts, ignore_index=True).set_index("soma_joinid")
        expected = joinids_of(ranges)
        if len(df) != len(expected):
            raise AtlasFormatError(
                f"cell store {self.uri} holds {len(df)} of the {len(expected)} committed cells"
            )
        return df.loc[expected]

    def read_obs_ids(self, joinids: np.ndarray, columns: Sequence[str] = ("batch",)) -> pd.DataFrame:
        """Obs columns of arbitrary cells, in the order of ``joinids``."""
        joinids = np.asarray(joinids, dtype=np.int64)
        with self._open() as exp:
            df = (
                exp.obs.read(coords=(np.unique(joinids),), column_names=["soma_joinid", *columns])
                .concat()
                .to_pandas()
                .set_index("soma_joinid")
            )
        if len(df) != len(np.unique(joinids)):
            raise AtlasFormatError(
                f"cell store {self.uri} is missing {len(np.unique(joinids)) - len(df)} of the committed cells asked for"
            )
        return df.loc[joinids]

    def read_counts(self, joinids: np.ndarray, n_genes: int) -> sp.csr_matrix:
        """Read the counts of the given (distinct) cells as CSR rows in the order of ``joinids``."""
        joinids = np.asarray(joinids, dtype=np.int64)
        if len(joinids) == 0:
            return sp.csr_matrix((0, n_genes), dtype=np.float32)
        contiguous = bool(np.all(np.diff(joinids) == 1))
        coords = slice(int(joinids[0]), int(joinids[-1])) if contiguous else np.unique(joinids)
        with self._open() as exp:
            tbl = exp.ms[MEASUREMENT].X[X_LAYER].read(coords=(coords,)).tables().concat()
        rows = tbl.column("soma_dim_0").to_numpy()
        cols = tbl.column("soma_dim_1").to_numpy()
        vals = tbl.column("soma_data").to_numpy()
        order = np.argsort(joinids, kind="stable")
        row_pos = order[np.searchsorted(joinids[order], rows)]  # where each stored row goes in the request
        return sp.csr_matrix((vals, (row_pos, cols)), shape=(len(joinids), n_genes), dtype=np.float32)

    def iter_cells(
        self, ranges: Ranges, n_genes: int, chunk_size: int = 20_000, columns: Sequence[str] = ("batch",)
    ) -> Iterator[tuple[pd.DataFrame, sp.csr_matrix]]:
        """Obs columns and counts of ``ranges`` in chunks of at most ``chunk_size`` cells (bounded memory)."""
        for a, b in ranges:
            for s in range(a, b, chunk_size):
                e = min(s + chunk_size, b)
                with self._open() as exp:
                    obs = (
                        exp.obs.read(coords=(slice(s, e - 1),), column_names=["soma_joinid", *columns])
                        .concat()
                        .to_pandas()
                        .set_index("soma_joinid")
                        .sort_index()
                    )
                if len(obs) != e - s:
                    raise AtlasFormatError(f"cell store {self.uri} is missing committed cells in [{s}, {e})")
                yield obs, self.read_counts(np.arange(s, e, dtype=np.int64), n_genes)
