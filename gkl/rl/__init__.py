"""KL regularisation building blocks for RLHF policies (pure torch, no RL framework needed).

See docs/rl_kl.md for which combination optimises which divergence and the verl / TRL /
OpenRLHF flags that select it.
"""

from gkl.rl.kl import (
    ESTIMATOR_ALIASES,
    ESTIMATORS,
    IS_MODES,
    LOSS_AGG_MODES,
    agg_loss,
    kl_estimate,
    kl_in_reward,
    kl_loss,
    kl_loss_per_token,
)

__all__ = [
    "ESTIMATORS",
    "ESTIMATOR_ALIASES",
    "IS_MODES",
    "LOSS_AGG_MODES",
    "agg_loss",
    "kl_estimate",
    "kl_in_reward",
    "kl_loss",
    "kl_loss_per_token",
]
