"""Results as AnnData for scanpy: the query with its predictions, the atlas with its metadata and embedding."""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

from atlasengine import Atlas, InputError
from atlasengine.cli.main import main


def test_ingest_result_and_atlas_come_out_as_anndata_scanpy_reads(atlas_path, pancreas_query, tmp_path, monkeypatch):
    query = pancreas_query.copy()
    query.obs["disease"] = np.where(np.arange(query.n_obs) % 2 == 0, "case", "control")
    query.obs["label"] = query.obs["celltype"].astype(str)  # the user's own truth, named like a prediction column
    atlas = Atlas.open(atlas_path)
    res = atlas.ingest(query, batch_key="tech", training={"max_epochs": 2})

    out = res.to_anndata()
    assert out.n_obs == query.n_obs and list(out.obs_names) == list(query.obs_names)
    assert {"label", "predicted_label", "uncertainty", "is_unknown", "is_novel", "disease"} <= set(out.obs.columns)
    rows = res.predictions.index.get_indexer(out.obs_names)
    np.testing.assert_array_equal(out.obsm["X_atlasengine"], res.latent[rows])
    assert out.uns["atlasengine"]["version"] == 2
    assert "X_atlasengine" not in query.obsm  # the caller's AnnData is not changed
    assert (out.obs["user_label"] == query.obs["label"]).all()  # kept aside, as the atlas keeps it

    whole = atlas.to_anndata(counts=True)
    obs = atlas.obs()
    assert whole.n_obs == len(obs) and whole.n_vars == len(atlas.genes)
    np.testing.assert_array_equal(whole.obsm["X_atlasengine"], atlas.latent())
    np.testing.assert_array_equal(whole[list(query.obs_names)].X.toarray(), query.X.toarray())
    path = tmp_path / "atlas.h5ad"
    whole.write_h5ad(path)
    back = ad.read_h5ad(path)
    text = lambda s: s.astype(object).where(s.notna(), "<missing>").astype(str).to_numpy()  # noqa: E731
    for col in ("dataset", "batch", "label", "version_added", "predicted_label", "is_unknown"):
        np.testing.assert_array_equal(text(back.obs[col]), text(obs[col]), err_msg=col)
    sc.pp.neighbors(back, use_rep="X_atlasengine")
    sc.tl.umap(back)
    assert back.obsm["X_umap"].shape == (len(obs), 2)

    v1 = atlas.to_anndata(version=1)
    assert v1.X is None and v1.n_obs == 300 and (v1.obs["version_added"] == 1).all()
    assert v1.obs["predicted_label"].isna().all() and v1.obs["predicted_label"].dtype == "category"  # text, empty
    some = atlas.to_anndata(cells=(obs["version_added"] == 2).to_numpy())
    assert list(some.obs_names) == list(obs.index[obs["version_added"] == 2])
    assert atlas.to_anndata(cells=list(query.obs_names[:3])).n_obs == 3
    by_batch = obs.sort_values("batch")  # a mask built from a re-ordered obs() selects the cells it names
    mask = by_batch["version_added"] == 2
    assert sorted(atlas.to_anndata(cells=mask).obs_names) == sorted(by_batch.index[mask])
    with pytest.raises(InputError, match="more than once"):
        atlas.to_anndata(cells=[query.obs_names[0], query.obs_names[0]])
    assert atlas.to_anndata(cells=obs["label"] == "no such type").n_obs == 0 == atlas.to_anndata(cells=[]).n_obs

    from atlasengine.store.cells import CellStore

    read, original = [], CellStore.read_counts
    monkeypatch.setattr(CellStore, "read_counts", lambda self, ids, n: read.append(len(ids)) or original(self, ids, n))
    names = [query.obs_names[5], query.obs_names[0], query.obs_names[7]]  # in any order
    few = atlas.to_anndata(cells=names, counts=True)
    np.testing.assert_array_equal(few.X.toarray(), query[names].X.toarray())
    assert read == [3]  # only the cells asked for are read from the store


def test_export_command_writes_h5ad(two_version_atlas, tmp_path, capsys):
    path = tmp_path / "copy.atlas"
    shutil.copytree(two_version_atlas, path)
    out = tmp_path / "atlas.h5ad"
    assert main(["export", str(path), "-o", str(out), "--counts"]) == 0
    assert "X_atlasengine" in capsys.readouterr().out
    back = ad.read_h5ad(out)
    assert back.n_obs == 500 and back.X is not None and "X_atlasengine" in back.obsm
    assert main(["export", str(path), "-o", str(tmp_path / "no" / "dir" / "x.h5ad")]) == 2


def test_a_cell_type_with_a_slash_writes_to_h5ad_without_a_warning(tmp_path):
    import warnings

    import pandas as pd

    from atlasengine.api.anndata_out import query_anndata

    adata = ad.AnnData(X=np.ones((3, 2), dtype=np.float32), obs=pd.DataFrame(index=["c0", "c1", "c2"]))
    pred = pd.DataFrame({"label": ["T/NK", "B", "T/NK"], "p_T/NK": [0.9, 0.1, 0.8], "p_B": [0.1, 0.9, 0.2]},
                        index=["c2", "c1", "c0"])
    out = query_anndata(adata, pred, np.zeros((3, 2)), "x.atlas", 2)
    assert list(out.obs.columns) == ["label", "p_T_NK", "p_B"] and out.obs["p_T_NK"].tolist() == [0.8, 0.1, 0.9]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # anndata warns that "/" in a key will be refused
        out.write_h5ad(tmp_path / "q.h5ad")
    assert ad.read_h5ad(tmp_path / "q.h5ad").obs["label"].tolist() == ["T/NK", "B", "T/NK"]
