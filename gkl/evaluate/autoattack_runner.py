"""AutoAttack (Croce & Hein, 2020) through pyautoattack, with a resumable evaluation state.

Robust accuracy = (1/n) * sum_i [f(x_i) = y_i and f(x'_i) = y_i for the x'_i of every attack].

pyautoattack 0.2.0's own ``state_path`` cannot resume: it stores the attack set as the string
repr of a Python set, so reloading always fails its "different set of attacks" check, and a
resumed run reaches ``return x_adv, y_adv`` with ``y_adv`` unbound. This module therefore drives
pyautoattack one attack and one batch of still-robust points at a time (the very batches that
``run_standard_evaluation`` forms itself, so results are identical to a single call) and keeps
the progress in its own JSON state file, rewritten atomically after every batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from pyautoattack import AutoAttack
from pyautoattack.autoattack import AttackName
from torch import Tensor, nn

from gkl.evaluate.protocol import budget, check_protocol, check_sizes, model_device
from gkl.io import atomic_write_text

ATTACKS: tuple[str, ...] = get_args(AttackName)
VERSIONS = ("standard", "plus", "rand", "custom")
STATE_FORMAT = "gkl-autoattack-state/3"
# Config keys that identify the model; a mismatch on them is reported as "another model".
MODEL_KEYS = ("model_sha256", "tag")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoAttackResult:
    """Outcome of :func:`run_autoattack`.

    ``robust[i]``: x_i is classified correctly and no attack fooled it. ``x_adv`` holds the
    adversarial inputs found by this call and the clean inputs elsewhere (after a resume, points
    fooled before the interruption keep their clean input, as in fra31's AutoAttack).
    ``per_attack``: for each attack in the order run, the points still robust after it
    (``robust``, of ``n``), as a fraction (``robust_acc``) and its wall time (``seconds``,
    summed over resumed sessions) - what AutoAttack's own log prints after each attack.
    """

    clean_accuracy: float
    robust_accuracy: float
    robust: Tensor
    x_adv: Tensor
    resumed: bool
    per_attack: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _State:
    """Progress of an evaluation: finished attacks and, for the running one, its queue of
    point indices (robust when it started) of which the first ``done`` have been attacked."""

    config: dict
    clean_accuracy: float
    robust: Tensor
    finished: list[str] = field(default_factory=list)
    attack: str | None = None
    queue: list[int] = field(default_factory=list)
    done: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # time spent on the running attack so far (earlier sessions included)

    def save(self, path: Path | None) -> None:
        """Write atomically (temp file + rename), so a kill never leaves a truncated state."""
        if path is None:
            return
        record = {
            "format": STATE_FORMAT,
            "config": self.config,
            "clean_accuracy": self.clean_accuracy,
            "robust": self.robust.tolist(),
            "finished": self.finished,
            "attack": self.attack,
            "queue": self.queue,
            "done": self.done,
            "history": self.history,
            "seconds": self.seconds,
        }
        atomic_write_text(path, json.dumps(record))

    @classmethod
    def load(cls, path: Path, config: dict) -> _State:
        """Read a state and check it was written for the same evaluation ``config``."""
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(
                f"cannot read the AutoAttack state {path} ({error}); delete it to start afresh "
                "or set state_path=<another file>"
            ) from None
        if not isinstance(record, dict) or record.get("format") != STATE_FORMAT:
            raise ValueError(
                f"{path} is not a {STATE_FORMAT} file (an older gkl or another tool wrote it): "
                "delete it to start afresh or set state_path=<another file>"
            )
        stored = record["config"]
        differs = [key for key in config if stored.get(key) != config[key]]
        if differs:
            what = (
                "another model (its weights, architecture, normalisation or `weights` choice "
                "differ)"
                if set(differs) & set(MODEL_KEYS)
                else "a different evaluation"
            )
            diffs = "; ".join(
                line for key in differs for line in _differences(key, stored.get(key), config[key])
            )
            raise ValueError(
                f"AutoAttack state {path} was written for {what} ({diffs}); resuming would "
                f"report that evaluation's robust accuracy. Delete {path} to evaluate afresh, "
                "or set state_path=<another file> (keep one state file per model)"
            )
        return cls(
            config=record["config"],
            clean_accuracy=record["clean_accuracy"],
            robust=torch.tensor(record["robust"], dtype=torch.bool),
            finished=record["finished"],
            attack=record["attack"],
            queue=record["queue"],
            done=record["done"],
            history=record["history"],
            seconds=record["seconds"],
        )


def _differences(key: str, stored: Any, now: Any) -> list[str]:
    """Every differing value in full (``tag.checkpoint_sha256: '...' in the state vs '...' now``),
    descending into dictionaries so that equal entries are left out."""
    if isinstance(stored, Mapping) and isinstance(now, Mapping):
        return [
            line
            for sub in sorted(set(stored) | set(now), key=str)
            if stored.get(sub) != now.get(sub)
            for line in _differences(f"{key}.{sub}", stored.get(sub), now.get(sub))
        ]
    return [f"{key}: {stored!r} in the state vs {now!r} now"]


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()


def _fingerprint(*tensors: Tensor) -> str:
    """SHA-256 of the tensors' bytes (detects resuming on different data)."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(_tensor_bytes(t))
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the evaluated model: its module structure (``repr``: the architecture and the
    wrappers) and every parameter and buffer by name, dtype, shape and value, non-persistent ones
    included (a ``Normalized`` wrapper's mean and std)."""
    digest = hashlib.sha256(repr(model).encode())
    tensors = dict(model.named_parameters())
    tensors |= dict(model.named_buffers())
    for name, t in sorted(tensors.items()):
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(_tensor_bytes(t))
    return digest.hexdigest()


def _correct(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device: torch.device
) -> Tensor:
    """Per-example flags argmax f(x_i) == y_i (on CPU)."""
    flags = []
    with torch.no_grad():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            flags.append((model(xb.to(device)).argmax(dim=1) == yb.to(device)).cpu())
    return torch.cat(flags)


def run_autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "Linf",
    version: str = "standard",
    attacks: list[str] | None = None,
    batch_size: int = 256,
    seed: int | None = 0,
    state_path: str | Path | None = None,
    device: str | torch.device | None = None,
    tag: Mapping[str, Any] | None = None,
    check: bool = True,
) -> AutoAttackResult:
    """AutoAttack ``version`` (``attacks`` only with ``version="custom"``) on inputs in [0, 1],
    after :func:`check_protocol` on the first batch.

    With ``state_path`` the evaluation is resumable: rerunning the same call after a kill skips
    the finished attacks and batches and gives the same result as an uninterrupted run (for a
    fixed ``seed``). The state is bound to the evaluation (eps, norm, attacks, seed, batch size,
    data) and to the model (:func:`model_fingerprint`, plus ``tag``: e.g. the checkpoint's hash
    and the ``weights`` choice); resuming with anything else is a ``ValueError`` naming the
    state file. ``device`` defaults to the model's. ``check=False`` skips the size and protocol
    checks when the caller has made them on these inputs (:func:`gkl.evaluate.evaluate`).
    """
    if check:
        check_sizes(len(x), batch_size)
        check_protocol(model, x[:batch_size])

    eps = budget(eps)
    if version not in VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; valid: {', '.join(VERSIONS)}")
    if version == "custom" and not attacks:
        raise ValueError("version='custom' needs a non-empty attacks list, e.g. ['apgd-ce']")
    unknown = sorted(set(attacks or ()) - set(ATTACKS))
    if unknown:
        raise ValueError(f"unknown attacks {unknown}; valid: {', '.join(ATTACKS)}")
    device = torch.device(device) if device is not None else model_device(model)
    adversary = AutoAttack(
        model,
        attacks=list(attacks) if attacks is not None else None,
        device=device,
        eps=eps,
        norm=norm,
        seed=seed,
        version=version,
    )
    plan = list(adversary.attacks_to_run)
    config = {
        "eps": eps,
        "norm": norm,
        "version": version,
        "attacks": plan,
        "seed": seed,
        "batch_size": batch_size,
        "n_examples": len(x),
        "data_sha256": _fingerprint(x, y),
        "model_sha256": model_fingerprint(model),
        "tag": dict(tag or {}),
    }
    path = Path(state_path) if state_path is not None else None
    resumed = path is not None and path.exists()
    if resumed:
        state = _State.load(path, config)
    else:
        robust = _correct(model, x, y, batch_size, device)
        state = _State(config, robust.float().mean().item(), robust)
        state.save(path)

    x_adv = x.clone()
    n = len(x)
    if resumed:
        log.info(
            "AutoAttack: resuming from %s (finished: %s)", path, ", ".join(state.finished) or "none"
        )
    for number, attack in enumerate(plan, 1):
        if attack in state.finished:
            continue
        if state.attack != attack:
            state.attack, state.done, state.seconds = attack, 0, 0.0
            state.queue = state.robust.nonzero().flatten().tolist()
            state.save(path)
        adversary.attacks_to_run = [attack]
        name = f"{attack} ({number}/{len(plan)})"
        session_start, seconds_before = time.perf_counter(), state.seconds
        log.info(
            "AutoAttack %s: attacking the %d points still robust%s",
            name,
            len(state.queue),
            f" ({state.done} done before the resume)" if state.done else "",
        )
        while state.done < len(state.queue):
            idx = torch.tensor(state.queue[state.done : state.done + batch_size])
            xb, yb = x[idx.to(x.device)], y[idx.to(y.device)]
            xb_adv, yb_adv = adversary.run_standard_evaluation(xb, yb, batch_size=batch_size)
            fooled = (yb_adv != yb).cpu()
            state.robust[idx[fooled]] = False
            x_adv[idx[fooled].to(x.device)] = xb_adv[fooled.to(xb_adv.device)]
            state.done += len(idx)
            state.seconds = seconds_before + time.perf_counter() - session_start
            state.save(path)
            log.info(progress_line(name, state.done, len(state.queue), state, n))
        robust = int(state.robust.sum())
        state.history.append(
            {"attack": attack, "robust": robust, "robust_acc": robust / n, "seconds": state.seconds}
        )
        log.info(
            "AutoAttack %s done: robust accuracy %.2f%% (%d/%d) after %s, %.1f s",
            name,
            100 * robust / n,
            robust,
            n,
            attack,
            state.seconds,
        )
        state.finished.append(attack)
        state.attack, state.queue, state.done, state.seconds = None, [], 0, 0.0
        state.save(path)

    return AutoAttackResult(
        clean_accuracy=state.clean_accuracy,
        robust_accuracy=state.robust.float().mean().item(),
        robust=state.robust,
        x_adv=x_adv,
        resumed=resumed,
        per_attack=list(state.history),
    )


def progress_line(name: str, done: int, total: int, state: _State, n: int) -> str:
    """``AutoAttack apgd-t (2/4): 64/73 points | robust so far 31/100 (31.00%) | 12.3 s elapsed,
    ETA 1.5 s``: the running attack, its points attacked of those robust when it started, the
    points robust now, its wall time and the time left at its rate so far."""
    robust = int(state.robust.sum())
    eta = state.seconds / done * (total - done) if done else float("nan")
    return (
        f"AutoAttack {name}: {done}/{total} points | robust so far {robust}/{n} "
        f"({100 * robust / n:.2f}%) | {state.seconds:.1f} s elapsed, ETA {eta:.1f} s"
    )


def autoattack_accuracy(model: nn.Module, x: Tensor, y: Tensor, **options: Any) -> float:
    """Robust accuracy under AutoAttack: ``run_autoattack(model, x, y, **options)``'s
    ``robust_accuracy`` (the same keyword arguments: ``eps``, ``norm``, ``version``, ...)."""
    return run_autoattack(model, x, y, **options).robust_accuracy
