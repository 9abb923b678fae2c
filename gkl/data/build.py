"""Build a data module from its Hydra config (``conf/data/*.yaml``)."""

from __future__ import annotations

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

# Keys of the data config that describe the data set for interpolation (model.num_classes:
# ${data.num_classes}, model.mean: ${data.mean}) rather than arguments of the DataModule. The
# config owns mean/std (the model normalises with them); num_classes is also the data module's.
DATA_META_KEYS = ("num_classes", "mean", "std", "input_shape")


def build_datamodule(data_cfg: DictConfig) -> pl.LightningDataModule:
    """Instantiate the DataModule from ``data_cfg`` without its descriptive keys; a declared
    ``num_classes`` that disagrees with the data module's is an error."""
    args = {k: v for k, v in data_cfg.items() if k not in DATA_META_KEYS}
    datamodule = instantiate(OmegaConf.create(args))
    declared, actual = data_cfg.get("num_classes"), getattr(datamodule, "num_classes", None)
    if declared is not None and actual is not None and declared != actual:
        raise ValueError(
            f"data.num_classes={declared} in the config disagrees with the data module's {actual}"
        )
    return datamodule
