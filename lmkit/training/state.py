"""What a checkpoint holds and what ``summary.json`` says, in one place.

Checkpoint format 3 (format 2 still loads: its ``log_window`` and ``nan_skips`` then
seed the throughput meter and the NaN guard): the train state (``step``, ``micro_step``,
``tokens``, ``best_val_loss``, ``best_step``, ``last_val``, ``elapsed_s`` ...), ``model``,
``optimizer``, ``scheduler``, ``scaler``, ``hooks`` (each hook's
:meth:`~lmkit.training.hooks.TrainingHook.state_dict` under its name), ``rng`` and the
resolved ``config``. Tensors and plain types only: it loads with ``weights_only=True``.
"""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING, Any

import torch

from lmkit import __version__
from lmkit.events import EvalResult
from lmkit.training.checkpoint import clean_state_dict
from lmkit.training.optim import build_optimizer
from lmkit.training.rng import rng_state, set_rng_state

if TYPE_CHECKING:  # pragma: no cover
    from lmkit.training.loop import Trainer


def _world_size(trainer: Trainer) -> int:
    dist = getattr(trainer, "dist", None)
    return dist.world_size if dist is not None else 1


def checkpoint_state(trainer: Trainer) -> dict[str, Any]:
    """Everything the next step depends on (tensors and plain types only)."""
    return {
        "format": 3,
        "lmkit_version": __version__,
        "torch_version": str(torch.__version__),
        "world_size": _world_size(trainer),  # a DDP save adds "rng_ranks": every rank's RNG states
        "step": trainer.step,
        "micro_step": trainer.micro_step,
        "epoch": trainer.epoch(),
        "tokens": trainer.tokens,
        "best_val_loss": trainer.best_val_loss,
        "best_step": trainer.best_step,
        "nan_skips": trainer.nan_skips,  # also in hooks/nan_guard; kept here for readers
        "elapsed_s": trainer.elapsed(),
        "last_train_loss": trainer.last_train_loss,
        "last_val": (None if trainer.last_val is None else {
            "step": trainer.last_val.step, "epoch": trainer.last_val.epoch, "tokens": trainer.last_val.tokens,
            "loss": trainer.last_val.loss, "metrics": dict(trainer.last_val.metrics)}),
        "data_fingerprint": trainer.data_fingerprint,
        "model": clean_state_dict(trainer.model.state_dict()),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.plan.use_scaler else None,
        "hooks": trainer.hooks.state_dict(),
        "rng": rng_state(),
        "config": trainer.config.model_dump(mode="json"),
    }



def restore_state(trainer: Trainer, state: dict[str, Any]) -> None:
    """Load a checkpoint into a freshly built trainer: model, optimizer, schedule (re-targeted
    to a changed length), scaler, counters, the hooks' state and the RNG states.

    Raises:
        CheckpointError: the weights or optimizer state do not fit this model.
    """
    from lmkit.errors import CheckpointError, first_line

    try:
        trainer.model.load_state_dict_flexible(state["model"])  # a family's load adapters run here
        # The adapters may have swapped layers (adaptive SVD) and the loaded buffers set which
        # parameters train: build the optimizer over the model as restored, then load its state.
        trainer.optimizer = build_optimizer(trainer.model, trainer.config.training, trainer.plan.device)
        trainer.scheduler = trainer._new_scheduler(trainer.optimizer)  # noqa: SLF001
        trainer.optimizer.load_state_dict(state["optimizer"])
    except (CheckpointError, RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{trainer.resume_path}: does not fit this model ({first_line(exc, 160)})") from None
    trainer.scheduler.load_state_dict(state["scheduler"])
    # A changed length re-targets the schedule: the next step must use the new
    # schedule's LR (the saved one was computed for the old end).
    trainer.position_schedule(trainer.scheduler.last_epoch)
    if state.get("scaler") and trainer.plan.use_scaler:
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.step = int(state["step"])
    trainer.micro_step = int(state["micro_step"])
    trainer.tokens = int(state["tokens"])
    trainer.best_val_loss = float(state["best_val_loss"])
    trainer.best_step = state.get("best_step")
    trainer.elapsed_before = float(state.get("elapsed_s", 0.0))
    trainer.last_train_loss = state.get("last_train_loss")
    last = state.get("last_val")
    if last:
        trainer.last_val = EvalResult(step=last["step"], epoch=last["epoch"], tokens=last["tokens"], split="val",
                                      loss=last["loss"], metrics=dict(last["metrics"]), is_best=False,
                                      elapsed_s=0.0)
    hooks = dict(state.get("hooks") or {})
    # checkpoints of format 2 kept these at the top level
    hooks.setdefault("throughput", {"log_window": state.get("log_window")})
    hooks.setdefault("nan_guard", {"skipped": state.get("nan_skips", 0)})
    trainer.hooks.load_state_dict(hooks)
    trainer.rng_notes = set_rng_state(state["rng"])


def run_summary(trainer: Trainer, status: str) -> dict[str, Any]:
    """``summary.json``: the run's size, length, losses, rates (see
    :mod:`lmkit.training.throughput`), FLOPs per token, MFU peak and versions."""
    wall = trainer.elapsed() if hasattr(trainer, "t_session") else 0.0
    val = trainer.last_val
    return {
        "name": trainer.run.name,
        "run_dir": str(trainer.run.path),
        "status": status,
        "preset": trainer.config.preset,
        "model_type": trainer.config.model.type,
        "params": trainer.n_params,
        "steps": trainer.step,
        "max_steps": trainer.max_steps,
        "epochs": round(trainer.epoch(), 4),
        "tokens": trainer.tokens,
        "final_train_loss": trainer.last_train_loss,
        "final_val_loss": val.loss if val else None,
        "final_val_step": val.step if val else None,
        "best_val_loss": trainer.best_val_loss if trainer.best_step is not None else None,
        "best_step": trainer.best_step,
        "final_metrics": dict(val.metrics) if val else {},
        "nan_skips": trainer.nan_skips,
        "wall_time_s": round(wall, 3),
        "train_time_s": round(trainer.meter.train_time_s, 3),
        **trainer.meter.rates(trainer.tokens, wall),
        "flops_per_token": trainer.flops_per_token,
        "peak_flops": trainer.plan.peak_flops,
        "peak_flops_basis": trainer.plan.peak_basis,
        "device": str(trainer.plan.device),
        "device_name": trainer.plan.description,
        "precision": trainer.plan.precision,
        "lmkit_version": __version__,
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        **trainer.hooks.summary(),  # e.g. "svd": the layers' modes and switches
        **({"world_size": _world_size(trainer),
            "parallelism": getattr(getattr(trainer, "strategy", None), "name", None),
            "global_batch_size": trainer.config.training.batch_size * trainer.config.training.grad_accum_steps
            * _world_size(trainer)} if _world_size(trainer) > 1 else {}),
    }


__all__ = ["checkpoint_state", "restore_state", "run_summary"]
