"""One run per directory: a lock held for the run's lifetime and a refusal to mix runs.

The lock is an ``fcntl.flock`` on ``<run dir>/.gkl-run.lock``: the kernel releases it when the
process ends, even after ``kill -9``, so a crashed run never leaves a stale lock. While it holds
the lock, a run removes temporary files that a killed writer left (``gkl.io``'s
``.<name>.*.gkl-tmp``).
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path
from typing import IO, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from gkl.io import TEMP_SUFFIX

LOCK_FILE = ".gkl-run.lock"
# Files a run writes into its directory; their presence means another run used it.
RUN_MARKERS = ("config.yaml", "metrics.json", "metrics.smoke.json", "checkpoints")


class RunDirectoryError(RuntimeError):
    """The run directory is in use or holds another run."""


class RunLock:
    """Exclusive lock on a run directory (``with RunLock(dir): ...`` or acquire/release)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._handle: IO | None = None

    def acquire(self) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown process"
            handle.close()
            raise RunDirectoryError(
                f"run directory {self.directory} is in use by another run ({owner}; lock file "
                f"{self.path}). Wait for it to finish, or start this run elsewhere with "
                "hydra.run.dir=<new directory>."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def previous_run_files(directory: Path) -> list[str]:
    """Names of :data:`RUN_MARKERS` present in ``directory``."""
    return [name for name in RUN_MARKERS if (directory / name).exists()]


def check_run_directory(directory: Path, ckpt_path: str | os.PathLike | None) -> None:
    """Refuse a directory that already holds another run, unless ``ckpt_path`` resumes it."""
    found = previous_run_files(directory)
    if not found:
        return
    if ckpt_path is not None:
        resolved = Path(ckpt_path).expanduser().resolve()
        if resolved.is_relative_to(directory.resolve()):
            return  # resuming the run that lives here
    hint = (
        f"resume it with ckpt_path={directory / 'checkpoints' / 'last.ckpt'}"
        if (directory / "checkpoints").is_dir()
        else "delete it"
    )
    raise RunDirectoryError(
        f"run directory {directory} already holds another run ({', '.join(found)}): "
        f"{hint}, or start this run elsewhere with hydra.run.dir=<new directory>."
    )


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete ``gkl.io`` temporary files under ``directory`` (call only while holding the lock:
    no writer of this run directory is alive then)."""
    stale = [p for p in directory.rglob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def check_directory_writable(directory: str | os.PathLike, what: str) -> None:
    """Create ``directory`` (and parents) and a probe file in it; a read-only filesystem, missing
    permission or a full disk is a :class:`RunDirectoryError` naming the directory."""
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise RunDirectoryError(
            f"{what} {path} is not writable ({reason}); make it "
            f"writable, or write elsewhere with hydra.run.dir=<dir> (or paths.log_dir=<dir>)"
        ) from None


class WritableRunDirectory(Callback):
    """Hydra callback (conf/hydra/default.yaml): a run or sweep directory that cannot be written
    is refused with its name before Hydra sets up its log file there (Hydra's own error is
    ``Unable to configure handler 'file'``). Hydra turns a callback's exceptions into warnings,
    so the refusal is a ``SystemExit`` with the message (exit status 1)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "run directory")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "sweep directory")

    @staticmethod
    def _check(directory: str, what: str) -> None:
        try:
            check_directory_writable(directory, what)
        except RunDirectoryError as error:
            raise SystemExit(f"Error: {error}") from None
