"""Train with a Hydra-composed config, e.g. ``python train.py +experiment=cifar100_kd``."""

from gkl.train import main

if __name__ == "__main__":
    main()
