"""File-system primitives shared by every writer and cache: atomic writes, file locks, directory publication,
writability probes and normal permissions.

- Atomic writes: a temporary file in the same folder, fsync, then ``os.replace`` over the target. A reader (or a
  resumed job) sees either the old file or the complete new one, never a truncated file; two processes writing
  the same cache entry both succeed (the last complete write wins).
- :func:`file_lock`: an exclusive ``fcntl.flock`` on a lock file beside the target, so that two processes doing
  the same first-time work (a GGUF conversion, a generated pool) do it once: the second waits, then finds the
  first one's result. The lock is released by the kernel when a process dies, so a crash never leaves it held.
- :func:`publish_dir`: move a finished temporary directory into place, tolerating a twin that another process
  finished first (a directory cannot be renamed over a non-empty one).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

__all__ = ["atomic_write", "atomic_write_text", "file_lock", "publish_dir", "nearest_existing", "probe_writable",
           "normal_dir_mode", "pid_alive"]

# Pseudo file systems: nothing written there is a file, and some accept writes with odd errors.
_VIRTUAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fh)`` on a temporary binary file beside ``path``, fsync it, then rename it over ``path``.

    Parent folders are created. The temporary file is removed if ``write`` fails or is interrupted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a cache or output file is as readable as any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating parent folders; returns the path."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


@contextlib.contextmanager
def file_lock(target: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock for ``target`` (a file or folder that may not exist yet) while the block runs.

    The lock file is ``.<name>.lock`` beside the target; it is left in place (deleting it would let a third
    process lock a different inode while the second still waits on the old one). Blocks until the lock is free.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process working on %s (lock %s)", target, lock)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. ENOLCK on some network file systems: the writers stay atomic regardless
            log.warning("cannot lock %s (%s); going on without the lock", lock, exc.strerror or exc)
        yield lock
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def publish_dir(tmp: str | os.PathLike, target: str | os.PathLike, *,
                is_complete: Callable[[Path], bool]) -> Path:
    """Rename the finished folder ``tmp`` to ``target``; if another process already published a complete
    ``target`` (``is_complete(target)``), keep theirs and delete ``tmp``. Returns ``target``."""
    tmp, target = Path(tmp), Path(target)
    os.chmod(tmp, normal_dir_mode())
    try:
        os.replace(tmp, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not is_complete(target):
            raise
        log.info("%s was completed by another process meanwhile; using it", target)
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` itself if it exists (not following a final symlink), else its closest existing ancestor."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def probe_writable(folder: str | os.PathLike, what: str) -> Path:
    """Check that ``folder`` (or, when it does not exist yet, the ancestor it would be created in) accepts files,
    by creating and removing one: ``os.access`` says yes to root even on read-only or virtual file systems.

    ``what`` names the path in the messages (e.g. "the output directory /x"). Returns the folder probed.
    Raises ``NotADirectoryError`` when an ancestor is a file and ``PermissionError`` when nothing can be
    created there.
    """
    folder = Path(os.path.abspath(Path(folder).expanduser()))
    anchor = nearest_existing(folder)
    if not anchor.is_dir():
        raise NotADirectoryError(f"cannot create {what}: {anchor} is a file, not a folder")
    real = anchor.resolve()
    if any(real == v or v in real.parents for v in _VIRTUAL_ROOTS):
        raise PermissionError(f"{what} is not writable: {real} is on a virtual file system ({real.parts[1]})")
    try:
        fd, probe = tempfile.mkstemp(dir=anchor, prefix=".calibprune-probe-")
    except OSError as exc:
        raise PermissionError(f"{what} is not writable: cannot create a file in {anchor} "
                              f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)
    return anchor


def _umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_dir_mode() -> int:
    """The mode a plain ``mkdir`` would give (``0o777`` minus the umask); ``mkdtemp`` gives 0700."""
    return 0o777 & ~_umask()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:
        return False
    return True
