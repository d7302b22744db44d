"""The training loop: new runs and exact resumes.

:func:`train` runs a :class:`~lmkit.config.RunConfig` to completion; :func:`resume`
continues a run directory from a checkpoint. Order of work, so that bad input fails
before anything is written: device and precision (exit 3 / 2), the run directory (a new
run claims its folder; a resume picks and verifies its checkpoint), data (exit 2), model
and data agreement (exit 2); only then is the first step taken.

One optimizer step = ``grad_accum_steps`` micro-batches of ``batch_size`` sequences. The
step's loss is the mean over *all* its target tokens: each micro-batch's mean loss is
weighted by its share of the step's targets (a short or padded micro-batch does not get
the weight of a full one -- the bug transformers fixed in 4.46), so accumulating 2 x B
equals one batch of 2B. Batches are a pure function of the micro-batch index
(:mod:`lmkit.data.batching`), and checkpoints hold every piece of state that affects the
next step -- weights, optimizer, LR schedule, GradScaler, counters, best val loss, the
hooks' state and the python/numpy/torch/CUDA RNG states -- so a resumed run takes
bitwise the same steps as one that never stopped.

Everything around the step is a training hook (:mod:`lmkit.training.hooks`): the
throughput meter and log line, the non-finite guard, evaluation and the checkpoint
policy; features add theirs with :meth:`Trainer.add_hook`.

Stopping: SIGINT and SIGTERM finish the current step, save ``latest`` and exit 130 /
143 (:mod:`lmkit.training.signals`). Non-finite steps: :mod:`lmkit.training.nan_guard`.

Several processes (``torchrun --nproc-per-node N -m lmkit train ...``, ``WORLD_SIZE > 1``):
DistributedDataParallel or FSDP2 (``training.parallelism``), with ``grad_accum_steps`` per rank
and the global batch ``W * grad_accum_steps * batch_size``; the ranks take interleaved
micro-batches of the same global order, the loss is weighted by the global target count, rank
0 alone writes the run folder, and the stop request is agreed one step late
(:mod:`lmkit.training.distributed`). What differs between one process, DDP and FSDP -- the
wrapping, the per-micro-batch gradient sync, the loss factor, clipping, the checkpoint's form
-- is the :class:`~lmkit.training.parallel.Strategy`. A DDP checkpoint is one file, as on one
process; an FSDP run's are DCP folders (``checkpoints/TAG.dcp``, :mod:`lmkit.training.sharded`).
Either resumes on another number of processes with the global batch kept (the per-rank
accumulation rescaled; a notice says the continuation is then not bitwise).

Starting from trained weights (``init_from``: another run or a Hugging Face folder): the
source is loaded and the config given its architecture and tokenizer before the run folder is
claimed, the weights are copied in after the model is built, and the optimizer and schedule
start fresh (:mod:`lmkit.training.init_from`). A resume of such a run continues it from its
own checkpoint and ``tokenizer/`` folder.
"""

from __future__ import annotations

import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmkit.config import RunConfig
from lmkit.data import PreparedData, make_train_batches, prepare_data
from lmkit.data.batching import IGNORE_INDEX
from lmkit.device import DevicePlan, device_uuid, is_memory_error, out_of_memory_error, plan_device
from lmkit.errors import ConfigError, Interrupted
from lmkit.events import (
    DataReady,
    EvalResult,
    Event,
    Notice,
    Resumed,
    RunFinished,
    RunStarted,
    broadcast,
    null_emit,
)
from lmkit.models import build_model
from lmkit.monitor.writers import EventsWriter, MetricsWriter, TensorBoardWriter
from lmkit.rundir import RunDir, SupersededRecords
from lmkit.training.checkpoint import (
    existing_checkpoint,
    newest_complete,
    remove_stale_temp_files,
    verify_candidate,
)
from lmkit.training.checkpointing import CheckpointPolicy
from lmkit.training.distributed import Distributed, StopVote, exit_on_late_sigterm
from lmkit.training.hooks import Hooks, StepOutput, TrainingHook
from lmkit.training.nan_guard import NaNGuard, skips_on_device
from lmkit.training.optim import build_optimizer
from lmkit.training.parallel import Strategy, make_strategy
from lmkit.training.resume import (
    align_checkpoints,
    check_checkpoint_config,
    check_resumable,
    rescale_accumulation,
    resume_config,
)
from lmkit.training.rng import rng_state, seed_everything, set_rng_state
from lmkit.training.schedule import build_scheduler, lr_multiplier, steps_to_peak
from lmkit.training.signals import StopNow, StopRequest
from lmkit.training.state import run_summary
from lmkit.training.throughput import ThroughputMeter


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
        notes: lines for the run's header (e.g. the CLI's thread choice), emitted as notices.
        run_dir: a new run's folder, claimed before this process started (lmkit's launcher,
            :meth:`~lmkit.rundir.RunDir.claimed`), instead of claiming one.
    """

    def __init__(self, config: RunConfig, emit: Callable[[Event], None] = null_emit, *,
                 resume_dir: Path | None = None, checkpoint: str | None = None,
                 config_changes: Mapping[str, tuple[Any, Any]] | None = None, notes: Iterable[str] = (),
                 run_dir: Path | None = None):
        self.config = config.model_copy(deep=True)
        self.claimed_run_dir = run_dir
        self.user_emit = emit
        self.emit = emit
        self.resume_dir = resume_dir
        self.checkpoint_choice = checkpoint
        self.config_changes = dict(config_changes or {})
        self.hooks = Hooks()
        self.notes: list[tuple[str, str]] = [("info", note) for note in notes]
        self.init_source: Any = None  # lmkit.training.init_from.InitSource of a new init_from run
        # Test hook: LMKIT_TEST_SIGNAL="MICRO:SIGNAME" sends the signal to this process right
        # after micro-batch MICRO, to place an interruption mid-accumulation deterministically.
        hook = os.environ.get("LMKIT_TEST_SIGNAL", "")
        self._test_signal = (int(hook.split(":")[0]), getattr(signal, hook.split(":")[1])) if ":" in hook else None

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        cfg = self.config
        tcfg = cfg.training
        self._apply_threads()
        self.plan: DevicePlan = plan_device(tcfg, preset=self.config.preset)
        self.dist = Distributed.from_env(tcfg.parallelism)
        if self.dist.enabled:  # torchrun (WORLD_SIZE > 1, or 1 with a parallelism): join the process group first
            self.dist.check(tcfg.parallelism, self.plan.device.type, optimizer=tcfg.optimizer,
                            precision=self.plan.precision)
            self.plan = self._rank_plan(self.plan)
            self.dist.start(self.plan.device)
        self.strategy: Strategy = make_strategy(self.dist, tcfg.parallelism, self.plan.device)
        uuid = device_uuid(self.plan.device)  # CUDA: this node's ranks' GPUs, for the dashboard
        self.local_device_uuids = tuple(u for u in self.dist.node_values(uuid) if u) if uuid else ()
        resume_state: dict[str, Any] | None = None
        if self.resume_dir is not None:
            self.run = RunDir(self.resume_dir)
            self.removed_temp = []

            def pick() -> tuple[dict[str, Any], Path, list[tuple[Path, str]]]:
                self.run.lock()
                self.removed_temp = remove_stale_temp_files(self.run.checkpoints)
                return self._pick_checkpoint()

            try:
                if self.dist.is_main:
                    resume_state, self.resume_path, self.skipped = self.dist.rank0_first(pick)
                    self.dist.broadcast_object(str(self.resume_path))
                else:  # the checkpoint rank 0 picked
                    self.dist.rank0_first(lambda: None)
                    self.resume_path, self.skipped = Path(self.dist.broadcast_object(None)), []
                    resume_state = _picked_state(self.resume_path)
                check_checkpoint_config(resume_state, self.config, self.resume_path)  # before data: fail fast
                tcfg.grad_accum_steps, note = rescale_accumulation(
                    resume_state, self.resume_path, world_size=self.dist.world_size,
                    grad_accum_steps=tcfg.grad_accum_steps, parallelism=self.strategy.name)
                if note:
                    self.notes.append(("info" if "not bitwise" not in note else "warning", note))
            except BaseException:
                self.run.unlock()
                raise
        else:
            if cfg.init_from:  # load the source before claiming a folder: a bad source writes nothing
                from lmkit.training.init_from import load_init_source, merge_config

                self.init_source = load_init_source(cfg.init_from, out_dir=cfg.out_dir)
                self.notes.extend(merge_config(cfg, self.init_source))
                if "init_source" in type(cfg).model_fields:  # the config's record of the source
                    cfg.init_source = self.init_source.record()
            if self.dist.is_main:
                self.run = self.dist.rank0_first(lambda: RunDir.claim(cfg) if self.claimed_run_dir is None
                                                 else RunDir.claimed(self.claimed_run_dir))
                self.dist.broadcast_object(str(self.run.path))
            else:  # rank 0 claimed the folder; every rank knows it
                self.dist.rank0_first(lambda: None)
                self.run = RunDir(Path(self.dist.broadcast_object(None)))
            cfg.name = self.run.name
        try:
            with StopNow():
                self._build(resume_state)
        except BaseException:
            self.run.release()
            raise

    def _rank_plan(self, plan: DevicePlan) -> DevicePlan:
        """The device plan of this rank: ``cuda:LOCAL_RANK`` on CUDA (the plan was made for one device)."""
        import dataclasses

        device = self.dist.device(plan.device)
        if device == plan.device:
            return plan
        return dataclasses.replace(plan, device=device, description=plan.description.replace(
            str(plan.device), str(device), 1))

    def _init_tokenizer(self, resume_state: dict[str, Any] | None) -> Any:
        """The tokenizer to encode the data with, when it is not built from ``data.tokenizer``: an
        ``init_from`` run's source tokenizer, and on its resume the run's own ``tokenizer/`` copy of
        it (the source is never read again); ``None`` otherwise."""
        if self.init_source is not None and resume_state is None:
            return self.init_source.tokenizer
        if self.config.init_from and resume_state is not None:
            from lmkit.data.tokenizers import load_tokenizer

            return load_tokenizer(self.run.tokenizer_dir)
        return None

    def _apply_threads(self) -> None:
        """Use ``training.threads`` CPU threads (unless the user's OMP_NUM_THREADS / LMKIT_THREADS
        says otherwise: the user wins, with a warning on a resume), then record the count used."""
        import torch

        tcfg = self.config.training
        env = os.environ.get("LMKIT_THREADS") or os.environ.get("OMP_NUM_THREADS")
        if tcfg.threads is not None:
            if env and env.split(",")[0].strip() != str(tcfg.threads):
                if self.resume_dir is not None:
                    self.notes.append(("warning", f"training.threads is {tcfg.threads} but the environment asks "
                                                  f"for {env}: using {torch.get_num_threads()}; the continuation "
                                                  "is not bitwise the uninterrupted run"))
            elif torch.get_num_threads() != tcfg.threads:
                torch.set_num_threads(tcfg.threads)
        changed = self.config_changes.get("training.threads")
        if changed and changed[0] is not None:
            self.notes.append(("warning", f"training.threads changed from {changed[0]} to {changed[1]} on resume: "
                                          "results now differ from the uninterrupted run in the last bits"))
        elif self.resume_dir is not None and tcfg.threads == torch.get_num_threads():
            self.notes.append(("info", f"threads: {tcfg.threads}, as the run was started with (training.threads)"))
        tcfg.threads = torch.get_num_threads()

    def _pick_checkpoint(self) -> tuple[dict[str, Any], Path, list[tuple[Path, str]]]:
        if self.checkpoint_choice is None:
            found, skipped = newest_complete(self.run.checkpoints)
            return found.state, found.path, skipped
        path = existing_checkpoint(self.run.checkpoints, self.checkpoint_choice, self.run.path)
        return verify_candidate(path), path, []

    def _build(self, resume_state: dict[str, Any] | None) -> None:
        cfg, tcfg = self.config, self.config.training
        data_events: list[Event] = []

        def emit_data(event: Event) -> None:
            if isinstance(event, DataReady):
                data_events.append(event)
            self.user_emit(event)

        # several ranks: rank 0 trains the tokenizer and builds the shards, the others then read the cache
        self.data: PreparedData = self.dist.rank0_first(lambda: prepare_data(
            cfg.data, emit_data, tokenizer=self._init_tokenizer(resume_state), block_size=cfg.model.block_size))
        if os.environ.get("LMKIT_TEST_SIGNAL_SETUP"):  # test hook: a signal during set-up
            os.kill(os.getpid(), getattr(signal, os.environ["LMKIT_TEST_SIGNAL_SETUP"]))
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = self.data.tokenizer.vocab_size
        self.data.check_model(cfg.model)
        self.data_fingerprint = self.data.fingerprint()
        self.version_notes: list[str] = []
        if resume_state is not None:
            self.version_notes = check_resumable(
                resume_state, self.resume_path, data_fingerprint=self.data_fingerprint, dataset=cfg.data.dataset,
                run_path=self.run.path, tokenizer_fingerprint=self.data.tokenizer.fingerprint(),
                tokenizer_dir=self.run.tokenizer_dir, world_size=self.dist.world_size)

        seed_everything(tcfg.seed)
        self.model = build_model(cfg.model)
        if self.init_source is not None and resume_state is None:
            from lmkit.training.init_from import load_init_weights

            load_init_weights(self.model, self.init_source)
            self.init_source.state = {}  # the model holds them now
        self.model.to(self.plan.device)
        self.model.grad_checkpointing = tcfg.grad_checkpointing
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.strategy.shard(self.model, self.plan.precision)  # FSDP: before the optimizer sees the parameters

        self.batches = make_train_batches(self.data, cfg.model.block_size, tcfg.batch_size, tcfg.seed)
        accum = tcfg.grad_accum_steps * self.dist.world_size  # global micro-batches per step
        self.micro_per_epoch = self.batches.batches_per_epoch
        self.steps_per_epoch = max(1, math.ceil(self.micro_per_epoch / accum))
        if tcfg.max_steps is not None:
            self.max_steps = tcfg.max_steps
        else:
            self.max_steps = max(1, math.ceil(tcfg.epochs * self.micro_per_epoch / accum))

        self.optimizer = build_optimizer(self.model, tcfg, self.plan.device)
        self.scheduler = self._new_scheduler(self.optimizer)
        self.scaler = torch.amp.GradScaler(self.plan.device.type, enabled=self.plan.use_scaler)

        self.step = 0
        self.micro_step = 0
        self.tokens = 0
        self.best_val_loss = math.inf
        self.best_step: int | None = None
        self.elapsed_before = 0.0
        self.last_val: EvalResult | None = None
        self.last_train_loss: float | None = None
        self.stopping = False
        self.flops_per_token = self.model.flops_per_token()
        # tokens/s are global under DDP: MFU is against the peak of all the ranks' devices together
        peak = self.plan.peak_flops * self.dist.world_size if self.plan.peak_flops else self.plan.peak_flops
        self.meter = ThroughputMeter(self.plan.device, self.flops_per_token, peak)
        self.nan_guard = NaNGuard(tcfg.on_nan, self.plan.use_scaler, self.plan.device)
        self.evaluator = self.strategy.evaluator()
        self.checkpoint_policy = CheckpointPolicy()
        # Order matters: the log line first (its sync ends the step's training time), the guard
        # (which reads its device counter at log lines), the hooks added with add_hook, then
        # evaluation and saving, so a save holds every hook's state of this step.
        added = [*self._feature_hooks(), *self.hooks]
        if tcfg.adapt_threads and self.plan.device.type == "cpu":  # opt-in: follow the CPU's load
            from lmkit.training.thread_adapt import ThreadAdapter

            added.append(ThreadAdapter())
        if cfg.init_from:  # the source's record: in every checkpoint (a resume restores it) and summary.json
            from lmkit.training.init_from import InitRecord

            added.append(InitRecord(self.init_source.record() if self.init_source is not None else None))
        self.hooks = Hooks([self.meter, self.nan_guard, *added, self.evaluator, self.checkpoint_policy])
        self.rng_notes: list[str] = []
        if resume_state is not None:
            self.strategy.restore(self, resume_state)
            if self.max_steps < self.step:
                raise ConfigError(
                    f"resume: the new length ({self.max_steps} steps) is shorter than what {self.run.path} "
                    f"has trained ({self.step} steps); pass --max-steps N with N > {self.step} to train further"
                )
            if self.max_steps == self.step:
                raise ConfigError(
                    f"resume: {self.run.path} has finished its {self.max_steps} steps; "
                    f"to train further pass --max-steps N with N > {self.step} (or a larger --epochs)"
                )
        self.train_model = self.strategy.wrap(self, resume_state, tcfg.compile)
        described = self.strategy.describe(tcfg.batch_size, tcfg.grad_accum_steps)
        if described:
            self.notes.append(("info", described))
        self.vocab_size = cfg.model.vocab_size
        self.superseded: list[Path] = []
        if not self.dist.is_main:  # rank 0 alone writes the run folder; this rank prints warnings only
            return

        self.run.create()
        self.run.write_config(cfg)
        if resume_state is None:
            self.data.tokenizer.save(self.run.tokenizer_dir)
            moved = None
        else:
            moved = self.run.supersede_records_after(self.step)  # moved aside, never deleted
            self.superseded = align_checkpoints(self.run.checkpoints, self.resume_path, self.step, resume_state)
        writers: list[Callable[[Event], None]] = [MetricsWriter(self.run.metrics_path),
                                                  EventsWriter(self.run.events_path)]
        loggers = tcfg.loggers if tcfg.loggers is not None else (["tensorboard"] if tcfg.tensorboard else [])
        if "tensorboard" in loggers:
            writers.append(TensorBoardWriter(self.run.tb_dir, purge_step=self.step + 1 if resume_state else None))
        if "wandb" in loggers:
            from lmkit.monitor.wandb import WandbWriter  # needs the lmkit[wandb] extra

            writers.append(WandbWriter(cfg, self.run, resumed=resume_state is not None))
        for event in data_events:  # the console saw these already; the run directory records them
            broadcast(writers)(event)
        self.emit = broadcast([*writers, self.user_emit])
        if resume_state is not None:
            self._announce_resume(moved)

    def _announce_resume(self, moved: SupersededRecords) -> None:
        self.emit(Resumed(
            step=self.step, checkpoint=str(self.resume_path),
            skipped=[(str(p), why) for p, why in self.skipped],
            config_changes={k: list(v) for k, v in self.config_changes.items()},
            dropped_metrics=moved.metrics, removed_temp_files=[str(p) for p in self.removed_temp],
            superseded_metrics=str(moved.metrics_path) if moved.metrics_path else None,
        ))
        for path, why in self.skipped:
            self.emit(Notice(level="warning", message=f"skipped {path}: {why}; resuming from {self.resume_path}"))
        for path in self.removed_temp:
            self.emit(Notice(level="info", message=f"removed {path}, left by an interrupted save"))
        if self.superseded:
            self.emit(Notice(level="info", message=(
                f"moved {len(self.superseded)} checkpoint(s) past step {self.step} or unreadable to "
                f"{self.superseded[0].parent} ({', '.join(p.name for p in self.superseded)})")))
        if moved.metrics_path is not None:
            self.emit(Notice(level="info", message=(
                f"moved {moved.metrics} metrics.jsonl record(s) past step {self.step} to {moved.metrics_path}")))
        if moved.events_path is not None:
            self.emit(Notice(level="info", message=f"moved unreadable events.jsonl lines to {moved.events_path}"))
        for note in self.rng_notes:
            self.emit(Notice(level="warning", message=note))

    def _feature_hooks(self) -> list[TrainingHook]:
        """The hooks of the config's feature sections (:func:`lmkit.config.register_feature`),
        in registration order; a factory returns ``None`` for a feature that is off."""
        import importlib

        from lmkit.config import FEATURE_HOOKS

        hooks = []
        for section, target in FEATURE_HOOKS.items():
            module, _, attr = target.partition(":")
            hook = getattr(importlib.import_module(module), attr)(getattr(self.config, section), self)
            if hook is not None:
                if self.dist.enabled:  # they change the model or write the run folder from every rank
                    raise ConfigError(f"{section}: not yet supported with {self.dist.world_size} processes "
                                      f"({(self.config.training.parallelism or 'ddp').upper()}); "
                                      "train this run on one process")
                hooks.append(hook)
        return hooks

    def _new_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        tcfg = self.config.training
        return build_scheduler(optimizer, schedule=tcfg.schedule, warmup_steps=tcfg.warmup_steps,
                               total_steps=self.max_steps, min_lr_ratio=tcfg.min_lr_ratio,
                               warmup_form=tcfg.warmup_form, warmdown_ratio=tcfg.warmdown_ratio)

    def position_schedule(self, steps_taken: int) -> None:
        """Put the schedule at ``steps_taken`` and set every group's LR to what the next step
        uses (after a restore, a changed run length or a rebuilt optimizer)."""
        self.scheduler.last_epoch = steps_taken
        for group, base_lr, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                      self.scheduler.lr_lambdas, strict=True):
            group["lr"] = base_lr * fn(steps_taken)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # noqa: SLF001

    def rebuild_optimizer(self, keep_state: bool = True) -> None:
        """Build the optimizer anew over the parameters that now require grad (a hook froze
        or unfroze some, or swapped modules), keeping the LR schedule's position and, with
        ``keep_state``, the state (moments, step counts) of parameters that stay. Call between
        steps, or from ``after_backward`` together with skipping that step's update
        (``step.applied = False``): the old optimizer's gradients are not carried over."""
        old = self.optimizer
        self.optimizer = build_optimizer(self.model, self.config.training, self.plan.device)
        if hasattr(old, "steps_taken") and hasattr(self.optimizer, "steps_taken"):
            self.optimizer.steps_taken = old.steps_taken  # Muon's momentum warmup goes on where it was
        if hasattr(old, "found_inf"):  # the NaN guard's verdict for this step (fused AdamW)
            self.optimizer.found_inf = old.found_inf
        # Rebuilt between unscale_ and step (a hook's after_backward): GradScaler keys "already
        # unscaled" by optimizer object, so hand the old one's record over, else the step would
        # divide the gradients by the loss scale a second time.
        records = getattr(self.scaler, "_per_optimizer_states", None)
        if records is not None and id(old) in records:
            records[id(self.optimizer)] = records.pop(id(old))
        if keep_state:
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    if param in old.state:
                        self.optimizer.state[param] = old.state[param]
        self.scheduler = self._new_scheduler(self.optimizer)
        self.position_schedule(self.step)
        self.nan_guard.on_device = skips_on_device(self.optimizer)

    def add_hook(self, hook: TrainingHook) -> TrainingHook:
        """Add a training component before :meth:`run`. At each point it is called after
        the throughput meter and the NaN guard, and before evaluation and the checkpoint
        policy (so the checkpoint of a step holds this hook's state after that step).

        Raises:
            ValueError: a hook of that name is already added.
        """
        return self.hooks.add(hook)

    # ------------------------------------------------------------------ helpers

    @property
    def nan_skips(self) -> int:
        """Steps whose update was skipped as non-finite (reads the guard's device counter)."""
        return self.nan_guard.count()

    def epoch(self) -> float:
        return self.micro_step / self.micro_per_epoch

    def is_log_step(self, step: int) -> bool:
        """Whether step ``step`` ends with a log line (every ``log_interval``, the first, the last)."""
        return step % self.config.training.log_interval == 0 or step == 1 or step == self.max_steps

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.plan.device.type == "cuda":
            return tensor.pin_memory().to(self.plan.device, non_blocking=True)
        return tensor.to(self.plan.device)

    def crossed(self, every_epochs: int | None, prev_micro: int) -> bool:
        """Whether the last step crossed a multiple of ``every_epochs`` epochs."""
        if not every_epochs:
            return False
        before = prev_micro // self.micro_per_epoch // every_epochs
        after = self.micro_step // self.micro_per_epoch // every_epochs
        return after > before

    def due(self, interval: int | None) -> bool:
        """Whether the current step is a multiple of ``interval`` (``None``: never)."""
        return bool(interval) and self.step % interval == 0

    def elapsed(self) -> float:
        return self.elapsed_before + (time.time() - self.t_session)

    def evaluate(self) -> EvalResult:
        """Evaluate on the validation split now (see :class:`~lmkit.training.evaluator.Evaluator`)."""
        return self.evaluator.evaluate(self)

    # ------------------------------------------------------------------ checkpoints

    def save(self, tags: list[str]) -> list[Path]:
        """Write the checkpoint once and hard-link it under every tag, ``latest`` last: a
        crash in between leaves ``latest`` at the previous step, consistent with its tags
        (the new tag files hold this same deterministic step and are overwritten when the
        resumed run gets here again). Returns the paths written."""
        from lmkit.events import CheckpointSaved

        started = time.time()
        order = [t for t in tags if t != "latest"] + [t for t in tags if t == "latest"]
        paths = [self.run.checkpoint_path(tag).with_suffix(self.strategy.suffix) for tag in order]
        if not self.strategy.save(self, paths):
            return []  # another rank reports and prunes
        val = self.last_val.loss if self.last_val is not None and self.last_val.step == self.step else None
        self.emit(CheckpointSaved(step=self.step, path=str(self.run.checkpoint_path(tags[0]).with_suffix(self.strategy.suffix)),
                                  tags=tuple(tags),
                                  val_loss=val, seconds=time.time() - started))
        return paths

    # ------------------------------------------------------------------ one step

    def train_step(self) -> StepOutput:
        """One optimizer step over ``grad_accum_steps`` micro-batches.

        The loss is the mean over the step's target tokens: micro-batch ``i`` with ``n_i``
        targets and mean loss ``l_i`` contributes ``l_i * n_i / sum(n)`` (a micro-batch with
        no targets contributes nothing). Under data parallelism ``sum(n)`` must be the
        global count (summed across ranks) for the same weighting.

        Raises:
            TrainingError: a non-finite step with ``on_nan: abort`` (see the guard).
            DataError: a batch holds an id >= ``vocab_size`` (a corrupt shard).
        """
        from lmkit.errors import DataError

        tcfg = self.config.training
        self.hooks.call("before_step", self)
        prev_micro = self.micro_step
        world, rank = self.dist.world_size, self.dist.rank
        # rank r takes the global micro-batches prev + i*W + r: the data order does not depend on W
        micro = [self.batches.batch(prev_micro + i * world + rank) for i in range(tcfg.grad_accum_steps)]
        counts = [int((y_np != IGNORE_INDEX).sum()) for _, y_np in micro]
        total = self.dist.sum_int(sum(counts))  # the step's global target count
        loss_sum = torch.zeros((), device=self.plan.device)
        for i, ((x_np, y_np), n) in enumerate(zip(micro, counts, strict=True)):
            if int(x_np.max()) >= self.vocab_size or int(y_np.max()) >= self.vocab_size:
                raise DataError(f"micro-batch {self.micro_step} holds a token id >= vocab_size {self.vocab_size}: "
                                "the token shards are corrupt; delete the token cache to rebuild them")
            self.strategy.micro_step(self, x_np, y_np, n, total, len(micro), loss_sum, last=i == len(micro) - 1)
            self.micro_step += world
            if self._test_signal is not None and self._test_signal[0] == self.micro_step:
                os.kill(os.getpid(), self._test_signal[1])
        if self.dist.enabled:
            self.dist.sum_(loss_sum)  # the global token-weighted mean: every rank's guard sees the same
        self.scaler.unscale_(self.optimizer)
        grad_norm = self.strategy.clip_grad_norm(self.model, tcfg.grad_clip)
        out = StepOutput(step=self.step + 1, loss=loss_sum, grad_norm=grad_norm,
                         lr=self.optimizer.param_groups[0]["lr"], n_targets=total, prev_micro_step=prev_micro)
        self.hooks.call("after_backward", self, out)
        if out.applied is False:
            self.scaler.update()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.model.zero_grad(set_to_none=True)  # the model's: a hook may have frozen a parameter this step
        if out.applied is False:  # a skipped update still advances the schedule (torch warns when the
            with warnings.catch_warnings():  # optimizer has not stepped yet, e.g. one rebuilt this step)
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                self.scheduler.step()
        else:
            self.scheduler.step()
        self.step += 1
        self.tokens += total
        return out

    # ------------------------------------------------------------------ the loop

    def run_loop(self, stop: StopRequest) -> None:
        tcfg = self.config.training
        start_step = self.step
        self.emit(RunStarted(
            name=self.run.name, run_dir=str(self.run.path), preset=self.config.preset, model_type=self.config.model.type,
            n_params=self.n_params, device=str(self.plan.device), device_name=self.plan.description,
            precision=self.plan.precision, compile=tcfg.compile, max_steps=self.max_steps,
            steps_per_epoch=self.steps_per_epoch,
            tokens_per_step=tcfg.batch_size * tcfg.grad_accum_steps * self.dist.world_size * self.config.model.block_size,
            start_step=start_step, device_uuid=device_uuid(self.plan.device), world_size=self.dist.world_size,
            parallelism=self.strategy.name, local_device_uuids=self.local_device_uuids,
        ))
        for level, note in self.notes:
            self.emit(Notice(level=level, message=note))
        if self.plan.reason.startswith("auto"):
            self.emit(Notice(level="info", message=f"device {self.plan.device} ({self.plan.reason})"))
        if self.plan.peak_flops:
            self.emit(Notice(level="info", message=(
                f"MFU against {self.plan.peak_flops / 1e12:.1f} TFLOP/s ({self.plan.peak_basis})"
                f"{f' per device, x {self.dist.world_size} ranks' if self.dist.enabled else ''}; "
                f"{self.flops_per_token / 1e6:.2f} MFLOP per token")))
        for note in self.version_notes:
            self.emit(Notice(level="warning", message=note))
        if steps_to_peak(tcfg.warmup_steps, tcfg.warmup_form) > self.max_steps:
            last = lr_multiplier(self.max_steps - 1, schedule=tcfg.schedule, warmup_steps=tcfg.warmup_steps,
                                 total_steps=self.max_steps, min_lr_ratio=tcfg.min_lr_ratio,
                                 warmup_form=tcfg.warmup_form, warmdown_ratio=tcfg.warmdown_ratio)
            peak = tcfg.lr * last
            advice = ("a resume keeps the run's schedule: give it more steps (--max-steps), or start a new run "
                      "with a shorter warmup" if self.resume_dir is not None
                      else "lower it with --set training.warmup_steps=N")
            self.emit(Notice(level="warning", message=(
                f"training.warmup_steps ({tcfg.warmup_steps}) outlasts the run's {self.max_steps} steps: the LR only "
                f"reaches {peak:.2e} of its {tcfg.lr:.2e} peak; {advice}")))
        self.hooks.call("on_start", self)

        self.model.train()
        vote = StopVote(self.dist) if self.dist.enabled else None
        while self.step < self.max_steps:
            out = self.train_step()
            if vote is None:
                signum = stop.signum if stop.requested else 0  # read once: a later signal waits a step
            else:  # every rank's request, as of the previous step: all stop after the same step
                signum = vote.exchange(int(stop.signum or 0))
            self.stopping = bool(signum)
            self.hooks.call("after_step", self, out)
            if self.stopping and self.step < self.max_steps:
                raise Interrupted(
                    f"stopped by {signal.Signals(signum).name} at step {self.step}; saved "
                    f"{self.run.checkpoint_path('latest').with_suffix(self.strategy.suffix)}; resume with: lmkit resume {self.run.path}"
                    f"{f' --nproc-per-node {self.dist.world_size}' if self.dist.enabled else ''}",
                    exit_code=128 + int(signum),
                )
        if vote is not None:
            vote.wait()

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
            if is_memory_error(exc):
                raise out_of_memory_error(exc, self.config.training.batch_size, getattr(self, "n_params", None)) from None
            raise
        self.t_session = time.time()
        status, exit_code = "failed", 0
        stop = StopRequest()
        try:
            with stop:
                self.run_loop(stop)
            status = "completed"
        except Interrupted as exc:
            status = "interrupted"
            exit_code = exc.exit_code
            raise
        except BaseException as exc:
            if not (stop.aborted or isinstance(exc, KeyboardInterrupt)):
                if is_memory_error(exc):
                    raise out_of_memory_error(exc, self.config.training.batch_size, getattr(self, "n_params", None)) from None
                raise
            status = "aborted"
            raise Interrupted(
                f"aborted by a second Ctrl-C at step {self.step}; nothing more was saved and the last checkpoint "
                f"is untouched; resume with: lmkit resume {self.run.path}", exit_code=130) from None
        finally:
            self.hooks.call("on_end", self, status)
            summary = run_summary(self, status)
            if self.dist.is_main:
                self.run.write_summary(summary)
            self.emit(RunFinished(status=status, summary=summary))
            self.run.unlock()
            if self.dist.enabled:  # every rank gets here after a completed run or an agreed stop
                self.dist.finish(barrier=status in ("completed", "interrupted"))
                if status == "interrupted":
                    exit_on_late_sigterm(exit_code)
        return summary



def _picked_state(path: Path) -> dict[str, Any]:
    """The state of the checkpoint rank 0 picked and verified, as another rank reads it: a file
    whole; a sharded folder only its ``extra`` (the shards are verified and loaded together, by
    :func:`lmkit.training.sharded.load_sharded`)."""
    if path.is_dir():
        from lmkit.training.sharded import load_extra, read_manifest

        return load_extra(path, read_manifest(path))
    return verify_candidate(path)


def train(config: RunConfig, emit: Callable[[Event], None] = null_emit, *, notes: Iterable[str] = ()) -> dict[str, Any]:
    """Train ``config`` as a new run and return its summary (see :meth:`Trainer.run`)."""
    return Trainer(config, emit, notes=notes).run()


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
