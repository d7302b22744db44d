"""The non-finite guard: a non-finite update is never applied.

A step is *bad* when its loss is not finite, or (without fp16 loss scaling) its gradient
norm is not finite; in fp16 overflowing gradients are the GradScaler's business (it
skips the step and lowers the scale), while a non-finite *loss* is a real divergence in
every precision.

Sync policy (at most one host sync per step, none where the optimizer allows it):

* **On the device** -- optimizers whose step takes a ``found_inf`` tensor (the fused
  Adam/AdamW kernels, ``_step_supports_amp_scaling``), without fp16 scaling: the guard
  hands them the bad flag and the kernel leaves parameters, moments and step counts
  untouched for a bad step. With fp16 and such an optimizer the GradScaler does the same
  for overflowing gradients. The guard counts bad steps in a device tensor and reads it at
  the next log line, where the loop syncs anyway: ``on_nan: abort`` then raises up to
  ``log_interval - 1`` steps late -- the bad update was still never applied -- and
  ``skip`` counts and reports the skipped steps there.
* **On the host** -- every other optimizer (non-fused AdamW, Muon), and every optimizer on
  the CPU (where reading a value costs no device sync): one ``bool()`` per step decides
  before ``optimizer.step()``; abort raises before the update, skip drops it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from lmkit.errors import TrainingError
from lmkit.events import NaNSkipped
from lmkit.training.hooks import StepOutput, TrainingHook

if TYPE_CHECKING:  # pragma: no cover
    from lmkit.training.loop import Trainer


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours a ``found_inf`` attribute (fused Adam/AdamW)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and bool(
        optimizer.defaults.get("fused"))


class NaNGuard(TrainingHook):
    """Keeps non-finite updates out of the weights (see the module docstring).

    Attributes:
        skipped: bad steps known on the host so far (device-side ones are folded in at
            log lines and saves).
    """

    name = "nan_guard"

    #: Take the device path on the CPU too (the tests exercise it there: CI has no GPU).
    device_path_on_cpu: bool = False

    def __init__(self, on_nan: str, use_scaler: bool, device: torch.device):
        self.on_nan = on_nan
        self.use_scaler = use_scaler
        self.device = device
        self.skipped = 0
        self.on_device = False
        self._bad = torch.zeros((), dtype=torch.int64, device=device)  # device-side count
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self._unreported: list[tuple[int, int]] = []  # (first bad step, count) not yet reported

    def on_start(self, trainer: Trainer) -> None:
        self.trainer = trainer
        # on the CPU the host check is free and exact (abort at the bad step itself)
        self.on_device = skips_on_device(trainer.optimizer) and (self.device.type != "cpu" or self.device_path_on_cpu)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.count()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))

    def count(self) -> int:
        """All bad steps so far (reads the device counter when there is one: a sync)."""
        if self.on_device:
            self._collect(log_step=None)
        return self.skipped

    # -- the step ----------------------------------------------------------------------

    def after_backward(self, trainer: Trainer, step: StepOutput) -> None:
        finite = torch.isfinite(step.loss)
        if not self.use_scaler:
            finite = finite & torch.isfinite(step.grad_norm)
        bad = ~finite
        if self.on_device:
            if not self.use_scaler:
                trainer.optimizer.found_inf = bad.float()  # read by the fused kernel, removed after the step
            self._first_bad = torch.where(bad & (self._first_bad < 0), step.step, self._first_bad)
            self._bad += bad
            step.applied = None
            return
        if bool(bad):  # the one host-device sync of a step
            if self.on_nan == "abort":
                what = f"non-finite loss ({step.loss.item()}) or gradient norm ({step.grad_norm.item()})"
                raise TrainingError(self._abort_message(what, f"at step {step.step}"))
            self.skipped += 1
            step.applied = False
            self.trainer.emit(NaNSkipped(step=step.step, total=self.skipped))

    def after_step(self, trainer: Trainer, step: StepOutput) -> None:
        if self.on_device:
            if hasattr(trainer.optimizer, "found_inf"):
                del trainer.optimizer.found_inf
            if trainer.is_log_step(step.step):
                self._collect(log_step=step.step)

    def _collect(self, log_step: int | None) -> None:
        """Fold the device counter into :attr:`skipped` (a sync). At a log line
        (``log_step``), abort for a bad step found since the last one, or warn."""
        new = int(self._bad.item())
        if new:
            first = int(self._first_bad.item())
            self._bad.zero_()
            self._first_bad.fill_(-1)
            self.skipped += new
            self._unreported.append((first, new))
        if log_step is None or not self._unreported:
            return
        first, new = self._unreported[0][0], sum(n for _, n in self._unreported)
        self._unreported.clear()
        if self.on_nan == "abort":
            raise TrainingError(self._abort_message(
                "non-finite loss or gradient norm",
                f"at step {first} (found at step {log_step}'s log line: the fused optimizer skipped that update "
                "on the device and applied the finite steps after it)"))
        # one skip: its exact step; several: the window's last step (NaNSkipped's convention)
        self.trainer.emit(NaNSkipped(step=first if new == 1 else log_step, total=self.skipped, skipped=new))

    def _abort_message(self, what: str, where: str) -> str:
        suffix = getattr(getattr(self.trainer, "strategy", None), "suffix", ".pt")  # FSDP: a .dcp folder
        latest = self.trainer.run.checkpoint_path("latest").with_suffix(suffix)
        return (f"{what} {where}; the update was not applied and nothing was saved; last good checkpoint: "
                f"{latest if latest.exists() else 'none'} (resume it with --on-nan skip, or start a new run "
                "with a lower --lr)")


__all__ = ["NaNGuard", "skips_on_device"]
