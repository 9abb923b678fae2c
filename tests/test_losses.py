"""Golden-value and property tests for gkl.losses.

References are written here from the formulas (anchors.md section 1, the authors' B x C x C code,
mdistiller's DKD, the TRADES code), independently of the library's implementation.
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gkl.losses import (
    ClassPrior,
    CrossEntropyLoss,
    DKDLoss,
    DKLLoss,
    GKLLoss,
    KDLoss,
    TradesKLLoss,
    dkd_loss,
    dkl_loss,
    gkl_loss,
    kd_loss,
    kl_divergence,
    trades_kl,
)

# ----------------------------------------------------------------------------- references


def reference_gkl(s, t, alpha, beta, gamma, temperature, temperature2=1.0, class_prior=None):
    """The authors' v2 loss, materialising B x C x C pairwise differences."""
    num_classes = t.shape[1]
    delta_t = t.view(-1, num_classes, 1) - t.view(-1, 1, num_classes)
    delta_s = s.view(-1, num_classes, 1) - s.view(-1, 1, num_classes)
    with torch.no_grad():
        p = F.softmax(t / temperature2, dim=1) if class_prior is None else class_prior
        w = torch.pow(p, gamma)
        pair_w = w.view(-1, num_classes, 1) @ w.view(-1, 1, num_classes)
    wmse = 0.25 * ((delta_t - delta_s).pow(2) * pair_w).sum() / pair_w.sum()
    sce = -(F.softmax(t / temperature, dim=1).detach() * F.log_softmax(s / temperature, 1))
    return beta * wmse + alpha * sce.sum(1).mean()


def reference_kl(s, t, temperature=1.0):
    """Textbook mean_b sum_j p_j (log p_j - log q_j), p = softmax(t/T), q = softmax(s/T)."""
    p = torch.exp(t / temperature) / torch.exp(t / temperature).sum(1, keepdim=True)
    q = torch.exp(s / temperature) / torch.exp(s / temperature).sum(1, keepdim=True)
    return (p * (p.log() - q.log())).sum(1).mean()


def reference_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller's dkd_loss (mask-by-multiplication and -1000 offset), written out."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = ~gt_mask
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def cat_mask(x):
        t1 = (x * gt_mask).sum(dim=1, keepdims=True)
        t2 = (x * other_mask).sum(1, keepdims=True)
        return torch.cat([t1, t2], dim=1)

    pred_student, pred_teacher = cat_mask(pred_student), cat_mask(pred_teacher)
    log_pred_student = torch.log(pred_student)
    tckd = (
        F.kl_div(log_pred_student, pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    )
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
        * temperature**2
        / target.shape[0]
    )
    return alpha * tckd + beta * nckd


def logits_pair(batch, classes, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(batch, classes, generator=g, dtype=dtype)).requires_grad_()
    t = (scale * torch.randn(batch, classes, generator=g, dtype=dtype)).requires_grad_()
    return s, t


def random_prior_rows(batch, classes, seed=1):
    g = torch.Generator().manual_seed(seed)
    prior = torch.rand(classes, classes, generator=g, dtype=torch.float64)
    prior = prior / prior.sum(1, keepdim=True)
    target = torch.randint(0, classes, (batch,), generator=g)
    return prior[target]


def values_and_grads(fn, s, t):
    value = fn(s, t)
    grad_s, grad_t = torch.autograd.grad(value, [s, t])
    return value.detach(), grad_s, grad_t


# ----------------------------------------------------------------------------- GKL

GKL_CASES = [
    # (B, C, gamma, T, T2, prior)
    (4, 10, 1.0, 4.0, 1.0, False),
    (8, 100, 0.05, 4.0, 1.0, True),
    (3, 7, 0.3, 1.0, 2.0, False),
    (16, 10, 0.2, 4.0, 4.0, True),
    (5, 1000, 0.6, 1.0, 1.0, False),
    (2, 3, 0.0, 2.5, 1.0, False),
]


@pytest.mark.parametrize(("batch", "classes", "gamma", "temp", "temp2", "prior"), GKL_CASES)
def test_gkl_matches_bcc_definition_values_and_both_gradients(
    batch, classes, gamma, temp, temp2, prior
):
    s, t = logits_pair(batch, classes, seed=batch + classes)
    rows = random_prior_rows(batch, classes) if prior else None
    kwargs = dict(alpha=1.5, beta=8.0, gamma=gamma, temperature=temp, temperature2=temp2)
    ours = values_and_grads(lambda a, b: gkl_loss(a, b, class_prior=rows, **kwargs), s, t)
    ref = values_and_grads(lambda a, b: reference_gkl(a, b, class_prior=rows, **kwargs), s, t)
    for got, want in zip(ours, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # Mixed precisions meet in the wider one (a float32 student, a float64 teacher).
    mixed = gkl_loss(s.float(), t, class_prior=rows, **kwargs)
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(mixed.detach(), ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("batch", "classes", "gamma", "temp", "temp2", "prior"), GKL_CASES)
def test_gkl_frozen_teacher_path_matches_bcc_definition(batch, classes, gamma, temp, temp2, prior):
    s, t = logits_pair(batch, classes, seed=batch + classes)
    t_frozen = t.detach()
    rows = random_prior_rows(batch, classes) if prior else None
    kwargs = dict(alpha=1.5, beta=8.0, gamma=gamma, temperature=temp, temperature2=temp2)
    ours = gkl_loss(s, t_frozen, class_prior=rows, **kwargs)
    grad_s_buffer, grad_t_buffer = ours.grad_fn.saved_tensors
    assert grad_t_buffer is None and grad_s_buffer.shape == s.shape  # no teacher-side buffer
    ref = reference_gkl(s, t_frozen, class_prior=rows, **kwargs)
    (grad, ref_grad) = (torch.autograd.grad(v, [s])[0] for v in (3.0 * ours, 3.0 * ref))
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-10)
    with torch.no_grad():  # no graph: the general path, same value
        torch.testing.assert_close(
            gkl_loss(s, t_frozen, class_prior=rows, **kwargs), ref.detach(), rtol=0, atol=1e-10
        )


def test_gkl_golden_value_two_classes():
    # w = softmax([ln 3, 0]) = [3/4, 1/4], d = t - s = [ln 3, 0]:
    # wMSE = 1/4 * 2 * (3/4)(1/4)(ln 3)^2 / (3/4 + 1/4)^2 ; soft CE vs uniform student = ln 2.
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    want_wmse = 0.5 * 0.75 * 0.25 * math.log(3.0) ** 2
    got = gkl_loss(s, t, alpha=2.0, beta=3.0, gamma=1.0, temperature=1.0)
    assert got.item() == pytest.approx(3.0 * want_wmse + 2.0 * math.log(2.0), abs=1e-14)


def test_gkl_gradcheck():
    s, t = logits_pair(3, 5, scale=1.0)
    rows = random_prior_rows(3, 5)
    t_fixed = t.detach()
    # Student side, sample-wise and class-wise weights (weights and soft labels are constants).
    for prior in (None, rows):
        assert torch.autograd.gradcheck(
            lambda a, prior=prior: gkl_loss(
                a, t_fixed, alpha=1.0, beta=4.0, gamma=0.5, temperature=2.0, class_prior=prior
            ),
            (s,),
        )
    # Both sides of the wMSE term: with a class prior nothing about t is detached there.
    assert torch.autograd.gradcheck(
        lambda a, b: gkl_loss(
            a, b, alpha=0.0, beta=4.0, gamma=0.5, temperature=2.0, class_prior=rows
        ),
        (s, t),
    )


@pytest.mark.parametrize("prior", [False, True])
def test_gkl_shift_invariance(prior):
    s, t = logits_pair(6, 20)
    rows = random_prior_rows(6, 20) if prior else None
    shift_s = 100.0 * torch.randn(6, 1, dtype=torch.float64)
    shift_t = -50.0 * torch.randn(6, 1, dtype=torch.float64)
    kwargs = dict(alpha=1.0, beta=16.0, gamma=0.05, temperature=4.0, class_prior=rows)
    base = gkl_loss(s, t, **kwargs)
    shifted = gkl_loss(s + shift_s, t + shift_t, **kwargs)
    torch.testing.assert_close(shifted, base, rtol=0, atol=1e-10)


def test_gkl_closed_form_is_stable_for_large_common_offsets():
    # A naive W*Q - A^2 evaluation loses every digit here; the centred form must not.
    s, t = logits_pair(4, 50, dtype=torch.float32)
    kwargs = dict(alpha=1.0, beta=1.0, gamma=1.0, temperature=1.0)
    base = gkl_loss(s, t, **kwargs)
    for teacher in (t + 1e4, (t + 1e4).detach()):  # both inputs with gradients; frozen teacher
        torch.testing.assert_close(gkl_loss(s, teacher, **kwargs), base, rtol=1e-4, atol=1e-4)


def test_gkl_gradients_flow_into_both_branches():
    s, t = logits_pair(4, 10)
    loss = gkl_loss(s, t, alpha=0.0, beta=1.0, gamma=1.0, temperature=1.0)
    grad_s, grad_t = torch.autograd.grad(loss, [s, t])
    # wMSE depends on d = t - s only, so its gradients are opposite.
    torch.testing.assert_close(grad_s, -grad_t, rtol=0, atol=1e-12)
    assert grad_t.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_reduce_in_float32_for_low_precision_logits(dtype):
    s32, t32 = logits_pair(32, 100, dtype=torch.float32)
    s_low, t_low = s32.detach().to(dtype), t32.detach().to(dtype)
    exact = gkl_loss(s_low.float(), t_low.float(), alpha=1, beta=8, gamma=1, temperature=4)
    got = gkl_loss(s_low, t_low, alpha=1, beta=8, gamma=1, temperature=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=1e-6)
    assert kd_loss(s_low, t_low).dtype == torch.float32
    assert dkd_loss(s_low, t_low, torch.zeros(32, dtype=torch.long)).dtype == torch.float32


# ----------------------------------------------------------------------------- DKL theorem


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkl_theorem_gradients_equal_kl_gradients(temperature):
    s, t = logits_pair(8, 12)
    _, kl_grad_s, kl_grad_t = values_and_grads(
        lambda a, b: kl_divergence(a, b, temperature=temperature), s, t
    )
    _, dkl_grad_s, dkl_grad_t = values_and_grads(
        lambda a, b: dkl_loss(a, b, temperature=temperature), s, t
    )
    torch.testing.assert_close(dkl_grad_s, kl_grad_s, rtol=0, atol=1e-12)
    torch.testing.assert_close(dkl_grad_t, kl_grad_t, rtol=0, atol=1e-12)


def test_dkl_wmse_term_is_inert_for_a_frozen_teacher_while_gkl_is_not():
    s, t = logits_pair(8, 12)
    t_frozen = t.detach()
    (dkl_grad,) = torch.autograd.grad(dkl_loss(s, t_frozen, alpha=0.0, beta=1.0), [s])
    assert dkl_grad.abs().max() == 0  # the asymmetric property
    gkl = gkl_loss(s, t_frozen, alpha=0.0, beta=1.0, gamma=1.0, temperature=1.0)
    (gkl_grad,) = torch.autograd.grad(gkl, [s])
    assert gkl_grad.abs().max() > 1e-3


# ----------------------------------------------------------------------------- KD, DKD, TRADES


def test_kd_golden_value_two_classes():
    # p = [3/4, 1/4], q = [1/2, 1/2]: KL = 3/4 ln(3/2) + 1/4 ln(1/2).
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    want = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(s, t, temperature=1.0).item() == pytest.approx(want, abs=1e-15)
    assert kd_loss(2 * s, 2 * t, temperature=2.0).item() == pytest.approx(4 * want, abs=1e-14)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_equals_textbook_definition(temperature):
    s, t = logits_pair(16, 100, seed=3)
    ours = values_and_grads(lambda a, b: kd_loss(a, b, temperature=temperature), s, t)
    ref = values_and_grads(lambda a, b: temperature**2 * reference_kl(a, b, temperature), s, t)
    for got, want in zip(ours, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("alpha", "beta", "temperature"), [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_equals_mdistiller_definition(alpha, beta, temperature):
    s, t = logits_pair(16, 100, seed=5)
    target = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(7))
    kwargs = dict(alpha=alpha, beta=beta, temperature=temperature)
    ours = values_and_grads(lambda a, b: dkd_loss(a, b, target, **kwargs), s, t)
    ref_value = reference_dkd(s, t.detach(), target, **kwargs)
    (ref_grad_s,) = torch.autograd.grad(ref_value, [s])
    torch.testing.assert_close(ours[0], ref_value.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(ours[1], ref_grad_s, rtol=0, atol=1e-10)
    # mdistiller's masking leaves exact zeros in the teacher's targets, so it has no finite
    # teacher gradient; ours is finite (the teacher is frozen in KD either way).
    assert torch.isfinite(ours[2]).all()


def test_dkd_gradcheck():
    s, t = logits_pair(3, 6, scale=1.0)
    target = torch.tensor([0, 5, 2])
    assert torch.autograd.gradcheck(lambda a, b: dkd_loss(a, b, target), (s, t))


def test_trades_kl_equals_trades_code():
    adv, nat = logits_pair(10, 10, seed=11)
    criterion = torch.nn.KLDivLoss(reduction="sum")

    def trades_reference(a, n):
        return criterion(F.log_softmax(a, dim=1), F.softmax(n, dim=1)) / a.shape[0]

    for got, want in zip(
        values_and_grads(trades_kl, adv, nat),
        values_and_grads(trades_reference, adv, nat),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- modules


def test_loss_modules_share_one_calling_convention():
    s, t = logits_pair(4, 10)
    target = torch.tensor([1, 2, 3, 4])
    prior_rows = random_prior_rows(4, 10)
    for module in (CrossEntropyLoss, KDLoss, DKDLoss, DKLLoss, GKLLoss, TradesKLLoss):
        loss = module()(s, t, target)
        assert loss.ndim == 0 and torch.isfinite(loss)
        if module is not GKLLoss:  # GKLLoss(use_class_prior=False) refuses rows it would ignore
            assert torch.isfinite(module()(s, t, target, class_prior=prior_rows))
    with pytest.raises(ValueError, match=r"use_class_prior=False\) was given class_prior"):
        GKLLoss()(s, t, target, class_prior=prior_rows)
    torch.testing.assert_close(CrossEntropyLoss()(s, t, target), F.cross_entropy(s, target))
    gi = GKLLoss(beta=2.0, use_class_prior=True)
    torch.testing.assert_close(
        gi(s, t, target, class_prior=prior_rows),
        reference_gkl(s, t, 1.0, 2.0, 1.0, 4.0, class_prior=prior_rows),
    )
    with pytest.raises(ValueError, match="needs class_prior"):
        gi(s, t, target)


def test_every_loss_config_instantiates_a_loss_module_by_target():
    from hydra.utils import instantiate

    from gkl.config import CONFIG_DIR, compose_config

    names = sorted(path.stem for path in Path(CONFIG_DIR, "loss").glob("*.yaml"))
    assert {"ce", "kd", "dkd", "dkl", "gkl"} <= set(names)
    for name in names:
        cfg = compose_config("train.yaml", [f"loss={name}"]).loss
        assert cfg._target_.startswith(("gkl.losses.", "gkl.distillers.")), name
        assert isinstance(instantiate(cfg), torch.nn.Module), name


# ----------------------------------------------------------------------------- ClassPrior


def test_class_prior_two_epochs_and_state_dict_round_trip():
    num_classes, temperature = 4, 2.0
    prior = ClassPrior(num_classes, temperature=temperature)
    target = torch.tensor([0, 0, 1, 3])
    torch.testing.assert_close(prior.rows(target), torch.full((4, 4), 0.25))

    g = torch.Generator().manual_seed(0)
    epoch1 = [torch.randn(4, num_classes, generator=g) for _ in range(2)]
    for logits in epoch1:
        prior.update(logits, target)
    # Within an epoch the prior in use does not change.
    torch.testing.assert_close(prior.rows(target), torch.full((4, 4), 0.25))
    prior.end_epoch()

    probs = torch.cat([F.softmax(x.double() / temperature, 1) for x in epoch1])
    labels = torch.cat([target, target])
    for c in (0, 1, 3):
        row = probs[labels == c].sum(0)
        torch.testing.assert_close(prior.prior[c], row / row.sum())
    # Class 2 had no samples: its row stays uniform.
    torch.testing.assert_close(prior.prior[2], torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(prior.prior.sum(1), torch.ones(4, dtype=torch.float64))

    # Mid-epoch-2 state survives a state_dict round-trip, and both copies continue identically.
    epoch2 = torch.randn(4, num_classes, generator=g)
    target2 = torch.tensor([2, 2, 1, 0])
    prior.update(epoch2, target2)
    restored = ClassPrior(num_classes, temperature=temperature)
    restored.load_state_dict(prior.state_dict())
    assert restored.epochs_completed.item() == 1
    for p in (prior, restored):
        p.update(epoch2.flip(0), target2)
        p.end_epoch()
    torch.testing.assert_close(restored.prior, prior.prior, rtol=0, atol=0)
    row2 = F.softmax(epoch2.double() / temperature, 1)[:2].sum(0)
    row2 = row2 + F.softmax(epoch2.flip(0).double() / temperature, 1)[:2].sum(0)
    torch.testing.assert_close(prior.prior[2], row2 / row2.sum())


DDP_SCRIPT = """
import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gkl.losses import ClassPrior


def worker(rank, world_size, workdir):
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world_size
    )
    logits, target = torch.load(f"{workdir}/data.pt", weights_only=True)
    prior = ClassPrior(logits.shape[1])
    shard = slice(rank, None, world_size)
    prior.update(logits[shard], target[shard])
    prior.end_epoch()
    if rank == 0:
        torch.save(prior.prior, f"{workdir}/prior.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2, sys.argv[1]), nprocs=2, join=True)
"""


def test_class_prior_all_reduces_under_ddp(tmp_path):
    logits = torch.randn(12, 5)
    target = torch.arange(12) % 5
    single = ClassPrior(5)
    single.update(logits, target)
    single.end_epoch()
    torch.save((logits, target), tmp_path / "data.pt")
    script = tmp_path / "ddp_prior.py"
    script.write_text(DDP_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=120)
    torch.testing.assert_close(torch.load(tmp_path / "prior.pt", weights_only=True), single.prior)


# ----------------------------------------------------------------------------- bad input

BAD_INPUTS = [
    (
        lambda s, t: gkl_loss(s, t[:, :5], **{"alpha": 1, "beta": 1, "gamma": 1, "temperature": 1}),
        r"same shape.*\(4, 10\) and \(4, 5\)",
    ),
    (
        lambda s, t: gkl_loss(s[0], t[0], alpha=1, beta=1, gamma=1, temperature=1),
        r"student_logits must be 2-D.*\(10,\)",
    ),
    (
        lambda s, t: gkl_loss(s.long(), t, alpha=1, beta=1, gamma=1, temperature=1),
        r"student_logits must be a floating-point.*int64",
    ),
    (lambda s, t: kd_loss(s, t.int()), r"teacher_logits must be a floating-point"),
    (
        lambda s, t: gkl_loss(s, t, alpha=1, beta=1, gamma=1, temperature=0.0),
        r"temperature must be > 0, got 0.0",
    ),
    (
        lambda s, t: gkl_loss(s, t, alpha=1, beta=1, gamma=1, temperature=1, temperature2=-1),
        r"temperature2 must be > 0",
    ),
    (
        lambda s, t: gkl_loss(s, t, alpha=1, beta=1, gamma=-0.5, temperature=1),
        r"gamma must be >= 0, got -0.5",
    ),
    (
        lambda s, t: gkl_loss(
            s, t, alpha=1, beta=1, gamma=1, temperature=1, class_prior=torch.ones(4, 9)
        ),
        r"class_prior must have the logits' shape \(4, 10\).*\(4, 9\)",
    ),
    (
        lambda s, t: gkl_loss(
            s, t, alpha=1, beta=1, gamma=1, temperature=1, class_prior=-torch.ones(4, 10)
        ),
        r"class_prior has 40 negative entries",
    ),
    (lambda s, t: kd_loss(s, t, temperature=-1.0), r"temperature must be > 0"),
    (
        lambda s, t: dkd_loss(s, t, torch.zeros(3, dtype=torch.long)),
        r"target must have shape \(4,\)",
    ),
    (lambda s, t: dkd_loss(s, t, torch.zeros(4)), r"target must be an integer tensor"),
    (lambda s, t: trades_kl(s, t[:2]), r"adversarial_logits and natural_logits must have"),
    (lambda s, t: dkl_loss(s, t[:, :3]), r"same shape"),
    (
        lambda s, t: gkl_loss(s, t, alpha=-1, beta=1, gamma=1, temperature=1),
        r"alpha must be >= 0, got -1.*alpha=0 to switch the term off",
    ),
    (
        lambda s, t: gkl_loss(s, t, alpha=1, beta=-8, gamma=1, temperature=1),
        r"beta must be >= 0, got -8",
    ),
    (lambda s, t: dkl_loss(s, t, alpha=-0.5), r"alpha must be >= 0"),
    (lambda s, t: dkl_loss(s, t, beta=-1.0), r"beta must be >= 0"),
    (lambda s, t: dkd_loss(s, t, torch.zeros(4, dtype=torch.long), beta=-1.0), r"beta must be"),
    (
        lambda s, t: gkl_loss(s[:0], t[:0], alpha=1, beta=1, gamma=1, temperature=1),
        r"student_logits is empty \(shape \(0, 10\)\).*skip empty batches",
    ),
    (lambda s, t: kd_loss(s[:0], t[:0]), r"student_logits is empty"),
    (lambda s, t: kl_divergence(s[:, :0], t[:, :0]), r"empty \(shape \(4, 0\)\)"),
    (lambda s, t: trades_kl(s[:0], t[:0]), r"adversarial_logits is empty"),
    (lambda s, t: dkl_loss(s[:0], t[:0]), r"student_logits is empty"),
    (
        lambda s, t: dkd_loss(s[:0], t[:0], torch.zeros(0, dtype=torch.long)),
        r"student_logits is empty",
    ),
    (
        lambda s, t: gkl_loss(
            s, t, alpha=1, beta=1, gamma=1, temperature=1, class_prior=torch.zeros(4, 10)
        ),
        r"class_prior rows \[0, 1, 2, 3\] \(of 4\) are all zero.*row-normalise",
    ),
    (
        lambda s, t: gkl_loss(
            s,
            t,
            alpha=1,
            beta=1,
            gamma=0.5,
            temperature=1,
            class_prior=torch.eye(4, 10).index_fill(0, torch.tensor([2]), 0.0),
        ),
        r"class_prior rows \[2\] \(of 4\) are all zero",
    ),
    (
        lambda s, t: dkd_loss(s, t, torch.tensor([0, 1, 10, 2])),
        r"target holds labels in \[0, 10\].*10 classes.*\[0, 9\]",
    ),
    (
        lambda s, t: dkd_loss(s, t, torch.tensor([0, -1, 3, 2])),
        r"target holds labels in \[-1, 3\]",
    ),
    (
        lambda s, t: ClassPrior(10).update(s, torch.tensor([0, 1, 10, 2])),
        r"target holds labels in \[0, 10\].*\[0, 9\]",
    ),
    (
        lambda s, t: ClassPrior(10).update(s, torch.tensor([-3, 1, 2, 2], dtype=torch.int32)),
        r"target holds labels in \[-3, 2\]",
    ),
]


@pytest.mark.parametrize(("call", "message"), BAD_INPUTS)
def test_bad_input_raises_clear_value_error(call, message):
    s, t = logits_pair(4, 10)
    with pytest.raises(ValueError, match=message):
        call(s.detach(), t.detach())


def test_non_finite_logits_raise_with_count_unless_opted_out():
    s, t = logits_pair(4, 10)
    s = s.detach().clone()
    s[0, 0], s[1, 3], s[2, 2] = float("nan"), float("inf"), -float("inf")
    with pytest.raises(ValueError, match=r"student_logits has 3 non-finite entries.*check_finite"):
        gkl_loss(s, t, alpha=1, beta=1, gamma=1, temperature=1)
    with pytest.raises(ValueError, match=r"3 non-finite"):
        kd_loss(s, t)
    out = gkl_loss(s, t, alpha=1, beta=1, gamma=1, temperature=1, check_finite=False)
    assert not torch.isfinite(out)


def test_data_dependent_checks_are_skipped_with_check_finite_false():
    # No device synchronisation on the fast path: the label range and prior rows go unchecked.
    s, t = logits_pair(4, 10)
    s, t = s.detach(), t.detach()
    out = gkl_loss(
        s,
        t,
        alpha=1,
        beta=1,
        gamma=1,
        temperature=1,
        class_prior=torch.zeros(4, 10),
        check_finite=False,
    )
    assert not torch.isfinite(out)  # 0 / 0: what the check above turns into a clear error
    prior = ClassPrior(10)
    prior.update(s, torch.tensor([0, 1, 1, 2]), check_labels=False)
    prior.end_epoch()
    assert prior.epochs_completed.item() == 1


def test_class_prior_update_with_an_empty_batch_is_a_no_op():
    prior = ClassPrior(3)
    prior.update(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert prior.sums.abs().sum() == 0


def test_class_prior_rejects_mismatched_logits():
    prior = ClassPrior(5)
    with pytest.raises(ValueError, match="logits have 4 classes but the ClassPrior has 5"):
        prior.update(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        ClassPrior(0)
