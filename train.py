"""Train with a Hydra-composed config, e.g. ``python train.py +experiment=cifar100_kd``."""

from gkl.cli import main

if __name__ == "__main__":
    main()
