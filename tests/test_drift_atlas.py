"""Drift tracking through the Atlas: rows per version, surgery does not drift, atomic with the manifest."""

from __future__ import annotations

import numpy as np
import pytest

from atlasengine import Atlas, ReadOnlyError


def test_drift_rows_for_every_version_and_surgery_is_zero(atlas_path, pancreas_query):
    atlas = Atlas.open(atlas_path)
    celseq2 = pancreas_query[pancreas_query.obs["tech"] == "celseq2"].copy()
    smartseq2 = pancreas_query[pancreas_query.obs["tech"] == "smartseq2"].copy()
    atlas.ingest(celseq2, batch_key="tech", strategy="surgery", training={"max_epochs": 3})
    atlas.ingest(smartseq2, batch_key="tech", strategy="surgery", training={"max_epochs": 3})
    d = atlas.drift()
    assert sorted(set(d["version"])) == [1, 2, 3]
    assert set(d[d.version == 3]["scope"]) == {"vs_previous", "vs_first"}
    later = d[d.version > 1]
    # surgery: reference weights and inputs unchanged -> reference cells do not move at all
    assert np.allclose(later["displacement_mean_raw"], 0.0, atol=1e-5)  # float rounding of the chunked products
    assert np.allclose(later["knn_preservation_mean"], 1.0)
    by_type = atlas.drift(by="cell_type")
    assert set(by_type["cell_type"]) == set(atlas.labels)
    assert sorted(set(atlas.drift(by="batch")["version"])) == [1, 2, 3]
    q = atlas.sql("select version, strategy from versions order by version")
    assert q["strategy"].tolist() == ["reference", "surgery", "surgery"]
    ts = atlas.sql("select * from transfer_summary where version = 3")
    assert ts["n_cells"].sum() == smartseq2.n_obs
    with pytest.raises(ReadOnlyError):
        atlas.sql("delete from version_drift")
    # an earlier version sees only its own rows
    assert set(Atlas.open(atlas_path, version=2).drift()["version"]) == {1, 2}


def test_finetune_drifts_more_than_ewc(folded):
    drift = {}
    for strategy in ("finetune", "ewc"):
        d = Atlas.open(folded[strategy]).drift()
        drift[strategy] = d[(d.version == 2) & (d.scope == "vs_first")].iloc[0]
    assert drift["ewc"]["displacement_mean_aligned"] < drift["finetune"]["displacement_mean_aligned"]
    assert drift["ewc"]["knn_preservation_mean"] > drift["finetune"]["knn_preservation_mean"]


def test_failure_between_cell_write_and_drift_write_leaves_both_at_previous_version(atlas_path, pancreas_query, monkeypatch):
    from atlasengine.faults import InjectedFault

    atlas = Atlas.open(atlas_path)
    for point in ("drift", "before_manifest"):  # before the DuckDB write / after it, before the switch
        monkeypatch.setenv("ATLASENGINE_FAULT", f"{point}:raise")
        with pytest.raises(InjectedFault):
            atlas.ingest(pancreas_query, batch_key="tech", strategy="surgery", training={"max_epochs": 2})
        reopened = Atlas.open(atlas_path)
        assert reopened.version == 1
        assert set(reopened.drift()["version"]) == {1}
        assert set(reopened.sql("select version from versions")["version"]) == {1}
        assert len(reopened.obs()) == 300
    monkeypatch.delenv("ATLASENGINE_FAULT")
    atlas.ingest(pancreas_query, batch_key="tech", strategy="surgery")
    assert set(atlas.drift()["version"]) == {1, 2}
    assert len(atlas.sql("select * from versions")) == 2
