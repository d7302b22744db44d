"""Runs side by side: the data behind ``lmkit compare``.

:func:`compare_runs` reads finished (or unfinished) run folders -- ``summary.json``,
``metrics.jsonl``, ``tokenizer/tokenizer_meta.json`` and the eval results that
``lmkit eval`` writes (``eval/TASK.json``, ``eval/TASK/checkpoint_results.json``, see
:mod:`lmkit.evaluation.task``) -- and returns a :class:`Comparison`: one :class:`Row` per
quantity with every run's value, the delta of each run against the first run (the
*base*), the relative change and the index of the better value. Nothing here prints;
:func:`plot_comparison` draws the figure and :meth:`Comparison.to_report` gives the JSON
report whose ``comparison`` block follows ``comparison_report_10b.json`` of
zhengpu-berkeley/domain-token-gpt2 (SEEDS_SPEC 1.7).

Missing files or values are ``None`` (shown as "—" by the command), never an error: a
run that has logged nothing yet still compares.

Losses and perplexities are per *token*, so they are only comparable between runs that
share a tokenizer. When the runs' tokenizers differ (kind, vocabulary size or
fingerprint), those rows carry ``tokenizer_dependent=True``, no better value is picked,
and bits per byte (``bpb`` of the ``perplexity`` eval task) is the comparable row.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmkit.errors import ConfigError
from lmkit.evaluation.task import fallback_direction
from lmkit.numbers import finite
from lmkit.rundir import RunDir

#: Metric names measured per token: not comparable between different tokenizers.
TOKENIZER_DEPENDENT = frozenset({"loss", "mean_loss", "perplexity", "ppl", "val_loss", "train_loss"})
#: Keys of a result's ``details`` that hold per-split / per-category numbers.
_GROUP_KEY = re.compile(r"split|categor", re.IGNORECASE)
#: Inner keys tried (after the task's headline) to pick one number per split/category.
_PRIMARY_KEYS = ("accuracy", "acc", "exact_match", "acc_norm", "value")
#: y-axis labels (with units) of eval curves, by metric name.
_AXIS_LABELS = {"bpb": "bpb (bits per byte)", "mean_loss": "loss (nats/token)", "perplexity": "perplexity",
                "acc_norm": "acc_norm (fraction correct)", "acc": "acc (fraction correct)",
                "accuracy": "accuracy (fraction correct)", "acc_val": "acc_val (exact match, fraction)"}
#: Largest weight of the exponential moving average drawn over the logged train loss.
EMA_WEIGHT = 0.9


@dataclass
class RunData:
    """What one run folder holds, as read by :func:`load_run_data`.

    Attributes:
        name: the display name (the folder name; made unique among the compared runs).
        path: the run folder.
        summary: ``summary.json`` (``{}`` when absent).
        train: logged train rows of ``metrics.jsonl`` as ``(step, tokens, loss)``.
        val: logged val rows as ``(step, tokens, loss)`` (step 0 is the untrained baseline).
        tokenizer: ``{"kind", "vocab_size", "fingerprint"}`` (``{}`` when unknown).
        evals: task -> the latest result (``eval/TASK.json``; the last checkpoint of a sweep
            when only the sweep exists, with ``"from_sweep": True``).
        sweeps: task -> ``checkpoint_results.json`` entries ``{"step", "tokens", "metrics"}``.
        config: ``config.yaml`` (``{}`` when absent or unreadable).
        data_stats: the ``stats`` of the last ``data_ready`` event in ``events.jsonl``
            (``None`` when there is none: data without ``data.condition``, or an older run).
        source: the run this one was initialised from (``init_from``), read the same way
            (``None``: not initialised from a run, or that run is not found).
    """

    name: str
    path: Path
    summary: dict[str, Any] = field(default_factory=dict)
    train: list[tuple[int, int | None, float]] = field(default_factory=list)
    val: list[tuple[int, int | None, float]] = field(default_factory=list)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    sweeps: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    data_stats: dict[str, Any] | None = None
    source: RunData | None = None

    def inherited_sweeps(self) -> dict[str, tuple[str, list[dict[str, Any]]]]:
        """task -> ``(run name, sweep)`` for sweeps this run lacks but the runs it was initialised
        from have (nearest first): a fine-tuned run's pretraining HellaSwag curve."""
        out: dict[str, tuple[str, list[dict[str, Any]]]] = {}
        seen, source = {str(self.path)}, self.source
        while source is not None and str(source.path) not in seen and len(seen) <= 3:
            for task, points in source.sweeps.items():
                if task not in self.sweeps:
                    out.setdefault(task, (source.name, points))
            seen.add(str(source.path))
            source = source.source
        return out

    def tokenizer_label(self) -> str | None:
        if not self.tokenizer:
            return None
        return f"{self.tokenizer.get('kind', '?')}/{self.tokenizer.get('vocab_size', '?')}"

    def tokenizer_identity(self) -> tuple[Any, ...] | None:
        if not self.tokenizer:
            return None
        return (self.tokenizer.get("kind"), self.tokenizer.get("vocab_size"), self.tokenizer.get("fingerprint"))


@dataclass
class Row:
    """One compared quantity.

    Attributes:
        key: machine name, unique in a comparison (``final_val_loss``, ``hellaswag.acc_norm``,
            ``arithmetic-probes.categories.mul_table`` ...).
        label: what the table shows.
        section: the table section (``run``, ``loss``, ``training eval``, ``eval: TASK``).
        values: one per run, in run order; ``None`` when the run lacks it.
        kind: ``int``, ``float``, ``tokens``, ``seconds``, ``rate`` (tokens/s), ``step`` (an
            int with no delta) or ``text``.
        lower_is_better: ``True``/``False``, or ``None`` when no value is better than another.
        tokenizer_dependent: a per-token quantity while the runs' tokenizers differ.
        headline: the task's headline metric.
        texts: for ``kind == "text"``: the strings shown (``values`` are then ``None``).
        table: shown in the table (``False``: the report only, e.g. a split whose numbers
            repeat a metric row).
    """

    key: str
    label: str
    section: str
    values: list[float | None]
    kind: str = "float"
    lower_is_better: bool | None = None
    tokenizer_dependent: bool = False
    headline: bool = False
    texts: list[str | None] | None = None
    table: bool = True

    @property
    def base(self) -> float | None:
        return self.values[0] if self.values else None

    @property
    def deltas(self) -> list[float | None]:
        """``value - base`` per run (``None`` for the base itself and for missing values)."""
        base = self.base
        return [None] + [None if (v is None or base is None or self.kind in ("text", "step")) else v - base
                         for v in self.values[1:]]

    @property
    def relative(self) -> list[float | None]:
        """``(value - base) / |base|`` per run (``None`` where the base is 0 or missing)."""
        base = self.base
        return [None if (d is None or not base) else d / abs(base) for d in self.deltas]

    @property
    def relative_improvement(self) -> list[float | None]:
        """:attr:`relative` signed so that positive means better (``None`` without a direction)."""
        if self.lower_is_better is None:
            return [None] * len(self.values)
        sign = -1.0 if self.lower_is_better else 1.0
        return [None if r is None else sign * r for r in self.relative]

    @property
    def best_index(self) -> int | None:
        """Index of the better value, or ``None``: no direction, a tokenizer-dependent row of
        runs with different tokenizers, fewer than two values, or a tie for best."""
        if self.lower_is_better is None or self.tokenizer_dependent or self.kind == "text":
            return None
        present = [(v, i) for i, v in enumerate(self.values) if v is not None and math.isfinite(v)]
        if len(present) < 2:
            return None
        best = min(v for v, _ in present) if self.lower_is_better else max(v for v, _ in present)
        winners = [i for v, i in present if v == best]
        return winners[0] if len(winners) == 1 else None

    def entry(self, names: Sequence[str]) -> dict[str, Any]:
        """This row for the JSON report: values, deltas and relative numbers keyed by run."""
        rest = list(names[1:])
        out: dict[str, Any] = {
            "label": self.label.strip(),
            "values": dict(zip(names, self.texts if self.kind == "text" and self.texts else self.values, strict=True)),
            "lower_is_better": self.lower_is_better,
            "delta": dict(zip(rest, self.deltas[1:], strict=True)),
            "relative_change": dict(zip(rest, self.relative[1:], strict=True)),
            "relative_improvement": dict(zip(rest, self.relative_improvement[1:], strict=True)),
            "better": names[self.best_index] if self.best_index is not None else None,
        }
        if self.tokenizer_dependent:
            out["warning"] = "per-token quantity; the runs use different tokenizers (compare bpb)"
        return out


@dataclass
class Comparison:
    """The result of :func:`compare_runs`.

    Attributes:
        runs: the runs, in the order given; the first is the base of every delta.
        rows: the compared quantities, in table order.
        tokenizers_differ: the runs' tokenizers differ (kind, vocab size or fingerprint).
        notes: lines to show under the table (tokenizer warning, mismatched eval data ...).
    """

    runs: list[RunData]
    rows: list[Row]
    tokenizers_differ: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.runs]

    def row(self, key: str) -> Row:
        """The row named ``key`` (``KeyError`` when absent)."""
        for row in self.rows:
            if row.key == key:
                return row
        raise KeyError(key)

    def has_sweeps(self) -> bool:
        return any(run.sweeps for run in self.runs)

    def to_report(self, png: str | Path | None = None) -> dict[str, Any]:
        """The JSON report.

        ``comparison`` follows domain-token-gpt2's report (SEEDS_SPEC 1.7), generalised to N runs: per eval task
        the headline metric with ``<run>_<metric>`` values, ``delta`` (run − base) and
        ``relative_improvement`` (delta / |base|, signed so that positive is better; ``null``
        when the base is 0) keyed by run, every metric (the headline too) under ``metrics``,
        the checkpoint step each run was evaluated at under ``step``; per-split /
        per-category numbers under ``<task>_by_category`` (``arithmetic_by_category`` holds
        the arithmetic splits val / test_flat / test_paren, ``arithmetic-probes_by_category`` the
        probe categories); ``training`` holds the run rows (params, tokens, losses ...);
        ``mul_token_usage`` appears only when a run's gsm8k or probe results count mul tokens.
        ``mul_tokens_report`` (beside ``comparison``) is :meth:`mul_report` when the two runs are
        the multiplication-tokens study's conditions. Non-finite numbers (an overflowing
        perplexity) become ``null``.
        """
        names = self.names
        comparison: dict[str, Any] = {"base": names[0], "training": {}}
        for row in self.rows:
            if not row.section.startswith("eval: "):
                comparison["training"][row.key] = row.entry(names)
                continue
            task = row.section[len("eval: "):]
            rest = row.key[len(task) + 1:]
            if rest.startswith("by_category."):
                cat = rest[len("by_category."):]
                entry = row.entry(names)
                entry.update({name: value for name, value in entry["values"].items() if name not in entry})
                comparison.setdefault(f"{task}_by_category", {})[cat] = entry
                continue
            block = comparison.setdefault(task, {"metrics": {}})
            entry = row.entry(names)
            if rest == "step":
                block["step"] = entry["values"]
                continue
            block["metrics"][rest] = entry
            if row.headline:
                block.update({k: v for k, v in entry.items() if k != "label"})
                block["metric"] = rest
                block.update({f"{name}_{rest}": value for name, value in entry["values"].items()})
        usage = {run.name: u for run in self.runs if (u := mul_token_usage(run))}
        if usage:
            comparison["mul_token_usage"] = usage
        extra = {}
        study = self.mul_report()
        if study is not None:
            extra["mul_tokens_report"] = study
        return finite({
            "lmkit_version": _version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "base": names[0],
            "runs": {run.name: _run_report(run) for run in self.runs},
            "tokenizers_differ": self.tokenizers_differ,
            "notes": list(self.notes),
            "png": str(png) if png is not None else None,
            "comparison": comparison,
            **extra,
        })

    def mul_report(self) -> dict[str, Any] | None:
        """The multiplication-tokens study's report (:func:`lmkit.compare_mul.mul_study_report`:
        the seed's ``comparison_report_10b.json`` shape plus data stats, HellaSwag, losses and the
        GSM8K verdict), or ``None`` when the runs are not that study's two conditions."""
        from lmkit.compare_mul import mul_study_report

        return mul_study_report(self)


# ---------------------------------------------------------------------------- reading


def load_run_data(run_dir: RunDir, name: str | None = None, *, _depth: int = 0) -> RunData:
    """Read one run folder (see :class:`RunData`); unreadable files count as absent."""
    path = run_dir.path
    data = RunData(name=name or run_dir.name, path=path)
    data.config = _read_yaml(run_dir.config_path)
    data.data_stats = _data_stats(run_dir.events_path)
    if _depth < 3:
        source = _init_source(data.config.get("init_from"), path, data.config.get("init_source"))
        if source is not None:
            data.source = load_run_data(source, _depth=_depth + 1)
    summary = _read_json(run_dir.summary_path)
    data.summary = summary if isinstance(summary, dict) else {}
    if run_dir.metrics_path.is_file():
        for line in run_dir.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if not isinstance(record, dict):
                continue
            loss, step = _number(record.get("loss")), record.get("step")
            if loss is None or not isinstance(step, int):
                continue
            tokens = record.get("tokens") if isinstance(record.get("tokens"), int) else None
            if record.get("split") == "train":
                data.train.append((step, tokens, loss))
            elif record.get("split") == "val":
                data.val.append((step, tokens, loss))
    data.tokenizer = _tokenizer_info(run_dir.tokenizer_dir)
    eval_dir = run_dir.eval_dir
    if eval_dir.is_dir():
        for file in sorted(eval_dir.glob("*.json")):
            result = _read_json(file)
            if isinstance(result, dict) and isinstance(result.get("metrics"), dict):
                data.evals[str(result.get("task") or file.stem)] = result
        for file in sorted(eval_dir.glob("*/checkpoint_results.json")):
            entries = _read_json(file)
            if not isinstance(entries, list):
                continue
            points = sorted((e for e in entries if isinstance(e, dict) and isinstance(e.get("metrics"), dict)
                             and isinstance(e.get("step"), int)), key=lambda e: e["step"])
            if not points:
                continue
            task = file.parent.name
            data.sweeps[task] = points
            if task not in data.evals:
                last = points[-1]
                headline, directions = _sweep_declarations(file.parent, points)
                data.evals[task] = {"task": task, "metrics": last["metrics"], "step": last["step"],
                                    "tokens": last.get("tokens"), "headline": headline, "from_sweep": True}
                if directions:
                    data.evals[task]["directions"] = directions
    return data


def compare_runs(runs: Sequence[str | Path], out_dir: str | Path = "runs") -> Comparison:
    """Compare two or more runs, given as names under ``out_dir`` or as run folders.

    Raises:
        ConfigError: fewer than two runs, a run given twice, or a name with no run
            (the message lists the runs in ``out_dir``).
    """
    if len(runs) < 2:
        raise ConfigError("compare: give at least two runs (names under --out-dir, or run folders)")
    dirs = [RunDir.existing(r, out_dir) for r in runs]
    seen: dict[Path, str] = {}
    for given, d in zip(runs, dirs, strict=True):
        key = d.path.resolve()
        if key in seen:
            raise ConfigError(f"{given}: the same run as {seen[key]}; give each run once")
        seen[key] = str(given)
    names = _unique_names(dirs)
    data = [load_run_data(d, n) for d, n in zip(dirs, names, strict=True)]
    return build_comparison(data)


def build_comparison(runs: list[RunData]) -> Comparison:
    """The rows of a comparison of ``runs`` (already read by :func:`load_run_data`)."""
    identities = {run.tokenizer_identity() for run in runs if run.tokenizer_identity() is not None}
    differ = len(identities) > 1
    rows: list[Row] = []

    def add(key: str, label: str, section: str, values: list[float | None], kind: str = "float",
            lower: bool | None = None, per_token: bool = False, headline: bool = False) -> None:
        rows.append(Row(key, label, section, values, kind, lower, per_token and differ, headline))

    def summary(key: str) -> list[float | None]:
        return [_number(run.summary.get(key)) for run in runs]

    add("params", "params", "run", summary("params"), "int")
    add("steps", "steps", "run", [_first(v, _last(r.train + r.val, 0)) for v, r in zip(summary("steps"), runs,
                                                                                        strict=True)], "int")
    add("tokens", "tokens seen", "run",
        [_first(v, _last(r.train + r.val, 1)) for v, r in zip(summary("tokens"), runs, strict=True)], "tokens")
    add("wall_time_s", "wall time", "run", summary("wall_time_s"), "seconds", lower=True)
    # train_tok_per_s: over training time (eval and saves excluded); wall_tok_per_s: over wall time.
    # Summaries written before the split had one tok_per_s, over wall time.
    add("train_tok_per_s", "train tokens/s", "run", summary("train_tok_per_s"), "rate", lower=False)
    add("wall_tok_per_s", "wall tokens/s", "run",
        [_first(w, old) for w, old in zip(summary("wall_tok_per_s"), summary("tok_per_s"), strict=True)], "rate",
        lower=False)
    rows.append(Row("tokenizer", "tokenizer", "run", [None] * len(runs), "text",
                    texts=[run.tokenizer_label() for run in runs]))

    final_train = [_first(v, _last(r.train, 2)) for v, r in zip(summary("final_train_loss"), runs, strict=True)]
    best_train = [min((loss for *_, loss in r.train), default=None) for r in runs]
    final_val = [_first(v, _last(r.val, 2)) for v, r in zip(summary("final_val_loss"), runs, strict=True)]
    best_val = [_first(v, min((loss for step, _, loss in r.val if step > 0), default=None))
                for v, r in zip(summary("best_val_loss"), runs, strict=True)]
    add("final_train_loss", "train loss (final)", "loss", final_train, lower=True, per_token=True)
    add("best_train_loss", "train loss (best logged)", "loss", best_train, lower=True, per_token=True)
    add("final_val_loss", "val loss (final)", "loss", final_val, lower=True, per_token=True)
    add("best_val_loss", "val loss (best)", "loss", best_val, lower=True, per_token=True)
    add("final_val_ppl", "val perplexity (final)", "loss", [_exp(v) for v in final_val], lower=True, per_token=True)
    add("best_val_ppl", "val perplexity (best)", "loss", [_exp(v) for v in best_val], lower=True, per_token=True)

    # the last in-training evaluation's extra metrics (e.g. the arithmetic acc_flat / acc_paren)
    finals = [r.summary.get("final_metrics") if isinstance(r.summary.get("final_metrics"), dict) else {}
              for r in runs]
    for metric in _ordered_keys(finals):
        if metric in ("ppl", "loss"):
            continue
        values = [_number(f.get(metric)) for f in finals]
        if any(v is not None for v in values):
            add(f"train_eval.{metric}", metric, "training eval (final val)", values, lower=_direction(metric),
                per_token=metric in TOKENIZER_DEPENDENT)

    notes: list[str] = []
    tasks = sorted(_ordered_keys([run.evals for run in runs]), key=lambda t: (t != "perplexity", t))
    for task in tasks:
        results = [run.evals.get(task) for run in runs]
        section = f"eval: {task}"
        headline = next((r.get("headline") for r in results if r and r.get("headline")), None)
        declared = _declared_directions(results)
        metrics = _ordered_keys([r.get("metrics", {}) if r else {} for r in results])
        if headline in metrics:
            metrics.remove(headline)
            metrics.insert(0, headline)
        for metric in metrics:
            values = [_number(r["metrics"].get(metric)) if r else None for r in results]
            if all(v is None for v in values):
                continue
            label = f"{metric} (headline)" if metric == headline else metric
            present = [v for v in values if v is not None]
            kind = "int" if all(v.is_integer() for v in present) and max(abs(v) for v in present) > 1 else "float"
            add(f"{task}.{metric}", label, section, values, kind, lower=_direction(metric, declared),
                per_token=metric in TOKENIZER_DEPENDENT, headline=metric == headline)
        groups = [_categories(r, headline) if r else {} for r in results]
        shown = [row.values for row in rows if row.section == section]
        for cat in _ordered_keys(groups):
            values = [g.get(cat) for g in groups]
            add(f"{task}.by_category.{cat}", f"  {cat}", section, values,
                lower=_direction(headline or "accuracy", declared))
            if values in shown:  # the same numbers as a metric row (acc_flat = splits.test_flat): JSON only
                rows[-1].table = False
        steps = [_number(r.get("step")) if r else None for r in results]
        if any(v is not None for v in steps):
            add(f"{task}.step", "evaluated at step", section, steps, "step")
        n_items = [_number(r.get("n_items")) if r else None for r in results]
        if len({v for v in n_items if v is not None}) > 1:
            # a --limit (or another split) scored another number of items: say so, in the table too
            add(f"{task}.n_items", "items scored", section, n_items, "int")
            limits = ", ".join(f"{run.name}: {int(v):,}" + (f" (--limit {r['limit']})" if r and r.get("limit") else "")
                               for run, v, r in zip(runs, n_items, results, strict=True) if v is not None)
            notes.append(f"⚠ {task}: results score different numbers of items ({limits}); "
                         "the numbers are not on the same items: re-run `lmkit eval` with the same --limit")
        versions = {r.get("version") for r in results if r and r.get("version") is not None}
        hashes = {r.get("data_sha256") for r in results if r and r.get("data_sha256") is not None}
        if len(versions) > 1:
            notes.append(f"⚠ {task}: results come from different task versions ({', '.join(sorted(versions))}); "
                         "re-run `lmkit eval` so they match")
        if len(hashes) > 1:
            notes.append(f"⚠ {task}: results come from different data files (SHA-256 differ); "
                         "the numbers are not on the same items")

    if differ:
        labels = ", ".join(f"{run.name}: {run.tokenizer_label()}" for run in runs)
        bpb = next((row.values for row in rows if row.key == "perplexity.bpb"), [None] * len(runs))
        lacking = [run.name for run, v in zip(runs, bpb, strict=True) if v is None]
        tail = "compare bpb (bits per byte) instead"
        if lacking:
            tail = (f"bpb (bits per byte) is the comparable row: run `lmkit eval RUN --task perplexity` "
                    f"on {', '.join(lacking)} for it")
        notes.insert(0, f"⚠ the runs use different tokenizers ({labels}): losses and perplexities are per token "
                        f"and not comparable (rows marked ⚠); {tail}")
    return Comparison(runs=runs, rows=rows, tokenizers_differ=differ, notes=notes)


def mul_token_usage(run: RunData) -> dict[str, Any] | None:
    """Mul-token counts (the multiplication-tokens experiment) from a run's gsm8k or
    arithmetic-probes result, or ``None``.

    Looks for ``mul_token_count``/``total_mul_tokens`` and ``mul_tokens_per_response``/
    ``mul_tokens_per_probe`` in the result's metrics, then its details.
    """
    for task in ("gsm8k", "arithmetic-probes"):
        result = run.evals.get(task)
        if not result:
            continue
        pools = [result.get("metrics") or {}, result.get("details") or {}]
        total = _lookup(pools, ("total_mul_tokens", "mul_token_count", "mul_tokens"))
        per = _lookup(pools, ("mul_tokens_per_response", "mul_tokens_per_probe", "per_response"))
        if total is not None or per is not None:
            return {"source": task, "total_mul_tokens": total, "per_response": per}
    return None


def default_plot_path(names: Sequence[str], folder: str | Path = "compare") -> Path:
    """``compare/<run1>_vs_<run2>….png`` (DESIGN.md), with unsafe characters replaced."""
    stem = "_vs_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", n) for n in names)
    if len(stem) > 120:
        stem = stem[:100] + "-" + hashlib.sha256(stem.encode()).hexdigest()[:8]
    return Path(folder) / f"{stem}.png"


# ---------------------------------------------------------------------------- figure


def ema_weight(n_points: int) -> float:
    """The EMA weight for a curve of ``n_points`` logged values: ``1 - 20/n`` clamped to
    [0, :data:`EMA_WEIGHT`], so short curves are drawn as logged (a heavy average of a few
    points would lag far behind the last one) and long ones get a ~10-point average."""
    return max(0.0, min(EMA_WEIGHT, 1.0 - 20.0 / max(1, n_points)))


def ema(values: Sequence[float], weight: float = EMA_WEIGHT) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing):
    ``m_t = w·m_{t-1} + (1-w)·x_t``, reported as ``m_t / (1 - w^t)``."""
    out, m = [], 0.0
    for t, x in enumerate(values, start=1):
        m = weight * m + (1.0 - weight) * x
        out.append(m / (1.0 - weight**t))
    return out


def plot_comparison(comparison: Comparison, path: str | Path, dpi: int = 150) -> Path:
    """Draw the comparison figure and save it as PNG at ``path`` (parent folders created).

    Panel 1: train loss (EMA-smoothed with :func:`ema_weight`; raw points faint) and val loss
    (markers) of every run against tokens seen. One more panel per eval task that any run
    swept over checkpoints (``lmkit eval --checkpoint all``): the task's headline metric
    against the optimizer step, one curve per run in the same panel (e.g. both conditions'
    HellaSwag ``acc_norm``). A fine-tuned run without a sweep of its own shows the sweep of the
    run it was initialised from (:meth:`RunData.inherited_sweeps`, labelled "RUN (from SOURCE)").
    Uses matplotlib's Agg backend (no display needed).

    Returns:
        the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inherited = [run.inherited_sweeps() for run in comparison.runs]
    tasks = _ordered_keys([{**run.sweeps, **extra} for run, extra in zip(comparison.runs, inherited, strict=True)])
    n_panels = 1 + len(tasks)
    ncols = min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    ax = axes[0][0]
    drawn = False
    weight = ema_weight(max((len(run.train) for run in comparison.runs), default=0))
    for i, run in enumerate(comparison.runs):
        color = colors[i % len(colors)]
        train = [(tok, loss) for _, tok, loss in run.train if tok is not None and math.isfinite(loss)]
        if train:
            x = [t for t, _ in train]
            y = [v for _, v in train]
            if weight > 0:
                ax.plot(x, y, color=color, alpha=0.2, linewidth=0.8)
            ax.plot(x, ema(y, weight), color=color, linewidth=1.6, label=f"{run.name} train")
            drawn = True
        val = [(tok, loss) for _, tok, loss in run.val if tok is not None and math.isfinite(loss)]
        if val:
            ax.plot([t for t, _ in val], [v for _, v in val], color=color, linestyle="--", marker="o",
                    markersize=3.5, linewidth=1.2, label=f"{run.name} val")
            drawn = True
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    title = "Training and validation loss"
    if comparison.tokenizers_differ:
        title += "\n(per-token loss; tokenizers differ: not comparable)"
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.grid(True, alpha=0.3)
    if drawn:
        smoothing = f"train: EMA {weight:.2f} (raw faint)" if weight > 0 else "train: as logged"
        ax.legend(fontsize=7, frameon=False, title=smoothing, title_fontsize=7)
    else:
        ax.text(0.5, 0.5, "no logged losses", ha="center", va="center", transform=ax.transAxes, color="gray")

    for k, task in enumerate(tasks, start=1):
        ax = axes[k // ncols][k % ncols]
        metric = None
        for run in comparison.runs:
            source: RunData | None = run
            for _ in range(4):  # the run, then the runs it was initialised from
                if source is None or metric:
                    break
                metric = (source.evals.get(task) or {}).get("headline")
                source = source.source
        for i, run in enumerate(comparison.runs):
            points, label = run.sweeps.get(task), run.name
            if not points and task in inherited[i]:
                source, points = inherited[i][task]
                label = f"{run.name} (from {source})"
            if not points:
                continue
            m = metric or next(iter(points[-1]["metrics"]), None)
            xy = [(p["step"], _number(p["metrics"].get(m))) for p in points]
            xy = [(x, y) for x, y in xy if y is not None]
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], color=colors[i % len(colors)], marker="o",
                        markersize=3.5, linewidth=1.4, label=label)
            metric = metric or m
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(_AXIS_LABELS.get(metric or "", metric or "metric"))
        ax.set_title(f"{task}: {metric or ''} over checkpoints", fontsize=10)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    for k in range(n_panels, nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- helpers


def _run_report(run: RunData) -> dict[str, Any]:
    evals = {}
    for task, result in run.evals.items():
        evals[task] = {k: result.get(k) for k in ("metrics", "headline", "directions", "version", "n_items", "data_file",
                                                   "data_sha256", "checkpoint", "step", "tokens", "wall_time_s")
                       if k in result}
        if result.get("from_sweep"):
            evals[task]["from_sweep"] = True
        cats = _categories(result, result.get("headline"))
        if cats:
            evals[task]["by_category"] = cats
    return {"path": str(run.path), "summary": run.summary, "tokenizer": run.tokenizer, "evals": evals,
            "sweeps": {task: [{"step": p["step"], "tokens": p.get("tokens"), "metrics": p["metrics"]}
                              for p in points] for task, points in run.sweeps.items()}}


def _categories(result: dict[str, Any], headline: str | None) -> dict[str, float]:
    """Per-split / per-category numbers from a result's ``details``: every details key
    naming splits or categories (``splits``, ``categories``, ``per_category`` ...) that maps
    names to numbers or to dicts holding the headline (or accuracy / acc / exact_match, or
    ``correct`` and ``total``/``n``: their ratio)."""
    details = result.get("details")
    if not isinstance(details, dict):
        return {}
    out: dict[str, float] = {}
    for key, group in details.items():
        if not (isinstance(group, dict) and _GROUP_KEY.search(str(key))):
            continue
        for name, inner in group.items():
            value = _number(inner)
            if value is None and isinstance(inner, dict):
                for k in ((headline,) if headline else ()) + _PRIMARY_KEYS:
                    if _number(inner.get(k)) is not None:
                        value = _number(inner.get(k))
                        break
                else:
                    correct, n = _number(inner.get("correct")), _number(inner.get("total", inner.get("n")))
                    if correct is not None and n:
                        value = correct / n
            if value is not None:
                out[str(name)] = value
    return out


def _direction(metric: str, declared: dict[str, str] | None = None) -> bool | None:
    """True when lower is better, False when higher is, None when neither: the direction the
    task declared in its result (``directions``), else the fallback guess from the metric's
    name (:func:`lmkit.evaluation.task.fallback_direction`; result files written before
    tasks declared directions)."""
    direction = (declared or {}).get(metric) or fallback_direction(metric)
    return {"lower": True, "higher": False}.get(direction)


def _declared_directions(results: Sequence[dict[str, Any] | None]) -> dict[str, str]:
    """metric -> direction from the results' ``directions`` (the first run declaring a metric wins)."""
    out: dict[str, str] = {}
    for result in results:
        declared = result.get("directions") if result else None
        if isinstance(declared, dict):
            for metric, direction in declared.items():
                if direction in ("higher", "lower", "neither"):
                    out.setdefault(str(metric), direction)
    return out


def _tokenizer_info(directory: Path) -> dict[str, Any]:
    meta = _read_json(directory / "tokenizer_meta.json")
    if not isinstance(meta, dict) or "kind" not in meta:
        return {}
    info = {"kind": meta.get("kind"), "vocab_size": meta.get("vocab_size")}
    try:
        from lmkit.data.tokenizers import load_tokenizer

        info["fingerprint"] = load_tokenizer(directory).fingerprint()
    except Exception:  # noqa: BLE001 - an unloadable tokenizer still has a comparable description
        info["fingerprint"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return info


def _sweep_declarations(folder: Path, points: list[dict[str, Any]]) -> tuple[str | None, dict[str, str]]:
    """The headline and metric directions of a sweep, from its last ``step_*.json`` that has
    them (``checkpoint_results.json`` holds only the numbers); headline fallback: the first metric."""
    for file in sorted(folder.glob("step_*.json"), reverse=True):
        result = _read_json(file)
        if isinstance(result, dict) and result.get("headline"):
            directions = result.get("directions")
            return str(result["headline"]), directions if isinstance(directions, dict) else {}
    return next(iter(points[-1]["metrics"]), None), {}


def _unique_names(dirs: Sequence[RunDir]) -> list[str]:
    names = [d.name for d in dirs]
    for i, d in enumerate(dirs):
        if names.count(d.name) > 1:
            names[i] = f"{d.path.parent.name}/{d.name}"
    return [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]


def _ordered_keys(dicts: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for d in dicts:
        for k in d:
            seen.setdefault(k, None)
    return list(seen)


def _lookup(pools: Sequence[dict[str, Any]], keys: Sequence[str]) -> float | None:
    for pool in pools:
        for key in keys:
            if _number(pool.get(key)) is not None:
                return _number(pool.get(key))
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def _last(rows: list[tuple[int, int | None, float]], index: int) -> float | None:
    if not rows:
        return None
    value = max(rows, key=lambda r: r[0])[index]
    return None if value is None else float(value)


def _exp(loss: float | None) -> float | None:
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml

        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - an unreadable or broken config counts as absent
        return {}
    return value if isinstance(value, dict) else {}


def _data_stats(events: Path) -> dict[str, Any] | None:
    """``stats`` of the last ``data_ready`` event not marked superseded."""
    if not events.is_file():
        return None
    stats = None
    for line in events.read_text(encoding="utf-8", errors="replace").splitlines():
        if '"data_ready"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("kind") == "data_ready" and not record.get("superseded"):
            stats = record.get("stats") if isinstance(record.get("stats"), dict) else stats
    return stats


def _init_source(spec: Any, run_path: Path, record: Any = None) -> RunDir | None:
    """The run folder this run was initialised from, or ``None`` (``hf:`` sources, missing runs).

    The absolute ``path`` the trainer recorded in ``config["init_source"]`` comes first (it does
    not depend on the folder ``lmkit compare`` runs in); then ``init_from`` (``RUN`` or
    ``RUN:CHECKPOINT``; a path from the current folder, or a name beside ``run_path``)."""
    candidates: list[Path] = []
    if isinstance(record, dict) and record.get("kind", "run") == "run" and isinstance(record.get("path"), str):
        candidates.append(Path(record["path"]))
    if isinstance(spec, str) and spec and not spec.startswith("hf:"):
        names = [spec] + ([spec.rpartition(":")[0]] if ":" in spec else [])
        candidates += [p for name in names for p in (Path(name), run_path.parent / name)]
    elif not candidates:
        return None
    for path in candidates:
        if (path / "config.yaml").is_file() and path.resolve() != run_path.resolve():
            return RunDir(path)
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _version() -> str:
    from lmkit import __version__

    return __version__
