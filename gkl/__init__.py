"""gkl: Generalized Kullback-Leibler divergence loss for distillation and adversarial robustness."""

__version__ = "0.1.0"
