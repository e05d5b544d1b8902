"""The user's own obs columns (donor, disease, condition, ...) as the cell store keeps them.

Every dataset that brings obs columns of its own gets one SOMA DataFrame beside the cell
store's ``obs``, ``obs_columns/joinids_<start>_<stop>``, indexed by the same ``soma_joinid``
as its cells and holding exactly its columns. The engine's ``obs`` keeps its fixed schema: a
later dataset can bring new columns or lack old ones without evolving any schema, and a failed
ingest leaves only a table the manifest never lists. The manifest records each dataset's
columns and their kind; a column's kind is the same in every dataset that has it.

Kinds and how they are stored and read back:

====== ============================== =====================================
kind   stored as (Arrow)              read back as (pandas)
====== ============================== =====================================
text   large_string                   object (str, None when missing)
int    int64                          Int64 (nullable)
float  float64 (NaN stored as null)   float64 (NaN when missing)
bool   bool                           boolean (nullable)
====== ============================== =====================================
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa

Kind = Literal["text", "int", "float", "bool"]
ARROW_TYPES: dict[str, pa.DataType] = {"text": pa.large_string(), "int": pa.int64(), "float": pa.float64(),
                                       "bool": pa.bool_()}
PANDAS_DTYPES: dict[str, object] = {"text": object, "int": pd.Int64Dtype(), "float": np.float64,
                                    "bool": pd.BooleanDtype()}
COLLECTION = "obs_columns"
"""The SOMA collection (inside the cell store's experiment) holding one table per dataset with columns."""


def table_key(start: int, stop: int) -> str:
    """Name of the metadata table of the cells in joinids ``[start, stop)``."""
    return f"joinids_{start}_{stop}"


def key_range(key: str) -> tuple[int, int] | None:
    """Return the joinid range a metadata table's name covers (None for a name the engine did not give)."""
    parts = key.split("_")
    if len(parts) == 3 and parts[0] == "joinids" and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1]), int(parts[2])
    return None


def arrow_schema(columns: dict[str, str]) -> pa.Schema:
    """Return the SOMA schema of a metadata table holding ``columns`` (name -> kind)."""
    return pa.schema([("soma_joinid", pa.int64()), *((name, ARROW_TYPES[kind]) for name, kind in columns.items())])


def _canonical(value: object) -> str:
    if value is None:
        return "\x00"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return repr(value)
    return str(value)


CHECKSUM_ROWS = 100_000
"""Rows checksummed at a time (a 1M-cell matrix at once took several times its own size in temporaries)."""


def row_checksums(table: pa.Table, columns: list[str], text: Callable[[tuple], str]) -> np.ndarray:
    """Return a 64-bit BLAKE2b checksum of ``text(row)`` for each row of ``table``'s ``columns``.

    Rows become Python objects ``CHECKSUM_ROWS`` at a time, never all at once.
    """
    out = np.zeros(table.num_rows, dtype=np.uint64)
    for s in range(0, table.num_rows, CHECKSUM_ROWS):
        part = table.slice(s, CHECKSUM_ROWS)
        values = [part.column(c).to_pylist() for c in columns]
        for i, row in enumerate(zip(*values), start=s):
            out[i] = int.from_bytes(
                hashlib.blake2b(text(row).encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return out


def metadata_checksums(table: pa.Table, columns: list[str]) -> np.ndarray:
    """Return a 64-bit BLAKE2b checksum of each row's ``columns`` (names and values); 0 for no columns.

    Computed from the Arrow values as stored, so the write and every read agree exactly.
    """
    if not columns:
        return np.zeros(table.num_rows, dtype=np.uint64)
    return row_checksums(table, columns,
                         lambda row: "\x1e".join(f"{name}\x1f{_canonical(v)}" for name, v in zip(columns, row)))


def metadata_frame(table: pa.Table | None, columns: dict[str, str], n_rows: int) -> pd.DataFrame:
    """Return ``columns`` of ``table`` as pandas columns of their kind's dtype (all missing when ``table`` lacks one).

    Rows follow ``table`` (``n_rows`` of them); the index is a plain range.
    """
    out = {}
    for name, kind in columns.items():
        if table is not None and name in table.column_names:
            col = table.column(name)
            if kind == "int":
                series = pd.Series(col.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get), dtype="Int64")
            elif kind == "bool":
                series = pd.Series(col.to_pylist(), dtype="boolean")
            elif kind == "float":
                series = pd.Series(col.to_numpy(zero_copy_only=False), dtype=np.float64)
            else:
                series = pd.Series(col.to_pylist(), dtype=object)
        elif kind == "float":
            series = pd.Series(np.full(n_rows, np.nan))
        elif kind == "text":
            series = pd.Series([None] * n_rows, dtype=object)
        else:
            series = pd.Series(pd.array([pd.NA] * n_rows, dtype=PANDAS_DTYPES[kind]))
        out[name] = series.reset_index(drop=True)
    return pd.DataFrame(out, index=pd.RangeIndex(n_rows))
