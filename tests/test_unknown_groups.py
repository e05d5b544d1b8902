"""Unknown groups: the cells a version could not explain, clustered, with their closest type and marker genes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.sparse as sp

from atlasengine import Atlas, InputError
from atlasengine.transfer.groups import cluster, log_normalise, neighbour_scale, rank_markers


def test_clusters_are_found_and_numbered_by_size():
    rng = np.random.default_rng(0)
    z = np.vstack([rng.normal(0, 0.1, (30, 3)), rng.normal(5, 0.1, (12, 3)), [[20, 20, 20]]])
    groups = cluster(z, 5)
    assert (groups[:30] == 0).all() and (groups[30:42] == 1).all() and groups[42] == -1
    assert (cluster(z[:3], 5) == -1).all()


def test_the_cells_of_one_new_type_are_one_group():
    rng = np.random.default_rng(0)
    blob = rng.normal(0, 1, (40, 10))  # one type: HDBSCAN alone finds no split and calls all 40 noise
    scale = neighbour_scale(rng.normal(0, 1, (200, 10)))  # a known type drawn alike
    groups = cluster(blob, 5, scale)
    assert set(groups) == {-1, 0} and (groups == 0).mean() >= 0.6
    assert (cluster(blob, 5) == -1).all()  # without the reference's scale
    two = cluster(np.vstack([blob, blob + 20]), 5, scale)
    assert len(set(two[two >= 0])) == 2 and not set(two[:40]) & set(two[40:]) - {-1}


def test_one_new_type_that_hdbscan_cuts_into_fragments_is_one_group():
    """Two dense fragments with most cells in no group (the README's example on an AVX-512 machine)."""
    from sklearn.cluster import HDBSCAN

    rng = np.random.default_rng(0)
    blob = np.vstack([rng.normal(0, 1, (30, 10)), rng.normal(0, 0.05, (6, 10)) + 0.5,
                      rng.normal(0, 0.05, (6, 10)) - 0.5])
    fragments = HDBSCAN(min_cluster_size=5, copy=True).fit_predict(blob)
    assert (fragments < 0).mean() > 0.5 and len(set(fragments) - {-1}) == 2  # what HDBSCAN alone gives
    scale = neighbour_scale(rng.normal(0, 1, (200, 10)))
    groups = cluster(blob, 5, scale)
    assert set(groups) == {-1, 0} and (groups == 0).mean() >= 0.8
    two = cluster(np.vstack([blob, blob + 20]), 5, scale)  # two such types stay two groups
    assert len(set(two[two >= 0])) == 2 and not set(two[:42]) & set(two[42:]) - {-1}


def test_the_groups_table_prints_however_it_is_truncated():
    import pandas as pd

    from atlasengine.transfer.groups import MarkerTables

    table = pd.DataFrame({"n_cells": [5, 3], "markers": [list("abcdefghij")] * 2, "cells": [["c"] * 40] * 2})
    table.attrs["markers"] = MarkerTables({0: pd.DataFrame({"gene": ["a"]}), 1: pd.DataFrame({"gene": ["b"]})})
    with pd.option_context("display.width", 40, "display.max_columns", 2, "display.max_rows", 1):
        assert "n_cells" in repr(table) and "n_cells" in repr(table[["n_cells", "markers"]])
    assert table.attrs["markers"] == MarkerTables({0: pd.DataFrame({"gene": ["a"]}), 1: pd.DataFrame({"gene": ["b"]})})
    assert table.attrs["markers"] != MarkerTables({0: pd.DataFrame({"gene": ["z"]}), 1: pd.DataFrame({"gene": ["b"]})})


def test_the_gene_up_in_the_group_ranks_first():
    rng = np.random.default_rng(1)
    other = rng.poisson(3, (60, 5)).astype(np.float32)
    group = rng.poisson(3, (20, 5)).astype(np.float32)
    group[:, 3] += 20  # gene d is up in the group
    group[:, 1] = 0  # gene b is down
    table = rank_markers(log_normalise(sp.csr_matrix(group)), log_normalise(sp.csr_matrix(other)), list("abcde"), 5)
    assert table["gene"].iloc[0] == "d" and table["gene"].iloc[-1] == "b"
    assert table["log_fold_change"].iloc[0] > 1 and table["pct_group"].iloc[0] == 1.0


def test_pbmc_mono_cd16_left_out_of_the_reference_form_a_group_with_fcgr3a_among_its_markers(pbmc_fold_in):
    atlas, reference, _, query, predictions = pbmc_fold_in
    groups = atlas.unknown_groups()
    truth = query.obs["cell_type"].astype(str)
    called = predictions.index[(predictions["is_unknown"].astype(bool) | predictions["is_novel"].astype(bool))]
    assert all(set(cells) <= set(called) for cells in groups["cells"])
    assert groups["n_cells"].tolist() == sorted(groups["n_cells"], reverse=True)
    shares = [truth.loc[cells].eq("Mono_CD16").mean() for cells in groups["cells"]]
    best = int(np.argmax(shares))
    assert shares[best] >= 0.6, groups
    assert groups["closest_type"].iloc[best] == "Mono_CD14"  # a monocyte, as the reference knows them
    assert "FCGR3A" in groups["markers"].iloc[best], groups["markers"].iloc[best]
    assert list(groups.attrs["markers"][groups.index[best]]["gene"]) == groups["markers"].iloc[best]
    with pytest.raises(InputError, match="version 1 added the reference cells"):
        atlas.unknown_groups(version=1)
    with pytest.raises(InputError, match="min_size must be at least 2"):
        atlas.unknown_groups(min_size=1)


def test_gene_columns_of_the_reference_are_kept_and_name_the_markers(tmp_path, pancreas_ref, pancreas_query, caplog):
    from conftest import TINY

    from atlasengine import Atlas

    ref = pancreas_ref[:, :300].copy()
    ref.var["symbol"] = [f"sym-{g.lower()}" for g in ref.var_names]
    ref.var.loc[ref.var_names[5], "symbol"] = None  # a gene without a symbol keeps its atlas name
    ref.var["var_id"] = "clash"  # the store's own name: kept as user_var_id
    ref.var["length"] = np.arange(300)
    ref.var["gene"] = "a column named like the marker tables' own"  # kept as user_gene
    ref.var["mixed"] = [1, "a"] * 150  # of no one kind: left out, with a warning
    atlas = Atlas.create(tmp_path / "a.atlas", ref[ref.obs["celltype"] != "ductal"].copy(), batch_key="tech",
                         label_key="celltype", config={**TINY, "transfer": {"unknown_rule": "uncertainty"}})
    assert "mixed" in caplog.text
    var = atlas.var()
    assert list(var.index) == atlas.genes and list(var.columns) == ["symbol", "user_var_id", "length", "user_gene"]
    assert var["symbol"].iloc[0] == "sym-" + atlas.genes[0].lower() and var["length"].tolist() == list(range(300))
    out = atlas.to_anndata()  # the gene columns go out with the cells, for scanpy
    assert list(out.var_names) == atlas.genes and out.var["length"].tolist() == list(range(300))
    assert out.var["symbol"].astype(object).where(out.var["symbol"].notna(), None).tolist() == var["symbol"].tolist()
    out.write_h5ad(tmp_path / "out.h5ad")
    atlas.ingest(pancreas_query[:, :300].copy(), batch_key="tech", strategy="ewc", training={"max_epochs": 2})
    plain = atlas.unknown_groups(min_size=3)
    named = atlas.unknown_groups(min_size=3, gene_key="symbol")
    assert len(plain) and len(plain) == len(named)
    lookup = var["symbol"].where(var["symbol"].notna(), var.index.to_series()).to_dict()
    assert named["markers"].tolist() == [[lookup[g] for g in genes] for genes in plain["markers"]]
    assert {"symbol", "length"} <= set(named.attrs["markers"][0].columns)
    with pytest.raises(InputError, match="'nope' is not a gene column of this atlas"):
        atlas.unknown_groups(gene_key="nope")


def test_a_group_whose_guessed_type_was_renamed_is_given_the_new_name(pbmc_fold_in, tmp_path):
    path = tmp_path / "pbmc.atlas"
    shutil.copytree(pbmc_fold_in[0].path, path)
    atlas = Atlas.open(path)
    before = atlas.unknown_groups()
    guessed = before["closest_type"].iloc[0]
    atlas.relabel((atlas.obs()["label"] == guessed).to_numpy(), f"{guessed} (renamed)")  # every cell of it
    after = atlas.unknown_groups(version=2)
    # the same cells with the same neighbours: the type's new name, with the same share
    assert after["cells"].tolist() == before["cells"].tolist()
    assert after["closest_type"].iloc[0] == f"{guessed} (renamed)"
    assert after["closest_share"].tolist() == before["closest_share"].tolist()
    assert set(after["closest_type"]) <= set(atlas.labels)
    with pytest.raises(InputError, match="n_markers must be a whole number"):
        atlas.unknown_groups(n_markers=-1)
    with pytest.raises(InputError, match="min_size must be a whole number"):
        atlas.unknown_groups(min_size=2.5)


def test_a_labelled_querys_own_annotation_does_not_name_its_unknown_groups(tmp_path, pancreas):
    # the query comes annotated (all "mytype"): its Unknown cells' closest type is the reference's
    # type they sit beside, as in the fold-in's own vote, not their own label voting for itself
    ref = pancreas[(pancreas.obs["tech"] == "indrop") & (pancreas.obs["celltype"] != "ductal")].copy()
    query = pancreas[(pancreas.obs["tech"] == "celseq2") & pancreas.obs["celltype"].isin(["ductal", "alpha"])].copy()
    query.obs["celltype"] = "mytype"
    config = {"model": {"n_hidden": 16, "n_latent": 4}, "reference_training": {"max_epochs": 20},
              "query_training": {"max_epochs": 5}, "continual": {"fisher_max_cells": 100, "replay_max_cells": 100}}
    atlas = Atlas.create(tmp_path / "a.atlas", ref, batch_key="tech", label_key="celltype", config=config)
    res = atlas.ingest(query, batch_key="tech", label_key="celltype")
    assert res.predictions["is_unknown"].sum() >= 6
    groups = atlas.unknown_groups(min_size=3)
    assert len(groups) >= 1
    assert "mytype" not in set(groups["closest_type"])
    assert set(groups["closest_type"]) <= set(ref.obs["celltype"])
    for markers in groups.attrs["markers"].values():  # ranked against reference cells of that type
        assert len(markers) == 10
