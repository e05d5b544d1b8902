"""One writer at a time, held by the kernel: a clear message for a second writer, nothing held by a dead one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import snapshot

from atlasengine import Atlas, AtlasLockedError
from atlasengine.cli.main import main
from atlasengine.store.lock import LOCK_NAME, WriteLock

HOLD_AND_DIE = """
import os, sys, time
from pathlib import Path
from atlasengine.store.lock import WriteLock
lock = WriteLock(Path(sys.argv[1])).__enter__()
child = os.fork()  # as a DDP rank or a data loader worker is started: it outlives the writer here
if child == 0:
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), 9)
"""

HOLD_WITH_GARBAGE = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".write.lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0); os.write(fd, b"\\xff\\xfe{not json")
print("held", flush=True)
time.sleep(60)
"""


def test_second_writer_gets_clear_error_and_nothing_changes(atlas_path, pancreas_query):
    with WriteLock(atlas_path):  # this process plays the first writer
        before = snapshot(atlas_path)
        with pytest.raises(AtlasLockedError, match=rf"atlas is locked by pid {os.getpid()} on .* since "):
            Atlas.open(atlas_path).ingest(pancreas_query, batch_key="tech", strategy="surgery")
        assert snapshot(atlas_path) == before
        assert Atlas.open(atlas_path).version == 1  # readers are never blocked
        assert Atlas.lock_holder(atlas_path)["pid"] == os.getpid()
        with pytest.raises(AtlasLockedError, match="a live process: it is not broken"):
            Atlas.break_lock(atlas_path)
    assert Atlas.lock_holder(atlas_path) is None


def test_a_killed_writer_holds_nothing_and_the_next_writer_just_runs(atlas_path, pancreas_query):
    dead = subprocess.Popen([sys.executable, "-c", HOLD_AND_DIE, str(atlas_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    child = int(dead.stdout.readline() or 0)
    try:
        assert dead.wait(timeout=120) == -9 and child, dead.stderr.read()[-2000:]
        assert f'"pid": {dead.pid}' in (atlas_path / LOCK_NAME).read_text()  # its details are still in the file
        os.kill(child, 0)  # its forked child still runs, with a copy of the writer's descriptors
        assert Atlas.lock_holder(atlas_path) is None  # but the kernel released the lock: the child closed its copy
        assert Atlas.break_lock(atlas_path) is False
        q = pancreas_query[pancreas_query.obs["tech"] == "smartseq2"].copy()
        res = Atlas.open(atlas_path).ingest(q, batch_key="tech", strategy="surgery", training={"max_epochs": 1})
        assert res.version.number == 2
    finally:
        if child:
            os.kill(child, 9)


def test_a_malformed_lock_file_is_only_a_missing_name(atlas_path, pancreas_query, capsys):
    (atlas_path / LOCK_NAME).write_bytes(b"\x00\xff garbage {")
    assert Atlas.lock_holder(atlas_path) is None
    assert main(["unlock", str(atlas_path)]) == 0
    assert "not locked" in capsys.readouterr().out
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WITH_GARBAGE, str(atlas_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert Atlas.lock_holder(atlas_path) == {"pid": None, "host": None, "since": None, "task": None}
        with pytest.raises(AtlasLockedError, match="another process \\(its lock file does not say which\\)"):
            Atlas.open(atlas_path).ingest(pancreas_query, batch_key="tech", strategy="surgery")
        assert main(["unlock", str(atlas_path), "--force"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not broken" in err and "Traceback" not in err
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_file_deleted_by_hand_stops_its_holder_from_committing(atlas_path):
    with WriteLock(atlas_path) as lock:
        lock.check_held()
        (atlas_path / LOCK_NAME).unlink()
        with pytest.raises(AtlasLockedError, match="removed or replaced while this process held it"):
            lock.check_held()
        with WriteLock(atlas_path) as second:  # a second writer can now lock a new file ...
            second.check_held()
            with pytest.raises(AtlasLockedError):  # ... and the first one still cannot commit
                lock.check_held()


def test_asking_about_the_lock_of_something_that_is_no_atlas_says_so(tmp_path):
    from atlasengine.errors import AtlasFormatError, InputError

    with pytest.raises(AtlasFormatError, match="does not exist"):
        Atlas.lock_holder(tmp_path / "typo.atlas")
    (tmp_path / "folder").mkdir()
    with pytest.raises(AtlasFormatError, match="is not an atlas: it has no manifest.json"):
        Atlas.break_lock(tmp_path / "folder")
    with pytest.raises(InputError, match="is a URL"):
        Atlas.lock_holder("s3://bucket/pancreas.atlas")


def test_a_lock_whose_details_cannot_be_written_is_released(atlas_path, monkeypatch):
    # disk full while writing the holder's details: the lock must not stay held for the process's life
    import errno

    from atlasengine.errors import AtlasWriteError
    from atlasengine.store import lock as L

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(L.os, "pwrite", full)
    with pytest.raises(AtlasWriteError, match="cannot write the holder's details"):
        WriteLock(atlas_path).__enter__()
    monkeypatch.undo()
    assert Atlas.lock_holder(atlas_path) is None
    with WriteLock(atlas_path):  # the next writer in this process, and in any other, takes it
        pass


def test_an_atlas_is_not_created_at_a_url(pancreas_ref, tmp_path, monkeypatch):
    from atlasengine.errors import InputError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="is a URL: an atlas is written in a folder on a file system"):
        Atlas.create("s3://bucket/pancreas.atlas", pancreas_ref, batch_key="tech", label_key="celltype")
    assert list(tmp_path.iterdir()) == []  # not a local folder named s3:
