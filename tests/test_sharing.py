"""An atlas shared by a group: files get the umask's permissions, another user reads, a read-only writer is told why."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from atlasengine import Atlas, ReadOnlyError

NOBODY = 65534


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@contextmanager
def acting_as(uid: int):
    """Run the block with another effective user (file access is checked against it); root only."""
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def shared_atlas(reference_atlas, pancreas_query):
    """A copy of the reference in a folder anyone may enter, with version 2 written under umask 002."""
    folder = Path(tempfile.mkdtemp(dir="/tmp", prefix="atlas-shared-"))
    folder.chmod(0o755)
    path = folder / "lab.atlas"
    shutil.copytree(reference_atlas, path)
    q = pancreas_query[pancreas_query.obs["tech"] == "smartseq2"].copy()
    with umask(0o002):
        Atlas.open(path).ingest(q, batch_key="tech", strategy="surgery", training={"max_epochs": 1})
    yield path
    shutil.rmtree(folder)


def test_version_files_get_the_permissions_the_umask_gives(shared_atlas):
    modes = {p.relative_to(shared_atlas).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in (shared_atlas / "versions" / "v0002").rglob("*")}
    assert modes["versions/v0002/model.safetensors"] == 0o664  # safetensors itself writes 0600
    assert all(mode == (0o775 if (shared_atlas / rel).is_dir() else 0o664) for rel, mode in modes.items()), modes


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_another_user_reads_the_atlas_and_a_write_without_permission_says_why(shared_atlas, pancreas_query):
    mine = Atlas.open(shared_atlas)
    with acting_as(NOBODY):
        theirs = Atlas.open(shared_atlas)  # every file of version 2 read and checked
        np.testing.assert_array_equal(theirs.latent(), mine.latent())
        assert theirs.obs().equals(mine.obs()) and theirs.model() is not None
        q = pancreas_query[pancreas_query.obs["tech"] == "celseq2"].copy()
        with pytest.raises(ReadOnlyError, match=f"cannot take the write lock {shared_atlas}/.write.lock: "
                                                "Permission denied; this user cannot write"):
            theirs.ingest(q, batch_key="tech", strategy="surgery")


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_an_older_format_atlas_opened_by_a_user_who_cannot_write_says_it_needs_an_upgrade():
    folder = Path(tempfile.mkdtemp(dir="/tmp", prefix="atlas-old-"))
    try:
        folder.chmod(0o755)
        path = folder / "old.atlas"
        shutil.copytree(Path(__file__).parent / "fixtures" / "format7.atlas", path)
        before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
        with acting_as(NOBODY):
            with pytest.raises(ReadOnlyError, match=rf"atlas {path} is in format 7; this atlasengine writes format "
                                                    r"\d+: it is upgraded in place once, by a user who can write"):
                Atlas.open(path)
        assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
        assert Atlas.open(path).version == 2  # its owner's open upgrades it
    finally:
        shutil.rmtree(folder)
