"""Writers and readers at the same time: one writer commits, a second is refused, readers never wait or fail."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ingest_in_subprocess

from atlasengine import Atlas, AtlasLockedError
from atlasengine.cli.main import main
from atlasengine.store.cells import CellStore
from atlasengine.store.lock import LOCK_NAME

POLL = """
import json, sys, traceback
from pathlib import Path
from atlasengine import Atlas
path, stop = Path(sys.argv[1]), Path(sys.argv[2])
polls, errors, seen = 0, [], set()
while True:
    last = stop.exists()
    try:
        atlas = Atlas.open(path)
        drift = atlas.drift()
        versions = atlas.sql("select version, strategy from versions order by version")
        cells = atlas.drift(by="cell")
        expected = list(range(1, atlas.version + 1))
        assert sorted(set(drift["version"])) == versions["version"].tolist() == expected, (drift, versions)
        assert sorted(set(cells["version"])) == expected
        seen.add(atlas.version)
    except Exception:
        errors.append(traceback.format_exc())
    polls += 1
    if polls == 1:
        print("polling", flush=True)
    if last:
        break
print(json.dumps({"polls": polls, "errors": errors, "versions": sorted(seen)}), flush=True)
"""


def _query(pancreas_query, tech: str):
    return pancreas_query[pancreas_query.obs["tech"] == tech].copy()


def _wait_for_lock(path: Path, writer: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while (Atlas.lock_holder(path) or {}).get("pid") != writer.pid:
        assert writer.poll() is None and time.time() < deadline, writer.communicate()[1][-2000:]
        time.sleep(0.2)


def _start_training_writer(path: Path, seconds: int) -> subprocess.Popen:
    """Start an ingest in another process; return once it holds the lock and has written its cells (it trains)."""
    cells = CellStore(str(path / "cells"))
    written = cells.high_water()
    writer = ingest_in_subprocess(path, f"training:sleep{seconds}", wait=False)
    _wait_for_lock(path, writer)
    deadline = time.time() + 120
    while cells.high_water() == written:
        assert writer.poll() is None and time.time() < deadline, writer.communicate()[1][-2000:]
        time.sleep(0.2)
    return writer


def test_two_writers_one_proceeds_other_gets_clear_error_readers_see_committed(atlas_path, pancreas_query):
    writer = ingest_in_subprocess(atlas_path, "training:sleep8", wait=False)
    _wait_for_lock(atlas_path, writer)
    with pytest.raises(AtlasLockedError, match=f"atlas is locked by pid {writer.pid} on .* since "):
        Atlas.open(atlas_path).ingest(_query(pancreas_query, "celseq2"), batch_key="tech", strategy="surgery")
    reader = Atlas.open(atlas_path)  # a reader during the ingest sees the last committed version
    assert reader.version == 1 and len(reader.obs()) == 300 and reader.latent().shape[0] == 300
    out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err[-2000:]
    assert Atlas.open(atlas_path).version == 2
    assert reader.version == 1 and len(reader.obs()) == 300  # an open reader keeps its snapshot


def test_a_reader_polling_drift_and_sql_through_a_whole_ingest_never_fails_or_blocks(
        atlas_path, pancreas_query, tmp_path, monkeypatch):
    stop = tmp_path / "stop"
    poller = subprocess.Popen([sys.executable, "-c", POLL, str(atlas_path), str(stop)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert poller.stdout.readline().strip() == "polling", poller.communicate()[1][-2000:]
        monkeypatch.setenv("ATLASENGINE_FAULT", "before_manifest:sleep1")  # a commit that takes its time
        res = Atlas.open(atlas_path).ingest(_query(pancreas_query, "smartseq2"), batch_key="tech", strategy="ewc",
                                            training={"max_epochs": 2})
        assert res.version.number == 2
        time.sleep(1.0)  # the reader sees the new version too
    finally:
        stop.touch()
        out, err = poller.communicate(timeout=120)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["errors"] == [], report["errors"][0]
    assert report["versions"] == [1, 2] and report["polls"] >= 5, report


def test_unlock_force_beside_a_live_writer_is_refused_and_no_version_is_lost(atlas_path, pancreas_query, capsys):
    writer = _start_training_writer(atlas_path, 6)
    assert main(["unlock", str(atlas_path), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"held by pid {writer.pid}" in err and "not broken" in err
    with pytest.raises(AtlasLockedError):
        Atlas.open(atlas_path).ingest(_query(pancreas_query, "celseq2"), batch_key="tech", strategy="surgery")
    out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err[-2000:]
    atlas = Atlas.open(atlas_path)
    assert [v.number for v in atlas.versions] == [1, 2] and atlas.versions[-1].datasets == ["reference", "dataset_v2"]
    assert (atlas.obs()["batch"].iloc[300:] == "smartseq2").all()


def test_a_writer_whose_lock_file_was_deleted_commits_nothing_and_loses_nothing(atlas_path, pancreas_query):
    writer = _start_training_writer(atlas_path, 10)
    (atlas_path / LOCK_NAME).unlink()  # what the old `unlock --force` did beside a live writer
    celseq2 = _query(pancreas_query, "celseq2")
    second = Atlas.open(atlas_path).ingest(celseq2, batch_key="tech", strategy="surgery", training={"max_epochs": 1})
    assert second.version.number == 2
    z2 = Atlas.open(atlas_path).latent()
    out, err = writer.communicate(timeout=300)
    assert writer.returncode != 0 and "committed" not in out
    assert "AtlasConflictError" in err and "nothing of this write was committed and nothing was removed" in err
    atlas = Atlas.open(atlas_path)  # every file of version 2 checked against its checksum
    assert [v.number for v in atlas.versions] == [1, 2]
    np.testing.assert_array_equal(atlas.latent(), z2)
    assert atlas.obs().index[300:].equals(celseq2.obs_names)
    assert set(atlas.drift()["version"]) == {1, 2}
