"""Scale-out and speed switches: DDP on CPU processes, bf16, channels_last, compile, launchers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DistributedSampler

import gkl.train
from gkl.data.base import EpochSampler
from gkl.losses import ClassPrior
from gkl.models import FrozenTeacher, create_model
from gkl.tasks.distributed import check_distributed, exclude_rank_local_buffers
from gkl.tasks.speed import InferenceModeTeacher, SpeedOptions
from gkl.train import CONFIG_DIR, SMOKE_METRICS_FILE, run

ROOT = Path(CONFIG_DIR).parent
SMALL_KD = ["teacher.name=resnet8", "model.name=resnet8", "data.batch_size=8"]


def train_cli(tmp_path: Path, *args: str, progress_bar: bool = False):
    """``python train.py <args>`` under tmp_path (without the progress bar unless asked)."""
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            *args,
            f"paths.root_dir={tmp_path}",
            *([] if progress_bar else ["~callbacks.progress_bar"]),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# ----------------------------------------------------------------------------- DDP


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.devices=1"],
        ["trainer.accelerator=cpu"],  # devices: auto is one CPU process
        ["trainer.devices=[0]", "trainer.accelerator=gpu"],
    ],
)
def test_ddp_on_one_process_fails_before_building_anything(compose_cfg, tmp_path, overrides):
    cfg = compose_cfg(tmp_path, ["+experiment=fmnist_kd", "trainer=ddp", *overrides])
    with pytest.raises(ValueError, match=r"trainer=ddp .* is one process: set trainer.devices=N"):
        run(cfg)


def test_ddp_check_counts_processes():
    ddp = {"strategy": {"_target_": "lightning.pytorch.strategies.DDPStrategy"}}
    check_distributed({**ddp, "devices": 2, "accelerator": "cpu"})
    check_distributed({**ddp, "devices": "0,1", "accelerator": "gpu"})
    check_distributed({**ddp, "devices": 1, "num_nodes": 2})
    check_distributed({"strategy": "auto", "devices": 1})
    with pytest.raises(ValueError, match="one process"):
        check_distributed({"strategy": "ddp", "devices": "1"})


def test_ddp_with_two_cpu_processes_gives_the_single_process_class_prior(compose_cfg, tmp_path):
    """The prior's sums are all-reduced: same data in one epoch -> the same prior (float64).

    With the default progress bar, which on rank 0 alone computes the epoch's train metrics
    just before the prior's all-reduce (a synchronised train metric there used to hang).
    Resumed from the mid-epoch checkpoint of step 2 (of 4 per process), the prior is the same
    too: the checkpoint holds both processes' partial sums (it used to hold rank 0's only, and
    the prior then differed by up to 0.0085)."""
    overrides = [
        "+experiment=fmnist_kd",
        "loss.use_class_prior=true",
        "loss.temperature2=4.0",
        "data.synthetic=true",
        "data.batch_size=64",  # 512 synthetic training images: 8 steps, or 4 per process
        "trainer.max_epochs=1",
        "test=false",
        "logger=none",
        "~callbacks.lr_monitor",
        "callbacks.mid_epoch_checkpoint.every_n_train_steps=2",
        "callbacks.mid_epoch_checkpoint.save_top_k=-1",
        "callbacks.mid_epoch_checkpoint.filename='s{step}'",
        "+callbacks.mid_epoch_checkpoint.auto_insert_metric_name=false",
    ]
    ddp = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    run(compose_cfg(tmp_path / "single", overrides))
    train_cli(tmp_path, *overrides, *ddp, f"hydra.run.dir={tmp_path / 'ddp'}", progress_bar=True)
    single = torch.load(tmp_path / "single/run/checkpoints/last.ckpt", weights_only=True)
    ddp_state = torch.load(tmp_path / "ddp/checkpoints/last.ckpt", weights_only=True)
    prior = single["state_dict"]["class_prior.prior"]
    assert not torch.allclose(prior, torch.full_like(prior, 0.1))
    torch.testing.assert_close(
        ddp_state["state_dict"]["class_prior.prior"], prior, rtol=0, atol=1e-12
    )
    assert (tmp_path / "ddp" / SMOKE_METRICS_FILE).exists()

    mid = tmp_path / "ddp" / "checkpoints" / "s2.ckpt"
    # Both processes' sums: 2 processes x 2 steps x 64 images, each adding a probability row.
    sums = torch.load(mid, weights_only=True)["state_dict"]["class_prior.sums"]
    assert sums.sum().item() == pytest.approx(256.0)
    resumed_dir = tmp_path / "resumed"
    train_cli(tmp_path, *overrides, *ddp, f"ckpt_path={mid}", f"hydra.run.dir={resumed_dir}")
    resumed = torch.load(resumed_dir / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(resumed["class_prior.prior"], prior, rtol=0, atol=1e-12)
    for key, value in ddp_state["state_dict"].items():
        if key != "class_prior.prior":  # the prior's float64 sums add in another order
            assert torch.equal(resumed[key], value), key


def test_ddp_ignores_only_the_class_prior_sums():
    task = torch.nn.Module()
    task.class_prior = ClassPrior(3)
    task.model = torch.nn.BatchNorm1d(3)
    assert exclude_rank_local_buffers(task) == ["class_prior.sums"]
    assert task._ddp_params_and_buffers_to_ignore == ["class_prior.sums"]


def test_epoch_sampler_shards_the_epoch_order_over_processes():
    sampler = EpochSampler(10, seed=0)
    sampler.set_epoch(3)
    order = list(sampler)
    assert sorted(order) == list(range(10))
    padded = order + order[:2]  # 4 processes: 12 positions, the first 2 served twice
    shards = []
    for rank in range(4):
        shard = EpochSampler(10, seed=0, num_replicas=4, rank=rank)
        shard.set_epoch(3)
        shards.append(list(shard))
        assert len(shard) == 3
        # Lightning leaves a DistributedSampler alone instead of wrapping it a second time.
        assert isinstance(shard, DistributedSampler)
    assert shards == [padded[rank::4] for rank in range(4)]


def test_mid_epoch_resume_under_ddp_skips_each_processes_trained_samples():
    for rank in range(2):
        full = EpochSampler(11, seed=5, num_replicas=2, rank=rank)
        full.set_epoch(2)
        resumed = EpochSampler(11, seed=5, num_replicas=2, rank=rank)
        resumed.resume(2, samples_done=4)  # 2 batches of 2 per process already trained
        assert list(resumed) == list(full)[4:]
        assert list(resumed) == list(full)  # the skip applies to the resumed epoch only


# ----------------------------------------------------------------------------- speed switches


def test_unknown_speed_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"\['chanels_last'\].*channels_last"):
        SpeedOptions.from_config({"chanels_last": True})


def test_inference_mode_teacher_gives_logits_autograd_accepts():
    teacher = InferenceModeTeacher(create_model("resnet8", 10))
    assert (
        teacher.state_dict().keys()
        == FrozenTeacher(create_model("resnet8", 10)).state_dict().keys()
    )
    s = torch.randn(2, 10, requires_grad=True)
    t = teacher(torch.rand(2, 3, 32, 32))
    assert not t.is_inference() and not t.requires_grad
    (t * s).sum().backward()  # saves t for backward: an inference tensor would raise
    assert s.grad is not None


class Recorder:
    """Wraps ``apply_speed`` to record the student's and teacher's inputs and outputs."""

    def __init__(self, apply_speed) -> None:
        self.apply_speed, self.calls, self.task = apply_speed, [], None

    def __call__(self, task, section):
        options = self.apply_speed(task, section)
        self.task = task
        for role, module in (("student", task.model), ("teacher", task.teacher)):
            module.register_forward_hook(
                lambda m, args, out, role=role: self.calls.append(
                    (role, args[0], out, torch.is_autocast_enabled("cpu"))
                )
            )
        return options


def test_bf16_channels_last_inference_mode_distillation_step(compose_cfg, tmp_path, monkeypatch):
    recorder = Recorder(gkl.train.apply_speed)
    monkeypatch.setattr(gkl.train, "apply_speed", recorder)
    cfg = compose_cfg(
        tmp_path,
        [
            "+experiment=cifar100_kd",
            *SMALL_KD,
            "data.synthetic=true",
            "trainer.fast_dev_run=true",
            "trainer.precision=bf16-mixed",
            "+speed=default",
            "speed.channels_last=true",
            "speed.teacher_inference_mode=true",
        ],
    )
    metrics = run(cfg)
    assert torch.isfinite(torch.tensor(metrics["test/acc"]))
    task = recorder.task
    assert isinstance(task.teacher, InferenceModeTeacher)
    conv = task.model.model.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    training = [c for c in recorder.calls if c[0] == "student" and c[3]][:1]
    teaching = [c for c in recorder.calls if c[0] == "teacher" and c[3]][:1]
    assert training and teaching, "no forward ran under CPU autocast"
    for _, x, out, _ in training + teaching:
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert out.dtype == torch.bfloat16
    assert not teaching[0][2].is_inference()


def test_compile_switch_keeps_state_dict_keys(compose_cfg, tmp_path, monkeypatch):
    recorder = Recorder(gkl.train.apply_speed)
    monkeypatch.setattr(gkl.train, "apply_speed", recorder)
    overrides = ["+experiment=fmnist_kd", "data.synthetic=true"]
    keys = set(instantiate(compose_cfg(tmp_path, overrides).model).state_dict())
    cfg = compose_cfg(
        tmp_path,
        [
            *overrides,
            "trainer.fast_dev_run=true",
            "+speed=default",
            "speed.compile=true",
            "speed.compile_backend=eager",  # inductor on 2 CPU cores takes minutes
        ],
    )
    from torch._dynamo.utils import counters

    counters.clear()
    run(cfg)
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    task = recorder.task
    assert task.model._compiled_call_impl is not None
    assert task.teacher.model._compiled_call_impl is not None
    assert set(task.model.state_dict()) == keys


# ----------------------------------------------------------------------------- tools


def run_gpu_check(tmp_path, monkeypatch, device: str) -> list:
    """``scripts/gpu_check.py`` on ``device`` with one step of each workload on tiny networks."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # for its dataclass
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.json"
    results = gpu_check.main(
        [
            f"--device={device}",
            "--steps=1",
            "--warmup=0",
            "--kd-batch=4",
            "--at-batch=2",
            "--at-steps=1",
            "--kd-teacher=resnet8",
            "--kd-student=resnet8",
            "--at-model=wrn_16_1",
            f"--json={out}",
        ]
    )
    assert out.exists()
    return results


def test_gpu_check_runs_on_cpu_with_one_step(tmp_path, monkeypatch):
    results = run_gpu_check(tmp_path, monkeypatch, "cpu")
    assert [(r.workload, r.mode) for r in results] == [
        ("cifar100_kd", "fp32"),
        ("cifar100_kd", "bf16+cl"),
        ("cifar10_gkl_at", "fp32"),
        ("cifar10_gkl_at", "bf16+cl"),
    ]
    assert all(r.images_per_s > 0 and r.recipe_hours > 0 for r in results)
    assert results[0].epochs == 240 and results[0].train_images == 50_000
    assert all(r.peak_memory_gib is None for r in results)


@pytest.mark.needs_cuda
def test_gpu_check_runs_on_cuda_and_reports_memory(tmp_path, monkeypatch):
    results = run_gpu_check(tmp_path, monkeypatch, "cuda")
    assert len(results) == 4 and all(r.images_per_s > 0 for r in results)
    assert all(r.peak_memory_gib is not None and r.peak_memory_gib > 0 for r in results)


@pytest.mark.slow
def test_submitit_local_launcher_runs_two_jobs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    train_cli(
        tmp_path,
        "-m",
        "hydra/launcher=submitit_local",
        "+experiment=fmnist_kd",
        "data.synthetic=true",
        "trainer.fast_dev_run=true",
        "loss.beta=1,4",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert len(list((tmp_path / "sweep").glob("*/" + SMOKE_METRICS_FILE))) == 2
