"""KL regularisation building blocks for RLHF policies (pure torch, no RL framework needed).

See docs/rl_kl.md for which combination optimises which divergence and the verl / TRL /
OpenRLHF flags that select it.
"""

from gkl.rl.kl import (
    EMPTY_ROWS,
    ESTIMATOR_ALIASES,
    ESTIMATORS,
    IS_MODES,
    LOGPROB_TOLERANCE,
    LOSS_AGG_MODES,
    PLACEMENTS,
    REWARD_IS_MODES,
    VERL_KL_PENALTIES,
    UnknownKLPenaltyError,
    agg_loss,
    check_kl_options,
    kl_estimate,
    kl_in_reward,
    kl_loss,
    kl_loss_per_token,
    kl_penalty,
)

__all__ = [
    "EMPTY_ROWS",
    "ESTIMATORS",
    "ESTIMATOR_ALIASES",
    "IS_MODES",
    "PLACEMENTS",
    "REWARD_IS_MODES",
    "UnknownKLPenaltyError",
    "check_kl_options",
    "LOGPROB_TOLERANCE",
    "LOSS_AGG_MODES",
    "VERL_KL_PENALTIES",
    "agg_loss",
    "kl_estimate",
    "kl_in_reward",
    "kl_loss",
    "kl_loss_per_token",
    "kl_penalty",
]
