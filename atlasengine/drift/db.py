"""Drift tables in a private in-memory DuckDB database, kept on disk as immutable Parquet parts.

Each version stores its own rows as one Parquet file per table (``<table>.parquet`` in a folder
the caller names: the version's directory, checksummed like its other files). A reader loads
the parts of the versions it shows into an in-memory database of its own: no file is shared or
locked, so a reader never waits for a writer and never makes one wait, and a part that is
missing or damaged is caught by its checksum. The schema is made by the numbered SQL migrations
(``migrations/duckdb``), applied to every new in-memory database, so parts written under an
older schema load into the newest.

DuckDB never opens a path: parts are read and written with pyarrow, and the database runs with
external access disabled from the start. ``sql()`` runs user queries (SELECT / EXPLAIN only) on
a cursor where every table is shadowed by a TEMP view filtered to ``version <= max_version``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from atlasengine.drift.measures import DriftTables
from atlasengine.errors import AtlasFormatError, AtlasIntegrityError, AtlasWriteError, InputError, ReadOnlyError
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
PART_SUFFIX = ".parquet"


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


def part_name(table: str) -> str:
    """File name of ``table``'s Parquet part in a version's drift folder."""
    return f"{table}{PART_SUFFIX}"


_BASE_TABLE_NAME = re.compile(r'(?:\bmemory\b|"memory")\s*\.|(?<![\w."])(?:\bmain\b|"main")\s*\.', re.IGNORECASE)
"""A name through the database's own catalog or schema (``temp.main.`` is the filtered views' own)."""


def _runs_its_statement(statement: str) -> bool:
    """Whether an EXPLAIN statement also executes the statement it explains (EXPLAIN ANALYZE)."""
    m = re.match(r"\s*explain\s*(\([^)]*\)|analy[sz]e\b)", statement, re.IGNORECASE)
    return bool(m) and "analy" in m.group(1).lower()


def tables_named_in(query: str) -> list[str]:
    """Drift tables whose names occur in ``query`` (the ones a query over them may read)."""
    text = query.lower()
    return [t for t in VERSIONED_TABLES if t in text]


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


def _version_row(record: dict[str, Any]) -> pd.DataFrame:
    if "version" not in record:
        raise InputError("the version record needs a 'version'")
    row = {k: record.get(k) for k in _VERSION_FIELDS}
    row["version"] = int(record["version"])
    created = pd.Timestamp(row["created_at"] or datetime.now(timezone.utc))
    row["created_at"] = (created.tz_convert("UTC").tz_localize(None) if created.tzinfo else created)
    row["parameters"] = _json(row["parameters"])
    row["datasets"] = _json(row["datasets"])
    extra = {k: v for k, v in record.items() if k not in _VERSION_FIELDS}
    row["extra"] = _json(extra) if extra else None
    return pd.DataFrame([row])


def _check_rows(frames: dict[str, pd.DataFrame | None], version: int) -> None:
    for name, df in frames.items():
        if df is not None and not df.empty:
            if "version" not in df.columns:
                raise InputError(f"{name} needs a 'version' column")
            if not (np.asarray(df["version"]) == version).all():
                raise InputError(f"{name} holds rows of versions other than {version}")


class DriftStore:
    """Drift tables in an in-memory DuckDB database: loaded from Parquet parts, saved as parts.

    Example
    -------
    >>> import numpy as np, pandas as pd
    >>> from atlasengine.config import DriftConfig
    >>> from atlasengine.drift.measures import compute_initial_drift, flags
    >>> z = np.random.default_rng(0).normal(size=(40, 3))
    >>> obs = pd.DataFrame({"batch": ["a", "b"] * 20, "label": ["x", "y"] * 20}, index=[f"c{i}" for i in range(40)])
    >>> tables = compute_initial_drift(1, z, obs, DriftConfig(k=5))
    >>> folder = getfixture("tmp_path") / "drift"
    >>> with DriftStore() as store:
    ...     store.write_version({"version": 1, "strategy": "reference"}, tables, flags(tables, DriftConfig()), None)
    ...     parts = store.save_version(1, folder)
    >>> with DriftStore() as store:
    ...     store.load_parts(parts)
    ...     store.sql("select version, scope from version_drift", max_version=1).values.tolist()
    [[1, 'vs_first']]
    """

    def __init__(self) -> None:
        """Create an empty in-memory database with the newest schema; file access is off."""
        self._con: duckdb.DuckDBPyConnection | None = duckdb.connect(":memory:")
        for number, name, path in migrations():
            try:
                self._con.execute(path.read_text())
            except duckdb.Error as e:
                raise AtlasFormatError(f"drift schema migration {path.name} failed: {e}") from e
            self._con.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                              "(version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)")
            self._con.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                              [number, name, datetime.now(timezone.utc).replace(tzinfo=None)])
        self._con.execute("SET enable_external_access = false")
        self._con.execute("SET lock_configuration = true")

    # ------------------------------------------------------------------ lifetime
    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The open in-memory connection (:class:`AtlasFormatError` once closed)."""
        if self._con is None:
            raise AtlasFormatError("the drift store is closed")
        return self._con

    def close(self) -> None:
        """Free the in-memory database; further use raises."""
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self) -> DriftStore:
        """Return this store."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the store (see :meth:`close`)."""
        self.close()

    def schema_version(self) -> int:
        """Newest schema migration applied."""
        return int(self.con.execute("SELECT max(version) FROM schema_migrations").fetchone()[0])

    def _columns(self, table: str) -> list[str]:
        rows = self.con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = ? AND NOT internal ORDER BY column_index",
            [table],
        ).fetchall()
        return [r[0] for r in rows]

    # ------------------------------------------------------------------ writing
    def insert(self, table: str, data: pd.DataFrame | pa.Table | None, source: str) -> None:
        """Add rows to ``table`` by column name (``source`` names where they came from, for errors)."""
        if data is None or data.shape[0] == 0:
            return
        names = data.column_names if isinstance(data, pa.Table) else list(data.columns)
        unknown = set(names) - set(self._columns(table))
        if unknown:
            raise InputError(f"{table} has no column(s) {sorted(unknown)} (from {source})")
        self.con.register("_frame", _nullable(data) if isinstance(data, pd.DataFrame) else data)
        try:
            self.con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _frame")
        except duckdb.Error as e:
            raise AtlasFormatError(f"rows of {table} from {source} do not fit the drift schema: {e}") from e
        finally:
            self.con.unregister("_frame")

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
        version_row = _version_row(record)
        version = int(version_row.at[0, "version"])
        frames = dict(tables.as_dict(), drift_flags=flags)
        if transfer_summary is not None and "version" not in transfer_summary.columns:
            transfer_summary = transfer_summary.assign(version=version)
        frames["transfer_summary"] = transfer_summary
        _check_rows(frames, version)
        self.con.execute("BEGIN TRANSACTION")
        try:
            for table in VERSIONED_TABLES:
                self.con.execute(f"DELETE FROM {table} WHERE version = ?", [version])
            self.insert("versions", version_row, "the version record")
            for name, df in frames.items():
                self.insert(name, df, f"the {name} frame")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    def save_version(self, version: int, folder: Path, tables: Iterable[str] = VERSIONED_TABLES) -> list[Path]:
        """Write ``version``'s rows as one Parquet part per table (of ``tables``) into ``folder``; return the files."""
        folder = Path(folder)
        written = []
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for table in tables:
                rows = self.con.sql(f"SELECT * FROM {table} WHERE version = $v ORDER BY ALL",
                                    params={"v": int(version)}).to_arrow_table()
                path = folder / part_name(table)
                pq.write_table(rows, path)
                written.append(path)
                fault_point("drift_write")
        except OSError as exc:
            raise AtlasWriteError(f"cannot write the drift rows of version {version} to {folder}: {exc}") from exc
        return written

    def add_table(self, name: str, frame: pd.DataFrame) -> None:
        """Add ``frame`` as a read-only table ``name`` beside the drift tables (e.g. the atlas's ``cells``)."""
        if name in VERSIONED_TABLES or not name.isidentifier():
            raise InputError(f"{name!r} cannot name an added table")
        self.con.register("_frame", frame)
        try:
            self.con.execute(f"CREATE TABLE {name} AS SELECT * FROM _frame")
        finally:
            self.con.unregister("_frame")

    # ------------------------------------------------------------------ loading
    def load_part(self, path: Path) -> None:
        """Add the rows of one Parquet part (named ``<table>.parquet``) to its table."""
        path = Path(path)
        table = path.name.removesuffix(PART_SUFFIX)
        if table not in VERSIONED_TABLES:
            raise AtlasFormatError(f"{path} is not a drift table part (tables: {', '.join(VERSIONED_TABLES)})")
        try:
            rows = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise AtlasIntegrityError(f"drift part {path} cannot be read: {exc}") from exc
        unknown = set(rows.column_names) - set(self._columns(table))
        if unknown:
            raise AtlasFormatError(f"drift part {path} has column(s) {sorted(unknown)} that the drift schema lacks "
                                   "(written by a newer atlasengine?)")
        self.insert(table, rows, str(path))

    def load_parts(self, paths: Iterable[Path]) -> None:
        """Add the rows of several Parquet parts (see :meth:`load_part`)."""
        for path in paths:
            self.load_part(path)

    # ------------------------------------------------------------------ reading
    def read(self, table: str, max_version: int | None) -> pd.DataFrame:
        """All rows of ``table`` with ``version <= max_version`` (None: every version), sorted."""
        if table not in VERSIONED_TABLES:
            raise InputError(f"unknown drift table {table!r}; choose from {', '.join(VERSIONED_TABLES)}")
        where = "" if max_version is None else f"WHERE version <= {int(max_version)}"
        return self.con.execute(f"SELECT * FROM {table} {where} ORDER BY ALL").df()

    def report_tables(self, max_version: int | None) -> dict[str, pd.DataFrame]:
        """Every table the HTML report uses (all but ``cell_drift``), by name."""
        return {t: self.read(t, max_version) for t in VERSIONED_TABLES if t != "cell_drift"}

    def sql(self, query: str, max_version: int | None) -> pd.DataFrame:
        """Run a read-only query (SELECT/EXPLAIN) and return its last result.

        The drift tables are TEMP views showing only ``version <= max_version`` (None: all);
        external file access is disabled. Anything else raises ReadOnlyError; a failing query
        raises InputError.
        """
        cur = self.con.cursor()
        try:
            try:
                statements = cur.extract_statements(query)
            except duckdb.Error as e:
                raise InputError(f"drift query failed: {e}") from e
            if not statements:
                raise InputError("empty drift query")
            refused = [k for k in (str(s.type).rsplit(".", 1)[-1] for s in statements) if k not in _QUERY_TYPES]
            refused += ["EXPLAIN ANALYZE" for s in statements if _runs_its_statement(s.query)]
            if refused:
                raise ReadOnlyError(f"sql() runs read-only queries only; got {', '.join(refused)}")
            # the version filter is a TEMP view by the table's plain name; a name with its catalog
            # or schema ("memory.main.versions", "main.versions") would read past it. (A text check:
            # duckdb.get_table_names binds, and fails on joins USING a column.)
            qualified = None if max_version is None else _BASE_TABLE_NAME.search(query)
            if qualified:
                raise ReadOnlyError(f"name the drift tables without a schema in sql() (got {qualified.group(0)!r}): "
                                    f"this reader sees versions up to {int(max_version)} only")
            for table in VERSIONED_TABLES:
                where = "" if max_version is None else f" WHERE version <= {int(max_version)}"
                cur.execute(f"CREATE TEMP VIEW {table} AS SELECT * FROM memory.main.{table}{where}")
            try:
                return cur.execute(query).df()
            except duckdb.Error as e:
                raise InputError(f"drift query failed: {e}") from e
        finally:
            cur.close()
