"""Unknown groups: the cells a version could not explain, clustered, with their closest type and marker genes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from atlasengine import InputError
from atlasengine.transfer.groups import cluster, log_normalise, rank_markers


def test_clusters_are_found_and_numbered_by_size():
    rng = np.random.default_rng(0)
    z = np.vstack([rng.normal(0, 0.1, (30, 3)), rng.normal(5, 0.1, (12, 3)), [[20, 20, 20]]])
    groups = cluster(z, 5)
    assert (groups[:30] == 0).all() and (groups[30:42] == 1).all() and groups[42] == -1
    assert (cluster(z[:3], 5) == -1).all()


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
