"""Adapters of the measuring core (:mod:`lit_qlearn.monitoring`) to other RL libraries.

Each integration imports its library inside its own module only (``lit_qlearn.integrations.sb3``
needs ``pip install lit-qlearn[sb3]``), so ``import lit_qlearn`` never does.
"""
