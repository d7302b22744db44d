"""The multiplication-tokens study's report in ``lmkit compare`` (seed 004, SEEDS_SPEC §1.7).

:func:`mul_study_report` adds to a two-run comparison what the seed's ``compare_runs.py``
wrote as ``comparison_report_10b.json`` -- per condition the ``gsm8k`` and ``arithmetic``
(the arithmetic probes) metrics, and under ``comparison``: GSM8K accuracy with ``delta``
(mul − base) and ``relative_improvement`` (delta / base, ``null`` when base is 0), probe
accuracy with its delta, ``arithmetic_by_category`` and ``mul_token_usage`` -- and what its
earlier ``compare_results.py`` printed: the data stats (total/train/val tokens, mul-token
count and ratio, compression), parameters, vocabulary and final train/val losses; plus
HellaSwag ``acc_norm`` at each run's last evaluated checkpoint and the ``verdict`` on GSM8K
(``IMPROVEMENT`` / ``REGRESSION`` / ``no difference``, the seed's console summary).

When it applies (:func:`applies`): exactly two runs, and either their configs differ only in
``data.condition`` (names, output folders, descriptions, cache folders and the run each was
initialised from, ``init_from`` and its record ``init_source``, aside) or a run's gsm8k / probe results count mul tokens. The run whose
condition is ``baseline`` is the base (otherwise the first run); the keys ``baseline`` and
``mul_tokens`` name the two roles, ``runs`` maps them to the run names.

A fine-tuned run (``init_from``) often has neither HellaSwag sweeps nor pretraining data
stats of its own: those are then taken from the run it was initialised from (followed up to
:data:`MAX_SOURCE_DEPTH` runs back), and ``from_run`` says which run gave them.

This module reads :class:`lmkit.compare.RunData` objects (duck-typed; it does not import
:mod:`lmkit.compare`, which calls it). Nothing here prints: :func:`render_mul_report` gives
the lines the command shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: How far back ``init_from`` is followed for HellaSwag and pretraining data stats.
MAX_SOURCE_DEPTH = 3
#: Config keys (dotted) that may differ between the two conditions' runs.
IGNORED_CONFIG_KEYS = frozenset({"name", "out_dir", "description", "data.cache_dir", "init_from", "source",
                                 "init_source", "training.wandb_run_name", "data.condition"})
#: Dotted-key prefixes ignored the same way: ``init_source`` is the record of the run each was
#: initialised from (path, spec, tokenizer fingerprint, val_loss, ...), which always differs.
IGNORED_CONFIG_PREFIXES = ("init_source.",)
#: Data stats keys shown (DataReady ``stats`` of a build with ``data.condition``).
DATA_KEYS = ("total_tokens", "train_tokens", "val_tokens", "mul_tokens", "mul_token_ratio")
PROBE_CATEGORIES = ("mul_table", "mul_multidigit", "addition")
ROLES = ("baseline", "mul_tokens")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"condition": x}}`` -> ``{"data.condition": x}`` (lists kept as values)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two run configs, :data:`IGNORED_CONFIG_KEYS` and
    keys under :data:`IGNORED_CONFIG_PREFIXES` aside."""
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in set(fa) | set(fb)
                  if k not in IGNORED_CONFIG_KEYS and not k.startswith(IGNORED_CONFIG_PREFIXES)
                  and fa.get(k) != fb.get(k))


def _condition(run: Any) -> str | None:
    data = (run.config or {}).get("data") or {}
    return data.get("condition") if isinstance(data, dict) else None


def _counts_mul(run: Any) -> bool:
    for task, keys in (("gsm8k", ("mul_token_count",)), ("arithmetic-probes", ("total_mul_tokens",))):
        metrics = (run.evals.get(task) or {}).get("metrics") or {}
        if any(_num(metrics.get(k)) is not None for k in keys):
            return True
    return False


def applies(runs: Sequence[Any]) -> str | None:
    """Why the report applies (``"data.condition"`` or ``"mul-token counts"``), or ``None``."""
    if len(runs) != 2:
        return None
    a, b = runs
    ca, cb = _condition(a), _condition(b)
    if ca and cb and ca != cb and a.config and b.config and not config_differences(a.config, b.config):
        return "data.condition"
    if any(_counts_mul(r) for r in runs):
        return "mul-token counts"
    return None


def _roles(runs: Sequence[Any]) -> tuple[Any, Any]:
    a, b = runs
    if _condition(b) == "baseline" and _condition(a) != "baseline":
        return b, a
    return a, b


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _delta(base: float | None, other: float | None) -> float | None:
    return None if base is None or other is None else other - base


def _relative(base: float | None, other: float | None) -> float | None:
    """delta / base, ``None`` when base is 0 or missing (the seed's ``relative_improvement``)."""
    d = _delta(base, other)
    return None if d is None or not base else d / base


def _sources(run: Any) -> list[Any]:
    """The run, then the runs it was initialised from (nearest first)."""
    chain, seen = [run], {str(run.path)}
    while len(chain) <= MAX_SOURCE_DEPTH:
        source = getattr(chain[-1], "source", None)
        if source is None or str(source.path) in seen:
            break
        chain.append(source)
        seen.add(str(source.path))
    return chain


def _hellaswag(run: Any) -> dict[str, Any] | None:
    """acc_norm at the last evaluated checkpoint (the sweep's last point, else ``eval/hellaswag.json``)."""
    for r in _sources(run):
        points = r.sweeps.get("hellaswag") or []
        result = r.evals.get("hellaswag")
        if points:
            last = points[-1]
            value = _num((last.get("metrics") or {}).get("acc_norm"))
            if value is not None:
                return {"acc_norm": value, "step": last.get("step"), "from_run": r.name, "checkpoints": len(points)}
        if result and _num((result.get("metrics") or {}).get("acc_norm")) is not None:
            return {"acc_norm": float(result["metrics"]["acc_norm"]), "step": result.get("step"), "from_run": r.name,
                    "checkpoints": 1}
    return None


def _data_stats(run: Any) -> dict[str, Any] | None:
    """The DataReady stats of the nearest run in the ``init_from`` chain that built condition data."""
    for r in _sources(run):
        stats = getattr(r, "data_stats", None)
        if isinstance(stats, dict) and _num(stats.get("total_tokens")) is not None:
            return {**{k: stats.get(k) for k in DATA_KEYS}, "tokens_saved": stats.get("tokens_saved"),
                    "token_reduction": stats.get("token_reduction"), "from_run": r.name}
    return None


def _per_category(result: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    cats = ((result or {}).get("details") or {}).get("per_category") or {}
    return {c: v for c, v in cats.items() if isinstance(v, dict)}


def _row(base: float | None, mul: float | None) -> dict[str, Any]:
    return {"baseline": base, "mul_tokens": mul, "delta": _delta(base, mul)}


def mul_study_report(comparison: Any) -> dict[str, Any] | None:
    """The study's report for a :class:`lmkit.compare.Comparison`, or ``None`` when it does not
    apply (see the module docstring for the shape)."""
    why = applies(comparison.runs)
    if why is None:
        return None
    base, mul = _roles(comparison.runs)
    pair = {"baseline": base, "mul_tokens": mul}
    report: dict[str, Any] = {"applies_because": why, "runs": {role: r.name for role, r in pair.items()},
                              "conditions": {role: _condition(r) for role, r in pair.items()}}
    for role, r in pair.items():
        report[role] = {key: dict((r.evals.get(task) or {}).get("metrics") or {})
                        for key, task in (("gsm8k", "gsm8k"), ("arithmetic", "arithmetic-probes"))
                        if r.evals.get(task)}
    comp: dict[str, Any] = {}
    acc = {role: _num(report[role].get("gsm8k", {}).get("accuracy")) for role in ROLES}
    if acc["baseline"] is not None and acc["mul_tokens"] is not None:
        comp["gsm8k"] = {"baseline_accuracy": acc["baseline"], "mul_tokens_accuracy": acc["mul_tokens"],
                         "delta": _delta(acc["baseline"], acc["mul_tokens"]),
                         "relative_improvement": _relative(acc["baseline"], acc["mul_tokens"])}
    probe = {role: _num(report[role].get("arithmetic", {}).get("accuracy")) for role in ROLES}
    if probe["baseline"] is not None and probe["mul_tokens"] is not None:
        comp["arithmetic"] = {"baseline_accuracy": probe["baseline"], "mul_tokens_accuracy": probe["mul_tokens"],
                              "delta": _delta(probe["baseline"], probe["mul_tokens"]),
                              "relative_improvement": _relative(probe["baseline"], probe["mul_tokens"])}
        cats = {role: _per_category(pair[role].evals.get("arithmetic-probes")) for role in ROLES}
        names = [c for c in PROBE_CATEGORIES if c in cats["baseline"] or c in cats["mul_tokens"]]
        names += sorted((set(cats["baseline"]) | set(cats["mul_tokens"])) - set(names))
        comp["arithmetic_by_category"] = {
            c: _row(_num(cats["baseline"].get(c, {}).get("accuracy")), _num(cats["mul_tokens"].get(c, {}).get("accuracy")))
            for c in names}
    usage = _usage(report, pair)
    if usage:
        comp["mul_token_usage"] = usage
    report["comparison"] = comp
    delta = comp.get("gsm8k", {}).get("delta")
    report["verdict"] = None if delta is None else ("IMPROVEMENT" if delta > 0 else "REGRESSION" if delta < 0
                                                    else "no difference")
    if "gsm8k" in comp:
        n = {role: _num(report[role]["gsm8k"].get("total")) for role in ROLES}
        comp["gsm8k"]["p_value"] = two_proportion_p(acc["baseline"], n["baseline"], acc["mul_tokens"],
                                                    n["mul_tokens"])
        report["verdict_basis"] = ("the sign of the GSM8K accuracy delta, as the original's summary; p_value: two-sided "
                                   "Fisher's exact test on correct/incorrect counts (item-sampling noise only: one "
                                   "run per condition gives no estimate of seed noise)")
    hs = {role: _hellaswag(r) for role, r in pair.items()}
    report["hellaswag"] = {**{role: hs[role] for role in ROLES},
                           "delta": _delta(*(None if hs[role] is None else hs[role]["acc_norm"] for role in ROLES))}
    report["data"] = _data_section(pair)
    report["training"] = _training_section(comparison, pair)
    return report


def two_proportion_p(p1: float | None, n1: float | None, p2: float | None, n2: float | None) -> float | None:
    """Two-sided p-value of Fisher's exact test on the 2x2 table of correct / incorrect items
    (``round(p * n)`` correct of ``n`` per condition; ``scipy.stats.fisher_exact``), or ``None``
    without counts. Exact, so not liberal near 0 % accuracy as a z-test is (0/200 vs 5/200:
    Fisher 0.061, the unpooled z-test 0.024)."""
    if None in (p1, n1, p2, n2) or not n1 or not n2:
        return None
    from scipy.stats import fisher_exact

    k1, k2 = round(p1 * n1), round(p2 * n2)
    n1, n2 = round(n1), round(n2)
    return float(fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative="two-sided").pvalue)


def _usage(report: dict[str, Any], pair: dict[str, Any]) -> dict[str, Any]:
    """The seed's ``{total_mul_tokens, per_response}`` from the mul run's gsm8k metrics, with the
    baseline's counts and the probes' (total, per probe, per category) beside them."""
    out: dict[str, Any] = {}
    gsm = report["mul_tokens"].get("gsm8k", {})
    if _num(gsm.get("mul_token_count")) is not None:
        out.update(total_mul_tokens=gsm["mul_token_count"], per_response=gsm.get("mul_tokens_per_response"))
    by_role = {}
    for role in ROLES:
        g, a = report[role].get("gsm8k", {}), report[role].get("arithmetic", {})
        entry = {"gsm8k_total": _num(g.get("mul_token_count")), "gsm8k_per_response": _num(g.get("mul_tokens_per_response")),
                 "probes_total": _num(a.get("total_mul_tokens")), "probes_per_probe": _num(a.get("mul_tokens_per_probe")),
                 "probes_by_category": {c: v.get("mul_tokens") for c, v in
                                        _per_category(pair[role].evals.get("arithmetic-probes")).items()
                                        if _num(v.get("mul_tokens")) is not None}}
        if any(v not in (None, {}) for v in entry.values()):
            by_role[role] = entry
    if by_role:
        out["by_condition"] = by_role
    return out


def _data_section(pair: dict[str, Any]) -> dict[str, Any]:
    stats = {role: _data_stats(r) for role, r in pair.items()}
    out: dict[str, Any] = {role: stats[role] for role in ROLES}
    rows = {}
    for key in DATA_KEYS:
        b = _num((stats["baseline"] or {}).get(key))
        m = _num((stats["mul_tokens"] or {}).get(key))
        rows[key] = {**_row(b, m), "relative_change": _relative(b, m)}
    out["rows"] = rows
    b_total, m_total = rows["total_tokens"]["baseline"], rows["total_tokens"]["mul_tokens"]
    # the seed's "token compression": baseline total - mul total, over the baseline total
    saved = None if b_total is None or m_total is None else b_total - m_total
    out["compression"] = {"tokens_saved": saved, "reduction": saved / b_total if saved is not None and b_total
                          else None,
                          "mul_run_own": {"tokens_saved": (stats["mul_tokens"] or {}).get("tokens_saved"),
                                          "token_reduction": (stats["mul_tokens"] or {}).get("token_reduction")}}
    return out


def _training_section(comparison: Any, pair: dict[str, Any]) -> dict[str, Any]:
    order = {r.name: i for i, r in enumerate(comparison.runs)}

    def values(key: str) -> dict[str, Any]:
        try:
            row = comparison.row(key)
        except KeyError:
            return _row(None, None)
        b, m = (row.values[order[pair[role].name]] for role in ROLES)
        return _row(b, m)

    vocab = {}
    for role, r in pair.items():
        model = (r.config or {}).get("model") or {}
        vocab[role] = model.get("vocab_size") if isinstance(model, dict) else None
        vocab[role] = vocab[role] if vocab[role] is not None else (r.tokenizer or {}).get("vocab_size")
    return {"num_params": values("params"), "vocab_size": _row(vocab["baseline"], vocab["mul_tokens"]),
            "final_train_loss": values("final_train_loss"), "final_val_loss": values("final_val_loss")}


# ---------------------------------------------------------------------------- rendering


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.2%}" if signed else f"{value:.2%}"


def _int(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+,.0f}" if signed else f"{value:,.0f}"


def _float(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def render_mul_report(report: dict[str, Any]) -> list[str]:
    """The report as plain text lines (no markup), in the seed's order: GSM8K, probes and their
    categories, mul-token usage, HellaSwag, data stats, training; then the GSM8K verdict."""
    runs = report["runs"]
    comp = report.get("comparison", {})
    lines = [f"Multiplication tokens: {runs['baseline']} (baseline) vs {runs['mul_tokens']} (mul_tokens)"
             f" — shown because of {report['applies_because']}"]
    w = 24

    def three(label: str, b: str, m: str, d: str) -> str:
        return f"  {label:<{w}} {b:>14} {m:>14} {d:>16}"

    lines.append(three("", "baseline", "mul_tokens", "Δ"))
    gsm = comp.get("gsm8k")
    if gsm:
        rel = gsm.get("relative_improvement")
        lines.append(three("GSM8K accuracy", _pct(gsm["baseline_accuracy"]), _pct(gsm["mul_tokens_accuracy"]),
                           _pct(gsm["delta"], True) + ("" if rel is None else f" ({rel:+.1%})")))
    else:
        lines.append("  GSM8K accuracy: — (run `lmkit eval RUN --task gsm8k` on both runs)")
    arith = comp.get("arithmetic")
    if arith:
        lines.append(three("probe accuracy", _pct(arith["baseline_accuracy"]), _pct(arith["mul_tokens_accuracy"]),
                           _pct(arith["delta"], True)))
        for cat, row in comp.get("arithmetic_by_category", {}).items():
            lines.append(three(f"  {cat}", _pct(row["baseline"]), _pct(row["mul_tokens"]), _pct(row["delta"], True)))
    else:
        lines.append("  probe accuracy: — (run `lmkit eval RUN --task arithmetic-probes` on both runs)")
    by = comp.get("mul_token_usage", {}).get("by_condition", {})
    if by:
        b, m = by.get("baseline", {}), by.get("mul_tokens", {})
        lines.append(three("mul tokens (GSM8K)", _int(b.get("gsm8k_total")), _int(m.get("gsm8k_total")), ""))
        lines.append(three("  per response", _float(b.get("gsm8k_per_response")),
                           _float(m.get("gsm8k_per_response")), ""))
        lines.append(three("mul tokens (probes)", _int(b.get("probes_total")), _int(m.get("probes_total")), ""))
    hs = report.get("hellaswag", {})
    hb, hm = hs.get("baseline"), hs.get("mul_tokens")
    lines.append(three("HellaSwag acc_norm", _float(None if hb is None else hb["acc_norm"]),
                       _float(None if hm is None else hm["acc_norm"]), _float(hs.get("delta"), True)))
    if hb or hm:
        lines.append(three("  at step", *("—" if h is None else _int(_num(h.get("step"))) for h in (hb, hm)), ""))
        if any(h and h["from_run"] != runs[role] for role, h in (("baseline", hb), ("mul_tokens", hm))):
            lines.append(three("  from run", *("—" if h is None else h["from_run"] for h in (hb, hm)), ""))
    data = report.get("data", {})
    for key, label in (("total_tokens", "data: total tokens"), ("train_tokens", "  train tokens"),
                       ("val_tokens", "  val tokens"), ("mul_tokens", "  mul tokens")):
        row = data.get("rows", {}).get(key, {})
        lines.append(three(label, _int(row.get("baseline")), _int(row.get("mul_tokens")), _int(row.get("delta"), True)))
    ratio = data.get("rows", {}).get("mul_token_ratio", {})
    lines.append(three("  mul-token ratio", _pct(ratio.get("baseline")), _pct(ratio.get("mul_tokens")),
                       _pct(ratio.get("delta"), True)))
    comp_ = data.get("compression", {})
    if comp_.get("tokens_saved") is not None:
        lines.append(f"  token compression: {comp_['tokens_saved']:,.0f} fewer tokens "
                     f"({_pct(comp_.get('reduction'))} reduction)")
    train = report.get("training", {})
    for key, label, fmt in (("num_params", "params", _int), ("vocab_size", "vocab size", _int),
                            ("final_train_loss", "train loss (final)", _float),
                            ("final_val_loss", "val loss (final)", _float)):
        row = train.get(key, {})
        lines.append(three(label, fmt(row.get("baseline")), fmt(row.get("mul_tokens")), fmt(row.get("delta"), True)))
    verdict = report.get("verdict")
    if verdict == "IMPROVEMENT":
        lines.append("RESULT: Mul-tokens condition shows IMPROVEMENT on GSM8K")
    elif verdict == "REGRESSION":
        lines.append("RESULT: Mul-tokens condition shows REGRESSION on GSM8K")
    elif verdict == "no difference":
        lines.append("RESULT: No difference between conditions on GSM8K")
    p = (gsm or {}).get("p_value")
    if verdict is not None and p is not None:
        within = "within" if p >= 0.05 else "beyond"
        lines.append(f"  (the sign of Δ, as the original's summary; Fisher's exact test p = {p:.3g}: {within} "
                     "item-sampling noise; one run per condition gives no estimate of seed noise)")
    return lines
