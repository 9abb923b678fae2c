"""What a run is: its directory, resolved config, metrics and per-epoch history across resumes.

A run directory (``train.py``'s ``paths.output_dir``) holds ``config.yaml`` (the resolved config),
``metrics.json`` (last-epoch result; ``metrics.smoke.json`` for a smoke test, never a result) and
``csv/metrics.csv`` (Lightning's CSV log). A run resumed in its own directory appends to that CSV
(:class:`gkl.loggers.CSVLogger`); a run resumed into a new directory (``ckpt_path`` of another
run) starts its CSV at the resumed step, and :func:`csv_rows` joins the earlier run's rows in
front. Every reader (the runs table, ``scripts/paper_table.py``, ``scripts/plot_runs.py``) goes
through this module.

:func:`group_runs` puts runs whose resolved configs are equal outside the seed, paths and logging
(:data:`NOT_HYPERPARAMETERS`) into one group, so a cell's mean ± std is over seeds only;
:func:`runs_table` prints the groups with the config keys that differ between them as columns.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
SMOKE_METRICS_FILE = "metrics.smoke.json"
CSV_FILE = Path("csv") / "metrics.csv"
# Config keys (and subtrees) that are not hyper-parameters: the seed, where files go, logging,
# callbacks, resuming and reporting switches, data-loading workers.
NOT_HYPERPARAMETERS = (
    "seed",
    "paths",
    "logger",
    "callbacks",
    "hydra",
    "ckpt_path",
    "resume_allow_changes",
    "export_weights",
    "test",
    "optimized_metric",
    "matmul_precision",
    "trainer.default_root_dir",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "data.num_workers",
    "data.pin_memory",
    "data.download",
    "data.data_dir",
    "teacher.checkpoint",
)


@dataclass
class Run:
    """One ``train.py`` run directory."""

    path: Path
    config: dict[str, Any]
    record: dict[str, Any]
    smoke: bool = False

    @property
    def metrics(self) -> dict[str, float]:
        return self.record.get("metrics", {})

    @property
    def seed(self) -> Any:
        return self.config.get("seed", self.record.get("seed"))

    def history(self) -> list[dict[str, float]]:
        """Per-epoch metrics (:func:`epoch_history`)."""
        return epoch_history(self.path)

    def hyperparameters(self) -> dict[str, Any]:
        """The flattened config minus :data:`NOT_HYPERPARAMETERS` (and a ``<node>.seed`` equal
        to the run's seed, e.g. ``data.seed: ${seed}``)."""
        flat = flatten(self.config)
        return {
            key: value
            for key, value in flat.items()
            if not _excluded(key) and not (key.rsplit(".", 1)[-1] == "seed" and value == self.seed)
        }


@dataclass
class RunGroup:
    """Runs that differ only in the seed (and paths/logging)."""

    hyperparameters: dict[str, Any]
    runs: list[Run] = field(default_factory=list)

    def values(self, metric: str) -> list[float]:
        return [r.metrics[metric] for r in self.runs if _finite(r.metrics.get(metric))]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` for nested dicts; lists are leaves."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): tree}


def _excluded(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NOT_HYPERPARAMETERS)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def load_run(path: str | Path) -> Run:
    """The run in ``path``: ``config.yaml`` and ``metrics.json`` (else ``metrics.smoke.json``)."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a run directory: it has no {CONFIG_FILE}")
    config = yaml.safe_load(config_file.read_text()) or {}
    for name, smoke in ((METRICS_FILE, False), (SMOKE_METRICS_FILE, True)):
        if (path / name).is_file():
            return Run(path, config, json.loads((path / name).read_text()), smoke)
    return Run(path, config, {}, False)


def find_runs(roots: Iterable[str | Path], include_smoke: bool = False) -> list[Run]:
    """Every finished run (a ``config.yaml`` with a ``metrics.json`` beside it) under ``roots``;
    smoke tests (``metrics.smoke.json``) only with ``include_smoke``."""
    runs = []
    for root in map(Path, roots):
        if not root.exists():
            raise FileNotFoundError(
                f"{root}: no such directory (give directories that hold train.py runs)"
            )
        names = [METRICS_FILE, SMOKE_METRICS_FILE] if include_smoke else [METRICS_FILE]
        dirs = {p.parent for name in names for p in root.rglob(name)}
        if (root / CONFIG_FILE).is_file() and any((root / n).is_file() for n in names):
            dirs.add(root)
        for run_dir in sorted(dirs):
            if (run_dir / CONFIG_FILE).is_file():
                runs.append(load_run(run_dir))
    return runs


def _read_csv(path: Path) -> list[dict[str, float]]:
    rows = []
    with path.open(newline="") as file:
        for raw in csv.DictReader(file):
            rows.append({k: float(v) for k, v in raw.items() if v not in ("", None)})
    return rows


def _previous_run_dir(run_dir: Path) -> Path | None:
    """The run directory whose checkpoint this run resumed from, when that is another one."""
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        return None
    ckpt = (yaml.safe_load(config_file.read_text()) or {}).get("ckpt_path")
    if not ckpt:
        return None
    previous = Path(ckpt).expanduser().parent.parent  # <run>/checkpoints/<name>.ckpt
    if previous.resolve() == run_dir.resolve() or not (previous / CSV_FILE).is_file():
        return None
    return previous


def csv_rows(run_dir: str | Path, _seen: frozenset[Path] = frozenset()) -> list[dict[str, float]]:
    """The run's CSV log rows (numbers only, empty cells left out), joined across resumes: a run
    resumed from another directory's checkpoint gets that run's rows logged before its own first
    step in front."""
    run_dir = Path(run_dir)
    path = run_dir / CSV_FILE
    rows = _read_csv(path) if path.is_file() else []
    previous = _previous_run_dir(run_dir)
    if previous is not None and previous.resolve() not in _seen:
        first = min((r["step"] for r in rows if "step" in r), default=math.inf)
        earlier = csv_rows(previous, _seen | {run_dir.resolve()})
        rows = [r for r in earlier if r.get("step", math.inf) < first] + rows
    return rows


def epoch_history(run_dir: str | Path) -> list[dict[str, float]]:
    """One record per finished epoch, ``{"epoch": 1-based, "train/loss": ..., "val/acc": ...}``
    (the last value logged for each metric in that epoch; ``test/`` metrics and rows without an
    epoch, e.g. learning rates, are left out)."""
    by_epoch: dict[int, dict[str, float]] = {}
    for row in csv_rows(run_dir):
        if "epoch" not in row:
            continue
        entry = by_epoch.setdefault(int(row["epoch"]) + 1, {})
        for key, value in row.items():
            if key not in ("epoch", "step") and not key.startswith("test/"):
                entry[key] = value
    return [{"epoch": e, **m} for e, m in sorted(by_epoch.items()) if m]


def group_runs(runs: Iterable[Run]) -> list[RunGroup]:
    """Runs grouped by :meth:`Run.hyperparameters` (equal configs apart from the seed)."""
    groups: dict[str, RunGroup] = {}
    for run in runs:
        params = run.hyperparameters()
        key = json.dumps(params, sort_keys=True, default=str)
        groups.setdefault(key, RunGroup(params)).runs.append(run)
    return list(groups.values())


def differing_keys(groups: Sequence[RunGroup]) -> list[str]:
    """Config keys whose value (or presence) is not the same in every group."""
    keys = sorted({k for g in groups for k in g.hyperparameters})
    missing = object()
    return [
        key
        for key in keys
        if len({json.dumps(g.hyperparameters.get(key, missing), default=str) for g in groups}) > 1
    ]


def mean_std(values: Sequence[float], percent: bool = True) -> str:
    """``mean ± sample std`` (``-`` for one value), in % when ``percent``; '' for none."""
    if not values:
        return ""
    scale = 100.0 if percent else 1.0
    scaled = [scale * v for v in values]
    spread = f"{statistics.stdev(scaled):.2f}" if len(scaled) > 1 else "-"
    return f"{statistics.mean(scaled):.2f} ± {spread}"


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and "." in value and "/" not in value:
        return value.rsplit(".", 1)[-1] if value.count(".") > 1 else value
    return str(value)


def _order(value: Any) -> tuple[int, float, str]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def runs_table(runs: Sequence[Run], metrics: Sequence[str] = ("test/acc",)) -> str:
    """Markdown table, one row per :class:`RunGroup`: the config keys that differ between groups,
    then each metric as mean ± std over the group's seeds (accuracies in %), ``n`` and seeds."""
    if not runs:
        return "no runs found"
    groups = group_runs(runs)
    columns = differing_keys(groups)
    if "task_name" not in columns:  # names the experiment (and baseline) on every row
        columns.insert(0, "task_name")
    head = [*columns, *metrics, "n", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for group in sorted(groups, key=lambda g: [_order(g.hyperparameters.get(k)) for k in columns]):
        cells = [_show(group.hyperparameters.get(k)) for k in columns]
        for metric in metrics:
            percent = metric.rsplit("/", 1)[-1].endswith("acc")
            cells.append(mean_std(group.values(metric), percent))
        seeds = sorted(str(r.seed) for r in group.runs)
        smoke = " (smoke: NOT a result)" if any(r.smoke for r in group.runs) else ""
        cells += [str(len(group.runs)), ",".join(seeds) + smoke]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
