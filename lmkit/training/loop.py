"""The training loop.

:func:`train` runs one :class:`~lmkit.config.RunConfig` to completion and returns the
run's summary. Order of work, so that bad input fails before anything is written:
device and precision (exit 3 / 2), run-directory name (exit 2), data (exit 2), model and
data agreement (exit 2); only then is ``runs/NAME`` created and the first step taken.

One optimizer step = ``grad_accum_steps`` micro-batches of ``batch_size`` sequences.
Batches are a pure function of the micro-batch index (:mod:`lmkit.data.batching`), the
LR schedule is stepped once per optimizer step, and losses are kept on the device
until a log step, so no host-device sync happens inside a step unless logging asks.
"""

from __future__ import annotations

import math
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmkit import __version__
from lmkit.config import RunConfig
from lmkit.data import PreparedData, make_train_batches, prepare_data
from lmkit.data.batching import example_batches_in_order, sequential_windows
from lmkit.errors import DeviceError, Interrupted, TrainingError
from lmkit.evaluation.arithmetic import arithmetic_metrics
from lmkit.evaluation.lm import mean_loss, perplexity
from lmkit.events import (
    CheckpointSaved,
    DataReady,
    EvalResult,
    Event,
    Notice,
    RunFinished,
    RunStarted,
    StepMetrics,
    broadcast,
    null_emit,
)
from lmkit.models import build_model
from lmkit.monitor.writers import EventsWriter, MetricsWriter, TensorBoardWriter
from lmkit.rundir import RunDir
from lmkit.training.checkpoint import clean_state_dict, link_checkpoint, save_checkpoint
from lmkit.training.device import DevicePlan, plan_device
from lmkit.training.optim import build_optimizer
from lmkit.training.schedule import build_scheduler


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain types (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


class Trainer:
    """Runs one training job; see the module docstring for the order of work.

    Args:
        config: the run's config (``model.vocab_size`` may be ``None``: it is then
            taken from the tokenizer).
        emit: receives every :class:`~lmkit.events.Event` (the CLI's renderers); the
            run-directory writers are added by the trainer itself.
    """

    def __init__(self, config: RunConfig, emit: Callable[[Event], None] = null_emit):
        self.config = config.model_copy(deep=True)
        self.user_emit = emit
        self.emit = emit

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        cfg = self.config
        tcfg = cfg.training
        self.plan: DevicePlan = plan_device(tcfg)
        self.run = RunDir.for_new_run(cfg)
        if cfg.name is None:
            cfg.name = self.run.name

        data_events: list[Event] = []

        def emit_data(event: Event) -> None:
            if isinstance(event, DataReady):
                data_events.append(event)
            self.user_emit(event)

        self.data: PreparedData = prepare_data(cfg.data, emit_data)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = self.data.tokenizer.vocab_size
        self.data.check_model(cfg.model)

        seed_everything(tcfg.seed)
        self.model = build_model(cfg.model).to(self.plan.device)
        self.model.grad_checkpointing = tcfg.grad_checkpointing
        self.n_params = sum(p.numel() for p in self.model.parameters())

        self.batches = make_train_batches(self.data, cfg.model.block_size, tcfg.batch_size, tcfg.seed)
        accum = tcfg.grad_accum_steps
        self.micro_per_epoch = self.batches.batches_per_epoch
        self.steps_per_epoch = max(1, math.ceil(self.micro_per_epoch / accum))
        if tcfg.max_steps is not None:
            self.max_steps = tcfg.max_steps
        else:
            self.max_steps = max(1, math.ceil(tcfg.epochs * self.micro_per_epoch / accum))

        self.optimizer = build_optimizer(self.model, tcfg, self.plan.device)
        self.scheduler = build_scheduler(self.optimizer, schedule=tcfg.schedule, warmup_steps=tcfg.warmup_steps,
                                         total_steps=self.max_steps, min_lr_ratio=tcfg.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(self.plan.device.type, enabled=self.plan.use_scaler)
        self.train_model = torch.compile(self.model) if tcfg.compile else self.model

        self.step = 0
        self.micro_step = 0
        self.tokens = 0
        self._committed = (0, 0)  # (micro_step, tokens) after the last completed optimizer step
        self.best_val_loss = math.inf
        self.best_step: int | None = None
        self.last_val: EvalResult | None = None
        self.last_train_loss: float | None = None
        self.periodic: list[Path] = []

        self.run.create()
        self.run.write_config(cfg)
        self.data.tokenizer.save(self.run.tokenizer_dir)
        writers: list[Callable[[Event], None]] = [MetricsWriter(self.run.metrics_path), EventsWriter(self.run.events_path)]
        if tcfg.tensorboard:
            writers.append(TensorBoardWriter(self.run.tb_dir))
        for event in data_events:  # the console saw these already; the run directory records them
            broadcast(writers)(event)
        self.emit = broadcast([*writers, self.user_emit])

    # ------------------------------------------------------------------ helpers

    def epoch(self) -> float:
        return self.micro_step / self.micro_per_epoch

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.plan.device.type == "cuda":
            return tensor.pin_memory().to(self.plan.device, non_blocking=True)
        return tensor.to(self.plan.device)

    def _crossed(self, every_epochs: int | None, prev_micro: int) -> bool:
        if not every_epochs:
            return False
        before = prev_micro // self.micro_per_epoch // every_epochs
        after = self.micro_step // self.micro_per_epoch // every_epochs
        return after > before

    def _due(self, interval: int | None) -> bool:
        return bool(interval) and self.step % interval == 0

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> EvalResult:
        cfg, plan = self.config, self.plan
        started = time.time()
        if self.data.task == "lm":
            batches = sequential_windows(self.data.tokens("val"), cfg.model.block_size, cfg.training.batch_size,
                                         cfg.training.eval_iters)
            loss, _ = mean_loss(self.model, batches, plan)
            metrics = {"ppl": perplexity(loss)}
        else:
            pad = self.data.tokenizer.pad_id or 0
            batches = example_batches_in_order(self.data.sequences["val"], cfg.training.batch_size, pad)
            loss, _ = mean_loss(self.model, batches, plan)
            metrics = {"ppl": perplexity(loss), **arithmetic_metrics(
                self.model, self.data.tokenizer, self.data.examples, plan, cfg.model.block_size)}
        if not math.isfinite(loss):
            raise TrainingError(f"validation loss is {loss} at step {self.step}; see {self.run.path}")
        is_best = loss < self.best_val_loss
        if is_best:
            self.best_val_loss, self.best_step = loss, self.step
        result = EvalResult(step=self.step, epoch=self.epoch(), tokens=self.tokens, split="val", loss=loss,
                            metrics=metrics, is_best=is_best, elapsed_s=time.time() - started)
        self.last_val = result
        self.emit(result)
        return result

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, Any]:
        return {
            "format": 1,
            "lmkit_version": __version__,
            "torch_version": str(torch.__version__),
            "world_size": 1,
            "step": self.step,
            "micro_step": self.micro_step,
            "epoch": self.epoch(),
            "tokens": self.tokens,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "model": clean_state_dict(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.plan.use_scaler else None,
            "rng": rng_state(),
            "config": self.config.model_dump(mode="json"),
        }

    def save(self, tags: list[str]) -> None:
        """Write the checkpoint once and link/copy it under every tag (latest, best, step_N)."""
        started = time.time()
        state = self.state()
        paths = [self.run.checkpoint_path(tag) for tag in tags]
        save_checkpoint(state, paths[0])
        for path in paths[1:]:
            link_checkpoint(paths[0], path)
        for tag, path in zip(tags, paths, strict=True):
            if tag.startswith(("step_", "epoch_")):
                self.periodic.append(path)
        keep = self.config.training.keep_last
        while keep is not None and len(self.periodic) > keep:
            self.periodic.pop(0).unlink(missing_ok=True)
        val = self.last_val.loss if self.last_val is not None and self.last_val.step == self.step else None
        self.emit(CheckpointSaved(step=self.step, path=str(paths[0]), tags=tuple(tags), val_loss=val,
                                  seconds=time.time() - started))

    # ------------------------------------------------------------------ the loop

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """One optimizer step; returns the mean loss (device tensor), grad norm, targets seen."""
        tcfg = self.config.training
        accum = tcfg.grad_accum_steps
        loss_sum = torch.zeros((), device=self.plan.device)
        n_targets = 0
        for _ in range(accum):
            x_np, y_np = self.batches.batch(self.micro_step)
            n_targets += int((y_np != -100).sum())
            x, y = self._to_device(x_np), self._to_device(y_np)
            with self.plan.autocast():
                _, loss = self.train_model(x, y)
            self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float()
            self.micro_step += 1
        grad_norm = None
        if tcfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return loss_sum / accum, grad_norm, n_targets

    def run_loop(self) -> None:
        tcfg = self.config.training
        flops_per_token = self.model.flops_per_token()
        self.emit(RunStarted(
            name=self.run.name, run_dir=str(self.run.path), preset=self.config.preset, model_type=self.config.model.type,
            n_params=self.n_params, device=str(self.plan.device), device_name=self.plan.description,
            precision=self.plan.precision, compile=tcfg.compile, max_steps=self.max_steps,
            steps_per_epoch=self.steps_per_epoch,
            tokens_per_step=tcfg.batch_size * tcfg.grad_accum_steps * self.config.model.block_size,
        ))
        if self.plan.reason.startswith("auto"):
            self.emit(Notice(level="info", message=f"device {self.plan.device} ({self.plan.reason})"))
        if tcfg.warmup_steps >= self.max_steps:
            peak = tcfg.lr * self.max_steps / tcfg.warmup_steps
            self.emit(Notice(level="warning", message=(
                f"training.warmup_steps ({tcfg.warmup_steps}) >= the run's {self.max_steps} steps: the LR only "
                f"reaches {peak:.2e} of its {tcfg.lr:.2e} peak; lower it with --set training.warmup_steps=N")))
        self.t_start = time.time()
        if tcfg.eval_at_start:
            self.evaluate()

        self.model.train()
        window_loss = torch.zeros((), device=self.plan.device)
        window_steps, window_tokens = 0, 0
        window_start, paused = time.time(), 0.0
        grad_norm: torch.Tensor | None = None
        while self.step < self.max_steps:
            prev_micro = self.micro_step
            loss, grad_norm, n_targets = self.train_step()
            window_loss += loss
            window_steps += 1
            window_tokens += n_targets
            self.tokens += n_targets
            self._committed = (self.micro_step, self.tokens)

            last = self.step == self.max_steps
            if self.step % tcfg.log_interval == 0 or self.step == 1 or last:
                mean = float(window_loss.item()) / window_steps
                if not math.isfinite(mean):
                    raise TrainingError(
                        f"training loss is {mean} at step {self.step}; try a lower training.lr "
                        f"or --set training.grad_clip=1.0 (last good checkpoint: "
                        f"{self.run.checkpoint_path('latest') if self.run.checkpoint_path('latest').exists() else 'none'})"
                    )
                now = time.time()
                seconds = max(1e-9, now - window_start - paused)
                tok_per_s = window_tokens / seconds
                self.last_train_loss = mean
                self.emit(StepMetrics(
                    step=self.step, max_steps=self.max_steps, epoch=self.epoch(), tokens=self.tokens, loss=mean,
                    lr=self.optimizer.param_groups[0]["lr"],
                    grad_norm=float(grad_norm.item()) if grad_norm is not None else None,
                    tok_per_s=tok_per_s, step_time_s=seconds / window_steps,
                    mfu=(flops_per_token * tok_per_s / self.plan.peak_flops) if self.plan.peak_flops else None,
                    gpu_mem_gb=(torch.cuda.max_memory_allocated(self.plan.device) / 2**30
                                if self.plan.device.type == "cuda" else None),
                    elapsed_s=now - self.t_start,
                ))
                window_loss = torch.zeros((), device=self.plan.device)
                window_steps, window_tokens = 0, 0
                window_start, paused = time.time(), 0.0

            pause_start = time.time()
            evaluated = False
            if self._due(tcfg.eval_interval) or self._crossed(tcfg.eval_every_epochs, prev_micro) or last:
                self.evaluate()
                evaluated = True
            tags: list[str] = []
            if evaluated and self.last_val is not None and self.last_val.is_best:
                tags.append("best")
            if self._due(tcfg.checkpoint_interval):
                tags.append(f"step_{self.step:07d}")
            if self._crossed(tcfg.checkpoint_every_epochs, prev_micro):
                tags.append(f"epoch_{self.micro_step // self.micro_per_epoch:03d}")
            if tags or evaluated or last:
                self.save(["latest", *tags])
            paused += time.time() - pause_start

    def summary(self, status: str) -> dict[str, Any]:
        wall = time.time() - getattr(self, "t_start", time.time())
        val = self.last_val
        return {
            "name": self.run.name,
            "run_dir": str(self.run.path),
            "status": status,
            "preset": self.config.preset,
            "model_type": self.config.model.type,
            "params": self.n_params,
            "steps": self.step,
            "max_steps": self.max_steps,
            "epochs": round(self.epoch(), 4),
            "tokens": self.tokens,
            "final_train_loss": self.last_train_loss,
            "final_val_loss": val.loss if val else None,
            "best_val_loss": self.best_val_loss if self.best_step is not None else None,
            "best_step": self.best_step,
            "final_metrics": dict(val.metrics) if val else {},
            "wall_time_s": round(wall, 3),
            "tok_per_s": round(self.tokens / wall, 1) if wall > 0 else None,
            "device": str(self.plan.device),
            "device_name": self.plan.description,
            "precision": self.plan.precision,
            "lmkit_version": __version__,
            "torch_version": str(torch.__version__),
            "python_version": platform.python_version(),
        }

    def run(self) -> dict[str, Any]:
        """Set up, train to ``max_steps``, write ``summary.json``; return the summary.

        Raises:
            ConfigError / DataError: bad input (exit 2), before anything is written.
            DeviceError: no CUDA for ``gpu_only``, missing device, CUDA OOM (exit 3).
            TrainingError: non-finite loss (exit 1).
            Interrupted: Ctrl-C, after ``latest`` was saved (exit 130).
        """
        self.setup()
        status = "failed"
        try:
            try:
                self.run_loop()
                status = "completed"
            except KeyboardInterrupt:
                status = "interrupted"
                # A step cut short leaves the weights as the last completed step left them.
                self.micro_step, self.tokens = self._committed
                self.optimizer.zero_grad(set_to_none=True)
                self.save(["latest"])
                raise Interrupted(
                    f"interrupted at step {self.step}; saved {self.run.checkpoint_path('latest')}"
                ) from None
            except torch.OutOfMemoryError:
                tcfg = self.config.training
                static = 16 * self.n_params / 2**30
                raise DeviceError(
                    f"CUDA out of memory at batch size {tcfg.batch_size} (weights + grads + AdamW alone need "
                    f"~{static:.2f} GiB before activations); try a smaller --batch-size with "
                    "--set training.grad_accum_steps=N, --grad-checkpointing, or --bf16"
                ) from None
        finally:
            summary = self.summary(status)
            self.run.write_summary(summary)
            self.emit(RunFinished(status=status, summary=summary))
        return summary


def train(config: RunConfig, emit: Callable[[Event], None] = null_emit) -> dict[str, Any]:
    """Train ``config`` and return its summary (see :meth:`Trainer.run`)."""
    return Trainer(config, emit).run()


__all__ = ["Trainer", "train", "seed_everything", "rng_state"]
