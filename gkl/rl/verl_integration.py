"""gkl's ``kl_penalty`` / ``agg_loss`` inside verl's Ray workers: import this module there.

verl imports ``actor_rollout_ref.model.external_lib`` (a module name) in every worker that
builds the model (``HfModelConfig.__post_init__`` and the FSDP workers call
``verl.utils.import_utils.import_external_libs``), so::

    python -m verl.trainer.main_ppo ... actor_rollout_ref.model.external_lib=gkl.rl.verl_integration

runs ``install()`` in each process that builds the model, the driver included. ``install()``
replaces ``kl_penalty`` and ``agg_loss`` in ``verl.trainer.ppo.core_algos`` (so later ``from
... import`` statements get gkl's) and in every verl module already imported that holds
verl's function under that name (``verl.workers.actor.dp_actor``,
``verl.workers.actor.megatron_actor``, ``verl.workers.utils.losses``, the distillation losses,
...). What changes for verl: "+" names (``kl_loss_type=k3+``, straight-through k2 gradient)
work where verl v0.6.0-b178a3c raises NotImplementedError; bad masks / normalisers raise a
ValueError naming the argument; ``loss_agg_mode=dr_grpo`` exists. Values equal verl's: each
aggregation mode of the installed verl is compared with gkl's on a probe at install, and a
mode whose value differs (verl 0.9.1 changed ``seq-mean-token-sum-norm``) or that gkl lacks
keeps verl's own function. Set ``GKL_VERL_CHECK_VALUES=1`` to refuse NaN / positive log-probs
in ``kl_penalty`` (a device sync per call); by default values pass through as in verl.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from gkl.rl.kl import LOSS_AGG_MODES, agg_loss, kl_penalty

CORE_ALGOS = "verl.trainer.ppo.core_algos"
PATCHED_NAMES = ("kl_penalty", "agg_loss")
VERL_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
    "token-sum",
)
_log = logging.getLogger(__name__)


def _probe_modes(original: Callable[..., torch.Tensor]) -> tuple[str, ...]:
    """verl's modes whose value differs from gkl's on a probe batch (these keep verl's)."""
    g = torch.Generator().manual_seed(0)
    loss_mat = torch.randn(4, 6, generator=g, dtype=torch.float64)
    loss_mask = (torch.rand(4, 6, generator=g) > 0.3).to(torch.float64)
    loss_mask[0] = 1.0
    loss_mask[3] = 0.0  # an all-padding row
    normalisers = (
        {},
        {"dp_size": 2, "batch_num_tokens": 29.0, "global_batch_size": 9, "loss_scale_factor": 7},
    )
    differ = []
    for mode in VERL_AGG_MODES:
        for extra in normalisers:
            kwargs = {"loss_mat": loss_mat, "loss_mask": loss_mask, "loss_agg_mode": mode, **extra}
            try:
                theirs = original(**kwargs)
            except (ValueError, NotImplementedError):
                if mode in LOSS_AGG_MODES:
                    continue  # a mode this verl lacks: gkl's is an addition, not a change
                break
            if mode not in LOSS_AGG_MODES or not torch.allclose(
                agg_loss(**kwargs), theirs, rtol=1e-6, atol=0.0
            ):
                differ.append(mode)
                break
    return tuple(differ)


def _gkl_agg_loss(original: Callable[..., torch.Tensor], verl_modes: tuple[str, ...]):
    def patched_agg_loss(
        loss_mat: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
        loss_agg_mode: str = "token-mean",
        dp_size: int = 1,
        batch_num_tokens: Any = None,
        global_batch_size: Any = None,
        loss_scale_factor: Any = None,
    ) -> torch.Tensor:
        fn = original if loss_agg_mode in verl_modes else agg_loss
        return fn(
            loss_mat=loss_mat,
            loss_mask=loss_mask,
            loss_agg_mode=loss_agg_mode,
            dp_size=dp_size,
            batch_num_tokens=batch_num_tokens,
            global_batch_size=global_batch_size,
            loss_scale_factor=loss_scale_factor,
        )

    patched_agg_loss.gkl_original = original  # type: ignore[attr-defined]
    patched_agg_loss.gkl_verl_modes = verl_modes  # type: ignore[attr-defined]
    return patched_agg_loss


def _gkl_kl_penalty(original: Callable[..., torch.Tensor], check_values: bool):
    def patched_kl_penalty(
        logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str
    ) -> torch.Tensor:
        return _kl_penalty(logprob, ref_logprob, kl_penalty, check_values=check_values)

    patched_kl_penalty.gkl_original = original  # type: ignore[attr-defined]
    return patched_kl_penalty


_kl_penalty = kl_penalty  # the parameter name above shadows the function


def install(*, check_values: bool | None = None) -> list[str]:
    """Patch verl's ``kl_penalty`` / ``agg_loss`` wherever verl holds them; returns the names.

    Idempotent. ``check_values`` (default: ``GKL_VERL_CHECK_VALUES=1`` in the environment) makes
    ``kl_penalty`` refuse NaN / Inf / positive log-probs.
    """
    if check_values is None:
        check_values = os.environ.get("GKL_VERL_CHECK_VALUES", "0") == "1"
    core = importlib.import_module(CORE_ALGOS)
    originals = {}
    for name in PATCHED_NAMES:
        current = getattr(core, name)
        originals[name] = getattr(current, "gkl_original", current)
    replacement = {
        "kl_penalty": _gkl_kl_penalty(originals["kl_penalty"], check_values),
        "agg_loss": _gkl_agg_loss(originals["agg_loss"], _probe_modes(originals["agg_loss"])),
    }
    patched = []
    for mod_name, module in list(sys.modules.items()):
        if module is None or not (mod_name == "verl" or mod_name.startswith("verl.")):
            continue
        for name in PATCHED_NAMES:
            held = getattr(module, name, None)
            if held is not None and getattr(held, "gkl_original", held) is originals[name]:
                setattr(module, name, replacement[name])
                patched.append(f"{mod_name}.{name}")
    kept = replacement["agg_loss"].gkl_verl_modes
    _log.info("gkl patched %s; agg_loss modes kept as verl's: %s", patched, kept or "none")
    return sorted(patched)


if "verl" in sys.modules or importlib.util.find_spec("verl") is not None:
    install()
