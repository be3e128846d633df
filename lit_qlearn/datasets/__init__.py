"""Making datasets (docs/design.md section 6), above the algorithms: rolling a policy into
a D4RL-format file (:func:`collect`), the datasets lit_qlearn makes from its shipped SAC
behaviour policies (:func:`make_dataset`, :func:`ensure_dataset`,
:func:`ensure_default_dataset`) and the training of those policies (:func:`train_policy`,
:func:`train_sac`). Reading and serving data is :mod:`lit_qlearn.data`'s job, which never
makes any: a dataset that is not on disk is an error naming the command that makes it
(``lit-qlearn datasets make NAME``)."""
from lit_qlearn.datasets.behaviour import BehaviourRun, medium_point, replay_arrays, train_sac
from lit_qlearn.datasets.collect import collect, load_policy, policy_classes
from lit_qlearn.datasets.generated import (
    DEFAULT_STEPS,
    check_request,
    check_train,
    dataset_names,
    ensure_dataset,
    ensure_default_dataset,
    make_dataset,
    shipped_actor,
    total_steps,
    train_policy,
    write_policy_file,
    write_replay,
)

__all__ = [
    "collect",
    "load_policy",
    "policy_classes",
    "make_dataset",
    "ensure_dataset",
    "ensure_default_dataset",
    "dataset_names",
    "shipped_actor",
    "check_request",
    "total_steps",
    "DEFAULT_STEPS",
    "train_policy",
    "check_train",
    "write_policy_file",
    "write_replay",
    "train_sac",
    "BehaviourRun",
    "medium_point",
    "replay_arrays",
]
