"""One writer at a time: a write lock held by the kernel (``flock``) on ``<root>/.write.lock``.

The kernel releases the lock when its holder ends, however it ends (an exception, SIGKILL, an
out-of-memory kill, a machine that reboots): a dead writer holds nothing, so the next writer,
or the retry of a killed one, just proceeds. The lock file itself is never removed. Its holder
writes its pid, host and start time into it, for the message a second writer gets; that text
is only informative, the lock is the kernel's.

Breaking a lock is refused while its holder lives: the kernel will not take it away, and a
second writer working beside the first is how committed versions got lost. If the lock file is
deleted by hand anyway, the holder notices before its commit (:meth:`WriteLock.check_held`) and
commits nothing.

On NFS, Linux turns ``flock`` into an NFS byte-range lock: it holds across machines when the
server's lock manager runs (NFSv4, or NFSv3 with ``lockd``); a mount with ``nolock`` makes it
local to each machine. A client that loses contact with the server for longer than its lease
loses the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from atlasengine.errors import AtlasFormatError, AtlasLockedError, AtlasWriteError, ReadOnlyError

_HELD: set[int] = set()
"""Descriptors of the locks this process holds (closed in forked children: see ``_forget_in_child``)."""


def _forget_in_child() -> None:
    """Close the held locks' descriptors in a forked child (DDP ranks, data loader workers).

    ``flock`` belongs to the open file, which ``fork`` shares: a child that kept the descriptor
    would keep the lock after its parent died (an out-of-memory kill of the writer alone), and
    the next writer would be told a dead process holds it. Closing the child's copy leaves the
    parent's lock as it is.
    """
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)

LOCK_NAME = ".write.lock"
GRACE_SECONDS = 1.0
"""How long a writer retries: :func:`lock_holder` takes a shared lock for an instant to look."""
_INFO_BYTES = 4096


def _read_info(fd: int) -> dict:
    """Return the holder's pid, host and start time as written in the lock file (None where unreadable)."""
    try:
        info = json.loads(os.pread(fd, _INFO_BYTES, 0).decode("utf-8"))
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        info = {}
    return {key: info.get(key) if isinstance(info.get(key), (str, int)) else None
            for key in ("pid", "host", "since", "task")}


def _describe(info: dict) -> str:
    if info.get("pid") is None:
        return "another process (its lock file does not say which)"
    return f"pid {info['pid']} on {info.get('host')} since {info.get('since')}"


def lock_holder(root: Path) -> dict | None:
    """Return who holds the write lock (``pid``, ``host``, ``since``, ``task``), or None when nobody does.

    A lock file left by a process that has ended holds nothing: the answer is then None.
    """
    path = Path(root) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AtlasFormatError(f"cannot read the write lock {path}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_info(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ReadOnlyError(
                f"cannot take the write lock {path}: {exc.strerror}; this user cannot write to the atlas "
                f"directory {path.parent}"
            ) from exc
        if exc.errno == errno.ENOENT:
            raise AtlasFormatError(f"{path.parent} does not exist") from exc
        raise AtlasFormatError(f"cannot take the write lock {path}: {exc.strerror}") from exc


def _try_exclusive(fd: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


class WriteLock:
    """Context manager that holds the atlas write lock or raises ``AtlasLockedError`` naming the holder.

    Example
    -------
    >>> root = getfixture("tmp_path")
    >>> with WriteLock(root):
    ...     lock_holder(root)["pid"] == os.getpid()
    True
    >>> lock_holder(root) is None
    True
    """

    def __init__(self, root: Path, task: str = "an ingest") -> None:
        self.path = Path(root) / LOCK_NAME
        self.task = task
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None

    def __enter__(self) -> "WriteLock":
        """Take the lock (retrying for ``GRACE_SECONDS``) and write pid, host and time into its file."""
        fd = _open_lock_file(self.path)
        if not _try_exclusive(fd, GRACE_SECONDS):
            holder = _read_info(fd)
            os.close(fd)
            raise AtlasLockedError(
                f"atlas is locked by {_describe(holder)}: {holder.get('task') or 'another writer'} is running. "
                "The kernel releases "
                "the lock when that process ends (a killed one holds nothing); try again then."
            )
        stat = os.fstat(fd)
        self._fd, self._identity = fd, (stat.st_dev, stat.st_ino)
        _HELD.add(fd)
        try:
            self.check_held()  # the file was not deleted between opening and locking it
        except AtlasLockedError:
            self.__exit__()
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now(timezone.utc).isoformat(),
                "task": self.task}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        except OSError as exc:  # disk full, quota: release the lock rather than hold it for the process's life
            self.__exit__()
            raise AtlasWriteError(f"cannot write the holder's details into the write lock {self.path}: {exc}; nothing "
                                  "was changed") from exc
        return self

    def check_held(self) -> None:
        """Raise ``AtlasLockedError`` unless the lock file at the atlas is still the one this process locked.

        Someone may have deleted the lock file by hand: a second writer then locks a new one,
        and this writer must not commit beside it.
        """
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            stat = None
        if self._fd is None or stat is None or (stat.st_dev, stat.st_ino) != self._identity:
            raise AtlasLockedError(
                f"the write lock {self.path} was removed or replaced while this process held it: another writer "
                "may be at work, so nothing was committed; run the ingest again"
            )

    def __exit__(self, *exc: object) -> None:
        """Release the lock (the kernel would on exit too) and clear the holder's details."""
        if self._fd is None:
            return
        if self._fd not in _HELD:  # a forked child's copy: the lock is its parent's, and closed here already
            self._fd = None
            return
        _HELD.discard(self._fd)
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def break_lock(root: Path) -> bool:
    """Refuse to break a lock a live process holds; return False when nothing holds it.

    With a kernel-held lock there is nothing to break after a crash: the dead writer's lock
    went with it. A live holder is never overridden (its commit and a second writer's could
    both report success while one of them is lost); stop that process instead.
    """
    holder = lock_holder(root)
    if holder is None:
        return False
    raise AtlasLockedError(
        f"the write lock of {Path(root)} is held by {_describe(holder)}, a live process: it is not broken, "
        "since that writer would go on and could overwrite what a second writer commits. Let it finish, or stop "
        "it (its lock ends with it)."
    )
