"""The ``lm-eval:TASK`` tasks: any lm-evaluation-harness task on a run, no export.

``lmkit eval RUN --task lm-eval:TASK [--include-path DIR]`` runs the harness's task ``TASK``
(Gao et al., *A framework for few-shot language model evaluation*, EleutherAI
lm-evaluation-harness, https://github.com/EleutherAI/lm-evaluation-harness) through its
Python API (``lm_eval.simple_evaluate`` with a ``TaskManager(include_path=DIR)``) on the run's
model wrapped as :class:`lmkit.evaluation.lm_eval_model.LmkitLM` (lmkit's batched scoring and
KV-cache decoder, the run's own tokenizer).

The result's metrics are the harness's numbers for that task (for a group, its aggregate):
each ``metric,filter`` key of the harness becomes ``metric`` (filter ``none``) or
``metric_filter``, its standard error ``metric_stderr`` (``None`` -> absent; the harness's
``N/A`` is dropped). Directions come from the harness's ``higher_is_better``; standard errors
have none. The headline is ``acc_norm`` when the task reports it, else the first metric the
task lists. ``--limit N`` is the harness's ``limit``, ``--fewshot K`` its ``num_fewshot``,
``--seed S`` its ``fewshot_random_seed`` (and the sampling seed), ``--max-new-tokens N`` the
``max_gen_toks`` of generation tasks (which must leave room for a prompt in ``block_size``).

A local task is a YAML file in the ``--include-path`` folder, e.g. HellaSwag from a JSONL
file (with a ``utils.py`` beside it holding the harness's ``process_docs``)::

    task: hellaswag_local
    dataset_path: json
    dataset_kwargs: {data_files: {validation: /data/hellaswag_val.jsonl}}
    output_type: multiple_choice
    validation_split: validation
    process_docs: !function utils.process_docs
    doc_to_text: "{{query}}"
    doc_to_target: "{{gold}}"
    doc_to_choice: "choices"
    metric_list: [{metric: acc}, {metric: acc_norm}]

Offline: while the harness runs, ``datasets`` and ``huggingface_hub`` are switched to offline
mode when the hub cannot be reached (the same probe as lmkit's own hub data), so a local task
(``dataset_path: json`` + ``dataset_kwargs.data_files``) never waits on the network; the
harness's log lines are kept as the result's notes instead of being printed.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmkit.errors import ConfigError, DataError, first_line
from lmkit.evaluation.task import EvalContext, TaskResult, file_sha256

#: Appears in the message when lm_eval is missing.
INSTALL_HINT = "pip install 'lmkit[lm-eval]'"
#: How many per-document records of the harness are kept in the result's details.
N_EXAMPLES = 10


class _Collect(logging.Handler):
    """Keeps the harness's warnings (and worse) instead of letting them reach stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            line = record.getMessage().strip().splitlines()
            if line and line[0] not in self.lines:
                self.lines.append(line[0][:300])


@contextlib.contextmanager
def _quiet_harness() -> Iterator[_Collect]:
    """Route the ``lm_eval`` logger (and ``datasets`` progress bars) away from the terminal."""
    collect = _Collect()
    logger = logging.getLogger("lm_eval")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    logger.handlers, logger.propagate = [collect], False
    logger.setLevel(logging.WARNING)
    bars = None
    with contextlib.suppress(Exception):  # datasets absent or changed: nothing to silence
        import datasets

        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
    evaluator = sys.modules.get("lm_eval.evaluator")
    git_hash = getattr(evaluator, "get_git_commit_hash", None)
    if git_hash is not None:  # it runs `git describe` in the cwd, whose "fatal: ..." reaches the terminal
        evaluator.get_git_commit_hash = lambda: None
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the harness's tqdm bars
            yield collect
    finally:
        logger.handlers, logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
        if git_hash is not None:
            evaluator.get_git_commit_hash = git_hash
        if bars:
            import datasets

            datasets.enable_progress_bars()


def _import_harness() -> Any:
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401 - simple_evaluate, patched while it runs
        from lm_eval.tasks import TaskManager  # noqa: F401 - checks the API is there
    except ImportError:
        raise ConfigError(f"--task lm-eval:…: lm-evaluation-harness is not installed; {INSTALL_HINT}") from None
    return lm_eval


def _metric_name(key: str) -> str | None:
    """``acc,none`` -> ``acc``; ``exact_match,strict-match`` -> ``exact_match_strict-match``;
    ``acc_stderr,none`` -> ``acc_stderr``; non-metric keys (``alias``, ``samples``) -> ``None``."""
    metric, sep, filt = key.partition(",")
    if not sep:
        return None
    if metric.endswith("_stderr"):
        base = metric[: -len("_stderr")]
        return f"{base}_stderr" if filt == "none" else f"{base}_{filt}_stderr"
    return metric if filt == "none" else f"{metric}_{filt}"


def harness_metrics(block: dict[str, Any]) -> dict[str, float]:
    """The numbers of one task's (or group's) block of the harness's ``results`` (see the
    module docstring for the names); ``N/A`` and non-numbers are dropped."""
    out: dict[str, float] = {}
    for key, value in block.items():
        name = _metric_name(str(key))
        if name is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[name] = float(value)
    return out


def _directions(metrics: dict[str, float], higher: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in metrics:
        if name.endswith("_stderr"):
            out[name] = "neither"
            continue
        prefixes = [m for m in higher if name == m or name.startswith(f"{m}_")]
        base = max(prefixes, key=len) if prefixes else None  # acc_norm_x: acc_norm's, not acc's
        if base is not None and higher[base] is not None:
            out[name] = "higher" if higher[base] else "lower"
        else:
            out[name] = "neither"
    return out


def _data_file(config: dict[str, Any]) -> tuple[str | None, str | None]:
    """The task's data (a local file and its SHA-256 when ``data_files`` names exactly one)."""
    kwargs = config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    paths: list[str] = []
    if isinstance(files, str):
        paths = [files]
    elif isinstance(files, dict):
        for v in files.values():
            paths.extend([v] if isinstance(v, str) else list(v or []))
    elif isinstance(files, list):
        paths = [str(v) for v in files]
    existing = [p for p in paths if Path(p).is_file()]
    if len(set(existing)) == 1:
        return existing[0], file_sha256(Path(existing[0]))
    path = config.get("dataset_path")
    name = config.get("dataset_name")
    if path:
        return f"{path}{':' + str(name) if name else ''}", None
    return None, None


def _task_manager(cls: Any, task_name: str, include: str | None) -> Any:
    """A ``TaskManager`` that knows ``task_name``: the ``--include-path`` folder alone when the
    task is defined there (indexing the harness's ~15,000 built-in YAML files takes ~10 s),
    else the built-in tasks plus that folder."""
    if include:
        own = cls(include_path=str(include), include_defaults=False)
        if task_name in own.all_tasks:
            return own
    return cls(include_path=str(include) if include else None)


def evaluate(ctx: EvalContext, task_name: str) -> TaskResult:
    """Run lm-evaluation-harness task ``task_name`` on the run (see the module docstring).

    Args:
        ctx: the eval context; ``ctx.options["include_path"]`` is the folder of extra task
            YAML files (``--include-path``), ``fewshot``/``seed`` as described above.
        task_name: the harness's task (or group) name.

    Raises:
        ConfigError: lm_eval not installed (naming ``pip install 'lmkit[lm-eval]'``), or no
            such task (with the closest names).
        DataError: the harness cannot load the task's data, or a request does not fit the model.
    """
    lm_eval = _import_harness()
    from lm_eval.tasks import TaskManager

    from lmkit.data.sources import _offline_if_unreachable
    from lmkit.evaluation.lm_eval_model import LmkitLM

    include = ctx.options.get("include_path")
    seed = ctx.options.get("seed")
    with _quiet_harness() as collected, _offline_if_unreachable():
        manager = _task_manager(TaskManager, task_name, include)
        if task_name not in manager.all_tasks:
            close = difflib.get_close_matches(task_name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f" (defaults and {include})" if include else " (give --include-path DIR for your own task YAMLs)"
            raise ConfigError(f"--task lm-eval:{task_name}: no such lm-evaluation-harness task{where}{hint}")
        lm = LmkitLM(ctx.model, ctx.tokenizer, block_size=ctx.config.model.block_size, device=ctx.device,
                     batch_size=ctx.batch_size, seed=int(seed or 0),
                     max_tokens=int(ctx.options.get("max_tokens") or (16384 if ctx.device.type == "cpu" else 65536)),
                     progress=ctx.progress)
        kwargs: dict[str, Any] = {}
        if ctx.options.get("fewshot") is not None:
            kwargs["num_fewshot"] = int(ctx.options["fewshot"])
        if seed is not None:
            kwargs["fewshot_random_seed"] = int(seed)
        if ctx.options.get("max_new_tokens") is not None:
            kwargs["gen_kwargs"] = {"max_gen_toks": int(ctx.options["max_new_tokens"])}
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[task_name], task_manager=manager, limit=ctx.limit,
                                          log_samples=True, **kwargs)
        except (ConfigError, DataError):
            raise
        except Exception as exc:  # noqa: BLE001 - the harness's own failures (data, config): one line
            raise DataError(f"--task lm-eval:{task_name}: the harness failed ({type(exc).__name__}: "
                            f"{first_line(exc)})") from None
    return _task_result(out, task_name, collected.lines, lm_eval.__version__)


def _task_result(out: dict[str, Any], task_name: str, log_lines: list[str], harness_version: str) -> TaskResult:
    """A :class:`TaskResult` from ``simple_evaluate``'s output for ``task_name``."""
    results = out.get("results") or {}
    groups = out.get("groups") or {}
    block = groups.get(task_name) or results.get(task_name)
    if block is None:
        raise DataError(f"--task lm-eval:{task_name}: the harness returned no results for it")
    metrics = harness_metrics(block)
    if not metrics:
        raise DataError(f"--task lm-eval:{task_name}: the harness reported no numeric metrics")
    higher = (out.get("higher_is_better") or {}).get(task_name) or {}
    values = [m for m in metrics if not m.endswith("_stderr")]
    headline = "acc_norm" if "acc_norm" in metrics else next(
        (m for m in higher if m in metrics), values[0] if values else next(iter(metrics)))
    n_samples = out.get("n-samples") or {}
    subtasks = [t for t in results if t != task_name]
    n_items = sum(int((n_samples.get(t) or {}).get("effective") or 0) for t in (subtasks or [task_name]))
    config = (out.get("configs") or {}).get(task_name) or {}
    if not config and subtasks:
        config = (out.get("configs") or {}).get(subtasks[0]) or {}
    data_file, sha = _data_file(config)
    versions = out.get("versions") or {}
    version = f"{versions.get(task_name, '?')}+lm_eval-{harness_version}"
    details: dict[str, Any] = {
        "harness": {"lm_eval_version": harness_version, "versions": versions, "n_samples": n_samples,
                    "num_fewshot": (out.get("n-shot") or {}).get(task_name),
                    "limit": (out.get("config") or {}).get("limit")},
        "results": {t: harness_metrics(b) for t, b in results.items()},
        "examples": _examples(out.get("samples") or {}, subtasks or [task_name]),
    }
    if subtasks:
        details["subtasks"] = subtasks
    notes = [f"lm-eval: {line}" for line in log_lines[:5]]
    return TaskResult(task=f"lm-eval:{task_name}", version=version, metrics=metrics, headline=headline,
                      n_items=n_items, data_file=data_file, data_sha256=sha, details=details, notes=notes,
                      directions=_directions(metrics, higher))


def _examples(samples: dict[str, list[dict[str, Any]]], tasks: list[str]) -> list[dict[str, Any]]:
    """The first :data:`N_EXAMPLES` per-document records: doc id, target, the responses
    (``[log-likelihood, is_greedy]`` per choice, or the generated text) and the metrics."""
    rows: list[dict[str, Any]] = []
    for task in tasks:
        for sample in (samples.get(task) or [])[:N_EXAMPLES]:
            resps = [r[0] if isinstance(r, list) and len(r) == 1 else r for r in sample.get("resps") or []]
            rows.append({"task": task, "doc_id": sample.get("doc_id"), "target": _plain(sample.get("target")),
                         "resps": _plain(resps),
                         "metrics": {m: _plain(sample.get(m)) for m in sample.get("metrics") or [] if m in sample}})
    return rows[:N_EXAMPLES]


def _plain(value: Any) -> Any:
    """JSON-ready: tuples -> lists, numpy scalars -> Python numbers, anything else -> str."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        with contextlib.suppress(Exception):
            return item()
    return str(value)
