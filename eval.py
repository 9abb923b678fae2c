"""Evaluate robustness: ``python eval.py ckpt_path=<file> data=cifar10 model.name=wrn_34_10``."""

from gkl.evaluate.run import main

if __name__ == "__main__":
    main()
