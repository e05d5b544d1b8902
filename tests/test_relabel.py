"""Naming cells: ``relabel`` commits a version that changes labels only, and the next query learns the name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY, read_data, snapshot

from atlasengine import Atlas, AtlasConflictError, InputError, ReadOnlyError
from atlasengine.cli.main import main
from atlasengine.faults import InjectedFault
from atlasengine.store.labels import LABELS


@pytest.fixture
def two(two_version_atlas, tmp_path):
    """A private copy of the pancreas atlas at version 2 (version 2's cells came without labels)."""
    dst = tmp_path / "two.atlas"
    shutil.copytree(two_version_atlas, dst)
    return dst


def _new_cells(atlas: Atlas, n: int) -> list[str]:
    obs = atlas.obs()
    return obs.index[obs["version_added"] == 2][:n].tolist()


def test_relabel_changes_labels_only_and_earlier_versions_keep_theirs(two, tmp_path):
    atlas = Atlas.open(two)
    before_obs, z, ck = atlas.obs(), atlas.latent(), atlas.fisher()
    cells = [*_new_cells(atlas, 12), *before_obs.index[before_obs["label"] == "acinar"][:3]]
    info = atlas.relabel(cells + cells[:2], "ductal_new", note="KRT19+ group")  # repeated names count once
    assert (info.number, info.strategy, info.parent, info.n_new_cells) == (3, "relabel", 2, 0)
    assert info.relabel.model_dump() == {"label": "ductal_new", "n_cells": 15, "from_labels": {"acinar": 3},
                                         "from_unlabelled": 12, "note": "KRT19+ group"}
    assert "ductal_new" in atlas.labels and atlas.version == 3
    for reopened in (atlas, Atlas.open(two)):  # in memory, and read back from disk (every file checked)
        obs = reopened.obs()
        assert (obs.loc[cells, "label"] == "ductal_new").all()
        rest = obs.index.difference(cells)
        pd.testing.assert_series_equal(obs.loc[rest, "label"], before_obs.loc[rest, "label"])
        np.testing.assert_array_equal(reopened.latent(), z)  # no retraining: same embeddings
        for name, value in ck.items():
            assert torch.equal(reopened.fisher()[name], value)
        labelled = obs["label"].notna().to_numpy()
        index = reopened.neighbor_index()
        assert index.n == labelled.sum()  # the relabelled query cells joined the label-transfer index
        assert "ductal_new" in index.categories and reopened.novelty_calibration().predicted is not None
        assert reopened.to_anndata(cells=cells[:3]).obs["label"].tolist() == ["ductal_new"] * 3
        table = reopened.sql("select label, count(*) as n from cells where label = 'ductal_new' group by label")
        assert table["n"].tolist() == [15]
    v2, v3 = (two / "versions" / "v0002", two / "versions" / "v0003")
    assert (v3 / "model.safetensors").read_bytes() == (v2 / "model.safetensors").read_bytes()
    assert (v3 / "latent.npy").read_bytes() == (v2 / "latent.npy").read_bytes()
    assert (v3 / LABELS).exists() and not (v2 / LABELS).exists()
    old = Atlas.open(two, version=2)
    pd.testing.assert_series_equal(old.obs()["label"], before_obs["label"])
    assert "ductal_new" not in old.labels and "ductal_new" not in old.neighbor_index().categories

    # the drift tables: version 3 says no cell moved, and drift(), sql() and the report read it
    drift = atlas.drift()
    v3rows = drift[drift["version"] == 3].set_index("scope")
    assert (v3rows.loc["vs_previous", ["displacement_mean_raw", "displacement_mean_aligned"]] == 0).all()
    assert set(atlas.drift(by="cell").query("version == 3")["displacement_aligned_vs_previous"]) == {0.0}
    assert "ductal_new" in set(atlas.drift(by="cell_type").query("version == 3")["cell_type"])
    extra = json.loads(atlas.sql("select extra from versions where version = 3")["extra"].iloc[0])
    assert extra["relabel"]["label"] == "ductal_new" and extra["relabel"]["n_cells"] == 15
    report = atlas.report(tmp_path / "audit.html").read_text(encoding="utf-8")
    assert "relabel" in report and "ductal_new" in report

    # a second relabel carries the first one's overrides; a cell renamed again takes the newest name
    by_batch = atlas.obs().sort_values("batch", ascending=False)  # a mask keeps its cells, not their row order
    mask = pd.Series(by_batch.index.isin(cells[:2]), index=by_batch.index)
    info4 = atlas.relabel(mask, "ductal")
    assert info4.relabel.from_labels == {"ductal_new": 2} and info4.relabel.from_unlabelled == 0
    obs4 = Atlas.open(two).obs()
    assert obs4.loc[cells[:2], "label"].eq("ductal").all() and obs4.loc[cells[2:], "label"].eq("ductal_new").all()
    assert Atlas.open(two, version=3).obs().loc[cells, "label"].eq("ductal_new").all()
    with pytest.raises(InputError, match="version 4 relabelled cells and added none"):
        atlas.unknown_groups(version=4)


@pytest.mark.parametrize(("cells", "label", "message"), [
    (["no-such-cell", "nor-this"], "x", r"2 cell name\(s\) not in the atlas at version 2: 'no-such-cell', 'nor-this'"),
    ([True, False], "x", "the cell mask has 2 entries for the 500 cells of version 2"),
    ([], "x", "the selection holds no cell"),
    ("one_cell", "x", "not one text"),
    ([0, 1], "x", "positions are not accepted"),
    (None, "Unknown", "cannot be 'Unknown'"),
    (None, " UNKNOWN", r"cannot be 'Unknown' \(' UNKNOWN' reads as it\)"),
    (pd.Series([True, False] * 250), "x", "a boolean Series selects cells by its index"),
    (None, "", "is empty or reads as a missing value"),
    (None, "nan", "is empty or reads as a missing value"),
    (None, 3, "must be a text, got int"),
    (None, "a" * 1001, "longer than 1000 characters"),
])
def test_bad_relabels_are_refused_by_name_and_write_nothing(two, cells, label, message):
    atlas = Atlas.open(two)
    cells = _new_cells(atlas, 3) if cells is None else cells
    before = snapshot(two)
    with pytest.raises(InputError, match=message):
        atlas.relabel(cells, label)
    assert snapshot(two) == before and atlas.version == 2


def test_an_all_false_mask_an_earlier_version_and_a_stale_atlas_are_refused(two):
    before = snapshot(two)
    atlas = Atlas.open(two)
    with pytest.raises(InputError, match="the selection holds no cell"):
        atlas.relabel(np.zeros(atlas.n_cells, dtype=bool), "x")
    with pytest.raises(InputError, match="missing value"):
        atlas.relabel(pd.Series([None] * atlas.n_cells, dtype="boolean"), "x")
    with pytest.raises(ReadOnlyError, match="version 1 read-only"):
        Atlas.open(two, version=1).relabel(_new_cells(atlas, 2), "x")
    assert snapshot(two) == before
    stale = Atlas.open(two)
    atlas.relabel(_new_cells(atlas, 2), "first")
    after_first = snapshot(two)
    with pytest.raises(AtlasConflictError, match="another writer committed version 3 after version 2"):
        stale.relabel(_new_cells(atlas, 3), "second")
    assert snapshot(two) == after_first


def test_a_relabel_that_fails_before_its_commit_leaves_the_previous_version(two, monkeypatch):
    before = snapshot(two)
    atlas = Atlas.open(two)
    monkeypatch.setenv("ATLASENGINE_FAULT", "before_manifest:raise")
    with pytest.raises(InjectedFault):
        atlas.relabel(_new_cells(atlas, 4), "x")
    monkeypatch.delenv("ATLASENGINE_FAULT")
    reopened = Atlas.open(two)
    assert reopened.version == 2 and (two / "manifest.json").read_bytes() == before["manifest.json"]
    assert reopened.relabel(_new_cells(reopened, 4), "x").number == 3  # the leftover is removed, the retry commits


def test_cli_relabel_reads_names_from_a_file(two, tmp_path, capsys):
    names = _new_cells(Atlas.open(two), 5)
    listing = tmp_path / "cells.txt"
    listing.write_text("\n".join(names) + "\n\n")  # blank lines are ignored
    assert main(["relabel", str(two), "--cells", str(listing), "--label", "ductal_new", "--note", "KRT19+"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == "version 3 (relabel): 5 cells labelled 'ductal_new' (before: 5 unlabelled)"
    assert Atlas.open(two).obs().loc[names, "label"].eq("ductal_new").all()
    assert main(["versions", str(two)]) == 0 and "5 cells named 'ductal_new' (KRT19+)" in capsys.readouterr().out
    before = snapshot(two)
    assert main(["relabel", str(two), "--cells", str(tmp_path / "missing.txt"), "--label", "x"]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    listing.write_text("not-a-cell\n")
    assert main(["relabel", str(two), "--cells", str(listing), "--label", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not in the atlas at version 3: 'not-a-cell'" in err
    assert snapshot(two) == before


def test_after_naming_the_unknown_ductal_cells_the_next_query_labels_its_ductal_cells_so(tmp_path):
    """Pancreas: a reference without ductal cells; celseq's ductal cells are called Unknown and named; smartseq2 follows."""
    data = read_data("pancreas_panc8_small.h5ad")
    tech, truth = data.obs["tech"].astype(str), data.obs["celltype"].astype(str)
    ref = data[(tech.isin(["fluidigmc1", "indrop", "celseq2"]) & (truth != "ductal")).to_numpy()].copy()
    first, second = data[(tech == "celseq").to_numpy()].copy(), data[(tech == "smartseq2").to_numpy()].copy()
    path = tmp_path / "pancreas.atlas"
    # the paper's rule: at these tiny settings the novelty rule calls few of celseq's ductal cells
    atlas = Atlas.create(path, ref, batch_key="tech", label_key="celltype",
                         config={**TINY, "transfer": {"unknown_rule": "uncertainty"}})
    res = atlas.ingest(first, batch_key="tech", strategy="ewc", dataset="celseq")
    pred = res.predictions
    called = (pred["is_unknown"].astype(bool) | pred["is_novel"].astype(bool)).to_numpy()
    ductal = (truth.reindex(pred.index) == "ductal").to_numpy()
    assert called[ductal].mean() >= 0.8  # the type the reference lacks is called Unknown
    groups = atlas.unknown_groups()
    assert any(truth.loc[c].eq("ductal").mean() >= 0.5 for c in groups["cells"]), groups
    named = pred.index[called & ductal]
    info = atlas.relabel(named, "ductal", note="called Unknown in celseq; KRT19+")
    assert info.relabel.n_cells == len(named) and info.relabel.from_unlabelled == len(named)
    assert all(not set(c) & set(named) for c in atlas.unknown_groups()["cells"])  # named cells leave the groups
    nxt = atlas.ingest(second, batch_key="tech", strategy="ewc", dataset="smartseq2").predictions
    second_ductal = (truth.reindex(nxt.index) == "ductal").to_numpy()
    share = float((nxt["predicted_label"][second_ductal] == "ductal").mean())
    print(f"smartseq2 ductal cells predicted 'ductal': {share:.0%} of {int(second_ductal.sum())}")
    assert share >= 0.6, nxt["predicted_label"][second_ductal].value_counts()
    assert (nxt["predicted_label"][~second_ductal] == "ductal").mean() < 0.2
    assert Atlas.open(path, version=3).obs().loc[named, "label"].eq("ductal").all()  # the ingest kept the name
    assert Atlas.open(path).obs().loc[named, "label"].eq("ductal").all()


def test_the_report_after_a_relabel_shows_the_query_as_it_came(two, tmp_path):
    """Version 2's cells came without labels: naming some of them is not the query's own annotation."""
    atlas = Atlas.open(two)
    obs = atlas.obs()
    atlas.relabel(obs["is_unknown"].fillna(False).to_numpy(dtype=bool), "ductal_new")  # what the query left Unknown
    html = Path(atlas.report(tmp_path / "report.html")).read_text()
    assert "This version folded in no query (it relabelled cells of earlier versions)" in html
    assert "the reference has no transfer" not in html
    assert "ductal_new (" not in html  # the groups' "annotated by the query as" column stays empty
    assert "by the query&#x27;s annotation" not in html and "by the query's annotation" not in html


def test_a_damaged_label_file_is_caught_by_its_checksum(two):
    from atlasengine import AtlasIntegrityError

    atlas = Atlas.open(two)
    atlas.relabel(_new_cells(atlas, 3), "x")
    path = two / "versions" / "v0003" / LABELS
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(AtlasIntegrityError, match="versions/v0003/labels.parquet of version 3 does not match"):
        Atlas.open(two)
    assert Atlas.open(two, version=2).obs()["label"].notna().sum() == 300  # the versions before it read as they were


def test_the_readmes_naming_example_runs_as_written_at_the_defaults(tmp_path):
    """README, Use: the ductal example with the engine's defaults, the first group named as it is."""
    adata = read_data("pancreas_panc8_small.h5ad")
    ref = adata[adata.obs.tech.isin(["fluidigmc1", "indrop", "celseq2"]) & (adata.obs.celltype != "ductal")].copy()
    atlas = Atlas.create(tmp_path / "named.atlas", ref, batch_key="tech", label_key="celltype",
                         runtime={"progress": False})
    atlas.ingest(adata[adata.obs.tech == "celseq"].copy(), batch_key="tech", runtime={"progress": False})
    groups = atlas.unknown_groups()
    truth = adata.obs["celltype"].astype(str)
    assert len(groups) >= 1, "no group: the README's groups['cells'][0] would fail"
    assert truth.loc[groups["cells"][0]].eq("ductal").mean() >= 0.8, groups[["n_cells", "closest_type"]]
    atlas.relabel(groups["cells"][0], "ductal", note="KRT18, ANXA4 up")
    nxt = atlas.ingest(adata[adata.obs.tech == "smartseq2"].copy(), batch_key="tech", runtime={"progress": False})
    ductal = truth.reindex(nxt.predictions.index).eq("ductal").to_numpy()
    share = float(nxt.predictions["predicted_label"][ductal].eq("ductal").mean())
    ductal_in_group = int(truth.loc[groups["cells"][0]].eq("ductal").sum())
    print(f"README example: first group {groups['n_cells'].iloc[0]} cells, {ductal_in_group} ductal; "
          f"smartseq2 ductal named: {share:.0%}")
    assert share >= 0.6


def test_a_relabel_does_not_copy_an_embedding_damaged_after_the_atlas_was_opened(two):
    from atlasengine import AtlasIntegrityError

    atlas = Atlas.open(two)  # every file checked here
    cells = _new_cells(atlas, 3)
    manifest = (two / "manifest.json").read_bytes()
    path = two / "versions" / "v0002" / "latent.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one value of the embedding, the size unchanged
    path.write_bytes(bytes(data))
    with pytest.raises(AtlasIntegrityError, match="versions/v0002/latent.npy of version 2 does not match its checksum"):
        atlas.relabel(cells, "x")
    assert (two / "manifest.json").read_bytes() == manifest and not (two / "versions" / "v0003").exists()
