"""KL regularisation on a real transformer policy: a tiny random GPT-2 over enumerable sequences.

The policy is a randomly initialised GPT-2 (``transformers.GPT2Config``, no downloaded weights)
that writes a response after a single BOS prompt over a vocabulary of ``--vocab`` tokens, token
0 being EOS: a response ends at EOS or after ``--length`` tokens, so lengths vary (1 to T).
pi_ref is its frozen initial copy. All responses are scored in one forward pass, so every
expectation below is an exact sum (float64, no sampling noise) and the metrics are exact:
KL(pi || pi_ref) and the distance KL(pi || pi*) to the optimum pi*(y) ∝ pi_ref(y) exp(r(y) / beta)
of J(pi) = E_pi[r] - beta * KL(pi || pi_ref), for a fixed synthetic reward r(y) ~ N(0, 1).

Each Adam step is a GRPO-style update in expectation: the reward term is the policy gradient
with a mean baseline, -E_pi[(r - E_pi r) * sum_t log pi_t] (Dr. GRPO's advantage, no std
scaling), identical in every run; the KL term is one gkl.rl ``kl_loss_per_token`` setting,
aggregated per sequence by its token sum or its token mean (GRPO's ``seq-mean-token-mean``):

  on-policy    k1 in the reward with reward-to-go (token sum: the exact sequence KL gradient;
               token mean), k2 as loss (token sum), k3 as loss (token mean: GRPO's default);
  off-policy   the KL term's tokens come from a stale rollout policy mu (pi as it was at the
               last refresh, every ``--lag`` steps), weighted by is_mode cumulative / sequence /
               detached (PPO's per-token ratio) / differentiable (TRL's use_bias_correction_kl).

Run:  .venv/bin/python scripts/transformer_kl_demo.py  # --vocab 3 --length 4 --steps 300 --lag 25
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from gkl.io import atomic_open  # noqa: E402
from gkl.rl import agg_loss, kl_loss_per_token  # noqa: E402

D = torch.float64
BETA = 1.0
EOS = 0
AGGREGATION = {"token sum": "seq-mean-token-sum", "token mean": "seq-mean-token-mean"}
DEFAULT_FIGURE = (
    Path(__file__).resolve().parents[1] / "docs" / "figures" / "transformer_kl_demo.png"
)
PLOT_FLOOR = 1e-16  # float64 round-off of the KL sums


@dataclass(frozen=True)
class Method:
    """One KL implementation; ``off_policy``: its tokens come from the stale rollout policy."""

    label: str
    place: str  # "reward" or "loss"
    estimator: str
    aggregation: str = "token sum"
    is_mode: str = "none"
    off_policy: bool = False
    twin: str | None = None  # the on-policy run whose expected gradient it should reproduce


K1R, K1R_MEAN, K2, K3 = (
    "k1 in reward, reward-to-go",
    "k1 in reward, reward-to-go, token mean",
    "k2 as loss",
    "k3 as loss, token mean (GRPO)",
)
METHODS = [
    Method(K1R, "reward", "k1"),
    Method(K1R_MEAN, "reward", "k1", "token mean"),
    Method(K2, "loss", "k2"),
    Method(K3, "loss", "k3", "token mean"),
    Method("k1 in reward, IS cumulative", "reward", "k1", "token sum", "cumulative", True, K1R),
    Method("k1 in reward, IS sequence", "reward", "k1", "token sum", "sequence", True, K1R),
    Method("k1 in reward, IS detached (PPO)", "reward", "k1", "token sum", "detached", True, K1R),
    Method("k2, IS detached", "loss", "k2", "token sum", "detached", True, K2),
    Method("k2, IS cumulative", "loss", "k2", "token sum", "cumulative", True, K2),
    Method("k3 token mean, IS cumulative", "loss", "k3", "token mean", "cumulative", True, K3),
    Method("k3 token mean, IS sequence", "loss", "k3", "token mean", "sequence", True, K3),
    Method(
        "k3 token mean, IS differentiable (TRL)", "loss", "k3", "token mean", "differentiable", True
    ),
]


@dataclass
class History:
    kl_ref: list[float] = field(default_factory=list)
    kl_opt: list[float] = field(default_factory=list)
    seq_logp: list[torch.Tensor] = field(default_factory=list)  # log pi(y) after every step

    @property
    def final_logp(self) -> torch.Tensor:
        return self.seq_logp[-1]


class Enumerated:
    """Every response y (EOS-terminated or of length T) with its per-token log-probs."""

    def __init__(self, vocab: int, length: int, seed: int):
        self.vocab, self.length = vocab, length
        responses = [
            y
            for n in range(1, length + 1)
            for y in itertools.product(range(vocab), repeat=n)
            if EOS not in y[:-1] and (y[-1] == EOS or n == length)
        ]
        seqs = torch.full((len(responses), length), EOS)
        self.mask = torch.zeros(len(responses), length, dtype=torch.bool)
        for i, y in enumerate(responses):
            seqs[i, : len(y)] = torch.tensor(y)
            self.mask[i, : len(y)] = True
        bos = torch.full((len(seqs), 1), vocab)  # the prompt: one BOS token (id V)
        self.input_ids = torch.cat([bos, seqs], 1)
        self.seqs = seqs
        g = torch.Generator().manual_seed(seed)
        self.reward = torch.randn(len(seqs), generator=g, dtype=D)

    def token_logp(self, model: GPT2LMHeadModel) -> torch.Tensor:
        """(responses, T) log pi(y_t | BOS, y_<t), 0 after the response's end."""
        logits = model(input_ids=self.input_ids).logits[:, :-1, : self.vocab]
        lp = F.log_softmax(logits, -1).gather(-1, self.seqs[..., None])[..., 0]
        return torch.where(self.mask, lp, torch.zeros_like(lp))


def build_policy(vocab: int, length: int, seed: int) -> GPT2LMHeadModel:
    cfg = GPT2Config(
        vocab_size=vocab + 1, n_positions=length + 1, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2,
        bos_token_id=vocab, eos_token_id=vocab,
    )  # fmt: skip
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).to(D)


def kl_term(
    method: Method, problem: Enumerated, lp: torch.Tensor, ref: torch.Tensor, mu: torch.Tensor
) -> torch.Tensor:
    """Expected KL surrogate sum_y w(y) * agg_t L_t(y), w = pi (on-policy) or mu (stale)."""
    sampler = mu if method.off_policy else lp.detach()
    weights = sampler.sum(-1).exp()
    per_token = kl_loss_per_token(
        lp, ref, estimator=method.estimator, mask=problem.mask, placement=method.place,
        is_mode=method.is_mode, old_logprobs=sampler if method.is_mode != "none" else None,
    )  # fmt: skip
    # seq-mean over the N responses: row weight N * w(y) turns it into sum_y w(y) L(y)
    weighted = per_token * (len(weights) * weights)[:, None]
    return agg_loss(weighted, problem.mask, AGGREGATION[method.aggregation])


def run(problem: Enumerated, method: Method, args: argparse.Namespace) -> History:
    policy = build_policy(problem.vocab, problem.length, args.seed)
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        ref = problem.token_logp(reference)
    log_opt = ref.sum(-1) + problem.reward / BETA
    log_opt = log_opt - torch.logsumexp(log_opt, 0)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    hist, mu = History(), None
    for step in range(args.steps + 1):
        lp = problem.token_logp(policy)
        seq_lp = lp.sum(-1)
        with torch.no_grad():
            p = seq_lp.exp()
            hist.kl_ref.append((p * (seq_lp - ref.sum(-1))).sum().item())
            hist.kl_opt.append((p * (seq_lp - log_opt)).sum().item())
        hist.seq_logp.append(seq_lp.detach())
        if step == args.steps:
            break
        if step % args.lag == 0:
            mu = lp.detach()  # the rollout engine catches up with the trainer
        p = seq_lp.detach().exp()
        advantage = problem.reward - (p * problem.reward).sum()
        pg = -(p * advantage * seq_lp).sum()
        loss = pg + BETA * kl_term(method, problem, lp, ref, mu)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return hist


def _small(x: float) -> str:
    return f"{x:.2e}" if abs(x) >= 1e-12 else "< 1e-12"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=3, help="response vocabulary V")
    parser.add_argument("--length", type=int, default=4, help="maximum response length T")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per run")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    parser.add_argument("--lag", type=int, default=25, help="steps between rollout refreshes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, default=DEFAULT_FIGURE, help="PNG output path")
    args = parser.parse_args()
    if args.vocab < 2 or args.length < 1 or args.vocab**args.length > 20000:
        parser.error("need --vocab >= 2 (token 0 is EOS), --length >= 1, vocab**length <= 20000")
    if args.steps < 1 or args.lag < 1:
        parser.error("--steps and --lag must be >= 1")
    torch.set_num_threads(1)
    start = time.perf_counter()

    problem = Enumerated(args.vocab, args.length, args.seed)
    with torch.no_grad():
        ref_seq = problem.token_logp(build_policy(args.vocab, args.length, args.seed)).sum(-1)
    log_opt = ref_seq + problem.reward / BETA
    opt_kl_ref = (
        (torch.softmax(log_opt, 0) * (torch.log_softmax(log_opt, 0) - ref_seq)).sum().item()
    )
    print(
        f"tiny random GPT-2 (2 layers, width 32), vocabulary {args.vocab} with EOS, length <= "
        f"{args.length}: {len(problem.seqs)} responses, beta {BETA}, {args.steps} Adam steps "
        f"(lr {args.lr}), "
        f"rollouts refreshed every {args.lag} steps for the off-policy runs\n"
    )
    print("| setting | implementation | KL(π‖π_ref) | KL(π‖π*) | KL(π‖π_twin) |")
    print("|---|---|---:|---:|---:|")
    print(f"| | optimum π* | {opt_kl_ref:.4f} | 0 | |")
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), constrained_layout=True)
    results: dict[str, History] = {}
    for method in METHODS:
        hist = run(problem, method, args)
        results[method.label] = hist
        twin = ""
        if method.twin is not None:
            dist = [
                (a.exp() * (a - b)).sum().item()
                for a, b in zip(hist.seq_logp, results[method.twin].seq_logp, strict=True)
            ]
            twin = _small(dist[-1])
        setting = "off-policy" if method.off_policy else "on-policy"
        print(
            f"| {setting} | {method.label} | {hist.kl_ref[-1]:.4f} | "
            f"{_small(hist.kl_opt[-1])} | {twin} |"
        )
        ls = "--" if method.is_mode in ("cumulative", "sequence") else "-"
        if method.off_policy:
            axes[1, 0].plot(hist.kl_ref, ls=ls, label=method.label)
            if method.twin is not None:
                label = f"{method.label} vs {method.twin}"
                axes[1, 1].semilogy(torch.tensor(dist).clamp(min=PLOT_FLOOR), ls=ls, label=label)
        else:
            axes[0, 0].plot(hist.kl_ref, label=method.label)
            axes[0, 1].semilogy(torch.tensor(hist.kl_opt).clamp(min=PLOT_FLOOR), label=method.label)
    off = f"off-policy (rollouts every {args.lag} steps)"
    for row, name in enumerate(("on-policy", off)):
        axes[row, 0].axhline(opt_kl_ref, color="k", ls=":", lw=1, label="KL(π*‖π_ref)")
        axes[row, 0].set_title(f"{name}: KL(π‖π_ref)")
        axes[row, 0].legend(fontsize=8)
        for ax in axes[row]:
            ax.set_xlabel("Adam step")
    axes[0, 1].set_title("on-policy: KL(π‖π*) to the optimum")
    axes[1, 1].set_title(f"{off}: KL(π‖π_twin)")
    axes[1, 1].legend(fontsize=8, title="vs the on-policy twin it should follow", title_fontsize=8)
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.figure, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    print(f"\nfigure: {args.figure}\nwall time: {time.perf_counter() - start:.0f} s (1 thread)")


if __name__ == "__main__":
    main()
