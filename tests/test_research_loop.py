"""The daily research loop: progress in logs, resumed histories, run tables, plots, loggers,
debug configs, early refusals (issue 21)."""

from __future__ import annotations

import csv
import json
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from gkl.cli import check_early_stopping, check_search_metric
from gkl.config import CONFIG_DIR
from gkl.losses import GKLLoss
from gkl.plots import draw_runs, plot_runs
from gkl.runs import epoch_history, find_runs, runs_table
from gkl.tasks.checkpointing import CONFIG_KEY, check_resume_config
from gkl.tasks.progress import EpochLines, epoch_line, progress_bar
from gkl.train import build_task, run

ROOT = Path(CONFIG_DIR).parent
pytestmark = pytest.mark.usefixtures("one_thread")
CSV = Path("csv") / "metrics.csv"
CONFIG = "config.yaml"
OPTUNA = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
# A 3-epoch CE student on 256 synthetic images (8 batches of 32 an epoch).
TINY = [
    "+experiment=fmnist_kd",
    "+baseline=ce",
    "data.synthetic=true",
    "++data.synthetic_sizes=[256,64,64]",
    "data.batch_size=32",
    "trainer.max_epochs=3",
]


def train_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python train.py <args>`` with stdout a pipe (not a terminal), as on a cluster."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            "OMP_NUM_THREADS": "1",
            "PATH": "/usr/bin:/bin",
            "HOME": str(cwd),
            "PYTHONPATH": str(cwd),
        },
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


# ----------------------------------------------------------------- progress, resume, history


def test_epoch_line_formats_metrics_elapsed_and_eta():
    line = epoch_line(2, 5, {"train/loss": 0.41234, "val/acc": 0.8412}, 20.4, 10.0)
    assert line == (
        "epoch 2/5 | train/loss 0.4123 | val/acc 84.12% | elapsed 0:00:20 | ETA 0:00:30"
    )
    assert epoch_line(1, -1, {}, 3.0, None).endswith("ETA ?")


def test_progress_bar_is_rich_on_a_terminal_and_lines_elsewhere(tmp_path):
    with open(tmp_path / "out.txt", "w") as file:
        assert isinstance(progress_bar(stream=file), EpochLines)

    class Terminal:
        def isatty(self) -> bool:
            return True

    assert type(progress_bar(stream=Terminal())).__name__ == "MetricsProgressBar"


KILLER = """
import os, signal
import lightning.pytorch as pl

class KillAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_run_resumed_in_its_directory_prints_lines_and_keeps_one_history(tmp_path):
    """A run killed (SIGKILL) at step 19, in epoch 3 after the epoch-2 checkpoint (8 steps an
    epoch), resumed from last.ckpt in its directory: stdout (a pipe) has one line per epoch and
    the resume line; csv/metrics.csv holds epochs 1-3 once; the plot draws them."""
    run_dir = tmp_path / "run"
    (tmp_path / "killer.py").write_text(KILLER)
    common = [
        *TINY,
        f"hydra.run.dir={run_dir}",
        "trainer.log_every_n_steps=1",
        "+logger.csv.flush_logs_every_n_steps=1",
    ]
    killer = ["+callbacks.killer._target_=killer.KillAt", "+callbacks.killer.step=19"]
    first = train_cli(tmp_path, *common, *killer)
    assert first.returncode == -9, first.stderr[-3000:]
    lines = [x for x in first.stdout.splitlines() if x.startswith("epoch ")]
    assert [x.split(" | ")[0] for x in lines] == ["epoch 1/3", "epoch 2/3"]
    assert all("train/loss" in x and "val/acc" in x and "ETA" in x for x in lines)
    killed_steps = [int(r["step"]) for r in read_csv(run_dir / CSV)]
    assert max(killed_steps) >= 16  # rows logged after the epoch-2 checkpoint (step 16)

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    second = train_cli(tmp_path, *common, f"ckpt_path={ckpt}")
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout.splitlines()
    assert out[0].startswith(f"Restoring states from checkpoint {ckpt}: 2 epoch(s)")
    assert [x.split(" | ")[0] for x in out if x.startswith("epoch ")] == ["epoch 3/3"]

    rows = read_csv(run_dir / CSV)
    val_epochs = [int(r["epoch"]) for r in rows if r.get("val/acc")]
    assert val_epochs == [0, 1, 2]
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps)  # no rows of the killed epoch 3 left before the resumed ones
    history = epoch_history(run_dir)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all("val/acc" in h and "train/loss" in h for h in history)
    figure = draw_runs([run_dir])
    val_line = [x for x in figure.axes[0].lines if x.get_label().endswith("val/acc")][0]
    assert list(val_line.get_xdata()) == [1, 2, 3]
    metrics = json.loads((run_dir / "metrics.smoke.json").read_text())
    assert metrics["epochs_completed"] == 3


def test_history_joins_a_run_resumed_into_another_directory(tmp_path):
    def write(run_dir: Path, rows: list[dict], ckpt_path: str | None) -> None:
        (run_dir / "csv").mkdir(parents=True)
        (run_dir / CONFIG).write_text(yaml.safe_dump({"ckpt_path": ckpt_path, "seed": 0}))
        with open(run_dir / CSV, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["epoch", "step", "val/acc"])
            writer.writeheader()
            writer.writerows(rows)

    first, second = tmp_path / "a", tmp_path / "b"
    # a: epochs 0-2 logged, killed during epoch 2 after its checkpoint at step 20
    write(first, [{"epoch": e, "step": 10 * e + 9, "val/acc": e / 10} for e in range(3)], None)
    resumed = [{"epoch": e, "step": 10 * e + 9, "val/acc": e / 10 + 0.5} for e in (2, 3)]
    write(second, resumed, str(first / "checkpoints" / "last.ckpt"))
    history = epoch_history(second)
    assert [(h["epoch"], h["val/acc"]) for h in history] == [(1, 0.0), (2, 0.1), (3, 0.7), (4, 0.8)]


# ----------------------------------------------------------------------------- runs table


def fake_run(root: Path, name: str, config: dict, acc: float) -> Path:
    run_dir = root / name
    (run_dir / "csv").mkdir(parents=True)
    (run_dir / CONFIG).write_text(yaml.safe_dump(config))
    record = {"metrics": {"test/acc": acc}, "seed": config["seed"]}
    (run_dir / "metrics.json").write_text(json.dumps(record))
    return run_dir


def sweep_config(beta: float, seed: int, root: Path) -> dict:
    return {
        "task_name": "fmnist_kd",
        "seed": seed,
        "data": {"seed": seed, "train_subset": 2000, "num_workers": 0},
        "loss": {"_target_": "gkl.losses.GKLLoss", "beta": beta, "gamma": 0.2},
        "paths": {"output_dir": str(root / f"{beta}-{seed}")},
        "trainer": {"max_epochs": 2, "default_root_dir": str(root / f"{beta}-{seed}")},
        "callbacks": {"model_checkpoint": {"dirpath": str(root / f"{beta}-{seed}")}},
    }


def test_runs_table_groups_by_config_minus_seed_and_paths(tmp_path):
    accs = {(4.0, 0): 0.70, (4.0, 1): 0.72, (16.0, 0): 0.76, (16.0, 1): 0.79}
    for (beta, seed), acc in accs.items():
        fake_run(tmp_path, f"{beta}-{seed}", sweep_config(beta, seed, tmp_path), acc)
    (tmp_path / "smoke").mkdir()  # a smoke test is never a row
    (tmp_path / "smoke" / CONFIG).write_text(yaml.safe_dump(sweep_config(8.0, 0, tmp_path)))
    (tmp_path / "smoke" / "metrics.smoke.json").write_text('{"metrics": {"test/acc": 0.1}}')

    table = runs_table(find_runs([tmp_path])).splitlines()
    assert table[0] == "| task_name | loss.beta | test/acc | n | seeds |"
    for beta, row in zip((4.0, 16.0), table[2:], strict=True):
        values = [100 * accs[beta, s] for s in (0, 1)]
        mean, std = statistics.mean(values), statistics.stdev(values)
        assert row == f"| fmnist_kd | {beta:g} | {mean:.2f} ± {std:.2f} | 2 | 0,1 |"
    assert len(table) == 4


def test_runs_table_and_paper_table_refuse_a_missing_directory(tmp_path):
    for script in ("runs_table.py", "paper_table.py"):
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / script), str(tmp_path / "nonexistent")],
            capture_output=True,
            text=True,
        )
        assert result.returncode != 0 and "nonexistent: no such directory" in result.stderr


# -------------------------------------------------------------------------------- plots


def test_plot_colours_runs_dashes_training_and_labels_swept_values(tmp_path):
    dirs = []
    for beta, epochs in ((4.0, 3), (16.0, 1)):  # a 1-epoch run is drawn too
        run_dir = fake_run(tmp_path, f"b{beta}", sweep_config(beta, 0, tmp_path), 0.7)
        with open(run_dir / CSV, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["epoch", "step", "train/acc", "val/acc"])
            writer.writeheader()
            for e in range(epochs):
                writer.writerow({"epoch": e, "step": e, "val/acc": 0.5 + e / 10})
                writer.writerow({"epoch": e, "step": e, "train/acc": 0.6 + e / 10})
        dirs.append(run_dir)
    figure = draw_runs(dirs)
    lines = {x.get_label(): x for x in figure.axes[0].lines}
    assert set(lines) == {
        "loss.beta=4.0: train/acc",
        "loss.beta=4.0: val/acc",
        "loss.beta=16.0: train/acc",
        "loss.beta=16.0: val/acc",
    }
    four_val, four_train = lines["loss.beta=4.0: val/acc"], lines["loss.beta=4.0: train/acc"]
    assert four_val.get_color() == four_train.get_color()
    assert four_val.get_color() != lines["loss.beta=16.0: val/acc"].get_color()
    assert four_val.get_linestyle() == "-" and four_train.get_linestyle() == "--"
    assert list(four_val.get_ydata()) == pytest.approx([50.0, 60.0, 70.0])  # percent
    single = lines["loss.beta=16.0: val/acc"]
    assert len(single.get_xdata()) == 1 and single.get_marker() not in (None, "None", "")

    out = plot_runs(dirs, tmp_path / "figures")  # a directory: runs.png inside it
    assert out == tmp_path / "figures" / "runs.png" and out.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------ loggers


def wandb_history(run_file: Path) -> list[dict]:
    """History records of a W&B ``.wandb`` file: a 7-byte header (``:W&B``, magic, version),
    then LevelDB-log records (crc32c, length, type; 32 KiB blocks) holding ``Record`` protos."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, chunks, out = run_file.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunks += chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                out.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
    return out


@pytest.mark.parametrize("logger", ["tensorboard", "wandb", "mlflow"])
def test_logger_writes_records_that_read_back(compose_cfg, tmp_path, logger):
    pytest.importorskip(
        {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}[logger]
    )
    cfg = compose_cfg(tmp_path, [*TINY, "trainer.max_epochs=2", f"logger={logger}", "test=false"])
    run(cfg)
    expected = [h["val/acc"] for h in epoch_history(tmp_path / "run")]  # the CSV log
    assert len(expected) == 2
    if logger == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
        events.Reload()
        found = [e.value for e in events.Scalars("val/acc")]
    elif logger == "wandb":
        (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
        found = [h["val/acc"] for h in wandb_history(run_file) if "val/acc" in h]
    else:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'logs' / 'mlflow.db'}")
        (mlflow_run,) = client.search_runs(
            [client.get_experiment_by_name("fmnist_kd_ce").experiment_id]
        )
        history = client.get_metric_history(mlflow_run.info.run_id, "val/acc")
        found = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert found == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------ configs, refusals, resume messages


def test_config_error_comes_before_lightning_is_imported(tmp_path):
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['train.py', '+experiment=fmnist_kd', 'trainer.max_epochs=abc',"
        f" 'paths.root_dir={tmp_path}']\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n"
        "except BaseException as error:\n"
        "    print('stopped by', type(error).__name__, error)\n"
        "print('lightning imported:', 'lightning' in sys.modules, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "trainer.max_epochs='abc' must be an integer" in result.stdout + result.stderr
    assert "stopped by" in result.stdout
    assert "lightning imported: False False" in result.stdout


def test_search_on_a_test_set_metric_is_refused_with_the_fix(compose_cfg, tmp_path):
    cfg = compose_cfg(tmp_path, ["+experiment=cifar100_kd"])
    assert cfg.data.val_size == 0  # the CIFAR KD recipes validate on the test set
    with pytest.raises(ValueError, match=r"test set.*data\.val_size=5000"):
        check_search_metric(cfg, OPTUNA)
    check_search_metric(
        compose_cfg(tmp_path, ["+experiment=cifar100_kd", "data.val_size=5000"]), OPTUNA
    )
    check_search_metric(cfg, None)  # a single run selects nothing
    with pytest.raises(ValueError, match="test-set metric"):
        check_search_metric(compose_cfg(tmp_path, ["optimized_metric=test/acc"]), OPTUNA)


def test_readme_optuna_command_refuses_validation_on_the_test_set(tmp_path):
    result = train_cli(
        tmp_path,
        "-m",
        "+experiment=fmnist_kd",
        "hparams_search=fmnist_gkl_optuna",
        "data.val_size=0",
        "hydra.sweeper.n_trials=1",
    )
    assert result.returncode != 0
    assert "hyper-parameter search refused" in result.stderr
    assert "data.val_size=5000" in result.stderr


def test_early_stopping_config_and_its_refusal_on_the_test_set(compose_cfg, tmp_path):
    cfg = compose_cfg(tmp_path, ["callbacks=early_stopping"])
    assert cfg.callbacks.early_stopping.monitor == "val/acc" and "last_checkpoint" in cfg.callbacks
    check_early_stopping(cfg)
    with pytest.raises(ValueError, match=r"test set.*data\.val_size=5000"):
        check_early_stopping(compose_cfg(tmp_path, ["callbacks=early_stopping", "data.val_size=0"]))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fdr", {"fast_dev_run": True}),
        ("overfit", {"overfit_batches": 3, "max_epochs": 20}),
        ("limit", {"limit_train_batches": 0.01, "max_epochs": 3}),
        ("profiler", {"max_epochs": 1}),
    ],
)
def test_debug_configs_win_over_the_experiment(compose_cfg, tmp_path, name, expected):
    cfg = compose_cfg(tmp_path, ["+experiment=fmnist_kd", f"+debug={name}"])
    assert {k: cfg.trainer[k] for k in expected} == expected
    assert cfg.task_name == "debug" and cfg.trainer.accelerator == "cpu"


def test_debug_fdr_runs_and_is_marked_smoke(compose_cfg, tmp_path):
    cfg = compose_cfg(tmp_path, [*TINY, "+debug=fdr"])
    run(cfg)
    assert "NOT_A_RESULT" in json.loads((tmp_path / "run" / "metrics.smoke.json").read_text())


@pytest.mark.parametrize("experiment", ["fmnist_kd", "cifar100_kd"])
def test_baseline_ce_is_a_plain_classifier_in_one_override(compose_cfg, tmp_path, experiment):
    cfg = compose_cfg(
        tmp_path, [f"+experiment={experiment}", "+baseline=ce", "data.synthetic=true"]
    )
    assert cfg.loss._target_ == "gkl.losses.CrossEntropyLoss" and "_target_" not in cfg.teacher
    from hydra.utils import instantiate

    task = build_task(cfg, instantiate(cfg.model), None, instantiate(cfg.loss), 10)
    assert type(task).__name__ == "ClassificationTask"
    assert cfg.task_name == f"{experiment}_ce"


def test_longer_training_is_reported_as_a_schedule_change_not_an_optimizer(compose_cfg, tmp_path):
    def config(epochs: int) -> dict:
        cfg = compose_cfg(tmp_path, ["+experiment=fmnist_kd", f"trainer.max_epochs={epochs}"])
        return OmegaConf.to_container(cfg, resolve=True)

    with pytest.raises(ValueError) as error:
        check_resume_config({CONFIG_KEY: config(4)}, config(6), "last.ckpt")
    message = str(error.value)
    assert "optim.scheduler.max_epochs: 4 -> 6" in message
    assert "trainer.max_epochs 4 -> 6 also changes the learning-rate schedule" in message
    assert "different optimizer" not in message


def test_gkl_loss_without_class_prior_refuses_prior_rows():
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.arange(4)
    rows = torch.full((4, 5), 0.2)
    with pytest.raises(ValueError, match=r"use_class_prior=False\) was given class_prior"):
        GKLLoss(use_class_prior=False)(s, t, y, class_prior=rows)
    assert torch.isfinite(GKLLoss(use_class_prior=True)(s, t, y, class_prior=rows))
