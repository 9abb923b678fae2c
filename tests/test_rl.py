"""gkl.rl: KL estimators, "in reward" vs "as loss", importance sampling, aggregation.

The gradient tests enumerate every action (bandit) or every sequence (toy autoregressive
policy) in float64, so E_a~w[f(a)] = sum_a w(a) f(a) is exact, and compare with autograd
gradients of the closed-form divergences. Sampling weights w are detached: the score-function
part of "in reward" is written explicitly as sum_a pi(a) * sg(coef(a)) * log pi(a).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gkl.rl import (
    ESTIMATORS,
    agg_loss,
    kl_estimate,
    kl_in_reward,
    kl_loss,
    kl_loss_per_token,
)

D = torch.float64
EXACT = {"atol": 1e-10, "rtol": 0.0}


# --------------------------------------------------------------------------- helpers


def _bandit(num_actions: int = 5, seed: int = 0):
    """Policy logits theta (leaf), reference log-probs and a behaviour policy mu, all float64."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(num_actions, generator=g, dtype=D).requires_grad_(True)
    ref_logp = F.log_softmax(1.5 * torch.randn(num_actions, generator=g, dtype=D), -1)
    mu_logp = F.log_softmax(torch.randn(num_actions, generator=g, dtype=D), -1)
    return theta, ref_logp, mu_logp


def _grad(value: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(value, theta, retain_graph=True)[0]


def _reverse_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_ref) = sum_a pi(a) (log pi(a) - log pi_ref(a))."""
    return (logp.exp() * (logp - ref_logp)).sum()


def _forward_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(pi_ref || pi) = sum_a pi_ref(a) (log pi_ref(a) - log pi(a))."""
    return (ref_logp.exp() * (ref_logp - logp)).sum()


def _expected_kl_loss_grad(theta, ref_logp, sample_logp=None, **kwargs) -> torch.Tensor:
    """grad_theta E_{a~w}[kl_loss on the one-token sample a], w = pi (on-policy) or mu.

    Calls kl_loss once per action (batch of one (1, 1) sample) and weights by w(a).
    """
    logp = F.log_softmax(theta, -1)
    weights = (logp if sample_logp is None else sample_logp).detach().exp()
    needs_old = kwargs.get("is_mode", "none") != "none"
    old = (logp.detach() if sample_logp is None else sample_logp) if needs_old else None
    total = 0.0
    for a in range(theta.numel()):
        loss_a = kl_loss(
            logp[a].view(1, 1),
            ref_logp[a].view(1, 1),
            old_logprobs=None if old is None else old[a].view(1, 1),
            **kwargs,
        )
        total = total + weights[a] * loss_a
    return _grad(total, theta)


def _expected_in_reward_grad(theta, ref_logp, estimator: str) -> torch.Tensor:
    """grad of sum_a pi(a) sg(k(a)) log pi(a): the score-function gradient of k in the reward."""
    logp = F.log_softmax(theta, -1)
    penalty = kl_in_reward(logp[:, None], ref_logp[:, None], estimator=estimator)[:, 0]
    assert not penalty.requires_grad
    return _grad((logp.detach().exp() * penalty * logp).sum(), theta)


class _ToyLM:
    """Tabular autoregressive policy over all V**T sequences of length T (enumerable)."""

    def __init__(self, contexts, vocab: int = 3, length: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.seqs, self.ctx, n_ctx = contexts(vocab, length)
        self.theta = torch.randn(n_ctx, vocab, generator=g, dtype=D).requires_grad_(True)
        self.ref_table = F.log_softmax(2.0 * torch.randn(n_ctx, vocab, generator=g, dtype=D), -1)

    def token_logp(self, table: torch.Tensor) -> torch.Tensor:
        """(num_seqs, T) log-probabilities log p(y_t | y_<t) of every sequence."""
        return table[self.ctx, self.seqs]

    def policy(self) -> torch.Tensor:
        return self.token_logp(F.log_softmax(self.theta, -1))

    def ref(self) -> torch.Tensor:
        return self.token_logp(self.ref_table)


# --------------------------------------------------------------------------- estimators


def test_estimator_values_match_formulas_and_verl_aliases():
    lp = torch.tensor([[-0.1, -2.0, -0.7, -3.0]], dtype=D)
    ref = torch.tensor([[-0.5, -0.3, -0.7, -1.0]], dtype=D)
    log_delta = ref - lp
    expected = {
        "k1": -log_delta,
        "k2": 0.5 * log_delta**2,
        "k3": log_delta.exp() - 1 - log_delta,
        "abs": log_delta.abs(),
        "low_var_kl": log_delta.exp() - 1 - log_delta,  # no clamp active here
        "kl": -log_delta,
        "mse": 0.5 * log_delta**2,
        "k3+": log_delta.exp() - 1 - log_delta,  # straight-through keeps the value
    }
    for name, value in expected.items():
        torch.testing.assert_close(kl_estimate(lp, ref, name), value, **EXACT)
    assert (kl_estimate(lp, ref, "k3") >= 0).all()


def test_low_var_kl_clamps_like_verl_while_k3_does_not():
    lp = torch.tensor([-30.0, -0.01, -5.0], dtype=D)
    ref = torch.tensor([-0.01, -30.0, -1.0], dtype=D)
    kl = (ref - lp).clamp(-20, 20)
    verl = (kl.exp() - kl - 1).clamp(-10, 10)
    torch.testing.assert_close(kl_estimate(lp, ref, "low_var_kl"), verl, **EXACT)
    assert kl_estimate(lp, ref, "low_var_kl")[0] == 10.0
    assert kl_estimate(lp, ref, "k3")[0] > 1e12  # exp(29.99) - 29.99 - 1, unclamped


def test_estimate_is_differentiable_and_low_precision_is_upcast():
    lp = torch.tensor([-0.2, -1.5], requires_grad=True)
    ref = torch.tensor([-0.9, -0.4])
    kl_estimate(lp, ref, "k2").sum().backward()
    torch.testing.assert_close(lp.grad, (lp - ref).detach())
    out = kl_estimate(lp.detach().bfloat16(), ref.bfloat16(), "k3")
    assert out.dtype == torch.float32


# --------------------------------------------------------------------------- bandit, on-policy


def test_on_policy_bandit_gradients_by_exact_enumeration():
    theta, ref_logp, _ = _bandit()
    logp = F.log_softmax(theta, -1)
    g_reverse = _grad(_reverse_kl(logp, ref_logp), theta)
    g_forward = _grad(_forward_kl(logp, ref_logp), theta)
    assert (g_reverse - g_forward).abs().max() > 0.1  # the two targets are distinguishable

    torch.testing.assert_close(_expected_in_reward_grad(theta, ref_logp, "k1"), g_reverse, **EXACT)
    torch.testing.assert_close(
        _expected_kl_loss_grad(theta, ref_logp, estimator="k2"), g_reverse, **EXACT
    )
    torch.testing.assert_close(
        _expected_kl_loss_grad(theta, ref_logp, estimator="k1"), torch.zeros_like(theta), **EXACT
    )
    torch.testing.assert_close(
        _expected_kl_loss_grad(theta, ref_logp, estimator="k3"), g_forward, **EXACT
    )
    # verl's default low_var_kl clamps k3 at 10: active here (pi_ref / pi = e^3.6 for one
    # action), which zeroes that action's gradient and biases the forward-KL gradient
    assert kl_estimate(logp[:, None], ref_logp[:, None], "low_var_kl").max() == 10.0
    g_low_var = _expected_kl_loss_grad(theta, ref_logp, estimator="low_var_kl")
    assert (g_low_var - g_forward).norm() > 0.1
    # k3 in the reward follows neither divergence: grad reverse - grad forward
    g_k3_reward = _expected_in_reward_grad(theta, ref_logp, "k3")
    torch.testing.assert_close(g_k3_reward, g_reverse - g_forward, **EXACT)
    # verl's "+" suffix: value of k, gradient of k2 (straight-through) -> reverse KL
    for est in ("k1+", "k3+", "low_var_kl+"):
        g = _expected_kl_loss_grad(theta, ref_logp, estimator=est)
        torch.testing.assert_close(g, g_reverse, **EXACT)
    # on-policy "differentiable" ratio (old = sg(logp)) turns k1 and k3 losses into reverse KL
    for est in ("k1", "k3"):
        g = _expected_kl_loss_grad(theta, ref_logp, estimator=est, is_mode="differentiable")
        torch.testing.assert_close(g, g_reverse, **EXACT)


@settings(max_examples=25, deadline=None)
@given(num_actions=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_on_policy_identities_hold_for_random_bandits(num_actions, seed):
    theta, ref_logp, _ = _bandit(num_actions, seed)
    logp = F.log_softmax(theta, -1)
    g_reverse = _grad(_reverse_kl(logp, ref_logp), theta)
    g_forward = _grad(_forward_kl(logp, ref_logp), theta)
    torch.testing.assert_close(_expected_in_reward_grad(theta, ref_logp, "k1"), g_reverse, **EXACT)
    torch.testing.assert_close(
        _expected_kl_loss_grad(theta, ref_logp, estimator="k2"), g_reverse, **EXACT
    )
    torch.testing.assert_close(
        _expected_kl_loss_grad(theta, ref_logp, estimator="k3"), g_forward, **EXACT
    )


# --------------------------------------------------------------------------- bandit, off-policy


def test_off_policy_importance_weighting_by_exact_enumeration():
    theta, ref_logp, mu_logp = _bandit(6, seed=3)
    logp = F.log_softmax(theta, -1)
    g_reverse = _grad(_reverse_kl(logp, ref_logp), theta)
    g_forward = _grad(_forward_kl(logp, ref_logp), theta)

    def off(est: str, mode: str, **kw) -> torch.Tensor:
        return _expected_kl_loss_grad(theta, ref_logp, mu_logp, estimator=est, is_mode=mode, **kw)

    torch.testing.assert_close(off("k2", "detached"), g_reverse, **EXACT)
    torch.testing.assert_close(off("k3", "detached"), g_forward, **EXACT)
    torch.testing.assert_close(off("k1", "differentiable"), g_reverse, **EXACT)
    torch.testing.assert_close(off("k3", "differentiable"), g_reverse, **EXACT)
    # dropping the ratio is biased for every estimator
    assert (off("k2", "none") - g_reverse).norm() > 1e-2
    assert (off("k3", "none") - g_forward).norm() > 1e-2
    # PPO clipping biases it as soon as some ratio leaves [1 - 0.2, 1 + 0.2]
    rho = (logp - mu_logp).exp()
    assert ((rho < 0.8) | (rho > 1.2)).any()
    assert (off("k3", "ppo_clip") - g_reverse).norm() > 1e-2
    assert (off("k1", "ppo_clip") - g_reverse).norm() > 1e-2


def test_low_var_kl_is_forward_kl_while_no_clamp_is_active():
    theta, ref_logp, _ = _bandit(5, seed=2)
    theta = (ref_logp + 0.3 * theta.detach()).requires_grad_(True)  # pi near pi_ref
    g_forward = _grad(_forward_kl(F.log_softmax(theta, -1), ref_logp), theta)
    g_low_var = _expected_kl_loss_grad(theta, ref_logp, estimator="low_var_kl")
    torch.testing.assert_close(g_low_var, g_forward, **EXACT)


def test_ppo_clip_is_exact_while_no_ratio_is_clipped():
    theta, ref_logp, _ = _bandit(5, seed=1)
    logp = F.log_softmax(theta, -1)
    g_reverse = _grad(_reverse_kl(logp, ref_logp), theta)
    nudge = 0.05 * torch.linspace(-1, 1, theta.numel(), dtype=D)
    mu_logp = F.log_softmax(theta.detach() + nudge, -1)  # rho within [0.8, 1.2]
    rho = (logp - mu_logp).exp()
    assert ((rho > 0.8) & (rho < 1.2)).all()
    for est in ("k1", "k3"):
        g = _expected_kl_loss_grad(theta, ref_logp, mu_logp, estimator=est, is_mode="ppo_clip")
        torch.testing.assert_close(g, g_reverse, **EXACT)


# --------------------------------------------------------------------------- sequences


def test_sequence_level_reward_to_go_is_exact_and_per_token_k2_is_not(sequence_contexts):
    lm = _ToyLM(sequence_contexts, vocab=3, length=3, seed=0)
    lp, ref = lm.policy(), lm.ref()  # (27, 3)
    weights = lp.sum(-1).detach().exp()  # pi(y) of every sequence, sums to 1
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=D), **EXACT)
    seq_lp = lp.sum(-1)
    g_seq = _grad((seq_lp.exp() * (seq_lp - ref.sum(-1))).sum(), lm.theta)

    rtg = kl_in_reward(lp, ref, estimator="k1", reward_to_go=True)
    g_rtg = _grad((weights[:, None] * rtg * lp).sum(), lm.theta)
    torch.testing.assert_close(g_rtg, g_seq, **EXACT)

    per_token = kl_in_reward(lp, ref, estimator="k1")
    g_myopic = _grad((weights[:, None] * per_token * lp).sum(), lm.theta)
    k2_sum = kl_loss_per_token(lp, ref, estimator="k2").sum(-1)
    g_k2 = _grad((weights * k2_sum).sum(), lm.theta)
    assert (g_k2 - g_seq).norm() > 0.1 * g_seq.norm()
    # per token, k2 as loss is k1 in the reward without the future tokens' KL
    torch.testing.assert_close(g_k2, g_myopic, **EXACT)


def test_reward_to_go_skips_padding():
    lp = torch.tensor([[-0.5, -1.0, -0.2, -9.0]], dtype=D)
    ref = torch.tensor([[-0.7, -0.4, -0.3, 5.0]], dtype=D)  # padding holds garbage (> 0)
    mask = torch.tensor([[1, 1, 1, 0]])
    k1 = (lp - ref)[:, :3]
    rtg = kl_in_reward(lp, ref, mask=mask, reward_to_go=True)
    expected = torch.cat([k1.flip(-1).cumsum(-1).flip(-1), torch.zeros(1, 1, dtype=D)], -1)
    torch.testing.assert_close(rtg, expected, **EXACT)
    torch.testing.assert_close(kl_in_reward(lp, ref, mask=mask)[:, :3], k1, **EXACT)


# --------------------------------------------------------------------------- aggregation, masks


def test_aggregation_modes_match_hand_computation():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert agg_loss(loss, mask, "token-mean").item() == pytest.approx((1 + 2 + 3 + 5) / 4)
    assert agg_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 5) / 2)
    assert agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 5) / 2)
    assert agg_loss(loss, None, "token-mean").item() == pytest.approx(4.5)


def test_kl_loss_ignores_padding_values_and_gradients():
    lp = torch.tensor([[-0.3, -1.2, 0.0], [-2.0, 0.0, 0.0]], dtype=D, requires_grad=True)
    ref = torch.tensor([[-0.6, -0.5, float("nan")], [-1.0, float("inf"), 3.0]], dtype=D)
    old = torch.tensor([[-0.4, -1.0, float("nan")], [-1.5, 7.0, 0.0]], dtype=D)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        for is_mode in ("none", "detached", "differentiable", "ppo_clip"):
            lp.grad = None
            loss = kl_loss(
                lp, ref, estimator="k3", mask=mask, old_logprobs=old,
                is_mode=is_mode, loss_agg_mode=mode,
            )  # fmt: skip
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
            assert (lp.grad[~mask] == 0).all()
    # token-mean of k2 equals the plain mean over the three real tokens
    d = torch.tensor([-0.3 + 0.6, -1.2 + 0.5, -2.0 + 1.0], dtype=D)
    expected = (0.5 * d**2).mean()
    assert kl_loss(lp, ref, mask=mask).item() == pytest.approx(expected.item(), abs=1e-12)


# --------------------------------------------------------------------------- bad input


def test_unknown_names_list_the_valid_ones():
    lp = torch.full((2, 3), -1.0)
    with pytest.raises(
        ValueError, match=r"estimator must be one of 'k1', 'k2', 'k3', 'abs'.*'mse'"
    ):
        kl_estimate(lp, lp, "k4")
    with pytest.raises(ValueError, match=r"is_mode must be one of 'none', 'detached'.*'ppo_clip'"):
        kl_loss(lp, lp, is_mode="clipped", old_logprobs=lp)
    with pytest.raises(ValueError, match=r"loss_agg_mode must be one of 'token-mean'"):
        kl_loss(lp, lp, loss_agg_mode="sum")
    with pytest.raises(ValueError, match=r"is_mode='detached' needs old_logprobs"):
        kl_loss(lp, lp, is_mode="detached")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            {"ref_logprobs": torch.full((2, 4), -1.0)},
            r"logprobs and ref_logprobs .* \(2, 3\) and \(2, 4\)",
        ),
        ({"mask": torch.ones(3, 2)}, r"logprobs and mask .* \(2, 3\) and \(3, 2\)"),
        ({"old_logprobs": torch.full((2,), -1.0)}, r"old_logprobs must be 2-D .* got shape \(2,\)"),
        (
            {"old_logprobs": torch.full((1, 3), -1.0)},
            r"logprobs and old_logprobs .* \(2, 3\) and \(1, 3\)",
        ),
        ({"logprobs": torch.full((2, 3), 0.5)}, r"logprobs has 6 entries > 0"),
        (
            {"ref_logprobs": torch.tensor([[-1.0, float("nan"), -1.0]] * 2)},
            r"ref_logprobs has 2 non-finite",
        ),
        (
            {"old_logprobs": torch.tensor([[-1.0, -1.0, float("-inf")]] * 2)},
            r"old_logprobs has 2 non-finite",
        ),
        ({"mask": torch.full((2, 3), 0.5)}, r"mask must be bool or contain only 0 and 1"),
        ({"logprobs": torch.zeros(2, 3, dtype=torch.long)}, r"logprobs must be a floating-point"),
        ({"clip_ratio_low": 1.5}, r"clip_ratio_low < 1"),
    ],
)
def test_bad_input_raises_clear_value_error(kwargs, pattern):
    args = {
        "logprobs": torch.full((2, 3), -1.0),
        "ref_logprobs": torch.full((2, 3), -0.5),
        "old_logprobs": torch.full((2, 3), -0.8),
        "is_mode": "ppo_clip",
    } | kwargs
    lp, ref = args.pop("logprobs"), args.pop("ref_logprobs")
    with pytest.raises(ValueError, match=pattern):
        kl_loss(lp, ref, **args)


def test_bad_input_in_estimate_and_reward():
    lp = torch.full((2, 3), -1.0)
    with pytest.raises(ValueError, match=r"logprobs and ref_logprobs .* \(2, 3\) and \(3,\)"):
        kl_estimate(lp, torch.full((3,), -1.0), "k1")
    with pytest.raises(ValueError, match=r"logprobs has 1 entries > 0 \(max 2"):
        kl_estimate(torch.tensor([-1.0, 2.0]), torch.tensor([-1.0, -1.0]), "k3")
    with pytest.raises(ValueError, match=r"must be 2-D \(batch, response_length\)"):
        kl_in_reward(lp[0], lp[0])
    with pytest.raises(ValueError, match=r"logprobs and mask .* \(2, 3\) and \(2, 2\)"):
        kl_in_reward(lp, lp, mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"loss_mat and loss_mask"):
        agg_loss(lp, torch.ones(1, 3), "token-mean")
    # the value checks look at real tokens only and can be switched off
    masked = torch.tensor([[-1.0, 3.0]])
    kl_in_reward(masked, masked, mask=torch.tensor([[1, 0]]))
    kl_estimate(masked, masked, "k1", check_values=False)


def test_every_estimator_is_accepted_everywhere():
    lp = torch.tensor([[-0.3, -1.1]], dtype=D)
    ref = torch.tensor([[-0.9, -0.2]], dtype=D)
    for est in ESTIMATORS:
        assert kl_estimate(lp, ref, est).shape == (1, 2)
        assert kl_in_reward(lp, ref, estimator=est).shape == (1, 2)
        assert kl_loss(lp, ref, estimator=est).dim() == 0


@pytest.mark.parametrize("steps", ["-5", "0"])
def test_policy_kl_demo_refuses_a_non_positive_step_count(steps, monkeypatch, capsys):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "policy_kl_demo.py"
    spec = importlib.util.spec_from_file_location("policy_kl_demo", path)
    demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "policy_kl_demo", demo)  # dataclasses look it up
    spec.loader.exec_module(demo)
    monkeypatch.setattr(sys, "argv", ["policy_kl_demo.py", "--steps", steps])
    with pytest.raises(SystemExit) as exc:
        demo.main()
    assert exc.value.code == 2
    assert f"--steps must be >= 1 (Adam steps per run), got {steps}" in capsys.readouterr().err
