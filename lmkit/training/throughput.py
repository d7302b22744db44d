"""The throughput meter: the log line of training (``StepMetrics``) and the run's rates.

Two rates, one definition each (documented in the README):

* ``train_tok_per_s`` -- target tokens per second of *training time*: the time spent in
  optimizer steps, from the first micro-batch of a step to the end of its log line.
  Evaluation, checkpoint saves and other hooks' work between steps are excluded. This is
  the dashboard's ``tok/s``, the ``train_tok_per_s`` of ``metrics.jsonl`` (over the log
  window) and of ``summary.json`` (over the whole run, resumes included), and what MFU
  is computed from.
* ``wall_tok_per_s`` -- target tokens per second of wall time of the run's sessions
  (``summary.json`` only): what a researcher waits for, evaluation and saves included.

MFU (model FLOPs utilisation; Chowdhery et al. 2022, PaLM, Appendix B) is
``flops_per_token * train_tok_per_s / peak``, with the model's training FLOPs per token
and the device's dense peak *for the precision the run uses* (``DevicePlan.peak_flops``;
fp32 and TF32 runs are scored against their own peaks, never a bf16 one).

The loss of a log window is the mean over its steps of each step's token-weighted mean
loss; its sum and length are checkpointed, so a resumed run logs the same numbers as one
that never stopped. Rates are measured over this session only.

Host syncs: one per log line (the loss and gradient norm are read there); none otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from lmkit.events import StepMetrics
from lmkit.training.hooks import StepOutput, TrainingHook

if TYPE_CHECKING:  # pragma: no cover
    from lmkit.training.loop import Trainer


class ThroughputMeter(TrainingHook):
    """Times training steps, emits :class:`~lmkit.events.StepMetrics` every
    ``training.log_interval`` steps (and at steps 1 and last), keeps ``train_time_s``."""

    name = "throughput"

    def __init__(self, device: torch.device, flops_per_token: float, peak_flops: float | None):
        self.device = device
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.window_steps = 0
        self.train_time_s = 0.0  # whole run, every session
        self._loss = torch.zeros((), device=device)
        self._rate_steps = 0
        self._rate_tokens = 0
        self._rate_time = 0.0
        self._t0: float | None = None

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # read the window's device sum here: a save syncs anyway
        return {"log_window": {"loss_sum": float(self._loss.item()), "steps": self.window_steps},
                "train_time_s": self.train_time_s}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        window = state.get("log_window") or {}
        # the window's sum stays a float32 device value, as in a run that never stopped
        self._loss = torch.tensor(float(window.get("loss_sum", 0.0)), device=self.device)
        self.window_steps = int(window.get("steps", 0))
        self.train_time_s = float(state.get("train_time_s", 0.0))

    # -- hooks -------------------------------------------------------------------------

    def before_step(self, trainer: Trainer) -> None:
        self._t0 = time.perf_counter()

    def after_step(self, trainer: Trainer, step: StepOutput) -> None:
        self._loss += step.loss
        self.window_steps += 1
        self._rate_steps += 1
        self._rate_tokens += step.n_targets
        log = trainer.is_log_step(step.step)
        # the log line's one sync: waiting for the device is part of the step's time
        window_loss = float(self._loss.item()) if log else None
        if self._t0 is not None:
            spent = time.perf_counter() - self._t0
            self._rate_time += spent
            self.train_time_s += spent
            self._t0 = None
        if window_loss is not None:
            self._log(trainer, step, window_loss / self.window_steps)

    def _log(self, trainer: Trainer, step: StepOutput, mean: float) -> None:
        seconds = max(1e-9, self._rate_time)
        tok_per_s = self._rate_tokens / seconds
        cuda = self.device.type == "cuda"
        trainer.last_train_loss = mean
        trainer.emit(StepMetrics(
            step=step.step, max_steps=trainer.max_steps, epoch=trainer.epoch(), tokens=trainer.tokens, loss=mean,
            lr=step.lr, grad_norm=float(step.grad_norm.item()),
            tok_per_s=tok_per_s, step_time_s=seconds / max(1, self._rate_steps),
            mfu=(self.flops_per_token * tok_per_s / self.peak_flops) if self.peak_flops else None,
            gpu_mem_gb=torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else None,
            elapsed_s=trainer.elapsed(),
            # allocator counters are host-side reads (no sync); the scale's .item() syncs,
            # but only here, where the log line already synced on the loss
            gpu_alloc_gb=torch.cuda.memory_allocated(self.device) / 2**30 if cuda else None,
            gpu_reserved_gb=torch.cuda.memory_reserved(self.device) / 2**30 if cuda else None,
            grad_scale=float(trainer.scaler.get_scale()) if trainer.plan.use_scaler else None,
            nan_skips=trainer.nan_skips,
        ))
        self._loss = torch.zeros((), device=self.device)
        self.window_steps = 0
        self._rate_steps, self._rate_tokens, self._rate_time = 0, 0, 0.0

    def rates(self, tokens: int, wall_s: float) -> dict[str, float | None]:
        """``train_tok_per_s`` and ``wall_tok_per_s`` of the whole run (``summary.json``),
        and the run's MFU from the former."""
        train = tokens / self.train_time_s if self.train_time_s > 0 else None
        return {
            "train_tok_per_s": round(train, 1) if train else None,
            "wall_tok_per_s": round(tokens / wall_s, 1) if wall_s > 0 else None,
            "mfu": (self.flops_per_token * train / self.peak_flops) if (train and self.peak_flops) else None,
        }


__all__ = ["ThroughputMeter"]
