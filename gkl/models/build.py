"""Config-facing builders: a classifier on [0, 1] images, and a frozen teacher from a checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gkl.models.checkpoint import load_mdistiller_checkpoint
from gkl.models.factory import create_model, create_timm_model
from gkl.models.wrappers import FrozenTeacher, Normalized


def build_classifier(
    name: str,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    checkpoint: str | None = None,
    source: str = "zoo",
    normalize: bool = True,
    **kwargs,
) -> Normalized:
    """``Normalized(create_model(name, num_classes, **kwargs), mean, std)``: [0, 1] -> logits.

    ``normalize=False`` feeds the [0, 1] images to the network as they are (the authors'
    adversarial training and RobustBench's WideResNet): the wrapper then has mean 0 and std 1,
    an exact identity, so checkpoints keep the same ``model.`` key layout.

    With ``checkpoint`` the bare network's weights are loaded strictly (mdistiller, Lightning or
    plain state_dict files); a mismatch raises naming the architecture and the file.
    ``source="timm"`` builds ``timm.create_model(name)`` (``pretrained`` passes through).
    """
    if source not in ("zoo", "timm"):
        raise ValueError(f"unknown model source {source!r}; valid choices: ['zoo', 'timm']")
    if source == "timm":
        network = create_timm_model(name, num_classes, in_chans=len(mean), **kwargs)
    else:
        network = create_model(name, num_classes, **kwargs)
    if checkpoint is not None:
        load_mdistiller_checkpoint(network, _existing(checkpoint, name), arch_name=name)
    if not normalize:
        mean, std = [0.0] * len(mean), [1.0] * len(std)
    return Normalized(network, mean, std)


def build_teacher(
    name: str,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    checkpoint: str | None,
    pretrained: bool = False,
    source: str = "zoo",
    allow_random: bool = False,
    **kwargs,
) -> FrozenTeacher:
    """A frozen teacher: a zoo network with a checkpoint, or a pretrained timm model.

    ``allow_random`` permits a randomly initialised teacher (smoke tests on synthetic data only).
    """
    if checkpoint is None and not pretrained and not allow_random:
        raise ValueError(
            f"teacher {name!r} has neither a checkpoint nor pretrained=true: a randomly "
            "initialised teacher teaches nothing. Set teacher.checkpoint=<file> (train one with "
            "+experiment=<dataset>_teacher) or teacher.pretrained=true for timm models."
        )
    if pretrained:
        kwargs["pretrained"] = True
    network = build_classifier(name, num_classes, mean, std, checkpoint, source, **kwargs)
    return FrozenTeacher(network)


MDISTILLER_TEACHERS = "https://github.com/megvii-research/mdistiller/releases/tag/checkpoints"


def _existing(checkpoint: str, name: str) -> str:
    """``checkpoint`` if it is a file, else a ``FileNotFoundError`` saying how to get it."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint for {name!r} not found at {path}. Either fetch mdistiller's "
            f"cifar_teachers/{name}_vanilla/ckpt_epoch_240.pth (cifar_teachers.tar from "
            f"{MDISTILLER_TEACHERS}) and copy it to {path} (it loads as is), or train it: "
            f"python train.py +experiment=cifar100_teacher model.name={name} (Fashion-MNIST: "
            "+experiment=fmnist_teacher); or point teacher.checkpoint at the file."
        )
    return str(path)
