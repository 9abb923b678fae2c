"""KL regularisation for RLHF policies: per-token estimators, "in reward" vs "as loss", IS.

Notation, per sampled token a in state s (a prefix), with pi = pi_theta the trained policy:

    log_delta = ref_logprobs - logprobs = log(pi_ref(a|s) / pi(a|s))
    k1 = -log_delta,   k2 = 0.5 * log_delta**2,   k3 = exp(log_delta) - 1 - log_delta

How a term is used decides which divergence its expected gradient follows (a ~ pi):

* "in reward" (`kl_in_reward`): sg(k) enters the reward, so the policy gradient carries
  sg(k) * grad log pi. With k1 this is grad KL(pi || pi_ref); use reward-to-go (or returns
  from per-token rewards) for the sequence-level KL.
* "as loss" (`kl_loss`): k is differentiated directly. k2 gives grad KL(pi || pi_ref) per token,
  k3 gives grad KL(pi_ref || pi) (forward KL), k1 gives zero in expectation.
* off-policy (tokens sampled from mu, rho = pi / mu): sg(rho) * k reproduces the on-policy
  gradient of k; rho * k with the gradient through rho is the gradient of E_pi[k], which is
  KL(pi || pi_ref) for k1 and k3; dropping rho ("none") or clipping it ("ppo_clip") biases it.

All functions are pure torch; fp16/bf16 inputs are computed in float32.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("k1", "k2", "k3", "abs", "low_var_kl")
ESTIMATOR_ALIASES = {"kl": "k1", "mse": "k2"}
IS_MODES = ("none", "detached", "differentiable", "ppo_clip")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_MAX_LOG_RATIO = 20.0  # verl's clamp on log-ratios before exp()
_LOW_VAR_KL_MAX = 10.0  # verl's clamp on the low_var_kl value


def _resolve_estimator(estimator: str) -> tuple[str, bool]:
    """Canonical name and whether the verl "+" straight-through suffix was given."""
    straight_through = isinstance(estimator, str) and estimator.endswith("+")
    base = estimator[:-1] if straight_through else estimator
    name = ESTIMATOR_ALIASES.get(base, base)
    if name not in ESTIMATORS:
        valid = ", ".join(repr(n) for n in ESTIMATORS + tuple(ESTIMATOR_ALIASES))
        raise ValueError(
            f"estimator must be one of {valid}, optionally with a '+' suffix "
            f"(straight-through k2 gradient); got {estimator!r}"
        )
    return name, straight_through


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {valid}; got {value!r}")


def _check_tensor(name: str, x: torch.Tensor, *, ndim: int | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor of log-probabilities, got dtype {x.dtype}"
        )
    if ndim is not None and x.dim() != ndim:
        raise ValueError(
            f"{name} must be 2-D (batch, response_length), got shape {tuple(x.shape)}; "
            "for a bandit (one token per sample) use shape (batch, 1)"
        )


def _check_same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(
            f"{ref_name} and {name} must have the same shape, got "
            f"{tuple(ref.shape)} and {tuple(x.shape)}"
        )


def _check_values(name: str, x: torch.Tensor, valid: torch.Tensor | None) -> None:
    """Require finite log-probabilities <= 0 at the valid (unmasked) positions."""
    vals = x.detach() if valid is None else x.detach()[valid]
    where = "" if valid is None else " unmasked"
    n_bad = int((~torch.isfinite(vals)).sum())
    if n_bad:
        raise ValueError(
            f"{name} has {n_bad} non-finite{where} entries (NaN or Inf) out of {vals.numel()} "
            f"(shape {tuple(x.shape)}); a sampled token needs a finite log-probability under "
            "every policy"
        )
    n_pos = int((vals > 0).sum())
    if n_pos:
        raise ValueError(
            f"{name} has {n_pos}{where} entries > 0 (max {vals.max().item():.4g}, shape "
            f"{tuple(x.shape)}); log-probabilities must be <= 0: pass log_softmax(logits) "
            "gathered at the sampled tokens, not logits or probabilities"
        )


def _valid_mask(
    mask: torch.Tensor | None, like: torch.Tensor, like_name: str = "logprobs"
) -> torch.Tensor | None:
    """Turn a {0, 1} or bool mask of ``like``'s shape into a bool tensor (True = real token)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    _check_same_shape("mask", mask, like_name, like)
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(
            "mask must be bool or contain only 0 and 1 (1 = real token, 0 = padding); "
            f"got other values in a {mask.dtype} tensor of shape {tuple(mask.shape)}"
        )
    return mask != 0


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in _LOW_PRECISION else x


def _zero_padding(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Replace padded entries by 0 so that garbage there reaches neither values nor gradients."""
    return x if valid is None else torch.where(valid, x, torch.zeros_like(x))


def _estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, name: str, straight_through: bool
) -> torch.Tensor:
    value = _estimate_value(logprobs, ref_logprobs, name)
    if not straight_through:
        return value
    k2 = _estimate_value(logprobs, ref_logprobs, "k2")
    return k2 - k2.detach() + value.detach()


def _estimate_value(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, name: str) -> torch.Tensor:
    log_delta = ref_logprobs - logprobs
    if name == "k1":
        return -log_delta
    if name == "k2":
        return 0.5 * log_delta.square()
    if name == "k3":
        return torch.expm1(log_delta) - log_delta
    if name == "abs":
        return log_delta.abs()
    # low_var_kl, exactly as verl: clamp the log-ratio, then clamp the k3 value.
    kl = log_delta.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    kld = torch.exp(kl) - kl - 1
    return kld.clamp(-_LOW_VAR_KL_MAX, _LOW_VAR_KL_MAX)


def kl_estimate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str,
    *,
    check_values: bool = True,
) -> torch.Tensor:
    """Per-token KL estimate, differentiable w.r.t. ``logprobs`` (any shape, same for both).

    With log_delta = ref_logprobs - logprobs = log(pi_ref / pi):
    ``k1`` = -log_delta (alias ``kl``); ``k2`` = log_delta**2 / 2 (alias ``mse``);
    ``k3`` = exp(log_delta) - 1 - log_delta (unclamped); ``abs`` = |log_delta|;
    ``low_var_kl`` = clamp(exp(l) - l - 1, -10, 10) with l = clamp(log_delta, -20, 20) (verl's
    clamped k3; note verl's own "k3" is an alias of this clamped form).
    A "+" suffix (verl's straight-through, e.g. ``k3+``) keeps the value and takes the gradient
    of k2: k2 - sg(k2) + sg(k). E_pi[k1] = E_pi[k3] = KL(pi || pi_ref); k2 and abs are biased.
    ``check_values`` requires finite entries <= 0 (costs a device sync).
    """
    name, straight_through = _resolve_estimator(estimator)
    _check_tensor("logprobs", logprobs, ndim=None)
    _check_tensor("ref_logprobs", ref_logprobs, ndim=None)
    _check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    if check_values:
        _check_values("logprobs", logprobs, None)
        _check_values("ref_logprobs", ref_logprobs, None)
    return _estimate(_upcast(logprobs), _upcast(ref_logprobs), name, straight_through)


def kl_in_reward(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    estimator: str = "k1",
    mask: torch.Tensor | None = None,
    reward_to_go: bool = False,
    check_values: bool = True,
) -> torch.Tensor:
    """Detached per-token KL penalty k_t of shape (batch, T), to subtract (times beta) from rewards.

    The policy gradient then carries -beta * sg(k_t) * grad log pi_t. With ``reward_to_go``
    the penalty is G_t = sum_{t' >= t} k_t' (padding excluded), the coefficient of
    grad log pi_t that makes k1 give the exact sequence-level grad KL(pi(y) || pi_ref(y));
    without it the per-token k_t is meant for a return/advantage estimator (GAE, RLOO, ...)
    that sums rewards itself, and using k_t alone as the coefficient ignores future tokens.
    Padded positions (mask == 0) are 0.
    """
    name, _ = _resolve_estimator(estimator)  # the "+" suffix only changes gradients
    _check_tensor("logprobs", logprobs, ndim=2)
    _check_tensor("ref_logprobs", ref_logprobs, ndim=2)
    _check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    valid = _valid_mask(mask, logprobs)
    if check_values:
        _check_values("logprobs", logprobs, valid)
        _check_values("ref_logprobs", ref_logprobs, valid)
    with torch.no_grad():
        lp = _zero_padding(_upcast(logprobs), valid)
        ref = _zero_padding(_upcast(ref_logprobs), valid)
        penalty = _zero_padding(_estimate_value(lp, ref, name), valid)
        if reward_to_go:
            penalty = penalty.flip(-1).cumsum(-1).flip(-1)
            penalty = _zero_padding(penalty, valid)
    return penalty


def kl_loss_per_token(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    estimator: str = "k2",
    mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    is_mode: str = "none",
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    check_values: bool = True,
) -> torch.Tensor:
    """Per-token KL loss L_t of shape (batch, T), 0 at padding, before aggregation.

    With k_t = kl_estimate(logprobs, ref_logprobs, estimator) and, for tokens sampled from a
    behaviour policy mu, rho_t = exp(logprobs - old_logprobs) (log-ratio clamped to +-20):
    ``none``: L = k; ``detached``: L = sg(rho) * k; ``differentiable``: L = rho * k (gradient
    through rho); ``ppo_clip``: L = max(rho * k, clip(rho, 1 - clip_ratio_low,
    1 + clip_ratio_high) * k), PPO's pessimistic clip with advantage -k (equal to
    ``differentiable`` while no ratio is clipped, biased once clipping is active).
    Every mode except ``none`` needs ``old_logprobs`` (on-policy: ``logprobs.detach()``).
    """
    name, straight_through = _resolve_estimator(estimator)
    _check_choice("is_mode", is_mode, IS_MODES)
    _check_tensor("logprobs", logprobs, ndim=2)
    _check_tensor("ref_logprobs", ref_logprobs, ndim=2)
    _check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    if old_logprobs is None and is_mode != "none":
        raise ValueError(
            f"is_mode={is_mode!r} needs old_logprobs (log mu of the policy that sampled the "
            "tokens); for on-policy data pass old_logprobs=logprobs.detach(), or use "
            "is_mode='none'"
        )
    if old_logprobs is not None:
        _check_tensor("old_logprobs", old_logprobs, ndim=2)
        _check_same_shape("old_logprobs", old_logprobs, "logprobs", logprobs)
    if is_mode == "ppo_clip" and not (0 <= clip_ratio_low < 1 and clip_ratio_high >= 0):
        raise ValueError(
            "ppo_clip needs 0 <= clip_ratio_low < 1 and clip_ratio_high >= 0, got "
            f"clip_ratio_low={clip_ratio_low}, clip_ratio_high={clip_ratio_high}"
        )
    valid = _valid_mask(mask, logprobs)
    if check_values:
        _check_values("logprobs", logprobs, valid)
        _check_values("ref_logprobs", ref_logprobs, valid)
        if old_logprobs is not None:
            _check_values("old_logprobs", old_logprobs, valid)

    lp = _zero_padding(_upcast(logprobs), valid)
    k = _estimate(lp, _zero_padding(_upcast(ref_logprobs), valid), name, straight_through)
    if is_mode == "none":
        loss = k
    else:
        old = _zero_padding(_upcast(old_logprobs), valid)
        rho = torch.exp((lp - old).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
        if is_mode == "detached":
            loss = rho.detach() * k
        elif is_mode == "differentiable":
            loss = rho * k
        else:
            clipped = rho.clamp(1 - clip_ratio_low, 1 + clip_ratio_high)
            loss = torch.maximum(rho * k, clipped * k)
    return _zero_padding(loss, valid)


def agg_loss(
    loss_mat: torch.Tensor, mask: torch.Tensor | None, loss_agg_mode: str = "token-mean"
) -> torch.Tensor:
    """Aggregate a (batch, T) per-token loss into a scalar, with verl's mode names.

    ``token-mean``: sum_{b,t} m L / sum_{b,t} m (TRL ``bnpo``/``dapo``, OpenRLHF);
    ``seq-mean-token-sum``: mean_b sum_t m L;
    ``seq-mean-token-mean``: mean_b (sum_t m L / sum_t m) (TRL ``grpo``).
    Padded entries (mask == 0) are ignored; an all-padding row counts as 0 in the seq modes.
    """
    _check_choice("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    if not isinstance(loss_mat, torch.Tensor) or loss_mat.dim() != 2:
        shape = tuple(loss_mat.shape) if isinstance(loss_mat, torch.Tensor) else loss_mat
        raise ValueError(f"loss_mat must be a 2-D (batch, response_length) tensor, got {shape}")
    valid = _valid_mask(mask, loss_mat, "loss_mat")
    if valid is None:
        valid = torch.ones_like(loss_mat, dtype=torch.bool)
    loss_mat = _zero_padding(loss_mat, valid)
    counts = valid.to(loss_mat.dtype)
    if loss_agg_mode == "token-mean":
        return loss_mat.sum() / counts.sum().clamp(min=1)
    if loss_agg_mode == "seq-mean-token-sum":
        return loss_mat.sum(-1).mean()
    return (loss_mat.sum(-1) / counts.sum(-1).clamp(min=1)).mean()


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    estimator: str = "k2",
    mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    is_mode: str = "none",
    loss_agg_mode: str = "token-mean",
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    check_values: bool = True,
) -> torch.Tensor:
    """Scalar KL loss: ``agg_loss(kl_loss_per_token(...), mask, loss_agg_mode)``; add beta * it.

    On-policy, E[grad k2] = grad KL(pi || pi_ref) (the default), E[grad k3] =
    grad KL(pi_ref || pi) and E[grad k1] = 0. Off-policy (tokens from mu), ``detached`` keeps
    those gradients exact; ``differentiable`` with k1 or k3 gives grad KL(pi || pi_ref).
    """
    _check_choice("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    per_token = kl_loss_per_token(
        logprobs,
        ref_logprobs,
        estimator=estimator,
        mask=mask,
        old_logprobs=old_logprobs,
        is_mode=is_mode,
        clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high,
        check_values=check_values,
    )
    return agg_loss(per_token, mask, loss_agg_mode)
