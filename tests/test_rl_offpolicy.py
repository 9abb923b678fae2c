"""gkl.rl: off-policy sequences (cumulative IS), global aggregation normalisers, guards, verl.

Sequence gradients enumerate all V**T sequences of a tabular autoregressive policy in float64:
E_{y~w}[f(y)] = sum_y w(y) f(y) exactly. The on-policy reference is written from the formulas
here, independently of gkl.
"""

import pytest
import torch
import torch.nn.functional as F

from gkl.rl import LOSS_AGG_MODES, agg_loss, kl_estimate, kl_loss, kl_loss_per_token, kl_penalty

D = torch.float64
EXACT = {"atol": 1e-10, "rtol": 0.0}

pytestmark = pytest.mark.usefixtures("one_thread")


class _ToyLM:
    """Tabular autoregressive policy pi(y_t | y_<t) over all V**T sequences (enumerable)."""

    def __init__(self, contexts, vocab: int = 3, length: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.seqs, self.ctx, n_ctx = contexts(vocab, length)
        self.theta = torch.randn(n_ctx, vocab, generator=g, dtype=D).requires_grad_(True)
        self.ref_table = F.log_softmax(1.5 * torch.randn(n_ctx, vocab, generator=g, dtype=D), -1)
        self.mu_table = F.log_softmax(torch.randn(n_ctx, vocab, generator=g, dtype=D), -1)

    def token_logp(self, table: torch.Tensor) -> torch.Tensor:
        return table[self.ctx, self.seqs]

    def policy(self) -> torch.Tensor:
        return self.token_logp(F.log_softmax(self.theta, -1))


def _formula(lp: torch.Tensor, ref: torch.Tensor, est: str) -> torch.Tensor:
    log_delta = ref - lp
    if est == "k1":
        return -log_delta
    if est == "k2":
        return 0.5 * log_delta**2
    return log_delta.exp() - 1 - log_delta  # k3


def _grad(value: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(value, theta, retain_graph=True)[0]


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_cumulative_is_exact_on_sequences_and_detached_is_not(sequence_contexts, est):
    lm = _ToyLM(sequence_contexts, vocab=3, length=4, seed=1)
    lp = lm.policy()  # (81, 4)
    ref, mu = lm.token_logp(lm.ref_table), lm.token_logp(lm.mu_table)
    pi_w = lp.sum(-1).detach().exp()
    mu_w = mu.sum(-1).exp()
    assert torch.isclose(mu_w.sum(), torch.tensor(1.0, dtype=D))
    # on-policy expected gradient of sum_t k_t, written from the formula
    g_on = _grad((pi_w[:, None] * _formula(lp, ref, est)).sum(), lm.theta)
    assert g_on.norm() > 1e-3 or est == "k1"

    def off(mode: str, **kw) -> torch.Tensor:
        per_tok = kl_loss_per_token(lp, ref, estimator=est, old_logprobs=mu, is_mode=mode, **kw)
        return _grad((mu_w[:, None] * per_tok).sum(), lm.theta)

    torch.testing.assert_close(off("cumulative"), g_on, **EXACT)
    if est == "k1":
        # E[grad k1 | prefix] = 0 for every prefix, so both are 0; the values differ: only the
        # cumulative weight gives E_pi[sum_t k1_t] = KL(pi(y) || pi_ref(y)) from mu's samples
        torch.testing.assert_close(g_on, torch.zeros_like(g_on), **EXACT)
        seq_kl = (pi_w * (lp.sum(-1) - ref.sum(-1))).sum()

        def value(mode: str) -> torch.Tensor:
            per_tok = kl_loss_per_token(lp, ref, estimator="k1", old_logprobs=mu, is_mode=mode)
            return (mu_w[:, None] * per_tok).sum()

        torch.testing.assert_close(value("cumulative"), seq_kl, **EXACT)
        assert (value("detached") - seq_kl).abs() > 1e-2
    else:
        rel = (off("detached") - g_on).norm() / g_on.norm()
        assert rel > 0.05, rel
    # the same through the scalar API with a sequence-level aggregation: sum_b w_b * loss_b
    per_seq = torch.stack(
        [
            kl_loss(
                lp[i : i + 1], ref[i : i + 1], estimator=est, old_logprobs=mu[i : i + 1],
                is_mode="cumulative", loss_agg_mode="seq-mean-token-sum",
            )
            for i in range(len(lp))
        ]
    )  # fmt: skip
    torch.testing.assert_close(_grad((mu_w * per_seq).sum(), lm.theta), g_on, **EXACT)


def test_cumulative_weights_skip_padding_and_truncation_caps_them():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 5, generator=g, dtype=D) * 2
    ref = -torch.rand(3, 5, generator=g, dtype=D) * 2
    old = -torch.rand(3, 5, generator=g, dtype=D) * 2
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]])
    garbage = torch.where(mask.bool(), old, torch.full_like(old, 9.0))
    out = kl_loss_per_token(
        lp, ref, estimator="k3", mask=mask, old_logprobs=garbage, is_mode="cumulative"
    )
    m = mask.to(D)
    weights = torch.exp(((lp - old) * m).cumsum(-1))
    expected = weights * _formula(lp, ref, "k3") * m
    torch.testing.assert_close(out, expected, **EXACT)
    capped = kl_loss_per_token(
        lp, ref, estimator="k3", mask=mask, old_logprobs=old, is_mode="cumulative",
        is_truncation=1.5,
    )  # fmt: skip
    torch.testing.assert_close(capped, weights.clamp(max=1.5) * _formula(lp, ref, "k3") * m)
    assert weights.max() > 1.5  # the cap is active here
    # one token per sample (a bandit): cumulative and detached coincide
    one = dict(estimator="k2", old_logprobs=old[:, :1])
    torch.testing.assert_close(
        kl_loss_per_token(lp[:, :1], ref[:, :1], is_mode="cumulative", **one),
        kl_loss_per_token(lp[:, :1], ref[:, :1], is_mode="detached", **one),
        **EXACT,
    )


def test_truncated_cumulative_is_biased_on_sequences(sequence_contexts):
    lm = _ToyLM(sequence_contexts, vocab=3, length=4, seed=2)
    lp = lm.policy()
    ref, mu = lm.token_logp(lm.ref_table), lm.token_logp(lm.mu_table)
    pi_w, mu_w = lp.sum(-1).detach().exp(), mu.sum(-1).exp()
    g_on = _grad((pi_w[:, None] * _formula(lp, ref, "k2")).sum(), lm.theta)
    per_tok = kl_loss_per_token(lp, ref, old_logprobs=mu, is_mode="cumulative", is_truncation=2.0)
    g_trunc = _grad((mu_w[:, None] * per_tok).sum(), lm.theta)
    assert (g_trunc - g_on).norm() > 1e-2 * g_on.norm()


# --------------------------------------------------------------------------- aggregation


def _verl_agg(loss_mat, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None):
    """verl core_algos.agg_loss at b178a3c (v0.7.0-125), transcribed (masked_sum = sum(x * m))."""
    m = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        n = m.sum() if batch_num_tokens is None else batch_num_tokens
        return (loss_mat * m).sum() / n * dp_size
    seq_tok = m.sum(-1)
    if mode == "seq-mean-token-sum":
        seq_losses = (loss_mat * m).sum(-1)
    else:
        seq_losses = (loss_mat * m).sum(-1) / (seq_tok + 1e-8)
    seq_mask = (seq_tok > 0).to(loss_mat.dtype)
    s = seq_mask.sum() if global_batch_size is None else global_batch_size
    return (seq_losses * seq_mask).sum() / s * dp_size


def _batch():
    g = torch.Generator().manual_seed(3)
    loss = torch.randn(9, 6, generator=g, dtype=D)
    lengths = torch.tensor([6, 1, 0, 4, 3, 6, 2, 0, 5])  # two all-padding rows
    mask = torch.arange(6)[None, :] < lengths[:, None]
    return loss, mask


def test_agg_loss_matches_verl_formulas_and_hand_values():
    loss, mask = _batch()
    m = mask.to(D)
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        torch.testing.assert_close(agg_loss(loss, mask, mode), _verl_agg(loss, mask, mode))
        torch.testing.assert_close(
            agg_loss(loss, mask, mode, 4, 17, 12), _verl_agg(loss, mask, mode, 4, 17, 12)
        )
    total, T = (loss * m).sum(), loss.shape[1]
    torch.testing.assert_close(agg_loss(loss, mask, "seq-mean-token-sum-norm"), total / T)
    torch.testing.assert_close(agg_loss(loss, mask, "token-sum"), total)
    torch.testing.assert_close(agg_loss(loss, mask, "dr_grpo"), total / (9 * T))  # TRL: all rows
    torch.testing.assert_close(
        agg_loss(loss, mask, "dr_grpo", loss_scale_factor=10), total / (9 * 10)
    )
    # all-padding rows: excluded from the seq mean (verl) or counted (TRL grpo)
    seq_sum = (loss * m).sum(-1)
    torch.testing.assert_close(agg_loss(loss, mask, "seq-mean-token-sum"), seq_sum.sum() / 7)
    torch.testing.assert_close(
        agg_loss(loss, mask, "seq-mean-token-sum", empty_rows="include"), seq_sum.sum() / 9
    )
    trl_grpo = ((loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    torch.testing.assert_close(
        agg_loss(loss, mask, "seq-mean-token-mean", empty_rows="include"), trl_grpo
    )


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("empty_rows", ["exclude", "include"])
def test_micro_batches_with_global_normalisers_sum_to_the_full_batch(mode, empty_rows):
    loss, mask = _batch()
    full = agg_loss(loss, mask, mode, empty_rows=empty_rows)
    n_tokens = int(mask.sum())
    n_seqs = int((mask.sum(-1) > 0).sum()) if empty_rows == "exclude" else len(loss)
    if mode == "dr_grpo":
        n_seqs = len(loss)  # Dr. GRPO divides by every row, as TRL does
    glob = {"batch_num_tokens": n_tokens, "global_batch_size": n_seqs}
    # 2 data-parallel ranks x uneven micro-batches; DDP averages the ranks' gradients (1/D)
    ranks = [[(0, 2), (2, 3)], [(3, 7), (7, 9)]]
    summed = sum(
        agg_loss(loss[a:b], mask[a:b], mode, 2, **glob, empty_rows=empty_rows)
        for rank in ranks
        for a, b in rank
    ) / len(ranks)
    if mode == "seq-mean-token-sum-norm":
        summed = summed * len(ranks)  # verl (b178a3c) does not scale this mode by dp_size
    torch.testing.assert_close(summed, full, **EXACT)
    # gradient accumulation on one rank (dp_size=1) gives the same
    accum = sum(
        agg_loss(loss[a:b], mask[a:b], mode, 1, **glob, empty_rows=empty_rows)
        for rank in ranks
        for a, b in rank
    )
    torch.testing.assert_close(accum, full, **EXACT)
    # the per-micro-batch default normalisers do not give the full batch in the mean modes
    if mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "dr_grpo"):
        local = sum(agg_loss(loss[a:b], mask[a:b], mode) for rank in ranks for a, b in rank) / 4
        assert not torch.isclose(local, full)


def test_kl_loss_forwards_the_global_normalisers():
    g = torch.Generator().manual_seed(4)
    lp = -torch.rand(6, 4, generator=g, dtype=D)
    ref = -torch.rand(6, 4, generator=g, dtype=D)
    mask = torch.rand(6, 4, generator=g) > 0.3
    full = kl_loss(lp, ref, mask=mask, loss_agg_mode="token-mean")
    n = int(mask.sum())
    halves = kl_loss(lp[:3], ref[:3], mask=mask[:3], batch_num_tokens=n) + kl_loss(
        lp[3:], ref[3:], mask=mask[3:], batch_num_tokens=n
    )
    torch.testing.assert_close(halves, full, **EXACT)


# --------------------------------------------------------------------------- guards


@pytest.mark.parametrize("est", ["k1+", "k3+", "low_var_kl+"])
@pytest.mark.parametrize("mode", ["differentiable", "ppo_clip"])
def test_straight_through_with_a_differentiable_ratio_raises(est, mode):
    lp = torch.full((2, 3), -1.0)
    with pytest.raises(ValueError, match=r"straight-through.*twice the reverse-KL gradient"):
        kl_loss(lp, lp - 0.1, estimator=est, old_logprobs=lp, is_mode=mode)
    for ok_mode in ("detached", "cumulative"):
        kl_loss(lp, lp - 0.1, estimator=est, old_logprobs=lp, is_mode=ok_mode)


def test_logprobs_rounded_slightly_above_zero_are_accepted():
    lp = torch.tensor([[1e-7, -0.5]])  # float32 log_softmax of a near-certain token
    ref = torch.tensor([[-0.2, 3e-7]])
    k = kl_loss_per_token(lp, ref, estimator="k2", old_logprobs=lp, is_mode="cumulative")
    torch.testing.assert_close(k, 0.5 * (ref - lp) ** 2)
    with pytest.raises(ValueError, match=r"logprobs has 1 entries > 0 .*1e-05 is accepted"):
        kl_loss(torch.tensor([[1e-3, -0.5]]), ref)


def test_float32_k3_overflow_raises_unless_the_clamp_is_opted_in():
    lp = torch.tensor([[-100.0, -0.5]])  # log(pi_ref / pi) = 99.99: exp() overflows in float32
    ref = torch.tensor([[-0.01, -0.4]])
    with pytest.raises(ValueError, match=r"overflowed to Inf .* log_ratio_clamp=20"):
        kl_loss(lp, ref, estimator="k3")
    with pytest.raises(ValueError, match=r"overflowed"):
        kl_estimate(lp, ref, "k3")
    out = kl_loss_per_token(lp, ref, estimator="k3", log_ratio_clamp=20.0)
    d = (ref - lp).double().clamp(-20, 20)
    torch.testing.assert_close(out.double(), d.exp() - 1 - d, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"log_ratio_clamp must be None .* positive"):
        kl_loss(lp, ref, log_ratio_clamp=-1.0)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"is_mode": "ppo_clip", "is_truncation": 2.0}, r"is_truncation caps .* 'ppo_clip'"),
        ({"is_mode": "cumulative", "is_truncation": 0.0}, r"is_truncation must be .* positive"),
        ({"dp_size": 0}, r"dp_size must be a positive int"),
        ({"batch_num_tokens": 0}, r"batch_num_tokens must be None .* positive"),
        ({"global_batch_size": -3}, r"global_batch_size must be None .* positive"),
        ({"empty_rows": "drop"}, r"empty_rows must be one of 'exclude', 'include'"),
        ({"loss_agg_mode": "seq-sum"}, r"loss_agg_mode must be one of .*'dr_grpo'"),
    ],
)
def test_bad_new_arguments_raise_clear_errors(kwargs, pattern):
    lp = torch.full((2, 3), -1.0)
    with pytest.raises(ValueError, match=pattern):
        kl_loss(lp, lp - 0.2, old_logprobs=lp, **({"is_mode": "detached"} | kwargs))


# --------------------------------------------------------------------------- verl drop-in


def test_kl_penalty_has_verl_names_values_and_working_plus_suffix():
    lp = torch.tensor([[-0.1, -3.0, -0.7, -30.0]], dtype=D, requires_grad=True)
    ref = torch.tensor([[-0.5, -0.3, -0.7, -0.01]], dtype=D)
    d = (ref - lp).clamp(-20, 20)
    low_var = (d.exp() - d - 1).clamp(-10, 10)  # verl's k3 / low_var_kl
    expected = {
        "kl": lp - ref, "k1": lp - ref, "abs": (lp - ref).abs(),
        "mse": 0.5 * (lp - ref) ** 2, "k2": 0.5 * (lp - ref) ** 2,
        "low_var_kl": low_var, "k3": low_var,
    }  # fmt: skip
    for name, value in expected.items():
        torch.testing.assert_close(kl_penalty(lp, ref, name), value, **EXACT)
        plus = kl_penalty(lp, ref, kl_penalty=name + "+")
        torch.testing.assert_close(plus, value, **EXACT)
        (g,) = torch.autograd.grad(plus.sum(), lp)
        torch.testing.assert_close(g, (lp - ref).detach(), **EXACT)  # gradient of k2
    # NaN / positive log-probs are refused as everywhere in gkl.rl (issue 20), unless the
    # check is switched off (verl's behaviour: the value passes through)
    with pytest.raises(ValueError, match=r"ref_logprob has 1 non-finite entries"):
        kl_penalty(torch.tensor([[-5.0]]), torch.tensor([[float("nan")]]), "k1")
    with pytest.raises(ValueError, match=r"logprob has 1 entries > 0"):
        kl_penalty(torch.tensor([[5.0]]), torch.tensor([[-1.0]]), "k1")
    out = kl_penalty(
        torch.tensor([[5.0]]), torch.tensor([[float("nan")]]), "k1", check_values=False
    )
    assert torch.isnan(out).all()
    # unknown names: NotImplementedError like verl (and a ValueError)
    for bad in ("full", "k5", "kl++"):
        with pytest.raises(NotImplementedError, match=r"kl_penalty must be one of verl's names"):
            kl_penalty(lp, ref, bad)
        with pytest.raises(ValueError):
            kl_penalty(lp, ref, bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_penalty_keeps_low_precision_dtype_like_verl(dtype):
    """verl computes kl_penalty in the inputs' dtype; gkl returns the same dtype and bits."""
    g = torch.Generator().manual_seed(3)
    lp = (-torch.rand(3, 5, generator=g) * 4).to(dtype)
    ref = (-torch.rand(3, 5, generator=g) * 4).to(dtype)
    for name in ("kl", "abs", "mse", "low_var_kl", "k3", "k3+"):
        out = kl_penalty(lp, ref, name)
        assert out.dtype == dtype
        base = name.rstrip("+")
        d = ref - lp  # verl's formulas, in the low-precision dtype
        verl = {
            "kl": lp - ref, "abs": (lp - ref).abs(), "mse": 0.5 * (lp - ref).square(),
            "low_var_kl": (d.clamp(-20, 20).exp() - d.clamp(-20, 20) - 1).clamp(-10, 10),
        }  # fmt: skip
        verl["k3"] = verl["low_var_kl"]
        torch.testing.assert_close(out, verl[base], rtol=0, atol=0)


def test_bias_corrected_k3_has_the_per_sample_gradient_of_detached_k2():
    """grad(rho * k3) = rho * (log pi - log ref) * grad log pi = grad(sg(rho) * k2), per token,
    so TRL's use_bias_correction_kl is gkl's detached k2 and, like it, biased on sequences."""
    g = torch.Generator().manual_seed(5)
    lp = (-torch.rand(4, 6, generator=g, dtype=D) * 3).requires_grad_(True)
    ref = -torch.rand(4, 6, generator=g, dtype=D) * 3
    old = -torch.rand(4, 6, generator=g, dtype=D) * 3
    kw = {"old_logprobs": old, "mask": torch.rand(4, 6, generator=g) > 0.2}
    a = kl_loss_per_token(lp, ref, estimator="k3", is_mode="differentiable", **kw)
    b = kl_loss_per_token(lp, ref, estimator="k2", is_mode="detached", **kw)
    (ga,) = torch.autograd.grad(a.sum(), lp)
    (gb,) = torch.autograd.grad(b.sum(), lp)
    torch.testing.assert_close(ga, gb, **EXACT)
    assert not torch.allclose(a, b)  # the values differ
