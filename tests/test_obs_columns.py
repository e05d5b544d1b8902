"""Every obs column of the user's data is kept: stored, read back, exported, queried, checked, or refused whole."""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import tiledbsoma

from atlasengine import Atlas, AtlasIntegrityError, InputError
from atlasengine.store.metadata import metadata_checksums

CONFIG = {"model": {"n_hidden": 16, "n_latent": 4}, "reference_training": {"max_epochs": 3},
          "query_training": {"max_epochs": 2}, "continual": {"fisher_max_cells": 50, "replay_max_cells": 50},
          "transfer": {"unknown_rule": "uncertainty"}}  # a 3-epoch model: the paper's rule calls some cells Unknown


def _everything(path) -> dict[str, bytes]:
    """Every file of the atlas, the cell store's included, byte for byte."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def _study(pancreas):
    """A case-control reference (donor, disease, condition, ...) and a query that brings time_point, lacks condition."""
    ref = pancreas[pancreas.obs["tech"].isin(["celseq", "indrop"])][:160, :400].copy()
    query = pancreas[pancreas.obs["tech"] == "celseq2"][:60, :400].copy()
    n = ref.n_obs
    i = np.arange(n)
    ref.obs["donor"] = pd.Categorical([f"donor{k % 4}" for k in i])
    ref.obs["disease"] = np.where(i % 2 == 0, "T2D", "healthy").astype(object)
    ref.obs["condition"] = pd.Categorical(np.where(i % 3 == 0, "fasted", "fed"), categories=["fed", "fasted"])
    ref.obs["age"] = pd.array([None if k == 5 else 30 + k % 40 for k in i], dtype="Int64")
    ref.obs["score"] = np.where(i == 7, np.nan, i / 7.0)
    ref.obs["treated"] = i % 5 == 0
    ref.obs["note"] = [None if k % 10 == 0 else f"cell {k} ü" for k in i]
    m = query.n_obs
    query.obs["donor"] = pd.Categorical([f"donor{4 + k % 2}" for k in range(m)])
    query.obs["disease"] = np.where(np.arange(m) % 3 == 0, "T2D", "healthy").astype(object)
    query.obs["age"] = pd.array([50 + k for k in range(m)], dtype="Int64")
    query.obs["time_point"] = np.arange(m, dtype=np.float32) / 2  # a new column
    return ref, query


@pytest.fixture(scope="module")
def study_atlas(tmp_path_factory, pancreas):
    """Version 1 (the case-control reference) and version 2 (the query), built once; copy before writing."""
    ref, query = _study(pancreas)
    path = tmp_path_factory.mktemp("study") / "study.atlas"
    atlas = Atlas.create(path, ref, batch_key="tech", label_key="celltype", config=CONFIG)
    atlas.ingest(query, batch_key="tech", strategy="ewc")
    return path, ref, query


def _text(values) -> list:
    return [None if pd.isna(v) else str(v) for v in values]


def test_every_obs_column_round_trips_through_obs_and_anndata(study_atlas, tmp_path):
    path, ref, query = study_atlas
    atlas = Atlas.open(path)
    obs = atlas.obs()
    r, q = obs.loc[list(ref.obs_names)], obs.loc[list(query.obs_names)]
    for col in ("orig.ident", "tech", "celltype", "donor", "disease", "condition", "note"):
        assert _text(r[col]) == _text(ref.obs[col]), col
        assert obs[col].dtype == object, col  # text and categories come back as text
    assert _text(r["user_dataset"]) == _text(ref.obs["dataset"])  # the data's own "dataset" column, kept
    assert (obs["dataset"] == np.where(obs["version_added"] == 1, "reference", "dataset_v2")).all()  # the engine's
    assert obs["age"].dtype == "Int64" and pd.isna(r["age"].iloc[5])
    assert r["age"].fillna(-1).tolist() == ref.obs["age"].fillna(-1).tolist()
    np.testing.assert_array_equal(r["score"].to_numpy(), ref.obs["score"].to_numpy())  # NaN where NaN
    assert obs["treated"].dtype == "boolean" and r["treated"].tolist() == ref.obs["treated"].tolist()
    assert r["nFeature_RNA"].tolist() == ref.obs["nFeature_RNA"].tolist()
    # the query's new column: values for its cells, missing for the reference's; its missing column likewise
    np.testing.assert_array_equal(q["time_point"].to_numpy(), query.obs["time_point"].to_numpy(np.float64))
    assert r["time_point"].isna().all() and obs["time_point"].dtype == np.float64
    assert q["condition"].isna().all() and q["treated"].isna().all()
    assert q["age"].tolist() == query.obs["age"].tolist()
    # version 1 shows the columns it had, nothing of version 2
    assert "time_point" not in Atlas.open(path, version=1).obs().columns

    out = atlas.to_anndata()
    file = tmp_path / "atlas.h5ad"
    out.write_h5ad(file)
    back = ad.read_h5ad(file)
    for col in ("donor", "disease", "condition", "note", "user_dataset"):
        assert isinstance(back.obs[col].dtype, pd.CategoricalDtype), col  # text becomes categories in AnnData
        assert _text(back.obs[col]) == _text(obs[col]), col
    assert back.obs["age"].dtype == "Int64" and back.obs["age"].equals(obs["age"])
    assert back.obs["treated"].dtype == "boolean" and back.obs["treated"].equals(obs["treated"])
    np.testing.assert_array_equal(back.obs["time_point"].to_numpy(), obs["time_point"].to_numpy())


def test_sql_joins_the_users_columns_with_predictions_and_drift(study_atlas):
    path, _, query = study_atlas
    atlas = Atlas.open(path)
    obs = atlas.obs()
    got = atlas.sql("SELECT disease, count(*) AS n FROM cells WHERE is_unknown GROUP BY disease ORDER BY disease")
    new = obs[obs["version_added"] == 2]
    expected = new[new["is_unknown"].astype(bool)].groupby("disease").size()
    assert len(expected) and got.set_index("disease")["n"].to_dict() == expected.to_dict()
    assert got["n"].sum() == int(atlas.predictions()["is_unknown"].sum())
    per_donor = atlas.sql("SELECT c.donor, avg(d.displacement_aligned_vs_first) AS moved, count(*) AS n FROM cells c "
                          "JOIN cell_drift d USING (cell) WHERE d.version = 2 GROUP BY c.donor ORDER BY c.donor")
    assert per_donor["donor"].tolist() == ["donor0", "donor1", "donor2", "donor3"]  # the reference's cells moved
    assert per_donor["n"].sum() == (obs["version_added"] == 1).sum() and per_donor["moved"].notna().all()
    typed = atlas.sql("SELECT age, treated, time_point FROM cells WHERE time_point > 10 ORDER BY time_point")
    assert typed["time_point"].tolist() == sorted(query.obs["time_point"][query.obs["time_point"] > 10].tolist())
    assert atlas.sql("SELECT count(*) AS n FROM cells WHERE treated")["n"].item() == int((obs["treated"] == True).sum())  # noqa: E712
    assert Atlas.open(path, version=1).sql("SELECT count(*) AS n FROM cells")["n"].item() == 160


def test_a_column_of_another_type_is_refused_and_the_atlas_stays_byte_identical(study_atlas, tmp_path, pancreas):
    path = tmp_path / "a.atlas"
    shutil.copytree(study_atlas[0], path)
    before = _everything(path)
    query = pancreas[pancreas.obs["tech"] == "smartseq2"][:30, :400].copy()
    query.obs["age"] = "old"  # the atlas stores age as integers
    query.obs["donor"] = 7  # and donor as text
    with pytest.raises(InputError, match=r"'age' holds text values where the atlas stores int; 'donor' holds int"):
        Atlas.open(path).ingest(query, batch_key="tech")
    assert _everything(path) == before
    twin = pancreas[pancreas.obs["tech"] == "smartseq2"][:30, :400].copy()
    twin.obs["Disease"] = "x"
    with pytest.raises(InputError, match="'Disease' differs only in letter case from the atlas's column 'disease'"):
        Atlas.open(path).ingest(twin, batch_key="tech")
    mixed = pancreas[pancreas.obs["tech"] == "smartseq2"][:30, :400].copy()
    mixed.obs["visit"] = [1 if k % 2 else "baseline" for k in range(mixed.n_obs)]
    with pytest.raises(InputError, match="'visit' holds values of several types"):
        Atlas.open(path).ingest(mixed, batch_key="tech")
    raw = pancreas[pancreas.obs["tech"] == "smartseq2"][:30, :400].copy()
    raw.obs["barcode"] = [b"ACGT"] * 30
    with pytest.raises(InputError, match="'barcode' holds bytes values, which the atlas does not store"):
        Atlas.open(path).ingest(raw, batch_key="tech")
    gaps = pancreas[pancreas.obs["tech"] == "smartseq2"][:30, :400].copy()
    gaps.obs["age"] = [np.nan] + [40.0] * 29  # integers with one missing value: float to pandas
    with pytest.raises(InputError, match=r"'age' holds float values where the atlas stores int \(integers with "
                                         r"missing values: adata.obs\['age'\].astype\('Int64'\)\)"):
        Atlas.open(path).ingest(gaps, batch_key="tech")
    garbled = pancreas[pancreas.obs["tech"] == "smartseq2"][:30, :400].copy()
    garbled.obs_names = [f"cell{k}" + ("\udcff" if k == 3 else "") for k in range(30)]  # undecodable bytes
    with pytest.raises(InputError, match="1 cell name.*not valid Unicode text"):
        Atlas.open(path).ingest(garbled, batch_key="tech")
    assert _everything(path) == before

    # integers join a float column; a column with every value missing takes the stored type
    fine = pancreas[pancreas.obs["tech"] == "smartseq2"][:30, :400].copy()
    fine.obs["time_point"] = np.arange(30)
    fine.obs["treated"] = None
    fine.obs["age"] = np.nan  # how pandas makes an empty column: float NaN, here where integers are stored
    fine.obs["disease"] = pd.Categorical([None] * 30)  # an empty categorical where text is stored
    atlas = Atlas.open(path)
    atlas.ingest(fine, batch_key="tech", training={"max_epochs": 1})
    obs = atlas.obs().loc[list(fine.obs_names)]
    assert obs["time_point"].tolist() == list(np.arange(30, dtype=float)) and obs["treated"].isna().all()
    assert obs["age"].isna().all() and obs["disease"].isna().all()
    assert atlas.info.number == 3 and atlas.obs()["treated"].dtype == "boolean" and atlas.obs()["age"].dtype == "Int64"


def test_names_the_engine_uses_are_kept_under_a_prefix_and_unkeepable_columns_refused(tmp_path, pancreas):
    ref = pancreas[pancreas.obs["tech"] == "indrop"][:80, :300].copy()
    ref.obs["batch"] = "b"  # clashes with the engine's batch (the batch key here is tech)
    ref.obs["Predicted_Label"] = "x"  # letter case aside, an engine column
    ref.obs["soma_thing"] = 1
    ref.obs["__index_level_0__"] = np.arange(80)  # TileDB reserves names starting with __
    ref.obs["doublet_score"] = pd.array([None] * 80, dtype="Float64")  # not computed yet, declared a float
    ref.obs["disease_later"] = np.nan  # a plain placeholder: float NaN to pandas, whatever it will hold
    ref.obs["grade"] = pd.Categorical([None] * 80, categories=[True, False])  # categories are text
    ref.obs["n_guides"] = pd.array([None] * 80, dtype="Int64")
    ref.obs["passed_qc"] = pd.array([None] * 80, dtype="boolean")
    ref.var["__gene_index__"] = np.arange(ref.n_vars)
    for bad, message in ((pd.Series(pd.date_range("2020-01-01", periods=80)), "dtype datetime64"),
                         (pd.Series(["a"] * 80), "same name once letter case is ignored")):
        wrong = ref.copy()
        wrong.obs["when" if "date" in message else "user_batch"] = bad.to_numpy()
        with pytest.raises(InputError, match=message):
            Atlas.create(tmp_path / "refused.atlas", wrong, batch_key="tech", label_key="celltype", config=CONFIG)
        assert not (tmp_path / "refused.atlas").exists()
    atlas = Atlas.create(tmp_path / "ok.atlas", ref, batch_key="tech", label_key="celltype", config=CONFIG)
    obs = atlas.obs()
    assert (obs["batch"] == "indrop").all() and (obs["user_batch"] == "b").all()
    assert (obs["user_Predicted_Label"] == "x").all() and obs["user_soma_thing"].tolist() == [1] * 80
    assert obs["user___index_level_0__"].tolist() == list(range(80))
    kinds = atlas._reader.manifest.datasets[0].obs_columns  # noqa: SLF001
    assert kinds["user_batch"] == "text"
    assert (kinds["doublet_score"], kinds["n_guides"], kinds["passed_qc"]) == ("float", "int", "bool")
    assert (kinds["disease_later"], kinds["grade"]) == ("text", "text")
    assert atlas.var()["user___gene_index__"].tolist() == list(range(300))
    later = pancreas[pancreas.obs["tech"] == "celseq"][:20, :300].copy()  # the scores computed since
    later.obs["doublet_score"] = np.linspace(0, 1, 20)
    later.obs["n_guides"] = pd.array(range(20), dtype="Int64")
    later.obs["passed_qc"] = np.arange(20) % 2 == 0
    later.obs["__index_level_0__"] = np.arange(20)
    later.obs["disease_later"] = "T2D"
    later.obs["grade"] = pd.Categorical([True, False] * 10)
    atlas.ingest(later, batch_key="tech", strategy="surgery")
    obs = atlas.obs()
    assert obs["doublet_score"].dropna().tolist() == pytest.approx(np.linspace(0, 1, 20).tolist())
    assert obs["n_guides"].dropna().tolist() == list(range(20)) and obs["passed_qc"].dropna().sum() == 10


def test_a_changed_stored_obs_column_is_named_not_read(study_atlas, tmp_path):
    path = tmp_path / "b.atlas"
    shutil.copytree(study_atlas[0], path)
    atlas = Atlas.open(path)
    record = atlas._reader.manifest.datasets[1]  # noqa: SLF001
    uri = str(path / "cells" / "obs_columns" / f"joinids_{record.joinid_start}_{record.joinid_stop}")
    with tiledbsoma.DataFrame.open(uri) as df:
        row = df.read(coords=([record.joinid_start + 3],)).concat()
    changed = row.set_column(row.schema.get_field_index("disease"), "disease", pa.array(["edited"], pa.large_string()))
    with tiledbsoma.DataFrame.open(uri, "w") as df:
        df.write(changed)
    with pytest.raises(AtlasIntegrityError, match="obs columns of 1 cell\\(s\\) of dataset 'dataset_v2' do not match"):
        Atlas.open(path).obs()


def test_checksums_of_own_columns_see_names_types_and_missing_values():
    def one(**columns):
        table = pa.table(columns)
        return metadata_checksums(table, list(columns))[0]

    base = one(a=pa.array(["1"], pa.large_string()))
    assert base != one(a=pa.array([None], pa.large_string()))
    assert one(a=pa.array(["None"], pa.large_string())) != one(a=pa.array([None], pa.large_string()))
    assert base != one(b=pa.array(["1"], pa.large_string()))  # the name counts
    assert one(a=pa.array([1], pa.int64())) != one(a=pa.array([1.0], pa.float64()))
    assert one(a=pa.array([True])) != one(a=pa.array([1], pa.int64()))
    assert metadata_checksums(pa.table({"a": [1, 2]}), []).tolist() == [0, 0]  # no columns: 0, as before format 6
