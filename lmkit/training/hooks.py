"""Training hooks: the components the trainer calls at fixed points of a run.

A training feature is a :class:`TrainingHook` added to the trainer, not an edit of the
loop. The trainer calls every hook, in the order they were added, at these points::

    on_start(trainer)                      after set-up (and a restore), before the first step
    before_step(trainer)                   before the micro-batches of an optimizer step
    after_backward(trainer, step)          gradients accumulated, unscaled and clipped;
                                           the optimizer has not stepped yet
    after_step(trainer, step)              the optimizer and the LR schedule have stepped
    on_eval(trainer, result)               an evaluation finished (``EvalResult``)
    on_end(trainer, status)                the run ends ("completed", "interrupted", ...)

State: a hook that must survive a resume returns it from :meth:`TrainingHook.state_dict`
(tensors and plain types only: checkpoints load with ``weights_only=True``); it is saved
under ``checkpoint["hooks"][hook.name]`` and handed back to :meth:`load_state_dict` on
resume, before ``on_start``. A hook that changes which parameters train calls
``trainer.rebuild_optimizer()``, which keeps the LR schedule's position.

Under data parallelism (``WORLD_SIZE > 1``) every rank calls every hook; the gradients in
``after_backward`` are already reduced (all-reduced under DDP; under FSDP each rank holds
its shard of them, as DTensors), ``step.loss`` and ``step.n_targets`` are global, and only
rank 0 (``trainer.dist.is_main``) may write the run folder. A hook must take the same
decisions on every rank (a save is collective, and under FSDP so is every forward: a hook that
runs the model must run it on every rank); the feature sections' hooks (``svd``, ``senses``)
are refused there for now.

The built-in components are hooks too: the throughput meter
(:mod:`lmkit.training.throughput`), the non-finite guard (:mod:`lmkit.training.nan_guard`),
evaluation (:mod:`lmkit.training.evaluator`) and the checkpoint policy
(:mod:`lmkit.training.checkpointing`). The same idea as torchtitan's ``ModelConverter``
post-optimizer hooks and ``Stateful`` checkpoint components.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from lmkit.events import EvalResult
    from lmkit.training.loop import Trainer


@dataclass
class StepOutput:
    """What one optimizer step produced, as the hooks see it.

    Attributes:
        step: the step number after this step (1 for the first step).
        loss: the step's mean loss over its target tokens (a 0-d device tensor, nats;
            reading it syncs the device).
        grad_norm: the total gradient norm before clipping (0-d device tensor).
        lr: the learning rate the step used.
        n_targets: target tokens of the step (all micro-batches).
        prev_micro_step: the micro-batch counter before the step (for epoch crossings).
        applied: ``False`` when the update was skipped on the host (non-finite step with
            an optimizer that cannot skip on the device); ``None`` when the device decides
            (fused optimizers; the guard reads the outcome at the next log line).
    """

    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    n_targets: int
    prev_micro_step: int
    applied: bool | None = True


class TrainingHook:
    """Base class of training components; every method is optional (a no-op here).

    Attributes:
        name: the key of this hook's state in the checkpoint (unique per trainer).
    """

    name: str = "hook"

    def on_start(self, trainer: Trainer) -> None:
        """Called once, after set-up and restore, before the first step of this session."""

    def before_step(self, trainer: Trainer) -> None:
        """Called before the micro-batches of each optimizer step."""

    def after_backward(self, trainer: Trainer, step: StepOutput) -> None:
        """Gradients are final (accumulated, unscaled, clipped); the optimizer has not stepped.
        ``step.step`` is still the number of the step being taken."""

    def after_step(self, trainer: Trainer, step: StepOutput) -> None:
        """The optimizer and the schedule have stepped; ``trainer.step == step.step``."""

    def on_eval(self, trainer: Trainer, result: EvalResult) -> None:
        """An evaluation finished."""

    def on_end(self, trainer: Trainer, status: str) -> None:
        """The session ends with ``status`` (``completed``, ``interrupted``, ``aborted``, ``failed``)."""

    def state_dict(self) -> dict[str, Any] | None:
        """This hook's part of the checkpoint, or ``None`` when it keeps no state."""
        return None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (called before :meth:`on_start`)."""

    def summary(self) -> dict[str, Any] | None:
        """What this hook adds to ``summary.json`` (under its name; plain JSON types), or ``None``."""
        return None


class Hooks:
    """The trainer's hooks, called in order. Names must be unique (they key the checkpoint).

    Raises:
        ValueError: two hooks share a name.
    """

    def __init__(self, hooks: Iterable[TrainingHook] = ()):
        self.hooks: list[TrainingHook] = []
        for hook in hooks:
            self.add(hook)

    def add(self, hook: TrainingHook) -> TrainingHook:
        if any(h.name == hook.name for h in self.hooks):
            raise ValueError(f"a training hook named {hook.name!r} is already registered")
        self.hooks.append(hook)
        return hook

    def __iter__(self):
        return iter(self.hooks)

    def call(self, method: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, method)(*args)

    def state_dict(self) -> dict[str, Any]:
        return {h.name: s for h in self.hooks if (s := h.state_dict()) is not None}

    def summary(self) -> dict[str, Any]:
        return {h.name: s for h in self.hooks if (s := h.summary()) is not None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for hook in self.hooks:
            if hook.name in state:
                hook.load_state_dict(state[hook.name])


__all__ = ["Hooks", "StepOutput", "TrainingHook"]
