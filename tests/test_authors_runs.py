"""Whole-run quantities of the paper's recipes against references written from the authors' code
(jiequancui/DKL c5e8ad2 DKLv2: Adv-training-dkl/train_dkl_cifar10/100.py, train_trades_cifar.py,
autoaug.py, Imbalanced_KD-dkl/imagenetlt_distill_dkl.py; mdistiller's engine/utils.py,
distillers/GKL_KD.py and models/cifar/wrn.py): the lr and warm-up factor of every epoch, two
consecutive steps across an epoch boundary, the WRN BatchNorm statistics after two steps, the
AutoAugment policy on fixed images and draws, the TRADES loader and the ImageNet-LT split files."""

from __future__ import annotations

import copy
import math
import random
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from PIL import Image, ImageEnhance, ImageOps
from torch import nn

from gkl.config import compose_config
from gkl.data.build import build_datamodule
from gkl.train import build_task

pytestmark = pytest.mark.usefixtures("one_thread")


def compose(*overrides: str):
    return compose_config("train.yaml", list(overrides))


# ----------------------------------------------------------------------------- the authors' lr


def gkl_at_lr(lr: float, epochs: int, warmup: int = 0):
    """train_dkl_cifar10/100.py adjust_learning_rate_cosine(optimizer, epoch), 1-based epoch."""

    def at(epoch: int) -> float:
        if epoch < warmup:
            return lr / warmup * epoch
        return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup + 1)))

    return [at(e) for e in range(1, epochs + 1)]


def trades_lr(lr: float, epochs: int):
    """train_trades_cifar.py adjust_learning_rate_cosine, 1-based epoch."""
    return [lr * 0.5 * (1 + np.cos((e - 1) / epochs * np.pi)) for e in range(1, epochs + 1)]


def mdistiller_lr(lr: float, epochs: int, stages, rate: float = 0.1):
    """mdistiller engine/utils.py adjust_learning_rate(epoch, cfg, optimizer), 1-based epoch."""
    out = []
    for epoch in range(1, epochs + 1):
        steps = np.sum(epoch > np.asarray(stages))
        out.append(lr * rate**steps if steps > 0 else lr)
    return out


def imagenet_lt_lr(lr: float, epochs: int, warmup: int):
    """imagenetlt_distill_dkl.py adjust_learning_rate(optimizer, epoch, args), 0-based epoch,
    args.cos True."""
    out = []
    for epoch in range(epochs):
        if epoch < warmup:
            out.append(lr / warmup * (epoch + 1))
        else:
            out.append(
                lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup + 1) / (epochs - warmup + 1)))
            )
    return out


# recipe: (the authors' lr of every epoch, their warm-up factor of every epoch, what it is).
GKL_AT = ("cifar10_gkl_at", "cifar100_gkl_at", "cifar10_gkl_at_autoaug", "cifar100_gkl_at_autoaug")
SECOND_RUNS = ("cifar10_gkl_at_gamma02", "cifar100_gkl_at_gamma04")
KD = (
    "cifar100_kd",
    "cifar100_kd_res56_res20",
    "cifar100_kd_res110_res32",
    "cifar100_kd_res32x4_shuv1",
    "cifar100_kd_res32x4_shuv2",
    "cifar100_kd_res50_mv2",
    "cifar100_kd_vgg13_mv2",
    "cifar100_kd_vgg13_vgg8",
    "cifar100_kd_wrn40_2_shuv1",
    "cifar100_kd_wrn40_2_wrn16_2",
    "cifar100_kd_wrn40_2_wrn40_1",
)
KD_LR = {name: 0.01 if ("shuv" in name or "mv2" in name) else 0.05 for name in KD}


def authors_schedule(name: str) -> tuple[list[float], list[float], str]:
    """(lr of every epoch, warm-up factor of every epoch, source) from the authors' functions."""
    if name in GKL_AT + SECOND_RUNS:
        # the eps ramp varepsilon = epsilon * epoch / epochs is the warm-up of these runs
        return gkl_at_lr(0.2, 200), [e / 200 for e in range(1, 201)], "adjust_learning_rate_cosine"
    if name in ("cifar10_trades", "cifar100_trades"):
        return trades_lr(0.2, 200), [e / 200 for e in range(1, 201)], "train_trades_cifar.py"
    if name in KD:
        warm = [min(e / 20, 1.0) for e in range(1, 241)]  # GKL_KD: min(epoch / warmup, 1)
        return mdistiller_lr(KD_LR[name], 240, [150, 180, 210]), warm, "mdistiller"
    if name in ("imagenet_kd", "imagenet_kd_r50_mv1"):
        warm = [min(e / 5, 1.0) for e in range(1, 101)]
        return mdistiller_lr(0.2, 100, [30, 60, 90]), warm, "mdistiller (ImageNet)"
    if name in ("imagenet_lt_kd", "imagenet_lt_teacher"):
        return imagenet_lt_lr(0.05, 90, 10), [1.0] * 90, "imagenetlt_distill_dkl.py"
    raise KeyError(name)


SCHEDULED = (
    *GKL_AT,
    *SECOND_RUNS,
    "cifar10_trades",
    "cifar100_trades",
    *KD,
    "imagenet_kd",
    "imagenet_kd_r50_mv1",
    "imagenet_lt_kd",
    "imagenet_lt_teacher",
)


def our_schedule(cfg) -> tuple[list[float], list[float]]:
    """The lr of every epoch as Lightning steps the recipe's scheduler (interval "epoch"), and
    the task's warm-up factor of every epoch (distillation weight, or the eps ramp of AT)."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = instantiate(cfg.optim.optimizer)(params=[param])
    scheduler = instantiate(cfg.optim.scheduler)(optimizer=optimizer)
    c = cfg.data.num_classes
    teacher = nn.Linear(1, c) if cfg.task._target_ == "gkl.tasks.DistillationTask" else None
    task = build_task(cfg, nn.Linear(1, c), teacher, instantiate(cfg.loss), c)
    lrs, warm = [], []
    for epoch in range(cfg.trainer.max_epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        task._trainer = SimpleNamespace(current_epoch=epoch)
        if hasattr(task, "eps_factor"):  # adversarial training: the eps ramp
            warm.append(task.eps_factor())
        elif hasattr(task, "distill_weight"):  # distillation: the weight of the KD term
            warm.append(task.distill_weight())
        else:  # plain CE (a teacher)
            warm.append(1.0)
        optimizer.step()
        scheduler.step()
    return lrs, warm


@pytest.mark.parametrize("name", SCHEDULED)
def test_lr_and_warmup_of_every_epoch_equal_the_authors_functions(name):
    cfg = compose(f"+experiment={name}")
    ref_lr, ref_warm, source = authors_schedule(name)
    lrs, warm = our_schedule(cfg)
    assert len(lrs) == len(ref_lr)
    lr_diff = max(abs(a - b) for a, b in zip(lrs, ref_lr, strict=True))
    warm_diff = max(abs(a - b) for a, b in zip(warm, ref_warm, strict=True))
    print(
        f"{name}: {len(lrs)} epochs vs {source}: max |lr - authors' lr| = {lr_diff:.3e}, "
        f"max |warm-up factor - authors'| = {warm_diff:.3e}"
    )
    assert lr_diff <= 1e-15 and warm_diff <= 1e-15


def test_the_authors_cosine_is_not_the_plain_cosine():
    """The schedule the GKL-AT recipes used before: 0.143994 vs 0.143086 at epoch 72."""
    ours = our_schedule(compose("+experiment=cifar10_gkl_at"))[0]
    plain = our_schedule(compose("+experiment=cifar10_gkl_at", "optim.scheduler.kind=cosine"))[0]
    assert abs(ours[71] - 0.143086) < 1e-6 and abs(plain[71] - 0.143994) < 1e-6
    assert plain == trades_lr(0.2, 200)


# ----------------------------------------------------------------------------- epoch boundary


class _Record(pl.Callback):
    """Per training step: the batch, the lr, the prior in use; then seeds the attack's noise."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(
            {
                "x": batch[0].detach().clone().double(),
                "y": batch[1].detach().clone(),
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
                "prior": pl_module.class_prior.prior.detach().clone(),
            }
        )
        torch.manual_seed(100 + trainer.global_step)  # the first draw: x + 0.001 N(0, I)


def test_two_steps_across_an_epoch_boundary_equal_the_authors_loop(tmp_path, authors_dkl):
    """cifar10_gkl_at driven by a Lightning Trainer, one batch an epoch, epochs 1 and 2 in
    float64, against train_dkl_cifar10.py's loop: lr from adjust_learning_rate_cosine each epoch,
    eps ramp, the class prior WEIGHT / WEIGHT.sum(1) of epoch 1 used in epoch 2."""
    cfg = compose(
        "+experiment=cifar10_gkl_at",
        "model.name=wrn_16_1",
        "data.synthetic=true",
        "data.batch_size=10",
        "++data.synthetic_sizes=[10,2,2]",
        "data.num_workers=0",
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'run'}",
    )
    datamodule = build_datamodule(cfg.data)
    torch.manual_seed(0)
    model = instantiate(cfg.model).double()
    initial = copy.deepcopy(model.model)
    task = build_task(cfg, model, None, instantiate(cfg.loss), 10)
    record = _Record()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        precision="64-true",
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(task, datamodule=datamodule)
    assert len(record.steps) == 2

    # train_dkl_cifar10.py: 1-based epochs, perturb_input(alpha=1, beta=0), dkl_loss(4, 20, 1).
    ref = copy.deepcopy(initial).double()
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)
    weight = torch.ones(10, 10, dtype=torch.float64) / 10
    for epoch, step in zip((1, 2), record.steps, strict=True):
        lr = 0.2 * 0.5 * (1.0 + math.cos(math.pi * epoch / 201))
        for group in optimizer.param_groups:
            group["lr"] = lr
        assert step["lr"] == pytest.approx(lr, rel=1e-15), epoch  # the lr changed at the boundary
        torch.testing.assert_close(step["prior"], weight, rtol=0, atol=1e-15)
        x, y = step["x"], step["y"]
        onehot = F.one_hot(y, 10).double()
        sample_weight = onehot @ weight
        varepsilon = 8 / 255 * (epoch / 200)
        torch.manual_seed(100 + epoch - 1)
        x_adv = x + 0.001 * torch.randn(x.shape, dtype=torch.float64)
        ref.eval()
        for _ in range(5):
            x_adv.requires_grad_()
            with torch.enable_grad():
                loss_kl = authors_dkl(ref(x_adv), ref(x), sample_weight, 1.0, 0.0, 1.0)
            grad = torch.autograd.grad(loss_kl, [x_adv])[0]
            x_adv = x_adv.detach() + varepsilon / 2 * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - varepsilon), x + varepsilon).clamp(0.0, 1.0)
        ref.train()
        logits_adv, logits_nat = ref(x_adv), ref(x)
        weight_sums = onehot.t() @ F.softmax(logits_nat.detach() / 4.0, dim=-1)
        loss = F.cross_entropy(logits_nat, y) + authors_dkl(
            logits_adv, logits_nat, sample_weight, 4.0, 20.0, 1.0
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        weight = weight_sums / weight_sums.sum(dim=1, keepdim=True)  # every class is in the batch
    assert not torch.allclose(record.steps[1]["prior"], record.steps[0]["prior"])  # finalised
    torch.testing.assert_close(task.class_prior.prior, weight, rtol=0, atol=1e-14)
    got = task.model.model.state_dict()
    worst = max(
        float((got[k].double() - v.double()).abs().max()) for k, v in ref.state_dict().items()
    )
    lrs = [s["lr"] for s in record.steps]
    print(f"cifar10_gkl_at epochs 1-2: lr {lrs}, max |state - authors' loop| = {worst:.3e}")
    for key, value in ref.state_dict().items():  # weights and BatchNorm running statistics
        torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-13, msg=key)


# ----------------------------------------------------------------------------- mdistiller WRN


class _MdBlock(nn.Module):
    """mdistiller models/cifar/wrn.py BasicBlock (inplace ReLUs included)."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            (not self.equalInOut) and nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
        ) or None

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class _MdStage(nn.Module):
    def __init__(self, n, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                _MdBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(n)
            ]
        )

    def forward(self, x):
        return self.layer(x)


class _MdWideResNet(nn.Module):
    """mdistiller's WideResNet forward: logits, then preact_feats through three BNs again."""

    def __init__(self, depth, num_classes, widen_factor):
        super().__init__()
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = _MdStage(n, ch[0], ch[1], 1)
        self.block2 = _MdStage(n, ch[1], ch[2], 2)
        self.block3 = _MdStage(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]

    def forward(self, x):
        out = self.conv1(x)
        out = self.block1(out)
        f1 = out
        out = self.block2(out)
        f2 = out
        out = self.block3(out)
        f3 = out
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        out = out.reshape(-1, self.nChannels)
        out = self.fc(out)
        self.block2.layer[0].bn1(f1)  # f1_pre
        self.block3.layer[0].bn1(f2)  # f2_pre
        self.bn1(f3)  # f3_pre
        return out


def mdistiller_gkl_kd(s, t, alpha, beta, gamma, temperature, t2):
    """GKL_KD.py dkl_loss with GI False (the pair's setting): weights softmax(t / T2) ** gamma."""
    c = s.shape[1]
    delta_n = t.view(-1, c, 1) - t.view(-1, 1, c)
    delta_a = s.view(-1, c, 1) - s.view(-1, 1, c)
    s_n = F.softmax(t / t2, dim=1).pow(gamma)
    p_n = s_n.view(-1, c, 1) @ s_n.view(-1, 1, c)
    mse = 0.25 * ((delta_n - delta_a).pow(2) * p_n).sum() / p_n.sum()
    sce = -(F.softmax(t / temperature, -1) * F.log_softmax(s / temperature, -1)).sum(1).mean()
    return beta * mse + alpha * sce


def test_wrn16_2_student_bn_statistics_after_two_steps_equal_mdistillers():
    name = "cifar100_kd_wrn40_2_wrn16_2"
    cfg = compose(f"+experiment={name}")
    assert cfg.model.mdistiller_bn_double_update is True
    assert "mdistiller_bn_double_update" not in compose("+experiment=cifar100_kd").model
    torch.manual_seed(0)
    model = instantiate(cfg.model).double()
    teacher = instantiate(cfg.teacher, checkpoint=None, allow_random=True).double()
    initial_state = copy.deepcopy(model.model.state_dict())
    task = build_task(cfg, model, teacher, instantiate(cfg.loss), 100)
    task.log_train = lambda *args, **kwargs: None
    ref = _MdWideResNet(16, 100, 2).double()
    ref.load_state_dict(initial_state)  # the same keys: state_dict layout unchanged
    sgd = {"momentum": 0.9, "weight_decay": 5e-4, "nesterov": False}
    ours_opt = torch.optim.SGD(model.parameters(), lr=0.05, **sgd)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, **sgd)
    off = instantiate(cfg.model, mdistiller_bn_double_update=False).double()
    off.model.load_state_dict(initial_state)
    off_opt = torch.optim.SGD(off.parameters(), lr=0.05, **sgd)
    gen = torch.Generator().manual_seed(5)
    loss_cfg = cfg.loss
    for step in range(2):
        x = torch.rand(4, 3, 32, 32, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 100, (4,), generator=gen)
        task._trainer = SimpleNamespace(current_epoch=0)  # epoch 1: warm-up 1 / 20
        ours_opt.zero_grad()
        task.training_step((x, y), step).backward()
        ours_opt.step()
        # mdistiller: student(normalised image), GKL_KD.forward_train, SGD
        x_norm = (x - model.mean) / model.std
        logits = ref(x_norm)
        t = teacher(x)
        loss = F.cross_entropy(logits, y) + min(1 / 20, 1.0) * mdistiller_gkl_kd(
            logits, t, loss_cfg.alpha, loss_cfg.beta, loss_cfg.gamma, 4.0, 4.0
        )
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        off_opt.zero_grad()
        off_logits = off(x)
        off_loss = F.cross_entropy(off_logits, y) + (1 / 20) * mdistiller_gkl_kd(
            off_logits, t, loss_cfg.alpha, loss_cfg.beta, loss_cfg.gamma, 4.0, 4.0
        )
        off_loss.backward()
        off_opt.step()
    got, off_state = model.model.state_dict(), off.model.state_dict()
    assert got.keys() == ref.state_dict().keys()
    stats = [k for k in got if "running_" in k]
    diff = max(float((got[k] - ref.state_dict()[k]).abs().max()) for k in stats)
    off_diff = max(float((off_state[k] - ref.state_dict()[k]).abs().max()) for k in stats)
    print(
        f"{name}: student BN running stats after 2 steps, max |gkl - mdistiller| = {diff:.3e} "
        f"(option off: {off_diff:.3f})"
    )
    assert diff <= 1e-12 and off_diff > 1e-3
    assert int(got["block2.layer.0.bn1.num_batches_tracked"]) == 4  # twice per step
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-12, msg=key)


# ----------------------------------------------------------------------------- AutoAugment


class _AuthorsSubPolicy:
    """autoaug.py SubPolicy, as written by the authors (np.int -> int for numpy >= 1.24)."""

    def __init__(self, p1, operation1, magnitude_idx1, p2, operation2, magnitude_idx2):
        fillcolor = (128, 128, 128)
        ranges = {
            "shearX": np.linspace(0, 0.3, 10),
            "shearY": np.linspace(0, 0.3, 10),
            "translateX": np.linspace(0, 150 / 331, 10),
            "translateY": np.linspace(0, 150 / 331, 10),
            "rotate": np.linspace(0, 30, 10),
            "color": np.linspace(0.0, 0.9, 10),
            "posterize": np.round(np.linspace(8, 4, 10), 0).astype(int),
            "solarize": np.linspace(256, 0, 10),
            "contrast": np.linspace(0.0, 0.9, 10),
            "sharpness": np.linspace(0.0, 0.9, 10),
            "brightness": np.linspace(0.0, 0.9, 10),
            "autocontrast": [0] * 10,
            "equalize": [0] * 10,
            "invert": [0] * 10,
        }

        def rotate_with_fill(img, magnitude):
            rot = img.convert("RGBA").rotate(magnitude)
            return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert(
                img.mode
            )

        func = {
            "shearX": lambda img, magnitude: img.transform(
                img.size, Image.AFFINE, (1, magnitude * random.choice([-1, 1]), 0, 0, 1, 0),
                Image.BICUBIC, fillcolor=fillcolor),
            "shearY": lambda img, magnitude: img.transform(
                img.size, Image.AFFINE, (1, 0, 0, magnitude * random.choice([-1, 1]), 1, 0),
                Image.BICUBIC, fillcolor=fillcolor),
            "translateX": lambda img, magnitude: img.transform(
                img.size, Image.AFFINE,
                (1, 0, magnitude * img.size[0] * random.choice([-1, 1]), 0, 1, 0),
                fillcolor=fillcolor),
            "translateY": lambda img, magnitude: img.transform(
                img.size, Image.AFFINE,
                (1, 0, 0, 0, 1, magnitude * img.size[1] * random.choice([-1, 1])),
                fillcolor=fillcolor),
            "rotate": lambda img, magnitude: rotate_with_fill(img, magnitude),
            "color": lambda img, magnitude: ImageEnhance.Color(img).enhance(
                1 + magnitude * random.choice([-1, 1])),
            "posterize": lambda img, magnitude: ImageOps.posterize(img, magnitude),
            "solarize": lambda img, magnitude: ImageOps.solarize(img, magnitude),
            "contrast": lambda img, magnitude: ImageEnhance.Contrast(img).enhance(
                1 + magnitude * random.choice([-1, 1])),
            "sharpness": lambda img, magnitude: ImageEnhance.Sharpness(img).enhance(
                1 + magnitude * random.choice([-1, 1])),
            "brightness": lambda img, magnitude: ImageEnhance.Brightness(img).enhance(
                1 + magnitude * random.choice([-1, 1])),
            "autocontrast": lambda img, magnitude: ImageOps.autocontrast(img),
            "equalize": lambda img, magnitude: ImageOps.equalize(img),
            "invert": lambda img, magnitude: ImageOps.invert(img),
        }  # fmt: skip
        self.p1, self.operation1 = p1, func[operation1]
        self.magnitude1 = ranges[operation1][magnitude_idx1]
        self.p2, self.operation2 = p2, func[operation2]
        self.magnitude2 = ranges[operation2][magnitude_idx2]

    def __call__(self, img):
        if random.random() < self.p1:
            img = self.operation1(img, self.magnitude1)
        if random.random() < self.p2:
            img = self.operation2(img, self.magnitude2)
        return img


# autoaug.py CIFAR10Policy's 25 sub-policies, copied from the authors' file.
AUTHORS_CIFAR10 = [
    (0.1, "invert", 7, 0.2, "contrast", 6), (0.7, "rotate", 2, 0.3, "translateX", 9),
    (0.8, "sharpness", 1, 0.9, "sharpness", 3), (0.5, "shearY", 8, 0.7, "translateY", 9),
    (0.5, "autocontrast", 8, 0.9, "equalize", 2), (0.2, "shearY", 7, 0.3, "posterize", 7),
    (0.4, "color", 3, 0.6, "brightness", 7), (0.3, "sharpness", 9, 0.7, "brightness", 9),
    (0.6, "equalize", 5, 0.5, "equalize", 1), (0.6, "contrast", 7, 0.6, "sharpness", 5),
    (0.7, "color", 7, 0.5, "translateX", 8), (0.3, "equalize", 7, 0.4, "autocontrast", 8),
    (0.4, "translateY", 3, 0.2, "sharpness", 6), (0.9, "brightness", 6, 0.2, "color", 8),
    (0.5, "solarize", 2, 0.0, "invert", 3), (0.2, "equalize", 0, 0.6, "autocontrast", 0),
    (0.2, "equalize", 8, 0.6, "equalize", 4), (0.9, "color", 9, 0.6, "equalize", 6),
    (0.8, "autocontrast", 4, 0.2, "solarize", 8), (0.1, "brightness", 3, 0.7, "color", 0),
    (0.4, "solarize", 5, 0.9, "autocontrast", 3), (0.9, "translateY", 9, 0.7, "translateY", 9),
    (0.9, "autocontrast", 2, 0.8, "solarize", 3), (0.8, "equalize", 8, 0.1, "invert", 3),
    (0.7, "translateY", 9, 0.9, "autocontrast", 1),
]  # fmt: skip


def authors_policy(img):
    """CIFAR10Policy.__call__: policy_idx = random.randint(0, 24), then the sub-policy."""
    policy_idx = random.randint(0, len(AUTHORS_CIFAR10) - 1)
    return _AuthorsSubPolicy(*AUTHORS_CIFAR10[policy_idx])(img)


def eight_images() -> list[Image.Image]:
    gen = np.random.default_rng(0)
    images = []
    for i in range(8):  # smooth gradients + noise: the operations all change something
        yy, xx = np.mgrid[0:32, 0:32]
        base = np.stack([xx * 8, yy * 8, (xx + yy) * 4 + 32 * i], -1) % 256
        noisy = base + gen.integers(-20, 21, base.shape)
        images.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return images


def test_autoaugment_policy_equals_the_authors_cifar10policy_on_fixed_images_and_draws():
    from gkl.data.autoaugment import (
        CIFAR10_SUBPOLICIES,
        MAGNITUDES,
        CIFAR10Policy,
        apply_operation,
    )

    assert [tuple(p) for p in AUTHORS_CIFAR10] == list(CIFAR10_SUBPOLICIES)
    policy = CIFAR10Policy()
    images = eight_images()
    worst, changed, compared = 0, 0, 0
    # every sub-policy on every image, both operations forced on (p = 1), ten sign draws each
    for k, (_, op1, bin1, _, op2, bin2) in enumerate(CIFAR10_SUBPOLICIES):
        for i, image in enumerate(images):
            for seed in range(10):
                random.seed(1000 * k + 10 * i + seed)
                ref = _AuthorsSubPolicy(1.0, op1, bin1, 1.0, op2, bin2)(image)
                random.seed(1000 * k + 10 * i + seed)
                random.random()  # the authors' `random.random() < p1` draw (p1 = 1)
                ours = apply_operation(image, op1, MAGNITUDES[op1][bin1])
                random.random()  # `random.random() < p2`
                ours = apply_operation(ours, op2, MAGNITUDES[op2][bin2])
                a, b = np.asarray(ref, dtype=np.int16), np.asarray(ours, dtype=np.int16)
                worst = max(worst, int(np.abs(a - b).max()))
                changed += int((a != np.asarray(image)).any())
                compared += 1
    # the policy itself: sub-policy index and probabilities drawn from the same seed
    for i, image in enumerate(images):
        for seed in range(25):
            random.seed(seed * 8 + i)
            ref = np.asarray(authors_policy(image), dtype=np.int16)
            random.seed(seed * 8 + i)
            ours = np.asarray(policy(image), dtype=np.int16)
            worst = max(worst, int(np.abs(ref - ours).max()))
    print(
        f"CIFAR10Policy vs authors' autoaug.CIFAR10Policy: {compared} forced sub-policy runs "
        f"({changed} changed the image) + 200 policy draws on 8 fixed images: max pixel "
        f"difference {worst}"
    )
    assert worst == 0 and changed > 0.9 * compared


def test_autoaugment_operations_are_the_authors_not_torchvisions():
    """Grey fill, rotation always counter-clockwise (no sign draw), solarize thresholds
    linspace(256, 0, 10) (bin 2: 199.1; torchvision's 198.3 would invert 199 too)."""
    from gkl.data.autoaugment import MAGNITUDES, apply_operation

    white = Image.new("RGB", (32, 32), (255, 255, 255))
    rotated = np.asarray(apply_operation(white, "rotate", MAGNITUDES["rotate"][9]))
    assert (rotated[0, 0] == 128).all()  # the corner is filled grey, not black
    image = eight_images()[0]
    outs = []
    for seed in (0, 1, 2, 3):
        random.seed(seed)
        outs.append(np.asarray(apply_operation(image, "rotate", 30.0)))
    assert all(np.array_equal(outs[0], o) for o in outs)
    assert not np.array_equal(outs[0], np.asarray(apply_operation(image, "rotate", -30.0)))
    level = Image.new("RGB", (4, 4), (199, 200, 0))
    out = np.asarray(apply_operation(level, "solarize", MAGNITUDES["solarize"][2]))
    assert MAGNITUDES["solarize"][2] == pytest.approx(256 * 7 / 9)
    assert tuple(int(v) for v in out[0, 0]) == (199, 55, 0)


def test_autoaug_second_view_is_the_authors_policy_and_torchvisions_stays_selectable():
    from gkl.data.augment import POLICIES, PILPolicy, SecondView

    for name in ("cifar10_gkl_at_autoaug", "cifar100_gkl_at_autoaug"):
        view = compose(f"+experiment={name}").data.second_view
        assert (view.autoaugment, view.cutout) == ("authors_cifar10", 0)
    assert {"authors_cifar10", "torchvision_cifar10", "torchvision_imagenet"} <= set(POLICIES)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    for name in ("authors_cifar10", "torchvision_cifar10"):
        out = SecondView(name)(images)
        assert out.dtype == torch.uint8 and out.shape == images.shape
    identity = PILPolicy(lambda image: image)
    assert torch.equal(identity(images[0]), images[0])  # the tensor <-> PIL round trip is exact
    with pytest.raises(ValueError, match="authors_cifar10"):
        SecondView("cifar10")


def test_trades_recipes_drop_the_last_incomplete_batch_like_train_trades_cifar():
    recipes = {"cifar10_trades": True, "cifar100_trades": True, "cifar10_gkl_at": False}
    for name, drop in recipes.items():
        cfg = compose(
            f"+experiment={name}", "data.synthetic=true", "data.batch_size=4",
            "++data.synthetic_sizes=[10,2,2]", "data.num_workers=0",
        )  # fmt: skip
        assert cfg.data.get("drop_last", False) is drop
        datamodule = build_datamodule(cfg.data)
        datamodule.setup("fit")
        # 10 images of batch 4: 2 batches (390 of 128 on 50,000) with drop_last, else 3 (391)
        assert len(datamodule.train_dataloader()) == (2 if drop else 3)


# ----------------------------------------------------------------------------- ImageNet-LT


def fake_imagenet_lt(root) -> dict[str, list[tuple[str, int]]]:
    """A tiny ImageNet root (train/<wnid>/*.JPEG, val/<wnid>/ILSVRC2012_val_*.JPEG) and
    ImageNet_LT_{train,val,test}.txt split files in root/ImageNet_LT, 3 classes, long-tailed."""
    wnids = ["n01440764", "n01443537", "n01484850"]
    splits = {"train": [], "val": [], "test": []}
    gen = np.random.default_rng(0)
    for label, wnid in enumerate(wnids):
        for folder, split, count in (("train", "train", 4 - label), ("train", "val", 1)):
            for i in range(count):
                name = f"{folder}/{wnid}/{wnid}_{split}{i}.JPEG"
                splits[split].append((name, label))
        for i in range(2):
            splits["test"].append((f"val/{wnid}/ILSVRC2012_val_{label * 10 + i:08d}.JPEG", label))
    for pairs in splits.values():
        for relative, label in pairs:
            path = root / "imagenet" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            size = (40 + 8 * label, 30)
            pixels = gen.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, format="JPEG")
    (root / "ImageNet_LT").mkdir()
    for split, pairs in splits.items():
        lines = "".join(f"{relative} {label}\n" for relative, label in pairs)
        (root / "ImageNet_LT" / f"ImageNet_LT_{split}.txt").write_text(lines)
    return splits


def test_imagenet_lt_data_module_reads_the_split_files_of_a_fake_layout(tmp_path):
    splits = fake_imagenet_lt(tmp_path)
    cfg = compose(
        "+experiment=imagenet_lt_kd",
        f"paths.data_dir={tmp_path}",
        "data.batch_size=2",
        "data.num_workers=0",
    )
    assert cfg.data._target_ == "gkl.data.ImageNetLTDataModule" and cfg.data.drop_last
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    train, test = datamodule.train_set, datamodule.test_set
    assert [s for s in train.samples] == splits["train"]  # the file's order and labels
    assert test.samples == splits["test"] and datamodule.val_set is test  # val_size 0: test
    x, y = train[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    assert y == 0
    batches = list(datamodule.train_dataloader())
    assert len(batches) == len(splits["train"]) // 2  # 9 images, batch 2, drop_last: 4 batches
    assert all(len(b[1]) == 2 for b in batches)
    x_test, _ = next(iter(datamodule.test_dataloader()))
    assert x_test.shape == (2, 3, 224, 224)
    held_out = build_datamodule(compose(
        "+experiment=imagenet_lt_kd", f"paths.data_dir={tmp_path}", "data.val_size=2",
        "data.num_workers=0",
    ).data)  # fmt: skip
    held_out.setup("fit")
    assert held_out.val_set.samples == splits["val"][:2]


def test_imagenet_lt_smoke_data_take_a_training_step_despite_drop_last():
    """4 synthetic images, batch 128, drop_last: the smoke run still trains on one batch."""
    cfg = compose("+experiment=imagenet_lt_kd", "data.synthetic=true", "data.num_workers=0")
    assert cfg.data.drop_last and cfg.data.batch_size > cfg.data.synthetic_sizes[0]
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    assert [len(y) for _, y in batches] == [cfg.data.synthetic_sizes[0]]


def test_imagenet_lt_bad_split_files_are_errors_naming_the_file(tmp_path):
    from gkl.data.imagenet_lt import read_split_file

    fake_imagenet_lt(tmp_path)
    split = tmp_path / "ImageNet_LT" / "ImageNet_LT_train.txt"
    split.write_text("train/n01440764/n01440764_train0.JPEG 1000\n")
    with pytest.raises(ValueError, match=r"_train.txt:1: label 1000 outside \[0, 1000\)"):
        read_split_file(split)
    split.write_text("train/n01440764/a.JPEG\n")
    with pytest.raises(ValueError, match=r"ImageNet_LT_train.txt:1: expected"):
        read_split_file(split)
    split.write_text("train/n01440764/missing.JPEG 0\n")
    datamodule = build_datamodule(
        compose("+experiment=imagenet_lt_kd", f"paths.data_dir={tmp_path}").data
    )
    with pytest.raises(FileNotFoundError, match="1 of the 1 listed images are not under"):
        datamodule.setup("fit")
    with pytest.raises(FileNotFoundError, match="ImageNet-LT split file"):
        read_split_file(tmp_path / "nowhere.txt")


def test_second_runs_and_the_documented_imagenet_lt_r50_command_compose_to_the_scripts():
    c10 = compose("+experiment=cifar10_gkl_at_gamma02")  # sh/train_dkl_cifar10.sh, second run
    assert (c10.loss.alpha, c10.loss.beta, c10.loss.gamma, c10.loss.temperature2) == (4, 20, 0.2, 4)
    c100 = compose("+experiment=cifar100_gkl_at_gamma04")  # sh/train_dkl_cifar100.sh, second run
    assert (c100.loss.alpha, c100.loss.beta, c100.loss.gamma) == (4, 20, 0.4)
    assert c100.loss.temperature2 == c100.task.attack_loss.temperature2 == 1
    assert (c100.task.attack_loss.beta, c100.task.attack_loss.gamma) == (1, 1)  # perturb_input
    r50 = compose(  # docs/reproduce.md, ImageNetLT_train_X101R50_distill_dkl.sh
        "+experiment=imagenet_lt_kd",
        "model.name=resnet50",
        "loss=gkl_imagenet_lt_x101_r50",
        "experiment_name=imagenet_lt_kd_x101_r50",
        "task_name=imagenet_lt_kd_x101_r50",
    )
    loss = r50.loss
    assert (r50.model.name, r50.teacher.name) == ("resnet50", "resnext101_32x4d")
    assert (loss.alpha, loss.beta, loss.gamma, loss.use_class_prior) == (3, 4, 0.3, True)
    assert (loss.temperature, loss.temperature2, r50.task.warmup_epochs) == (1, 1, 0)
    r18 = compose("+experiment=imagenet_lt_kd").loss  # ImageNetLT_train_X101R18_distill_dkl.sh
    assert (r18.alpha, r18.beta, r18.gamma, r18.use_class_prior) == (4, 4, 0.3, True)
