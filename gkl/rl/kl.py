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
* off-policy (tokens sampled from mu, rho = pi / mu). One token (a bandit): sg(rho) * k
  ("detached") reproduces the on-policy gradient of k; rho * k with the gradient through rho
  ("differentiable") is the gradient of E_pi[k], which is KL(pi || pi_ref) for k1 and k3.
  Sequences: the prefix of token t was sampled from mu too, so only the cumulative weight
  sg(prod_{s<=t} rho_s) ("cumulative") reproduces the on-policy expected gradient; the
  per-token sg(rho_t) misses the change of the prefix distribution. Dropping rho ("none"),
  clipping it ("ppo_clip") or truncating it (``is_truncation``) biases it. With
  length-normalised aggregation (a per-sequence token mean) 1/|y| depends on later tokens, so
  only the full-sequence weight sg(prod_s rho_s) ("sequence") is exact.
* "in reward", sequences (``placement="reward"`` in ``kl_loss``): the coefficient of
  grad log pi_t is the reward-to-go G_t = sum_{t' >= t} k_t'; with k1 and token-sum aggregation
  its expected gradient is exactly grad KL(pi(y) || pi_ref(y)). Off-policy each future penalty
  k_t' carries its own weight W_t' = prod_{s<=t'} rho_s ("cumulative") or every one the
  full-sequence weight ("sequence"); weighting G_t by W_t is biased.

All functions are pure torch; fp16/bf16 inputs are computed in float32 (``kl_penalty``, verl's
drop-in, keeps the input dtype as verl does).
"""

from __future__ import annotations

import torch

ESTIMATORS = ("k1", "k2", "k3", "abs", "low_var_kl")
ESTIMATOR_ALIASES = {"kl": "k1", "mse": "k2"}
IS_MODES = ("none", "detached", "cumulative", "sequence", "differentiable", "ppo_clip")
PLACEMENTS = ("loss", "reward")
# is_mode values that only weight (detached) and so apply to a penalty in the reward too
REWARD_IS_MODES = ("none", "detached", "cumulative", "sequence")
LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
    "token-sum",
    "dr_grpo",
)
EMPTY_ROWS = ("exclude", "include")
# Log-probabilities up to this much above 0 are float rounding (log_softmax of a near-certain
# token in float32 can give +1e-7) and are accepted as they are.
LOGPROB_TOLERANCE = 1e-5
# verl's names for kl_penalty(); "k3" is verl's clamped low_var_kl, unlike gkl's own "k3".
VERL_KL_PENALTIES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")


class UnknownKLPenaltyError(NotImplementedError, ValueError):
    """An unknown ``kl_penalty`` name: NotImplementedError as verl raises, and a ValueError."""


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
    n_pos = int((vals > LOGPROB_TOLERANCE).sum())
    if n_pos:
        raise ValueError(
            f"{name} has {n_pos}{where} entries > 0 (max {vals.max().item():.4g}, shape "
            f"{tuple(x.shape)}; up to {LOGPROB_TOLERANCE:g} is accepted as rounding); "
            "log-probabilities must be <= 0: pass log_softmax(logits) gathered at the sampled "
            "tokens, not logits or probabilities"
        )


def _check_log_ratio_clamp(log_ratio_clamp: float | None) -> None:
    if log_ratio_clamp is not None and not (
        isinstance(log_ratio_clamp, (int, float)) and log_ratio_clamp > 0
    ):
        raise ValueError(
            f"log_ratio_clamp must be None (no clamp) or a positive number, got {log_ratio_clamp!r}"
        )


def _check_finite_estimate(k: torch.Tensor, valid: torch.Tensor | None, estimator: str) -> None:
    """Raise on an overflowed estimate (k3's exp of a large log-ratio) at real tokens."""
    vals = k.detach() if valid is None else k.detach()[valid]
    n_bad = int((~torch.isfinite(vals)).sum())
    if n_bad:
        raise ValueError(
            f"estimator {estimator!r} overflowed to Inf at {n_bad} token(s) in {k.dtype}: "
            "ref_logprobs - logprobs is too large for exp(); pass log_ratio_clamp=20 (verl's "
            "bound; biased where active: a clamped token has zero gradient), use "
            "estimator='low_var_kl', or compute in float64"
        )


def _valid_mask(
    mask: torch.Tensor | None,
    like: torch.Tensor,
    like_name: str = "logprobs",
    name: str = "mask",
) -> torch.Tensor | None:
    """Turn a {0, 1} or bool mask of ``like``'s shape into a bool tensor (True = real token)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    _check_same_shape(name, mask, like_name, like)
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(
            f"{name} must be bool or contain only 0 and 1 (1 = real token, 0 = padding); "
            f"got other values in a {mask.dtype} tensor of shape {tuple(mask.shape)}"
        )
    return mask != 0


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in _LOW_PRECISION else x


def _zero_padding(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Replace padded entries by 0 so that garbage there reaches neither values nor gradients."""
    return x if valid is None else torch.where(valid, x, torch.zeros_like(x))


def _estimate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    name: str,
    straight_through: bool,
    log_ratio_clamp: float | None = None,
) -> torch.Tensor:
    value = _estimate_value(logprobs, ref_logprobs, name, log_ratio_clamp)
    if not straight_through:
        return value
    k2 = _estimate_value(logprobs, ref_logprobs, "k2", log_ratio_clamp)
    return k2 - k2.detach() + value.detach()


def _estimate_value(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    name: str,
    log_ratio_clamp: float | None = None,
) -> torch.Tensor:
    log_delta = ref_logprobs - logprobs
    if log_ratio_clamp is not None:
        log_delta = log_delta.clamp(-log_ratio_clamp, log_ratio_clamp)
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
    log_ratio_clamp: float | None = None,
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
    ``log_ratio_clamp`` (opt-in, e.g. 20) clamps log_delta to +-clamp first, so float32 k3
    cannot overflow; where it is active the estimate is biased and its gradient is 0.
    ``check_values`` requires finite entries <= 0 (up to ``LOGPROB_TOLERANCE``) and a finite
    estimate (costs a device sync).
    """
    name, straight_through = _resolve_estimator(estimator)
    _check_log_ratio_clamp(log_ratio_clamp)
    _check_tensor("logprobs", logprobs, ndim=None)
    _check_tensor("ref_logprobs", ref_logprobs, ndim=None)
    _check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    if check_values:
        _check_values("logprobs", logprobs, None)
        _check_values("ref_logprobs", ref_logprobs, None)
    k = _estimate(_upcast(logprobs), _upcast(ref_logprobs), name, straight_through, log_ratio_clamp)
    if check_values:
        _check_finite_estimate(k, None, estimator)
    return k


def kl_penalty(
    logprob: torch.Tensor,
    ref_logprob: torch.Tensor,
    kl_penalty: str,
    *,
    check_values: bool = True,
) -> torch.Tensor:
    """Drop-in for verl's ``core_algos.kl_penalty(logprob, ref_logprob, kl_penalty)``.

    verl's names and meanings: ``kl``/``k1`` = logprob - ref_logprob, ``abs``, ``mse``/``k2``,
    ``low_var_kl``/``k3`` = verl's clamped k3 (see ``kl_estimate``), each optionally with the
    "+" straight-through suffix (value of k, gradient of k2). Unlike verl at v0.6.0-b178a3c
    (where a "+" name reaches ``kl_penalty_forward`` and raises NotImplementedError) the "+"
    names work. An unknown name raises ``UnknownKLPenaltyError`` (a NotImplementedError, as
    verl raises, and a ValueError). The result has the inputs' dtype and is computed in it, as
    verl computes it (bf16 stays bf16). ``check_values`` refuses NaN/Inf and log-probs > 0
    anywhere, as the rest of ``gkl.rl`` does (verl's inputs hold real log-probs at padded
    positions too); ``check_values=False`` skips the check and its device sync, as verl does.
    """
    if not isinstance(kl_penalty, str):
        raise ValueError(f"kl_penalty must be a string, got {type(kl_penalty).__name__}")
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if base not in VERL_KL_PENALTIES:
        valid = ", ".join(repr(n) for n in VERL_KL_PENALTIES)
        raise UnknownKLPenaltyError(
            f"kl_penalty must be one of verl's names {valid}, optionally with a '+' suffix; "
            f"got {kl_penalty!r} (verl's 'full' needs whole-vocabulary log-probs and is not "
            "implemented there either)"
        )
    _check_tensor("logprob", logprob, ndim=None)
    _check_tensor("ref_logprob", ref_logprob, ndim=None)
    _check_same_shape("ref_logprob", ref_logprob, "logprob", logprob)
    if check_values:
        _check_values("logprob", logprob, None)
        _check_values("ref_logprob", ref_logprob, None)
    name = "low_var_kl" if base == "k3" else ESTIMATOR_ALIASES.get(base, base)
    return _estimate(logprob, ref_logprob, name, kl_penalty.endswith("+"))


def _sequence_weights(log_rho: torch.Tensor, is_mode: str) -> torch.Tensor:
    """Detached importance weights from per-token log-ratios (0 at padding), log clamped to +-20.

    ``detached``: rho_t; ``cumulative``: W_t = prod_{s<=t} rho_s; ``sequence``: the whole
    sequence's W_|y| on every token.
    """
    log_rho = log_rho.detach()
    if is_mode == "cumulative":
        log_w = log_rho.cumsum(-1)
    elif is_mode == "sequence":
        log_w = log_rho.sum(-1, keepdim=True).expand_as(log_rho)
    else:
        log_w = log_rho
    return torch.exp(log_w.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))


def _check_reward_is_mode(
    is_mode: str, old_logprobs: torch.Tensor | None, *, need_old: bool = True
) -> None:
    if is_mode not in REWARD_IS_MODES:
        valid = ", ".join(repr(c) for c in REWARD_IS_MODES)
        raise ValueError(
            f"is_mode for a KL penalty in the reward must be one of {valid} (a detached weight; "
            f"a ratio with a gradient belongs to the loss placement); got {is_mode!r}"
        )
    if need_old and old_logprobs is None and is_mode != "none":
        raise ValueError(
            f"is_mode={is_mode!r} needs old_logprobs (log mu of the policy that sampled the "
            "tokens); for on-policy data use is_mode='none'"
        )


def kl_in_reward(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    estimator: str = "k1",
    mask: torch.Tensor | None = None,
    reward_to_go: bool = False,
    old_logprobs: torch.Tensor | None = None,
    is_mode: str = "none",
    log_ratio_clamp: float | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """Detached per-token KL penalty c_t of shape (batch, T), to subtract (times beta) from rewards.

    The policy gradient then carries -beta * c_t * grad log pi_t. On-policy (``is_mode="none"``)
    c_t = k_t, or with ``reward_to_go`` c_t = G_t = sum_{t' >= t} k_t' (padding excluded): with
    k1 and the coefficients summed over tokens, E[sum_t G_t grad log pi_t] = grad KL(pi(y) ||
    pi_ref(y)) exactly. Without reward-to-go, c_t is meant for a return/advantage estimator (GAE,
    RLOO, ...) that sums rewards itself; c_t alone as the coefficient ignores future tokens.
    Off-policy (tokens from mu, ``old_logprobs`` = log mu, rho_s = pi_s / mu_s), each penalty
    k_t' is weighted before the sum: ``cumulative`` by its own W_t' = prod_{s<=t'} rho_s,
    ``sequence`` by the full-sequence W_|y| (both exact: the on-policy expectation), ``detached``
    by rho_t of the token whose log-prob it multiplies (PPO's per-token ratio; biased for
    sequences). Padded positions (mask == 0) are 0. ``log_ratio_clamp`` as in ``kl_estimate``.
    """
    name, _ = _resolve_estimator(estimator)  # the "+" suffix only changes gradients
    _check_log_ratio_clamp(log_ratio_clamp)
    _check_reward_is_mode(is_mode, old_logprobs)
    _check_tensor("logprobs", logprobs, ndim=2)
    _check_tensor("ref_logprobs", ref_logprobs, ndim=2)
    _check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    if old_logprobs is not None:
        _check_tensor("old_logprobs", old_logprobs, ndim=2)
        _check_same_shape("old_logprobs", old_logprobs, "logprobs", logprobs)
    valid = _valid_mask(mask, logprobs)
    if check_values:
        _check_values("logprobs", logprobs, valid)
        _check_values("ref_logprobs", ref_logprobs, valid)
        if old_logprobs is not None and is_mode != "none":
            _check_values("old_logprobs", old_logprobs, valid)
    with torch.no_grad():
        lp = _zero_padding(_upcast(logprobs), valid)
        ref = _zero_padding(_upcast(ref_logprobs), valid)
        penalty = _zero_padding(_estimate_value(lp, ref, name, log_ratio_clamp), valid)
        if check_values:
            _check_finite_estimate(penalty, valid, estimator)
        weight = None
        if is_mode != "none":
            log_rho = lp - _zero_padding(_upcast(old_logprobs), valid)
            weight = _sequence_weights(log_rho, is_mode)
        if weight is not None and is_mode != "detached":
            penalty = weight * penalty  # each penalty k_t' by its own weight
        if reward_to_go:
            penalty = penalty.flip(-1).cumsum(-1).flip(-1)
        if weight is not None and is_mode == "detached":
            penalty = weight * penalty  # rho_t on the coefficient of grad log pi_t
        penalty = _zero_padding(penalty, valid)
    return penalty


def check_kl_options(
    *,
    estimator: str,
    is_mode: str,
    placement: str = "loss",
    is_truncation: float | None = None,
    log_ratio_clamp: float | None = None,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
) -> None:
    """Validate a ``kl_loss`` option set without tensors (frameworks call it at construction)."""
    _resolve_estimator(estimator)
    _check_choice("placement", placement, PLACEMENTS)
    _check_choice("is_mode", is_mode, IS_MODES)
    _check_log_ratio_clamp(log_ratio_clamp)
    if placement == "reward":
        _check_reward_is_mode(is_mode, None, need_old=False)
        if is_truncation is not None:
            raise ValueError(
                "is_truncation is not supported with placement='reward' (the weights inside "
                "the reward-to-go are not capped); drop it or use placement='loss'"
            )
    straight_through = isinstance(estimator, str) and estimator.endswith("+")
    if straight_through and is_mode in ("differentiable", "ppo_clip"):
        raise ValueError(
            f"estimator={estimator!r} (straight-through: gradient of k2, already the "
            f"reverse-KL gradient) cannot be combined with is_mode={is_mode!r}, whose gradient "
            "through rho adds the score term k * grad log pi a second time (twice the "
            f"reverse-KL gradient); use is_mode='detached'/'cumulative'/'sequence' with "
            f"{estimator!r}, or estimator={estimator[:-1]!r} with is_mode={is_mode!r}"
        )
    if straight_through and placement == "reward":
        raise ValueError(
            f"estimator={estimator!r}: the '+' suffix (straight-through gradient) has no meaning "
            f"for a penalty in the reward, whose gradient is the score term; use "
            f"estimator={estimator[:-1]!r}"
        )
    if is_truncation is not None:
        if is_mode not in ("detached", "cumulative", "sequence"):
            raise ValueError(
                "is_truncation caps the detached weight of is_mode='detached', 'cumulative' or "
                f"'sequence'; got is_mode={is_mode!r} (use clip_ratio_low/high with 'ppo_clip')"
            )
        if not (isinstance(is_truncation, (int, float)) and is_truncation > 0):
            raise ValueError(
                f"is_truncation must be None or a positive number (the cap C), got "
                f"{is_truncation!r}"
            )
    if is_mode == "ppo_clip" and not (0 <= clip_ratio_low < 1 and clip_ratio_high >= 0):
        raise ValueError(
            "ppo_clip needs 0 <= clip_ratio_low < 1 and clip_ratio_high >= 0, got "
            f"clip_ratio_low={clip_ratio_low}, clip_ratio_high={clip_ratio_high}"
        )


def kl_loss_per_token(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    estimator: str = "k2",
    mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    is_mode: str = "none",
    is_truncation: float | None = None,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    log_ratio_clamp: float | None = None,
    placement: str = "loss",
    reward_to_go: bool = True,
    check_values: bool = True,
) -> torch.Tensor:
    """Per-token KL loss L_t of shape (batch, T), 0 at padding, before aggregation.

    ``placement="loss"``: with k_t = kl_estimate(logprobs, ref_logprobs, estimator) and, for
    tokens sampled from a behaviour policy mu, rho_t = exp(logprobs_t - old_logprobs_t) (log
    clamped to +-20): ``none``: L = k; ``detached``: L = sg(rho_t) * k; ``cumulative``:
    L = sg(W_t) * k, W_t = prod_{s<=t} rho_s (padding skipped); ``sequence``: L = sg(W_|y|) * k
    (the full-sequence ratio on every token); ``differentiable``: L = rho * k (gradient through
    rho); ``ppo_clip``: L = max(rho * k, clip(rho, 1 - clip_ratio_low, 1 + clip_ratio_high) * k).
    Off-policy, the on-policy expected gradient is kept exactly by ``detached`` for one token
    (bandits), by ``cumulative`` for sequences with token-sum aggregation, and by ``sequence``
    for any per-sequence aggregation including the length-normalised token mean (the largest
    variance). ``is_truncation`` = C caps the detached weight at C (biased where active).

    ``placement="reward"``: the loss form of the penalty in the reward, L_t = c_t * (log pi_t -
    sg(log pi_t)) + sg(w_t * k_t), with c_t = ``kl_in_reward(..., reward_to_go, is_mode)``: its
    gradient is c_t * grad log pi_t (the policy gradient of -c_t as a reward) and its value
    w_t * k_t (w = 1, rho_t, W_t or W_|y|) sums to an unbiased estimate of KL(pi(y) || pi_ref(y))
    for k1 with ``cumulative``/``sequence``/``none``. With k1, ``reward_to_go`` and token-sum
    aggregation the expected gradient is exactly grad KL(pi(y) || pi_ref(y)), on-policy and with
    ``cumulative`` or ``sequence`` off-policy (docs/rl_kl.md has the full table).
    Every ``is_mode`` except ``none`` needs ``old_logprobs`` (on-policy: ``logprobs.detach()``).
    """
    check_kl_options(
        estimator=estimator,
        is_mode=is_mode,
        placement=placement,
        is_truncation=is_truncation,
        log_ratio_clamp=log_ratio_clamp,
        clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high,
    )
    name, straight_through = _resolve_estimator(estimator)
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
    valid = _valid_mask(mask, logprobs)
    if check_values:
        _check_values("logprobs", logprobs, valid)
        _check_values("ref_logprobs", ref_logprobs, valid)
        if old_logprobs is not None and is_mode != "none":
            _check_values("old_logprobs", old_logprobs, valid)

    lp = _zero_padding(_upcast(logprobs), valid)
    ref = _zero_padding(_upcast(ref_logprobs), valid)
    log_rho = None
    if is_mode != "none":
        log_rho = lp - _zero_padding(_upcast(old_logprobs), valid)
    if placement == "reward":
        coef = kl_in_reward(
            lp, ref, estimator=name, reward_to_go=reward_to_go, is_mode=is_mode,
            old_logprobs=None if log_rho is None else lp.detach() - log_rho.detach(),
            log_ratio_clamp=log_ratio_clamp, check_values=check_values,
        )  # fmt: skip
        with torch.no_grad():
            value = _estimate_value(lp, ref, name, log_ratio_clamp)
            if log_rho is not None:
                value = _sequence_weights(log_rho, is_mode) * value
        return _zero_padding(coef * (lp - lp.detach()) + value, valid)

    k = _estimate(lp, ref, name, straight_through, log_ratio_clamp)
    if check_values:
        _check_finite_estimate(k, valid, estimator)
    if is_mode == "none":
        loss = k
    elif is_mode in ("detached", "cumulative", "sequence"):
        weight = _sequence_weights(log_rho, is_mode)
        if is_truncation is not None:
            weight = weight.clamp(max=is_truncation)
        loss = weight * k
    else:
        rho = torch.exp(log_rho.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
        if is_mode == "differentiable":
            loss = rho * k
        else:
            clipped = rho.clamp(1 - clip_ratio_low, 1 + clip_ratio_high)
            loss = torch.maximum(rho * k, clipped * k)
    return _zero_padding(loss, valid)


def _check_normaliser(name: str, value: object) -> None:
    if value is None:
        return
    number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not number > 0:
        raise ValueError(
            f"{name} must be None (use this micro-batch's own count) or a positive number "
            f"(the count over the whole global batch, all ranks and micro-batches), got {value!r}"
        )


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: int | float | torch.Tensor | None = None,
    global_batch_size: int | float | torch.Tensor | None = None,
    loss_scale_factor: int | float | None = None,
    *,
    mask: torch.Tensor | None = None,
    empty_rows: str = "exclude",
) -> torch.Tensor:
    """Aggregate a (batch, T) micro-batch loss into a scalar, with verl's modes and normalisers.

    With m the mask, N = ``batch_num_tokens`` (valid tokens in the global batch), S =
    ``global_batch_size`` (sequences in it), D = ``dp_size`` and L = ``loss_scale_factor``
    (default T = loss_mat.shape[-1]); without N / S the micro-batch's own counts are used:
    ``token-mean``: D * sum m L / N (TRL ``bnpo``/``dapo``, OpenRLHF);
    ``seq-mean-token-sum``: D * sum_b (sum_t m L) / S;
    ``seq-mean-token-mean``: D * sum_b (sum_t m L / sum_t m) / S (TRL ``grpo``);
    ``seq-mean-token-sum-norm``: sum m L / L (verl b178a3c: no D, so the data-parallel mean is
    1/D of the full batch; verl 0.9.1 changed it to D * sum m L / (S * L));
    ``token-sum``: D * sum m L; ``dr_grpo``: D * sum m L / (S * L) (TRL, S counts every row).
    With the global N / S, the sum over micro-batches (and, except seq-mean-token-sum-norm, the
    data-parallel mean over D ranks) equals the loss of the whole batch. ``empty_rows``: whether
    an all-padding row counts in the default S of the seq modes: "exclude" (verl, OpenRLHF) or
    "include" (TRL ``grpo``).
    verl's signature: ``agg_loss(loss_mat=..., loss_mask=..., loss_agg_mode=..., dp_size=...,
    batch_num_tokens=..., global_batch_size=..., loss_scale_factor=...)``, positionally or by
    keyword; ``mask=`` is accepted for ``loss_mask`` (gkl's earlier name), not both.
    """
    if mask is not None:
        if loss_mask is not None:
            raise ValueError(
                "agg_loss got both loss_mask and mask (the same argument under verl's and gkl's "
                "earlier name); pass one of them"
            )
        loss_mask = mask
    _check_choice("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    _check_choice("empty_rows", empty_rows, EMPTY_ROWS)
    if not isinstance(loss_mat, torch.Tensor) or loss_mat.dim() != 2:
        shape = tuple(loss_mat.shape) if isinstance(loss_mat, torch.Tensor) else loss_mat
        raise ValueError(f"loss_mat must be a 2-D (batch, response_length) tensor, got {shape}")
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"dp_size must be a positive int (data-parallel ranks), got {dp_size!r}")
    _check_normaliser("batch_num_tokens", batch_num_tokens)
    _check_normaliser("global_batch_size", global_batch_size)
    _check_normaliser("loss_scale_factor", loss_scale_factor)
    valid = _valid_mask(loss_mask, loss_mat, "loss_mat", "loss_mask")
    if valid is None:
        valid = torch.ones_like(loss_mat, dtype=torch.bool)
    loss_mat = _zero_padding(loss_mat, valid)
    counts = valid.to(loss_mat.dtype)
    row_counts = counts.sum(-1)
    if global_batch_size is not None:
        num_seqs = global_batch_size
    elif empty_rows == "exclude" and loss_agg_mode != "dr_grpo":
        num_seqs = (row_counts > 0).sum().clamp(min=1)
    else:
        num_seqs = max(loss_mat.shape[0], 1)
    scale = loss_mat.shape[-1] if loss_scale_factor is None else loss_scale_factor

    if loss_agg_mode == "token-mean":
        num_tokens = counts.sum().clamp(min=1) if batch_num_tokens is None else batch_num_tokens
        loss = loss_mat.sum() / num_tokens
    elif loss_agg_mode == "seq-mean-token-sum":
        loss = loss_mat.sum() / num_seqs
    elif loss_agg_mode == "seq-mean-token-mean":
        loss = (loss_mat.sum(-1) / row_counts.clamp(min=1)).sum() / num_seqs
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        return loss_mat.sum() / scale  # verl (b178a3c) applies no dp_size here
    elif loss_agg_mode == "token-sum":
        loss = loss_mat.sum()
    else:  # dr_grpo
        loss = loss_mat.sum() / (num_seqs * scale)
    return loss * dp_size


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    estimator: str = "k2",
    mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    is_mode: str = "none",
    is_truncation: float | None = None,
    loss_agg_mode: str = "token-mean",
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    log_ratio_clamp: float | None = None,
    dp_size: int = 1,
    batch_num_tokens: int | float | torch.Tensor | None = None,
    global_batch_size: int | float | torch.Tensor | None = None,
    loss_scale_factor: int | float | None = None,
    empty_rows: str = "exclude",
    placement: str = "loss",
    reward_to_go: bool = True,
    check_values: bool = True,
) -> torch.Tensor:
    """Scalar KL loss ``agg_loss(kl_loss_per_token(...), mask, loss_agg_mode, ...)``; add beta * it.

    One token (a bandit), on-policy: E[grad k2] = grad KL(pi || pi_ref), E[grad k3] =
    grad KL(pi_ref || pi), E[grad k1] = 0. Sequences: as a loss, k2 gives the per-token reverse
    KL with the prefix distribution frozen and k3 the per-token forward KL with prefixes from pi,
    neither the sequence KL; ``placement="reward"`` with k1, reward-to-go and token-sum
    aggregation is exactly grad KL(pi(y) || pi_ref(y)). Off-policy (tokens from mu), the
    on-policy expected gradient of the same term is kept exactly by ``detached`` for one token,
    ``cumulative`` for token-sum aggregation and ``sequence`` for any per-sequence aggregation
    (``seq-mean-token-mean`` with variable lengths included). docs/rl_kl.md has the table.
    """
    _check_choice("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    _check_choice("empty_rows", empty_rows, EMPTY_ROWS)
    per_token = kl_loss_per_token(
        logprobs,
        ref_logprobs,
        estimator=estimator,
        mask=mask,
        old_logprobs=old_logprobs,
        is_mode=is_mode,
        is_truncation=is_truncation,
        clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high,
        log_ratio_clamp=log_ratio_clamp,
        placement=placement,
        reward_to_go=reward_to_go,
        check_values=check_values,
    )
    return agg_loss(
        per_token,
        mask,
        loss_agg_mode,
        dp_size,
        batch_num_tokens,
        global_batch_size,
        loss_scale_factor,
        empty_rows=empty_rows,
    )
