"""One writer at a time: an exclusive lock file naming its holder (pid, host, since)."""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from atlasengine.errors import AtlasLockedError

LOCK_NAME = ".write.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder(root: Path) -> dict | None:
    """Return the lock's content (pid, host, since, stale) or None when unlocked."""
    path = root / LOCK_NAME
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        info = {"pid": -1, "host": "?", "since": "?"}
    info["stale"] = info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1)))
    return info


class WriteLock:
    """Context manager that holds the atlas write lock or raises ``AtlasLockedError``."""

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_NAME

    def __enter__(self) -> "WriteLock":
        """Create the lock file (pid, host, since) or raise ``AtlasLockedError`` naming the holder."""
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now(timezone.utc).isoformat()}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock_holder(self.path.parent) or {}
            hint = (
                " The holder is no longer running: break the stale lock with "
                "Atlas.break_lock(path) (CLI: atlasengine unlock PATH)."
                if holder.get("stale")
                else ""
            )
            raise AtlasLockedError(
                f"atlas is locked by pid {holder.get('pid')} on {holder.get('host')} "
                f"since {holder.get('since')}.{hint}"
            ) from None
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
            fh.flush()
            os.fsync(fh.fileno())
        return self

    def __exit__(self, *exc) -> None:
        """Release the lock (remove the lock file, if it is still there)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def break_lock(root: Path, force: bool = False) -> bool:
    """Remove a stale lock (holder dead); with ``force`` remove any lock. Returns whether removed."""
    holder = lock_holder(root)
    if holder is None:
        return False
    if not (holder["stale"] or force):
        raise AtlasLockedError(
            f"the lock of pid {holder.get('pid')} on {holder.get('host')} is not stale; "
            "pass force=True only if you are sure that process is gone"
        )
    (root / LOCK_NAME).unlink(missing_ok=True)
    return True
