"""Atomic outputs: every file or folder is written under a hidden temporary name beside its
destination and renamed into place only when complete, so the destination is always the old
output or the whole new one, whatever interrupts the write (Ctrl-C, SIGTERM, SIGKILL, a full
disk).

Temporary names carry the host and the process id (`.NAME.HOST-PID.XXXXXXXX.tmp`): what a
killed process leaves behind (no handler runs on SIGKILL or the out-of-memory killer) is
removed by the next write of the same destination on that host, never what a running process
is writing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from ..errors import OutputError, Terminated

__all__ = [
    "atomic_dir",
    "atomic_path",
    "exchange",
    "new_file_mode",
    "output_errors",
    "remove_stale",
    "temp_prefix",
    "writing",
]

_HOST = socket.gethostname().replace("/", "_")
_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths in one step


@contextlib.contextmanager
def writing() -> Iterator[None]:
    """SIGTERM raises Terminated inside (temporary outputs are then removed on the way out);
    outside, it keeps its default and ends the process at once, even inside a library call
    that never returns (a damaged HDF5 file can loop libhdf5), where no handler would run."""
    if threading.current_thread() is not threading.main_thread():  # signals: main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def atomic_path(dst: Path, copy_of: Path | None = None) -> Iterator[Path]:
    """A temporary file beside `dst` (a copy of `copy_of`) that replaces `dst` only on success."""
    with writing():
        yield from _atomic_path(dst, copy_of)


def _atomic_path(dst: Path, copy_of: Path | None) -> Iterator[Path]:
    remove_stale(dst)
    try:
        fd, name = tempfile.mkstemp(dir=dst.parent, prefix=temp_prefix(dst), suffix=".tmp")
    except OSError as e:
        raise OutputError(f"{dst}: cannot write in {dst.parent} ({e.strerror})") from e
    os.close(fd)
    tmp = Path(name)
    try:
        with output_errors(dst):
            mode = _mode_for(dst)
            if copy_of is not None:
                shutil.copyfile(copy_of, tmp)
            yield tmp
            tmp.chmod(mode)
            _fsync(tmp)
            tmp.replace(dst)  # os.replace: atomic on POSIX and Windows
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the rename's durability; not every filesystem allows it
        _fsync(dst.parent)


@contextlib.contextmanager
def atomic_dir(dst: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary folder beside `dst`, removed on the way out (the caller renames or exchanges
    it into place when complete); made with the permissions of a new folder."""
    remove_stale(dst)
    with output_errors(dst):
        tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=temp_prefix(dst), suffix=suffix))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it owner-only
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def output_errors(dst: Path) -> Iterator[None]:
    """The operating system's refusals while writing `dst` (a full disk, a file too large, no
    permission) as one OutputError; safetensors reports them as its own error."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"{dst}: cannot write ({e})") from e
    except SafetensorError as e:
        if "I/O error" not in str(e):
            raise
        raise OutputError(f"{dst}: cannot write ({e})") from e


def exchange(new: Path, dst: Path) -> None:
    """Put the folder `new` at `dst` in one step; an existing `dst` ends up at `new`'s path (for
    the caller to delete). Linux swaps the two (renameat2); elsewhere `dst` is moved aside
    first, and moved back if the second rename is interrupted."""
    if not dst.exists():
        new.rename(dst)
        return
    if _renameat2(new, dst):
        return
    with atomic_dir(dst, suffix=".old") as aside:
        dst.rename(aside / dst.name)
        try:
            new.rename(dst)
        except BaseException:
            (aside / dst.name).rename(dst)
            raise
        (aside / dst.name).rename(new)


def _renameat2(a: Path, b: Path) -> bool:
    libc = _libc()
    if libc is None:
        return False
    at_fdcwd = -100
    rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this kernel or filesystem cannot
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    return libc if hasattr(libc, "renameat2") else None  # glibc 2.28 or newer


def temp_prefix(dst: Path) -> str:
    """The start of the name of every temporary file or folder of `dst` (remove_stale)."""
    return f".{dst.name}.{_HOST}-{os.getpid()}."


def remove_stale(dst: Path) -> None:
    """Remove the temporary files and folders of `dst` left by dead processes of this host."""
    stem = f".{dst.name}.{_HOST}-"
    for p in dst.parent.glob(glob.escape(stem) + "*"):
        pid = p.name[len(stem) :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if os.name != "posix":  # no safe liveness test: keep everything
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _mode_for(dst: Path) -> int:
    """The permissions `dst` has, or those a new file gets."""
    return dst.stat().st_mode & 0o7777 if dst.exists() else new_file_mode()


def new_file_mode() -> int:
    """The permissions a new file gets (mkstemp's and safetensors' are owner-only)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
