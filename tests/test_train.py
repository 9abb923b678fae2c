"""End-to-end tests of train.py: every experiment, resume, multirun, Optuna, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from gkl.models import create_model
from gkl.train import (
    CONFIG_DIR,
    METRICS_FILE,
    SMOKE_METRICS_FILE,
    build_datamodule,
    build_task,
    build_teacher,
    run,
)

ROOT = Path(CONFIG_DIR).parent
EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


def save_random_teacher(path: Path, name: str = "fmnist_cnn", num_classes: int = 10) -> Path:
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": create_model(name, num_classes).state_dict()}, path)
    return path


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_on_synthetic_data_and_is_marked_as_smoke(
    compose_cfg, tmp_path, experiment
):
    """Each recipe as composed, one tiny synthetic batch per split. The KD pairs keep their
    architectures; the WRN-28/34-10 of the AT recipes (4 img/s on a CPU) become a WRN-16-1."""
    overrides = [
        f"+experiment={experiment}",
        "data.synthetic=true",
        "trainer.fast_dev_run=true",
        "data.batch_size=4",
        "++data.synthetic_sizes=[4,4,4]",
    ]
    cfg = compose_cfg(tmp_path, overrides)
    if str(cfg.model.get("name", "")).startswith("wrn_") and cfg.model.name.endswith("_10"):
        cfg = compose_cfg(tmp_path, [*overrides, "model.name=wrn_16_1"])
    run(cfg)
    smoke = json.loads((tmp_path / "run" / SMOKE_METRICS_FILE).read_text())
    assert "NOT_A_RESULT" in smoke and "test/acc" in smoke["metrics"]
    assert not (tmp_path / "run" / METRICS_FILE).exists()
    assert not list((tmp_path / "teachers").glob("*.pth")), "smoke runs must not export weights"
    if "best_test_epoch" in cfg.callbacks:
        best = tmp_path / "run" / "best_test_epoch.NOT_A_RESULT.json"
        assert json.loads(best.read_text())["NOT_A_RESULT"]


def test_cli_cifar100_kd_smoke_command(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "+experiment=cifar100_kd",
            "data.synthetic=true",
            "trainer.fast_dev_run=true",
            f"paths.root_dir={tmp_path}",
            "~callbacks.progress_bar",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "logs" / "cifar100_kd" / "runs").iterdir()
    assert (run_dir / SMOKE_METRICS_FILE).exists() and (run_dir / "config.yaml").exists()


def fmnist_kd_overrides(tmp_path: Path, epochs: int = 3) -> list[str]:
    teacher = save_random_teacher(tmp_path / "teacher.pth")
    return [
        "+experiment=fmnist_kd",
        f"teacher.checkpoint={teacher}",
        "loss.use_class_prior=true",
        "loss.temperature2=4.0",
        "task.warmup_epochs=2",
        "data.train_subset=1000",
        "data.val_size=500",
        "data.test_size=500",
        "data.batch_size=50",
        f"trainer.max_epochs={epochs}",
        "callbacks.mid_epoch_checkpoint.every_n_train_steps=25",
    ]


@pytest.mark.needs_fmnist
def test_resume_after_a_crash_mid_epoch_is_exact(compose_cfg, tmp_path):
    # mode=min makes an early epoch the "best": last.ckpt must still be the final epoch.
    overrides = [*fmnist_kd_overrides(tmp_path), "callbacks.model_checkpoint.mode=min"]
    reference = run(compose_cfg(tmp_path / "a", overrides))
    final = torch.load(tmp_path / "a/run/checkpoints/last.ckpt", weights_only=True)
    assert (final["epoch"], final["global_step"]) == (2, 60)

    # The run dies at step 33 (epoch 2 of 3, 20 batches an epoch); its newest checkpoint is
    # the mid-epoch one written at step 25.
    run(compose_cfg(tmp_path / "b", [*overrides, "trainer.max_steps=33", "test=false"]))
    checkpoint = tmp_path / "b" / "run" / "checkpoints" / "last-step.ckpt"
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    assert state["global_step"] == 25 and state["epoch"] == 1
    assert not any(k.startswith("teacher.") for k in state["state_dict"])
    assert state["state_dict"]["class_prior.epochs_completed"].item() == 1

    resumed = run(compose_cfg(tmp_path / "b", [*overrides, f"ckpt_path={checkpoint}"]))
    assert resumed["test/acc"] == reference["test/acc"]
    assert resumed["test/loss"] == reference["test/loss"]
    assert resumed["val/acc"] == reference["val/acc"]
    resumed_final = torch.load(tmp_path / "b/run/checkpoints/last.ckpt", weights_only=True)
    for key, value in final["state_dict"].items():
        assert torch.equal(resumed_final["state_dict"][key], value), key


@pytest.mark.needs_fmnist
def test_distillation_keeps_teacher_frozen_and_updates_class_prior(compose_cfg, tmp_path):
    cfg = compose_cfg(tmp_path, [*fmnist_kd_overrides(tmp_path, epochs=1), "test=false"])
    teacher = build_teacher(cfg)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    task = build_task(cfg, instantiate(cfg.model), teacher, instantiate(cfg.loss), 10)
    dm = build_datamodule(cfg.data)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    trainer.fit(task, datamodule=dm)
    assert not task.teacher.training and task.model.training
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())
    for key, value in task.teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher {key} changed"
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in task.teacher.parameters()}
    prior = task.class_prior
    assert prior.epochs_completed.item() == 1
    assert not torch.allclose(prior.prior, torch.full_like(prior.prior, 0.1))
    torch.testing.assert_close(prior.prior.sum(1), torch.ones(10, dtype=torch.float64))


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "train.py",
            *args,
            f"paths.root_dir={tmp_path}",
            "~callbacks.progress_bar",
            "data.synthetic=true",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_multirun_with_two_values_launches_two_runs(tmp_path):
    result = cli(
        tmp_path,
        "-m",
        "+experiment=fmnist_kd",
        "trainer.fast_dev_run=true",
        "loss.beta=1,4",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("*/" + SMOKE_METRICS_FILE))
    assert len(runs) == 2
    betas = sorted(
        float(line.split(":")[1])
        for run_file in runs
        for line in (run_file.parent / "config.yaml").read_text().splitlines()
        if line.startswith("  beta:")
    )
    assert betas == [1.0, 4.0]


README_OPTUNA = "python train.py -m +experiment=fmnist_kd hparams_search=fmnist_gkl_optuna"


def test_readme_optuna_command_runs_from_another_directory_and_resumes_its_study(tmp_path):
    """The README's command as written (small overrides appended), started in a directory that is
    not the repository, twice: the second invocation continues the sqlite study."""
    optuna = pytest.importorskip("optuna")
    assert README_OPTUNA in (ROOT / "README.md").read_text()
    command = README_OPTUNA.split()[2:]  # after "python train.py"
    small = [
        "data.synthetic=true",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=2",
        "test=false",
        "hydra.sweeper.n_trials=2",
    ]
    env = {k: v for k, v in os.environ.items() if k != "GKL_ROOT"} | {"OMP_NUM_THREADS": "1"}
    storage = f"sqlite:///{tmp_path / 'logs' / 'optuna_fmnist_gkl.db'}"
    for expected_trials in (2, 4):
        result = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *command, *small],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        study = optuna.load_study(study_name="fmnist_gkl", storage=storage)
        assert len(study.trials) == expected_trials
        assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert len(list((tmp_path / "logs" / "fmnist_kd" / "multiruns").iterdir())) == 2


# ----------------------------------------------------------------------------- bad input


def test_unknown_config_option_lists_valid_choices(compose_cfg, tmp_path):
    with pytest.raises(Exception, match=r"(?s)data/cifar1000.*Available options.*cifar100"):
        compose_cfg(tmp_path, ["data=cifar1000"])


def test_unknown_model_name_lists_valid_names(compose_cfg, tmp_path):
    cfg = compose_cfg(tmp_path, ["model.name=resnet9x4", "data.synthetic=true"])
    with pytest.raises(Exception, match=r"Unknown model 'resnet9x4'.*Did you mean.*resnet8x4"):
        run(cfg)


def test_teacher_student_class_mismatch_fails_before_training(compose_cfg, tmp_path):
    teacher = save_random_teacher(tmp_path / "t.pth", num_classes=5)
    cfg = compose_cfg(
        tmp_path,
        [
            "+experiment=fmnist_kd",
            "data.synthetic=true",
            f"teacher.checkpoint={teacher}",
            "teacher.num_classes=5",
        ],
    )
    with pytest.raises(ValueError, match="teacher predicts 5 classes, student predicts 10"):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_teacher_checkpoint_of_another_architecture_names_both(compose_cfg, tmp_path):
    wrong = save_random_teacher(tmp_path / "t.pth", name="fmnist_mlp")
    cfg = compose_cfg(tmp_path, ["+experiment=fmnist_kd", f"teacher.checkpoint={wrong}"])
    with pytest.raises(Exception, match=r"(?s)fmnist_cnn.*fmnist_mlp"):
        run(cfg)


def test_missing_teacher_checkpoint_says_how_to_get_one(compose_cfg, tmp_path):
    cfg = compose_cfg(tmp_path, ["+experiment=fmnist_kd"])
    with pytest.raises(Exception, match=r"fmnist_cnn.pth.*\+experiment=fmnist_teacher"):
        run(cfg)


def test_missing_data_set_names_path_and_fix(compose_cfg, tmp_path):
    cfg = compose_cfg(tmp_path, [f"paths.fmnist_dir={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match=r"nowhere.*(apt-get install|data.download=true)"):
        run(cfg)


def test_timm_student_and_timm_teacher_compose_and_run(compose_cfg, tmp_path):
    cfg = compose_cfg(
        tmp_path,
        [
            "+experiment=cifar100_kd",
            "model=timm",
            "model.name=resnet18",
            "model.pretrained=false",
            "teacher=timm",
            "teacher.name=resnet18",
            "data=cifar10",
            "data.synthetic=true",
            "trainer.fast_dev_run=true",
        ],
    )
    metrics = run(cfg)
    assert "test/acc" in metrics


@pytest.mark.needs_fmnist
def test_cached_teacher_outputs_train_as_the_teacher_run_every_step(compose_cfg, tmp_path):
    """``task.cache_teacher_outputs``: the data module serves the teacher's logits of each
    training image (computed once, in other batches) and the student trains as with the
    teacher run at every step."""
    overrides = [*fmnist_kd_overrides(tmp_path, epochs=1), "test=false"]
    states = {}
    for cache in (True, False):
        cfg = compose_cfg(
            tmp_path / str(cache), [*overrides, f"task.cache_teacher_outputs={cache}"]
        )
        torch.manual_seed(0)  # the same student initialisation
        task = build_task(
            cfg, instantiate(cfg.model), build_teacher(cfg), instantiate(cfg.loss), 10
        )
        dm = build_datamodule(cfg.data)
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        trainer.fit(task, datamodule=dm)
        states[cache] = task.model.state_dict()
        if cache:
            items = dm.train_set.__getitems__(list(range(100)))
            x, logits = torch.stack([i[0] for i in items]), torch.stack([i[2] for i in items])
            torch.testing.assert_close(logits, task.teacher(x), rtol=0, atol=1e-5)
    for key, value in states[True].items():
        torch.testing.assert_close(value, states[False][key], rtol=0, atol=1e-5, msg=key)


def test_console_filter_keeps_gkl_lines_and_drops_library_chatter():
    import logging

    from gkl.tasks.progress import GKL_DIR, _LibraryChatter

    def record(name: str, level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, message, None, None)

    shown = _LibraryChatter().filter
    assert shown(record("py.warnings", logging.WARNING, f"{GKL_DIR}/data/base.py:1: UserWarning"))
    assert not shown(record("py.warnings", logging.WARNING, "/x/site-packages/lightning/a.py:1: W"))
    assert not shown(record("lightning.pytorch.utilities.rank_zero", logging.INFO, "Tip"))
    assert shown(record("lightning.pytorch", logging.WARNING, "a real warning"))
    assert shown(record("gkl.train", logging.INFO, "wrote metrics.json"))
