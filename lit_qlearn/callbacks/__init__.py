"""Lightning callbacks that measure, predict and prevent Q-value divergence.

They depend on the probe protocol (:mod:`lit_qlearn.probe`) and the NTK engine
only, never on a specific algorithm.
"""
from lit_qlearn.callbacks.ema import EMATarget

__all__ = ["EMATarget"]
