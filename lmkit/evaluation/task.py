"""The contract between ``lmkit eval`` and the evaluation tasks.

A task is a function ``evaluate(ctx: EvalContext) -> TaskResult`` in its own module,
registered by name in :data:`TASKS` (imported lazily, so ``lmkit --help`` stays light).
The command loads the run (:func:`lmkit.runs.load_run`), builds the context, calls the
task and writes the result, adding the checkpoint, step, tokens and wall time.

Result files (written by the command, read by ``lmkit compare``):

- ``runs/NAME/eval/TASK.json`` -- the latest single-checkpoint evaluation of TASK;
- ``runs/NAME/eval/TASK/step_XXXXXXX.json`` -- one per checkpoint of a sweep
  (``--checkpoint all``), plus ``runs/NAME/eval/TASK/checkpoint_results.json`` (a list of
  ``{"step", "tokens", "metrics"}`` in step order) and ``runs/NAME/eval/TASK/curve.png``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmkit.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lmkit.config import RunConfig
    from lmkit.data.tokenizers import Tokenizer

#: task name -> "module:function"; the function takes an :class:`EvalContext`.
TASKS: dict[str, str] = {
    "perplexity": "lmkit.evaluation.perplexity:evaluate",
    "arithmetic": "lmkit.evaluation.arithmetic:evaluate",
    "hellaswag": "lmkit.evaluation.hellaswag:evaluate",
    "gsm8k": "lmkit.evaluation.gsm8k:evaluate",
    "arithmetic-probes": "lmkit.evaluation.probes:evaluate",
    "sample": "lmkit.evaluation.sample:evaluate",
    "senses": "lmkit.evaluation.senses:evaluate",
    "head-ablation": "lmkit.evaluation.head_ablation:evaluate",
    "depth-probe": "lmkit.evaluation.depth_probe:evaluate",
    "attention": "lmkit.evaluation.attention_map:evaluate",
}

#: task-name prefix -> "module:function" taking ``(ctx, rest)``: ``lm-eval:TASK`` runs an
#: lm-evaluation-harness task named ``TASK``.
TASK_PREFIXES: dict[str, str] = {
    "lm-eval:": "lmkit.evaluation.lm_eval:evaluate",
}

#: What a metric's direction may be (:attr:`TaskResult.directions`): a larger value is
#: better, a smaller one is, or neither (counts, sizes, times, gaps).
DIRECTIONS = ("higher", "lower", "neither")

#: metric names where a smaller value is better. Only the fallback for result files written
#: before results declared their directions (see :func:`fallback_direction`).
LOWER_IS_BETTER = frozenset({"loss", "mean_loss", "perplexity", "bpb", "val_loss", "train_loss"})
#: Parts of metric names that the fallback reads as "no better direction".
_NEUTRAL_PARTS = ("gap", "total", "count", "time", "length", "tokens", "per_second", "n_items", "step")


def fallback_direction(metric: str) -> str:
    """A metric's direction guessed from its name, for results that do not declare one
    (files written before ``directions`` existed, or a task that declares none): the names
    in :data:`LOWER_IS_BETTER`, ``ppl`` and ``*_loss`` -> ``"lower"``; names containing
    gap/total/count/time/length/tokens/per_second/n_items/step or starting with ``n_``/``num_``
    -> ``"neither"``; anything else -> ``"higher"``. It can be wrong (``error_rate`` reads
    "higher"): tasks declare their directions instead."""
    if metric in LOWER_IS_BETTER or metric == "ppl" or metric.endswith("_loss"):
        return "lower"
    if any(part in metric for part in _NEUTRAL_PARTS) or metric.startswith(("n_", "num_")):
        return "neither"
    return "higher"


def _no_progress(done: int, total: int) -> None:
    pass


@dataclass
class EvalContext:
    """What a task gets.

    Attributes:
        model: the run's model, eval mode, fp32, on ``device``. Call it as
            ``model(idx)`` with ``idx`` of shape (B, T) int64 -> ``(logits (B, T, V), None)``.
        tokenizer: the run's own tokenizer (``encode``/``decode``; ``eos_id`` may be ``None``).
        config: the run config stored in the checkpoint.
        run_dir: the run folder (``runs/NAME``).
        device: where the model lives.
        step: the checkpoint's optimizer step.
        data: ``--data PATH`` when given (the task's own default otherwise).
        limit: ``--limit N``: evaluate only the first N items (``None``: all).
        batch_size: ``--batch-size`` (items or sequences per forward pass).
        options: task-specific options from the command line (e.g. ``fewshot``,
            ``legacy_eos_metric``, ``prompt``, ``temperature``, ``top_k``, ``max_new_tokens``, ``seed``).
        progress: call ``progress(done, total)`` as items complete; the command draws the bar.
    """

    model: nn.Module
    tokenizer: Tokenizer
    config: RunConfig
    run_dir: Path
    device: torch.device
    step: int
    data: Path | None = None
    limit: int | None = None
    batch_size: int = 32
    options: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[int, int], None] = _no_progress


@dataclass
class TaskResult:
    """What a task returns.

    Attributes:
        task: the registry name.
        version: bump it whenever what the task computes changes (results with different
            versions are not comparable).
        metrics: flat ``name -> float`` (e.g. ``{"acc": 0.29, "acc_norm": 0.30}``).
        headline: the key of ``metrics`` that sweeps plot and ``compare`` ranks.
        directions: metric name -> ``"higher"``, ``"lower"`` or ``"neither"`` (which value
            is better; ``compare`` reads it from the result file). A task declares every
            metric it can report (a superset is fine: only the metrics present are kept);
            an undeclared metric falls back to :func:`fallback_direction` of its name.
        n_items: the number of items scored.
        data_file: the file the items came from (or the hub dataset name), ``None`` for
            tasks without data (``sample``).
        data_sha256: SHA-256 of that file (:func:`file_sha256`), ``None`` for hub data.
        details: anything else (per-split/per-category numbers, examples, generations).
        notes: lines the command shows the user as they are (e.g. what a legacy metric is).
    """

    task: str
    version: str
    metrics: dict[str, float]
    headline: str
    n_items: int
    data_file: str | None = None
    data_sha256: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    directions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.directions.items() if v not in DIRECTIONS}
        if bad:
            raise ValueError(f"{self.task}: metric directions must be one of {', '.join(DIRECTIONS)}, got {bad}")
        self.directions = {k: self.directions[k] for k in self.metrics if k in self.directions}

    def direction(self, metric: str) -> str:
        """The declared direction of ``metric``, else :func:`fallback_direction` of its name."""
        return self.directions.get(metric) or fallback_direction(metric)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def get_task(name: str) -> Callable[[EvalContext], TaskResult]:
    """The ``evaluate`` function of task ``name``.

    Raises:
        ConfigError: unknown task (the message lists the known ones).
    """
    for prefix, target in TASK_PREFIXES.items():
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if not rest:
                raise ConfigError(f"--task {name}: name the task after {prefix!r} (e.g. {prefix}hellaswag)")
            module, _, func = target.partition(":")
            evaluate = getattr(importlib.import_module(module), func)
            return lambda ctx: evaluate(ctx, rest)
    if name not in TASKS:
        known = [*TASKS, *(f"{p}TASK" for p in TASK_PREFIXES)]
        raise ConfigError(f"--task {name}: unknown task; choose from {', '.join(known)}")
    module, _, func = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), func)


def task_module(name: str) -> str:
    """The module that implements task ``name`` (a registered name or a prefixed one)."""
    for prefix, target in TASK_PREFIXES.items():
        if name.startswith(prefix):
            return target.partition(":")[0]
    return TASKS[name].partition(":")[0]


def file_stem(name: str) -> str:
    """The file/folder name of task ``name``'s results under ``runs/NAME/eval/``
    (``lm-eval:hellaswag`` -> ``lm-eval_hellaswag``: no ``:`` in file names)."""
    return name.replace(":", "_").replace("/", "_")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def iter_jsonl(path: Path, limit: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSONL file, at most ``limit``.

    Raises:
        DataError: the file cannot be read, or a line is not a JSON object (naming file:line).
    """
    count = 0
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if limit is not None and count >= limit:
                    return
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: not a JSON object")
                count += 1
                yield lineno, row
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--data {path}: cannot read ({exc})") from None


def load_hub_rows(name: str, config: str | None, split: str, limit: int | None, local_hint: str) -> list[dict[str, Any]]:
    """Rows of a hub dataset split via ``datasets.load_dataset`` (the first ``limit`` rows).

    Offline, the hub is probed first so the failure takes about a second, not ~25 s of retries.

    Raises:
        DataError: the hub or a cached copy is unavailable; the message ends with ``local_hint``
            (how to pass a local file instead).
    """
    from lmkit.data.sources import _offline_if_unreachable
    from lmkit.errors import first_line

    with _offline_if_unreachable() as online:
        try:
            from datasets import load_dataset

            rows = load_dataset(name, config, split=split if limit is None else f"{split}[:{limit}]")
        except Exception as exc:  # noqa: BLE001 - network, auth, missing package: one line
            why = "no network and no cached copy" if not online else first_line(exc)
            raise DataError(f"cannot load {name} ({split}) from the hub ({why}); offline, {local_hint}") from None
    return [dict(row) for row in rows]
