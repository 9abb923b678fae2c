"""Projected gradient descent (Madry et al., 2018) and the TRADES inner maximisation.

All attacks work on inputs in [0, 1] (normalisation belongs inside the model), run the model in
eval mode and restore every module's mode afterwards, and take gradients with respect to the
input only (``torch.autograd.grad``), so parameters' ``.grad`` are left untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkl.attacks.eps import check_budget

NORMS = ("Linf", "L2")
LOSSES = ("ce", "kl")
_TINY = 1e-10  # guards divisions by L2 norms of zero gradients / perturbations


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own ``training`` flag on exit."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def check_unit_range(x: Tensor, name: str = "x") -> None:
    """Raise ``ValueError`` unless every entry of ``x`` lies in [0, 1] (NaN included)."""
    lo, hi = x.min().item(), x.max().item()
    if not (lo >= 0 and hi <= 1):  # NaN fails both comparisons
        raise ValueError(
            f"{name} must lie in [0, 1] (normalise inside the model); "
            f"got range [{lo:.4g}, {hi:.4g}]"
        )


def _check_autograd() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "attacks need autograd but inference mode is on; with Lightning use "
            "Trainer(inference_mode=False) for adversarial validation"
        )


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _per_sample_l2(t: Tensor) -> Tensor:
    """||t_i||_2 for each sample, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _ascent_step(x_adv: Tensor, grad: Tensor, step_size: float, norm: str) -> Tensor:
    """Linf: x + a*sign(g); L2: x + a*g/||g||_2."""
    if norm == "Linf":
        return x_adv + step_size * grad.sign()
    return x_adv + step_size * grad / (_per_sample_l2(grad) + _TINY)


def _project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Project onto {x' : ||x' - x|| <= eps} (Linf clip / L2 rescale), then clamp to [0, 1]."""
    delta = x_adv - x
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * torch.clamp(eps / (_per_sample_l2(delta) + _TINY), max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    """Linf: x + U(-eps, eps)^d; L2: x + eps*r*d/||d||, d ~ N(0, I), r ~ U(0, 1); clamp [0, 1]."""
    if norm == "Linf":
        delta = torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    else:
        delta = torch.empty_like(x).normal_(generator=generator)
        radius = torch.empty_like(_per_sample_l2(delta)).uniform_(0, 1, generator=generator)
        delta = delta * radius / _per_sample_l2(delta) * eps
    return (x + delta).clamp(0.0, 1.0)


def _per_sample_loss(logits: Tensor, y: Tensor, clean_log_probs: Tensor, loss: str) -> Tensor:
    """ce: -log p_y(x'); kl: KL(p(x) || p(x')) = sum_k p_k(x) (log p_k(x) - log p_k(x'))."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    log_probs = F.log_softmax(logits, dim=1)
    return F.kl_div(log_probs, clean_log_probs, reduction="none", log_target=True).sum(dim=1)


def _pgd_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    clean_log_probs: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str,
    random_start: bool,
    loss: str,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One PGD run; returns (x_adv, misclassified mask, per-sample loss at x_adv)."""
    x_adv = _random_start(x, eps, norm, generator) if random_start else x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        objective = _per_sample_loss(model(x_adv), y, clean_log_probs, loss).sum()
        (grad,) = torch.autograd.grad(objective, x_adv)
        x_adv = _project(_ascent_step(x_adv.detach(), grad, step_size, norm), x, eps, norm)
    with torch.no_grad():
        logits = model(x_adv)
        return x_adv, logits.argmax(dim=1) != y, _per_sample_loss(logits, y, clean_log_probs, loss)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "Linf",
    random_start: bool = True,
    loss: str = "ce",
    restarts: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Untargeted PGD: x_{t+1} = Proj_{B(x, eps) ∩ [0,1]^d}(x_t + step(grad_x L(f(x_t), y))).

    ``loss="ce"`` maximises cross-entropy; ``loss="kl"`` maximises KL(f(x) || f(x')) with respect
    to the clean prediction (``y`` then only ranks restarts). With ``restarts > 1`` each sample
    keeps the restart that misclassifies it, or else the one with the highest loss. ``generator``
    drives the random start (``None``: the global RNG). Returns detached ``x_adv`` in [0, 1].
    """
    _check_norm(norm)
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid names: {', '.join(LOSSES)}")
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got {steps=}, {restarts=}")
    eps = check_budget(eps, norm=norm)
    step_size = check_budget(step_size, norm=norm, name="step_size")
    if y.shape != x.shape[:1]:
        raise ValueError(f"y must have shape {tuple(x.shape[:1])}, got {tuple(y.shape)}")
    check_unit_range(x)
    _check_autograd()
    x = x.detach()
    with eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            clean_log_probs = F.log_softmax(model(x), dim=1) if loss == "kl" else x.new_empty(0)
        attack = partial(
            _pgd_run,
            model,
            x,
            y,
            clean_log_probs,
            eps=eps,
            step_size=step_size,
            steps=steps,
            norm=norm,
            random_start=random_start,
            loss=loss,
            generator=generator,
        )
        best_x, best_fooled, best_loss = attack()
        for _ in range(restarts - 1):
            x_adv, fooled, score = attack()
            better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (score > best_loss))
            best_x = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best_x)
            best_fooled = best_fooled | fooled
            best_loss = torch.where(better, score, best_loss)
    return best_x.detach()


AscentObjective = Callable[[Tensor, Tensor], Tensor]


def trades_perturb(
    model: nn.Module,
    x: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "Linf",
    generator: torch.Generator | None = None,
    objective: AscentObjective | None = None,
) -> Tensor:
    """TRADES inner maximisation (Zhang et al., 2019): maximise, from x + 0.001 * N(0, I),

        objective(f(x'), f(x))   (default: sum_i KL(softmax(f(x_i)) || softmax(f(x'_i))),
                                  sum reduction, as the TRADES code)

    by ``steps`` ascent steps (Linf: sign; L2: normalised gradient), each followed by the
    projection onto B(x, eps) and clamping to [0, 1]. ``objective(adv_logits, nat_logits)``
    returns a scalar; ``nat_logits = f(x)`` is computed once, without gradient (it does not depend
    on x'), e.g. the GKL ascent of the authors' CIFAR-100 script. The model runs in eval mode, as
    in TRADES, and every module's mode is restored afterwards. Returns detached ``x_adv``.
    """
    _check_norm(norm)
    if steps < 1:
        raise ValueError(f"TRADES needs steps >= 1, got {steps}")
    eps = check_budget(eps, norm=norm)
    step_size = check_budget(step_size, norm=norm, name="step_size")
    check_unit_range(x)
    _check_autograd()
    x = x.detach()
    with eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            nat_logits = model(x)
        if objective is None:
            clean_probs = F.softmax(nat_logits, dim=1)

            def objective(adv_logits: Tensor, _: Tensor) -> Tensor:
                return F.kl_div(F.log_softmax(adv_logits, dim=1), clean_probs, reduction="sum")

        noise = torch.empty_like(x).normal_(generator=generator)
        x_adv = x + 0.001 * noise
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(model(x_adv), nat_logits), x_adv)
            x_adv = _project(_ascent_step(x_adv.detach(), grad, step_size, norm), x, eps, norm)
    return x_adv.detach()
