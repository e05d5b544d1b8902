"""One writer at a time, with a clear message; stale locks are detected and can be broken."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from atlasengine import Atlas, AtlasLockedError
from atlasengine.store.lock import LOCK_NAME, WriteLock


def test_second_writer_gets_clear_error_and_nothing_changes(atlas_path, pancreas_query):
    from conftest import snapshot

    with WriteLock(atlas_path):  # this process plays the first writer
        before = snapshot(atlas_path)
        with pytest.raises(AtlasLockedError, match=r"atlas is locked by pid \d+ on .* since "):
            Atlas.open(atlas_path).ingest(pancreas_query, batch_key="tech", strategy="surgery")
        assert snapshot(atlas_path) == before
        # readers are never blocked
        assert Atlas.open(atlas_path).version == 1
        holder = Atlas.lock_holder(atlas_path)
        assert holder["stale"] is False
        with pytest.raises(AtlasLockedError, match="not stale"):
            Atlas.break_lock(atlas_path)
    assert Atlas.lock_holder(atlas_path) is None


def test_stale_lock_of_dead_process_is_detected_and_broken(atlas_path, pancreas_query):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (atlas_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "2026-01-01T00:00:00"}))
    with pytest.raises(AtlasLockedError, match="no longer running.*break_lock"):
        Atlas.open(atlas_path).ingest(pancreas_query, batch_key="tech", strategy="surgery")
    assert Atlas.lock_holder(atlas_path)["stale"] is True
    assert Atlas.break_lock(atlas_path) is True
    assert Atlas.open(atlas_path).ingest(pancreas_query, batch_key="tech", strategy="surgery").version.number == 2
