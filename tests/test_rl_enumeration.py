"""gkl.rl on sequences: every (estimator, placement, aggregation, is_mode) by exact enumeration.

A tabular autoregressive policy over V = 3 tokens (token 0 = EOS) writes a response of at most
T = 3 tokens: it stops at EOS or after the third token, so the 15 responses have lengths 1, 2
and 3. For every combination the expected gradient of the aggregated gkl loss, E_{y~q}[grad
L(y)] with q = pi (on-policy) or a behaviour policy mu (off-policy), is an exact float64 sum
over the 15 responses. It is compared with the gradient of the sequence-level reverse KL,
grad KL(pi(y) || pi_ref(y)) (autograd of the exact sum), and, off-policy, with the on-policy
expected gradient of the same term (its "twin"), as ||g - g_twin|| / ||grad KL||.
``pytest -s`` prints the table that docs/rl_kl.md shows.
"""

from __future__ import annotations

import pytest
import torch

from gkl.rl import agg_loss, kl_loss_per_token

V, T, EOS = 3, 3, 0
D = torch.float64
EXACT = 1e-12
AGGREGATIONS = {"token-sum": "seq-mean-token-sum", "token-mean": "seq-mean-token-mean"}


def _toy(seed: int = 0):
    """States (non-EOS prefixes), responses, and random logits for pi, pi_ref and mu."""
    prefixes = [()] + [(a,) for a in (1, 2)] + [(a, b) for a in (1, 2) for b in (1, 2)]
    index = {p: i for i, p in enumerate(prefixes)}
    responses: list[tuple[int, ...]] = []

    def extend(prefix):
        for tok in range(V):
            y = prefix + (tok,)
            if tok == EOS or len(y) == T:
                responses.append(y)
            else:
                extend(y)

    extend(())
    states = torch.zeros(len(responses), T, dtype=torch.long)
    tokens = torch.zeros(len(responses), T, dtype=torch.long)
    mask = torch.zeros(len(responses), T, dtype=torch.bool)
    for b, y in enumerate(responses):
        for t, tok in enumerate(y):
            states[b, t], tokens[b, t], mask[b, t] = index[y[:t]], tok, True
    g = torch.Generator().manual_seed(seed)
    logits = {k: torch.randn(len(prefixes), V, generator=g, dtype=D) for k in ("pi", "ref", "mu")}
    return prefixes, responses, states, tokens, mask, logits


PREFIXES, RESPONSES, STATES, TOKENS, MASK, LOGITS = _toy()


def _token_logps(logits: torch.Tensor) -> torch.Tensor:
    """log p(y_t | y_<t) per response token, 0 at padding."""
    lp = torch.log_softmax(logits, -1)[STATES, TOKENS]
    return torch.where(MASK, lp, torch.zeros_like(lp))


def _seq_kl_grad(theta: torch.Tensor) -> torch.Tensor:
    lp = _token_logps(theta).sum(-1)
    ref = _token_logps(LOGITS["ref"]).sum(-1)
    (g,) = torch.autograd.grad((lp.exp() * (lp - ref)).sum(), theta)
    return g


def _expected_grad(theta, estimator, placement, aggregation, is_mode, off_policy, rtg=True):
    """E_{y ~ q}[grad agg(L(y))], q = pi (detached) or mu, as an exact weighted sum."""
    lp = _token_logps(theta)
    sample_lp = _token_logps(LOGITS["mu"]) if off_policy else lp.detach()
    q = sample_lp.sum(-1).exp()
    per_token = kl_loss_per_token(
        lp, _token_logps(LOGITS["ref"]), estimator=estimator, mask=MASK,
        old_logprobs=None if is_mode == "none" else sample_lp, is_mode=is_mode,
        placement=placement, reward_to_go=rtg,
    )  # fmt: skip
    # seq-mean over the 15 rows: weighting row b by 15 * q(y_b) gives sum_y q(y) L(y)
    weighted = per_token * (len(RESPONSES) * q)[:, None]
    (g,) = torch.autograd.grad(agg_loss(weighted, loss_mask=MASK, loss_agg_mode=aggregation), theta)
    return g


def _rel(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """||a - b|| / ||scale|| (scale = b unless given)."""
    return ((a - b).norm() / (b if scale is None else scale).norm()).item()


# (placement, estimator, reward_to_go, off-policy is_modes)
SETTINGS = [
    ("reward", "k1", True, ("none", "detached", "cumulative", "sequence")),
    ("reward", "k3", True, ("cumulative", "sequence")),
    ("reward", "k1", False, ("cumulative",)),
    ("loss", "k1", None, ("none", "cumulative", "sequence", "differentiable")),
    ("loss", "k2", None, ("none", "detached", "cumulative", "sequence")),
    ("loss", "k3", None, ("none", "detached", "cumulative", "sequence", "differentiable")),
]


def _table():
    theta = LOGITS["pi"].clone().requires_grad_(True)
    target = _seq_kl_grad(theta)
    rows = []
    for agg_name, agg in AGGREGATIONS.items():
        for placement, est, rtg, off_modes in SETTINGS:
            label = (
                f"{est} in reward, {'reward-to-go' if rtg else 'own token'}"
                if placement == "reward"
                else f"{est} as loss"
            )
            kw = {"rtg": bool(rtg)}
            twin = _expected_grad(theta, est, placement, agg, "none", False, **kw)
            rows.append((agg_name, label, "on-policy", "none", _rel(twin, target), None))
            if placement == "loss" and est in ("k1", "k3"):  # rho = 1, gradient through it
                on_d = _expected_grad(theta, est, placement, agg, "differentiable", False, **kw)
                rows.append(
                    (agg_name, label, "on-policy", "differentiable", _rel(on_d, target), None)
                )
            for mode in off_modes:
                g = _expected_grad(theta, est, placement, agg, mode, True, **kw)
                ref_twin = on_d if mode == "differentiable" else twin
                # twin distance in units of ||grad KL||: k1-as-loss's twin is 0
                to_twin = _rel(g, ref_twin, target)
                rows.append((agg_name, label, "off-policy", mode, _rel(g, target), to_twin))
    return rows


@pytest.fixture(scope="module")
def table():
    rows = _table()
    fmt = lambda x: "" if x is None else ("≤ 1e-12" if x <= EXACT else f"{x:.3g}")  # noqa: E731
    print("\n| aggregation | KL term | sampling | is_mode | rel. error to ∇KL(π(y)‖π_ref(y)) "
          "| ‖g − g_twin‖ / ‖∇KL‖ (twin: same term on-policy) |")  # fmt: skip
    print("|---|---|---|---|---:|---:|")
    for agg, label, sampling, mode, to_kl, to_twin in rows:
        print(f"| {agg} | {label} | {sampling} | `{mode}` | {fmt(to_kl)} | {fmt(to_twin)} |")
    return {(r[0], r[1], r[2], r[3]): (r[4], r[5]) for r in rows}


def test_toy_has_variable_lengths_and_sums_to_one():
    lengths = MASK.sum(-1)
    assert len(RESPONSES) == 15 and set(lengths.tolist()) == {1, 2, 3}
    for name in ("pi", "ref", "mu"):
        total = _token_logps(LOGITS[name]).sum(-1).exp().sum().item()
        assert total == pytest.approx(1.0, abs=1e-14)


def test_k1_in_reward_with_reward_to_go_is_the_exact_sequence_kl_gradient(table):
    """Token-sum: on-policy, and off-policy with each penalty weighted by its own W_t'
    (cumulative) or by the full-sequence ratio: the expected gradient is grad KL(pi(y) ||
    pi_ref(y))."""
    exact = (("on-policy", "none"), ("off-policy", "cumulative"), ("off-policy", "sequence"))
    for sampling, mode in exact:
        assert table["token-sum", "k1 in reward, reward-to-go", sampling, mode][0] <= EXACT
    # PPO's per-token ratio on the reward-to-go, no weight, or length normalisation: not exact
    assert table["token-sum", "k1 in reward, reward-to-go", "off-policy", "detached"][0] > 1e-3
    assert table["token-sum", "k1 in reward, reward-to-go", "off-policy", "none"][0] > 1e-3
    assert table["token-mean", "k1 in reward, reward-to-go", "on-policy", "none"][0] > 1e-3


def test_per_token_losses_are_not_the_sequence_kl_gradient(table):
    for est in ("k1", "k2", "k3"):
        for agg in AGGREGATIONS:
            assert table[agg, f"{est} as loss", "on-policy", "none"][0] > 1e-2


def test_cumulative_is_exact_for_token_sum_and_sequence_for_every_aggregation(table):
    """Off-policy corrections reproduce the on-policy expected gradient of the same term:
    cumulative only with token-sum (1/|y| depends on later tokens), the full-sequence ratio
    for token-sum and the per-sequence token mean alike; the per-token ratio for neither."""
    for key, (_, to_twin) in table.items():
        agg, label, sampling, mode = key
        if sampling != "off-policy":
            continue
        if mode == "sequence" or (mode == "cumulative" and agg == "token-sum"):
            assert to_twin <= EXACT, key
        elif mode in ("cumulative", "detached", "none", "differentiable"):
            assert to_twin > 1e-4, key


def test_k2_loss_is_k1_own_token_penalty_and_k3_loss_is_per_token_forward_kl():
    """On-policy, token-sum: E[grad sum_t k2_t] = E[sum_t k1_t grad log pi_t] (each token's own
    penalty): the per-token reverse KL with the prefix distribution frozen; E[grad sum_t k3_t]
    is the per-token forward KL with prefixes from pi. Both checked against those formulas."""
    theta = LOGITS["pi"].clone().requires_grad_(True)
    agg = AGGREGATIONS["token-sum"]
    k2 = _expected_grad(theta, "k2", "loss", agg, "none", False)
    own = _expected_grad(theta, "k1", "reward", agg, "none", False, rtg=False)
    k3 = _expected_grad(theta, "k3", "loss", agg, "none", False)
    # state visitation d(s) under pi (detached): the product of pi over the prefix's tokens
    p = torch.softmax(theta, -1)
    d = torch.ones(len(PREFIXES), dtype=D)
    for i, prefix in enumerate(PREFIXES):
        for t, tok in enumerate(prefix):
            d[i] = d[i] * p[PREFIXES.index(prefix[:t]), tok].detach()
    logp, ref = torch.log_softmax(theta, -1), torch.log_softmax(LOGITS["ref"], -1)
    rev = (d[:, None] * logp.exp() * (logp - ref)).sum()
    fwd = (d[:, None] * ref.exp() * (ref - logp)).sum()
    (g_rev,) = torch.autograd.grad(rev, theta, retain_graph=True)
    (g_fwd,) = torch.autograd.grad(fwd, theta)
    assert _rel(k2, g_rev) <= EXACT and _rel(own, g_rev) <= EXACT and _rel(k3, g_fwd) <= EXACT


def test_reward_placement_value_is_an_unbiased_sequence_kl_estimate():
    """The loss form's value sums w_t * k1_t: its expectation under mu is KL(pi(y)||pi_ref(y))."""
    theta = LOGITS["pi"]
    lp, ref, mu = _token_logps(theta), _token_logps(LOGITS["ref"]), _token_logps(LOGITS["mu"])
    pi_y = lp.sum(-1).exp()
    exact = (pi_y * (lp.sum(-1) - ref.sum(-1))).sum()
    for mode in ("cumulative", "sequence"):
        L = kl_loss_per_token(
            lp, ref, estimator="k1", mask=MASK, old_logprobs=mu, is_mode=mode, placement="reward"
        )
        assert (mu.sum(-1).exp() * L.sum(-1)).sum().item() == pytest.approx(exact.item(), abs=1e-13)
