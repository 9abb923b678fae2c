"""Training throughput of the cifar100_kd and cifar10_gkl_at steps, fp32 vs bf16 + channels_last.

Each workload is composed from its experiment config (models, loss, task, optimiser, epochs) and
trained by Lightning, as ``train.py`` would, on one synthetic CIFAR-shaped batch repeated (no
data loading) with a randomly initialised teacher. Modes: ``fp32`` (``trainer.precision=32-true``),
``bf16+cl`` (``bf16-mixed``, ``speed.channels_last``, ``speed.teacher_inference_mode``) and, with
``--compile``, ``bf16+cl+compile`` (``speed.compile``). The recipe's wall time is estimated as
``max_epochs * training images / throughput`` (no validation, no data loading). For
cifar10_gkl_at, AWP is switched on from the first step (the recipe's steady state from epoch 10).

    python scripts/gpu_check.py                     # GPU: 30 timed steps after 5 warm-up steps
    python scripts/gpu_check.py --compile --json gpu_check.json
    python scripts/gpu_check.py --at-steps 10       # a 10-step inner maximisation
    python scripts/gpu_check.py --device cpu --steps 1 --warmup 0 --kd-batch 4 --at-batch 2 \\
        --at-steps 1 --kd-teacher resnet8 --kd-student resnet8 --at-model wrn_16_1   # CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from gkl.io import atomic_write_json
from gkl.tasks.speed import apply_speed
from gkl.train import CONFIG_DIR, build_task, build_teacher

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib beside this script
from benchlib import fit_repeated_batch  # noqa: E402

CIFAR_TRAIN_IMAGES = 50_000
MODES = {
    "fp32": ("32-true", {}),
    "bf16+cl": ("bf16-mixed", {"channels_last": True, "teacher_inference_mode": True}),
    "bf16+cl+compile": (
        "bf16-mixed",
        {"channels_last": True, "teacher_inference_mode": True, "compile": True},
    ),
}


@dataclass
class Measurement:
    workload: str
    models: str
    mode: str
    batch: int
    timed_steps: int
    images_per_s: float
    step_ms: float
    peak_memory_gib: float | None
    epochs: int
    train_images: int
    recipe_hours: float


class Stopwatch(pl.Callback):
    """Wall time from the start of batch ``warmup`` to the end of fit, device synchronised."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0

    @staticmethod
    def _now(pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            self.start = self._now(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.end = self._now(pl_module)


def compose_workload(experiment: str, overrides: list[str], root: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "train.yaml",
            overrides=[
                f"+experiment={experiment}",
                "data.synthetic=true",  # a random teacher: no checkpoint needed
                f"paths.root_dir={root}",
                *overrides,
            ],
        )


def measure(workload: str, cfg: DictConfig, mode: str, args: argparse.Namespace) -> Measurement:
    """Train ``args.warmup + args.steps`` steps of ``cfg``'s task in ``mode`` and time them."""
    precision, speed = MODES[mode]
    gc.collect()  # the previous measurement's models
    if args.device == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    batch = int(cfg.data.batch_size)
    x = torch.rand(batch, *cfg.data.input_shape)
    y = torch.arange(batch) % cfg.data.num_classes
    teacher = build_teacher(cfg) if "_target_" in cfg.teacher else None
    task = build_task(
        cfg, instantiate(cfg.model), teacher, instantiate(cfg.loss), cfg.data.num_classes
    )
    apply_speed(task, speed)
    stopwatch = Stopwatch(args.warmup)
    fit_repeated_batch(task, x, y, args.warmup + args.steps, stopwatch, args.device, precision)
    elapsed = stopwatch.end - stopwatch.start
    images_per_s = args.steps * batch / elapsed
    train_images = CIFAR_TRAIN_IMAGES - int(cfg.data.val_size)
    epochs = int(cfg.trainer.max_epochs)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    models = f"{cfg.teacher.name} -> {cfg.model.name}" if teacher is not None else cfg.model.name
    return Measurement(
        workload=workload,
        models=models,
        mode=mode,
        batch=batch,
        timed_steps=args.steps,
        images_per_s=images_per_s,
        step_ms=1e3 * elapsed / args.steps,
        peak_memory_gib=peak,
        epochs=epochs,
        train_images=train_images,
        recipe_hours=epochs * train_images / images_per_s / 3600,
    )


def workloads(args: argparse.Namespace) -> dict[str, list[str]]:
    kd = [f"data.batch_size={args.kd_batch}"]
    kd += [f"teacher.name={args.kd_teacher}"] if args.kd_teacher else []
    kd += [f"model.name={args.kd_student}"] if args.kd_student else []
    at = [f"data.batch_size={args.at_batch}", "task.awp_warmup_epoch=0", "task.val_pgd_subset=0"]
    at += [f"task.steps={args.at_steps}"] if args.at_steps is not None else []
    at += [f"model.name={args.at_model}"] if args.at_model else []
    return {"cifar100_kd": kd, "cifar10_gkl_at": at}


def table(results: list[Measurement]) -> str:
    columns = "workload | models | mode | batch | images/s | step (ms) | peak GiB | epochs"
    lines = [f"| {columns} | recipe (h) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        peak = f"{r.peak_memory_gib:.1f}" if r.peak_memory_gib is not None else "-"
        cells = [r.workload, r.models, r.mode, str(r.batch), f"{r.images_per_s:.1f}"]
        cells += [f"{r.step_ms:.1f}", peak, str(r.epochs), f"{r.recipe_hours:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--kd-batch", type=int, default=64)
    parser.add_argument("--at-batch", type=int, default=128)
    parser.add_argument(
        "--at-steps", type=int, default=None, help="inner-max steps (default: the recipe's)"
    )
    parser.add_argument("--kd-teacher", default=None, help="default: the recipe's")
    parser.add_argument("--kd-student", default=None, help="default: the recipe's")
    parser.add_argument("--at-model", default=None, help="default: the recipe's")
    parser.add_argument("--compile", action="store_true", help="also bf16+cl+compile")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("need --steps >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> list[Measurement]:
    args = parse_args(argv)
    modes = ["fp32", "bf16+cl"] + (["bf16+cl+compile"] if args.compile else [])
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
    print(f"device: {args.device} ({device or platform.machine()}), torch {torch.__version__}")
    results = []
    with tempfile.TemporaryDirectory() as root:
        for workload, overrides in workloads(args).items():
            cfg = compose_workload(workload, overrides, root)
            torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))
            if workload == "cifar10_gkl_at":
                print(f"cifar10_gkl_at: {cfg.task.steps}-step inner maximisation")
            for mode in modes:
                results.append(measure(workload, cfg, mode, args))
    print(table(results))
    if args.json is not None:
        atomic_write_json(args.json, [asdict(r) for r in results])
    return results


if __name__ == "__main__":
    main()
