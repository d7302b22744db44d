"""Which attention heads does parenthesised arithmetic need? Zero one head at a time and
compare flat against parenthesised accuracy (Nishal14/Step-free-arithmetic-transformers,
``eval/eval_pilot_ablation.py``; SEEDS_SPEC 3.5). The ``head-ablation`` task of ``lmkit eval``.

A head is ablated by zeroing its slice of the attention output before the output
projection (``y[:, head] = 0`` in ``(B, n_head, T, head_dim)``, through the model
interface's :meth:`~lmkit.models.base.LanguageModel.capture` ``edit_heads``), which is the
same as removing its ``head_dim`` input columns from the projection. For every
``(layer, head)`` alone, on ``test_flat`` and ``test_paren``:

    drop_flat  = base_flat  - abl_flat          drop_paren = base_paren - abl_paren
    gap        = abl_paren  - abl_flat
    impact     = drop_paren - drop_flat = (base_paren - abl_paren) - (base_flat - abl_flat)

A positive impact: the head matters more for parenthesised expressions. With 100 + 100
items an impact of a few points is noise, so each impact gets a 95% paired-bootstrap
interval (items resampled within each split, the same resample for base and ablated
scores; :func:`lmkit.evaluation.stats.paired_bootstrap`, fixed seed) and a p-value (a paired
sign-flip randomization test, :func:`lmkit.evaluation.stats.sign_flip_test`), and the heads
that stay significant after Holm's correction over all heads tested are marked.

The accuracy (``ctx.options["accuracy"]``, ``--accuracy``), named in the result:

- ``teacher-forced`` (default): the argmax after ``<BOS> expr " = "`` and after each true
  answer prefix is the next answer character, for every character (``<EOS>`` not scored).
  At the pilot's size exact match is ~1.5% and every impact would read 0.
- ``exact-match``: greedy generation from ``<BOS> expr " = "`` gives the answer then ``<EOS>``.
- ``legacy-eos``: the seed's number, the teacher-forced argmax at the last label position
  (after the true answer) is ``<EOS>`` -- what its reported L2-H2 +0.046 (pilot) and the 10M
  model's L0-H2 / L0-H3 findings measured.

``--ablate-heads L0H2,L0H3`` (``ctx.options["ablate_heads"]``) also ablates those heads
together (the targeted ablation). The heatmaps (layers x heads: impact, flat drop, paren
drop) go to ``runs/NAME/eval/head-ablation/heatmap_<accuracy>.png``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmkit.data.arithmetic import ArithmeticExample
from lmkit.data.tokenizers import Tokenizer
from lmkit.errors import ConfigError, DataError
from lmkit.evaluation.stats import N_BOOT, SEED, holm, paired_bootstrap, sign_flip_test
from lmkit.evaluation.task import EvalContext, TaskResult, file_stem
from lmkit.models.base import HeadEdit

VERSION = "1"
TASK = "head-ablation"
ACCURACIES = ("teacher-forced", "exact-match", "legacy-eos")
DEFAULT_ACCURACY = "teacher-forced"
ALPHA = 0.05
ACCURACY_NOTES = {
    "teacher-forced": "teacher-forced: an item is correct when the argmax after '<BOS> expr = ' and after each true "
                      "answer prefix is the next answer character, for every answer character (<EOS> not scored)",
    "exact-match": "exact-match: greedy generation from '<BOS> expr = ' gives the answer's characters, then <EOS>",
    "legacy-eos": "legacy-eos: the original metric (Step-free-arithmetic-transformers), the teacher-forced argmax after the true answer is <EOS> -- it "
                  "measures 'knows the answer has ended', not the answer",
}
#: Metric-name prefix per accuracy, as the ``arithmetic`` task names its metrics (exact match
#: unprefixed, ``tf_``, ``legacy_``): results under different accuracies never share a name.
PREFIXES = {"exact-match": "", "teacher-forced": "tf_", "legacy-eos": "legacy_"}
_METRIC_DIRECTIONS = {
    "base_acc_flat": "higher", "base_acc_paren": "higher", "base_paren_gap": "neither",
    "top_impact": "neither", "top_impact_low": "neither", "top_impact_high": "neither", "top_impact_p_holm": "neither",
    "min_impact": "neither", "n_significant": "neither",
    "targeted_acc_flat": "neither", "targeted_acc_paren": "neither", "targeted_impact": "neither",
    "targeted_impact_low": "neither", "targeted_impact_high": "neither", "targeted_p": "neither",
}
DIRECTIONS = {prefix + k: v for prefix in PREFIXES.values() for k, v in _METRIC_DIRECTIONS.items()}
DIRECTIONS["n_heads"] = "neither"

_HEAD = re.compile(r"^L(\d+)-?H(\d+)$", re.IGNORECASE)


def head_name(layer: int, head: int) -> str:
    """``L{layer}H{head}``, e.g. ``L2H2`` (0-based, as the seed's ``L2-H2``)."""
    return f"L{layer}H{head}"


def parse_heads(spec: str, n_layer: int, n_head: int) -> list[tuple[int, int]]:
    """``"L0H2,L0H3"`` (also ``L0-H2``, any case) -> ``[(0, 2), (0, 3)]``, duplicates dropped.

    Raises:
        ConfigError: a malformed entry, or a layer/head outside the model (one line).
    """
    heads: list[tuple[int, int]] = []
    for part in (p.strip() for p in str(spec).split(",")):
        m = _HEAD.match(part)
        if not m:
            raise ConfigError(f"--ablate-heads {spec}: expected heads like L0H2,L0H3, got {part!r}")
        layer, head = int(m.group(1)), int(m.group(2))
        if layer >= n_layer or head >= n_head:
            raise ConfigError(f"--ablate-heads {spec}: {part} is outside the model ({n_layer} layers x {n_head} heads)")
        if (layer, head) not in heads:
            heads.append((layer, head))
    return heads


def zero_heads(heads: Sequence[tuple[int, int]]) -> HeadEdit:
    """The :data:`~lmkit.models.base.HeadEdit` that zeroes ``heads`` (``(layer, head)`` pairs):
    ``y (B, n_head, T, head_dim)`` -> a copy with those heads' outputs set to 0."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def edit(layer: int, y: torch.Tensor) -> torch.Tensor:
        if layer not in by_layer:
            return y
        y = y.clone()
        y[:, by_layer[layer]] = 0
        return y

    return edit


def impact(base_paren: float, abl_paren: float, base_flat: float, abl_flat: float) -> float:
    """``(base_paren - abl_paren) - (base_flat - abl_flat)`` (SEEDS_SPEC 3.5): how much more the
    ablation costs parenthesised expressions than flat ones (accuracy fractions in, a fraction out)."""
    return (base_paren - abl_paren) - (base_flat - abl_flat)


@torch.no_grad()
def teacher_forced_flags(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[ArithmeticExample], *,
                         device: torch.device, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Both teacher-forced checks from one forward of ``<BOS> expr " = " answer`` per item
    (rows right-padded, ``batch_size`` per forward; the head runs only at scored positions).

    Returns:
        ``(all_answer, legacy)`` bool arrays ``(n,)``: every answer character is the argmax of
        its position; the argmax after the full answer is ``<EOS>``.

    Raises:
        DataError: an item longer than the model's ``block_size``.
    """
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    seqs = [[bos, *tokenizer.encode(ex.prompt + ex.answer), eos] for ex in examples]
    n_answer = [len(tokenizer.encode(ex.answer)) for ex in examples]
    block = model.config.block_size
    if any(len(s) - 1 > block for s in seqs):
        raise DataError(f"an arithmetic item is longer than the model's block_size {block}")
    head = model.output_head()
    all_ok, legacy = np.zeros(len(seqs), dtype=bool), np.zeros(len(seqs), dtype=bool)
    for start in range(0, len(seqs), max(1, batch_size)):
        chunk = seqs[start:start + batch_size]
        width = max(len(s) for s in chunk) - 1
        idx = torch.full((len(chunk), width), eos, dtype=torch.long)
        rows, cols, targets = [], [], []
        for r, s in enumerate(chunk):
            idx[r, :len(s) - 1] = torch.tensor(s[:-1])
            k = n_answer[start + r]
            # s[j] is predicted at position j - 1: answer characters s[L-1-k .. L-2], then <EOS> s[L-1]
            for j in range(len(s) - 1 - k, len(s)):
                rows.append(r)
                cols.append(j - 1)
                targets.append(s[j])
        hidden, _ = model(idx.to(device), return_hidden=True)
        pred = head(hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]).argmax(-1).cpu()
        hit = (pred == torch.tensor(targets)).numpy()
        pos = 0
        for r in range(len(chunk)):
            k = n_answer[start + r]
            all_ok[start + r] = bool(hit[pos:pos + k].all())
            legacy[start + r] = bool(hit[pos + k])
            pos += k + 1
    return all_ok, legacy


def item_correct(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[ArithmeticExample], accuracy: str, *,
                 device: torch.device, edit: HeadEdit | None = None, batch_size: int = 256) -> np.ndarray:
    """Per-item correctness ``(n,)`` bool under ``accuracy`` (one of :data:`ACCURACIES`), with
    ``edit`` applied to the per-head outputs of every forward (``None``: the model as it is)."""
    from contextlib import nullcontext

    with model.capture(edit_heads=edit) if edit is not None else nullcontext():
        if accuracy == "exact-match":
            from lmkit.evaluation.arithmetic import generated_answers

            answers = generated_answers(model, tokenizer, examples, batch_size=batch_size)
            return np.array([a == tokenizer.encode(ex.answer) for a, ex in zip(answers, examples, strict=True)])
        all_ok, legacy = teacher_forced_flags(model, tokenizer, examples, device=device, batch_size=batch_size)
    return legacy if accuracy == "legacy-eos" else all_ok


def _model_shape(ctx: EvalContext) -> tuple[int, int]:
    cfg = ctx.config.model
    n_layer, n_head = getattr(cfg, "n_layer", None), getattr(cfg, "n_head", None)
    if not n_layer or not n_head:
        raise ConfigError(f"{ctx.run_dir}: the model config has no n_layer/n_head: no heads to ablate")
    return int(n_layer), int(n_head)


def _fmt_head(row: dict) -> str:
    sig = " *" if row["significant"] else ""
    return (f"{row['name']} {row['impact']:+.3f} [{row['impact_low']:+.3f}, {row['impact_high']:+.3f}] "
            f"(flat {row['acc_flat']:.2f}, paren {row['acc_paren']:.2f}, p_holm {row['p_holm']:.3g}){sig}")


def evaluate(ctx: EvalContext) -> TaskResult:
    """The head scan (and ``--ablate-heads``' joint ablation) on the run's test_flat and
    test_paren splits; see the module docstring.

    Metrics (each name prefixed by the accuracy, :data:`PREFIXES`: ``tf_`` teacher-forced,
    ``legacy_`` legacy-eos, none for exact match; ``n_heads`` unprefixed):
    ``base_acc_flat``, ``base_acc_paren``, ``base_paren_gap``; ``top_impact`` (the
    headline: the largest impact of a single head) with its interval ``top_impact_low`` /
    ``_high`` and Holm-adjusted p ``top_impact_p_holm``; ``min_impact``; ``n_significant`` (heads
    whose Holm-adjusted p <= 0.05) of ``n_heads``; with ``--ablate-heads``, ``targeted_acc_flat``,
    ``targeted_acc_paren``, ``targeted_impact`` (+ ``_low``/``_high``) and ``targeted_p``.
    ``details["heads"]``: one row per head in rank order (impact, descending).

    Raises:
        ConfigError: an unknown ``accuracy`` or malformed ``ablate_heads``.
        DataError: no test_flat or test_paren split.
    """
    from lmkit.evaluation.arithmetic import arithmetic_splits

    _need_bos_eos(ctx)
    accuracy = ctx.options.get("accuracy") or DEFAULT_ACCURACY
    if accuracy not in ACCURACIES:
        raise ConfigError(f"--accuracy {accuracy}: choose {', '.join(ACCURACIES)}")
    n_layer, n_head = _model_shape(ctx)
    targeted = parse_heads(ctx.options["ablate_heads"], n_layer, n_head) if ctx.options.get("ablate_heads") else None
    splits, data_file, sha, notes = arithmetic_splits(ctx, ("test_flat", "test_paren"))
    if ctx.limit is not None:
        splits = {s: v[:ctx.limit] for s, v in splits.items()}
    if not splits.get("test_flat") or not splits.get("test_paren"):
        raise DataError(f"{data_file}: head ablation needs both test_flat and test_paren examples")
    flat, paren = splits["test_flat"], splits["test_paren"]
    items, n_flat = [*flat, *paren], len(flat)
    bs = max(1, ctx.batch_size)
    total = 1 + n_layer * n_head + (1 if targeted else 0)
    done = 0

    def score(edit: HeadEdit | None) -> tuple[np.ndarray, np.ndarray]:
        nonlocal done
        ok = item_correct(ctx.model, ctx.tokenizer, items, accuracy, device=ctx.device, edit=edit, batch_size=bs)
        done += 1
        ctx.progress(done, total)
        return ok[:n_flat].astype(np.float64), ok[n_flat:].astype(np.float64)

    ctx.progress(0, total)
    base_f, base_p = score(None)
    heads = [(layer, head) for layer in range(n_layer) for head in range(n_head)]
    abl = [score(zero_heads([lh])) for lh in heads]
    abl_f = np.stack([a[0] for a in abl])
    abl_p = np.stack([a[1] for a in abl])
    diffs = [base_p[None] - abl_p, base_f[None] - abl_f]
    boot = paired_bootstrap(diffs, [1.0, -1.0], n_boot=N_BOOT, seed=SEED)
    p_values = sign_flip_test(diffs, [1.0, -1.0], n_perm=N_BOOT, seed=SEED)
    p_holm, significant = holm(p_values, ALPHA)
    acc_f, acc_p = abl_f.mean(1), abl_p.mean(1)
    rows = []
    for i, (layer, head) in enumerate(heads):
        rows.append({
            "layer": layer, "head": head, "name": head_name(layer, head),
            "acc_flat": float(acc_f[i]), "acc_paren": float(acc_p[i]), "gap": float(acc_p[i] - acc_f[i]),
            "drop_flat": float(base_f.mean() - acc_f[i]), "drop_paren": float(base_p.mean() - acc_p[i]),
            "impact": impact(base_p.mean(), acc_p[i], base_f.mean(), acc_f[i]),
            "impact_low": float(boot.low[i]), "impact_high": float(boot.high[i]),
            "p_value": float(p_values[i]), "p_holm": float(p_holm[i]), "significant": bool(significant[i]),
        })
    ranked = sorted(rows, key=lambda r: (-r["impact"], r["layer"], r["head"]))
    for rank, row in enumerate(ranked, start=1):
        row["rank"] = rank
    top = ranked[0]
    metrics = {
        "base_acc_flat": float(base_f.mean()), "base_acc_paren": float(base_p.mean()),
        "base_paren_gap": float(base_p.mean() - base_f.mean()),
        "top_impact": top["impact"], "top_impact_low": top["impact_low"], "top_impact_high": top["impact_high"],
        "top_impact_p_holm": top["p_holm"], "min_impact": ranked[-1]["impact"],
        "n_significant": float(sum(r["significant"] for r in rows)), "n_heads": float(len(rows)),
    }
    details: dict = {"accuracy": accuracy, "alpha": ALPHA, "n_flat": len(flat), "n_paren": len(paren),
                     "bootstrap": {"n_boot": boot.n_boot, "seed": boot.seed, "level": boot.level,
                                   "method": "paired, stratified by split; percentile interval"},
                     "test": {"method": "paired sign-flip randomization test of the impact, two-sided",
                              "n_perm": N_BOOT, "seed": SEED, "correction": "Holm over all heads scanned"},
                     "heads": ranked, "top5": [r["name"] for r in ranked[:5]],
                     "bottom5": [r["name"] for r in ranked[-5:]]}
    notes.append(f"accuracy {ACCURACY_NOTES[accuracy]}")
    notes.append(f"base: flat {base_f.mean():.3f} (n={len(flat)}), paren {base_p.mean():.3f} (n={len(paren)}), "
                 f"gap {base_p.mean() - base_f.mean():+.3f}")
    notes.append("impact = (base_paren - abl_paren) - (base_flat - abl_flat) [95% paired-bootstrap interval, "
                 f"{boot.n_boot:,} resamples over items, seed {boot.seed}]; p: paired sign-flip test; * = significant "
                 f"after Holm over {len(rows)} heads (alpha {ALPHA})")
    notes.append("top 5: " + "; ".join(_fmt_head(r) for r in ranked[:5]))
    notes.append("bottom 5: " + "; ".join(_fmt_head(r) for r in ranked[-5:]))
    sig = [r["name"] for r in ranked if r["significant"]]
    notes.append(f"significant after Holm: {', '.join(sig) if sig else 'none'}")
    if targeted:
        t_f, t_p = score(zero_heads(targeted))
        t_diffs = [base_p - t_p, base_f - t_f]
        t_boot = paired_bootstrap(t_diffs, [1.0, -1.0], n_boot=N_BOOT, seed=SEED)
        t_pval = float(sign_flip_test(t_diffs, [1.0, -1.0], n_perm=N_BOOT, seed=SEED)[0])
        names = ",".join(head_name(*lh) for lh in targeted)
        t = {"heads": names, "acc_flat": float(t_f.mean()), "acc_paren": float(t_p.mean()),
             "impact": impact(base_p.mean(), t_p.mean(), base_f.mean(), t_f.mean()),
             "impact_low": float(t_boot.low[0]), "impact_high": float(t_boot.high[0]), "p": t_pval}
        details["targeted"] = t
        metrics.update({"targeted_acc_flat": t["acc_flat"], "targeted_acc_paren": t["acc_paren"],
                        "targeted_impact": t["impact"], "targeted_impact_low": t["impact_low"],
                        "targeted_impact_high": t["impact_high"], "targeted_p": t["p"]})
        notes.append(f"targeted ablation of {names} together: flat {t['acc_flat']:.3f}, paren {t['acc_paren']:.3f}, "
                     f"impact {t['impact']:+.3f} [{t['impact_low']:+.3f}, {t['impact_high']:+.3f}], p {t['p']:.3g} "
                     "(one planned test, no correction)")
    png = plot_heatmaps(rows, n_layer, n_head, ctx.run_dir / "eval" / file_stem(TASK) / f"heatmap_{accuracy}.png",
                        title=f"{ctx.run_dir.name} @ step {ctx.step}: head ablation ({accuracy})")
    details["files"] = [str(png)]
    notes.append(f"heatmaps (layers x heads: impact, flat drop, paren drop) -> {png}")
    prefix = PREFIXES[accuracy]
    metrics = {(k if k == "n_heads" else prefix + k): v for k, v in metrics.items()}
    return TaskResult(task=TASK, version=VERSION, metrics=metrics, headline=prefix + "top_impact", n_items=len(items),
                      data_file=data_file, data_sha256=sha, details=details, notes=notes, directions=DIRECTIONS)


def plot_heatmaps(rows: Sequence[dict], n_layer: int, n_head: int, path: Path, *, title: str = "") -> Path:
    """Three layers x heads heatmaps (impact, flat drop, paren drop; values written in the cells,
    ``*`` on heads significant after Holm) to ``path`` (parents created; matplotlib Agg).
    Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = {key: np.full((n_layer, n_head), np.nan) for key in ("impact", "drop_flat", "drop_paren")}
    stars = np.zeros((n_layer, n_head), dtype=bool)
    for r in rows:
        for key, grid in grids.items():
            grid[r["layer"], r["head"]] = r[key]
        stars[r["layer"], r["head"]] = r["significant"]
    lim = max(1e-6, *(float(np.nanmax(np.abs(g))) for g in grids.values()))
    fig, axes = plt.subplots(1, 3, figsize=(3.2 * 3 + 0.35 * n_head, 0.55 * n_layer + 2.2), constrained_layout=True)
    labels = {"impact": "impact (paren drop - flat drop)", "drop_flat": "flat accuracy drop",
              "drop_paren": "paren accuracy drop"}
    for ax, (key, grid) in zip(axes, grids.items(), strict=True):
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        for layer in range(n_layer):
            for head in range(n_head):
                mark = "*" if key == "impact" and stars[layer, head] else ""
                ax.text(head, layer, f"{grid[layer, head]:+.2f}{mark}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(n_head), [f"H{h}" for h in range(n_head)])
        ax.set_yticks(range(n_layer), [f"L{layer}" for layer in range(n_layer)])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(labels[key], fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _need_bos_eos(ctx: EvalContext) -> None:
    tok = ctx.tokenizer
    if tok.bos_id is None or tok.eos_id is None:
        raise DataError(f"the run's {tok.kind} tokenizer has no <BOS>/<EOS>; {TASK} needs the char tokenizer of "
                        "an arithmetic run")
