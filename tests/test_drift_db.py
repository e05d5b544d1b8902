"""DriftStore: migrations, version guard, round trips, deletes and read-only queries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from atlasengine.config import DriftConfig
from atlasengine.drift import (
    VERSIONED_TABLES,
    DriftStore,
    DriftTables,
    compute_initial_drift,
    compute_version_drift,
    flags,
    migrations,
    migrations_dir,
)
from atlasengine.errors import AtlasFormatError, AtlasLockedError, InputError, ReadOnlyError


def _tables(version: int) -> tuple[DriftTables, pd.DataFrame]:
    rng = np.random.default_rng(version)
    x = rng.normal(size=(120, 4))
    obs = pd.DataFrame(
        {"batch": np.repeat(["a", "b"], 60), "label": np.tile(["t1", "t2", None], 40)},
        index=[f"c{i}" for i in range(120)],
    )
    cfg = DriftConfig(k=5, max_cells=100, flag_knn_preservation_min=0.99)
    if version == 1:
        tables = compute_initial_drift(1, x, obs, cfg)
    else:
        tables = compute_version_drift(version, x, x, x + rng.normal(size=x.shape), obs, cfg)
    return tables, flags(tables, cfg)


def _record(version: int) -> dict:
    return {
        "version": version, "strategy": "ewc", "parameters": {"ewc_lambda": 10.0},
        "datasets": [f"query{version}"], "n_cells": 120, "n_new_cells": 40, "train_seconds": 1.5,
        "fisher_mean": 0.1, "custom_note": "kept in extra",
    }


def _table_names(path: Path) -> set[str]:
    with duckdb.connect(str(path), read_only=True) as con:
        return {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}


def test_migrations_create_schema_and_are_recorded(tmp_path: Path) -> None:
    assert migrations_dir().name == "duckdb" and migrations()[0][:2] == (1, "initial")
    path = tmp_path / "drift.duckdb"
    DriftStore(path).close()
    assert _table_names(path) == set(VERSIONED_TABLES) | {"schema_migrations"}
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute("SELECT version, name, applied_at FROM schema_migrations").fetchall()
    assert [(v, n) for v, n, _ in rows] == [(m[0], m[1]) for m in migrations()]
    assert all(at is not None for _, _, at in rows)

    with DriftStore(path) as store:  # reopening applies nothing again
        assert store.schema_version() == migrations()[-1][0]
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(migrations())


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "drift.duckdb"
    DriftStore(path).close()
    with duckdb.connect(str(path)) as con:
        con.execute("INSERT INTO schema_migrations VALUES (999, 'from_the_future', now())")
    with pytest.raises(AtlasFormatError, match="schema 999 is newer than this atlasengine supports"):
        DriftStore(path)
    with pytest.raises(AtlasFormatError):
        DriftStore(path, read_only=True)


def test_foreign_database_and_missing_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE something (x INTEGER)")
    with pytest.raises(AtlasFormatError, match="not a drift database"):
        DriftStore(path)
    with pytest.raises(AtlasFormatError):
        DriftStore(tmp_path / "absent.duckdb", read_only=True)


def test_write_read_round_trip_and_delete(tmp_path: Path) -> None:
    store = DriftStore(tmp_path / "drift.duckdb")
    written = {}
    for v in (1, 2, 3):
        tables, fl = _tables(v)
        ts = pd.DataFrame({"dataset": [f"query{v}"] * 2, "query_cell_type": ["t1", None],
                           "assigned_label": ["t1", "Unknown"], "n_cells": [30, 10], "share": [0.75, np.nan]})
        store.write_version(_record(v), tables, fl, ts)
        written[v] = (tables, fl)
    tables2, fl2 = written[2]
    store.write_version(_record(2), tables2, fl2, None)  # rewriting a version replaces its rows

    vd = store.read("version_drift", max_version=None)
    expected = pd.concat([written[v][0].version_drift for v in (1, 2, 3)], ignore_index=True)
    expected = expected.sort_values(list(expected.columns)).reset_index(drop=True)
    pd.testing.assert_frame_equal(vd, expected, check_dtype=False)
    cells = store.read("cell_drift", max_version=2)
    assert len(cells) == 240 and set(cells["version"]) == {1, 2}
    assert cells.query("version == 1")["displacement_aligned_vs_previous"].isna().all()

    versions = store.read("versions", max_version=3)
    assert list(versions["version"]) == [1, 2, 3]
    assert versions["parameters"].iloc[0] == '{"ewc_lambda": 10.0}'
    assert '"custom_note": "kept in extra"' in versions["extra"].iloc[0]
    assert versions["created_at"].notna().all()

    fl = store.read("drift_flags", max_version=None)
    assert len(fl) == sum(len(written[v][1]) for v in (1, 2, 3)) and len(fl) > 0
    ts = store.read("transfer_summary", max_version=None)
    assert sorted(ts["version"].unique()) == [1, 3]  # version 2 was rewritten without one
    assert ts["share"].isna().sum() == 2 and ts["query_cell_type"].isna().sum() == 2

    store.delete_versions_after(1)
    for table in VERSIONED_TABLES:
        assert (store.read(table, max_version=None)["version"] <= 1).all()
    assert len(store.read("version_drift", max_version=None)) == 1
    assert set(store.report_tables(1)) == set(VERSIONED_TABLES) - {"cell_drift"}
    store.close()
    with pytest.raises(AtlasFormatError):
        store.read("versions", max_version=None)


def test_write_rejects_mismatched_rows(tmp_path: Path) -> None:
    store = DriftStore(tmp_path / "drift.duckdb")
    tables, fl = _tables(2)
    with pytest.raises(InputError, match="versions other than 5"):
        store.write_version(_record(5), tables, fl, None)
    bad = tables.version_drift.assign(not_a_column=1.0)
    with pytest.raises(InputError, match="not_a_column"):
        store.write_version(_record(2), DriftTables(bad, *list(tables.as_dict().values())[1:]), fl, None)
    assert store.read("versions", max_version=None).empty  # the failed write left nothing


def test_sql_is_read_only_and_version_filtered(tmp_path: Path) -> None:
    path = tmp_path / "drift.duckdb"
    store = DriftStore(path)
    for v in (1, 2):
        store.write_version(_record(v), *_tables(v), None)
    out = store.sql("SELECT version, count(*) AS n FROM version_drift GROUP BY version ORDER BY version", 1)
    assert out.to_dict("list") == {"version": [1], "n": [1]}
    assert len(store.sql("SELECT * FROM cell_drift", max_version=None)) == 240
    for query in (
        "INSERT INTO versions (version) VALUES (99)",
        "DELETE FROM version_drift",
        "SELECT 1; DROP TABLE versions",
        "COPY versions TO 'leak.csv'",
    ):
        with pytest.raises(ReadOnlyError):
            store.sql(query, max_version=2)
    with pytest.raises(InputError):
        store.sql("SELECT * FROM read_csv('/etc/hostname')", max_version=2)
    with pytest.raises(InputError):
        store.sql("SELEKT nonsense", max_version=2)
    assert list(store.read("versions", max_version=None)["version"]) == [1, 2]
    assert not (tmp_path / "leak.csv").exists()

    ro = DriftStore(path, read_only=True)
    with pytest.raises(ReadOnlyError):
        ro.delete_versions_after(0)
    assert len(ro.read("version_drift", max_version=2)) == 3


def test_file_held_by_another_process_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "drift.duckdb"
    DriftStore(path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(path)!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AtlasLockedError):
            DriftStore(path)
    finally:
        holder.kill()
        holder.wait()
