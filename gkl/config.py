"""The project's Hydra configs (``conf/``), composed from Python as the command line would."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_config(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/<config_name>`` with ``overrides``, as ``python train.py <overrides>`` (or
    ``eval.py``) composes it. The ``hydra`` node is registered as the current HydraConfig (so
    ``${hydra:...}`` interpolations such as ``paths.output_dir`` resolve) and removed from the
    returned config."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
