"""Events the library emits instead of printing.

Training, data preparation and (later) evaluation call ``emit(event)`` for each
observer. The terminal progress line, the plain log printer, ``metrics.jsonl``,
``events.jsonl`` and TensorBoard are all observers (:mod:`lmkit.monitor`), so a test
can drive training with no terminal at all.

Every event is a frozen dataclass with a ``kind`` and :meth:`Event.to_dict` (plain
JSON types). Units: tokens, seconds, GiB (``gpu_mem_gb``), nats (losses).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol


@dataclass(frozen=True)
class Event:
    """Base of every event. ``group_by`` names the field that tells events of one kind
    apart in a live view keyed by kind (e.g. ``level`` for notices, ``layer`` for SVD
    mode switches): the dashboard's "events by kind" panel keeps the latest event per
    (kind, value of that field). ``None``: one row per kind."""

    kind: ClassVar[str] = "event"
    group_by: ClassVar[str | None] = None
    time: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)  # JSON has no NaN/inf
            out[f.name] = value
        return out


@dataclass(frozen=True)
class DataProgress(Event):
    """Progress of a data preparation stage (``total`` is ``None`` when unknown)."""

    kind: ClassVar[str] = "data_progress"
    stage: str
    completed: int
    total: int | None
    unit: str = "rows"
    tokens: int | None = None  # tokens written so far (the console shows tokens and tokens/s)


@dataclass(frozen=True)
class DataReady(Event):
    """Data is tokenised and ready; ``reused`` when the token cache was used as is."""

    kind: ClassVar[str] = "data_ready"
    description: str
    tokenizer: str
    vocab_size: int
    split_sizes: dict[str, int]
    unit: str
    cache_dir: str | None
    reused: bool
    stats: dict[str, Any] | None = None  # data statistics of the build (e.g. mul-token counts, compression)


@dataclass(frozen=True)
class RunStarted(Event):
    kind: ClassVar[str] = "run_started"
    name: str
    run_dir: str
    preset: str | None
    model_type: str
    n_params: int
    device: str
    device_name: str
    precision: str
    compile: bool
    max_steps: int
    steps_per_epoch: int
    tokens_per_step: int  # batch_size x grad_accum_steps x block_size: positions, padding included
    start_step: int = 0
    device_uuid: str | None = None  # CUDA: the device's UUID, to match it with NVML's GPUs
    world_size: int = 1  # training processes (torchrun's WORLD_SIZE); tokens_per_step is global
    parallelism: str | None = None  # "ddp" or "fsdp" when world_size > 1
    local_device_uuids: tuple[str, ...] = ()  # CUDA: the UUIDs of this node's ranks' GPUs (the dashboard marks them)


@dataclass(frozen=True)
class StepMetrics(Event):
    """Training metrics at a logged optimizer step (means over the steps since the last log).

    ``tokens`` counts loss targets seen so far (padding and masked positions excluded);
    ``tok_per_s`` is over the last log interval; ``mfu`` is model FLOPs utilisation in
    [0, 1], ``None`` where the device's peak is unknown (CPU). On CUDA, PyTorch's caching
    allocator in GiB: ``gpu_mem_gb`` the peak allocated since the start
    (``torch.cuda.max_memory_allocated``), ``gpu_alloc_gb`` allocated now,
    ``gpu_reserved_gb`` reserved by the allocator now (``None`` elsewhere).
    ``grad_scale`` is the fp16 GradScaler's scale (``None`` without one; a drop means
    overflowing steps were skipped); ``nan_skips`` counts the steps skipped so far for a
    non-finite loss or gradient norm (``on_nan: skip``).
    """

    kind: ClassVar[str] = "step"
    step: int
    max_steps: int
    epoch: float
    tokens: int
    loss: float
    lr: float
    grad_norm: float | None
    tok_per_s: float
    step_time_s: float
    mfu: float | None
    gpu_mem_gb: float | None
    elapsed_s: float
    gpu_alloc_gb: float | None = None
    gpu_reserved_gb: float | None = None
    grad_scale: float | None = None
    nan_skips: int = 0


@dataclass(frozen=True)
class EvalResult(Event):
    """Validation loss (nats/token) and task metrics at ``step``."""

    kind: ClassVar[str] = "eval"
    step: int
    epoch: float
    tokens: int
    split: str
    loss: float
    metrics: dict[str, float]
    is_best: bool
    elapsed_s: float


@dataclass(frozen=True)
class CheckpointSaved(Event):
    kind: ClassVar[str] = "checkpoint"
    step: int
    path: str
    tags: tuple[str, ...]
    val_loss: float | None
    seconds: float


@dataclass(frozen=True)
class Resumed(Event):
    """A run continues from ``checkpoint`` at ``step``.

    ``skipped`` lists checkpoints passed over as incomplete or corrupt (path, reason);
    ``config_changes`` the allowed changes (key -> [old, new]); ``dropped_metrics`` counts
    the ``metrics.jsonl`` records of later steps (written by the abandoned continuation) and
    lines cut short by a crash, moved out of the log into ``superseded_metrics`` (a file in
    ``runs/NAME/superseded/``, ``None`` when nothing was moved); never deleted.
    """

    kind: ClassVar[str] = "resumed"
    step: int
    checkpoint: str
    skipped: list[tuple[str, str]]
    config_changes: dict[str, list[Any]]
    dropped_metrics: int
    removed_temp_files: list[str]
    superseded_metrics: str | None = None


@dataclass(frozen=True)
class Notice(Event):
    """Something the user should know (a warning, a fallback taken on purpose)."""

    kind: ClassVar[str] = "notice"
    group_by: ClassVar[str | None] = "level"
    level: str
    message: str


@dataclass(frozen=True)
class NaNSkipped(Event):
    """Optimizer updates skipped for a non-finite loss or gradient norm (``on_nan: skip``);
    the weights were left as they were.

    ``step``: the optimizer step whose update was skipped (1-based: the step that would have
    been done), or, where skips are counted on the device and reported at a log line, the
    last step of that window; ``skipped``: updates skipped since the previous such event;
    ``total``: skipped so far in the run (also in :class:`StepMetrics` ``nan_skips``).
    A warning: renderers show :attr:`message` with ``level`` ``"warning"``.
    """

    kind: ClassVar[str] = "nan_skipped"
    level: ClassVar[str] = "warning"
    step: int
    total: int
    skipped: int = 1

    @property
    def message(self) -> str:
        if self.skipped == 1:
            return f"step {self.step}: non-finite loss or gradient norm; update skipped ({self.total} so far)"
        return (f"steps up to {self.step}: {self.skipped} updates skipped for a non-finite loss or gradient norm "
                f"({self.total} so far)")


@dataclass(frozen=True)
class StepTimeJump(Event):
    """A log window's mean step time jumped above the run's median (a shared CPU or GPU?).

    ``step``: the log line's optimizer step; ``ratio``: ``now_s / median_s``; ``median_s``: the
    median of the run's earlier log windows' :attr:`StepMetrics.step_time_s` (seconds);
    ``now_s``: this window's; ``device_type``: ``"cpu"``, ``"cuda"``, ``"mps"``...
    The trainer does not emit it: renderers detect it from :class:`StepMetrics` with
    :class:`lmkit.monitor.steptime.StepTimeWatch`. A warning: renderers show :attr:`message`.
    """

    kind: ClassVar[str] = "step_time_jump"
    level: ClassVar[str] = "warning"
    step: int
    ratio: float
    median_s: float
    now_s: float
    device_type: str

    @property
    def message(self) -> str:
        if self.device_type == "cpu":
            why = ("is the CPU shared with another process? (--threads 1 or --set training.adapt_threads=true "
                   "suffer less next to one;")
        elif self.device_type == "cuda":
            why = "is the GPU or the host shared with another process?"
        else:
            why = "is the machine shared with another process?"
        tail = " lmkit doctor shows the load)" if why.endswith(";") else " (lmkit doctor shows the load)"
        return (f"steps {self.ratio:.1f}x slower than this run's median ({1000 * self.median_s:.0f} ms -> "
                f"{1000 * self.now_s:.0f} ms): {why}{tail}")


@dataclass(frozen=True)
class SVDAnalysis(Event):
    """One adaptive-SVD analysis of one layer (SEEDS_SPEC 2.2-2.4), also a ``svd.jsonl`` record.

    ``step``: the optimizer step being taken (1-based; analysed after backward and clipping,
    before the update); ``layer``: the module name; ``mode``: ``full`` / ``lowrank`` before the
    action; ``r``: minor (trainable) components before it (``None`` before the first
    decision); ``r_next``: the r update's proposal (2.3); ``metrics``: ``subspace_angle``
    (radians), ``principal_alignment``, ``minor_alignment``, ``reconstruction_error`` (norm
    ratios), ``energy_rank_99`` (components), ``grad_norm`` (of the effective weight) -- a
    metric that could not be computed is absent; ``reason``: ``initial_svd_computation``,
    ``warmup_period``, ``gradient_clobbering_risk``, ``optimal_lowrank_conditions``,
    ``reconstruction_unsafe``, ``continue_current_mode``, ``no_gradient_yet`` or
    ``invalid_gradient``; ``action``: ``snapshot``, ``keep``, ``to_lowrank``, ``to_full`` or
    ``refactor`` (r changed in low-rank mode); ``mode_after`` / ``r_after``: the layer after it.
    """

    kind: ClassVar[str] = "svd_analysis"
    group_by: ClassVar[str | None] = "layer"
    step: int
    layer: str
    mode: str
    r: int | None
    r_next: int | None
    metrics: dict[str, float]
    reason: str
    action: str
    mode_after: str
    r_after: int | None
    seconds: float = 0.0


@dataclass(frozen=True)
class SVDModeSwitch(Event):
    """A layer switched between full and low-rank training (the optimizer was rebuilt and the
    step's update skipped). ``to_mode``: ``lowrank`` or ``full``; ``r``: minor components
    trained in low-rank mode; ``switches``: this layer's switches so far. Renderers show
    :attr:`message` (the seed's console wording)."""

    kind: ClassVar[str] = "svd_mode_switch"
    group_by: ClassVar[str | None] = "layer"
    level: ClassVar[str] = "info"
    step: int
    layer: str
    from_mode: str
    to_mode: str
    r: int | None
    reason: str
    switches: int

    @property
    def message(self) -> str:
        if self.to_mode == "lowrank":
            return f"step {self.step}: {self.layer} SWITCHED TO LOW-RANK (r={self.r}) - Reason: {self.reason}"
        return f"step {self.step}: {self.layer} SWITCHED TO FULL MATRIX - Reason: {self.reason}"


#: Events a renderer shows as a ``level: message`` line (each has ``level`` and ``message``).
MESSAGE_EVENTS = (Notice, NaNSkipped, StepTimeJump, SVDModeSwitch)


@dataclass(frozen=True)
class RunFinished(Event):
    """The end of a run: ``status`` is ``completed``, ``interrupted`` or ``failed``."""

    kind: ClassVar[str] = "run_finished"
    status: str
    summary: dict[str, Any]


class Observer(Protocol):
    def __call__(self, event: Event) -> None: ...


def broadcast(observers: Iterable[Callable[[Event], None]]) -> Callable[[Event], None]:
    """One ``emit`` that forwards each event to every observer in order."""
    targets = list(observers)

    def emit(event: Event) -> None:
        for observer in targets:
            observer(event)

    return emit


def null_emit(event: Event) -> None:
    """An ``emit`` that drops everything."""
