"""TRL drop-in: a ``GRPOTrainer`` whose KL term is any ``gkl.rl`` combination.

TRL's GRPO (trl 1.16.0, ``GRPOTrainer._compute_loss``) adds ``beta * k3`` per token (times the
differentiable ratio with ``use_bias_correction_kl``, TRL's default) before aggregating by
``loss_type``. ``GKLGRPOTrainer`` runs TRL's own loss with the KL term switched off, then adds
``beta * kl_loss(...)`` from ``gkl.rl`` aggregated exactly as TRL aggregates that ``loss_type``
(every aggregation is linear, so this equals putting gkl's term in TRL's per-token loss)::

    trainer = GKLGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(beta=0.05, ...))

The default term is k1 in the reward with reward-to-go (``kl_placement="reward"``), in loss
form, with each future penalty weighted by its own cumulative ratio off-policy: its expected
gradient is grad KL(pi(y) || pi_ref(y)) for aggregations proportional to the token sum
(``luspo``; ``dapo``/``bnpo``/``dr_grpo`` up to their batch-level normaliser), and the
length-normalised ``grpo`` weights each sequence by 1/|y| (docs/rl_kl.md). With
``beta=0`` (TRL's default) nothing changes: the trainer is TRL's. With ``beta > 0`` and a term
other than TRL's, the constructor warns and says what changes and how to keep TRL's term.

Needs the ``rl`` extra (``pip install gkl[rl]``): importing this module imports ``trl``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer

from gkl.rl.kl import check_kl_options, kl_estimate, kl_loss

# TRL loss_type -> (gkl loss_agg_mode, empty_rows), as TRL 1.16.0 aggregates it
_TRL_AGGREGATION = {
    "grpo": ("seq-mean-token-mean", "include"),
    "sapo": ("seq-mean-token-mean", "include"),
    "bnpo": ("token-mean", "include"),
    "dr_grpo": ("dr_grpo", "include"),
    "luspo": ("seq-mean-token-sum", "include"),
    "dapo": ("token-mean", "include"),
    "cispo": ("token-mean", "include"),
    "vespo": ("token-mean", "include"),
}


def _trl_term(bias_correction: bool) -> tuple[str, str, str]:
    """(placement, estimator, is_mode) of TRL's own KL term."""
    return "loss", "k3", "differentiable" if bias_correction else "none"


def _describe(placement: str, estimator: str, is_mode: str, reward_to_go: bool) -> str:
    if placement == "reward":
        where = "in the reward, reward-to-go" if reward_to_go else "in the reward, own token"
        return f"{estimator} {where} (is_mode={is_mode!r})"
    return f"{estimator} as a loss (is_mode={is_mode!r})"


class GKLGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with the KL term replaced by ``beta * gkl.rl.kl_loss(...)``.

    ``kl_placement`` / ``kl_estimator`` / ``kl_is_mode`` / ``kl_reward_to_go`` /
    ``kl_is_truncation`` / ``kl_log_ratio_clamp`` are ``kl_loss``'s ``placement`` /
    ``estimator`` / ``is_mode`` / ``reward_to_go`` / ``is_truncation`` / ``log_ratio_clamp``.
    ``kl_is_mode=None`` picks TRL's choice for TRL's term (k3 as a loss): ``"differentiable"``
    (rho * k3, per token) when ``args.use_bias_correction_kl`` else ``"none"``; for every other
    term ``"cumulative"`` (exact off-policy for token sums). The behaviour policy mu is vLLM's
    sampling log-probs when TRL has them (a NaN one, which vLLM can return, falls back to TRL's old
    log-prob as TRL's ``nan_to_num`` does), else TRL's ``old_per_token_logps``, else (on-policy)
    the current log-probs detached (TRL's own term keeps TRL's ratio against the old
    log-probs). ``args.beta`` is the coefficient. Every option is checked
    here, before the model loads. ``args.importance_sampling_level="sequence"`` changes TRL's
    policy term only; TRL's sequence-level bias-corrected KL (k3 times the geometric mean of the
    ratios) is refused: gkl's ``kl_is_mode="sequence"`` is the exact full-sequence ratio.

    Logged: ``gkl/kl_term`` (the aggregated term beta multiplies), ``gkl/<estimator>_token_mean``
    (unweighted token mean of the estimator under the current policy), ``gkl/seq_k1_mean`` (the
    mean over sequences of sum_t k1_t, the on-policy estimate of KL(pi(y) || pi_ref(y))) and,
    when the term is TRL's own, TRL's ``kl`` (token mean of rho * k3 or k3).
    """

    def __init__(
        self,
        *args: Any,
        kl_placement: str = "reward",
        kl_estimator: str = "k1",
        kl_is_mode: str | None = None,
        kl_reward_to_go: bool = True,
        kl_is_truncation: float | None = None,
        kl_log_ratio_clamp: float | None = None,
        **kwargs: Any,
    ) -> None:
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is None:
            config = GRPOConfig()  # what TRL builds: beta = 0, no KL term
        if not isinstance(kl_reward_to_go, bool):
            raise ValueError(f"kl_reward_to_go must be True or False, got {kl_reward_to_go!r}")
        if kl_is_mode is None:  # TRL's choice for TRL's estimator, else the exact weights
            trl_term = _trl_term(config.use_bias_correction_kl)
            kl_is_mode = (
                trl_term[2] if (kl_placement, kl_estimator) == trl_term[:2] else "cumulative"
            )
        check_kl_options(
            estimator=kl_estimator,
            is_mode=kl_is_mode,
            placement=kl_placement,
            is_truncation=kl_is_truncation,
            log_ratio_clamp=kl_log_ratio_clamp,
        )
        if config.loss_type not in _TRL_AGGREGATION:
            valid = ", ".join(repr(k) for k in _TRL_AGGREGATION)
            raise ValueError(
                f"GKLGRPOTrainer knows how TRL aggregates loss_type {valid}; got "
                f"args.loss_type={config.loss_type!r}"
            )
        sequence_level = config.importance_sampling_level == "sequence"
        if config.beta != 0.0 and sequence_level and kl_is_mode == "differentiable":
            raise ValueError(
                "args.importance_sampling_level='sequence' with a differentiable ratio on the KL "
                "term: TRL multiplies k3 by exp(mean_t log rho_t), a geometric mean that is not "
                "an importance weight, and gkl does not reproduce it; pass kl_is_mode='sequence' "
                "(the full-sequence ratio, exact for any per-sequence aggregation) or "
                "'cumulative', or set args.use_bias_correction_kl=False"
            )
        self.kl_placement = kl_placement
        self.kl_estimator = kl_estimator
        self.kl_is_mode = kl_is_mode
        self.kl_reward_to_go = kl_reward_to_go
        self.kl_is_truncation = kl_is_truncation
        self.kl_log_ratio_clamp = kl_log_ratio_clamp
        trl_term = _trl_term(config.use_bias_correction_kl)
        self.kl_is_trl_term = (
            (kl_placement, kl_estimator, kl_is_mode) == trl_term
            and kl_is_truncation is None
            and kl_log_ratio_clamp is None
            and not sequence_level
        )
        if config.beta != 0.0 and not self.kl_is_trl_term:
            ours = _describe(kl_placement, kl_estimator, kl_is_mode, kl_reward_to_go)
            theirs = _describe(*trl_term, True)
            warnings.warn(
                f"GKLGRPOTrainer replaces TRL's KL term beta * {theirs} (from "
                f"use_bias_correction_kl={config.use_bias_correction_kl}, "
                f"importance_sampling_level={config.importance_sampling_level!r}) by beta * "
                f"{ours}, aggregated as loss_type={config.loss_type!r}; TRL's metric 'kl' is "
                "not logged (see gkl/kl_term, gkl/seq_k1_mean). To keep TRL's term pass "
                "kl_placement='loss', kl_estimator='k3', kl_is_mode=None",
                UserWarning,
                stacklevel=2,
            )
        super().__init__(*args, **kwargs)

    def _compute_loss(self, model, inputs):
        if self.beta == 0.0:
            return super()._compute_loss(model, inputs)
        captured: list[torch.Tensor] = []
        trl_logps = self._get_per_token_logps_and_entropies

        def capture(*args, **kwargs):
            out = trl_logps(*args, **kwargs)
            captured.append(out[0])
            return out

        beta = self.beta
        self._get_per_token_logps_and_entropies = capture  # instance attribute shadows the method
        self.beta = 0.0  # TRL's own loss without its KL term
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self.beta = beta
            del self._get_per_token_logps_and_entropies
        return loss + beta * self.gkl_kl_term(captured[-1], inputs)

    def _behaviour_logps(self, per_token_logps: torch.Tensor, inputs: dict) -> torch.Tensor:
        """log mu: vLLM's sampling log-probs (NaN -> TRL's old log-prob), else old, else current."""
        fallback = inputs.get("old_per_token_logps")
        if fallback is None:
            fallback = per_token_logps.detach()
        sampling = inputs.get("sampling_per_token_logps")
        if sampling is None or self.kl_is_trl_term:  # TRL's bias correction uses old, not vLLM's
            return fallback
        return torch.where(torch.isnan(sampling), fallback, sampling)

    def gkl_kl_term(self, per_token_logps: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The gkl KL loss of one micro-batch, normalised as TRL normalises ``self.loss_type``."""
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        ref = inputs["ref_per_token_logps"]
        old = self._behaviour_logps(per_token_logps, inputs)
        training = self.model.training
        accumulation = self.current_gradient_accumulation_steps if training else 1.0
        agg_mode, empty_rows = _TRL_AGGREGATION[self.loss_type]
        normaliser: dict[str, Any] = {}
        if self.loss_type in ("dapo", "cispo", "vespo"):
            # TRL: sum / (num_items_in_batch / processes [* accumulation / steps_per_generation])
            tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if training:
                tokens = tokens * self.current_gradient_accumulation_steps
                tokens = tokens / self.args.steps_per_generation
            normaliser["batch_num_tokens"] = tokens
            accumulation = 1.0
        elif self.loss_type == "dr_grpo":
            normaliser["loss_scale_factor"] = self.max_completion_length
        term = kl_loss(
            per_token_logps,
            ref,
            estimator=self.kl_estimator,
            mask=mask,
            old_logprobs=None if self.kl_is_mode == "none" else old,
            is_mode=self.kl_is_mode,
            is_truncation=self.kl_is_truncation,
            log_ratio_clamp=self.kl_log_ratio_clamp,
            placement=self.kl_placement,
            reward_to_go=self.kl_reward_to_go,
            loss_agg_mode=agg_mode,
            empty_rows=empty_rows,
            check_values=False,
            **normaliser,
        )
        self._log_kl(per_token_logps, ref, old, mask, term)
        return term / accumulation

    def _log_kl(self, logps, ref, old, mask, term) -> None:
        """Log what the metric names say (see the class docstring)."""
        with torch.no_grad():
            m = mask.to(torch.float32)
            k = kl_estimate(
                logps, ref, self.kl_estimator, log_ratio_clamp=self.kl_log_ratio_clamp,
                check_values=False,
            )  # fmt: skip
            k1 = kl_estimate(logps, ref, "k1", check_values=False)
            rows = (m.sum(-1) > 0).to(torch.float32)
            stats = [(k * m).sum(), m.sum(), ((k1 * m).sum(-1) * rows).sum(), rows.sum()]
            if self.kl_is_trl_term:
                rho = torch.exp(logps - old) if self.kl_is_mode == "differentiable" else 1.0
                stats.append((rho * k * m).sum())
            totals = self.accelerator.reduce(torch.stack(stats), reduction="sum")
            term_mean = self.accelerator.reduce(term.detach().float(), reduction="mean")
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["gkl/kl_term"].append(term_mean.item())
        tokens = totals[1].clamp(min=1.0)
        metrics[f"gkl/{self.kl_estimator}_token_mean"].append((totals[0] / tokens).item())
        metrics["gkl/seq_k1_mean"].append((totals[2] / totals[3].clamp(min=1.0)).item())
        if self.kl_is_trl_term:
            metrics["kl"].append((totals[4] / tokens).item())
