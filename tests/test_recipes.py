"""The paper's recipes: composed configs carry the authors' numbers, every experiment runs, and one
training step of each recipe equals, in float64, a reference written here from the authors' code
(jiequancui/DKL DKLv2/Adv-training-dkl train_dkl_cifar10/100.py, train_trades_cifar.py,
utils_awp.py; mdistiller's KD / DKD)."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from hydra.utils import instantiate

from gkl.config import compose_config
from gkl.models.build import build_classifier
from gkl.tasks.weight_average import WeightAverage
from gkl.train import build_task, run

pytestmark = pytest.mark.usefixtures("one_thread")

# name: (teacher, student, alpha, beta, gamma, GI, lr, mdistiller DKD beta): anchors.md's table.
KD_PAIRS = {
    "cifar100_kd": ("resnet32x4", "resnet8x4", 1, 16, 0.05, True, 0.05, 8),
    "cifar100_kd_res56_res20": ("resnet56", "resnet20", 1, 4, 0.2, True, 0.05, 2),
    "cifar100_kd_res110_res32": ("resnet110", "resnet32", 1, 4, 0.1, False, 0.05, 2),
    "cifar100_kd_res32x4_shuv1": ("resnet32x4", "ShuffleV1", 1, 8, 0, True, 0.01, 8),
    "cifar100_kd_res32x4_shuv2": ("resnet32x4", "ShuffleV2", 3, 12, 0.1, True, 0.01, 8),
    "cifar100_kd_res50_mv2": ("ResNet50", "MobileNetV2", 1, 8, 0.05, True, 0.01, 8),
    "cifar100_kd_vgg13_mv2": ("vgg13", "MobileNetV2", 4, 12, 0.1, True, 0.01, 6),
    "cifar100_kd_vgg13_vgg8": ("vgg13", "vgg8", 1, 8, 0.2, True, 0.05, 6),
    "cifar100_kd_wrn40_2_shuv1": ("wrn_40_2", "ShuffleV1", 1, 8, 0, False, 0.01, 8),
    "cifar100_kd_wrn40_2_wrn16_2": ("wrn_40_2", "wrn_16_2", 3, 20, 0.3, False, 0.05, 6),
    "cifar100_kd_wrn40_2_wrn40_1": ("wrn_40_2", "wrn_40_1", 1, 12, 0.3, False, 0.05, 6),
}
# name: (data, objective, lr, attack-loss beta or None (TRADES KL), trades beta, aug_weight).
AT_RECIPES = {
    "cifar10_gkl_at": ("cifar10", "gkl", 0.2, 0.0, None, 1.0),
    "cifar100_gkl_at": ("cifar100", "gkl", 0.2, 1.0, None, 1.0),
    "cifar10_trades": ("cifar10", "trades", 0.2, None, 6.0, 1.0),
    "cifar100_trades": ("cifar100", "trades", 0.2, None, 9.0, 1.0),
    "cifar10_gkl_at_autoaug": ("cifar10", "gkl", 0.2, 0.0, None, 0.5),
    "cifar100_gkl_at_autoaug": ("cifar100", "gkl", 0.2, 1.0, None, 0.5),
}


def compose(*overrides: str, tmp=None):
    root = [f"paths.root_dir={tmp}", f"paths.output_dir={tmp / 'run'}"] if tmp else []
    return compose_config("train.yaml", [*root, *overrides])


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", KD_PAIRS)
def test_kd_pair_configs_carry_the_authors_numbers(name):
    teacher, student, alpha, beta, gamma, gi, lr, dkd_beta = KD_PAIRS[name]
    cfg = compose(f"+experiment={name}")
    assert (cfg.teacher.name, cfg.model.name) == (teacher, student)
    loss = cfg.loss
    assert loss._target_ == "gkl.losses.GKLLoss"
    assert (loss.alpha, loss.beta, loss.gamma, loss.use_class_prior) == (alpha, beta, gamma, gi)
    assert (loss.temperature, loss.temperature2) == (4, 4)
    assert cfg.optim.optimizer.lr == lr and cfg.optim.optimizer.weight_decay == 5e-4
    assert list(cfg.optim.scheduler.milestones) == [150, 180, 210]
    assert (cfg.data.batch_size, cfg.trainer.max_epochs, cfg.task.warmup_epochs) == (64, 240, 20)
    dkd = compose(f"+experiment={name}", "+baseline=dkd")
    assert dkd.loss._target_ == "gkl.losses.DKDLoss"
    assert (dkd.loss.alpha, dkd.loss.beta, dkd.loss.temperature) == (1, dkd_beta, 4)
    assert (dkd.task.ce_weight, dkd.task.warmup_epochs, dkd.task_name) == (1, 20, f"{name}_dkd")
    kd = compose(f"+experiment={name}", "+baseline=kd")
    assert (kd.loss._target_, kd.loss.temperature) == ("gkl.losses.KDLoss", 4)
    assert (kd.task.ce_weight, kd.task.distill_weight, kd.task.warmup_epochs) == (0.1, 0.9, 0)


def test_imagenet_r50_mv1_config_carries_the_authors_numbers():
    cfg = compose("+experiment=imagenet_kd_r50_mv1")
    assert (cfg.teacher.name, cfg.model.name) == ("resnet50.tv_in1k", "MobileNetV1")
    loss = cfg.loss
    assert (loss.alpha, loss.beta, loss.gamma, loss.use_class_prior) == (4, 1, 0.5, True)
    assert (loss.temperature, loss.temperature2) == (1, 1)
    assert (cfg.data.batch_size, cfg.trainer.max_epochs) == (512, 100)
    assert (cfg.optim.optimizer.lr, cfg.optim.optimizer.weight_decay) == (0.2, 1e-4)
    assert list(cfg.optim.scheduler.milestones) == [30, 60, 90]
    dkd = compose("+experiment=imagenet_kd_r50_mv1", "+baseline=dkd")
    assert (dkd.loss.beta, dkd.loss.temperature, dkd.task.warmup_epochs) == (2, 1, 1)


@pytest.mark.parametrize("name", AT_RECIPES)
def test_at_configs_carry_the_authors_numbers(name):
    data, objective, lr, attack_beta, trades_beta, aug_weight = AT_RECIPES[name]
    cfg = compose(f"+experiment={name}")
    task = cfg.task
    assert cfg.data.dataset == data and cfg.task.objective == objective
    assert cfg.model.name == "wrn_34_10" and cfg.model.normalize is False
    assert (cfg.optim.optimizer.lr, cfg.optim.optimizer.weight_decay) == (lr, 5e-4)
    # GKL-AT: train_dkl_cifar*.py's cosine; TRADES: train_trades_cifar.py's (test_authors_runs.py)
    kind = "cosine" if objective == "trades" else "authors_cosine"
    assert cfg.optim.scheduler.kind == kind and cfg.trainer.max_epochs == 200
    assert (task.eps, task.step_size, task.steps, task.eps_ramp_epochs) == (
        "8/255",
        "4/255",
        5,
        200,
    )
    assert (task.awp_gamma, task.awp_warmup_epoch) == (0.005, 10)
    assert (task.weight_average, task.weight_average_start, task.ema_decay) == (0.9, 1, None)
    assert task.aug_weight == aug_weight and task.adversarial_first is True
    if objective == "gkl":
        loss = cfg.loss
        assert (loss.alpha, loss.beta, loss.gamma, loss.temperature) == (4, 20, 1, 1)
        assert loss.temperature2 == 4 and loss.use_class_prior
        attack = task.attack_loss
        assert (attack.alpha, attack.beta, attack.gamma, attack.temperature) == (
            1,
            attack_beta,
            1,
            1,
        )
        assert attack.use_class_prior == (attack_beta > 0)
    else:
        assert cfg.loss._target_ == "gkl.losses.TradesKLLoss" and task.attack_loss is None
        assert task.trades_beta == trades_beta
    if aug_weight != 1.0:
        assert cfg.data.second_view.autoaugment == "authors_cifar10"


def test_wu_et_al_trades_awp_keeps_its_own_recipe():
    cfg = compose("+experiment=cifar10_trades_awp")
    assert cfg.loss._target_ == "gkl.losses.TradesKLLoss" and cfg.optim.optimizer.lr == 0.1
    assert list(cfg.optim.scheduler.milestones) == [100, 150] and cfg.task.steps == 10


# ----------------------------------------------------------------------------- smoke runs

TINY = ["data.batch_size=4", "++data.synthetic_sizes=[4,4,4]"]  # one batch of each split


# Every experiment file runs on synthetic data in tests/test_train.py; here: the baselines.
@pytest.mark.parametrize("baseline", ["kd", "dkd"])
def test_kd_baselines_run_on_synthetic_data(tmp_path, baseline):
    cfg = compose(
        "+experiment=cifar100_kd_res56_res20",
        f"+baseline={baseline}",
        "data.synthetic=true",
        "trainer.fast_dev_run=true",
        "trainer.accelerator=cpu",
        "~callbacks.progress_bar",
        *TINY,
        tmp=tmp_path,
    )
    metrics = run(cfg)
    assert math.isfinite(metrics["test/loss"])
    record = json.loads((tmp_path / "run" / "metrics.smoke.json").read_text())
    assert "NOT_A_RESULT" in record


def test_missing_teacher_names_the_mdistiller_file_and_the_teacher_experiment(tmp_path):
    cfg = compose("+experiment=cifar100_kd_res110_res32", tmp=tmp_path)
    with pytest.raises(Exception, match="not found") as err:  # hydra wraps the FileNotFoundError
        instantiate(cfg.teacher)
    message = str(err.value)
    assert "cifar_teachers/resnet110_vanilla/ckpt_epoch_240.pth" in message
    assert "+experiment=cifar100_teacher model.name=resnet110" in message


# ----------------------------------------------------------------------------- AT steps


def trades_kl_batchmean(adv, nat):
    return F.kl_div(F.log_softmax(adv, 1), F.softmax(nat, 1), reduction="batchmean")


def authors_step(
    model, x, y, rows, noise, *, eps, steps, lr, awp_gamma, ascent, loss_fn, weight_diff
):
    """One step of the authors' train(): perturb_input, TradesAWP.calc_awp/perturb, the update
    (SGD momentum 0.9 wd 5e-4), restore; returns (x_adv, loss, awp diff, model, prior sums)."""
    model = copy.deepcopy(model)
    step_size = eps / 2
    model.eval()
    x_adv = x.detach() + 0.001 * noise
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            objective = ascent(model(x_adv), model(x))
        grad = torch.autograd.grad(objective, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    model.train()
    proxy = copy.deepcopy(model)
    proxy_optim = torch.optim.SGD(proxy.parameters(), lr=lr)
    nat, adv = proxy(x), proxy(x_adv)
    (-1.0 * (F.cross_entropy(nat, y) + loss_fn(adv, nat))).backward()
    proxy_optim.step()
    diff = weight_diff(model, proxy)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, d in diff.items():
            params[key].add_(awp_gamma * d)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    logits_adv, logits_nat = model(x_adv), model(x)
    sums = F.one_hot(y, nat.shape[1]).double().t() @ F.softmax(logits_nat.detach() / 4, -1)
    loss = F.cross_entropy(logits_nat, y) + loss_fn(logits_adv, logits_nat)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        for key, d in diff.items():
            params[key].add_(-awp_gamma * d)
    return x_adv, loss.detach(), {k: awp_gamma * d for k, d in diff.items()}, model, sums


def our_step(name: str, x, y, prior, seed, *extra: str):
    """One AdversarialTask step of the composed recipe (tiny WRN, AWP from epoch 1, float64)."""
    cfg = compose(f"+experiment={name}", "model.name=wrn_16_1", "task.awp_warmup_epoch=1", *extra)
    torch.manual_seed(0)
    model = instantiate(cfg.model).double()
    loss = instantiate(cfg.loss)
    task = build_task(cfg, model, None, loss, cfg.data.num_classes)
    task._trainer = SimpleNamespace(current_epoch=0, num_training_batches=1)
    task.log = task.log_train = lambda *args, **kwargs: None
    if task.class_prior is not None:
        task.class_prior.prior.copy_(prior)
    seen = {}
    attack = task.adversarial_examples
    task.adversarial_examples = lambda *a: seen.setdefault("x_adv", attack(*a))
    initial = copy.deepcopy(model.model)
    torch.manual_seed(seed)
    out = task.training_step((x, y), 0)
    awp = {k.removeprefix("model."): v.clone() for k, v in task._awp.items()}
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.optim.optimizer.lr, momentum=0.9, weight_decay=5e-4
    )
    task.optimizer_step(0, 0, optimizer, lambda: out.backward())
    return cfg, task, initial, seen["x_adv"], out.detach(), awp


def random_prior(c: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    p = torch.rand(c, c, generator=gen, dtype=torch.float64) + 0.05
    return p / p.sum(1, keepdim=True)


def batch(c: int, n: int = 6):
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(n, 3, 32, 32, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, c, (n,), generator=gen)


@pytest.mark.parametrize("name", ["cifar10_gkl_at", "cifar100_gkl_at", "cifar100_trades"])
def test_one_at_step_equals_the_authors_code_in_float64(authors_dkl, awp_weight_diff, name):
    c = 10 if name.startswith("cifar10_") else 100
    x, y = batch(c)
    prior = random_prior(c)
    cfg, task, initial, x_adv, loss, awp = our_step(name, x, y, prior, seed=7)
    rows = prior[y]
    if cfg.task.objective == "gkl":
        beta_attack = cfg.task.attack_loss.beta  # 0 on CIFAR-10, 1 on CIFAR-100

        def ascent(adv, nat):
            return authors_dkl(adv, nat, rows, alpha=1.0, beta=beta_attack, gamma=1.0)

        def loss_fn(adv, nat):
            return authors_dkl(adv, nat, rows, alpha=4.0, beta=20.0, gamma=1.0)
    else:

        def ascent(adv, nat):
            return F.kl_div(F.log_softmax(adv, 1), F.softmax(nat, 1), reduction="sum")

        def loss_fn(adv, nat):
            return 9.0 * trades_kl_batchmean(adv, nat)

    torch.manual_seed(7)
    noise = torch.randn(x.shape, dtype=torch.float64)
    eps = 8 / 255 * 1 / 200  # epoch 1 of 200: varepsilon = epsilon * epoch / epochs
    ref = authors_step(
        initial,
        x,
        y,
        rows,
        noise,
        eps=eps,
        steps=5,
        lr=0.2,
        awp_gamma=0.005,
        ascent=ascent,
        loss_fn=loss_fn,
        weight_diff=awp_weight_diff,
    )
    ref_x_adv, ref_loss, ref_awp, ref_model, ref_sums = ref
    assert (x_adv - x).abs().max() > 0.5 * eps  # the attack moved
    torch.testing.assert_close(x_adv, ref_x_adv, rtol=0, atol=1e-15)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert awp.keys() == ref_awp.keys() and awp
    for key, value in ref_awp.items():
        torch.testing.assert_close(awp[key], value, rtol=1e-9, atol=1e-15, msg=key)
    got = task.model.model.state_dict()
    for key, value in ref_model.state_dict().items():  # weights and BN running statistics
        torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-13, msg=key)
    if task.class_prior is not None:
        torch.testing.assert_close(task.class_prior.sums, ref_sums, rtol=1e-12, atol=1e-15)


def test_cifar100_ascent_differs_from_the_cifar10_ascent():
    x, y = batch(100)
    prior = random_prior(100)
    x10 = our_step("cifar10_gkl_at", x, y, prior, 7, "data=cifar100")[3]
    cfg = compose("+experiment=cifar100_gkl_at")
    assert cfg.task.attack_loss.beta == 1.0
    x100 = our_step("cifar100_gkl_at", x, y, prior, seed=7)[3]
    assert not torch.equal(x10, x100)


def test_attack_loss_that_cannot_be_computed_is_an_error_naming_the_valid_ones():
    cfg = compose("+experiment=cifar10_gkl_at", "model.name=wrn_16_1")
    cfg.task.attack_loss = {"_target_": "torch.nn.MSELoss"}
    model = instantiate(cfg.model)
    with pytest.raises(ValueError, match=r"attack_loss=MSELoss.*Valid losses: trades_kl"):
        build_task(cfg, model, None, instantiate(cfg.loss), 10)


# ----------------------------------------------------------------------------- weight average


def test_weight_average_is_swa_py_and_round_trips_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = build_classifier("wrn_16_1", 10, (0.5,) * 3, (0.5,) * 3, normalize=False)
    wa = WeightAverage(net, tau=0.9, start_epoch=1)
    epochs = []
    for epoch in (1, 2, 3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        epochs.append(copy.deepcopy(net.state_dict()))
        wa.update(net, epoch)
    # swa.py: new = w_1; new = (1 - tau) * w_i + tau * new.
    expected = dict(epochs[0])
    for state in epochs[1:]:
        expected = {
            k: (0.1 * v + 0.9 * expected[k]) if v.is_floating_point() else v
            for k, v in state.items()
        }
    for key, value in wa.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    torch.save(wa.state_dict(), tmp_path / "wa.pt")
    restored = WeightAverage(net, tau=0.9)
    restored.load_state_dict(torch.load(tmp_path / "wa.pt", weights_only=True))
    assert int(restored.count) == 3


# ----------------------------------------------------------------------------- KD steps


def mdistiller_kd(s, t, temperature):
    log_s = F.log_softmax(s / temperature, 1)
    return F.kl_div(log_s, F.softmax(t / temperature, 1), reduction="none").sum(1).mean() * (
        temperature**2
    )


def mdistiller_dkd(s, t, y, alpha, beta, temperature):
    gt = F.one_hot(y, s.shape[1]).bool()
    ps, pt = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1)
    tckd = F.kl_div(bs.log(), bt, reduction="sum") * temperature**2 / len(y)
    log_nt = F.log_softmax(s / temperature - 1000.0 * gt, 1)
    p_nt = F.softmax(t / temperature - 1000.0 * gt, 1)
    nckd = F.kl_div(log_nt, p_nt, reduction="sum") * temperature**2 / len(y)
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("baseline", ["gkl", "kd", "dkd"])
def test_one_kd_step_per_loss_family_equals_the_reference(baseline):
    extra = [] if baseline == "gkl" else [f"+baseline={baseline}"]
    cfg = compose("+experiment=cifar100_kd_res56_res20", "model.name=resnet8", *extra)
    torch.manual_seed(0)
    model = instantiate(cfg.model).double()
    teacher = instantiate(cfg.teacher, checkpoint=None, allow_random=True).double()
    task = build_task(cfg, model, teacher, instantiate(cfg.loss), 100)
    task._trainer = SimpleNamespace(current_epoch=24)  # past the 20-epoch warm-up
    task.log_train = lambda *args, **kwargs: None
    prior = random_prior(100)
    if task.class_prior is not None:
        task.class_prior.prior.copy_(prior)
    x, y = batch(100)
    initial = copy.deepcopy(model)
    loss = task.training_step((x, y), 0)
    ref_model = copy.deepcopy(initial).train()
    s, t = ref_model(x), teacher(x)
    if baseline == "gkl":  # alpha 1 beta 4 gamma 0.2 with the class prior rows, T 4
        rows = prior[y]
        c = 100
        d_t, d_s = t.view(-1, c, 1) - t.view(-1, 1, c), s.view(-1, c, 1) - s.view(-1, 1, c)
        w = rows.pow(0.2)
        p_n = w.view(-1, c, 1) @ w.view(-1, 1, c)
        mse = 0.25 * ((d_t - d_s).pow(2) * p_n).sum() / p_n.sum()
        sce = -(F.softmax(t / 4, 1) * F.log_softmax(s / 4, 1)).sum(1).mean()
        expected = F.cross_entropy(s, y) + 4.0 * mse + 1.0 * sce
    elif baseline == "kd":
        expected = 0.1 * F.cross_entropy(s, y) + 0.9 * mdistiller_kd(s, t, 4.0)
    else:
        expected = F.cross_entropy(s, y) + mdistiller_dkd(s, t, y, 1.0, 2.0, 4.0)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    expected.backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-14, msg=name)


def test_weight_average_resumes_exactly_from_a_weights_only_checkpoint(tmp_path):
    common = [
        "+experiment=fmnist_gkl_at",
        "model.name=fmnist_mlp",
        "data.synthetic=true",
        "++data.synthetic_sizes=[32,16,16]",
        "data.batch_size=16",
        "task.steps=1",
        "task.val_pgd_subset=0",
        "task.weight_average=0.9",
        "~callbacks.progress_bar",
        "~callbacks.mid_epoch_checkpoint",
    ]
    run(compose(*common, "trainer.max_epochs=3", tmp=tmp_path / "a"))
    # Stopped after epoch 2 of 3 (2 batches an epoch; the cosine schedule keeps max_epochs=3).
    stop = ["trainer.max_epochs=3", "trainer.max_steps=4", "test=false"]
    run(compose(*common, *stop, tmp=tmp_path / "b"))
    last_b = tmp_path / "b" / "run" / "checkpoints" / "last.ckpt"
    run(compose(*common, "trainer.max_epochs=3", f"ckpt_path={last_b}", tmp=tmp_path / "b"))
    a = torch.load(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last_b, weights_only=True)
    averaged = {k: v for k, v in a["state_dict"].items() if k.startswith("averaged_model.")}
    assert averaged["averaged_model.count"] == 3
    for key, value in averaged.items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=key)
    trained = {k: v for k, v in a["state_dict"].items() if k.startswith("model.model.")}
    assert any(not torch.equal(v, averaged[f"averaged_model.{k}"]) for k, v in trained.items())


def test_paper_table_collects_runs_into_cells_with_anchors(tmp_path):
    from gkl import paper
    from gkl.runs import find_runs

    def fake_run(name, experiment, loss, seed, acc, best=None, evaluation=None, beta=8.0):
        run_dir = tmp_path / name
        run_dir.mkdir(parents=True)
        config = {
            "task_name": experiment,
            "experiment_name": experiment,
            "seed": seed,
            "loss": {"_target_": loss, "beta": beta},
            "paths": {"output_dir": str(run_dir)},
        }
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
        record = {"metrics": {"test/acc": acc}, "seed": seed}
        (run_dir / "metrics.json").write_text(json.dumps(record))
        if best is not None:
            (run_dir / "best_test_epoch.NOT_A_RESULT.json").write_text(
                json.dumps({"val/acc": best})
            )
        if evaluation is not None:
            (run_dir / "eval").mkdir()
            (run_dir / "eval" / "results.json").write_text(json.dumps(evaluation))

    fake_run("a", "cifar100_kd_vgg13_vgg8", "gkl.losses.GKLLoss", 0, 0.70, best=0.72)
    fake_run("b", "cifar100_kd_vgg13_vgg8", "gkl.losses.GKLLoss", 1, 0.74, best=0.75)
    # Same experiment and seed, another beta: a configuration of its own, never pooled.
    fake_run("c", "cifar100_kd", "gkl.losses.GKLLoss", 0, 0.70, beta=4.0)
    fake_run("d", "cifar100_kd", "gkl.losses.GKLLoss", 0, 0.76, beta=16.0)
    aa = {
        "clean_acc": 0.6,
        "autoattack_acc": 0.3,
        "n_examples": 200,
        "autoattack_version": "standard",
    }
    fake_run("e", "cifar100_gkl_at", "gkl.losses.GKLLoss", 0, 0.6, evaluation=aa)
    fake_run("f", "fmnist_kd", "gkl.losses.GKLLoss", 0, 0.85)
    (tmp_path / "smoke").mkdir()
    (tmp_path / "smoke" / "metrics.smoke.json").write_text("{}")
    runs = find_runs([tmp_path])
    assert len(runs) == 6
    lines = paper.kd_table("KD", paper.KD_CIFAR, runs)
    (row,) = [line for line in lines if line.startswith("| vgg13 -> vgg8")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    # KD ours/best/anchor, DKD ours/best/anchor, GKL ours/best/anchor
    assert cells[1:4] == ["", "", "72.98"] and cells[4:7] == ["", "", "74.68"]
    assert cells[7] == "72.00 ± 2.83 (n=2)" and cells[8] == "73.50 ± 2.12 (n=2)"
    assert cells[9] == "missing"  # no GKL number in docs/anchors
    (base,) = [line for line in lines if line.startswith("| resnet32x4 -> resnet8x4")]
    gkl_cell = [c.strip() for c in base.strip("|").split("|")][7]
    assert gkl_cell == "70.00 ± - (n=1) [loss.beta=4.0]; 76.00 ± - (n=1) [loss.beta=16.0]"
    at = paper.at_table(runs)
    (at_row,) = [line for line in at if "CIFAR-100 | GKL-AT |" in line]
    assert "60.00 ± - (n=1)*" in at_row and "30.00 ± - (n=1)*" in at_row and "65.76" in at_row
    empty = [line for line in at if "CIFAR-10 | GKL-AT |" in line][0]
    assert "|  |  | 85.31 | 57.09 |" in empty
    (trades,) = [line for line in at if "CIFAR-100 | TRADES (authors'" in line]
    assert "| about 60 | about 29 |" in trades  # as published, no invented decimals
    text = paper.paper_tables(runs)
    assert "### Other runs" in text and "| fmnist_kd | 85.00 ± - | 1 | 0 |" in text


def test_second_view_is_autoaugment_and_cutout_zeroes_one_clipped_square():
    from gkl.data.augment import SecondView, cutout

    torch.manual_seed(0)
    images = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    out = cutout(images, 16)
    for image in out:
        zero = (image == 0).all(0)
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert 0 < len(rows) <= 16 and 0 < len(cols) <= 16
        assert int(zero.sum()) == len(rows) * len(cols)  # one axis-aligned rectangle
        assert (image[:, ~zero] == 200).all()
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    view = SecondView("authors_cifar10", cutout=0)(images)
    assert view.dtype == torch.uint8 and view.shape == (8, 3, 32, 32)
    with pytest.raises(ValueError, match="second_view.autoaugment"):
        SecondView("svhn")
