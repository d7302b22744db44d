"""Honest comparisons: groups of runs (seeds) with error bars, and what a single run can claim.

``lmkit compare --group baseline=b1,b2,b3 --group mul=m1,m2,m3`` reads every run with
:func:`lmkit.compare.load_run_data`, builds the rows of the plain comparison
(:func:`lmkit.compare.build_comparison`: params, losses, eval metrics ...) and summarises each
row per group (:class:`Stats`):

* ``n``, the mean and the sample standard deviation ``s`` (``ddof = 1``);
* the 95% t-interval of the mean, ``mean ± t_{0.975, n-1} · s / sqrt(n)`` (Student's t with
  ``n − 1`` degrees of freedom, ``scipy.stats.t``); none for ``n = 1``;
* per group after the first (the *base*), Welch's two-sided t-test against the base
  (unequal variances, Welch–Satterthwaite degrees of freedom; ``scipy.stats.ttest_ind(...,
  equal_var=False)``; Welch 1947, *Biometrika* 34:28-35).

A group is called *better* on a row only when the row has a direction (lower or higher is
better), the runs share a tokenizer for a per-token row, and the group differs from every
other group with ``p < 0.05`` in the better direction. With one run on a side there is no
noise estimate and nothing is called better; a quantity with no spread in either group
(params, steps) is never tested.

The plain two-run compare has the same problem with one run per side: a 0.0027 val-loss
difference between two seeds of one preset is seed noise, not an improvement.
:func:`single_run_verdicts` calls a run better only where a noise estimate exists -- an eval
metric ``X`` whose result also reports its standard error ``X_stderr`` (e.g. lm-evaluation-
harness tasks) -- by a two-sided z-test on ``ΔX / sqrt(se_a² + se_b²)``. That stderr is the
noise of the finite item set (the same checkpoints re-scored on other items), not across
seeds: it says whether these two checkpoints differ, not whether their recipes do.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmkit.compare import Comparison, Row, _unique_names, build_comparison, ema, ema_weight, load_run_data
from lmkit.errors import ConfigError
from lmkit.numbers import finite
from lmkit.rundir import RunDir

#: Coverage of the t-interval and the test's significance level.
CONFIDENCE = 0.95
ALPHA = 0.05
NO_NOISE = "no noise estimate (one run per side)"


@dataclass
class Stats:
    """One row's numbers in one group.

    Attributes:
        values: the finite values of the group's runs (runs lacking the row are left out).
        n: ``len(values)``.
        mean: their mean (``None`` when ``n == 0``).
        std: the sample standard deviation, ``ddof = 1`` (``None`` when ``n < 2``).
        ci: the 95% t-interval ``(low, high)`` of the mean (``None`` when ``n < 2``).
    """

    values: list[float]
    n: int
    mean: float | None
    std: float | None
    ci: tuple[float, float] | None

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "std": self.std,
                "ci95": list(self.ci) if self.ci is not None else None, "values": self.values}


def describe(values: Sequence[float | None], confidence: float = CONFIDENCE) -> Stats:
    """:class:`Stats` of ``values`` (``None`` and non-finite values dropped)."""
    from scipy import stats

    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return Stats([], 0, None, None, None)
    mean = sum(xs) / n
    if n < 2:
        return Stats(xs, n, mean, None, None)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Stats(xs, n, mean, std, (mean - half, mean + half))


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test of equal means, or ``None`` when it does not exist
    (fewer than two values on a side, or no spread on either side)."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    if max(a) == min(a) and max(b) == min(b):
        return None
    with warnings.catch_warnings():  # scipy warns on nearly identical data; the library never prints
        warnings.simplefilter("ignore")
        p = float(stats.ttest_ind(list(a), list(b), equal_var=False).pvalue)
    return p if math.isfinite(p) else None


@dataclass
class Verdict:
    """Which side is better on a row, and on what grounds.

    Attributes:
        better: index of the better group / run, or ``None``.
        p_value: the test's two-sided p-value (``None`` without a test).
        basis: what the verdict rests on, in words (``"Welch t-test p=0.012"``,
            ``"no noise estimate (one run per side)"`` ...).
    """

    better: int | None
    p_value: float | None
    basis: str


def _winner(means: Sequence[float], lower: bool) -> int:
    return min(range(len(means)), key=lambda i: means[i]) if lower else max(range(len(means)), key=lambda i: means[i])


def _untestable(row: Row) -> str | None:
    if row.kind in ("text", "step"):
        return "not a measurement"
    if row.lower_is_better is None:
        return "no better direction"
    if row.tokenizer_dependent:
        return "per-token quantity; the tokenizers differ"
    return None


@dataclass
class GroupRow:
    """One row of a grouped comparison: the plain row, its stats per group, the Welch p-value
    of each group against the base (``None`` for the base itself) and the verdict."""

    row: Row
    stats: list[Stats]
    p_values: list[float | None]
    verdict: Verdict


@dataclass
class GroupComparison:
    """The result of :func:`compare_groups`: ``groups`` as ``(name, [run display names])``,
    the plain comparison of all runs (``flat``) and one :class:`GroupRow` per row."""

    groups: list[tuple[str, list[str]]]
    flat: Comparison
    rows: list[GroupRow]
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.groups]

    def to_report(self) -> dict[str, Any]:
        """The ``groups`` block of the JSON report: the groups' runs, and per row key the label,
        direction, per-group stats (n, mean, std, ci95, values, per_run), the Welch p-value of each
        group against the base and the verdict."""
        names = self.names
        index = {name: i for i, name in enumerate(self.flat.names)}
        rows: dict[str, Any] = {}
        for g in self.rows:
            stats = {}
            for (name, runs), s in zip(self.groups, g.stats, strict=True):
                stats[name] = {**s.to_dict(), "per_run": {r: g.row.values[index[r]] for r in runs}}
            rows[g.row.key] = {
                "label": g.row.label.strip(), "section": g.row.section, "lower_is_better": g.row.lower_is_better,
                "stats": stats,
                "welch_p_vs_base": {name: p for name, p in zip(names[1:], g.p_values[1:], strict=True)},
                "better": names[g.verdict.better] if g.verdict.better is not None else None,
                "basis": g.verdict.basis,
            }
        return finite({"base": names[0], "confidence": CONFIDENCE, "alpha": ALPHA,
                       "runs": {name: runs for name, runs in self.groups}, "notes": list(self.notes), "rows": rows})


def parse_groups(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["base=a,b", "mul=c,d"]`` -> ``[("base", ["a", "b"]), ("mul", ["c", "d"])]``.

    Raises:
        ConfigError: a spec without ``NAME=``, an empty name or run list, a group named
            twice, fewer than two groups, or a run in two groups.
    """
    groups: list[tuple[str, list[str]]] = []
    owner: dict[str, str] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        name = name.strip()
        runs = [r.strip() for r in rest.split(",") if r.strip()]
        if not sep or not name or not runs:
            raise ConfigError(f"--group {spec}: write NAME=RUN,RUN,... (e.g. --group baseline=b1,b2,b3)")
        if any(name == n for n, _ in groups):
            raise ConfigError(f"--group {name}: the group is named twice")
        for run in runs:
            if run in owner:
                raise ConfigError(f"--group {name}: run {run} is already in group {owner[run]}")
            owner[run] = name
        groups.append((name, runs))
    if len(groups) < 2:
        raise ConfigError("--group: give at least two groups (e.g. --group baseline=b1,b2 --group mul=m1,m2)")
    return groups


def compare_groups(specs: Sequence[str], out_dir: str | Path = "runs") -> GroupComparison:
    """Compare groups of runs given as ``NAME=RUN,RUN,...`` (names under ``out_dir`` or folders).

    Raises:
        ConfigError: a malformed group (:func:`parse_groups`), an unknown run (naming the
            group and listing the runs in ``out_dir``), or a run given twice.
    """
    groups = parse_groups(specs)
    dirs: list[RunDir] = []
    member: list[int] = []
    seen: dict[Path, str] = {}
    for g, (name, runs) in enumerate(groups):
        for run in runs:
            try:
                d = RunDir.existing(run, out_dir)
            except ConfigError as exc:
                raise ConfigError(f"--group {name}: {exc}") from None
            key = d.path.resolve()
            if key in seen:
                raise ConfigError(f"--group {name}: {run} is the same run as {seen[key]}; give each run once")
            seen[key] = run
            dirs.append(d)
            member.append(g)
    names = _unique_names(dirs)
    flat = build_comparison([load_run_data(d, n) for d, n in zip(dirs, names, strict=True)])
    by_group = [(name, [names[i] for i in range(len(dirs)) if member[i] == g]) for g, (name, _) in enumerate(groups)]
    rows = [_group_row(row, member, len(groups)) for row in flat.rows]
    notes = list(flat.notes)
    singles = [name for name, runs in by_group if len(runs) == 1]
    if singles:
        notes.append(f"⚠ {', '.join(singles)}: one run only: {NO_NOISE} there, so no value is called better; "
                     "train more seeds")
    return GroupComparison(groups=by_group, flat=flat, rows=rows, notes=notes)


def _group_row(row: Row, member: Sequence[int], n_groups: int) -> GroupRow:
    values = [[row.values[i] for i in range(len(member)) if member[i] == g] for g in range(n_groups)]
    stats = [describe(v) for v in values]
    p_values: list[float | None] = [None] * n_groups
    if row.kind not in ("text", "step"):
        p_values[1:] = [welch_p(stats[0].values, s.values) for s in stats[1:]]
    return GroupRow(row=row, stats=stats, p_values=p_values, verdict=group_verdict(row, stats))


def group_verdict(row: Row, stats: Sequence[Stats]) -> Verdict:
    """The group that is better than every other group by Welch's test at :data:`ALPHA`, or none."""
    why = _untestable(row)
    if why:
        return Verdict(None, None, why)
    if any(s.n == 0 for s in stats):
        return Verdict(None, None, "missing in a group")
    if any(s.n < 2 for s in stats):
        return Verdict(None, None, NO_NOISE)
    means = [s.mean for s in stats]
    best = _winner(means, bool(row.lower_is_better))  # type: ignore[arg-type]
    ps = [welch_p(stats[best].values, s.values) for i, s in enumerate(stats) if i != best]
    if any(p is None for p in ps):
        return Verdict(None, None, "no spread in either group")
    worst_p = max(ps)  # type: ignore[type-var]
    if worst_p < ALPHA:
        return Verdict(best, worst_p, f"Welch t-test p={worst_p:.3g} < {ALPHA}")
    return Verdict(None, worst_p, f"no significant difference (Welch p={worst_p:.3g})")


# ---------------------------------------------------------------------------- one run per side


def single_run_verdicts(comparison: Comparison) -> dict[str, Verdict]:
    """Row key -> :class:`Verdict` for a plain comparison (one run per name; see the module
    docstring): a run is better only on an eval metric with a reported ``X_stderr`` in every
    run, by the two-sided z-test at :data:`ALPHA` against each other run."""
    from scipy import stats

    keys = {row.key: row for row in comparison.rows}
    out: dict[str, Verdict] = {}
    for row in comparison.rows:
        why = _untestable(row)
        se_row = keys.get(f"{row.key}_stderr") if row.section.startswith("eval: ") else None
        if why:
            out[row.key] = Verdict(None, None, why)
            continue
        values = row.values
        if se_row is None or any(v is None for v in values) or any(s is None for s in se_row.values):
            out[row.key] = Verdict(None, None, NO_NOISE + "; use --group with several seeds")
            continue
        best = _winner(values, bool(row.lower_is_better))  # type: ignore[arg-type]
        ps = []
        for i, (v, se) in enumerate(zip(values, se_row.values, strict=True)):
            if i == best:
                continue
            scale = math.hypot(se, se_row.values[best])  # type: ignore[arg-type]
            ps.append(float(2 * stats.norm.sf(abs(values[best] - v) / scale)) if scale > 0 else None)
        if any(p is None for p in ps):
            out[row.key] = Verdict(None, None, "a reported stderr is 0")
            continue
        p = max(ps)  # type: ignore[type-var]
        basis = f"z-test on the reported stderr p={p:.3g}"
        out[row.key] = Verdict(best if p < ALPHA else None, p, basis + (f" < {ALPHA}" if p < ALPHA else ": not significant"))
    return out


def honest_report(report: dict[str, Any], comparison: Comparison, verdicts: dict[str, Verdict]) -> dict[str, Any]:
    """``report`` (:meth:`lmkit.compare.Comparison.to_report`) with every ``better`` set from
    ``verdicts`` and the grounds added (``better_basis``, ``p_value``)."""
    names = comparison.names
    comp = report.get("comparison") or {}

    def fix(entry: dict[str, Any] | None, v: Verdict) -> None:
        if isinstance(entry, dict) and "better" in entry:
            entry["better"] = names[v.better] if v.better is not None else None
            entry["better_basis"], entry["p_value"] = v.basis, v.p_value

    for row in comparison.rows:
        v = verdicts.get(row.key)
        if v is None:
            continue
        if not row.section.startswith("eval: "):
            fix((comp.get("training") or {}).get(row.key), v)
            continue
        task = row.section[len("eval: "):]
        rest = row.key[len(task) + 1:]
        if rest.startswith("by_category."):
            fix((comp.get(f"{task}_by_category") or {}).get(rest[len("by_category."):]), v)
            continue
        block = comp.get(task) or {}
        fix((block.get("metrics") or {}).get(rest), v)
        if row.headline:
            fix(block, v)
    return finite(report)


# ---------------------------------------------------------------------------- figure


def band(series: Sequence[Sequence[tuple[float, float]]]) -> tuple[list[float], list[float], list[float]]:
    """Mean and sample std (``ddof = 1``; 0 for a single run) across runs on a shared step axis.

    Args:
        series: per run, ``(step, value)`` points in step order.

    Returns:
        ``(steps, mean, std)``: the steps are every step any run logged inside the range that
        all runs cover; each run is linearly interpolated onto them (``numpy.interp``).
    """
    import numpy as np

    series = [s for s in series if s]
    if not series:
        return [], [], []
    lo, hi = max(s[0][0] for s in series), min(s[-1][0] for s in series)
    steps = sorted({x for s in series for x, _ in s if lo <= x <= hi})
    if not steps:
        return [], [], []
    grid = np.array(steps, dtype=float)
    ys = np.array([np.interp(grid, [x for x, _ in s], [y for _, y in s]) for s in series])
    std = ys.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(len(grid))
    return steps, ys.mean(axis=0).tolist(), std.tolist()


def plot_groups(result: GroupComparison, path: str | Path, dpi: int = 150) -> Path:
    """The grouped figure at ``path`` (PNG, parent folders created): train loss (EMA, as
    :func:`lmkit.compare.plot_comparison` smooths it) and val loss against the optimizer step,
    one line per group (the mean across its runs) with a shaded band of ± one sample std, and
    one panel per swept eval task (its headline metric over checkpoints, same bands).

    Returns:
        the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = {run.name: run for run in result.flat.runs}
    tasks: list[str] = []
    for run in result.flat.runs:
        tasks.extend(t for t in run.sweeps if t not in tasks)
    fig, axes = plt.subplots(1, 2 + len(tasks), figsize=(5.2 * (2 + len(tasks)), 3.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    weight = ema_weight(max((len(r.train) for r in result.flat.runs), default=0))

    def draw(ax, g: int, name: str, series) -> None:
        steps, mean, std = band(series)
        if not steps:
            return
        color = colors[g % len(colors)]
        ax.plot(steps, mean, color=color, linewidth=1.6, label=f"{name} (n={len([s for s in series if s])})")
        ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                        [m + s for m, s in zip(mean, std, strict=True)], color=color, alpha=0.25, linewidth=0)

    for g, (name, members) in enumerate(result.groups):
        train = []
        for m in members:
            pts = [(s, v) for s, _, v in runs[m].train if math.isfinite(v)]
            train.append(list(zip([s for s, _ in pts], ema([v for _, v in pts], weight), strict=True)) if pts else [])
        draw(axes[0][0], g, name, train)
        draw(axes[0][1], g, name, [[(s, v) for s, _, v in runs[m].val if math.isfinite(v)] for m in members])
        for k, task in enumerate(tasks, start=2):
            metric = next((runs[m].evals.get(task, {}).get("headline") for m in members
                           if runs[m].evals.get(task, {}).get("headline")), None)
            series = []
            for m in members:
                points = runs[m].sweeps.get(task) or []
                key = metric or (next(iter(points[-1]["metrics"]), None) if points else None)
                series.append([(p["step"], float(p["metrics"][key])) for p in points
                               if isinstance(p["metrics"].get(key), (int, float))])
            draw(axes[0][k], g, name, series)
            axes[0][k].set_title(f"{task}: {metric or 'headline'} over checkpoints", fontsize=10)
            axes[0][k].set_ylabel(metric or "metric")
    smoothing = f"EMA {weight:.2f}" if weight > 0 else "as logged"
    axes[0][0].set_title(f"train loss ({smoothing}), mean ± std", fontsize=10)
    axes[0][1].set_title("val loss, mean ± std", fontsize=10)
    for ax in axes[0][:2]:
        ax.set_ylabel("cross-entropy loss (nats/token)")
    for ax in axes[0]:
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, frameon=False)
        else:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
