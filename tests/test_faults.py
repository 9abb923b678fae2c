"""Faults a run survives: signals, a full disk, a read-only directory, leftovers, file modes, a
resume that points at other data or another teacher (issue 20). ``FAULTS`` counts the faults
tried here (tests/test_security.py counts the malicious files)."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import gkl.io
from gkl.config import CONFIG_DIR
from gkl.io import (
    STALE_AFTER_S,
    TEMP_SUFFIX,
    NoSpaceError,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    atomic_write_with,
)
from gkl.models import create_model
from gkl.run_dir import RunDirectoryError, check_directory_writable
from gkl.tasks.checkpointing import INTERRUPTED_CHECKPOINT
from gkl.train import run

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(CONFIG_DIR).parent
# 120 training images in batches of 20: 6 steps an epoch, 2 epochs (tests/test_reliability.py).
TINY = [
    "data.train_subset=120",
    "data.val_size=40",
    "data.test_size=40",
    "data.batch_size=20",
    "trainer.max_epochs=2",
    "logger=none",
    "~callbacks.lr_monitor",
    "~callbacks.model_checkpoint",
]
CLI = ["~callbacks.progress_bar"]  # compose_cfg drops it for in-process runs
SYNTHETIC = [*TINY, "data.synthetic=true"]


@pytest.fixture(scope="module")
def compose_run(compose_cfg):
    return lambda run_dir, overrides: compose_cfg(run_dir.parent, overrides, output_dir=run_dir)


def paths(root: Path, run_dir: Path) -> list[str]:
    return [f"paths.root_dir={root}", f"hydra.run.dir={run_dir}"]


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / "last.ckpt"
    return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]


def assert_equal_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- signals

# train.py with a signal sent to itself after training step K: deterministic, no sleeps.
SELF_KILL = """
import os, runpy, signal, sys
from gkl.tasks.checkpointing import ResumeStateCallback
step, signum = int(sys.argv[1]), getattr(signal, sys.argv[2])
def on_train_batch_end(self, trainer, *args):
    if trainer.global_step == step:
        os.kill(os.getpid(), signum)
ResumeStateCallback.on_train_batch_end = on_train_batch_end
sys.argv = ["train.py", *sys.argv[3:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def reference(compose_run, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The uninterrupted tiny real run's final weights."""
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    run(compose_run(run_dir, TINY))
    return last_weights(run_dir)


@pytest.mark.needs_fmnist
def test_sigterm_writes_a_checkpoint_exits_143_and_resumes_exactly(
    compose_run, reference, tmp_path
):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", SELF_KILL, "3", "SIGTERM", *TINY, *CLI, *paths(tmp_path, run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 128 + signal.SIGTERM == 143, proc.stderr[-3000:]
    interrupted = run_dir / "checkpoints" / INTERRUPTED_CHECKPOINT
    assert f"resume with ckpt_path={interrupted}" in proc.stderr
    assert torch.load(interrupted, weights_only=True)["global_step"] == 3  # mid-epoch 1
    assert not (run_dir / "metrics.smoke.json").exists()  # not reported as finished
    run(compose_run(run_dir, [*TINY, f"ckpt_path={interrupted}"]))
    assert_equal_weights(last_weights(run_dir), reference)


@pytest.mark.needs_fmnist
def test_sigint_on_an_epochs_last_batch_stops_at_its_end_exits_130_and_resumes_exactly(
    compose_run, reference, tmp_path, monkeypatch
):
    from gkl.tasks.checkpointing import ResumeStateCallback

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 6:  # epoch 1's last batch: the save waits for its end
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ResumeStateCallback, "on_train_batch_end", on_train_batch_end)
    run_dir = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        run(compose_run(run_dir, TINY))
    assert stopped.value.code == 128 + signal.SIGINT == 130
    assert signal.getsignal(signal.SIGINT) is handler  # the run's handler was removed
    interrupted = run_dir / "checkpoints" / INTERRUPTED_CHECKPOINT
    state = torch.load(interrupted, weights_only=True)
    assert state["global_step"] == 6 and state["epoch"] == 0
    monkeypatch.undo()
    run(compose_run(run_dir, [*TINY, f"ckpt_path={interrupted}"]))
    assert_equal_weights(last_weights(run_dir), reference)


def test_a_second_sigint_stops_at_once(tmp_path):
    from gkl.tasks.checkpointing import InterruptCheckpoint

    callback = InterruptCheckpoint(tmp_path)
    callback._handle(signal.SIGINT, None)  # the first: finish the step, then save
    assert callback.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        callback._handle(signal.SIGINT, None)


# ----------------------------------------------------------------------------- full disk


def _dev_full(monkeypatch) -> None:
    """gkl.io's temporary files are /dev/full (every write: ENOSPC, as on a full disk)."""
    real = tempfile.mkstemp

    def mkstemp(prefix, suffix, dir):
        fd, name = real(prefix=prefix, suffix=suffix, dir=dir)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(gkl.io.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(gkl.io.os, "fchmod", lambda fd, mode: None)  # never chmod /dev/full


WRITERS = {
    "json": lambda p: atomic_write_json(p, {"a": 1}),
    "text": lambda p: atomic_write_text(p, "x" * 100),
    "torch_save_small": lambda p: atomic_torch_save({"w": torch.zeros(3)}, p),
    "torch_save_large": lambda p: atomic_torch_save({"w": torch.zeros(1_000_000)}, p),
    "with": lambda p: atomic_write_with(p, lambda f: f.write(b"\0" * 10_000)),
}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("existing", [False, True])
def test_full_disk_says_so_names_the_file_and_leaves_nothing_partial(
    tmp_path, monkeypatch, writer, existing
):
    target = tmp_path / "out" / "file.bin"
    if existing:
        target.parent.mkdir()
        target.write_bytes(b"old")
    _dev_full(monkeypatch)
    with pytest.raises(NoSpaceError, match=f"no space left on device while writing {target}"):
        WRITERS[writer](target)
    assert (target.read_bytes() == b"old") if existing else not target.exists()
    assert not list(tmp_path.rglob(f"*{TEMP_SUFFIX}"))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_during_training_names_the_checkpoint(compose_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _dev_full(monkeypatch)  # config.yaml is the run's first gkl.io write
    with pytest.raises(OSError, match=r"no space left on device while writing .*config\.yaml"):
        run(compose_run(run_dir, SYNTHETIC))
    monkeypatch.undo()
    calls = {"n": 0}
    real_save = torch.save

    class FullAfter:  # the disk fills up 1000 bytes into the first checkpoint
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.handle.write(data)

        def flush(self):
            self.handle.flush()

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        f.handle = FullAfter(f.handle)  # f: gkl.io's recording wrapper of the temporary file
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(NoSpaceError, match=rf"no space left on device while writing {tmp_path}"):
        run(compose_run(tmp_path / "run2", SYNTHETIC))
    assert calls["n"] == 1
    assert not list(tmp_path.rglob(f"*{TEMP_SUFFIX}"))
    assert not list((tmp_path / "run2").rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("code", "error", "message"),
    [
        (errno.ENOSPC, NoSpaceError, "no space left on device while writing"),  # no inode left
        (errno.EACCES, PermissionError, "cannot write"),
    ],
)
def test_a_temporary_file_that_cannot_be_created_is_named(
    tmp_path, monkeypatch, code, error, message
):
    def refuse(**kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(gkl.io.tempfile, "mkstemp", refuse)
    target = tmp_path / "metrics.json"
    with pytest.raises(error, match=f"{message} {target}"):
        atomic_write_json(target, {})


# ----------------------------------------------------------------------------- read-only


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can write: chmod 0555, or (as root, who ignores modes) a read-only
    tmpfs mount."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)])
    if mounted.returncode != 0:
        pytest.skip("root without mount: no way to make a read-only directory")
    yield path
    subprocess.run(["umount", str(path)], check=False)


@pytest.mark.parametrize("sub", ["", "new/run"])
def test_read_only_run_directory_is_named(read_only_dir, sub):
    target = read_only_dir / sub if sub else read_only_dir
    with pytest.raises(RunDirectoryError, match=f"run directory {target} is not writable"):
        check_directory_writable(target, "run directory")
    with pytest.raises(PermissionError, match=f"cannot write {target / 'x.json'}"):
        atomic_write_json(target / "x.json", {})


def test_export_weights_into_a_read_only_directory_fails_before_training(read_only_dir):
    from gkl.train import check_writable

    with pytest.raises(ValueError, match=f"export_weights={read_only_dir}/m.pth: .* not writable"):
        check_writable(read_only_dir / "m.pth", "export_weights")


def test_train_py_in_a_read_only_directory_names_it(read_only_dir):
    result = subprocess.run(
        [sys.executable, "train.py", *SYNTHETIC, *CLI, *paths(read_only_dir.parent, read_only_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1
    assert f"Error: run directory {read_only_dir} is not writable" in result.stderr
    assert "Unable to configure handler" not in result.stderr


# ----------------------------------------------------------------------------- leftovers, modes


def _leftover(directory: Path, name: str, age: float) -> Path:
    path = directory / f".{name}.abc123{TEMP_SUFFIX}"
    path.write_bytes(b"half a file")
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_leftover_temp_files_are_cleaned_when_the_directory_is_next_written(tmp_path):
    import fcntl

    dead = _leftover(tmp_path, "model.pth", STALE_AFTER_S + 60)  # a killed export_weights
    young = _leftover(tmp_path, "other.json", 0)  # may be a writer that has not locked yet
    alive = _leftover(tmp_path, "busy.ckpt", STALE_AFTER_S + 60)
    holder = os.open(alive, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a live writer (another process) holds its lock
    try:
        elsewhere = tmp_path / "sub"
        elsewhere.mkdir()
        other = _leftover(elsewhere, "x", STALE_AFTER_S + 60)
        atomic_write_text(tmp_path / "unrelated.txt", "hello")
        assert not dead.exists()
        assert young.exists() and alive.exists() and other.exists()
    finally:
        os.close(holder)


def test_files_get_the_mode_the_umask_allows(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {})
        atomic_torch_save({}, tmp_path / "b.pt")
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.pt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600


def test_run_directory_files_are_0644_under_umask_022(compose_run, tmp_path):
    """``ls -l`` of a run directory: every regular file -rw-r--r--."""
    previous = os.umask(0o022)
    try:
        run_dir = tmp_path / "run"
        run(compose_run(run_dir, [*SYNTHETIC, "trainer.max_epochs=1", "logger=csv"]))
    finally:
        os.umask(previous)
    listing = subprocess.run(
        ["ls", "-lAR", str(run_dir)], capture_output=True, text=True, check=True
    ).stdout
    files = [line for line in listing.splitlines() if line.startswith("-")]
    assert len(files) >= 4, listing  # config.yaml, metrics, checkpoints, CSV log, lock
    assert all(line.startswith("-rw-r--r--") for line in files), listing
    names = {p.name for p in run_dir.rglob("*") if p.is_file()}
    assert {"config.yaml", "last.ckpt", "metrics.smoke.json"} <= names


def test_compile_cache_goes_into_the_run_directory(compose_run, tmp_path, monkeypatch):
    import gkl.train

    monkeypatch.setattr(gkl.train, "_USER_INDUCTOR_CACHE", None)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    run_dir = tmp_path / "run"
    run(compose_run(run_dir, [*SYNTHETIC, "trainer.max_epochs=0", "test=false"]))
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str((run_dir / ".torchinductor").resolve())


# ----------------------------------------------------------------------------- resume elsewhere


def _teacher(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save({"model": create_model("fmnist_cnn_small", 10).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def kd_run(compose_run, tmp_path_factory):
    """A finished synthetic KD run whose checkpoint stores the data and teacher fingerprints."""
    root = tmp_path_factory.mktemp("kd")
    data = root / "data"
    data.mkdir()
    (data / "train.bin").write_bytes(b"\1" * 100)
    teacher = _teacher(root / "teacher.pth", 0)
    overrides = [
        *SYNTHETIC,
        "trainer.max_epochs=1",
        "test=false",
        "+experiment=fmnist_kd",
        "teacher.name=fmnist_cnn_small",
        f"teacher.checkpoint={teacher}",
        f"data.data_dir={data}",
    ]
    run(compose_run(root / "run", overrides))
    return root, overrides, root / "run" / "checkpoints" / "last.ckpt"


def _with(overrides: list[str], **changes: str) -> list[str]:
    keys = {k.replace("__", "."): v for k, v in changes.items()}
    kept = [o for o in overrides if o.split("=")[0] not in keys]
    return [*kept, *(f"{k}={v}" for k, v in keys.items())]


@pytest.mark.parametrize(
    "change",
    ["data_other_content", "data_missing", "teacher_other_weights", "teacher_missing_file"],
)
def test_resume_with_other_data_or_teacher_is_refused_naming_key_old_and_new(
    compose_run, kd_run, tmp_path, change
):
    root, overrides, ckpt = kd_run
    if change.startswith("data"):
        key, old = "data.data_dir", root / "data"
        new = tmp_path / "data2"
        if change == "data_other_content":
            new.mkdir()
            (new / "train.bin").write_bytes(b"\2" * 100)
    else:
        key, old = "teacher.checkpoint", root / "teacher.pth"
        new = tmp_path / "teacher2.pth"
        if change == "teacher_other_weights":
            _teacher(new, 1)
    cfg = compose_run(
        tmp_path / "resumed",
        [*_with(overrides, **{key.replace(".", "__"): str(new)}), f"ckpt_path={ckpt}"],
    )
    if change == "teacher_missing_file":  # the missing teacher fails later anyway; check first
        from omegaconf import OmegaConf

        from gkl.tasks.checkpointing import check_resume_fingerprints, load_checkpoint

        with pytest.raises(ValueError, match=rf"{key} changed from '{old}' to '{new}'"):
            check_resume_fingerprints(
                load_checkpoint(ckpt), OmegaConf.to_container(cfg, resolve=True), ckpt
            )
        return
    with pytest.raises(ValueError, match=rf"{key} changed from '{old}' to '{new}'"):
        run(cfg)


def test_resume_with_moved_but_identical_data_and_teacher_is_accepted(
    compose_run, kd_run, tmp_path
):
    import shutil

    root, overrides, ckpt = kd_run
    shutil.copytree(root / "data", tmp_path / "moved_data")
    shutil.copy(root / "teacher.pth", tmp_path / "moved_teacher.pth")
    moved = _with(
        overrides,
        data__data_dir=str(tmp_path / "moved_data"),
        teacher__checkpoint=str(tmp_path / "moved_teacher.pth"),
    )
    run(compose_run(tmp_path / "resumed", [*moved, f"ckpt_path={ckpt}"]))
    assert (tmp_path / "resumed" / "checkpoints" / "last.ckpt").is_file()


def test_fault_count():
    """Faults tried in this file (parametrisations counted); the campaign's total is in the
    report (docs/reliability.md)."""
    assert FAULTS >= 20


FAULTS = (
    3  # SIGTERM mid-epoch, SIGINT at an epoch's last batch, a second SIGINT
    + len(WRITERS) * 2  # full disk: 5 writers x (new file, existing file)
    + 2  # full disk during training: config.yaml, the first checkpoint
    + 2  # a temporary file that cannot be created: no space (inodes), no permission
    + 4  # read-only: existing dir, a new dir under it, export_weights, train.py
    + 3  # leftovers: dead, young, locked by a live writer
    + 3  # modes: umask 022, umask 077, a whole run directory
    + 1  # compile cache
    + 5  # resume: other data, missing data, other teacher, missing teacher, moved copies
)
