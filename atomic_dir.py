"""Directories written all or nothing: checkpoints and artifacts share this helper.

`write_dir(path, fill)` builds the directory in a hidden sibling, then puts it at `path` in
one step, so `path` always holds the old directory or the new one, complete:

- a new `path` (or an empty directory) is a single `rename`;
- an existing `path` is swapped with the new one by `renameat2(RENAME_EXCHANGE)` (Linux,
  most local filesystems), one atomic step; where the kernel or filesystem refuses it, the
  old directory is first renamed aside to `.NAME.old-PID-ID`, then the new one renamed in.
  A crash between those two renames leaves no `path`: `recover(path)` (run by every save and
  load) renames the old directory back.

Temporaries are named `.NAME.partial-PID-ID` and `.NAME.old-PID-ID`. Those whose process is
gone are removed by the next `recover`, so a killed save leaves at most a temporary until the
next save or load of the same path. Ctrl-C during the write is held until `fill` returns
(libraries with writer threads, like orbax, break when interrupted mid-write), then raised as
one `KeyboardInterrupt` after the temporary is removed and before `path` changes; during the
swap it is held until the swap is done.

This module imports nothing of pallax: the model loaders, the runtime and the artifact
writer all use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pathlib
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable

_RENAME_EXCHANGE = 2
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[0-9a-f]+$")


def resolve(path: str | os.PathLike) -> pathlib.Path:
    """`path` made absolute with symlinks followed: saving through a link replaces the
    directory it points to and keeps the link."""
    return pathlib.Path(os.path.realpath(os.path.abspath(path)))


def write_dir(
    path: str | os.PathLike,
    fill: Callable[[pathlib.Path], None],
    *,
    check: Callable[[pathlib.Path], None] | None = None,
) -> pathlib.Path:
    """Run `fill(tmp)` on a fresh hidden directory beside `path`, then put it at `path`.

    `check(path)` runs first (after recovering earlier crashed writes) and raises if `path`
    must not be replaced. Returns the resolved path written.
    """
    path = resolve(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"cannot write {str(path)!r}: {str(path.parent)!r} is not a directory"
        )
    recover(path)
    if check is not None:
        check(path)
    partial = _temp(path, "partial")
    partial.mkdir()
    try:
        with deferred_interrupt() as interrupted:
            fill(partial)
            _fsync_tree(partial)
            if interrupted:
                raise KeyboardInterrupt(f"writing {str(path)!r} was interrupted; it is unchanged")
            _commit(partial, path)
    finally:
        _remove(partial)
    if interrupted:
        raise KeyboardInterrupt(f"interrupted after {str(path)!r} was written (it is complete)")
    return path


def recover(path: str | os.PathLike) -> None:
    """Finish or undo what a crashed `write_dir` of `path` left: put the old directory back
    when `path` is missing, and remove the temporaries of processes that are gone."""
    path = resolve(path)
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return
    stale = []
    for s in siblings:
        m = _TEMP.match(s.name)
        if m and m["name"] == path.name and not _alive(int(m["pid"])):
            stale.append((m["kind"], s))
    if not os.path.lexists(path):
        old = [s for kind, s in stale if kind == "old"]
        if old:
            os.rename(old[0], path)
            stale = [(k, s) for k, s in stale if s != old[0]]
    for _, s in stale:
        shutil.rmtree(s, ignore_errors=True)


def _remove(d: pathlib.Path) -> None:
    """Remove a temporary; a failed writer's threads (orbax's) may still be finishing
    files in it, so try again briefly."""
    for _ in range(20):
        shutil.rmtree(d, ignore_errors=True)
        if not os.path.lexists(d):
            return
        time.sleep(0.1)


def _temp(path: pathlib.Path, kind: str) -> pathlib.Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _commit(new: pathlib.Path, path: pathlib.Path) -> None:
    """Put the complete directory `new` at `path`; the old one is removed after."""
    if not os.path.lexists(path) or (path.is_dir() and not any(path.iterdir())):
        os.replace(new, path)  # rename(2) replaces an empty directory atomically
    elif exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old directory
    else:
        old = _temp(path, "old")
        os.rename(path, old)
        os.rename(new, path)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


def exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, f"cannot swap {str(a)!r} and {str(b)!r}: {os.strerror(err)}")


def _fsync_tree(root: pathlib.Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(pathlib.Path(dirpath))


def _fsync_dir(d: pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def deferred_interrupt():
    """Hold SIGINT for the block; yields a list that is non-empty once one arrived, for the
    caller to act on at a safe point. Only the main thread receives signals; elsewhere the
    list stays empty."""
    hits: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield hits
        return
    previous = signal.signal(signal.SIGINT, lambda *_: hits.append(True))
    try:
        yield hits
    finally:
        signal.signal(signal.SIGINT, previous)
