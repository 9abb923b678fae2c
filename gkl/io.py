"""Atomic file writes: every file gkl writes goes through here.

A temporary file is created *beside* the target (same directory, so the same filesystem whatever
``$TMPDIR`` says), written, flushed and fsynced, then renamed over the target; the directory is
fsynced so the rename survives a crash. A writer killed half-way leaves the old file (or none)
and no temporary file behind on a clean exception.

- Modes: the file gets the permissions the umask allows (0644 under umask 022), like ``open``;
  not ``mkstemp``'s 0600.
- A full disk (``ENOSPC``/``EDQUOT``) is an ``OSError`` that says "no space left on device" and
  names the target; the temporary file is removed (also when ``torch.save`` hides the error in
  a ``RuntimeError``).
- Leftovers: a writer holds an ``flock`` on its temporary file; a ``.<name>.*.gkl-tmp`` in the
  directory that nobody holds (its writer was killed) and that is older than
  :data:`STALE_AFTER_S` is deleted when the directory is next written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".gkl-tmp"
# A temporary file younger than this is never removed as stale (covers the instant between its
# creation and its writer's flock).
STALE_AFTER_S = 10.0
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceError(OSError):
    """The disk (or quota) is full: says so and names the file that could not be written."""


def current_umask() -> int:
    """The process umask (read from /proc where possible, else set and restored)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temp_files_in(directory: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.*.gkl-tmp`` files directly in ``directory`` whose writer is gone
    (nobody holds their flock) and that are older than :data:`STALE_AFTER_S`."""
    removed = []
    now = time.time()
    for path in Path(directory).glob(f".*{TEMP_SUFFIX}"):
        try:
            if now - path.lstat().st_mtime < STALE_AFTER_S or not path.is_file():
                continue
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live writer holds it
            os.close(fd)
            continue
        try:
            path.unlink(missing_ok=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _no_space(target: Path, error: OSError) -> NoSpaceError:
    return NoSpaceError(
        error.errno,
        f"no space left on device while writing {target} ({os.strerror(error.errno)}); "
        f"nothing was written there (the previous version, if any, is intact). Free space on "
        f"the filesystem of {target.parent} or write elsewhere",
        str(target),
    )


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it atomically replaces ``path``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent
        )
    except OSError as error:
        raise _unwritable(target, error) from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # "alive": see remove_stale_temp_files_in
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(tmp_name, target)  # before the flock is released
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if error.errno in NO_SPACE:
            raise _no_space(target, error) from error
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)
    remove_stale_temp_files_in(target.parent)


def _unwritable(target: Path, error: OSError) -> OSError:
    """A clear error for a target that cannot even be created (read-only, no space, ...)."""
    if error.errno in NO_SPACE:
        return _no_space(target, error)
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionError(
            error.errno,
            f"cannot write {target}: {target.parent} is not writable ({os.strerror(error.errno)}); "
            "make it writable or choose another output directory",
            str(target),
        )
    return error


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, record: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(record, indent=indent) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through a temporary file beside ``path``."""
    import torch

    with atomic_open(path, "wb") as handle:
        recording = _RecordingWriter(handle)
        try:
            torch.save(obj, recording)
        except RuntimeError:
            if recording.error is not None:  # torch reports a failed write as "unexpected pos"
                raise recording.error from None
            raise
    return Path(path)


class _RecordingWriter:
    """A binary file wrapper that remembers the ``OSError`` a ``write`` raised."""

    def __init__(self, handle: IO) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        try:
            self.handle.flush()
        except OSError as error:
            self.error = error
            raise


def atomic_write_with(path: str | os.PathLike, write: Callable[[IO], None]) -> Path:
    """Call ``write(handle)`` on a binary temporary file, then move it onto ``path``."""
    with atomic_open(path, "wb") as handle:
        write(handle)
    return Path(path)
