"""The training loop: new runs and exact resumes.

:func:`train` runs a :class:`~lmkit.config.RunConfig` to completion; :func:`resume`
continues a run directory from a checkpoint. Order of work, so that bad input fails
before anything is written: device and precision (exit 3 / 2), the run directory (a new
run claims its folder; a resume picks and verifies its checkpoint), data (exit 2), model
and data agreement (exit 2); only then is the first step taken.

One optimizer step = ``grad_accum_steps`` micro-batches of ``batch_size`` sequences.
Batches are a pure function of the micro-batch index (:mod:`lmkit.data.batching`), and
checkpoints hold every piece of state that affects the next step -- weights, optimizer,
LR schedule, GradScaler, counters, best val loss, and the python/numpy/torch/CUDA RNG
states -- so a resumed run takes bitwise the same steps as one that never stopped.

Stopping: SIGINT and SIGTERM finish the current step, save ``latest`` and exit 130 /
143 (:mod:`lmkit.training.signals`). Non-finite loss or gradient norm is caught before
``optimizer.step()`` (one host-device sync per step, the only one outside logging):
``on_nan: abort`` stops with exit 1 and writes nothing new; ``skip`` drops the update.
"""

from __future__ import annotations

import math
import os
import platform
import random
import re
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmkit import __version__
from lmkit.config import RunConfig
from lmkit.data import PreparedData, make_train_batches, prepare_data
from lmkit.data.batching import example_batches_in_order, sequential_windows
from lmkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    Interrupted,
    TrainingError,
    first_line,
)
from lmkit.evaluation.arithmetic import arithmetic_metrics
from lmkit.evaluation.lm import mean_loss, perplexity
from lmkit.events import (
    CheckpointSaved,
    DataReady,
    EvalResult,
    Event,
    Notice,
    Resumed,
    RunFinished,
    RunStarted,
    StepMetrics,
    broadcast,
    null_emit,
)
from lmkit.models import build_model
from lmkit.monitor.writers import EventsWriter, MetricsWriter, TensorBoardWriter
from lmkit.rundir import RunDir
from lmkit.training.checkpoint import (
    checkpoint_by_name,
    clean_state_dict,
    link_checkpoint,
    load_checkpoint,
    newest_complete,
    peek_step,
    remove_stale_temp_files,
    save_checkpoint,
)
from lmkit.training.device import DevicePlan, plan_device
from lmkit.training.optim import build_optimizer
from lmkit.training.resume import resume_config
from lmkit.training.schedule import build_scheduler
from lmkit.training.signals import StopNow, StopRequest

CHECKPOINT_FORMAT_KEYS = ("model", "optimizer", "scheduler", "step", "micro_step", "rng")


# --------------------------------------------------------------------------------------
# RNG state as tensors and plain types
# --------------------------------------------------------------------------------------


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


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states when the device count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _is_memory_error(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "DefaultCPUAllocator" in str(exc))
    )


def _device_uuid(device: torch.device) -> str | None:
    """The CUDA device's UUID (``GPU-…``, NVML's spelling), ``None`` off CUDA or when unknown."""
    if device.type != "cuda":
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
    except Exception:  # noqa: BLE001 - older drivers / builds
        return None
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


_PERIODIC = re.compile(r"^(step|epoch)_(\d+)\.pt$")


class Trainer:
    """Runs one training job (new, or resumed from a run directory).

    Args:
        config: the run's config (``model.vocab_size`` may be ``None``: it is then
            taken from the tokenizer).
        emit: receives every :class:`~lmkit.events.Event` (the CLI's renderers); the
            run-directory writers are added by the trainer itself.
        resume_dir: continue this run directory instead of starting a new one.
        checkpoint: with ``resume_dir``: ``None`` for the newest complete checkpoint, or
            ``latest``/``best``/``step_…``/``epoch_…``/a path.
        config_changes: the allowed config changes of this resume, for the record.
    """

    def __init__(self, config: RunConfig, emit: Callable[[Event], None] = null_emit, *,
                 resume_dir: Path | None = None, checkpoint: str | None = None,
                 config_changes: Mapping[str, tuple[Any, Any]] | None = None):
        self.config = config.model_copy(deep=True)
        self.user_emit = emit
        self.emit = emit
        self.resume_dir = resume_dir
        self.checkpoint_choice = checkpoint
        self.config_changes = dict(config_changes or {})
        # Test hook: LMKIT_TEST_SIGNAL="MICRO:SIGNAME" sends the signal to this process right
        # after micro-batch MICRO, to place an interruption mid-accumulation deterministically.
        hook = os.environ.get("LMKIT_TEST_SIGNAL", "")
        self._test_signal = (int(hook.split(":")[0]), getattr(signal, hook.split(":")[1])) if ":" in hook else None

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        cfg = self.config
        tcfg = cfg.training
        self.plan: DevicePlan = plan_device(tcfg)
        resume_state: dict[str, Any] | None = None
        if self.resume_dir is not None:
            self.run = RunDir(self.resume_dir)
            self.run.lock()
            self.removed_temp = remove_stale_temp_files(self.run.checkpoints)
            try:
                resume_state, self.resume_path, self.skipped = self._pick_checkpoint()
                self._check_checkpoint_config(resume_state)  # before data preparation: fail fast
            except BaseException:
                self.run.unlock()
                raise
        else:
            self.run = RunDir.claim(cfg)
            cfg.name = self.run.name
        try:
            with StopNow():
                self._build(resume_state)
        except BaseException:
            self.run.release()
            raise

    def _pick_checkpoint(self) -> tuple[dict[str, Any], Path, list[tuple[Path, str]]]:
        if self.checkpoint_choice is None:
            found, skipped = newest_complete(self.run.checkpoints)
            return found.state, found.path, skipped
        path = checkpoint_by_name(self.run.checkpoints, self.checkpoint_choice)
        return load_checkpoint(path), path, []

    def _build(self, resume_state: dict[str, Any] | None) -> None:
        cfg, tcfg = self.config, self.config.training
        data_events: list[Event] = []

        def emit_data(event: Event) -> None:
            if isinstance(event, DataReady):
                data_events.append(event)
            self.user_emit(event)

        self.data: PreparedData = prepare_data(cfg.data, emit_data)
        if os.environ.get("LMKIT_TEST_SIGNAL_SETUP"):  # test hook: a signal during set-up
            os.kill(os.getpid(), getattr(signal, os.environ["LMKIT_TEST_SIGNAL_SETUP"]))
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = self.data.tokenizer.vocab_size
        self.data.check_model(cfg.model)
        self.data_fingerprint = self.data.fingerprint()
        if resume_state is not None:
            self._check_resumable(resume_state)

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

        self.step = 0
        self.micro_step = 0
        self.tokens = 0
        self.best_val_loss = math.inf
        self.best_step: int | None = None
        self.nan_skips = 0
        self.elapsed_before = 0.0
        self.last_val: EvalResult | None = None
        self.last_train_loss: float | None = None
        self.periodic: dict[str, list[Path]] = {"step": [], "epoch": []}
        self.window = {"loss_sum": 0.0, "steps": 0}  # the log window in progress
        if resume_state is not None:
            self._restore(resume_state)
            if self.max_steps <= self.step:
                raise ConfigError(
                    f"resume: {self.run.path} is already at step {self.step} of {self.max_steps}; "
                    f"to train further pass --max-steps N with N > {self.step} (or a larger --epochs)"
                )
        self.train_model = torch.compile(self.model) if tcfg.compile else self.model
        self.vocab_size = cfg.model.vocab_size

        self.run.create()
        self.run.write_config(cfg)
        self.superseded: list[Path] = []
        if resume_state is None:
            self.data.tokenizer.save(self.run.tokenizer_dir)
            dropped = 0
        else:
            dropped, _ = self.run.drop_records_after(self.step)
            self.superseded = self._align_checkpoints(resume_state)
        writers: list[Callable[[Event], None]] = [MetricsWriter(self.run.metrics_path),
                                                  EventsWriter(self.run.events_path)]
        if tcfg.tensorboard:
            writers.append(TensorBoardWriter(self.run.tb_dir, purge_step=self.step + 1 if resume_state else None))
        for event in data_events:  # the console saw these already; the run directory records them
            broadcast(writers)(event)
        self.emit = broadcast([*writers, self.user_emit])
        if resume_state is not None:
            self.emit(Resumed(
                step=self.step, checkpoint=str(self.resume_path),
                skipped=[(str(p), why) for p, why in self.skipped],
                config_changes={k: list(v) for k, v in self.config_changes.items()},
                dropped_metrics=dropped, removed_temp_files=[str(p) for p in self.removed_temp],
            ))
            for path, why in self.skipped:
                self.emit(Notice(level="warning", message=f"skipped {path}: {why}; resuming from {self.resume_path}"))
            for path in self.removed_temp:
                self.emit(Notice(level="info", message=f"removed {path}, left by an interrupted save"))
            if self.superseded:
                self.emit(Notice(level="info", message=(
                    f"moved {len(self.superseded)} checkpoint(s) past step {self.step} or unreadable to "
                    f"{self.superseded[0].parent} ({', '.join(p.name for p in self.superseded)})")))

    def _check_resumable(self, state: dict[str, Any]) -> None:
        missing = [k for k in CHECKPOINT_FORMAT_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"{self.resume_path}: cannot resume from it (missing {', '.join(missing)})")
        if int(state.get("world_size", 1)) != 1:
            raise CheckpointError(f"{self.resume_path}: written by {state['world_size']} processes; "
                                  "resume it with the same number of processes")
        if state.get("data_fingerprint") not in (None, self.data_fingerprint):
            raise DataError(
                f"resume: the data of {self.run.path} changed since the checkpoint "
                f"({self.config.data.dataset} now tokenises differently); restore the original files or start a new run"
            )
        from lmkit.data.tokenizers import load_tokenizer

        saved = load_tokenizer(self.run.tokenizer_dir)
        if saved.fingerprint() != self.data.tokenizer.fingerprint():
            raise DataError(f"resume: {self.run.tokenizer_dir} differs from the tokenizer the data was "
                            "prepared with; the run cannot continue on these ids")
        self.version_notes = []
        for key, now in (("lmkit_version", __version__), ("torch_version", str(torch.__version__))):
            then = state.get(key)
            if then is not None and then != now:
                self.version_notes.append(f"checkpoint written by {key.split('_')[0]} {then}, now {now}: "
                                          "the continuation may differ from an uninterrupted run in the last bits")

    def _align_checkpoints(self, state: dict[str, Any]) -> list[Path]:
        """Resuming from anything but a complete ``latest.pt`` of the newest step: move the
        checkpoints of later steps (an abandoned continuation) and unreadable ones to
        ``checkpoints/superseded/``, and make ``latest.pt`` the state resumed from, so that
        a crash before the next save resumes from here again."""
        latest = self.run.checkpoint_path("latest")
        if self.resume_path == latest:
            return []
        aside = self.run.checkpoints / "superseded"
        moved = []
        for path in sorted(self.run.checkpoints.glob("*.pt")):
            if path == self.resume_path:
                continue
            step = peek_step(path)
            if step is None or step > self.step:
                aside.mkdir(exist_ok=True)
                target = aside / path.name
                if target.exists():
                    target = aside / f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}.pt"
                os.replace(path, target)
                moved.append(target)
        if self.resume_path.parent == self.run.checkpoints:
            link_checkpoint(self.resume_path, latest)
        else:
            save_checkpoint({k: v for k, v in state.items() if k != "manifest"}, latest)
        return moved

    def _check_checkpoint_config(self, state: dict[str, Any]) -> None:
        """The checkpoint must come from this run's model, data and optimisation: a
        hand-edited ``config.yaml`` or another run's checkpoint is refused, naming the keys."""
        from lmkit.config import RunConfig
        from lmkit.training.resume import SAFE_KEYS, config_changes

        try:
            saved = RunConfig.model_validate(state.get("config") or {})
        except Exception:  # noqa: BLE001 - an incompatible or missing config
            raise CheckpointError(f"{self.resume_path}: holds no config this lmkit can read") from None
        ignore = {"name", "out_dir", "preset"}
        unsafe = {k: v for k, v in config_changes(saved, self.config).items() if k not in SAFE_KEYS | ignore}
        if unsafe:
            listed = ", ".join(f"{k} = {old!r} (now {new!r})" for k, (old, new) in unsafe.items())
            raise CheckpointError(
                f"{self.resume_path}: was trained with {listed}; config.yaml was edited or the checkpoint is "
                "from another run -- restore the config or start a new run"
            )

    def _restore(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{self.resume_path}: does not fit this model ({first_line(exc, 160)})") from None
        self.scheduler.load_state_dict(state["scheduler"])
        # A changed length re-targets the schedule: the next step must use the new
        # schedule's LR (the saved one was computed for the old end).
        for group, base_lr, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                      self.scheduler.lr_lambdas, strict=True):
            group["lr"] = base_lr * fn(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # noqa: SLF001
        if state.get("scaler") and self.plan.use_scaler:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.micro_step = int(state["micro_step"])
        self.tokens = int(state["tokens"])
        self.best_val_loss = float(state["best_val_loss"])
        self.best_step = state.get("best_step")
        self.nan_skips = int(state.get("nan_skips", 0))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.last_train_loss = state.get("last_train_loss")
        self.window = dict(state.get("log_window") or self.window)
        last = state.get("last_val")
        if last:
            self.last_val = EvalResult(step=last["step"], epoch=last["epoch"], tokens=last["tokens"], split="val",
                                       loss=last["loss"], metrics=dict(last["metrics"]), is_best=False, elapsed_s=0.0)
        epoch_now = self.micro_step // self.micro_per_epoch
        for path in sorted(self.run.checkpoints.glob("*.pt")):
            match = _PERIODIC.match(path.name)
            if match and int(match.group(2)) <= (self.step if match.group(1) == "step" else epoch_now):
                self.periodic[match.group(1)].append(path)
        for kind in self.periodic:
            self.periodic[kind].sort(key=lambda p: int(_PERIODIC.match(p.name).group(2)))
        set_rng_state(state["rng"])

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

    def elapsed(self) -> float:
        return self.elapsed_before + (time.time() - self.t_session)

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
        # The step-0 evaluation of the untrained model is a baseline, not a "best".
        is_best = self.step > 0 and loss < self.best_val_loss
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
            "format": 2,
            "lmkit_version": __version__,
            "torch_version": str(torch.__version__),
            "world_size": 1,
            "step": self.step,
            "micro_step": self.micro_step,
            "epoch": self.epoch(),
            "tokens": self.tokens,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "nan_skips": self.nan_skips,
            "elapsed_s": self.elapsed(),
            "last_train_loss": self.last_train_loss,
            "log_window": dict(self.window),
            "last_val": (None if self.last_val is None else {
                "step": self.last_val.step, "epoch": self.last_val.epoch, "tokens": self.last_val.tokens,
                "loss": self.last_val.loss, "metrics": dict(self.last_val.metrics)}),
            "data_fingerprint": self.data_fingerprint,
            "model": clean_state_dict(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.plan.use_scaler else None,
            "rng": rng_state(),
            "config": self.config.model_dump(mode="json"),
        }

    def save(self, tags: list[str]) -> None:
        """Write the checkpoint once and hard-link it under every tag, ``latest`` last: a
        crash in between leaves ``latest`` at the previous step, consistent with its tags
        (the new tag files hold this same deterministic step and are overwritten when the
        resumed run gets here again)."""
        started = time.time()
        order = [t for t in tags if t != "latest"] + [t for t in tags if t == "latest"]
        paths = [self.run.checkpoint_path(tag) for tag in order]
        save_checkpoint(self.state(), paths[0])
        for path in paths[1:]:
            link_checkpoint(paths[0], path)
        keep = self.config.training.keep_last
        for path in paths:
            match = _PERIODIC.match(path.name)
            if match:
                kept = self.periodic[match.group(1)]
                if path in kept:
                    kept.remove(path)
                kept.append(path)
                while keep is not None and len(kept) > keep:
                    kept.pop(0).unlink(missing_ok=True)
        val = self.last_val.loss if self.last_val is not None and self.last_val.step == self.step else None
        self.emit(CheckpointSaved(step=self.step, path=str(self.run.checkpoint_path(tags[0])), tags=tuple(tags),
                                  val_loss=val,
                                  seconds=time.time() - started))

    # ------------------------------------------------------------------ one step

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """One optimizer step: the mean loss and grad norm (device tensors), the LR the
        step used, and the number of targets it saw.

        Raises:
            TrainingError: non-finite loss or gradient norm with ``on_nan: abort`` --
                raised before ``optimizer.step()``, so the weights never take the update.
            DataError: a batch holds an id >= ``vocab_size`` (a corrupt shard).
        """
        tcfg = self.config.training
        accum = tcfg.grad_accum_steps
        loss_sum = torch.zeros((), device=self.plan.device)
        n_targets = 0
        for _ in range(accum):
            x_np, y_np = self.batches.batch(self.micro_step)
            if int(x_np.max()) >= self.vocab_size or int(y_np.max()) >= self.vocab_size:
                raise DataError(f"micro-batch {self.micro_step} holds a token id >= vocab_size {self.vocab_size}: "
                                "the token shards are corrupt; delete the token cache to rebuild them")
            n_targets += int((y_np != -100).sum())
            x, y = self._to_device(x_np), self._to_device(y_np)
            with self.plan.autocast():
                _, loss = self.train_model(x, y)
            self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float()
            self.micro_step += 1
            if self._test_signal is not None and self._test_signal[0] == self.micro_step:
                os.kill(os.getpid(), self._test_signal[1])
        loss = loss_sum / accum
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.grad_clip or math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        # fp16: overflowing gradients are the GradScaler's business (it skips the step);
        # a non-finite *loss* is a real divergence in every precision.
        bad = ~torch.isfinite(loss) if self.plan.use_scaler else ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if bool(bad):  # the one host-device sync of a step
            self.optimizer.zero_grad(set_to_none=True)
            if tcfg.on_nan == "abort":
                latest = self.run.checkpoint_path("latest")
                raise TrainingError(
                    f"non-finite loss ({loss.item()}) or gradient norm ({grad_norm.item()}) at step {self.step + 1}; "
                    f"the update was not applied and nothing was saved; last good checkpoint: "
                    f"{latest if latest.exists() else 'none'} (resume it with --on-nan skip, or start a new run "
                    "with a lower --lr)"
                )
            self.scaler.update()
            self.nan_skips += 1
            self.emit(Notice(level="warning", message=f"step {self.step + 1}: non-finite loss or gradient norm; "
                                                      f"update skipped ({self.nan_skips} so far)"))
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return loss, grad_norm, lr, n_targets

    # ------------------------------------------------------------------ the loop

    def run_loop(self, stop: StopRequest) -> None:
        tcfg = self.config.training
        flops_per_token = self.model.flops_per_token()
        start_step = self.step
        self.emit(RunStarted(
            name=self.run.name, run_dir=str(self.run.path), preset=self.config.preset, model_type=self.config.model.type,
            n_params=self.n_params, device=str(self.plan.device), device_name=self.plan.description,
            precision=self.plan.precision, compile=tcfg.compile, max_steps=self.max_steps,
            steps_per_epoch=self.steps_per_epoch,
            tokens_per_step=tcfg.batch_size * tcfg.grad_accum_steps * self.config.model.block_size,
            start_step=start_step, device_uuid=_device_uuid(self.plan.device),
        ))
        if self.plan.reason.startswith("auto"):
            self.emit(Notice(level="info", message=f"device {self.plan.device} ({self.plan.reason})"))
        for note in getattr(self, "version_notes", []):
            self.emit(Notice(level="warning", message=note))
        if tcfg.warmup_steps >= self.max_steps:
            peak = tcfg.lr * (self.max_steps - 1) / tcfg.warmup_steps
            self.emit(Notice(level="warning", message=(
                f"training.warmup_steps ({tcfg.warmup_steps}) >= the run's {self.max_steps} steps: the LR only "
                f"reaches {peak:.2e} of its {tcfg.lr:.2e} peak; lower it with --set training.warmup_steps=N")))
        if tcfg.eval_at_start and start_step == 0:
            self.evaluate()

        self.model.train()
        # The mean loss of a log window survives a resume (its sum and length are in the
        # checkpoint), so a resumed run logs the same numbers as an uninterrupted one;
        # tokens/s and step time are measured over this session only.
        window_loss = torch.tensor(float(self.window["loss_sum"]), device=self.plan.device)
        window_steps = int(self.window["steps"])
        rate_steps, rate_tokens = 0, 0
        rate_start, paused = time.time(), 0.0
        while self.step < self.max_steps:
            prev_micro = self.micro_step
            loss, grad_norm, lr, n_targets = self.train_step()
            window_loss += loss
            window_steps += 1
            rate_steps += 1
            rate_tokens += n_targets
            self.tokens += n_targets

            last = self.step == self.max_steps
            if self.step % tcfg.log_interval == 0 or self.step == 1 or last:
                mean = float(window_loss.item()) / window_steps
                now = time.time()
                seconds = max(1e-9, now - rate_start - paused)
                tok_per_s = rate_tokens / seconds
                self.last_train_loss = mean
                self.emit(StepMetrics(
                    step=self.step, max_steps=self.max_steps, epoch=self.epoch(), tokens=self.tokens, loss=mean,
                    lr=lr, grad_norm=float(grad_norm.item()),
                    tok_per_s=tok_per_s, step_time_s=seconds / max(1, rate_steps),
                    mfu=(flops_per_token * tok_per_s / self.plan.peak_flops) if self.plan.peak_flops else None,
                    gpu_mem_gb=(torch.cuda.max_memory_allocated(self.plan.device) / 2**30
                                if self.plan.device.type == "cuda" else None),
                    elapsed_s=self.elapsed(),
                    # allocator counters (host-side reads, no sync); the scale's .item() syncs,
                    # but only here, where logging already synced on the loss
                    gpu_alloc_gb=(torch.cuda.memory_allocated(self.plan.device) / 2**30
                                  if self.plan.device.type == "cuda" else None),
                    gpu_reserved_gb=(torch.cuda.memory_reserved(self.plan.device) / 2**30
                                     if self.plan.device.type == "cuda" else None),
                    grad_scale=float(self.scaler.get_scale()) if self.plan.use_scaler else None,
                    nan_skips=self.nan_skips,
                ))
                window_loss = torch.zeros((), device=self.plan.device)
                window_steps, rate_steps, rate_tokens = 0, 0, 0
                rate_start, paused = time.time(), 0.0

            stopping = stop.requested  # read once: a signal arriving later waits for the next step
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
            if tags or evaluated or last or stopping:
                self.window = {"loss_sum": float(window_loss.item()), "steps": window_steps}
                self.save(["latest", *tags])
            paused += time.time() - pause_start

            if stopping and not last:
                raise Interrupted(
                    f"stopped by {stop.name} at step {self.step}; saved {self.run.checkpoint_path('latest')}; "
                    f"resume with: lmkit resume {self.run.path}",
                    exit_code=128 + int(stop.signum),
                )

    def summary(self, status: str) -> dict[str, Any]:
        wall = self.elapsed() if hasattr(self, "t_session") else 0.0
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
            "final_val_step": val.step if val else None,
            "best_val_loss": self.best_val_loss if self.best_step is not None else None,
            "best_step": self.best_step,
            "final_metrics": dict(val.metrics) if val else {},
            "nan_skips": self.nan_skips,
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
            ConfigError / DataError / CheckpointError: bad input (exit 2), before any step.
            DeviceError: no CUDA for ``gpu_only``, missing device, out of memory (exit 3).
            TrainingError: non-finite loss (exit 1).
            Interrupted: SIGINT / SIGTERM, after ``latest`` was saved (exit 130 / 143).
        """
        try:
            self.setup()
        except BaseException as exc:
            if _is_memory_error(exc):
                raise self._oom_error(exc) from None
            raise
        self.t_session = time.time()
        status = "failed"
        stop = StopRequest()
        try:
            with stop:
                self.run_loop(stop)
            status = "completed"
        except Interrupted:
            status = "interrupted"
            raise
        except BaseException as exc:
            if not (stop.aborted or isinstance(exc, KeyboardInterrupt)):
                if _is_memory_error(exc):
                    raise self._oom_error(exc) from None
                raise
            status = "aborted"
            raise Interrupted(
                f"aborted by a second Ctrl-C at step {self.step}; nothing more was saved and the last checkpoint "
                f"is untouched; resume with: lmkit resume {self.run.path}", exit_code=130) from None
        finally:
            summary = self.summary(status)
            self.run.write_summary(summary)
            self.emit(RunFinished(status=status, summary=summary))
            self.run.unlock()
        return summary

    def _oom_error(self, exc: BaseException) -> DeviceError:
        tcfg = self.config.training
        n_params = getattr(self, "n_params", None)
        static = ""
        if n_params:
            need = 16 * n_params  # fp32 weights + grads + AdamW's two moments
            size = f"{need / 2**30:.2f} GiB" if need >= 2**30 else f"{need / 2**20:.1f} MiB"
            static = f" (weights + grads + AdamW alone need ~{size} before activations)"
        where = "GPU" if isinstance(exc, torch.OutOfMemoryError) else "host"
        return DeviceError(
            f"out of {where} memory at batch size {tcfg.batch_size}{static}; try a smaller --batch-size with "
            "--set training.grad_accum_steps=N, --grad-checkpointing, or --bf16"
        )


def train(config: RunConfig, emit: Callable[[Event], None] = null_emit) -> dict[str, Any]:
    """Train ``config`` as a new run and return its summary (see :meth:`Trainer.run`)."""
    return Trainer(config, emit).run()


def resume(run: str | Path, emit: Callable[[Event], None] = null_emit, *, checkpoint: str | None = None,
           overrides: Iterable[str] = (), flags: Mapping[str, tuple[str, Any]] | None = None,
           out_dir: str | Path = "runs") -> dict[str, Any]:
    """Continue the run directory ``run`` (a path, or a name under ``out_dir``).

    Args:
        checkpoint: ``None`` for the newest complete checkpoint (skipping corrupt ones,
            with a warning), or ``latest``/``best``/``step_…``/``epoch_…``/a path (an error,
            exit 2, when that one is corrupt).
        overrides / flags: allowed config changes (see :mod:`lmkit.training.resume`).

    Raises:
        ConfigError: no such run, or a change that would make it a different run.
        CheckpointError: no usable checkpoint.
    """
    run_dir = RunDir.existing(run, out_dir)
    config, changes = resume_config(run_dir.config_path, overrides, flags)
    if config.name != run_dir.name:  # the folder was copied or renamed: it is the run now
        changes["name"] = (config.name, run_dir.name)
        config = config.model_copy(update={"name": run_dir.name, "out_dir": str(run_dir.path.parent)})
    return Trainer(config, emit, resume_dir=run_dir.path, checkpoint=checkpoint, config_changes=changes).run()


__all__ = ["Trainer", "resume", "rng_state", "seed_everything", "set_rng_state", "train"]
