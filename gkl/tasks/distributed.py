"""Multi-process training concerns: the DDP set-up check and the buffers DDP must not sync."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gkl.losses import class_priors


def _device_count(devices: Any, accelerator: str) -> int | None:
    """Processes per node for ``trainer.devices`` (``None``: unknown before the run)."""
    if devices in ("auto", -1, "-1"):
        if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
            return torch.cuda.device_count()
        return 1 if accelerator in ("auto", "cpu") else None
    if isinstance(devices, int) and not isinstance(devices, bool):
        return devices
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    if isinstance(devices, str) and "," in devices:
        return len([p for p in devices.split(",") if p.strip()])
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return len(devices)
    return None


def check_distributed(trainer_cfg: Mapping[str, Any]) -> None:
    """Fail before anything is built when a DDP strategy would run as a single process."""
    strategy = trainer_cfg.get("strategy", "auto")
    name = strategy if isinstance(strategy, str) else str(strategy.get("_target_", ""))
    if "ddp" not in name.lower():
        return
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    devices = _device_count(trainer_cfg.get("devices", "auto"), accelerator)
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    if devices is not None and devices * nodes == 1:
        raise ValueError(
            f"trainer=ddp with trainer.devices={trainer_cfg.get('devices')} "
            f"(accelerator {accelerator}) and trainer.num_nodes={nodes} is one process: set "
            "trainer.devices=N > 1 (GPUs, or CPU processes with trainer.accelerator=cpu) or "
            "trainer.num_nodes, or train on one device with trainer=gpu / trainer=cpu"
        )


def exclude_rank_local_buffers(task: nn.Module) -> list[str]:
    """Keep DDP from overwriting each process's ``ClassPrior.sums`` with rank 0's.

    DDP broadcasts every buffer from rank 0 before each forward; the sums of a
    :class:`ClassPrior` are per-process partial sums (all-reduced in ``end_epoch``), so they must
    not be synchronised. Returns the excluded buffer names.
    """
    names = [f"{name}.sums" for name, _ in class_priors(task)]
    if names:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(task, names)
    return names
