"""Every bad input gets a clear InputError naming the problem, and the atlas stays as it was."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import snapshot

from atlasengine import Atlas, InputError


def _query(pancreas_query):
    return pancreas_query[pancreas_query.obs["tech"] == "smartseq2"].copy()


def _bad_cases(pancreas_query, pancreas_ref):
    q = _query(pancreas_query)
    cases = {}

    a = q.copy(); a.X = a.X.toarray().astype(np.float32) * 0.5 + 0.25
    cases["non-integer"] = (a, {}, "non-integer")

    a = q.copy(); X = a.X.toarray(); X[0, 0] = -1; a.X = sp.csr_matrix(X)
    cases["negative"] = (a, {}, "negative")

    a = q.copy(); X = a.X.toarray(); X[1, 3] = np.nan; a.X = X
    cases["nan"] = (a, {}, "NaN")

    cases["empty cells"] = (q[:0].copy(), {}, "no cells")
    cases["empty genes"] = (q[:, :0].copy(), {}, "no genes")

    a = q.copy(); names = list(a.obs_names); names[1] = names[0]; a.obs_names = names
    cases["duplicate cells"] = (a, {}, "duplicate cell names")

    a = q.copy(); a.obs_names = list(pancreas_ref.obs_names[: a.n_obs])
    cases["cells already in atlas"] = (a, {}, "already in the atlas")

    cases["missing batch column"] = (q.copy(), {"batch_key": "nope"}, "batch_key column 'nope'")
    cases["missing label column"] = (q.copy(), {"label_key": "nope"}, "label_key column 'nope'")

    a = q.copy(); a.obs["tech"] = "indrop"
    cases["batch already in atlas"] = (a, {}, "batch name\\(s\\) already in the atlas")

    a = q[:, :1000].copy()
    cases["too few genes"] = (a, {}, "only 1000 of the atlas's 2000 genes")

    a = q.copy(); a.var_names = [f"ENSG{i:08d}" for i in range(a.n_vars)]
    cases["other gene ids"] = (a, {}, "genes .* are in the data")

    a = q.copy(); a.obs["tech"] = a.obs["tech"].astype(object); a.obs.iloc[0, a.obs.columns.get_loc("tech")] = None
    cases["missing batch value"] = (a, {}, "missing or empty")

    cases["missing layer"] = (q.copy(), {"layer": "raw"}, "layer 'raw'")
    return cases


def test_each_bad_input_is_refused_and_atlas_unchanged(atlas_path, pancreas_query, pancreas_ref):
    before = snapshot(atlas_path)
    atlas = Atlas.open(atlas_path)
    for name, (adata, kwargs, message) in _bad_cases(pancreas_query, pancreas_ref).items():
        kw = {"batch_key": "tech", "strategy": "surgery", **kwargs}
        with pytest.raises(InputError, match=message):
            atlas.ingest(adata, **kw)
        assert snapshot(atlas_path) == before, f"atlas changed after refusing {name}"
    assert Atlas.open(atlas_path).version == 1


def test_genes_are_padded_when_enough_are_present(atlas_path, pancreas_query):
    q = _query(pancreas_query)
    keep = q.var_names[:1800]  # 90% of the atlas genes, reordered
    a = q[:, keep[::-1]].copy()
    res = Atlas.open(atlas_path).ingest(a, batch_key="tech", strategy="surgery")
    assert res.genes_padded == 200
    assert res.version.number == 2


def test_dense_integer_input_and_layer(atlas_path, pancreas_query):
    q = _query(pancreas_query)
    a = q.copy()
    a.layers["counts"] = a.X.copy()
    a.X = np.log1p(a.X.toarray())  # normalised X, raw counts in a layer
    with pytest.raises(InputError, match="non-integer"):
        Atlas.open(atlas_path).ingest(a, batch_key="tech", strategy="surgery")
    a.layers["counts"] = a.layers["counts"].toarray().astype(np.int64)
    res = Atlas.open(atlas_path).ingest(a, batch_key="tech", strategy="surgery", layer="counts", dataset="smartseq2 run")
    assert res.version.number == 2
    atlas = Atlas.open(atlas_path)
    assert (atlas.obs()["dataset"].iloc[-1]) == "smartseq2 run"


def test_create_refuses_existing_path_and_bad_reference(tmp_path, pancreas_ref, reference_atlas):
    with pytest.raises(InputError, match="already exists"):
        Atlas.create(reference_atlas, pancreas_ref, batch_key="tech", label_key="celltype")
    with pytest.raises(InputError, match="label_key column 'cell_type'"):
        Atlas.create(tmp_path / "x.atlas", pancreas_ref, batch_key="tech", label_key="cell_type")
    assert not (tmp_path / "x.atlas").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
    with pytest.raises(InputError, match="expected an AnnData"):
        Atlas.create(tmp_path / "y.atlas", pd.DataFrame(), batch_key="tech", label_key="celltype")


def test_the_callers_matrix_is_never_changed_and_large_inputs_are_checked_in_parts(monkeypatch):
    """Explicit zeros and duplicate entries are cleaned on a copy, never in the caller's arrays;
    the count checks run in parts and still count every offending value."""
    import anndata as ad

    from atlasengine.api import inputs

    X = sp.csr_matrix((np.array([0, 2, 1, 1, 3], dtype=np.float32), np.array([0, 2, 1, 1, 0]), np.array([0, 2, 4, 5])),
                      shape=(3, 3))  # an explicit zero in row 0, a duplicate (1, 1) in row 1
    adata = ad.AnnData(X)
    arrays = [a.copy() for a in (adata.X.data, adata.X.indices, adata.X.indptr)]
    m = inputs.count_matrix(adata, None)
    assert m.toarray().tolist() == [[0, 0, 2], [0, 2, 0], [3, 0, 0]] and m.nnz == 3
    for before, after in zip(arrays, (adata.X.data, adata.X.indices, adata.X.indptr)):
        np.testing.assert_array_equal(before, after)
    monkeypatch.setattr(inputs, "CHECK_CHUNK", 2)
    bad = sp.csr_matrix(np.array([[0.5, 1, 1.5], [2, 2.5, 0]], dtype=np.float32))
    with pytest.raises(InputError, match="3 non-integer value"):
        inputs.count_matrix(ad.AnnData(bad), None)
    logged = ad.AnnData(bad)
    logged.raw = ad.AnnData(sp.csr_matrix(np.ones((2, 3), dtype=np.float32)))  # scanpy's habit: counts kept in raw
    with pytest.raises(InputError, match=r"non-integer value.*adata.raw is not read: .*layer='counts'"):
        inputs.count_matrix(logged, None)


def test_a_settings_object_changes_only_the_fields_it_was_given():
    # ingest(training=TrainingConfig(max_epochs=2)) means "2 epochs", not "every other query
    # setting back to the package defaults" (KL warm-up, epoch cap, batch size of the atlas kept)
    from atlasengine.config import RuntimeConfig, TrainingConfig, merged

    atlas = TrainingConfig(kl_warmup_epochs=0, epochs_cap=200, batch_size=16)
    run = merged(atlas, TrainingConfig(max_epochs=2))
    assert (run.max_epochs, run.kl_warmup_epochs, run.epochs_cap, run.batch_size) == (2, 0, 200, 16)
    assert merged(atlas, TrainingConfig(max_epochs=2, batch_size=128)).batch_size == 128  # set, even to the default
    assert merged(atlas, {"max_epochs": 2}) == run
    assert merged(RuntimeConfig(), RuntimeConfig(progress=False)).progress is False


def test_a_section_given_as_a_model_keeps_the_atlas_defaults_it_does_not_name():
    # found by a review: AtlasConfig(query_training=TrainingConfig(max_epochs=2)) stored a KL warm-up
    # over the whole fold-in and a 400-epoch cap, where the dict form keeps the query's 0 and 200
    from atlasengine.config import AtlasConfig, TrainingConfig

    as_model = AtlasConfig(query_training=TrainingConfig(max_epochs=2)).query_training
    as_dict = AtlasConfig(query_training={"max_epochs": 2}).query_training
    assert as_model == as_dict and (as_model.kl_warmup_epochs, as_model.epochs_cap, as_model.max_epochs) == (0, 200, 2)
    assert AtlasConfig.model_validate({"query_training": TrainingConfig(lr=0.01)}).query_training.epochs_cap == 200
