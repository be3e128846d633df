"""Lightning callbacks that measure, predict and prevent Q-value divergence.

They depend on the probe protocol (:mod:`lit_qlearn.probe`), the NTK engine
(:mod:`lit_qlearn.ntk`), the plasticity measures (:mod:`lit_qlearn.plasticity`) and the
crash laws (:mod:`lit_qlearn.forecast`) only, never on a specific algorithm.
"""
from lit_qlearn.callbacks.crash import CrashPredictor
from lit_qlearn.callbacks.ema import EMATarget
from lit_qlearn.callbacks.healthy import HealthyCheckpoint
from lit_qlearn.callbacks.monitors import NTKGramCallback, ProbeCallback, SEEMMonitor
from lit_qlearn.callbacks.plasticity import PlasticityMonitor
from lit_qlearn.callbacks.preqn import PreQNLineSearch
from lit_qlearn.callbacks.remedies import Compose, PreQNStep, Remedy, ScaleLearningRate, ShrinkAndPerturb, SlowTargets
from lit_qlearn.callbacks.report import HealthReport

__all__ = ["Compose", "CrashPredictor", "EMATarget", "HealthReport", "HealthyCheckpoint", "NTKGramCallback",
           "PlasticityMonitor", "PreQNLineSearch", "PreQNStep", "ProbeCallback", "Remedy", "SEEMMonitor",
           "ScaleLearningRate", "ShrinkAndPerturb", "SlowTargets"]
