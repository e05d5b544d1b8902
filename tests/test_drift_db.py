"""DriftStore: the schema from migrations, round trips through Parquet parts, damaged parts, read-only queries."""

from __future__ import annotations

from pathlib import Path

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
    part_name,
    tables_named_in,
)
from atlasengine.errors import AtlasFormatError, AtlasIntegrityError, InputError, ReadOnlyError


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


def test_schema_comes_from_the_migrations() -> None:
    assert migrations_dir().name == "duckdb" and migrations()[0][:2] == (1, "initial")
    with DriftStore() as store:
        tables = {r[0] for r in store.con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        assert tables == set(VERSIONED_TABLES) | {"schema_migrations"}
        rows = store.con.execute("SELECT version, name, applied_at FROM schema_migrations").fetchall()
        assert [(v, n) for v, n, _ in rows] == [(m[0], m[1]) for m in migrations()]
        assert store.schema_version() == migrations()[-1][0]
    with pytest.raises(AtlasFormatError, match="closed"):
        store.read("versions", max_version=None)


def _history(store: DriftStore) -> dict:
    written = {}
    for v in (1, 2, 3):
        tables, fl = _tables(v)
        ts = pd.DataFrame({"dataset": [f"query{v}"] * 2, "query_cell_type": ["t1", None],
                           "assigned_label": ["t1", "Unknown"], "n_cells": [30, 10], "share": [0.75, np.nan]})
        store.write_version(_record(v), tables, fl, ts)
        written[v] = (tables, fl)
    return written


def test_write_read_round_trip_through_parquet_parts(tmp_path: Path) -> None:
    written = _history(store := DriftStore())
    tables2, fl2 = written[2]
    store.write_version(_record(2), tables2, fl2, None)  # rewriting a version replaces its rows
    parts = [p for v in (1, 2, 3) for p in store.save_version(v, tmp_path / f"v{v}")]
    assert sorted(p.name for p in (tmp_path / "v2").iterdir()) == sorted(part_name(t) for t in VERSIONED_TABLES)
    fresh = DriftStore()
    fresh.load_parts(parts)
    for table in VERSIONED_TABLES:
        pd.testing.assert_frame_equal(fresh.read(table, None), store.read(table, None))

    vd = fresh.read("version_drift", max_version=None)
    expected = pd.concat([written[v][0].version_drift for v in (1, 2, 3)], ignore_index=True)
    expected = expected.sort_values(list(expected.columns)).reset_index(drop=True)
    pd.testing.assert_frame_equal(vd, expected, check_dtype=False)
    cells = fresh.read("cell_drift", max_version=2)
    assert len(cells) == 240 and set(cells["version"]) == {1, 2}
    assert cells.query("version == 1")["displacement_aligned_vs_previous"].isna().all()

    versions = fresh.read("versions", max_version=3)
    assert list(versions["version"]) == [1, 2, 3]
    assert versions["parameters"].iloc[0] == '{"ewc_lambda": 10.0}'
    assert '"custom_note": "kept in extra"' in versions["extra"].iloc[0]
    assert versions["created_at"].notna().all()

    fl = fresh.read("drift_flags", max_version=None)
    assert len(fl) == sum(len(written[v][1]) for v in (1, 2, 3)) and len(fl) > 0
    ts = fresh.read("transfer_summary", max_version=None)
    assert sorted(ts["version"].unique()) == [1, 3]  # version 2 was rewritten without one
    assert ts["share"].isna().sum() == 2 and ts["query_cell_type"].isna().sum() == 2
    assert set(fresh.report_tables(1)) == set(VERSIONED_TABLES) - {"cell_drift"}


def test_damaged_foreign_or_newer_parts_are_refused(tmp_path: Path) -> None:
    store = DriftStore()
    store.write_version(_record(1), *_tables(1), None)
    part = store.save_version(1, tmp_path)[1]
    data = bytearray(part.read_bytes())
    part.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(AtlasIntegrityError, match=f"drift part {part} cannot be read"):
        DriftStore().load_part(part)
    with pytest.raises(AtlasIntegrityError):
        DriftStore().load_part(tmp_path / "absent" / "versions.parquet")
    other = tmp_path / "something.parquet"
    pd.DataFrame({"x": [1]}).to_parquet(other)
    with pytest.raises(AtlasFormatError, match="not a drift table part"):
        DriftStore().load_part(other)
    newer = tmp_path / "newer" / "versions.parquet"
    newer.parent.mkdir()
    pd.DataFrame({"version": [1], "column_of_the_future": [1.0]}).to_parquet(newer)
    with pytest.raises(AtlasFormatError, match="column_of_the_future.*newer atlasengine"):
        DriftStore().load_part(newer)


def test_write_rejects_mismatched_rows() -> None:
    store = DriftStore()
    tables, fl = _tables(2)
    with pytest.raises(InputError, match="versions other than 5"):
        store.write_version(_record(5), tables, fl, None)
    bad = tables.version_drift.assign(not_a_column=1.0)
    with pytest.raises(InputError, match="not_a_column"):
        store.write_version(_record(2), DriftTables(bad, *list(tables.as_dict().values())[1:]), fl, None)
    assert store.read("versions", max_version=None).empty  # the failed write left nothing


def test_sql_is_read_only_and_version_filtered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = DriftStore()
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
        "SET enable_external_access = true",
        "EXPLAIN ANALYZE DELETE FROM version_drift",  # EXPLAIN ANALYZE runs what it explains
        "explain analyse create table memory.main.x as select 1",
        "SELECT version FROM memory.main.versions",  # a schema would read past the version filter
        "SELECT * FROM main.version_drift",
        'SELECT * FROM "memory"."main".versions v JOIN version_drift d USING (version)',
    ):
        with pytest.raises(ReadOnlyError):
            store.sql(query, max_version=2)
    with pytest.raises(InputError):
        store.sql("SELECT * FROM read_csv('/etc/hostname')", max_version=2)
    with pytest.raises(InputError):
        store.sql("SELEKT nonsense", max_version=2)
    assert list(store.read("versions", max_version=None)["version"]) == [1, 2]
    assert len(store.sql("EXPLAIN SELECT * FROM versions", max_version=1)) > 0  # a plan alone is fine
    assert list(store.sql("SELECT version FROM temp.versions", max_version=1)["version"]) == [1]
    assert list(store.sql("SELECT version FROM temp.main.versions", max_version=1)["version"]) == [1]
    joined = store.sql("SELECT count(*) AS n FROM versions JOIN version_drift USING (version)", max_version=1)
    assert joined["n"].item() == 1  # a join USING a column (which duckdb.get_table_names cannot bind)
    assert list(store.sql("SELECT version FROM memory.main.versions", max_version=None)["version"]) == [1, 2]
    assert not (tmp_path / "leak.csv").exists()
    assert tables_named_in("select * from Version_Drift join versions using (version)") == [
        "versions", "version_drift"]
