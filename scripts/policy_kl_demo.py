"""Which divergence does each KL implementation optimise? Exact toy RLHF runs with gkl.rl.

Maximises J(pi) = E_pi[r] - beta * KL(pi || pi_ref) with Adam on the policy logits, where
the KL gradient comes from one implementation at a time (k in the reward, k as a loss, with or
without importance weights). Every expectation is an exact sum over all actions / sequences in
float64, so the runs are deterministic and free of sampling noise; the only difference between
runs is the KL implementation. The true optimum is pi*(y) ∝ pi_ref(y) exp(r(y) / beta).

Settings:
  bandit      one softmax step over 6 actions, on-policy;
  off-policy  the same bandit, tokens drawn from a fixed behaviour policy mu (uniform); the
              reward term keeps its exact (importance-weighted) gradient, only the KL term
              varies;
  sequences   a tabular autoregressive policy over all 3**3 sequences (vocab 3, length 3) with
              a sequence-level reward.

Run:  .venv/bin/python scripts/policy_kl_demo.py [--steps 600] [--figure PATH]
"""

from __future__ import annotations

import argparse
import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from gkl.io import atomic_write_with
from gkl.rl import kl_in_reward, kl_loss_per_token

D = torch.float64
BETA = 0.5
LR = 0.1
ADAM_BETAS = (0.9, 0.999)
LINESTYLES = ("-", "--", "-.", ":", (0, (6, 2, 1, 2)))
PLOT_FLOOR = 1e-13  # float64 round-off level of the KL sums
DEFAULT_FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "policy_kl_demo.png"


@dataclass(frozen=True)
class Method:
    """One KL implementation: ``reward`` (k in reward) or ``loss`` (k as loss, with IS mode)."""

    label: str
    place: Literal["reward", "loss"]
    estimator: str
    is_mode: str = "none"
    reward_to_go: bool = False


BANDIT_METHODS = [
    Method("k1 in reward", "reward", "k1"),
    Method("k2 as loss", "loss", "k2"),
    Method("k3 as loss (GRPO)", "loss", "k3"),
    Method("k3 in reward", "reward", "k3"),
    Method("k1 as loss", "loss", "k1"),
]
OFF_POLICY_METHODS = [
    Method("k2 as loss, IS none", "loss", "k2", "none"),
    Method("k2 as loss, IS detached", "loss", "k2", "detached"),
    Method("k1 as loss, IS differentiable", "loss", "k1", "differentiable"),
    Method("k3 as loss, IS differentiable", "loss", "k3", "differentiable"),
    Method("k3 as loss, IS ppo_clip", "loss", "k3", "ppo_clip"),
]
SEQUENCE_METHODS = [
    Method("k1 in reward, reward-to-go", "reward", "k1", reward_to_go=True),
    Method("k1 in reward, own token only", "reward", "k1"),
    Method("k2 as loss, token sum", "loss", "k2"),
    Method("k3 as loss, token sum", "loss", "k3"),
]


class Problem(ABC):
    """Enumerable policy: every outcome y is a row of a (num_outcomes, T) token log-prob matrix."""

    def __init__(self, init_logits: torch.Tensor, ref_logp: torch.Tensor, reward: torch.Tensor):
        self.init_logits = init_logits
        self.ref_logp = ref_logp
        self.reward = reward
        seq_ref = ref_logp.sum(-1)
        log_opt = seq_ref + reward / BETA
        self.opt_logp = log_opt - torch.logsumexp(log_opt, 0)

    @abstractmethod
    def token_logp(self, theta: torch.Tensor) -> torch.Tensor:
        """(outcomes, T) log-probabilities log pi(y_t | y_<t) of every outcome y."""

    def optimum_kl_to_ref(self) -> float:
        """KL(pi* || pi_ref) of the true optimum."""
        return (self.opt_logp.exp() * (self.opt_logp - self.ref_logp.sum(-1))).sum().item()

    def divergences(self, theta: torch.Tensor) -> tuple[float, float]:
        """Exact KL(pi || pi_ref) and KL(pi || pi*) over whole outcomes."""
        seq = self.token_logp(theta).sum(-1)
        p = seq.exp()
        to_ref = (p * (seq - self.ref_logp.sum(-1))).sum()
        to_opt = (p * (seq - self.opt_logp)).sum()
        return to_ref.item(), to_opt.item()

    def objective(self, theta: torch.Tensor) -> float:
        """J = E_pi[r] - beta * KL(pi || pi_ref)."""
        seq = self.token_logp(theta).sum(-1)
        kl_ref, _ = self.divergences(theta)
        return (seq.exp() * self.reward).sum().item() - BETA * kl_ref


class Bandit(Problem):
    def __init__(self) -> None:
        ref_logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.5], dtype=D)
        reward = torch.tensor([0.0, 0.2, 0.5, 1.0, 1.5, 0.8], dtype=D)
        super().__init__(ref_logits, F.log_softmax(ref_logits, -1)[:, None], reward)

    def token_logp(self, theta: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(theta, -1)[:, None]


class ToySequences(Problem):
    """Tabular autoregressive policy: logits per prefix, all vocab**length sequences."""

    def __init__(self, vocab: int = 3, length: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.seqs = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
        offsets = [sum(vocab**i for i in range(t)) for t in range(length)]
        self.ctx = torch.stack(
            [offsets[t] + self._prefix_code(t, vocab) for t in range(length)], dim=1
        )
        n_ctx = offsets[-1] + vocab ** (length - 1)
        ref_table = 1.5 * torch.randn(n_ctx, vocab, generator=g, dtype=D)
        reward = torch.randn(len(self.seqs), generator=g, dtype=D)
        super().__init__(ref_table.clone(), self._gather(F.log_softmax(ref_table, -1)), reward)

    def _prefix_code(self, t: int, vocab: int) -> torch.Tensor:
        code = torch.zeros(len(self.seqs), dtype=torch.long)
        for i in range(t):
            code = code * vocab + self.seqs[:, i]
        return code

    def _gather(self, table: torch.Tensor) -> torch.Tensor:
        return table[self.ctx, self.seqs]

    def token_logp(self, theta: torch.Tensor) -> torch.Tensor:
        return self._gather(F.log_softmax(theta, -1))


def surrogate(
    problem: Problem, theta: torch.Tensor, method: Method, mu_logp: torch.Tensor | None
) -> torch.Tensor:
    """Loss whose gradient is the exact expected gradient of -(E[r] - beta * KL_method)."""
    lp = problem.token_logp(theta)  # (outcomes, T)
    weights = lp.sum(-1).detach().exp()  # pi(y)
    reward_term = -(weights * problem.reward * lp.sum(-1)).sum()  # REINFORCE, exact
    if method.place == "reward":
        penalty = kl_in_reward(
            lp, problem.ref_logp, estimator=method.estimator, reward_to_go=method.reward_to_go
        )
        kl_term = (weights[:, None] * penalty * lp).sum()
    else:
        old = None
        if method.is_mode != "none":
            old = lp.detach() if mu_logp is None else mu_logp
        per_token = kl_loss_per_token(
            lp,
            problem.ref_logp,
            estimator=method.estimator,
            old_logprobs=old,
            is_mode=method.is_mode,
        )
        sample_w = weights if mu_logp is None else mu_logp.sum(-1).exp()
        kl_term = (sample_w * per_token.sum(-1)).sum()
    return reward_term + BETA * kl_term


@dataclass
class History:
    """Per-step KL(pi || pi_ref) and KL(pi || pi*), and the final objective gap J(pi*) - J(pi)."""

    kl_ref: list[float]
    kl_opt: list[float]
    gap: float = float("nan")


def run(
    problem: Problem, method: Method, steps: int, mu_logp: torch.Tensor | None = None
) -> History:
    """Adam on the exact expected gradient, written out (torch.optim imports torch._dynamo)."""
    theta = problem.init_logits.clone().requires_grad_(True)  # start at the reference policy
    m1, m2 = torch.zeros_like(theta), torch.zeros_like(theta)
    hist = History([], [])
    for step in range(1, steps + 2):
        with torch.no_grad():
            kl_ref, kl_opt = problem.divergences(theta)
        hist.kl_ref.append(kl_ref)
        hist.kl_opt.append(kl_opt)
        if step > steps:
            break
        (grad,) = torch.autograd.grad(surrogate(problem, theta, method, mu_logp), theta)
        m1 = ADAM_BETAS[0] * m1 + (1 - ADAM_BETAS[0]) * grad
        m2 = ADAM_BETAS[1] * m2 + (1 - ADAM_BETAS[1]) * grad.square()
        m1_hat = m1 / (1 - ADAM_BETAS[0] ** step)
        m2_hat = m2 / (1 - ADAM_BETAS[1] ** step)
        with torch.no_grad():
            theta -= LR * m1_hat / (m2_hat.sqrt() + 1e-12)
    with torch.no_grad():
        hist.gap = optimum_objective(problem) - problem.objective(theta)
    return hist


def optimum_objective(problem: Problem) -> float:
    """J(pi*) = beta * log sum_y pi_ref(y) exp(r(y) / beta)."""
    return BETA * torch.logsumexp(problem.ref_logp.sum(-1) + problem.reward / BETA, 0).item()


def _small(x: float) -> str:
    """Scientific notation, with round-off (|x| < 1e-12) shown as such."""
    return f"{x:.2e}" if abs(x) >= 1e-12 else "< 1e-12"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="Adam steps per run")
    parser.add_argument("--figure", type=Path, default=DEFAULT_FIGURE, help="PNG output path")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead

    bandit, sequences = Bandit(), ToySequences()
    uniform = F.log_softmax(torch.zeros(6, 1, dtype=D), 0)  # behaviour policy mu
    settings: list[tuple[str, Problem, list[Method], torch.Tensor | None]] = [
        ("bandit", bandit, BANDIT_METHODS, None),
        ("off-policy bandit", bandit, OFF_POLICY_METHODS, uniform),
        ("sequences", sequences, SEQUENCE_METHODS, None),
    ]

    fig, axes = plt.subplots(len(settings), 2, figsize=(12, 11), constrained_layout=True)
    print(f"beta = {BETA}; {args.steps} Adam steps (lr {LR}) on exact gradients from pi = pi_ref\n")
    print("| setting | implementation | KL(pi‖pi_ref) | KL(pi‖pi*) | J(pi*) − J(pi) |")
    print("|---|---|---:|---:|---:|")
    for row, (name, problem, methods, mu_logp) in enumerate(settings):
        target = problem.optimum_kl_to_ref()
        print(f"| {name} | optimum pi* | {target:.4f} | 0 | 0 |")
        for i, method in enumerate(methods):
            hist = run(problem, method, args.steps, mu_logp)
            print(
                f"| {name} | {method.label} | {hist.kl_ref[-1]:.4f} | "
                f"{_small(hist.kl_opt[-1])} | {_small(hist.gap)} |"
            )
            # identical runs overlap: vary dash and width so every curve stays visible
            style = {"ls": LINESTYLES[i % len(LINESTYLES)], "lw": 2.6 - 0.4 * i}
            axes[row, 0].plot(hist.kl_ref, label=method.label, **style)
            kl_opt = torch.tensor(hist.kl_opt).clamp(min=PLOT_FLOOR)
            axes[row, 1].semilogy(kl_opt, label=method.label, **style)
        axes[row, 1].set_ylim(bottom=PLOT_FLOOR / 3)
        axes[row, 0].axhline(target, color="k", ls="--", lw=1, label="KL(pi*‖pi_ref)")
        axes[row, 0].set_title(f"{name}: KL(pi‖pi_ref)")
        axes[row, 1].set_title(f"{name}: KL(pi‖pi*) to the true optimum")
        axes[row, 0].legend(fontsize=8)
        for ax in axes[row]:
            ax.set_xlabel("step")
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fmt = args.figure.suffix[1:] or "png"
    atomic_write_with(args.figure, lambda f: fig.savefig(f, format=fmt, dpi=110))
    print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
