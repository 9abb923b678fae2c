"""Runs that never lose, mix or corrupt work, and files that cannot run code (issue 13).

Fault injection (resume from every kind of checkpoint, kill -9 while writing, DDP, generated-data
mixing), malicious files and bad inputs, on tiny Fashion-MNIST subsets and tiny models.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from gkl.data import CIFARDataModule, MixedBatchSampler, read_cifar, read_idx
from gkl.io import TEMP_SUFFIX
from gkl.models import create_model
from gkl.run_dir import LOCK_FILE, RunDirectoryError, RunLock, remove_stale_temp_files
from gkl.tasks import RNGStateCallback
from gkl.tasks.checkpointing import SafeCheckpointIO, config_changes
from gkl.train import CONFIG_DIR, SMOKE_METRICS_FILE, run

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(CONFIG_DIR).parent
# A tiny run: 120 training images in batches of 20 -> 6 steps an epoch, 2 epochs.
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
# Keep every step's checkpoint (s1.ckpt ... s12.ckpt) so that one run provides them all.
EVERY_STEP = [
    "callbacks.mid_epoch_checkpoint.every_n_train_steps=1",
    "callbacks.mid_epoch_checkpoint.save_top_k=-1",
    "callbacks.mid_epoch_checkpoint.filename='s{step}'",
    "+callbacks.mid_epoch_checkpoint.auto_insert_metric_name=false",
]


@pytest.fixture(scope="session")
def compose_run(compose_cfg):
    """``compose_run(run_dir, overrides)``: conf/train.yaml writing into ``run_dir``."""
    return lambda run_dir, overrides: compose_cfg(run_dir.parent, overrides, output_dir=run_dir)


# Feature distillers with state beyond the student: VID's regressors and trained log-scales,
# CRD's embedding heads, memory banks and per-item negatives (8 here, not 16384).
FEATURE_METHODS = {"vid": [], "crd": ["data.instance_sample_k=8"]}


def save_teacher(path: Path) -> Path:
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": create_model("fmnist_cnn_small", 10).state_dict()}, path)
    return path


def task_overrides(task: str, tmp_path: Path) -> list[str]:
    if task == "kd":
        teacher = save_teacher(tmp_path / "teacher.pth")
        return [
            "+experiment=fmnist_kd",
            "teacher.name=fmnist_cnn_small",
            f"teacher.checkpoint={teacher}",
            "loss.use_class_prior=true",
            "loss.temperature2=4.0",
            "task.warmup_epochs=2",
            "task.cache_teacher_outputs=false",
        ]
    if task in FEATURE_METHODS:  # the distiller's modules (and CRD's banks) are resumed too
        teacher = save_teacher(tmp_path / "teacher.pth")
        return [
            "+experiment=fmnist_kd",
            f"+baseline={task}",
            "model=fmnist_cnn",
            "model.name=fmnist_cnn_small",
            "teacher.name=fmnist_cnn_small",
            f"teacher.checkpoint={teacher}",
            *FEATURE_METHODS[task],
        ]
    adversarial = ["model.name=fmnist_mlp", "task.steps=2", "task.val_pgd_subset=20"]
    adversarial += ["task.val_pgd_steps=2", "task.eps_ramp_epochs=2"]
    if task == "gkl_at":  # the class prior, its epoch-end refresh, and the weight EMA
        return ["+experiment=fmnist_gkl_at", *adversarial, "task.ema_decay=0.9"]
    return ["+experiment=fmnist_trades", *adversarial]


def ckpt(run_dir: Path, name: str) -> dict:
    return torch.load(run_dir / "checkpoints" / name, weights_only=True, map_location="cpu")


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


# ----------------------------------------------------------------------------- exact resume


@pytest.mark.needs_fmnist
@pytest.mark.parametrize("task", ["kd", "gkl_at", "trades", *FEATURE_METHODS])
def test_resume_from_mid_epoch_end_of_epoch_and_final_step_equals_uninterrupted(
    compose_run, tmp_path, task
):
    overrides = [*task_overrides(task, tmp_path), *TINY, *EVERY_STEP]
    reference = run(compose_run(tmp_path / "ref", overrides))
    final = ckpt(tmp_path / "ref", "last.ckpt")
    assert final["global_step"] == 12
    if task in FEATURE_METHODS:  # the distiller's own state is in the run's checkpoints
        extra = {k for k in final["state_dict"] if k.startswith("distill_loss.")}
        first = ckpt(tmp_path / "ref", "s1.ckpt")["state_dict"]
        assert extra and any(not torch.equal(first[k], final["state_dict"][k]) for k in extra)
        if task == "crd":
            assert {"distill_loss.memory_s", "distill_loss.memory_t"} <= extra
    # s6 falls on epoch 1's last batch: written at the epoch's end, after the class prior's
    # refresh (the checkpoint taken at the last batch used to lose that epoch's end_epoch).
    end_of_epoch = ckpt(tmp_path / "ref", "s6.ckpt")
    if task in ("kd", "gkl_at"):
        assert end_of_epoch["state_dict"]["class_prior.epochs_completed"].item() == 1
        assert (
            ckpt(tmp_path / "ref", "s3.ckpt")["state_dict"]["class_prior.epochs_completed"].item()
            == 0
        )
    for step in (3, 6, 12):  # mid-epoch, end of epoch, final step
        run_dir = tmp_path / f"resumed_from_{step}"
        source = tmp_path / "ref" / "checkpoints" / f"s{step}.ckpt"
        resumed = run(compose_run(run_dir, [*overrides, f"ckpt_path={source}"]))
        for key in ("val/acc", "val/loss", "test/acc", "test/loss"):
            assert resumed[key] == reference[key], (step, key)
        assert_same_state(ckpt(run_dir, "last.ckpt")["state_dict"], final["state_dict"])
        record = json.loads((run_dir / SMOKE_METRICS_FILE).read_text())
        assert record["global_step"] == 12 and "val/acc" in record["metrics"]
    assert not list(tmp_path.rglob(f"*{TEMP_SUFFIX}"))  # every write was renamed into place


def test_rng_callback_round_trips_cuda_generators(monkeypatch):
    """The CUDA branch, with the CUDA calls replaced by a fake two-device generator store."""
    devices = {0: torch.tensor([1, 2], dtype=torch.uint8), 1: torch.tensor([3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [devices[0], devices[1]])

    def set_rng_state(state, device):
        devices[device] = state.clone()

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    callback = RNGStateCallback()
    random.seed(1)
    saved = callback.state_dict()
    saved_cuda = [s.clone() for s in saved["cuda"]]
    expected = (random.random(), torch.rand(3))
    devices[0], devices[1] = torch.tensor([9, 9], dtype=torch.uint8), torch.tensor([9])
    callback.load_state_dict(pickle.loads(pickle.dumps(saved)))
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])
    for device, state in enumerate(saved_cuda):
        assert torch.equal(devices[device], state)


# ----------------------------------------------------------------------------- DDP and mixing


def test_mixed_batch_sampler_shards_over_processes_and_resumes():
    full = MixedBatchSampler(100, 40, 10, 0.7, seed=3)
    full.set_epoch(2)
    epoch = list(full)  # 33 batches in all
    shards = []
    for rank in range(2):
        shard = MixedBatchSampler(100, 40, 10, 0.7, seed=3, num_replicas=2, rank=rank)
        shard.set_epoch(2)
        shards.append(list(shard))
        assert len(shard) == len(shards[-1]) == 16
        resumed = MixedBatchSampler(100, 40, 10, 0.7, seed=3, num_replicas=2, rank=rank)
        resumed.resume(2, batches_done=5)
        assert list(resumed) == shards[-1][5:]
    assert shards[0] == epoch[0:32:2] and shards[1] == epoch[1:32:2]
    real = [i for shard in shards for batch in shard for i in batch if i < 100]
    assert len(real) == len(set(real)) == 96  # each real image at most once across processes


def test_mixed_data_run_resumes_mid_epoch_exactly(compose_run, tmp_path):
    generated = tmp_path / "gen.npz"
    rng = np.random.default_rng(0)
    np.savez(
        generated,
        image=rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8),
        label=np.arange(30) % 10,
    )
    overrides = [
        "data=cifar10",
        "data.synthetic=true",
        "+data.synthetic_sizes=[60,20,20]",
        "data.batch_size=10",
        f"+data.generated_path={generated}",
        "+data.generated_fraction=0.5",  # 5 real + 5 generated a batch: 12 batches an epoch
        "data.num_workers=0",
        "model.name=fmnist_mlp",
        "+model.image_size=32",
        "model.in_channels=3",
        "trainer.max_epochs=2",
        "logger=none",
        "~callbacks.lr_monitor",
        "~callbacks.model_checkpoint",
        *EVERY_STEP,
    ]
    reference = run(compose_run(tmp_path / "ref", overrides))
    source = tmp_path / "ref" / "checkpoints" / "s17.ckpt"  # epoch 2, batch 5
    resumed = run(compose_run(tmp_path / "resumed", [*overrides, f"ckpt_path={source}"]))
    assert resumed["test/acc"] == reference["test/acc"]
    assert_same_state(
        ckpt(tmp_path / "resumed", "last.ckpt")["state_dict"],
        ckpt(tmp_path / "ref", "last.ckpt")["state_dict"],
    )


def train_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args, "~callbacks.progress_bar"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


# ----------------------------------------------------------------------------- atomic writes


WRITER = """
import sys, torch
from gkl.io import atomic_torch_save  # what SafeCheckpointIO.save_checkpoint calls
path, i = sys.argv[1], 0
print("ready", flush=True)
while True:
    i += 1
    atomic_torch_save({"i": i, "w": torch.full((2_000_000,), float(i))}, path)
"""


def test_kill_9_while_writing_checkpoints_leaves_a_readable_one(tmp_path, monkeypatch):
    """A writer of 8 MB checkpoints is killed at random moments, TMPDIR on another filesystem
    (/dev/shm); the target always loads, and the run lock cleans the killed writer's temp."""
    tmpdir = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    before = set(tmpdir.iterdir())
    target = tmp_path / "checkpoints" / "last-step.ckpt"
    rng = random.Random(0)
    seen = set()
    for _ in range(3):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert writer.stdout.readline().strip() == b"ready"
        while not target.exists():
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        state = SafeCheckpointIO().load_checkpoint(target)
        assert torch.equal(state["w"], torch.full((2_000_000,), float(state["i"])))
        seen.add(state["i"])
        with RunLock(tmp_path):  # the kernel released the killed writer's lock
            remove_stale_temp_files(tmp_path)
        assert not list(tmp_path.rglob(f"*{TEMP_SUFFIX}"))
    assert len(seen) > 1  # the kills hit different versions
    new_in_tmpdir = [p for p in set(tmpdir.iterdir()) - before if "last-step" in p.name]
    assert not new_in_tmpdir  # nothing was staged in $TMPDIR


@pytest.mark.needs_fmnist
def test_training_killed_by_sigkill_resumes_in_its_directory(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "+experiment=fmnist_trades",
        "model.name=fmnist_mlp",
        "task.steps=1",
        "task.val_pgd_subset=0",
        *TINY,
        "trainer.max_epochs=3",
        "callbacks.mid_epoch_checkpoint.every_n_train_steps=1",
        f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={run_dir}",
        "~callbacks.progress_bar",
    ]
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": "/dev/shm"},
    )
    checkpoint = run_dir / "checkpoints" / "last-step.ckpt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] >= 1
    result = train_cli(*[a for a in args if "progress_bar" not in a], f"ckpt_path={checkpoint}")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / SMOKE_METRICS_FILE).read_text())
    assert record["global_step"] == 18
    assert not list(run_dir.rglob(f"*{TEMP_SUFFIX}"))


# ----------------------------------------------------------------------------- malicious files


class Payload:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_never_runs_code_from_a_checkpoint(compose_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 1, "x": Payload(marker)}, bad)
    cfg = compose_run(tmp_path / "run", [*TINY, "data.synthetic=true", f"ckpt_path={bad}"])
    with pytest.raises(ValueError, match=r"bad.ckpt holds objects that torch.load\(weights_only"):
        run(cfg)
    with pytest.raises(ValueError, match="weights_only"):  # Lightning's own resume path
        SafeCheckpointIO().load_checkpoint(bad, weights_only=False)
    assert not marker.exists()


def test_tampered_cifar_batch_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    good = {
        b"batch_label": b"testing batch 1 of 1",
        b"data": np.zeros((2, 3072), dtype=np.uint8),
        b"labels": [0, 1],
        b"filenames": [b"a.png", b"b.png"],
    }
    (folder / "test_batch").write_bytes(pickle.dumps(good, protocol=2))
    images, labels = read_cifar(tmp_path, "cifar10", train=False)
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1]
    (folder / "test_batch").write_bytes(pickle.dumps({**good, b"x": Payload(marker)}, protocol=2))
    with pytest.raises(
        ValueError, match=r"test_batch is not a plain CIFAR batch: it refers to io.open"
    ):
        read_cifar(tmp_path, "cifar10", train=False)
    assert not marker.exists()


# ----------------------------------------------------------------------------- run directories


def test_run_directory_in_use_or_holding_another_run_is_refused(compose_run, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*TINY, "data.synthetic=true", "trainer.max_epochs=1", "test=false"]
    in_use = pytest.raises(RunDirectoryError, match=r"is in use by another run \(pid")
    with RunLock(run_dir), in_use:  # another live run holds the lock
        run(compose_run(run_dir, overrides))
    run(compose_run(run_dir, overrides))
    assert (run_dir / LOCK_FILE).exists()
    first_config = (run_dir / "config.yaml").read_text()
    with pytest.raises(RunDirectoryError, match=r"already holds another run.*ckpt_path=.*last"):
        run(compose_run(run_dir, [*overrides, "seed=1"]))
    assert (run_dir / "config.yaml").read_text() == first_config
    last = run_dir / "checkpoints" / "last.ckpt"
    run(compose_run(run_dir, [*overrides, f"ckpt_path={last}"]))  # resuming it is fine


def test_default_run_directories_differ_for_runs_started_in_the_same_second():
    text = (Path(CONFIG_DIR) / "hydra" / "default.yaml").read_text()
    patterns = re.findall(r"\$\{now:([^}]*)\}", text)
    assert len(patterns) == 2  # run.dir and sweep.dir
    start = datetime(2026, 12, 1, 12, 0, 0, 1000)
    for pattern in patterns:
        assert start.strftime(pattern) != (start + timedelta(milliseconds=1)).strftime(pattern)


# ----------------------------------------------------------------------------- changed config


@pytest.fixture(scope="module")
def adam_checkpoint(compose_run, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("adam")
    overrides = [*TINY, "data.synthetic=true", "trainer.max_epochs=1", "test=false"]
    run(compose_run(tmp / "run", overrides))
    return tmp / "run" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    ("override", "listed"),
    [
        ("optim.optimizer.lr=0.01", "optim.optimizer.lr: 0.001 -> 0.01"),
        ("data.train_subset=100", "data.train_subset: 120 -> 100"),
        ("optim=sgd", "optim.optimizer._target_: 'torch.optim.Adam' -> 'torch.optim.SGD'"),
    ],
)
def test_resume_with_a_changed_config_lists_the_changes(
    compose_run, tmp_path, adam_checkpoint, override, listed
):
    overrides = [*TINY, "data.synthetic=true", "trainer.max_epochs=1", "test=false"]
    cfg = compose_run(tmp_path / "run", [*overrides, override, f"ckpt_path={adam_checkpoint}"])
    with pytest.raises(
        ValueError, match=r"(?s)differs from the one.*\+\+resume_allow_changes=true"
    ) as err:
        run(cfg)
    assert listed in str(err.value)
    if override == "optim=sgd":
        assert "cannot take over the checkpoint's optimizer state" in str(err.value)


def test_allowed_and_accepted_config_changes(compose_run, tmp_path, adam_checkpoint):
    saved = {"trainer": {"max_epochs": 1, "devices": 1}, "paths": {"x": 1}, "loss": {"beta": 1}}
    new = {"trainer": {"max_epochs": 5, "devices": 2}, "paths": {"x": 2}, "loss": {"beta": 1.0}}
    assert config_changes(saved, new) == []
    assert config_changes(saved, {**new, "loss": {"beta": 8}}) == [("loss.beta", 1, 8)]
    overrides = [*TINY, "data.synthetic=true", "trainer.max_epochs=2", "test=false"]
    cfg = compose_run(
        tmp_path / "run",
        [
            *overrides,
            "data.train_subset=100",
            "++resume_allow_changes=true",
            f"ckpt_path={adam_checkpoint}",
        ],
    )
    run(cfg)


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.train_subset=-54800", r"data.train_subset=-54800 must be a positive number"),
        ("data.train_subset=0", r"data.train_subset=0 must be a positive number"),
        ("data.test_size=0", r"data.test_size=0 must be a positive number"),
        ("data.val_size=-1", r"data.val_size=-1 must be an integer >= 0"),
        ("seed=abc", r"seed='abc': the seed must be an integer"),
        ("trainer.max_epochs=-5", r"trainer.max_epochs=-5 must be an integer >= 0"),
        ("ckpt_path=/nonexistent/last.ckpt", r"ckpt_path=/nonexistent/last.ckpt: no such"),
    ],
)
def test_bad_inputs_fail_before_training_naming_the_argument(
    compose_run, tmp_path, override, message
):
    with pytest.raises(Exception, match=message):  # Hydra wraps the data module's ValueError
        run(compose_run(tmp_path / "run", [*TINY, "data.synthetic=true", override]))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("target", "message"),
    [("file/below/a/file.pth", "is a file, not a directory"), (".", "is a directory")],
)
def test_unwritable_export_weights_fails_before_training(compose_run, tmp_path, target, message):
    (tmp_path / "file").write_text("")
    path = tmp_path / target
    cfg = compose_run(tmp_path / "run", [*TINY, "data.synthetic=true", f"export_weights={path}"])
    with pytest.raises(ValueError, match=f"export_weights=.*{message}"):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_truncated_checkpoint_is_named(compose_run, tmp_path, adam_checkpoint):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(adam_checkpoint.read_bytes()[:5000])
    cfg = compose_run(tmp_path / "run", [*TINY, "data.synthetic=true", f"ckpt_path={cut}"])
    with pytest.raises(ValueError, match=r"cut.ckpt is not a readable checkpoint \(truncated"):
        run(cfg)


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("trainer.max_epochs=0", "max_epochs=0"),
        ("trainer.max_epochs=1", "data.train_subset=120 < 1000 images"),
    ],
)
@pytest.mark.needs_fmnist
def test_untrained_and_tiny_runs_are_marked_not_a_result(compose_run, tmp_path, override, reason):
    run(compose_run(tmp_path / "run", [*TINY, override, "~callbacks.mid_epoch_checkpoint"]))
    record = json.loads((tmp_path / "run" / SMOKE_METRICS_FILE).read_text())
    assert reason in record["NOT_A_RESULT"]
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_truncated_or_corrupt_fashion_mnist_gz_is_named(tmp_path):
    data = bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(10)
    truncated = tmp_path / "train-labels-idx1-ubyte.gz"
    truncated.write_bytes(gzip.compress(data)[:-12])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz is truncated or corrupt"):
        read_idx(truncated)
    garbage = tmp_path / "t10k-images-idx3-ubyte.gz"
    garbage.write_bytes(b"not a gzip file at all")
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz is truncated or corrupt"):
        read_idx(garbage)


def test_cifar_module_rejects_bad_subsets(tmp_path):
    for key in ("train_subset", "test_size"):
        with pytest.raises(ValueError, match=f"data.{key}=0"):
            CIFARDataModule("cifar10", tmp_path, synthetic=True, **{key: 0})
