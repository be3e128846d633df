"""lit_qlearn: Q-learning LightningModules and callbacks that measure, predict and
prevent Q-value divergence."""

__version__ = "0.1.0"
