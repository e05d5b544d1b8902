"""Cells read from the store are checked against the checksums written with them: damage is named, never used."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.sparse as sp
import tiledbsoma

from atlasengine import Atlas, AtlasIntegrityError
from atlasengine.store.cells import OBS_SCHEMA, cell_checksums, counts_checksums, obs_checksums


def _x_fragments(atlas_path):
    """The counts fragments of the cell store, oldest (the reference's) first."""
    return sorted((atlas_path / "cells" / "ms" / "RNA" / "X" / "counts" / "__fragments").iterdir())


def _copy(atlas, tmp_path, name="a.atlas"):
    path = tmp_path / name
    shutil.copytree(atlas, path)
    return path


def test_checksums_see_every_change_of_a_cell_but_not_the_order_of_its_entries():
    counts = sp.random(50, 40, density=0.3, format="csr", dtype=np.float32, random_state=0)
    counts.data = np.ceil(counts.data * 9)
    base = counts_checksums(counts)
    assert len(set(base.tolist())) == 50
    coo = counts.tocoo()
    order = np.random.default_rng(1).permutation(coo.nnz)  # same entries, stored in another order
    shuffled = sp.csr_matrix((coo.data[order], (coo.row[order], coo.col[order])), shape=counts.shape)
    np.testing.assert_array_equal(counts_checksums(shuffled), base)
    changed = counts.copy()
    changed.data[0] += 1  # one count of cell 0
    moved = counts.copy()
    assert counts.indptr[1] > 0
    moved.indices[0] = next(g for g in range(40) if g not in counts.indices[: counts.indptr[1]])  # to another gene
    for other in (changed, moved):
        assert np.flatnonzero(counts_checksums(other) != base).tolist() == [0]
    obs = pd.DataFrame({"obs_id": ["a", "b"], "dataset": "d", "batch": "x", "label": [None, "None"],
                        "version_added": 1})
    o = obs_checksums(obs)
    assert o[0] != o[1]  # a missing label is not the text "None"
    np.testing.assert_array_equal(cell_checksums(obs, sp.csr_matrix((2, 3)))[:, 0], o)


def test_bit_flips_in_stored_counts_are_refused_or_harmless_never_read_silently(two_version_atlas, tmp_path):
    original = Atlas.open(two_version_atlas).counts().toarray()
    rng = np.random.default_rng(0)
    outcomes: Counter = Counter()
    for trial in range(30):
        path = _copy(two_version_atlas, tmp_path, f"flip{trial}.atlas")
        files = sorted(f for d in _x_fragments(path) for f in d.glob("*.tdb") if f.name != "__fragment_metadata.tdb")
        target = files[rng.integers(len(files))]
        data = bytearray(target.read_bytes())
        data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        target.write_bytes(bytes(data))
        try:
            np.testing.assert_array_equal(Atlas.open(path).counts().toarray(), original)
            outcomes["read exactly as written"] += 1
        except AtlasIntegrityError as exc:
            assert "cell store" in str(exc)
            outcomes["refused"] += 1
        shutil.rmtree(path)
    assert outcomes["refused"] >= 15, outcomes


def test_a_deleted_counts_fragment_is_named_not_read_as_zeros(two_version_atlas, tmp_path, pancreas_query):
    path = _copy(two_version_atlas, tmp_path)
    reference = _x_fragments(path)[0]
    shutil.rmtree(reference)
    for commit in (reference.parent.parent / "__commits").glob(reference.name + "*"):
        commit.unlink()
    with pytest.raises(AtlasIntegrityError, match="counts of 300 cell\\(s\\) of dataset 'reference' do not match"):
        Atlas.open(path).counts()
    q = pancreas_query[pancreas_query.obs["tech"] == "smartseq2"].copy()
    q.obs["tech"], q.obs_names = "smartseq2_again", "again_" + q.obs_names
    with pytest.raises(AtlasIntegrityError, match="dataset 'reference'"):
        Atlas.open(path).ingest(q, batch_key="tech", strategy="ewc", training={"max_epochs": 1})
    assert Atlas.open(path).version == 2 and sorted(p.name for p in (path / "versions").iterdir()) == [
        "v0001", "v0002"]


def test_a_renamed_cell_in_obs_is_named_not_shown(two_version_atlas, tmp_path):
    path = _copy(two_version_atlas, tmp_path)
    atlas = Atlas.open(path)
    names = atlas.obs().index
    first = atlas.versions[-1].n_cells - atlas.versions[-1].n_new_cells  # the first cell version 2 added
    stored = tiledbsoma.Experiment.open(str(path / "cells"))
    row = stored.obs.read(coords=(slice(None),)).concat().to_pandas().iloc[[first]]
    stored.close()
    row["obs_id"] = names[first - 1]  # damage that makes it a duplicate of its neighbour
    with tiledbsoma.Experiment.open(str(path / "cells"), "w") as exp:
        exp.obs.write(pa.Table.from_pandas(row, schema=OBS_SCHEMA, preserve_index=False))
    with pytest.raises(AtlasIntegrityError, match="obs of 1 cell\\(s\\) of dataset 'dataset_v2' do not match"):
        Atlas.open(path).obs()
