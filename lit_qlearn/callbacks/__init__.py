"""Lightning callbacks that measure, predict and prevent Q-value divergence.

They depend on the probe protocol (:mod:`lit_qlearn.probe`) and the NTK engine
(:mod:`lit_qlearn.ntk`) only, never on a specific algorithm.
"""
from lit_qlearn.callbacks.crash import CrashFit, CrashPredictor, predict_crash_step
from lit_qlearn.callbacks.ema import EMATarget
from lit_qlearn.callbacks.monitors import NTKGramCallback, ProbeCallback, SEEMMonitor
from lit_qlearn.callbacks.plasticity import PlasticityMonitor
from lit_qlearn.callbacks.preqn import PreQNLineSearch

__all__ = ["CrashFit", "CrashPredictor", "EMATarget", "NTKGramCallback", "PlasticityMonitor", "PreQNLineSearch", "ProbeCallback", "SEEMMonitor", "predict_crash_step"]
