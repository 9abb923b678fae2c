"""The project's Hydra configs (``conf/``), composed from Python as the command line would."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def sqlite_url(path: str) -> str:
    """``sqlite:///<absolute path>`` for ``path`` (relative: to the current directory), its
    directory created. Registered as the ``${gkl.sqlite:<path>}`` resolver: a sweeper's storage
    is resolved before Hydra sets ``${hydra:...}``, so it cannot use ``paths.*``."""
    file = Path(path).expanduser().absolute()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


def launch_dir() -> str:
    """The directory ``train.py`` was started in: Hydra's ``runtime.cwd`` once a job runs, else
    the current directory. Registered as ``${gkl.cwd:}`` for ``paths.root_dir``: sweep
    directories and a sweeper's storage are resolved before Hydra sets ``${hydra:...}``."""
    if HydraConfig.initialized():
        return HydraConfig.get().runtime.cwd
    return os.getcwd()


OmegaConf.register_new_resolver("gkl.sqlite", sqlite_url, replace=True)
OmegaConf.register_new_resolver("gkl.cwd", launch_dir, replace=True)


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
