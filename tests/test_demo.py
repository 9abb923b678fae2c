"""scripts/demo_fmnist.py's plumbing on a tiny Fashion-MNIST subset, and build_task's checks."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.utils import instantiate

from gkl.config import compose_config
from gkl.tasks.progress import run_summary
from gkl.train import CONFIG_DIR, build_task

ROOT = Path(CONFIG_DIR).parent
DEMO = ROOT / "scripts" / "demo_fmnist.py"
# A teacher and students small enough for seconds: the same code paths as the real demo.
TINY_TEACHER = ["data.train_subset=500", "data.val_size=200", "data.test_size=200"]
TINY_TEACHER += ["trainer.max_epochs=1"]
STUDENT_EPOCHS = 20
TINY_STUDENT = ["model=fmnist_mlp", "data.train_subset=256", "data.val_size=200"]
TINY_STUDENT += ["data.test_size=200", f"trainer.max_epochs={STUDENT_EPOCHS}"]


def load_demo():
    spec = importlib.util.spec_from_file_location("demo_fmnist", DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_fmnist"] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def test_single_seed_prints_a_dash_for_the_spread_and_several_seeds_the_sample_std():
    demo = load_demo()
    single = demo.format_table({"ce": [86.5], "kd": [88.25]}, [0])
    assert "| ce | 86.50 | - | 86.50 |" in single and "| kd | 88.25 | - | 88.25 |" in single
    assert "nan" not in single
    accs = [86.0, 87.0, 89.0]
    mean = sum(accs) / 3
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / 2)  # sample std, n - 1
    table = demo.format_table({"gkl": accs}, [0, 1, 2])
    assert f"| gkl | {mean:.2f} | {std:.2f} | 86.00 / 87.00 / 89.00 |" in table


def test_run_summary_names_accuracy_run_dir_and_metrics_file(tmp_path):
    line = run_summary(tmp_path, {"val/acc": 0.5, "test/acc": 0.8765}, tmp_path / "metrics.json")
    assert "test/acc 87.65%" in line and "val/acc" not in line
    assert str(tmp_path) in line and str(tmp_path / "metrics.json") in line


def _pieces(tmp_path: Path, overrides: list[str]):
    cfg = compose_config(
        "train.yaml",
        [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", *overrides],
    )
    loss = instantiate(cfg.loss) if cfg.get("loss") else None
    return cfg, instantiate(cfg.model), loss


def test_build_task_refuses_a_loss_that_task_classify_would_ignore(tmp_path):
    cfg, model, loss = _pieces(tmp_path, ["task=classify", "teacher=none", "loss=gkl"])
    with pytest.raises(ValueError, match=r"loss gkl\.losses\.GKLLoss .*ClassificationTask"):
        build_task(cfg, model, None, loss, 10)
    cfg, model, loss = _pieces(tmp_path, ["task=classify", "teacher=none", "loss=ce"])
    assert type(build_task(cfg, model, None, loss, 10)).__name__ == "ClassificationTask"


def test_build_task_refuses_task_options_the_task_does_not_take(tmp_path):
    # fmnist_kd sets task.cache_teacher_outputs for task=distill; task=classify has no such option.
    overrides = ["+experiment=fmnist_kd", "task=classify", "teacher=none", "loss=ce"]
    cfg, model, loss = _pieces(tmp_path, overrides)
    with pytest.raises(ValueError, match=r"task\.cache_teacher_outputs.*~task\.cache_teacher"):
        build_task(cfg, model, None, loss, 10)


def test_demo_ce_arm_is_explicit_and_composes_to_a_plain_classifier(tmp_path):
    demo = load_demo()
    overrides = ["+experiment=fmnist_kd", *demo.METHODS["ce"]]
    cfg, model, loss = _pieces(tmp_path, overrides)
    assert "_target_" not in cfg.teacher and cfg.loss._target_ == "gkl.losses.CrossEntropyLoss"
    assert type(build_task(cfg, model, None, loss, 10)).__name__ == "ClassificationTask"


def _demo_command(out: Path) -> list[str]:
    return [
        sys.executable,
        str(DEMO),
        "--out",
        str(out),
        "--jobs",
        "1",
        "--methods",
        "ce",
        "kd",
        "--teacher-overrides",
        *TINY_TEACHER,
        "--",
        *TINY_STUDENT,
    ]


@pytest.mark.needs_fmnist
def test_interrupted_demo_reuses_finished_runs_resumes_the_cut_one_and_draws_the_png(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    demo = subprocess.Popen(
        _demo_command(out),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    kd_dir = out / "kd" / "seed0"
    deadline = time.monotonic() + 600
    try:
        while not (kd_dir / "checkpoints" / "last.ckpt").is_file():  # kd is past its 1st epoch
            assert demo.poll() is None, "the demo ended before the kd run could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        os.killpg(demo.pid, signal.SIGKILL)  # the demo and its training run, as a power cut
        demo.wait()
    # Tiny subsets: train.py records these runs as smoke runs (metrics.smoke.json, NOT_A_RESULT).
    assert not (kd_dir / "metrics.smoke.json").exists(), "kd finished before the interruption"
    teacher = out / "teachers" / "fmnist_cnn.pth"
    ce_metrics = out / "ce" / "seed0" / "metrics.smoke.json"
    finished = {teacher: teacher.stat().st_mtime_ns, ce_metrics: ce_metrics.stat().st_mtime_ns}
    cut_at = json.loads((kd_dir / "progress.json").read_text())["epoch"]
    assert 1 <= cut_at < STUDENT_EPOCHS

    result = subprocess.run(
        _demo_command(out), cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was trained again"
    record = json.loads((kd_dir / "metrics.smoke.json").read_text())
    assert record["epochs_completed"] == STUDENT_EPOCHS
    assert "Restoring states from the checkpoint path" in (kd_dir / "train.log").read_text()
    assert "Restoring states" not in (kd_dir / "console.log").read_text()  # kept off the terminal
    history = json.loads((kd_dir / "progress.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(STUDENT_EPOCHS))  # each epoch once

    # Terminal output: the table with "-" for a single seed, the PNG, the run directories, and
    # no library warnings or tips (they are in each run's console.log).
    assert "| ce |" in result.stdout and "| kd |" in result.stdout and " - |" in result.stdout
    assert "nan" not in result.stdout
    for noise in ("Warning", "Tip", "warn("):
        assert noise not in result.stdout + result.stderr
    assert str(kd_dir) in result.stdout and "done (reused)" in result.stdout
    png = out / "demo_fmnist_val_acc.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in result.stdout
