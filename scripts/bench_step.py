"""Framework overhead of one training step: the Lightning task vs a plain loop doing the same work.

``--task kd``: DistillationTask, student and frozen teacher, GKL with class prior (the
cifar100_kd recipe). ``--task trades`` / ``--task gkl_at``: AdversarialTask, TRADES inner max
(``--steps-attack`` steps of eps/4 from x + 0.001 N) then CE + 6 KL (TRADES) or CE + GKL with
the natural-logit class prior (GKL-AT, the fmnist_gkl_at loss). Both paths use SGD on the same
fixed batch; each step's wall time is taken between consecutive batch starts. Rounds alternate
Lightning and plain so machine noise hits both.

    python scripts/bench_step.py                                   # resnet32x4 -> resnet8x4, B=64
    python scripts/bench_step.py --teacher fmnist_cnn --student fmnist_mlp --shape 1 28 28 \
        --classes 10 --batch 128
    python scripts/bench_step.py --task trades --student fmnist_cnn_at --shape 1 28 28 \
        --classes 10 --batch 128 --eps 0.1                         # fmnist_trades' step

``--baseline <name> [<name> ...]`` (or ``all``): images/s of the Lightning distillation step with
each of mdistiller's feature distillers (gkl.distillers.BASELINES, mdistiller's settings) against
the same step with mdistiller's KD on the same pair and batch, and the ratio method / KD.

    python scripts/bench_step.py --baseline all                    # resnet32x4 -> resnet8x4, B=64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from gkl.attacks import trades_perturb
from gkl.distillers import BASELINES
from gkl.losses import ClassPrior, GKLLoss, KDLoss, TradesKLLoss, trades_kl
from gkl.models import FrozenTeacher, Normalized, create_model
from gkl.tasks import AdversarialTask, DistillationTask

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib beside this script
from benchlib import fit_repeated_batch  # noqa: E402

TASKS = ("kd", "trades", "gkl_at")
TRADES_BETA = 6.0


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())


def normalized(name: str, args) -> Normalized:
    mean, std = [0.5] * args.shape[0], [0.25] * args.shape[0]
    return Normalized(create_model(name, args.classes), mean, std)


def build_kd(args):
    torch.manual_seed(0)
    teacher = FrozenTeacher(normalized(args.teacher, args))
    student = normalized(args.student, args)
    loss = GKLLoss(
        alpha=1, beta=16, gamma=0.05, temperature=4, temperature2=4, use_class_prior=True
    )
    return student, teacher, loss


def build_adversarial(args):
    """The network and the robust loss of ``args.task`` (fmnist_trades / fmnist_gkl_at's)."""
    torch.manual_seed(0)
    if args.task == "trades":
        return normalized(args.student, args), TradesKLLoss()
    loss = GKLLoss(alpha=4, beta=20, gamma=1, temperature=1, temperature2=4, use_class_prior=True)
    return normalized(args.student, args), loss


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def baseline_task(args, name: str) -> DistillationTask:
    """The distillation task of ``+baseline=<name>`` (``kd``: mdistiller's KD, CE 0.1 + 0.9 KD)."""
    torch.manual_seed(0)
    teacher = FrozenTeacher(normalized(args.teacher, args))
    student = normalized(args.student, args)
    if name == "kd":
        loss, ce_weight, weight = KDLoss(temperature=4.0), 0.1, 0.9
    else:
        loss, ce_weight, weight = BASELINES[name](), 1.0, 1.0
        if hasattr(loss, "input_shape"):
            loss.input_shape = tuple(args.shape)
    return DistillationTask(
        student,
        teacher,
        loss,
        args.classes,
        optimizer=sgd,
        ce_weight=ce_weight,
        distill_weight=weight,
    )


CRD_NUM_DATA = 50_000  # CIFAR-100's training set: the memory banks' rows


def baseline_images_per_second(args, name: str, x, y) -> float:
    timer = StepTimer()
    task, extra = baseline_task(args, name), ()
    if name == "crd":  # mdistiller's CRD data: each item's index and 16384 sampled rows
        task.distill_loss.set_num_data(CRD_NUM_DATA)
        g = torch.Generator().manual_seed(1)
        index = torch.randint(0, CRD_NUM_DATA, (len(y),), generator=g)
        sample = torch.randint(0, CRD_NUM_DATA, (len(y), task.distill_loss.k + 1), generator=g)
        extra = (index, sample)
    fit_repeated_batch(task, x, y, args.steps, timer, args.device, extra=extra)
    times = [b - a for a, b in zip(timer.starts, timer.starts[1:], strict=False)][args.warmup :]
    return args.batch / statistics.median(times)


def compare_baselines(args, x, y) -> None:
    """Median img/s of each baseline's step and of KD's, rounds alternating, and the ratios."""
    names = list(BASELINES) if args.baseline == ["all"] else args.baseline
    rates: dict[str, list[float]] = {n: [] for n in ["kd", *names]}
    for _ in range(args.rounds):
        for name in rates:
            rates[name].append(baseline_images_per_second(args, name, x, y))
    kd = statistics.median(rates["kd"])
    print(
        f"{args.teacher} -> {args.student}, batch {args.batch}, device {args.device}, "
        f"threads {torch.get_num_threads()}, median of {args.rounds} rounds x "
        f"{args.steps - args.warmup} steps"
    )
    print("| method | images/s | method / KD |")
    print("|---|---|---|")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"| {name} | {rate:.1f} | {rate / kd:.2f} |")


def lightning_task(args) -> pl.LightningModule:
    if args.task == "kd":
        student, teacher, loss = build_kd(args)
        return DistillationTask(
            student, teacher, loss, args.classes, optimizer=sgd, warmup_epochs=20
        )
    model, loss = build_adversarial(args)
    return AdversarialTask(
        model,
        args.classes,
        sgd,
        loss=loss,
        objective="trades" if args.task == "trades" else "gkl",
        eps=args.eps,
        step_size=args.eps / 4,
        steps=args.steps_attack,
        trades_beta=TRADES_BETA,
    )


def lightning_step_times(args, x, y) -> list[float]:
    task = lightning_task(args)
    timer = StepTimer()
    fit_repeated_batch(task, x, y, args.steps, timer, args.device)
    times = [b - a for a, b in zip(timer.starts, timer.starts[1:], strict=False)]
    return times[args.warmup :]


def kd_loss_fn(args, device):
    """Plain-loop loss of the kd task: CE + warm-up-weighted GKL with the teacher's class prior."""
    student, teacher, loss = build_kd(args)
    student, teacher = student.to(device).train(), teacher.to(device)
    prior = ClassPrior(args.classes, temperature=4.0).to(device)

    def step_loss(xb, yb):
        teacher_logits = teacher(xb)
        logits = student(xb)
        total = F.cross_entropy(logits, yb) + (1 / 20) * loss(
            logits, teacher_logits, yb, class_prior=prior.rows(yb)
        )
        prior.update(teacher_logits, yb)
        return total

    return student, step_loss


def adversarial_loss_fn(args, device):
    """Plain-loop loss of trades / gkl_at: TRADES inner max, then the objective on both branches."""
    model, loss = build_adversarial(args)
    model = model.to(device).train()
    prior = ClassPrior(args.classes, temperature=4.0).to(device) if args.task == "gkl_at" else None

    def step_loss(xb, yb):
        x_adv = trades_perturb(
            model, xb, eps=args.eps, step_size=args.eps / 4, steps=args.steps_attack
        )
        model.train()
        nat_logits = model(xb)
        adv_logits = model(x_adv)
        ce = F.cross_entropy(nat_logits, yb)
        if prior is None:
            return ce + TRADES_BETA * trades_kl(adv_logits, nat_logits)
        total = ce + loss(adv_logits, nat_logits, yb, class_prior=prior.rows(yb))
        prior.update(nat_logits, yb)
        return total

    return model, step_loss


def plain_step_times(args, x, y) -> list[float]:
    device = torch.device(args.device)
    build = kd_loss_fn if args.task == "kd" else adversarial_loss_fn
    model, step_loss = build(args, device)
    optimizer = sgd(model.parameters())
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        total = step_loss(x.to(device), y.to(device))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[args.warmup :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=TASKS, default="kd")
    parser.add_argument("--teacher", default="resnet32x4", help="kd only")
    parser.add_argument("--student", default="resnet8x4", help="the trained network")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eps", type=float, default=8 / 255, help="trades / gkl_at: L-inf eps")
    parser.add_argument("--steps-attack", type=int, default=5, help="trades / gkl_at: inner steps")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--baseline",
        nargs="+",
        choices=["all", *BASELINES],
        help="feature distillers to time against KD (img/s ratio) instead of the overhead test",
    )
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, *args.shape, generator=g)
    y = torch.randint(0, args.classes, (args.batch,), generator=g)
    if args.baseline:
        compare_baselines(args, x, y)
        return
    lightning_times, plain_times = [], []
    for _ in range(args.rounds):
        lightning_times += lightning_step_times(args, x, y)
        plain_times += plain_step_times(args, x, y)
    lit, plain = statistics.median(lightning_times), statistics.median(plain_times)
    what = f"{args.teacher} -> {args.student}" if args.task == "kd" else args.student
    task_name = {"kd": "DistillationTask", "trades": "AdversarialTask (trades)"}.get(
        args.task, "AdversarialTask (gkl)"
    )
    print(
        f"task {args.task}: {what}, batch {args.batch}, device {args.device}, "
        f"threads {torch.get_num_threads()}, {len(plain_times)} timed steps each"
    )
    print("| path | median step (ms) | images/s |")
    print("|---|---|---|")
    print(f"| plain PyTorch loop | {plain * 1e3:.1f} | {args.batch / plain:.1f} |")
    print(f"| Lightning {task_name} | {lit * 1e3:.1f} | {args.batch / lit:.1f} |")
    print(f"framework overhead: {100 * (lit / plain - 1):+.1f}%")


if __name__ == "__main__":
    main()
