"""gkl.attacks on a small MLP trained for a few seconds on sklearn's 8x8 digits."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gkl.attacks import parse_eps, pgd, trades_perturb

pytestmark = pytest.mark.usefixtures("one_thread")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def test_fixture_model_is_accurate(digits):
    model, x, y = digits
    assert accuracy(model, x, y) > 0.9


# ---------------------------------------------------------------- eps parsing


@pytest.mark.parametrize(
    ("value", "norm", "expected"),
    [
        ("8/255", "Linf", 8 / 255),
        (" 4 / 255 ", "Linf", 4 / 255),
        (8 / 255, "Linf", 8 / 255),
        (0, "Linf", 0.0),
        ("0.2", "Linf", 0.2),
        (1.0, "Linf", 1.0),
        (0.5, "L2", 0.5),
        ("3.0", "L2", 3.0),
    ],
)
def test_parse_eps_accepts_numbers_and_fractions(value, norm, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_eps(value, norm=norm) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (8, "write 8/255"),
        ("8", "write 8/255"),
        (1, "write 1/255"),
        (8.0, "did you mean 8/255?"),
        ("16/8", "eps is in [0,1] pixel units"),
        (-0.1, ">= 0"),
        ("abc", "cannot parse"),
        ("1/0", "cannot parse"),
        (float("nan"), "finite"),
    ],
)
def test_parse_eps_errors(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_eps(value)


def test_parse_eps_rejects_non_numbers():
    with pytest.raises(TypeError):
        parse_eps(True)
    with pytest.raises(TypeError):
        parse_eps([8, 255])


def test_parse_eps_warns_near_but_not_at_k_over_255():
    expected = "eps=0.031 differs from 8/255=0.031373; write eps: 8/255 if that is what you meant"
    with pytest.warns(UserWarning, match=re.escape(expected)):
        assert parse_eps(0.031) == 0.031
    # k/255 rounded or truncated to 3-4 decimals: 0.0314 / 0.0313 (8), 0.016 / 0.0157 (4).
    for value, k in [(0.0314, 8), (0.0313, 8), (0.016, 4), (0.0157, 4), (0.0627, 16)]:
        with pytest.warns(UserWarning, match=f"differs from {k}/255"):
            parse_eps(value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_eps(0.03)  # 1.4e-3 from 8/255: deliberate, no warning
        for value in (0.05, 0.02, 0.1, 0.15, 0.3, 0.0312):  # round values, or no k/255 nearby
            parse_eps(value)
        parse_eps(torch.tensor(8 / 255).item())  # float32 round-off of 8/255 is 8/255
        parse_eps(0.25, norm="L2")  # L2 budgets are not in k/255 units


# ---------------------------------------------------------------- PGD


@pytest.mark.parametrize(
    ("norm", "eps", "loss"),
    [("Linf", 8 / 255, "ce"), ("Linf", 8 / 255, "kl"), ("L2", 0.5, "ce"), ("L2", 0.5, "kl")],
)
def test_pgd_stays_in_eps_ball_and_unit_cube(digits, norm, eps, loss):
    model, x, y = digits
    x_adv = pgd(model, x, y, eps=eps, step_size=eps / 4, steps=10, norm=norm, loss=loss, restarts=2)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "Linf" else delta.norm(dim=1)
    assert size.max().item() <= eps * (1 + 1e-5)
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert not x_adv.requires_grad
    assert accuracy(model, x_adv, y) < accuracy(model, x, y)


class _ModeProbe(nn.Module):
    """Wraps a model, records the ``training`` flag seen by each forward pass."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.training)
        return self.inner(x)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("attack", ["pgd", "trades"])
def test_attacks_run_in_eval_mode_restore_modes_and_leave_grads(digits, training, attack):
    model, x, y = digits
    probe = _ModeProbe(model).train(training)
    probe.inner[1].train(not training)  # mixed modes must come back exactly
    modes = [m.training for m in probe.modules()]
    sentinel = [torch.full_like(p, 7.0) for p in probe.parameters()]
    for p, g in zip(probe.parameters(), sentinel, strict=True):
        p.grad = g.clone()
    try:
        if attack == "pgd":
            pgd(probe, x[:32], y[:32], eps=8 / 255, step_size=2 / 255, steps=3)
        else:
            trades_perturb(probe, x[:32], eps=8 / 255, step_size=2 / 255, steps=3)
        assert probe.seen and not any(probe.seen)
        assert [m.training for m in probe.modules()] == modes
        for p, g in zip(probe.parameters(), sentinel, strict=True):
            assert torch.equal(p.grad, g)
    finally:
        for p in probe.parameters():
            p.grad = None
        model.eval()


def test_pgd_restores_mode_when_forward_raises():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Flatten(), Boom()).train()
    with pytest.raises(RuntimeError, match="boom"):
        pgd(
            model,
            torch.rand(2, 1, 8, 8),
            torch.zeros(2, dtype=torch.long),
            eps=0.1,
            step_size=0.1,
            steps=1,
        )
    assert all(m.training for m in model.modules())


def test_pgd_accuracy_decreases_monotonically_with_eps(digits):
    model, x, y = digits
    accs = []
    for k in [0, 1, 2, 4, 8, 16, 32]:
        generator = torch.Generator().manual_seed(0)
        x_adv = pgd(model, x, y, eps=k / 255, step_size=k / 255 / 4, steps=10, generator=generator)
        accs.append(accuracy(model, x_adv, y))
    assert accs[0] == pytest.approx(accuracy(model, x, y))
    assert all(a >= b for a, b in zip(accs, accs[1:], strict=False)), accs
    assert accs[-1] < accs[0] - 0.3, accs


@pytest.mark.parametrize(("norm", "eps"), [("Linf", 8 / 255), ("Linf", 16 / 255), ("L2", 0.5)])
def test_pgd_agrees_with_torchattacks(digits, norm, eps):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = digits
    reference = torchattacks.PGD if norm == "Linf" else torchattacks.PGDL2
    torch.manual_seed(0)
    x_ref = reference(model, eps=eps, alpha=eps / 4, steps=10, random_start=True)(x, y)
    torch.manual_seed(0)  # identical random start: both draw it from the global RNG
    x_ours = pgd(model, x, y, eps=eps, step_size=eps / 4, steps=10, norm=norm)
    assert abs(accuracy(model, x_ours, y) - accuracy(model, x_ref, y)) <= 0.02
    assert not model.training


def test_pgd_restarts_keep_every_fooled_point(digits):
    model, x, y = digits
    kwargs = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 5}
    one = pgd(model, x, y, **kwargs, generator=torch.Generator().manual_seed(1))
    three = pgd(model, x, y, **kwargs, restarts=3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fooled_one = model(one).argmax(1) != y
        fooled_three = model(three).argmax(1) != y
    assert bool((fooled_three | ~fooled_one).all())  # the first restart is `one` itself
    assert int(fooled_three.sum()) >= int(fooled_one.sum())


def test_pgd_input_validation(digits):
    model, x, y = digits
    kwargs = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 1}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd(model, x * 2, y, **kwargs)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd(model, x - 0.5, y, **kwargs)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        trades_perturb(model, x * 2, **kwargs)
    with pytest.raises(ValueError, match="valid names: ce, kl"):
        pgd(model, x, y, **kwargs, loss="mse")
    with pytest.raises(ValueError, match="norm must be one of"):
        pgd(model, x, y, **kwargs, norm="L1")
    with pytest.raises(ValueError, match="write 8/255"):
        pgd(model, x, y, eps=8, step_size=2 / 255, steps=1)


def test_attacks_work_under_no_grad_but_refuse_inference_mode(digits):
    model, x, y = digits
    with torch.no_grad():
        x_adv = pgd(model, x[:8], y[:8], eps=8 / 255, step_size=2 / 255, steps=2)
    assert not torch.equal(x_adv, x[:8])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        pgd(model, x[:8], y[:8], eps=8 / 255, step_size=2 / 255, steps=2)


# ---------------------------------------------------------------- TRADES


def _trades_reference(model, x_natural, step_size, epsilon, perturb_steps):
    """The l_inf branch of TRADES' trades_loss (github.com/yaodongyu/TRADES), transcribed."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    model.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(
                F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1)
            )
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv


def test_trades_perturb_matches_reference_and_increases_kl(digits):
    model, x, _ = digits
    eps, step, steps = 8 / 255, 2 / 255, 10
    torch.manual_seed(0)
    expected = _trades_reference(model, x, step, eps, steps)
    torch.manual_seed(0)
    x_adv = trades_perturb(model, x, eps=eps, step_size=step, steps=steps)
    assert torch.allclose(x_adv, expected, atol=1e-6)
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0

    def kl(x_other):
        with torch.no_grad():
            p = F.softmax(model(x), dim=1)
            return F.kl_div(F.log_softmax(model(x_other), dim=1), p, reduction="sum").item()

    assert kl(x_adv) > 10 * kl((x + 0.001 * torch.randn_like(x)).clamp(0, 1))


def test_trades_perturb_l2_stays_in_ball(digits):
    model, x, _ = digits
    x_adv = trades_perturb(model, x, eps=0.5, step_size=0.1, steps=5, norm="L2")
    assert (x_adv - x).flatten(1).norm(dim=1).max().item() <= 0.5 * (1 + 1e-5)
    with pytest.raises(ValueError, match="steps >= 1"):
        trades_perturb(model, x, eps=0.5, step_size=0.1, steps=0, norm="L2")


@pytest.mark.parametrize("attack", ["pgd", "trades"])
def test_attacks_take_parsed_floats_and_refuse_nan_pixels(digits, attack):
    model, x, y = digits
    run = (
        (lambda xs, **kw: pgd(model, xs, y[:4], steps=1, **kw))
        if attack == "pgd"
        else (lambda xs, **kw: trades_perturb(model, xs, steps=1, **kw))
    )
    with pytest.raises(TypeError, match="ThreatModel.parse"):
        run(x[:4], eps="8/255", step_size=2 / 255)
    with pytest.raises(ValueError, match="step_size"):
        run(x[:4], eps=8 / 255, step_size=-1.0)
    bad = x[:4].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run(bad, eps=8 / 255, step_size=2 / 255)
