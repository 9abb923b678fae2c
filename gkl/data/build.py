"""Build a data module from its Hydra config (``conf/data/*.yaml``)."""

from __future__ import annotations

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gkl.checks import check_number, check_positive_number

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
    check_image_description(data_cfg, getattr(datamodule, "input_shape", None))
    return datamodule


def check_image_description(data_cfg: DictConfig, input_shape: tuple[int, ...] | None) -> None:
    """``data.input_shape`` must be the data module's; ``data.mean`` / ``data.std`` (the model's
    normalisation) one finite value per channel, ``std > 0``."""
    declared = data_cfg.get("input_shape")
    if declared is not None and input_shape is not None and tuple(declared) != tuple(input_shape):
        raise ValueError(
            f"data.input_shape={list(declared)} disagrees with the images the data module "
            f"serves, {tuple(input_shape)}; remove the override (data.input_shape describes the "
            "data set, it does not resize it)"
        )
    channels = input_shape[0] if input_shape is not None else None
    for key, check in (("mean", check_number), ("std", check_positive_number)):
        values = data_cfg.get(key)
        if values is None:
            continue
        if channels is not None and len(values) != channels:
            raise ValueError(
                f"data.{key} has {len(values)} values but the images have {channels} "
                f"channel(s): give one per channel"
            )
        for value in values:
            check(f"data.{key}", value)
