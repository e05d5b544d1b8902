"""DuckDB store of drift tables, with a schema kept up to date by numbered SQL migrations.

Connections are short-lived: each call opens the file, does its work and closes it, so other
processes can read between writes (DuckDB lets one process write, or many read); a file held
by another process raises AtlasLockedError. ``sql()`` runs
user queries on a separate ``read_only=True`` connection with external file access disabled;
every versioned table is shadowed there by a TEMP view filtered to ``version <= max_version``.
The unfiltered table stays reachable by its qualified name (``<db>.main.<table>``): the filter
is a convenience for reading an earlier version, not a security boundary; the read-only
connection is what keeps the file from being written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from atlasengine.drift.measures import DriftTables
from atlasengine.errors import AtlasFormatError, AtlasLockedError, InputError, ReadOnlyError
from atlasengine.faults import fault_point

VERSIONED_TABLES = (
    "versions",
    "version_drift",
    "celltype_drift",
    "batch_drift",
    "cell_drift",
    "drift_flags",
    "transfer_summary",
)
_VERSION_FIELDS = (
    "version", "created_at", "strategy", "parameters", "datasets", "n_cells", "n_new_cells",
    "train_seconds", "fisher_seconds", "fisher_mean", "fisher_max", "fisher_nonzero_share",
)
_MIGRATION_FILE = re.compile(r"^(\d+)_([A-Za-z0-9_]+)\.sql$")
_QUERY_TYPES = {"SELECT", "EXPLAIN"}


def migrations_dir() -> Path:
    """Folder of the numbered ``NNN_name.sql`` migrations.

    Looks in the repository checkout (``<repo>/migrations/duckdb``, also right for an editable
    install) and then in package data (``atlasengine/_migrations[/duckdb]``).
    """
    here = Path(__file__).resolve()
    candidates = [
        here.parents[2] / "migrations" / "duckdb",
        here.parents[1] / "_migrations" / "duckdb",
        here.parents[1] / "_migrations",
    ]
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("*.sql")):
            return folder
    raise AtlasFormatError(
        "drift database migrations not found; looked in " + ", ".join(str(c) for c in candidates)
    )


def migrations() -> list[tuple[int, str, Path]]:
    """``(version, name, path)`` of every migration file, in order."""
    found: dict[int, tuple[int, str, Path]] = {}
    for path in sorted(migrations_dir().glob("*.sql")):
        m = _MIGRATION_FILE.match(path.name)
        if m is None:
            raise AtlasFormatError(f"migration file name {path.name!r} is not NNN_name.sql")
        number = int(m.group(1))
        if number in found:
            raise AtlasFormatError(f"two migrations are numbered {number}")
        found[number] = (number, m.group(2), path)
    return [found[v] for v in sorted(found)]


def _json(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, default=str, sort_keys=True)


def _nullable(df: pd.DataFrame) -> pd.DataFrame:
    """Copy with NaN in float columns turned into SQL NULL."""
    df = df.copy()
    for column in df.columns:
        if pd.api.types.is_float_dtype(df[column]):
            df[column] = df[column].astype("Float64")
    return df


class DriftStore:
    """Drift tables of one atlas in a DuckDB file.

    Example
    -------
    >>> import numpy as np, pandas as pd
    >>> from atlasengine.config import DriftConfig
    >>> from atlasengine.drift.measures import compute_initial_drift, flags
    >>> z = np.random.default_rng(0).normal(size=(40, 3))
    >>> obs = pd.DataFrame({"batch": ["a", "b"] * 20, "label": ["x", "y"] * 20}, index=[f"c{i}" for i in range(40)])
    >>> tables = compute_initial_drift(1, z, obs, DriftConfig(k=5))
    >>> with DriftStore(getfixture("tmp_path") / "drift.duckdb") as store:
    ...     store.write_version({"version": 1, "strategy": "reference"}, tables, flags(tables, DriftConfig()), None)
    ...     store.sql("select version, scope from version_drift", max_version=1).values.tolist()
    [[1, 'vs_first']]
    """

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        """Open (and create or upgrade unless ``read_only``) the database at ``path``."""
        self.path = Path(path)
        self.read_only = read_only
        self._closed = False
        if read_only and not self.path.exists():
            raise AtlasFormatError(f"no drift database at {self.path}")
        self._migrate()

    # ------------------------------------------------------------------ connections

    @contextmanager
    def _connect(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        if self._closed:
            raise AtlasFormatError("the drift store is closed")
        if not read_only and self.read_only:
            raise ReadOnlyError(f"drift database {self.path} was opened read-only")
        try:
            con = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.IOException as e:
            if "lock" in str(e).lower():
                raise AtlasLockedError(f"drift database {self.path} is in use by another process: {e}") from e
            raise
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._connect(read_only=False) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def close(self) -> None:
        """Refuse further use (no connection is held between calls)."""
        self._closed = True

    def __enter__(self) -> DriftStore:
        """Return this store."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the store (see :meth:`close`)."""
        self.close()

    # ------------------------------------------------------------------ schema

    def schema_version(self) -> int:
        """Newest migration applied to the file (0 when none)."""
        with self._connect(read_only=True) as con:
            return self._applied(con)

    @staticmethod
    def _applied(con: duckdb.DuckDBPyConnection) -> int:
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        if "schema_migrations" not in tables:
            if tables:
                raise AtlasFormatError("not a drift database: tables without schema_migrations")
            return 0
        row = con.execute("SELECT max(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def _migrate(self) -> None:
        files = migrations()
        newest = files[-1][0]
        with self._connect(read_only=self.read_only) as con:
            current = self._applied(con)
            if current > newest:
                raise AtlasFormatError(
                    f"drift database schema {current} is newer than this atlasengine supports "
                    f"({newest}); upgrade atlasengine"
                )
            pending = [m for m in files if m[0] > current]
            if pending and self.read_only:
                raise AtlasFormatError(
                    f"drift database schema {current} is older than this atlasengine's ({newest}); "
                    "open it writable once to upgrade it"
                )
            for number, name, path in pending:
                con.execute("BEGIN TRANSACTION")
                try:
                    con.execute(
                        "CREATE TABLE IF NOT EXISTS schema_migrations "
                        "(version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)"
                    )
                    con.execute(path.read_text())
                    con.execute(
                        "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                        [number, name, datetime.now(timezone.utc).replace(tzinfo=None)],
                    )
                except duckdb.Error as e:
                    con.execute("ROLLBACK")
                    raise AtlasFormatError(f"drift migration {path.name} failed: {e}") from e
                con.execute("COMMIT")

    def _columns(self, con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
        rows = con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = ? AND NOT internal "
            "ORDER BY column_index",
            [table],
        ).fetchall()
        return [r[0] for r in rows]

    # ------------------------------------------------------------------ writing

    def _insert(self, con: duckdb.DuckDBPyConnection, table: str, df: pd.DataFrame | None) -> None:
        if df is None or df.empty:
            return
        unknown = set(df.columns) - set(self._columns(con, table))
        if unknown:
            raise InputError(f"{table} has no column(s) {sorted(unknown)}")
        con.register("_frame", _nullable(df))
        try:
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _frame")
        finally:
            con.unregister("_frame")

    @staticmethod
    def _version_row(record: dict[str, Any]) -> pd.DataFrame:
        if "version" not in record:
            raise InputError("the version record needs a 'version'")
        row = {k: record.get(k) for k in _VERSION_FIELDS}
        row["version"] = int(record["version"])
        created = row["created_at"] or datetime.now(timezone.utc)
        created = pd.Timestamp(created)
        row["created_at"] = (created.tz_convert("UTC").tz_localize(None) if created.tzinfo else created)
        row["parameters"] = _json(row["parameters"])
        row["datasets"] = _json(row["datasets"])
        extra = {k: v for k, v in record.items() if k not in _VERSION_FIELDS}
        row["extra"] = _json(extra) if extra else None
        return pd.DataFrame([row])

    def write_version(
        self,
        record: dict[str, Any],
        tables: DriftTables,
        flags: pd.DataFrame | None,
        transfer_summary: pd.DataFrame | None = None,
    ) -> None:
        """Store one version's record, drift tables, flags and transfer summary in one transaction.

        Rows already stored for this version are replaced. ``record`` keys beyond the
        ``versions`` columns go to its ``extra`` JSON column; dicts/lists are stored as JSON.
        A ``version`` column is added to ``transfer_summary`` when it has none.
        """
        version_row = self._version_row(record)
        version = int(version_row.at[0, "version"])
        frames = dict(tables.as_dict(), drift_flags=flags)
        if transfer_summary is not None and "version" not in transfer_summary.columns:
            transfer_summary = transfer_summary.assign(version=version)
        frames["transfer_summary"] = transfer_summary
        for name, df in frames.items():
            if df is not None and not df.empty:
                if "version" not in df.columns:
                    raise InputError(f"{name} needs a 'version' column")
                if not (np.asarray(df["version"]) == version).all():
                    raise InputError(f"{name} holds rows of versions other than {version}")
        with self._transaction() as con:
            for table in VERSIONED_TABLES:
                con.execute(f"DELETE FROM {table} WHERE version = ?", [version])
            self._insert(con, "versions", version_row)
            fault_point("drift_write")
            for name, df in frames.items():
                self._insert(con, name, df)

    def delete_versions_after(self, version: int) -> None:
        """Delete every row of versions newer than ``version`` (an uncommitted, failed ingest)."""
        with self._transaction() as con:
            for table in VERSIONED_TABLES:
                con.execute(f"DELETE FROM {table} WHERE version > ?", [int(version)])

    # ------------------------------------------------------------------ reading

    def read(self, table: str, max_version: int | None) -> pd.DataFrame:
        """All rows of ``table`` with ``version <= max_version`` (None: every version), sorted."""
        if table not in VERSIONED_TABLES:
            raise InputError(f"unknown drift table {table!r}; choose from {', '.join(VERSIONED_TABLES)}")
        where = "" if max_version is None else f"WHERE version <= {int(max_version)}"
        with self._connect(read_only=True) as con:
            return con.execute(f"SELECT * FROM {table} {where} ORDER BY ALL").df()

    def report_tables(self, max_version: int | None) -> dict[str, pd.DataFrame]:
        """Every table the HTML report uses (all but ``cell_drift``), by name."""
        return {t: self.read(t, max_version) for t in VERSIONED_TABLES if t != "cell_drift"}

    def sql(self, query: str, max_version: int | None) -> pd.DataFrame:
        """Run a read-only query (SELECT/EXPLAIN) and return its last result.

        The drift tables are TEMP views showing only ``version <= max_version`` (None: all);
        external file access is disabled. Anything else raises ReadOnlyError; a failing query
        raises InputError.
        """
        with self._connect(read_only=True) as con:
            try:
                kinds = [str(s.type).rsplit(".", 1)[-1] for s in con.extract_statements(query)]
            except duckdb.Error as e:
                raise InputError(f"drift query failed: {e}") from e
            if not kinds:
                raise InputError("empty drift query")
            refused = [k for k in kinds if k not in _QUERY_TYPES]
            if refused:
                raise ReadOnlyError(f"sql() runs read-only queries only; got {', '.join(refused)}")
            db = con.execute("SELECT current_database()").fetchone()[0]
            for table in VERSIONED_TABLES:
                where = "" if max_version is None else f" WHERE version <= {int(max_version)}"
                con.execute(f'CREATE TEMP VIEW {table} AS SELECT * FROM "{db}".main.{table}{where}')
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            try:
                return con.execute(query).df()
            except duckdb.Error as e:
                raise InputError(f"drift query failed: {e}") from e
