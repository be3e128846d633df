"""QLearningModule: the update loop and its contract (docs/design.md section 8).

An algorithm owns its networks (:meth:`~QLearningModule.build`), its losses
(:meth:`~QLearningModule.update`) and its two policies (``act``, ``explore``); the base
owns the rest of a fit: reading the data's spec, counting updates, moving targets inside
the update, stepping optimisers by name (:mod:`lit_qlearn.algorithms.optim`), logging at
the update count, RNG state in checkpoints (:mod:`lit_qlearn.algorithms.checkpointing`)
and evaluation (:mod:`lit_qlearn.evaluation`).
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lit_qlearn.algorithms.checkpointing import (explain_broken_checkpoints, quiet_checkpoint_warning,
                                                 remove_warning_filter, rng_state, set_rng_state)
from lit_qlearn.algorithms.optim import Stepper
from lit_qlearn.data.checkpoint import check_before_loading
from lit_qlearn.data.names import normalized_score
from lit_qlearn.data.rollout import make_vector_env
from lit_qlearn.data.types import DataSpec, Transitions, data_spec
from lit_qlearn.evaluation import Evaluation, evaluate_module
from lit_qlearn.probe import publish
from lit_qlearn.targets import TargetUpdate, make_target
from lit_qlearn.td import td_target

__all__ = ["QLearningModule"]

#: ``target_update`` before the constructor set it (None is a rule of its own: no targets move).
_UNSET: Any = object()


#: The modes of ``torch.compile`` an algorithm's ``compile`` argument may name
#: ("reduce-overhead" captures CUDA graphs on a GPU).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(who: str, value: bool | str | None) -> str | None:
    """An algorithm's ``compile`` argument as the ``torch.compile`` mode to use: True is
    ``"default"``, False (or None) no compilation, a string one of :data:`COMPILE_MODES`."""
    if value is True:
        return "default"
    if value is False or value is None:
        return None
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ValueError(f"{who}: compile must be True, False or a torch.compile mode in {COMPILE_MODES}, got {value!r}")


def constructor_arguments(cls: type) -> set[str]:
    """The argument names ``cls(...)`` takes: its ``__init__``'s, and its parents' as far
    as each level passes ``**kwargs`` on."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]
        names |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names


#: Hooks of earlier releases, and what replaced them: a subclass defining one is told at
#: class creation instead of having its method silently never called.
REPLACED_HOOKS = {
    "add_targets": "build_targets() (ActorCritic) or build(spec) with add_target",
    "critic_update": "critic_loss(batch, y), which returns the loss; update() steps it",
    "actor_update": "actor_step(batch) (DDPG's shape) or the actor lines of update()",
    "build_now": "nothing: the base builds once every constructor has run",
    "log_evaluation": "the lit_qlearn.evaluation.Evaluation callback (eval_every)",
    "actor_lr_at": "build_schedulers(optimizers) and scheduler(name)",
}


class _BuildsAfterInit(type):
    """Metaclass of :class:`QLearningModule`: once the most-derived ``__init__`` has
    returned, and only then, the module resolves its defaults and builds its networks
    (:meth:`QLearningModule.finish_init`). So a subclass may set its options anywhere in
    its constructor, before or after ``super().__init__()``, and has no closing call to
    remember. (Wrapping each subclass's ``__init__`` instead would put wrapper frames
    between the constructors, where ``save_hyperparameters``' walk up the stack stops.)"""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        module = super().__call__(*args, **kwargs)
        module.finish_init()
        return module

    def __init__(cls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(name, bases, namespace, **kwargs)
        for hook in REPLACED_HOOKS.keys() & namespace.keys():
            raise TypeError(f"{name}.{hook}: QLearningModule no longer calls {hook}(); use "
                            f"{REPLACED_HOOKS[hook]} (docs/design.md section 8)")

    @property
    def __signature__(cls) -> inspect.Signature:
        # inspect.signature(cls) would otherwise report __call__'s (*args, **kwargs)
        signature = inspect.signature(cls.__init__)
        return signature.replace(parameters=list(signature.parameters.values())[1:])


class QLearningModule(LightningModule, metaclass=_BuildsAfterInit):
    """Base class of lit_qlearn's algorithms.

    A subclass implements

    * :meth:`build` ``(spec)``: create its networks for the data's
      :class:`~lit_qlearn.data.DataSpec` (observation shape, action space), called
      once: after the constructor when it set :attr:`given_spec` (sizes given), else
      at :meth:`setup` from the DataModule; :attr:`action_kinds` says which kinds of
      action space it supports, checked before ``build``;
    * :meth:`build_optimizers` ``() -> {name: optimizer}``: ``"critic"``,
      ``"actor"``, and any others (temperature, Lagrange multipliers);
    * :meth:`update` ``(batch) -> |TD error| (B,) or None``: the training step,
      targets, losses and :meth:`step` calls top to bottom. The base counts the
      update first (``self.updates`` is 1 during the first), applies the target
      rule after it and hands the returned per-sample |TD error| to a prioritised
      replay buffer;
    * :meth:`act` (evaluation policy) and optionally :meth:`explore` (the
      behaviour policy an :class:`~lit_qlearn.data.OnlineDataModule` rolls).

    What the base guarantees:

    * **One build, after the constructors.** :meth:`finish_init` runs once the
      most-derived ``__init__`` returned: the default target rule
      (:meth:`default_target_update`), then :meth:`build` if the sizes were given.
    * **One step axis.** ``self.updates`` counts updates; only the counted
      optimiser's steps (``"critic"``, else the first) enter ``global_step``, so
      ``Trainer(max_steps=n)`` means n updates, and every scalar, the module's,
      the callbacks' and evaluation's, is written at ``global_step`` = updates.
    * **Targets inside the update.** Target networks made with :meth:`add_target`
      are moved by ``self.target_update`` (or an
      :class:`~lit_qlearn.callbacks.EMATarget` callback's rule) at the end of the
      update, before any callback or checkpoint sees the step.
    * **Exact resume.** Checkpoints hold the update count, the data spec (so
      ``load_from_checkpoint`` needs no DataModule), and the torch, numpy and
      Python RNG states of every rank, restored when a fit resumes.
    * **Multi-device.** Under DDP, gradients are averaged across ranks with one
      flat all-reduce per optimiser step (:mod:`lit_qlearn.algorithms.optim`); logged
      scalars are rank means.
    * **Evaluation.** With ``eval_every > 0``, an :class:`~lit_qlearn.evaluation.Evaluation`
      callback (:meth:`configure_callbacks`): ``eval_episodes`` episodes in the data's
      environment on rank zero every ``eval_every`` updates, shared with every rank:
      ``eval/return``, ``eval/length``, ``eval/normalized_score``.
    * **Compilation.** With ``compile_networks`` (an algorithm's ``compile=True``, or a
      ``torch.compile`` mode such as ``"reduce-overhead"``, which adds CUDA graphs on a
      GPU), every network's forward is compiled with ``torch.compile`` at fit start
      (:meth:`compile_all`, in place, so parameters, ``state_dict`` keys, checkpoints
      and the probe protocol are unchanged). Where compilation is unavailable, a
      warning and eager execution.
    """

    #: Kinds of action space the algorithm supports: "continuous", "discrete".
    action_kinds: tuple[str, ...] = ("continuous", "discrete")
    #: Flush denormal floats to zero while fitting on CPU (``torch.set_flush_denormal``):
    #: Adam's second moments of small gradients sink into the denormal range, where x86
    #: arithmetic is many times slower (benchmarks/README.md, offline speed).
    flush_denormal: bool = True
    #: Whether :meth:`update` applies ``batch.weight`` and returns |TD error| (prioritised replay).
    supports_weights: bool = True
    #: Updates between evaluations (0: none) and episodes per evaluation.
    eval_every: int = 0
    eval_episodes: int = 10

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.updates = 0
        #: The data's spec once built (None before).
        self.spec: DataSpec | None = None
        #: The spec given to the constructor (sizes): built by :meth:`finish_init`.
        self.given_spec: DataSpec | None = None
        #: The rule that moves the targets after each update (None: none). Unless the
        #: constructor sets it (None included), :meth:`default_target_update` gives it.
        self.target_update: TargetUpdate | None = _UNSET  # type: ignore[assignment]
        self._target_pairs: list[tuple[nn.Module, nn.Module]] = []
        self._optimizer_names: list[str] = []
        self._scheduler_names: list[str] = []
        #: How this fit's optimiser steps run (made at fit start).
        self.stepper: Stepper | None = None
        self._eval_env: Any = None
        self.env_id: str | None = None
        self.ref_scores: tuple[float, float] | None = None
        self._normalizes = False  # whether the data's spec carries a state normalisation
        #: ``torch.compile`` the networks at fit start: None, or the mode (an algorithm's
        #: ``compile`` argument, read by :func:`compile_mode`).
        self.compile_networks: str | None = None
        self._compiled = False

    # ------------------------------------------------------------ construction
    def finish_init(self) -> None:
        """Called once, after the most-derived ``__init__`` returned, every option set:
        the default target rule unless the constructor set one, then the networks if
        the constructor gave the sizes (:attr:`given_spec`) and did not build them.
        (The hyper-parameters stay Lightning's: every constructor level's arguments, which
        a subclass may read; a checkpoint keeps only those the class takes, see
        :meth:`on_save_checkpoint`.)"""
        if self.target_update is _UNSET:
            self.target_update = self.default_target_update()
        if self.given_spec is not None and self.spec is None:
            self.build_for(self.given_spec)

    def default_target_update(self) -> TargetUpdate | None:
        """The target rule when the constructor sets none (None: the module has no targets,
        or :meth:`build` sets its rule)."""
        return None

    # ------------------------------------------------------------------ the data
    def build(self, spec: DataSpec) -> None:
        """Create the networks for ``spec`` (observation shape, action space)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build(spec)")

    def check_spec(self, spec: DataSpec) -> None:
        """Raise a ValueError unless the algorithm supports the data's action space."""
        kind = "discrete" if spec.discrete else "continuous"
        if kind not in self.action_kinds:
            raise ValueError(
                f"{type(self).__name__} needs {' or '.join(self.action_kinds)} actions, "
                f"the data has {spec.describe_actions()}"
            )

    def build_for(self, spec: DataSpec) -> None:
        """Check ``spec``, then build the networks and the normalisation buffers for it."""
        self.check_spec(spec)
        self.spec = spec
        # The data's state normalisation; act() and explore() apply it to raw env states.
        shape = spec.obs_shape if len(spec.obs_shape) == 1 else ()
        self.register_buffer("obs_mean", torch.zeros(shape))
        self.register_buffer("obs_std", torch.ones(shape))
        self._normalizes = spec.obs_mean is not None
        self._target_pairs.clear()
        self.build(spec)

    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            explain_broken_checkpoints(self.trainer.strategy)
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None:
            if self.spec is None:
                raise ValueError(
                    f"{type(self).__name__}: the network sizes were not given and the Trainer has no "
                    "DataModule to read them from"
                )
            return
        spec = data_spec(dm)
        if self.spec is None:
            self.build_for(spec)
        elif spec != self.spec:
            self.check_spec(spec)
            differ = ", ".join(f"{name}={getattr(self.spec, name)!r} vs {getattr(spec, name)!r}"
                               for name in ("obs_shape", "obs_dtype", "num_actions", "action_low", "action_high")
                               if getattr(self.spec, name) != getattr(spec, name))
            raise ValueError(
                f"{type(self).__name__} was built for observations {self.spec.obs_shape} and actions "
                f"{self.spec.describe_actions()}, but {type(dm).__name__} serves observations {spec.obs_shape} "
                f"and actions {spec.describe_actions()} (module vs data: {differ})"
            )
        if getattr(dm, "weighted", False) and not self.supports_weights:
            raise ValueError(f"{type(self).__name__} does not use importance weights, but {type(dm).__name__} "
                             "serves prioritised batches (prioritized=True)")
        self.spec = spec
        if spec.obs_mean is not None and self.obs_mean.dim() == 1:
            self.obs_mean.copy_(torch.as_tensor(spec.obs_mean, dtype=torch.float32))
            self.obs_std.copy_(torch.as_tensor(spec.obs_std, dtype=torch.float32))
        self.env_id, self.ref_scores = spec.env_id, spec.ref_scores
        self._normalizes = spec.obs_mean is not None

    def normalize(self, obs: np.ndarray | Tensor) -> Tensor:
        """Raw environment states ``(..., *obs_shape)`` as the float tensor the networks see."""
        x = torch.as_tensor(np.asarray(obs) if not isinstance(obs, Tensor) else obs, device=self.device)
        if x.dtype == torch.uint8:  # images are fed as stored; the encoder scales them
            return x
        x = x.float()
        return (x - self.obs_mean) / self.obs_std if self._normalizes else x

    # ------------------------------------------------------------------ targets
    def add_target(self, online: nn.Module) -> nn.Module:
        """Create, register and return a frozen target copy of ``online``."""
        target = make_target(online)
        self._target_pairs.append((online, target))
        return target

    def target_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """The ``(online, target)`` pairs that target-update rules act on."""
        return list(self._target_pairs)

    # --------------------------------------------------------------- the update
    def next_value(self, batch: Transitions) -> Tensor:
        """The algorithm's bootstrap value ``V(s')`` ``(B,)`` (called without gradient)."""
        raise NotImplementedError(f"{type(self).__name__} must implement next_value(batch)")

    def td_target(self, batch: Transitions) -> Tensor:
        """``y = r + discount (1 - terminated) V(s')`` (:func:`lit_qlearn.td.td_target`) with
        :meth:`next_value`, shape ``(B,)``, no gradient."""
        with torch.no_grad():
            return td_target(batch, self.next_value(batch), self.gamma)

    def update(self, batch: Any) -> Tensor | None:
        """One update on ``batch``; return the per-sample |TD error| ``(B,)`` (or None)."""
        raise NotImplementedError(f"{type(self).__name__} must implement update(batch)")

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.updates += 1
        td_abs = self.update(batch)
        if self.target_update is not None and self._target_pairs:
            self.target_update.step(self._target_pairs, self.updates)
        if td_abs is not None and isinstance(batch, Transitions) and batch.index is not None:
            update_priorities = getattr(self.trainer.datamodule, "update_priorities", None)
            if update_priorities is not None:
                update_priorities(batch.index, td_abs)
        if self.logging_now():
            rollout = getattr(self.trainer.datamodule, "rollout_metrics", None)
            if rollout is not None:
                self.log_rollout(rollout())

    # ------------------------------------------------------------ optimisation
    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The algorithm's optimisers by name (``"critic"`` first when there is one)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_optimizers()")

    def build_schedulers(self, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
        """Learning-rate schedulers (``torch.optim.lr_scheduler``) by the name of the
        optimiser each drives; none by default. Optimisation is manual, so Lightning
        checkpoints and restores them but never steps them: :meth:`update` does, through
        :meth:`scheduler`."""
        return {}

    def configure_optimizers(self) -> Any:
        optimizers = self.build_optimizers()
        self._optimizer_names = list(optimizers)
        schedulers = self.build_schedulers(optimizers)
        self._scheduler_names = list(schedulers)
        if not schedulers:
            return list(optimizers.values())
        return list(optimizers.values()), list(schedulers.values())

    def scheduler(self, name: str) -> Any:
        """The learning-rate scheduler of the optimiser called ``name`` (:meth:`build_schedulers`)."""
        return self._by_name(self.lr_schedulers(), self._scheduler_names, name, "schedulers for")

    @property
    def counted_optimizer(self) -> str:
        """The optimiser whose steps ``global_step`` counts: one per update."""
        return "critic" if "critic" in self._optimizer_names else self._optimizer_names[0]

    def optimizer(self, name: str) -> Any:
        """The (Lightning-wrapped) optimiser called ``name``."""
        return self._by_name(self.optimizers(), self._optimizer_names, name, "optimisers")

    def _by_name(self, items: Any, names: list[str], name: str, what: str) -> Any:
        """``items[names.index(name)]`` of what Lightning returns (one item or a list); a
        KeyError naming the ones there are otherwise."""
        items = items if isinstance(items, list) else [items]
        try:
            return items[names.index(name)]
        except ValueError:
            raise KeyError(f"{type(self).__name__} has {what} {names}, not {name!r}") from None

    def step(self, name: str, loss: Tensor, max_grad_norm: float | None = None,
             measure_norm: bool = False) -> Tensor | None:
        """One step of the optimiser ``name`` on ``loss`` (see :meth:`optimize`)."""
        return self.optimize(self.optimizer(name), loss, count_step=name == self.counted_optimizer,
                             max_grad_norm=max_grad_norm, measure_norm=measure_norm)

    def optimize(self, optimizer: Any, loss: Tensor, count_step: bool = True,
                 max_grad_norm: float | None = None, measure_norm: bool = False) -> Tensor | None:
        """One optimiser step on ``loss`` (:meth:`lit_qlearn.algorithms.optim.Stepper.step`):
        zero grads, backward, average across ranks, clip the global gradient norm to
        ``max_grad_norm`` (if given), step. ``count_step=False`` keeps the step out of
        Lightning's ``global_step`` (:meth:`step` passes it for every optimiser but the
        counted one). Returns the gradients' global norm before the clip ``()`` when
        clipping or ``measure_norm`` (pass it on logging steps only), else None."""
        if self.stepper is None:  # made at fit start; here for a subclass whose on_fit_start skips super()
            self.stepper = Stepper(self)
        return self.stepper.step(optimizer, loss, count=count_step, max_grad_norm=max_grad_norm,
                                 measure_norm=measure_norm)

    @staticmethod
    def adam(params: Iterable[Any], lr: float, weight_decay: float = 0.0, eps: float = 1e-8,
             betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
        """Adam with the fused kernel where the parameters' device has one: mathematically
        the same update as ``torch.optim.Adam``'s default, faster on CPU
        (benchmarks/results/throughput.json)."""
        params = list(params)
        try:
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, eps=eps, betas=betas, fused=True)
        except (RuntimeError, ValueError):  # device or dtype without a fused kernel
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, eps=eps, betas=betas)

    # ------------------------------------------------------------ fit start / end
    def configure_callbacks(self) -> list[Callback]:
        """The module's own callbacks, merged by Lightning into the Trainer's: an
        :class:`~lit_qlearn.evaluation.Evaluation` every ``eval_every`` updates (none on
        data without an environment id). An ``Evaluation`` given to the Trainer wins: the
        module then adds none. Lightning runs a module's callbacks after the Trainer's, so
        a Trainer callback's ``on_train_batch_end`` at an evaluation's update sees the
        previous ``eval/*`` in ``callback_metrics``; one that needs this update's goes after
        an ``Evaluation`` of its own in the Trainer's list."""
        if not self.eval_every:
            return []
        if any(isinstance(callback, Evaluation) for callback in self.trainer.callbacks):
            rank_zero_info(f"{type(self).__name__}(eval_every={self.eval_every}): the Trainer has an Evaluation "
                           "callback; the module adds none")
            return []
        return [Evaluation(self.eval_every, self.eval_episodes, required=False)]

    def on_fit_start(self) -> None:
        self.__dict__["_checkpoint_warning_filter"] = quiet_checkpoint_warning()
        self.stepper = Stepper(self)
        if self.flush_denormal and self.device.type == "cpu":
            torch.set_flush_denormal(True)
        if self.compile_networks and not self._compiled:
            self.compile_all()
        if self._target_pairs and self.target_update is None:
            raise ValueError(
                f"{type(self).__name__} has target networks (add_target) but no rule to move them: set "
                "self.target_update = lit_qlearn.targets.TargetUpdate(tau, every) or attach an EMATarget callback"
            )

    def compile_all(self) -> bool:
        """Compile the forward of every child network in place (``nn.Module.compile``):
        the critics, actors, Q-networks and their target copies. Networks called through
        another entry point route it through ``forward`` (e.g.
        :meth:`~lit_qlearn.networks.SquashedGaussianActor.sample`). Returns whether they
        were compiled: if ``torch.compile`` cannot compile a small network on this
        device (no C++ compiler, an unsupported Python), it warns and leaves them eager."""
        try:
            probe = torch.compile(nn.Sequential(nn.Linear(2, 2), nn.ReLU()).to(self.device))
            probe(torch.zeros(3, 2, device=self.device)).sum().backward()
        except Exception as error:  # torch.compile reports a missing toolchain in many ways
            warnings.warn(f"{type(self).__name__}(compile=True): torch.compile is unavailable here "
                          f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                          "running eagerly", stacklevel=2)
            return False
        mode = None if self.compile_networks in (None, "default") else self.compile_networks
        for child in self.children():
            if any(True for _ in child.parameters()):
                child.compile(mode=mode)
        self._compiled = True
        return True

    def on_fit_end(self) -> None:
        if self.flush_denormal and self.device.type == "cpu":
            torch.set_flush_denormal(False)  # the process default

    def teardown(self, stage: str) -> None:
        remove_warning_filter(self.__dict__.pop("_checkpoint_warning_filter", None))
        if self._eval_env is not None:
            self._eval_env.close()
            self._eval_env = None

    # ------------------------------------------------------------------ logging
    def logging_now(self) -> bool:
        """Whether this update is one the Trainer writes to its logger."""
        trainer = self._trainer
        if trainer is None or trainer.logger is None:
            return False
        return self.updates % max(1, trainer.log_every_n_steps) == 0

    def log_scalars(self, metrics: dict[str, Tensor | float], reduce: bool = True) -> None:
        """Write ``metrics`` at the update count to every logger and to
        ``trainer.callback_metrics``. Under DDP, ``reduce=True`` averages them over the
        ranks (one all-reduce; call on logging steps only, on every rank)."""
        names = list(metrics)
        if not names:
            return
        values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32, device=self.device).detach()
                              for k in names])
        if reduce and self.trainer.world_size > 1:
            values = self.trainer.strategy.reduce(values, reduce_op="mean")
        publish(self.trainer, dict(zip(names, values.cpu().tolist())), self.updates)

    def log_rollout(self, counts: dict[str, float]) -> None:
        """Publish the environment statistics of every rank: ``rollout/env_steps`` (their
        sum) and the mean return and length of the episodes finished since the last
        log, over all ranks. ``counts`` has ``env_steps``, ``episodes``, ``return_sum``,
        ``length_sum`` (the same keys on every rank, so the reduction is one all-reduce)."""
        names = ("env_steps", "episodes", "return_sum", "length_sum")
        totals = torch.tensor([float(counts[k]) for k in names], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        env_steps, episodes, return_sum, length_sum = totals.tolist()
        metrics = {"rollout/env_steps": env_steps}
        if episodes > 0:
            metrics.update({"rollout/episode_return": return_sum / episodes,
                            "rollout/episode_length": length_sum / episodes})
        publish(self.trainer, metrics, self.updates)

    # -------------------------------------------------------------- checkpoints
    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None, strict: bool | None = None,
        weights_only: bool | None = None, **kwargs: Any,
    ) -> Any:
        """Lightning's, with the file read as data first (a local file, unless
        ``weights_only=False``, the caller's word that it may hold code): a broken file is a
        one-line :class:`~lit_qlearn.data.checkpoint.CheckpointError` naming it, and
        hyper-parameters that name code to import (an instantiator, a class that is not this
        one or an imported subclass) are refused before Lightning would import them."""
        check_before_loading(checkpoint_path, cls, weights_only)
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, weights_only=weights_only, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hparams = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if isinstance(hparams, dict):
            # Only the arguments this class takes: `load_from_checkpoint` and `lit-qlearn fit
            # --ckpt_path` pass them back to it, and a parent's option the class fixes (PreQN's
            # num_q = 1, its absent critic_lr) is not one of them. ("_" keys are Lightning's.)
            accepted = constructor_arguments(type(self))
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = {
                key: value for key, value in hparams.items() if key.startswith("_") or key in accepted}
        checkpoint["lit_qlearn_updates"] = self.updates
        # Lets `load_from_checkpoint` and `lit_qlearn.datasets.collect` rebuild the module alone.
        checkpoint["lit_qlearn_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        if self.spec is not None:
            checkpoint["lit_qlearn_spec"] = self.spec.to_dict()
        state = rng_state()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            states: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["lit_qlearn_rng"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.updates = int(checkpoint.get("lit_qlearn_updates", 0))
        if "lit_qlearn_spec" in checkpoint:
            spec = DataSpec.from_dict(checkpoint["lit_qlearn_spec"])
            if self.spec is None:
                self.build_for(spec)
            # obs_mean / obs_std come back with the state dict; whether act() / explore() apply
            # them is the trained data's, also for a module built with sizes (whose spec has none)
            self._normalizes = spec.obs_mean is not None
            # where it is evaluated: a loaded module's evaluate() needs no DataModule either
            self.env_id = self.env_id or spec.env_id
            self.ref_scores = self.ref_scores or spec.ref_scores
        states = checkpoint.get("lit_qlearn_rng")
        # Only a resumed fit takes the random state back; loading weights leaves it alone.
        if states and self._trainer is not None and self.trainer.state.fn == "fit":
            rank = self.trainer.global_rank
            set_rng_state(states[rank if rank < len(states) else 0])

    # ------------------------------------------------------- policies, evaluation
    def act(self, obs: np.ndarray) -> np.ndarray:
        """The evaluation policy on raw (unnormalised) observations ``(*obs_shape)`` or ``(B, *obs_shape)``."""
        raise NotImplementedError

    def explore(self, obs: np.ndarray, env_step: int) -> np.ndarray:
        """The behaviour policy an online DataModule rolls, batched ``(E, *obs_shape) -> (E, ...)``;
        ``env_step`` is the number of environment steps taken so far (for schedules).
        Default: :meth:`act`."""
        return self.act(obs)

    def evaluate(self, episodes: int | None = None, seed: int = 10_000) -> dict[str, float]:
        """Run ``episodes`` (default ``eval_episodes``) episodes of :meth:`act` in the data's
        environment (:func:`lit_qlearn.evaluation.evaluate_policy`); return the mean
        ``return``, ``length`` and ``normalized_score`` (NaN without reference scores), and
        with the probe protocol the overestimation gap (:func:`lit_qlearn.evaluation.evaluate_module`)."""
        if self.env_id is None:
            raise RuntimeError(
                f"{type(self).__name__}.evaluate: no environment id; the DataModule has no env_id "
                "(pass env_id= to the DataModule)"
            )
        if self._eval_env is None:
            self._eval_env = make_vector_env(self.env_id, 1, self.spec.env_wrapper if self.spec else None)
        return evaluate_module(self, self._eval_env, self.eval_episodes if episodes is None else episodes,
                               seed=seed, ref_scores=self.ref_scores)

    def normalized_score(self, ret: float) -> float:
        """D4RL's ``100 * (return - ref_min) / (ref_max - ref_min)`` with the data's reference
        scores (:func:`lit_qlearn.data.names.normalized_score`); NaN without them."""
        return math.nan if self.ref_scores is None else float(normalized_score(ret, self.ref_scores))

