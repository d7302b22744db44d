"""Pictures of every head's attention on an expression: the ``attention`` task of ``lmkit eval``
(issue 14; the seed's question which head matches brackets, Nishal14/Step-free-arithmetic-transformers).

For each ``--expr`` (``ctx.options["expr"]``, default ``(1+(2*3))``) the model reads
``<BOS> expr " = "`` (the prompt it answers from; an expression that already holds ``=``
is read as given) and the attention probabilities of every layer and head come from the
model interface's exact math path (:meth:`~lmkit.models.base.LanguageModel.capture`
``attn_probs=True``: ``softmax(q k^T / sqrt(head_dim))``). One PNG per expression, a grid
of layers (rows) x heads (columns), each panel query (rows) x key (columns) with the
characters on both axes, goes to ``runs/NAME/eval/attention/NN_<expr>.png``.

A number to go with the pictures: for every closing bracket, the probability its query puts
on the key of the matching opening bracket, averaged per head over all closing brackets of
all expressions (``match_attn`` per head in ``details``; the best head's value is the
headline ``match_attn_best``). ``match_attn_uniform`` is what a head spreading attention
evenly over the visible keys would get, ``mean(1 / (q + 1))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lmkit.errors import ConfigError
from lmkit.evaluation.task import EvalContext, TaskResult, file_stem

VERSION = "1"
TASK = "attention"
DEFAULT_EXPR = "(1+(2*3))"
DIRECTIONS = {"match_attn_best": "neither", "match_attn_uniform": "neither", "n_exprs": "neither",
              "n_closing_brackets": "neither"}
_SLUG = {"(": "L", ")": "R", "*": "x", "+": "p", "-": "m", "/": "d", "=": "eq", " ": "_"}


def matching_brackets(text: str) -> list[tuple[int, int]]:
    """``(close, open)`` character indices of every matched bracket pair of ``text``, in order of
    the closing brackets; unmatched brackets are skipped."""
    stack, pairs = [], []
    for i, ch in enumerate(text):
        if ch == "(":
            stack.append(i)
        elif ch == ")" and stack:
            pairs.append((i, stack.pop()))
    return pairs


def _slug(expr: str) -> str:
    return "".join(_SLUG.get(ch, ch) for ch in expr if ch.isalnum() or ch in _SLUG)[:60] or "expr"


@torch.no_grad()
def attention_probs(ctx: EvalContext, text: str) -> tuple[list[str], np.ndarray]:
    """``(labels, probs)`` for ``<BOS> text``: the axis labels (``BOS`` then the characters,
    a space as ``␣``) and the probabilities ``(n_layer, n_head, T, T)`` (row: query, column: key).

    Raises:
        ConfigError: ``text`` has characters outside the run's vocabulary, or is longer than
            the model's block_size.
    """
    tok = ctx.tokenizer
    ids = tok.encode(text)
    if tok.decode(ids) != text:
        raise ConfigError(f"--expr {text!r}: characters outside the run's {tok.kind} vocabulary")
    ids = [tok.bos_id, *ids] if tok.bos_id is not None else ids
    if len(ids) > ctx.config.model.block_size:
        raise ConfigError(f"--expr {text!r}: {len(ids)} tokens exceed block_size {ctx.config.model.block_size}")
    with ctx.model.capture(attn_probs=True) as cap:
        ctx.model(torch.tensor([ids], device=ctx.device))
    probs = np.stack([p[0].float().cpu().numpy() for p in cap.attn_probs])
    labels = (["BOS"] if tok.bos_id is not None else []) + ["␣" if ch == " " else ch for ch in text]
    return labels, probs


def evaluate(ctx: EvalContext) -> TaskResult:
    """The attention grids of each expression and the bracket-matching numbers; see the module docstring.

    Raises:
        ConfigError: an expression with characters outside the vocabulary or too long.
    """
    exprs = list(ctx.options.get("expr") or [DEFAULT_EXPR])
    folder = ctx.run_dir / "eval" / file_stem(TASK)
    files, per_expr = [], []
    match_sum: np.ndarray | None = None
    uniform, n_close = [], 0
    offset = 1 if ctx.tokenizer.bos_id is not None else 0
    ctx.progress(0, len(exprs))
    for i, expr in enumerate(exprs):
        text = expr if "=" in expr else expr + " = "
        labels, probs = attention_probs(ctx, text)
        png = plot_attention(labels, probs, folder / f"{i:02d}_{_slug(expr)}.png",
                             title=f"{ctx.run_dir.name} @ step {ctx.step}: attention on {text.strip()!r}")
        files.append(str(png))
        pairs = matching_brackets(text)
        for close, open_ in pairs:
            q, k = close + offset, open_ + offset
            got = probs[:, :, q, k]
            match_sum = got if match_sum is None else match_sum + got
            uniform.append(1.0 / (q + 1))
        n_close += len(pairs)
        per_expr.append({"expr": expr, "tokens": labels, "pairs": pairs, "file": str(png)})
        ctx.progress(i + 1, len(exprs))
    metrics: dict[str, float] = {"n_exprs": float(len(exprs)), "n_closing_brackets": float(n_close)}
    notes = [f"attention grids (layers x heads; rows = queries, columns = keys) -> {', '.join(files)}"]
    details: dict = {"exprs": per_expr, "files": files}
    if match_sum is not None:
        match = match_sum / n_close
        best = np.unravel_index(int(np.argmax(match)), match.shape)
        metrics["match_attn_best"] = float(match[best])
        metrics["match_attn_uniform"] = float(np.mean(uniform))
        details["match_attn"] = {f"L{layer}H{head}": float(match[layer, head])
                                 for layer in range(match.shape[0]) for head in range(match.shape[1])}
        details["best_head"] = f"L{best[0]}H{best[1]}"
        order = sorted(details["match_attn"].items(), key=lambda kv: -kv[1])[:5]
        notes.append(f"attention from each ')' to its '(' (mean over {n_close} closing brackets): "
                     + ", ".join(f"{name} {v:.3f}" for name, v in order)
                     + f"; a uniform causal head would give {np.mean(uniform):.3f}")
    headline = "match_attn_best" if "match_attn_best" in metrics else "n_exprs"
    return TaskResult(task=TASK, version=VERSION, metrics=metrics, headline=headline, n_items=len(exprs),
                      details=details, notes=notes, directions=DIRECTIONS)


def plot_attention(labels: Sequence[str], probs: np.ndarray, path: Path, *, title: str = "") -> Path:
    """A grid of ``probs`` ``(n_layer, n_head, T, T)`` panels (row = layer, column = head; in each
    panel query rows x key columns, 0..1 grey scale), ``labels`` on both axes. Writes ``path``
    (parents created; Agg) and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layer, n_head, T, _ = probs.shape
    size = max(1.8, 0.16 * T + 0.6)
    fig, axes = plt.subplots(n_layer, n_head, figsize=(size * n_head, size * n_layer + 0.5), squeeze=False,
                             constrained_layout=True)
    font = 6 if T <= 20 else 4
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            im = ax.imshow(probs[layer, head], cmap="Greys", vmin=0.0, vmax=1.0)
            ax.set_xticks(range(T), labels, fontsize=font, rotation=90)
            ax.set_yticks(range(T), labels, fontsize=font)
            ax.tick_params(length=0, pad=1)
            ax.set_title(f"L{layer}H{head}", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="attention probability")
    if title:
        fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

