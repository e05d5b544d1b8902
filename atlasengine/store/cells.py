"""The cell store: one TileDB-SOMA experiment with every atlas cell's counts and metadata.

Cells are addressed by ``soma_joinid``. Each ingest writes its cells to a fresh joinid range
above everything ever written (committed or not), and readers only read the ranges the
manifest lists, so the leftovers of a failed ingest are never read and a retry never
overwrites or merges with them. The user's own obs columns of each dataset are a table of
their own beside ``obs`` (see :mod:`atlasengine.store.metadata`).
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma

from atlasengine.errors import AtlasFormatError, AtlasIntegrityError, AtlasWriteError, InputError
from atlasengine.faults import fault_point
from atlasengine.store.metadata import (
    CHECKSUM_ROWS,
    COLLECTION,
    arrow_schema,
    key_range,
    metadata_checksums,
    row_checksums,
    table_key,
)

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


def obs_table(obs: pd.DataFrame, joinids: np.ndarray) -> pa.Table:
    """Return the obs rows as the store holds them (strings; a missing label is null)."""
    return pa.table(
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


# ----------------------------------------------------------------------------- checksums
def obs_checksums(obs: pd.DataFrame | pa.Table) -> np.ndarray:
    """Return a 64-bit BLAKE2b checksum of each cell's obs row (name, dataset, batch, label, version added)."""
    table = obs if isinstance(obs, pa.Table) else pa.Table.from_pandas(obs[OBS_COLUMNS], preserve_index=False)
    return row_checksums(table, OBS_COLUMNS, lambda row: "\x1f".join("\x00" if v is None else str(v) for v in row))


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every input bit changes about half the output bits."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def counts_checksums(counts: sp.csr_matrix) -> np.ndarray:
    """Return a 64-bit checksum of each row's non-zero (gene, float32 count) pairs, independent of their order."""
    m = sp.csr_matrix(counts, dtype=np.float32)
    if m.shape[0] > CHECKSUM_ROWS:
        return np.concatenate([_counts_checksums(m[s : s + CHECKSUM_ROWS]) for s in range(0, m.shape[0], CHECKSUM_ROWS)])
    return _counts_checksums(m)


def _counts_checksums(m: sp.csr_matrix) -> np.ndarray:
    genes = m.indices.astype(np.uint64)
    values = np.ascontiguousarray(m.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
    mixed = np.where(m.data != 0, _mix64((genes << np.uint64(32)) | values), np.uint64(0))
    with np.errstate(over="ignore"):
        running = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(mixed, dtype=np.uint64)])
        return running[m.indptr[1:]] - running[m.indptr[:-1]]


def cell_checksums(obs: pd.DataFrame, counts: sp.csr_matrix | np.ndarray,
                   metadata: pa.Table | None = None) -> np.ndarray:
    """Return the ``(n_cells, 3)`` checksums of new cells' obs, counts and own obs columns, as the store holds them.

    ``counts`` is the count matrix, or its rows' :func:`counts_checksums` when they were computed
    as the counts streamed past. ``metadata`` holds the user's obs columns as they are written
    (none: the third checksum is 0).
    """
    table = obs_table(obs, np.zeros(len(obs), dtype=np.int64))
    columns = [] if metadata is None else [c for c in metadata.column_names if c != "soma_joinid"]
    own = metadata_checksums(metadata, columns) if columns else np.zeros(len(obs), dtype=np.uint64)
    sums = counts if isinstance(counts, np.ndarray) else counts_checksums(counts)
    return np.column_stack([obs_checksums(table), sums, own])


@dataclass(frozen=True)
class CellChecks:
    """The checksums written with every committed cell, to check cells against when they are read.

    ``ranges`` are the datasets' ``(start, stop, name)`` joinid ranges in joinid order, ``values``
    their cells' ``(obs, counts, own obs columns)`` checksums in the same order.
    """

    ranges: list[tuple[int, int, str]]
    values: np.ndarray

    def _positions(self, joinids: np.ndarray) -> np.ndarray:
        starts = np.array([a for a, _, _ in self.ranges], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum([b - a for a, b, _ in self.ranges])])
        k = np.searchsorted(starts, joinids, side="right") - 1
        return offsets[k] + (joinids - starts[k])

    def _dataset(self, joinid: int) -> str:
        return next(name for a, b, name in self.ranges if a <= joinid < b)

    def verify(self, joinids: np.ndarray, obs: pd.DataFrame | None = None,
               counts: sp.csr_matrix | None = None) -> None:
        """Raise :class:`AtlasIntegrityError` naming the dataset if the cells read do not match their checksums."""
        joinids = np.asarray(joinids, dtype=np.int64)
        expected = self.values[self._positions(joinids)]
        for what, column, read in (("obs", 0, obs), ("counts", 1, counts)):
            if read is None:
                continue
            actual = obs_checksums(read) if what == "obs" else counts_checksums(read)
            bad = np.flatnonzero(actual != expected[:, column])
            if len(bad):
                first = int(joinids[bad[0]])
                raise AtlasIntegrityError(
                    f"the cell store's {what} of {len(bad)} cell(s) of dataset {self._dataset(first)!r} do not match "
                    f"the checksums written with them (first: joinid {first}): the cell store was changed or damaged "
                    "after they were written, so they are not used"
                )

    def verify_metadata(self, start: int, stop: int, table: pa.Table, columns: list[str]) -> None:
        """Raise :class:`AtlasIntegrityError` if the own obs columns read for ``[start, stop)`` do not match."""
        joinids = table.column("soma_joinid").to_numpy()
        if len(joinids) != stop - start or (len(joinids) and not (joinids == np.arange(start, stop)).all()):
            raise AtlasIntegrityError(f"the cell store's obs columns of dataset {self._dataset(start)!r} hold "
                                      f"{len(joinids)} of its {stop - start} cells (damaged)")
        expected = self.values[self._positions(joinids), 2]
        bad = np.flatnonzero(metadata_checksums(table, columns) != expected)
        if len(bad):
            raise AtlasIntegrityError(
                f"the cell store's obs columns of {len(bad)} cell(s) of dataset {self._dataset(start)!r} do not match "
                f"the checksums written with them (first: joinid {int(joinids[bad[0]])}): the cell store was changed "
                "or damaged after they were written, so they are not used"
            )


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
GLOBAL_ORDER = tiledbsoma.TileDBWriteOptions(sort_coords=False)


def tile_extents(array: tiledbsoma.SparseNDArray) -> tuple[int, int]:
    """Return the (cells, genes) tile extents of a stored count matrix (tiledbsoma's default: 2,048 each)."""
    dims = json.loads(array.schema_config_options().dims)
    return int(dims["soma_dim_0"]["tile"]), int(dims["soma_dim_1"]["tile"])


def global_order(rows: np.ndarray, cols: np.ndarray, tiles: tuple[int, int]) -> np.ndarray | None:
    """Return the permutation that puts coordinates sorted by row, then column, in TileDB's global order.

    TileDB's global order goes tile by tile (row-major over tiles), then row-major within a
    tile: with more genes than one tile holds, a row's genes past the first tile come after
    the following rows' genes of that tile. Returns None where the input is in that order
    already (every gene in the first column tile).

    >>> global_order(np.array([0, 0, 1, 1]), np.array([0, 3, 1, 2]), (4, 2)).tolist()
    [0, 2, 1, 3]
    """
    rows_tile, cols_tile = tiles
    if cols.size == 0 or int(cols.max()) < cols_tile:
        return None
    n_col_tiles = int(cols.max()) // cols_tile + 1
    key = (rows // rows_tile) * n_col_tiles + cols // cols_tile
    return np.argsort(key, kind="stable")  # stable: row-major order within a tile stays


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
def _read_context(settings: tuple[tuple[str, str], ...] = ()) -> tiledbsoma.SOMATileDBContext:
    """One context per set of settings (contexts are costly to make; ``settings``: sorted TileDB items)."""
    return tiledbsoma.SOMATileDBContext(
        tiledb_config={"sm.mem.total_budget": READ_MEMORY_BUDGET, "soma.init_buffer_bytes": 64 * 2**20,
                       **dict(settings)}
    )


# The contexts' thread pools are stopped before the interpreter tears its modules down (a context
# left to that teardown could abort the process: "terminate called without an active exception").
# Spawned training processes that finish skip the teardown (training.fit._SpawnLauncher); this
# covers the processes that do go through it.
atexit.register(_read_context.cache_clear)


class CellStore:
    """Read and append cells of a SOMA experiment at ``uri``.

    ``settings``: TileDB settings for reading (e.g. an S3 endpoint and keys, for an experiment at
    an ``s3://`` URI; :func:`atlasengine.store.remote.tiledb_settings`).
    """

    def __init__(self, uri: str, settings: dict[str, str] | None = None) -> None:
        self.uri = uri
        self.settings = dict(settings or {})

    @classmethod
    def create(cls, uri: str, genes: Sequence[str], annotations: pa.Table | None = None) -> "CellStore":
        """Create an empty experiment with a fixed gene axis.

        ``annotations``: the genes' own columns (e.g. ``gene_symbol``), rows in ``genes``'
        order, stored in ``var`` beside ``var_id``.
        """
        annotations = annotations if annotations is not None else pa.table({})
        if annotations.num_columns and annotations.num_rows != len(genes):
            raise InputError(f"gene annotations have {annotations.num_rows} rows for {len(genes)} genes")
        with tiledbsoma.Experiment.create(uri) as exp:
            exp.add_new_dataframe(
                "obs", schema=OBS_SCHEMA, index_column_names=["soma_joinid"], domain=[(0, MAX_CELLS - 1)]
            )
            ms = exp.add_new_collection("ms")
            rna = ms.add_new_collection(MEASUREMENT, tiledbsoma.Measurement)
            n = len(genes)
            var = rna.add_new_dataframe(
                "var",
                schema=pa.schema([("soma_joinid", pa.int64()), ("var_id", pa.large_string()),
                                  *annotations.schema]),
                index_column_names=["soma_joinid"],
                domain=[(0, max(n - 1, 0))],
            )
            var.write(pa.table({"soma_joinid": np.arange(n, dtype=np.int64), "var_id": list(genes),
                                **{c: annotations[c] for c in annotations.column_names}}))
            X = rna.add_new_collection("X")
            X.add_new_sparse_ndarray(X_LAYER, type=pa.float32(), shape=(MAX_CELLS, n))
        return cls(uri)

    def _open(self) -> tiledbsoma.Experiment:
        try:
            return tiledbsoma.Experiment.open(self.uri, context=_read_context(tuple(sorted(self.settings.items()))))
        except Exception as exc:  # tiledbsoma raises several types for a missing/corrupt store
            raise AtlasFormatError(f"cannot open the cell store at {self.uri}: {exc}") from exc

    @contextmanager
    def _reading(self) -> Iterator[tiledbsoma.Experiment]:
        """Open the store to read; what a damaged store raises becomes :class:`AtlasIntegrityError`."""
        with self._open() as exp:
            try:
                yield exp
            except tiledbsoma.SOMAError as exc:
                raise AtlasIntegrityError(f"the cell store at {self.uri} cannot be read (damaged?): {exc}") from exc

    def genes(self) -> list[str]:
        """Return the store's gene names (``var_id``) in ``soma_joinid`` order."""
        with self._reading() as exp:
            var = exp.ms[MEASUREMENT].var.read(column_names=["soma_joinid", "var_id"]).concat().to_pandas()
        return var.sort_values("soma_joinid")["var_id"].astype(str).tolist()

    def gene_annotations(self) -> pd.DataFrame:
        """Return the genes' own columns (index: the gene names, in ``soma_joinid`` order; none before format 7)."""
        with self._reading() as exp:
            var = exp.ms[MEASUREMENT].var.read().concat().to_pandas()
        var = var.sort_values("soma_joinid").set_index("var_id").drop(columns="soma_joinid")
        var.index = var.index.astype(str).rename(None)
        return var

    def high_water(self) -> int:
        """One past the largest joinid ever written to obs, X or an obs-columns table (committed or not)."""
        with self._reading() as exp:
            top = -1
            for arr in (exp.obs, exp.ms[MEASUREMENT].X[X_LAYER]):
                ned = arr.non_empty_domain()
                if ned and ned[0] is not None and len(ned[0]) == 2:
                    top = max(top, int(ned[0][1]))
            if COLLECTION in exp:
                top = max([top, *(r[1] - 1 for r in map(key_range, exp[COLLECTION].keys()) if r is not None)])
        return top + 1

    def uncommitted(self, committed_stop: int) -> tuple[bool, list[str], list[Path]]:
        """Find what a write that failed or was killed left from joinid ``committed_stop`` on (no manifest lists it).

        Returns whether obs or X hold such cells, the names of their metadata tables in the
        store's collection, and (for a store in a local folder) the tables' folders, listed or
        not: a process killed before it closed the store leaves a table its collection never lists.
        """
        tail = (slice(committed_stop, None),)
        with self._reading() as exp:
            rows = any(t.num_rows for t in exp.obs.read(tail, column_names=["soma_joinid"]))
            rows = rows or any(t.num_rows for t in exp.ms[MEASUREMENT].X[X_LAYER].read(tail).tables())
            keys = [k for k in exp[COLLECTION].keys() if (key_range(k) or (-1, -1))[0] >= committed_stop] \
                if COLLECTION in exp else []
        folder = Path(self.uri) / COLLECTION
        folders = [] if "://" in self.uri or not folder.is_dir() else [
            d for d in sorted(folder.iterdir())
            if (key_range(d.name) or (-1, -1))[0] >= committed_stop and d.is_dir() and not d.is_symlink()]
        return rows, keys, folders

    def remove_uncommitted(self, committed_stop: int) -> bool:
        """Delete the cells from joinid ``committed_stop`` on, with their metadata tables; return whether any were.

        The engine reads committed ranges only, so these cells are invisible to it; they are deleted
        for readers of the SOMA experiment itself (who would see them twice after a retry) and for
        the disk. Their joinids are not given out again (:meth:`high_water` counts them). Called
        under the write lock only.
        """
        rows, keys, folders = self.uncommitted(committed_stop)
        if not (rows or keys or folders):
            return False
        tail = (slice(committed_stop, None),)
        with tiledbsoma.Experiment.open(self.uri, "d") as exp:
            if rows:
                exp.obs.delete_cells(tail)  # obs first: a cell is listed only while its counts are there
                exp.ms[MEASUREMENT].X[X_LAYER].delete_cells(tail)
            for key in keys:
                del exp[COLLECTION][key]
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        return True

    def append(self, obs: pd.DataFrame, counts: sp.csr_matrix | Iterable[sp.csr_matrix],
               metadata: pa.Table | None = None, columns: dict[str, str] | None = None) -> tuple[int, int]:
        """Write cells to a fresh joinid range; returns ``(start, stop)``.

        ``counts`` is one CSR matrix or consecutive CSR row parts (a streamed input: each part
        is written and let go). ``metadata`` (with ``columns``: name -> kind) holds the cells'
        own obs columns, written to a table of their own (see :mod:`atlasengine.store.metadata`).
        """
        start = self.high_water()
        n = len(obs)
        joinids = np.arange(start, start + n, dtype=np.int64)
        table = obs_table(obs, joinids)
        parts = [counts] if sp.issparse(counts) else counts
        own = None
        if columns:
            own = pa.table([pa.array(joinids), *(metadata.column(c) for c in columns)],
                           schema=arrow_schema(columns))
        try:
            self._write(table, parts, joinids, own)
        except (OSError, tiledbsoma.SOMAError) as exc:  # disk full, permissions
            raise AtlasWriteError(f"cannot write cells to the cell store at {self.uri}: {exc}; nothing was "
                                  "committed") from exc
        return start, start + n

    def _write(self, table: pa.Table, parts: Iterable[sp.csr_matrix], joinids: np.ndarray,
               own: pa.Table | None) -> None:
        with tiledbsoma.Experiment.open(self.uri, "w") as exp:
            # X first, obs second: a cell is only listed once its counts are on disk.
            offset = 0
            X = exp.ms[MEASUREMENT].X[X_LAYER]
            tiles = tile_extents(X)
            for part in parts:
                part = sp.csr_matrix(part)
                if not part.has_sorted_indices:
                    part = part.sorted_indices()
                if offset + part.shape[0] > len(joinids):
                    raise InputError(f"the counts hold more rows than the {len(joinids)} cells given")
                for a, b in row_chunks(part.indptr, WRITE_CHUNK_NNZ):
                    coo = part[a:b].tocoo()
                    if not coo.nnz:  # rows without counts: nothing to write
                        continue
                    rows, cols, data = joinids[offset + a + coo.row], coo.col.astype(np.int64), coo.data
                    order = global_order(rows, cols, tiles)
                    if order is not None:
                        rows, cols, data = rows[order], cols[order], data[order]
                    X.write(
                        pa.table({"soma_dim_0": rows, "soma_dim_1": cols, "soma_data": data.astype(np.float32)}),
                        # given in TileDB's global order (tile by tile, row-major within), so it need not
                        # sort (4x faster; TileDB refuses a write out of that order, and reads are checked)
                        platform_config=GLOBAL_ORDER,
                    )
                    fault_point("cells_x")
                offset += part.shape[0]
            if offset != len(joinids):
                raise InputError(f"the counts hold {offset} rows for {len(joinids)} cells")
            if own is not None:  # after X (the high water is past these cells), before obs
                if COLLECTION not in exp:
                    exp.add_new_collection(COLLECTION)
                start, stop = int(joinids[0]), int(joinids[-1]) + 1
                exp[COLLECTION].add_new_dataframe(
                    table_key(start, stop), schema=own.schema, index_column_names=["soma_joinid"],
                    domain=[(start, stop - 1)],
                ).write(own)
                fault_point("cells_metadata")
            exp.obs.write(table)

    def read_metadata(self, start: int, stop: int) -> pa.Table:
        """Read the own obs columns of the dataset in ``[start, stop)`` (rows in joinid order)."""
        with self._reading() as exp:
            key = table_key(start, stop)
            if COLLECTION not in exp or key not in exp[COLLECTION]:
                raise AtlasIntegrityError(f"the cell store at {self.uri} has no obs-columns table {key!r} for the "
                                          f"cells in [{start}, {stop}) that the manifest lists (deleted?)")
            table = exp[COLLECTION][key].read().concat()
        return table.sort_by("soma_joinid")

    def read_obs(self, ranges: Ranges) -> pd.DataFrame:
        """Obs of the cells in ``ranges`` (index: soma_joinid, in range order)."""
        parts = []
        with self._reading() as exp:
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
        with self._reading() as exp:
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
        low, high = int(joinids.min()), int(joinids.max())
        # a dense run of cells (a training block, a chunk of consecutive cells) is one range read,
        # the cells between those asked for dropped after; scattered cells are read point by point
        span = high - low + 1 <= 2 * len(joinids)
        coords = slice(low, high) if span else np.unique(joinids)
        with self._reading() as exp:
            tbl = exp.ms[MEASUREMENT].X[X_LAYER].read(coords=(coords,)).tables().concat()
        rows = tbl.column("soma_dim_0").to_numpy()
        cols = tbl.column("soma_dim_1").to_numpy()
        vals = tbl.column("soma_data").to_numpy()
        order = np.argsort(joinids, kind="stable")
        found = np.minimum(np.searchsorted(joinids[order], rows), len(joinids) - 1)
        if span and len(joinids) < high - low + 1:
            asked = joinids[order][found] == rows
            rows, cols, vals, found = rows[asked], cols[asked], vals[asked], found[asked]
        if not (joinids[order][found] == rows).all() or (len(cols) and not 0 <= cols.min() <= cols.max() < n_genes):
            raise AtlasIntegrityError(f"the cell store at {self.uri} returned counts outside the cells and genes "
                                      "asked for (damaged)")
        row_pos = order[found]  # where each stored row goes in the request
        return sp.csr_matrix((vals, (row_pos, cols)), shape=(len(joinids), n_genes), dtype=np.float32)

    def checksums_of(self, ranges: Ranges, n_genes: int) -> np.ndarray:
        """Compute the ``(obs, counts, 0)`` checksums of the stored cells in ``ranges`` as they are now.

        Only for recording them the first time (an atlas from before checksums, whose cells have
        no obs columns of their own: the third checksum is 0): reading checks cells against the
        checksums written with them instead.
        """
        parts = [np.column_stack([obs_checksums(obs), counts_checksums(counts), np.zeros(len(obs), np.uint64)])
                 for obs, counts in self.iter_cells(ranges, n_genes, columns=OBS_COLUMNS)]
        return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.uint64)

    def iter_cells(
        self, ranges: Ranges, n_genes: int, chunk_size: int = 20_000, columns: Sequence[str] = ("batch",)
    ) -> Iterator[tuple[pd.DataFrame, sp.csr_matrix]]:
        """Obs columns and counts of ``ranges`` in chunks of at most ``chunk_size`` cells (bounded memory)."""
        for a, b in ranges:
            for s in range(a, b, chunk_size):
                e = min(s + chunk_size, b)
                with self._reading() as exp:
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
