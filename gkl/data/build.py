"""Build a data module from its Hydra config (``conf/data/*.yaml``)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

# Keys of the data config that describe the data set for interpolation (model.num_classes:
# ${data.num_classes}) rather than arguments of the DataModule.
DATA_META_KEYS = ("num_classes", "mean", "std", "input_shape")


def build_datamodule(data_cfg: DictConfig) -> pl.LightningDataModule:
    """Instantiate the DataModule from ``data_cfg`` without its descriptive keys; a declared
    ``num_classes`` / ``mean`` / ``std`` that disagrees with the data module's is an error."""
    args = {k: v for k, v in data_cfg.items() if k not in DATA_META_KEYS}
    datamodule = instantiate(OmegaConf.create(args))
    for key in ("num_classes", "mean", "std"):
        declared = data_cfg.get(key)
        actual = getattr(datamodule, key, None)
        if declared is not None and actual is not None and _as_tuple(declared) != _as_tuple(actual):
            raise ValueError(
                f"data.{key}={declared} in the config disagrees with the data module's {actual}"
            )
    return datamodule


def _as_tuple(value: Any) -> Any:
    return tuple(float(v) for v in value) if isinstance(value, list | tuple) else value
