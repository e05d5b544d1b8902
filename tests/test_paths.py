"""Atlas paths: characters URIs give a meaning to, relative paths, ~ and links: refused at once with the reason, or working."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from conftest import TINY

from atlasengine import Atlas, InputError


def _small(adata, n=150):
    return adata[np.sort(np.random.default_rng(0).permutation(adata.n_obs)[:n])].copy()


@pytest.mark.parametrize("char", ["?", "#"])
def test_uri_characters_are_refused_before_anything_is_written(tmp_path, reference_atlas, pancreas_ref, char):
    message = f"contains {re.escape(repr(char))}: the cell store \\(TileDB\\) reads these as parts of a URI"
    with pytest.raises(InputError, match=message):
        Atlas.create(tmp_path / f"lab{char}1.atlas", _small(pancreas_ref), batch_key="tech", label_key="celltype",
                     config=TINY)
    assert list(tmp_path.iterdir()) == []
    moved = tmp_path / f"moved{char}.atlas"
    shutil.copytree(reference_atlas, moved)
    with pytest.raises(InputError, match=message):
        Atlas.open(moved)


def test_a_backslash_in_the_path_works_end_to_end(tmp_path, pancreas_ref, pancreas_query):
    path = tmp_path / "lab\\2024.atlas"
    atlas = Atlas.create(path, _small(pancreas_ref), batch_key="tech", label_key="celltype",
                         config={**TINY, "reference_training": {"max_epochs": 2}})
    q = pancreas_query[pancreas_query.obs["tech"] == "smartseq2"].copy()
    atlas.ingest(q, batch_key="tech", strategy="surgery", training={"max_epochs": 1})
    reopened = Atlas.open(path)
    assert reopened.version == 2 and len(reopened.obs()) == 250 and reopened.counts().shape == (250, 2000)
    assert sorted(set(reopened.drift()["version"])) == [1, 2]
    assert reopened.sql("select count(*) as n from versions")["n"].item() == 2


def test_a_relative_path_keeps_naming_the_same_atlas_after_a_change_of_directory(tmp_path, reference_atlas,
                                                                                  pancreas_query, monkeypatch):
    shutil.copytree(reference_atlas, tmp_path / "lab" / "a.atlas")
    monkeypatch.chdir(tmp_path / "lab")
    atlas = Atlas.open("a.atlas")
    monkeypatch.chdir(tmp_path)  # e.g. a notebook that changes directory
    q = pancreas_query[pancreas_query.obs["tech"] == "smartseq2"].copy()
    assert atlas.ingest(q, batch_key="tech", strategy="surgery", training={"max_epochs": 1}).version.number == 2
    assert Atlas.open(tmp_path / "lab" / "a.atlas").version == 2 and not (tmp_path / "a.atlas").exists()
    monkeypatch.setenv("HOME", str(tmp_path / "lab"))
    assert Atlas.open("~/a.atlas").version == 2  # ~ is the home folder, not a folder named "~"


def test_a_create_on_a_link_is_refused_before_training(tmp_path, pancreas_ref):
    (tmp_path / "real").mkdir()
    (tmp_path / "link.atlas").symlink_to(tmp_path / "real")
    with pytest.raises(InputError, match="is a link"):
        Atlas.create(tmp_path / "link.atlas", _small(pancreas_ref), batch_key="tech", label_key="celltype",
                     config=TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.atlas", "real"] and not any((tmp_path / "real").iterdir())
    with pytest.raises(InputError, match="must end in the name of the new folder"):
        Atlas.create(tmp_path / "real" / "..", _small(pancreas_ref), batch_key="tech", label_key="celltype",
                     config=TINY)


def test_a_path_through_a_link_names_what_the_system_names(tmp_path, reference_atlas):
    (tmp_path / "real" / "sub").mkdir(parents=True)
    shutil.copytree(reference_atlas, tmp_path / "real" / "a.atlas")
    (tmp_path / "lnk").symlink_to(tmp_path / "real" / "sub")
    assert Atlas.open(tmp_path / "lnk" / ".." / "a.atlas").version == 1  # lnk/.. is real/, not tmp_path
