"""TRL drop-in: a ``GRPOTrainer`` whose KL term is any ``gkl.rl`` combination.

TRL's GRPO (trl 1.16.0, ``GRPOTrainer._compute_loss``) adds ``beta * k3`` per token (times the
differentiable ratio with ``use_bias_correction_kl``) before aggregating by ``loss_type``.
``GKLGRPOTrainer`` runs TRL's own loss with the KL term switched off, then adds
``beta * kl_loss(...)`` from ``gkl.rl`` aggregated exactly as TRL aggregates that ``loss_type``
(every aggregation is linear, so this equals putting gkl's term in TRL's per-token loss):

    trainer = GKLGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(beta=0.05, ...),
                             kl_estimator="k2", kl_is_mode="cumulative")

Needs the ``rl`` extra (``pip install gkl[rl]``): importing this module imports ``trl``.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import GRPOTrainer

from gkl.rl.kl import IS_MODES, _check_choice, _resolve_estimator, kl_estimate, kl_loss

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


class GKLGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with the KL term replaced by ``beta * gkl.rl.kl_loss(...)``.

    ``kl_estimator`` / ``kl_is_mode`` / ``kl_is_truncation`` / ``kl_log_ratio_clamp`` are
    ``kl_loss``'s ``estimator`` / ``is_mode`` / ``is_truncation`` / ``log_ratio_clamp``. The
    behaviour policy mu is vLLM's sampling log-probs when TRL has them, else TRL's
    ``old_per_token_logps``, else (on-policy) the current log-probs detached. ``args.beta`` is
    the coefficient; ``args.use_bias_correction_kl`` is ignored (``kl_is_mode`` decides).
    Defaults: k2 with cumulative IS, the exact reverse-KL gradient on- and off-policy.
    """

    def __init__(
        self,
        *args: Any,
        kl_estimator: str = "k2",
        kl_is_mode: str = "cumulative",
        kl_is_truncation: float | None = None,
        kl_log_ratio_clamp: float | None = None,
        **kwargs: Any,
    ) -> None:
        _resolve_estimator(kl_estimator)
        _check_choice("kl_is_mode", kl_is_mode, IS_MODES)
        super().__init__(*args, **kwargs)
        if self.loss_type not in _TRL_AGGREGATION:
            valid = ", ".join(repr(k) for k in _TRL_AGGREGATION)
            raise ValueError(
                f"GKLGRPOTrainer knows how TRL aggregates loss_type {valid}; got "
                f"args.loss_type={self.loss_type!r}"
            )
        self.kl_estimator = kl_estimator
        self.kl_is_mode = kl_is_mode
        self.kl_is_truncation = kl_is_truncation
        self.kl_log_ratio_clamp = kl_log_ratio_clamp

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

    def gkl_kl_term(self, per_token_logps: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The gkl KL loss of one micro-batch, normalised as TRL normalises ``self.loss_type``."""
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        ref = inputs["ref_per_token_logps"]
        old = inputs.get("sampling_per_token_logps")
        if old is None:
            old = inputs.get("old_per_token_logps")
        if old is None:
            old = per_token_logps.detach()
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
            loss_agg_mode=agg_mode,
            empty_rows=empty_rows,
            check_values=False,
            **normaliser,
        )
        self._log_kl(per_token_logps, ref, mask)
        return term / accumulation

    def _log_kl(self, logps: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> None:
        """Log the token mean of the estimator's value as TRL's "kl" metric."""
        with torch.no_grad():
            k = kl_estimate(
                logps, ref, self.kl_estimator, log_ratio_clamp=self.kl_log_ratio_clamp,
                check_values=False,
            )  # fmt: skip
            m = mask.to(k.dtype)
            stats = torch.stack([(k * m).sum(), m.sum()])
            totals = self.accelerator.reduce(stats, reduction="sum")
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["kl"].append((totals[0] / totals[1].clamp(min=1.0)).item())
