"""Is the parenthesis depth linearly readable from the model's activations? Logistic-regression
probes on the residual stream and on single heads (Nishal14/Step-free-arithmetic-transformers,
``probe/probe_depth.py``; SEEDS_SPEC 3.6). The ``depth-probe`` task of ``lmkit eval``.

Inputs: the parenthesised examples only (``max(depth) > 0``), encoded ``<BOS> expr <EOS>``
(no ``= result``); features at positions ``1..len(expr)`` (character ``i`` at position
``i + 1``), so the model has read the character whose depth is asked.

Features, per layer ``l``: the residual stream after block ``l`` ``(d,)``, and with
``--probe-heads`` (``ctx.options["probe_heads"]``) each head's output before the output
projection ``(head_dim,)`` (:meth:`~lmkit.models.base.LanguageModel.capture`).

Labels (:func:`probe_labels`): binary ``depth > 0`` (the seed's) and multiclass depth
``0/1/2``. ``(1+(2*3))`` -> multiclass ``[1,1,1,2,2,2,2,1,0]``.

Probe: ``sklearn.linear_model.LogisticRegression(max_iter=1000, random_state=42)`` on the
raw features of the train split's paren examples, scored on test_paren. Reported per
probe: train/test accuracy, sample counts, and the majority-class baseline (the train
split's most common label, scored on each split) -- the seed compared against a fixed 0.5,
while depth > 0 holds at most positions, so 0.5 flatters every probe. The PNG of test
accuracy against layer, with the baselines drawn, goes to
``runs/NAME/eval/depth-probe/probe.png``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmkit.data.arithmetic import depth_labels
from lmkit.data.tokenizers import Tokenizer
from lmkit.errors import ConfigError, DataError
from lmkit.evaluation.task import EvalContext, TaskResult, file_stem

VERSION = "1"
TASK = "depth-probe"
MAX_ITER, RANDOM_STATE = 1000, 42
LABELS = ("binary", "multi")


def probe_labels(expr: str) -> dict[str, list[int]]:
    """``{"binary": depth > 0, "multi": depth}`` per character of ``expr``
    (:func:`lmkit.data.arithmetic.depth_labels`)."""
    depth = depth_labels(expr)
    return {"binary": [int(d > 0) for d in depth], "multi": list(depth)}


@contextmanager
def _residual_hooks(model: nn.Module, out: list):
    """Record the output of every block (the residual stream after it) into ``out[layer]``.

    The model interface has no residual capture yet, so the blocks are found through
    :meth:`~lmkit.models.base.LanguageModel.target_modules` ("blocks"): the module named by
    the prefix up to the layer index of each block linear (``transformer.h.3.attn.c_attn`` ->
    ``transformer.h.3``).
    """
    names: list[str] = []
    for name in model.target_modules("blocks"):
        m = re.match(r"^(.*?\.\d+)\.", name)
        if m and m.group(1) not in names:
            names.append(m.group(1))
    if not names:
        raise ConfigError("depth-probe: cannot find the model's blocks for the residual stream")
    handles = []
    for layer, name in enumerate(names):
        def hook(_module, _inputs, output, layer=layer):
            while len(out) <= layer:
                out.append(None)
            out[layer] = output[0] if isinstance(output, tuple) else output
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def probe_features(model: nn.Module, tokenizer: Tokenizer, exprs: Sequence[str], *, device: torch.device,
                   heads: bool = False, batch_size: int = 256) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Features at the expression's character positions of ``<BOS> expr <EOS>``, rows in
    expression then character order.

    Returns:
        ``(resid, heads)``: ``resid[l]`` ``(N, d)`` the residual stream after block ``l``;
        ``heads[l]`` ``(N, n_head, head_dim)`` the per-head outputs of layer ``l`` before the
        output projection (``None`` unless ``heads``). ``N = sum(len(expr))``.
    """
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    seqs = [[bos, *tokenizer.encode(e), eos] for e in exprs]
    resid_parts: list[list[np.ndarray]] = []
    head_parts: list[list[np.ndarray]] = []
    for start in range(0, len(seqs), max(1, batch_size)):
        chunk = seqs[start:start + batch_size]
        width = max(len(s) for s in chunk)
        idx = torch.full((len(chunk), width), eos, dtype=torch.long)
        for r, s in enumerate(chunk):
            idx[r, :len(s)] = torch.tensor(s)
        rows = torch.tensor([r for r, s in enumerate(chunk) for _ in range(len(s) - 2)], device=device)
        cols = torch.tensor([j for s in chunk for j in range(1, len(s) - 1)], device=device)
        resid: list = []
        with _residual_hooks(model, resid), model.capture(heads=heads) as cap:
            model(idx.to(device))
        for layer, x in enumerate(resid):
            if len(resid_parts) <= layer:
                resid_parts.append([])
            resid_parts[layer].append(x[rows, cols].float().cpu().numpy())
        if heads:
            for layer, y in enumerate(cap.heads):  # (B, H, T, hd) -> (N, H, hd)
                if len(head_parts) <= layer:
                    head_parts.append([])
                head_parts[layer].append(y.transpose(1, 2)[rows, cols].float().cpu().numpy())
    return [np.concatenate(p) for p in resid_parts], ([np.concatenate(p) for p in head_parts] if heads else None)


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> dict:
    """Fit ``LogisticRegression(max_iter=1000, random_state=42)`` on ``(x_train (N, F), y_train (N,))``
    and score it on both splits.

    Returns:
        ``{"train_acc", "test_acc", "n_train", "n_test", "majority_class", "baseline_train",
        "baseline_test", "converged"}`` (baselines: always predicting the train split's most
        common label; ties go to the smaller label).

    Raises:
        ConfigError: scikit-learn is not installed.
    """
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ConfigError("depth-probe needs scikit-learn: pip install scikit-learn") from None
    values, counts = np.unique(y_train, return_counts=True)
    majority = int(values[np.argmax(counts)])
    out = {"n_train": int(len(y_train)), "n_test": int(len(y_test)), "majority_class": majority,
           "baseline_train": float(np.mean(y_train == majority)), "baseline_test": float(np.mean(y_test == majority))}
    if len(values) < 2:  # one class: the probe is the baseline
        return {**out, "train_acc": out["baseline_train"], "test_acc": out["baseline_test"], "converged": True}
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    clf = LogisticRegression(max_iter=MAX_ITER, random_state=RANDOM_STATE)
    # one BLAS thread: at (N ~ 1e4, F ~ 1e2) more threads gain little and, on a busy CPU, cost 10x
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    return {**out, "train_acc": float(clf.score(x_train, y_train)), "test_acc": float(clf.score(x_test, y_test)),
            "converged": bool(np.max(clf.n_iter_) < MAX_ITER)}


def evaluate(ctx: EvalContext) -> TaskResult:
    """The depth probes on the run's train (fit) and test_paren (score) splits; see the module docstring.

    Metrics: ``{binary,multi}_acc_resid_L{l}`` (test accuracy per layer), ``{binary,multi}_acc_resid_best``
    (the headline is ``binary_acc_resid_best``), ``{binary,multi}_baseline`` (majority class on
    test_paren), with ``--probe-heads`` ``{binary,multi}_acc_head_best``; ``n_train_positions``,
    ``n_test_positions``. ``details["probes"]``: every probe's full record.

    Raises:
        DataError: no train or test_paren examples with parentheses.
        ConfigError: scikit-learn missing.
    """
    from lmkit.evaluation.arithmetic import arithmetic_splits

    _need_bos_eos(ctx)
    splits, data_file, sha, notes = arithmetic_splits(ctx, ("train", "test_paren"))
    if ctx.limit is not None:
        splits = {s: v[:ctx.limit] for s, v in splits.items()}
    train = [ex.expr for ex in splits.get("train", []) if max(ex.depth, default=0) > 0]
    test = [ex.expr for ex in splits.get("test_paren", []) if max(ex.depth, default=0) > 0]
    if not train or not test:
        raise DataError(f"{data_file}: the depth probe needs parenthesised train and test_paren examples")
    with_heads = bool(ctx.options.get("probe_heads"))
    bs = max(1, ctx.batch_size)
    ctx.progress(0, 2)
    f_train = probe_features(ctx.model, ctx.tokenizer, train, device=ctx.device, heads=with_heads, batch_size=bs)
    f_test = probe_features(ctx.model, ctx.tokenizer, test, device=ctx.device, heads=with_heads, batch_size=bs)
    y_train = {k: np.concatenate([probe_labels(e)[k] for e in train]) for k in LABELS}
    y_test = {k: np.concatenate([probe_labels(e)[k] for e in test]) for k in LABELS}
    n_layer = len(f_train[0])
    n_head = f_train[1][0].shape[1] if with_heads else 0
    total = n_layer * len(LABELS) * (1 + n_head)
    done = 0
    ctx.progress(0, total)
    probes: list[dict] = []

    def run(kind: str, layer: int, head: int | None, xtr: np.ndarray, xte: np.ndarray) -> None:
        nonlocal done
        for label in LABELS:
            rec = fit_probe(xtr, y_train[label], xte, y_test[label])
            probes.append({"features": kind, "layer": layer, "head": head, "labels": label, **rec})
            done += 1
            ctx.progress(done, total)

    for layer in range(n_layer):
        run("resid", layer, None, f_train[0][layer], f_test[0][layer])
    if with_heads:
        for layer in range(n_layer):
            for head in range(n_head):
                run("head", layer, head, f_train[1][layer][:, head], f_test[1][layer][:, head])
    metrics: dict[str, float] = {}
    for label in LABELS:
        resid = [p for p in probes if p["features"] == "resid" and p["labels"] == label]
        for p in resid:
            metrics[f"{label}_acc_resid_L{p['layer']}"] = p["test_acc"]
        metrics[f"{label}_acc_resid_best"] = max(p["test_acc"] for p in resid)
        metrics[f"{label}_baseline"] = resid[0]["baseline_test"]
        if with_heads:
            metrics[f"{label}_acc_head_best"] = max(p["test_acc"] for p in probes
                                                    if p["features"] == "head" and p["labels"] == label)
    metrics["n_train_positions"] = float(len(y_train["binary"]))
    metrics["n_test_positions"] = float(len(y_test["binary"]))
    directions = {k: ("neither" if k.startswith("n_") or k.endswith("_baseline") else "higher") for k in metrics}
    notes.append(f"logistic regression (max_iter {MAX_ITER}, random_state {RANDOM_STATE}) on raw features; fit on "
                 f"{len(train)} parenthesised train expressions ({len(y_train['binary']):,} positions), scored on "
                 f"{len(test)} test_paren expressions ({len(y_test['binary']):,} positions)")
    for label in LABELS:
        resid = [p for p in probes if p["features"] == "resid" and p["labels"] == label]
        what = "depth > 0" if label == "binary" else "depth 0/1/2"
        notes.append(f"{what}: residual test acc " + " ".join(f"L{p['layer']} {p['test_acc']:.3f}" for p in resid)
                     + " | train acc " + " ".join(f"L{p['layer']} {p['train_acc']:.3f}" for p in resid)
                     + f" | majority baseline {resid[0]['baseline_test']:.3f} (class {resid[0]['majority_class']})")
        if with_heads:
            heads = sorted((p for p in probes if p["features"] == "head" and p["labels"] == label),
                           key=lambda p: -p["test_acc"])
            notes.append(f"{what}: best heads " + ", ".join(f"L{p['layer']}H{p['head']} {p['test_acc']:.3f}"
                                                             for p in heads[:5]))
    unconverged = sum(not p["converged"] for p in probes)
    if unconverged:
        notes.append(f"{unconverged} of {len(probes)} probes stopped at max_iter {MAX_ITER} before converging")
    png = plot_probes(probes, n_layer, ctx.run_dir / "eval" / file_stem(TASK) / "probe.png",
                      title=f"{ctx.run_dir.name} @ step {ctx.step}: linear depth probes (test_paren)")
    notes.append(f"probe accuracy against layer -> {png}")
    details = {"probes": probes, "n_train_expressions": len(train), "n_test_expressions": len(test),
               "probe_heads": with_heads, "files": [str(png)]}
    return TaskResult(task=TASK, version=VERSION, metrics=metrics, headline="binary_acc_resid_best",
                      n_items=len(train) + len(test), data_file=data_file, data_sha256=sha, details=details,
                      notes=notes, directions=directions)


def plot_probes(probes: Sequence[dict], n_layer: int, path: Path, *, title: str = "") -> Path:
    """Test accuracy against layer: the residual-stream probes as lines (binary, multiclass),
    per-head probes as dots, each label's majority baseline dashed. Writes ``path`` (Agg); returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    for label, color, text in (("binary", "tab:blue", "depth > 0"), ("multi", "tab:orange", "depth 0/1/2")):
        resid = sorted((p for p in probes if p["features"] == "resid" and p["labels"] == label),
                       key=lambda p: p["layer"])
        ax.plot([p["layer"] for p in resid], [p["test_acc"] for p in resid], marker="o", color=color,
                label=f"residual, {text}")
        heads = [p for p in probes if p["features"] == "head" and p["labels"] == label]
        if heads:
            ax.scatter([p["layer"] + 0.08 * (1 if label == "multi" else -1) for p in heads],
                       [p["test_acc"] for p in heads], s=12, alpha=0.5, color=color, label=f"single heads, {text}")
        ax.axhline(resid[0]["baseline_test"], color=color, linestyle="--", linewidth=1,
                   label=f"majority baseline, {text} ({resid[0]['baseline_test']:.2f})")
    ax.set_xticks(range(n_layer), [f"after block {i}" for i in range(n_layer)], fontsize=8)
    ax.set_ylabel("probe accuracy on test_paren")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _need_bos_eos(ctx: EvalContext) -> None:
    tok = ctx.tokenizer
    if tok.bos_id is None or tok.eos_id is None:
        raise DataError(f"the run's {tok.kind} tokenizer has no <BOS>/<EOS>; {TASK} needs the char tokenizer of "
                        "an arithmetic run")
