"""Framework overhead of one distillation training step: the Lightning task vs a plain loop.

Both paths train the same student with the same frozen teacher, loss (GKL with class prior, the
cifar100_kd recipe) and SGD on the same fixed batch; each step's wall time is taken between
consecutive batch starts. Rounds alternate Lightning and plain so machine noise hits both.

    python scripts/bench_step.py                                   # resnet32x4 -> resnet8x4, B=64
    python scripts/bench_step.py --teacher fmnist_cnn --student fmnist_mlp --shape 1 28 28 \
        --classes 10 --batch 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from gkl.losses import ClassPrior, GKLLoss
from gkl.models import FrozenTeacher, Normalized, create_model
from gkl.tasks import DistillationTask


class RepeatedBatch(Dataset):
    """The same batch ``steps`` times (collated already)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        self.x, self.y, self.steps = x, y, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int):
        return self.x, self.y


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())


def build(args):
    torch.manual_seed(0)
    mean, std = [0.5] * args.shape[0], [0.25] * args.shape[0]
    teacher = FrozenTeacher(Normalized(create_model(args.teacher, args.classes), mean, std))
    student = Normalized(create_model(args.student, args.classes), mean, std)
    loss = GKLLoss(
        alpha=1, beta=16, gamma=0.05, temperature=4, temperature2=4, use_class_prior=True
    )
    return student, teacher, loss


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def lightning_step_times(args, x, y) -> list[float]:
    student, teacher, loss = build(args)
    task = DistillationTask(student, teacher, loss, args.classes, optimizer=sgd, warmup_epochs=20)
    timer = StepTimer()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator=args.device,
        devices=1,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    loader = DataLoader(RepeatedBatch(x, y, args.steps), batch_size=None)
    trainer.fit(task, train_dataloaders=loader)
    times = [b - a for a, b in zip(timer.starts, timer.starts[1:], strict=False)]
    return times[args.warmup :]


def plain_step_times(args, x, y) -> list[float]:
    student, teacher, loss = build(args)
    device = torch.device(args.device)
    student, teacher = student.to(device).train(), teacher.to(device)
    prior = ClassPrior(args.classes, temperature=4.0).to(device)
    optimizer = sgd(student.parameters())
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        xb, yb = x.to(device), y.to(device)
        teacher_logits = teacher(xb)
        logits = student(xb)
        total = F.cross_entropy(logits, yb) + (1 / 20) * loss(
            logits, teacher_logits, yb, class_prior=prior.rows(yb)
        )
        prior.update(teacher_logits, yb)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[args.warmup :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, *args.shape, generator=g)
    y = torch.randint(0, args.classes, (args.batch,), generator=g)
    lightning_times, plain_times = [], []
    for _ in range(args.rounds):
        lightning_times += lightning_step_times(args, x, y)
        plain_times += plain_step_times(args, x, y)
    lit, plain = statistics.median(lightning_times), statistics.median(plain_times)
    print(
        f"{args.teacher} -> {args.student}, batch {args.batch}, device {args.device}, "
        f"threads {torch.get_num_threads()}, {len(plain_times)} timed steps each"
    )
    print("| path | median step (ms) | images/s |")
    print("|---|---|---|")
    print(f"| plain PyTorch loop | {plain * 1e3:.1f} | {args.batch / plain:.1f} |")
    print(f"| Lightning DistillationTask | {lit * 1e3:.1f} | {args.batch / lit:.1f} |")
    print(f"framework overhead: {100 * (lit / plain - 1):+.1f}%")


if __name__ == "__main__":
    main()
