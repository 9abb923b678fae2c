"""AdversarialTask: TRADES / GKL-AT / PGD-AT losses, eps ramp, AWP, EMA and exact resume."""

from __future__ import annotations

import copy
from functools import partial
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gkl.losses import ClassPrior, CrossEntropyLoss, GKLLoss, KDLoss, TradesKLLoss
from gkl.tasks import AdversarialTask
from gkl.tasks.awp import add_perturbation, awp_perturbation
from gkl.tasks.ema import update_ema
from gkl.train import run

pytestmark = pytest.mark.usefixtures("one_thread")


SGD = partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)


def tiny_net(num_classes: int = 4) -> nn.Module:
    """Conv-BN-ReLU -> linear on 1x6x6 images: weights with ndim > 1, biases, BN buffers."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, num_classes),
    )


def fixed_batch(n: int = 16, num_classes: int = 4) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 6, 6, generator=gen)
    x_adv = (x + 0.1 * torch.randn(x.shape, generator=gen).sign()).clamp(0, 1)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return x, x_adv, y


def task_for(objective: str, loss: nn.Module | None, **kwargs) -> AdversarialTask:
    return AdversarialTask(tiny_net(), 4, SGD, loss=loss, objective=objective, **kwargs)


def at_epoch(task: AdversarialTask, epoch: int) -> AdversarialTask:
    task._trainer = SimpleNamespace(current_epoch=epoch)
    return task


def direct_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """mean_b sum_k p_k (log p_k - log q_k), written out."""
    p = p_logits.softmax(1)
    return (p * (p.log() - q_logits.softmax(1).log())).sum(1).mean()


# ----------------------------------------------------------------------------- losses


def test_trades_loss_equals_direct_computation():
    task = task_for("trades", TradesKLLoss(), trades_beta=6.0, ce_weight=0.5).eval()
    x, x_adv, y = fixed_batch()
    loss, parts, adv_logits, nat_logits = task.objective_loss(task.model, x, x_adv, y, None)
    nat, adv = task.model(x), task.model(x_adv)
    expected = 0.5 * F.cross_entropy(nat, y) + 6.0 * direct_kl(nat, adv)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(parts["robust"], 6.0 * direct_kl(nat, adv))
    torch.testing.assert_close(adv_logits, adv)
    torch.testing.assert_close(nat_logits, nat)


def test_gkl_at_loss_equals_authors_formula_with_gradients_into_both_branches(
    authors_dkl,
):
    loss_fn = GKLLoss(
        alpha=4.0, beta=20.0, gamma=1.0, temperature=1.0, temperature2=4.0, use_class_prior=True
    )
    task = task_for("gkl", loss_fn).eval()
    x, x_adv, y = fixed_batch()
    prior = ClassPrior(4, temperature=4.0)
    prior.update(torch.randn(64, 4), torch.arange(64) % 4)
    prior.end_epoch()
    rows = prior.rows(y)
    loss, _, _, _ = task.objective_loss(task.model, x, x_adv, y, rows)
    grads = torch.autograd.grad(loss, list(task.model.parameters()))

    reference = copy.deepcopy(task.model)
    nat, adv = reference(x), reference(x_adv)
    expected = F.cross_entropy(nat, y) + authors_dkl(adv, nat, rows, 4.0, 20.0, 1.0, 1.0)
    expected_grads = torch.autograd.grad(expected, list(reference.parameters()))
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert task.class_prior is not None and task.class_prior.temperature == 4.0


def test_pgd_at_loss_is_ce_on_adversarial_examples():
    task = task_for("pgd_at", CrossEntropyLoss()).eval()
    x, x_adv, y = fixed_batch()
    loss, parts, _, nat_logits = task.objective_loss(task.model, x, x_adv, y, None)
    torch.testing.assert_close(loss, F.cross_entropy(task.model(x_adv), y))
    assert parts == {} and nat_logits is None


@pytest.mark.parametrize(
    ("objective", "loss", "message"),
    [
        ("tradez", None, r"unknown objective 'tradez'.*'trades', 'gkl', 'pgd_at'"),
        ("trades", GKLLoss(), "objective='trades' uses TradesKLLoss"),
        ("gkl", None, "objective='gkl' needs loss=gkl"),
        ("gkl", KDLoss(), "objective='gkl' needs loss=gkl"),
        ("pgd_at", TradesKLLoss(), "use loss=ce"),
    ],
)
def test_objective_and_loss_are_validated(objective, loss, message):
    with pytest.raises(ValueError, match=message):
        task_for(objective, loss)


def test_bad_knobs_are_rejected():
    with pytest.raises(ValueError, match="write 8/255"):
        task_for("trades", None, eps=8)
    with pytest.raises(ValueError, match="ema_decay must be in"):
        task_for("trades", None, ema_decay=1.0)
    with pytest.raises(ValueError, match="norm"):
        task_for("trades", None, norm="L1")


# ----------------------------------------------------------------------------- schedules


def test_eps_ramp_and_awp_warmup_follow_one_based_epochs():
    task = task_for("pgd_at", None, eps="8/255", step_size="2/255", steps=3, eps_ramp_epochs=4)
    task.awp_gamma, task.awp_warmup_epoch = 0.01, 3
    factors = [at_epoch(task, e).eps_factor() for e in range(6)]
    assert factors == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [at_epoch(task, e).awp_active() for e in range(4)] == [False, False, True, True]
    assert at_epoch(task_for("trades", None), 0).eps_factor() == 1.0

    x, _, y = fixed_batch()
    delta = at_epoch(task, 1).adversarial_examples(x, y) - x
    assert delta.abs().max() <= 0.5 * 8 / 255 + 1e-7  # eps_t = eps * (1 + 1) / 4
    assert delta.abs().max() > 0.4 * 8 / 255


def test_require_generated_data_and_awp_accumulation_checks():
    task = task_for("trades", None, require_generated_data=True)
    task._trainer = SimpleNamespace(
        accumulate_grad_batches=1, datamodule=SimpleNamespace(is_synthetic=False)
    )
    with pytest.raises(ValueError, match="data.generated_path"):
        task.on_fit_start()
    task = task_for("trades", None, awp_gamma=0.005)
    task._trainer = SimpleNamespace(accumulate_grad_batches=2, datamodule=None)
    with pytest.raises(ValueError, match="accumulate_grad_batches=1"):
        task.on_fit_start()


# ----------------------------------------------------------------------------- AWP and EMA


def test_awp_perturbation_is_layerwise_scaled_gradient_and_restores():
    model = tiny_net().train()
    x, x_adv, y = fixed_batch()
    before = copy.deepcopy(model.state_dict())

    def loss_fn(forward):
        return F.cross_entropy(forward(x_adv), y)

    perturbation = awp_perturbation(model, loss_fn, gamma=0.01)
    assert sorted(perturbation) == ["0.weight", "4.weight"]  # ndim > 1 only
    for key, value in model.state_dict().items():  # BN statistics untouched by the AWP pass
        assert torch.equal(value, before[key]), key

    reference = copy.deepcopy(model)
    grads = dict(
        zip(
            ["0.weight", "4.weight"],
            torch.autograd.grad(loss_fn(reference), [reference[0].weight, reference[4].weight]),
            strict=True,
        )
    )
    params = dict(model.named_parameters())
    for name, v in perturbation.items():
        torch.testing.assert_close(v.norm(), 0.01 * params[name].norm())
        torch.testing.assert_close(v / v.norm(), grads[name] / grads[name].norm())

    add_perturbation(model, perturbation, 1.0)
    assert not torch.equal(model[0].weight, before["0.weight"])
    add_perturbation(model, perturbation, -1.0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-7)


@torch.no_grad()
def add_scaled(model: nn.Module, diff: dict[str, torch.Tensor], coeff: float) -> None:
    """The AWP code's add_into_weights: W <- W + coeff * diff_W."""
    for name, param in model.named_parameters():
        if name in diff:
            param.add_(coeff * diff[name])


def reference_trades_awp_step(model, x, x_adv, y, gamma, weight_diff, beta=6.0):
    """One TRADES-AWP step the way Wu et al.'s code does it: proxy copy + SGD, diff scaling."""
    model = copy.deepcopy(model).train()
    proxy = copy.deepcopy(model).train()
    proxy_optim = torch.optim.SGD(proxy.parameters(), lr=0.1)
    nat, adv = proxy(x), proxy(x_adv)
    (-(F.cross_entropy(nat, y) + beta * direct_kl(nat, adv))).backward()
    proxy_optim.step()
    diff = weight_diff(model, proxy)
    add_scaled(model, diff, gamma)
    optimizer = SGD(model.parameters())
    nat, adv = model(x), model(x_adv)
    (F.cross_entropy(nat, y) + beta * direct_kl(nat, adv)).backward()
    optimizer.step()
    add_scaled(model, diff, -gamma)
    return model


def one_lightning_step(task: AdversarialTask, x, x_adv, y) -> AdversarialTask:
    task.adversarial_examples = lambda xb, yb, prior=None: x_adv  # a fixed x_adv for the comparison
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(task, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=len(y)))
    return task


def test_awp_step_matches_reference_implementation_and_ema_follows(awp_weight_diff):
    x, x_adv, y = fixed_batch()
    initial = tiny_net()
    expected = reference_trades_awp_step(
        initial, x, x_adv, y, gamma=0.02, weight_diff=awp_weight_diff
    )
    task = AdversarialTask(
        copy.deepcopy(initial), 4, SGD, objective="trades", awp_gamma=0.02, ema_decay=0.75
    )
    one_lightning_step(task, x, x_adv, y)
    got = task.model.state_dict()
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)

    without_awp = one_lightning_step(
        AdversarialTask(copy.deepcopy(initial), 4, SGD, objective="trades"), x, x_adv, y
    )
    assert (without_awp.model[0].weight - got["0.weight"]).abs().max() > 1e-4

    # EMA after one step: 0.75 * initial + 0.25 * trained; counters copied; it is exported.
    ema = task.ema_model.state_dict()
    for key, value in initial.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(ema[key], 0.75 * value + 0.25 * got[key])
        else:
            assert torch.equal(ema[key], got[key])
    assert task.export_model is task.ema_model and task.eval_model is task.ema_model
    assert not any(p.requires_grad for p in task.ema_model.parameters())


def test_update_ema_formula():
    ema, model = tiny_net(), tiny_net()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(2.0)
        model[1].num_batches_tracked.fill_(7)
    before = copy.deepcopy(ema.state_dict())
    update_ema(ema, model, 0.9)
    for key, value in ema.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * model.state_dict()[key])
    assert ema[1].num_batches_tracked.item() == 7


# ----------------------------------------------------------------------------- Lightning runs


@pytest.mark.needs_fmnist
def test_resume_of_gkl_at_with_awp_ema_and_prior_after_a_crash_mid_epoch_is_exact(
    compose_cfg, tmp_path
):
    overrides = [
        "+experiment=fmnist_gkl_at",
        "model.name=fmnist_mlp",  # the mechanics, not the model, are under test: keep it cheap
        "data.train_subset=400",
        "data.val_size=100",
        "data.test_size=100",
        "data.batch_size=50",
        "task.steps=2",
        "task.eps_ramp_epochs=3",
        "task.awp_gamma=0.01",
        "task.awp_warmup_epoch=2",
        "task.ema_decay=0.9",
        "task.val_pgd_subset=60",
        "task.val_pgd_steps=2",
        "trainer.max_epochs=3",
        "callbacks.mid_epoch_checkpoint.every_n_train_steps=12",
    ]
    released = tmp_path / "a" / "released.pth"
    reference = run(compose_cfg(tmp_path / "a", [*overrides, f"export_weights={released}"]))
    assert set(reference) >= {"val/acc", "val/pgd_acc", "test/acc", "test/loss"}
    # export_weights releases the EMA, not the last trained weights.
    final = torch.load(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    exported = torch.load(released, weights_only=True)["model"]
    for key, value in exported.items():
        assert torch.equal(value, final["state_dict"][f"ema_model.model.{key}"]), key
    assert any(
        not torch.equal(value, final["state_dict"][f"model.model.{key}"])
        for key, value in exported.items()
    )

    # 8 batches an epoch: the run dies at step 14 (epoch 2 of 3, AWP on); its newest checkpoint
    # is the mid-epoch one written at step 12.
    run(compose_cfg(tmp_path / "b", [*overrides, "trainer.max_steps=14", "test=false"]))
    checkpoint = tmp_path / "b" / "run" / "checkpoints" / "last-step.ckpt"
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    assert state["global_step"] == 12 and state["epoch"] == 1
    assert state["state_dict"]["class_prior.epochs_completed"].item() == 1
    assert any(k.startswith("ema_model.model.") for k in state["state_dict"])

    resumed = run(compose_cfg(tmp_path / "b", [*overrides, f"ckpt_path={checkpoint}"]))
    for key in ("test/acc", "test/loss", "val/acc", "val/pgd_acc"):
        assert resumed[key] == reference[key], key
