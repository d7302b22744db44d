"""The ``hellaswag`` task: pick the most likely of 4 endings (Zellers et al. 2019, arXiv 1905.07830).

Every item is scored two ways, because the two tools people quote differ
(GPT-2 124M: 0.2955 vs 0.3114):

* build-nanogpt / domain-token-gpt2 (SEEDS_SPEC 1.5): context ``ctx`` as given, continuation
  ``" " + ending``. ``acc`` picks the ending with the largest summed log-likelihood,
  ``acc_norm`` (the headline) the largest mean log-likelihood per ending *token*.
* lm-evaluation-harness (``tasks/hellaswag/utils.py``): context
  ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``, continuation
  ``" " + preprocess(ending)``. ``acc_norm_chars`` divides the log-likelihood by the
  number of characters of the preprocessed ending (the harness's ``acc_norm``);
  ``acc_harness`` is the harness's unnormalised ``acc``. ``preprocess`` strips, turns
  ``" [title]"`` into ``". "``, removes every ``[...]`` tag and replaces double spaces
  with single ones.

Data: the hub's ``Rowan/hellaswag`` validation split (10,042 items) through
``datasets.load_dataset``, or a local JSONL with the hub's column names (``ctx`` or
``ctx_a``/``ctx_b``, ``endings``, ``label``, ``activity_label``). Without ``ctx_a``/``ctx_b``
the harness context uses ``ctx`` as given (so ``ctx_b`` is not capitalised).

Speed: each rendering of an item is one row ``context + ending_1 + ... + ending_4`` in
which each ending sees the context and itself (explicit positions and a block-causal
mask, :func:`lmkit.evaluation.lm.choice_logprobs`), so the context is computed once;
rows of several items go through one forward pass, and the output head runs only where
an ending token is predicted. A row longer than ``block_size`` keeps its ending and loses context from
the left; the count is reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmkit.errors import DataError
from lmkit.evaluation.task import EvalContext, TaskResult, file_sha256, iter_jsonl, load_hub_rows

VERSION = "1"
#: Metric directions (see :class:`lmkit.evaluation.task.TaskResult`): accuracies, higher is better.
DIRECTIONS = {"acc": "higher", "acc_norm": "higher", "acc_norm_chars": "higher", "acc_harness": "higher"}
HUB_NAME = "Rowan/hellaswag"
N_ENDINGS = 4


@dataclass(frozen=True)
class HellaSwagItem:
    """One validation item in the hub's terms; ``label`` is the gold ending's index (0-3)."""

    ctx: str
    endings: tuple[str, ...]
    label: int
    activity_label: str = ""
    ctx_a: str | None = None
    ctx_b: str | None = None


def preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleaning (``lm_eval/tasks/hellaswag/utils.py``)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def harness_context(item: HellaSwagItem) -> str:
    """The harness's query: ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``
    (``ctx`` instead of ``ctx_a``/``ctx_b`` when the data lacks them)."""
    if item.ctx_a is not None and item.ctx_b is not None:
        ctx = item.ctx_a + " " + item.ctx_b.capitalize()
    else:
        ctx = item.ctx
    return preprocess(item.activity_label + ": " + ctx)


def _item(row: dict, where: str) -> HellaSwagItem:
    try:
        endings = tuple(str(e) for e in row["endings"])
        label = int(row["label"])
        ctx = row.get("ctx")
        if ctx is None:
            ctx = f"{row['ctx_a']} {row['ctx_b']}".strip()
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{where}: expected the hub's HellaSwag columns (ctx or ctx_a/ctx_b, endings, "
                        "label 0-3)") from None
    if len(endings) != N_ENDINGS or not 0 <= label < N_ENDINGS:
        raise DataError(f"{where}: expected {N_ENDINGS} endings and a label 0-{N_ENDINGS - 1}")
    return HellaSwagItem(ctx=str(ctx), endings=endings, label=label, activity_label=str(row.get("activity_label") or ""),
                         ctx_a=row.get("ctx_a"), ctx_b=row.get("ctx_b"))


def load_items(path: Path | None = None, limit: int | None = None) -> tuple[list[HellaSwagItem], str, str | None]:
    """The items, the data's name and its SHA-256 (``None`` for the hub).

    Args:
        path: a local JSONL file; ``None`` loads ``Rowan/hellaswag`` (validation) from the hub.
        limit: keep the first ``limit`` items.

    Raises:
        DataError: unreadable file, bad rows, or the hub unreachable (naming the local alternative).
    """
    if path is None:
        rows = load_hub_rows(HUB_NAME, None, "validation", limit,
                             "pass --data path/to/hellaswag_val.jsonl (the hub's columns, one JSON object per line)")
        items = [_item(row, f"{HUB_NAME}[{i}]") for i, row in enumerate(rows)]
        return items, f"hub:{HUB_NAME} (validation)", None
    path = Path(path)
    items: list[HellaSwagItem] = [_item(row, f"{path}:{lineno}") for lineno, row in iter_jsonl(path, limit)]
    if not items:
        raise DataError(f"--data {path}: no HellaSwag items")
    return items, str(path), file_sha256(path)


@dataclass
class ItemScores:
    """Per-item scores, each of shape ``(4,)``: summed log-likelihoods (nats) and counts."""

    logprob: np.ndarray  # nanogpt rendering
    n_tokens: np.ndarray
    logprob_harness: np.ndarray  # harness rendering
    n_chars: np.ndarray
    truncated: bool


def score_items(model, tokenizer, items: list[HellaSwagItem], *, block_size: int, device,
                max_tokens: int = 16384, progress=None, items_per_pass: int = 32,
                pack: bool | None = None) -> list[ItemScores]:
    """Log-likelihoods of the 4 endings of every item in both renderings.

    ``items_per_pass`` items are scored together (2 rows of context + 4 endings each, see
    :func:`lmkit.evaluation.lm.choice_logprobs`; ``pack=False``: 8 rows of context + one
    ending); ``progress(done)`` is called after each group with the number of items done.
    """
    from lmkit.evaluation.lm import choice_logprobs

    scores: list[ItemScores] = []
    per = 2 * (N_ENDINGS + 1)
    for start in range(0, len(items), items_per_pass):
        group = items[start:start + items_per_pass]
        texts: list[str] = []
        for item in group:
            texts.append(item.ctx)
            texts.extend(" " + e for e in item.endings)
            texts.append(harness_context(item))
            texts.extend(" " + preprocess(e) for e in item.endings)
        ids = tokenizer.encode_batch(texts)
        groups = []
        for j in range(len(group)):
            block = ids[j * per:(j + 1) * per]
            groups.append((block[0], block[1:N_ENDINGS + 1]))
            groups.append((block[N_ENDINGS + 1], block[N_ENDINGS + 2:]))
        out = choice_logprobs(model, groups, block_size=block_size, device=device, max_tokens=max_tokens, pack=pack)
        for j, item in enumerate(group):
            nano, harness = out[2 * j], out[2 * j + 1]
            scores.append(ItemScores(
                logprob=np.array([r.logprob for r in nano]),
                n_tokens=np.array([r.n_tokens for r in nano]),
                logprob_harness=np.array([r.logprob for r in harness]),
                n_chars=np.array([len(preprocess(e)) for e in item.endings]),
                truncated=any(r.truncated for r in (*nano, *harness)),
            ))
        if progress is not None:
            progress(len(scores))
    return scores


def hellaswag_metrics(items: list[HellaSwagItem], scores: list[ItemScores]) -> dict[str, float]:
    """``acc``, ``acc_norm``, ``acc_norm_chars`` and ``acc_harness`` (fractions of items; ties
    go to the lowest index, like ``argmin`` of the loss in build-nanogpt)."""
    labels = np.array([it.label for it in items])

    def acc(values: list[np.ndarray]) -> float:
        return float(np.mean(np.array([int(np.argmax(v)) for v in values]) == labels))

    return {
        "acc": acc([s.logprob for s in scores]),
        "acc_norm": acc([s.logprob / s.n_tokens for s in scores]),
        "acc_norm_chars": acc([s.logprob_harness / np.maximum(s.n_chars, 1) for s in scores]),
        "acc_harness": acc([s.logprob_harness for s in scores]),
    }


def evaluate(ctx: EvalContext) -> TaskResult:
    """HellaSwag accuracy of the run's model (see the module docstring).

    Raises:
        DataError: the data cannot be loaded.
    """
    items, data_file, sha = load_items(Path(ctx.data) if ctx.data is not None else None, ctx.limit)
    total = len(items)
    ctx.progress(0, total)
    block_size = ctx.config.model.block_size
    scores = score_items(ctx.model, ctx.tokenizer, items, block_size=block_size, device=ctx.device,
                         items_per_pass=max(1, ctx.batch_size), progress=lambda done: ctx.progress(done, total),
                         max_tokens=int(ctx.options.get("max_tokens") or (16384 if ctx.device.type == "cpu" else 65536)),
                         pack=ctx.options.get("pack"))
    metrics = hellaswag_metrics(items, scores)
    n_truncated = sum(s.truncated for s in scores)
    notes = []
    if n_truncated:
        notes.append(f"{n_truncated} of {total} items did not fit block_size {block_size}: their context was "
                     "truncated from the left")
    if not any(it.ctx_a is not None for it in items):
        notes.append("the data has no ctx_a/ctx_b columns: the harness context uses ctx as given (ctx_b not "
                     "capitalised), so acc_norm_chars can differ slightly from lm-evaluation-harness")
    details = {
        "n_truncated": n_truncated,
        "chance": 1 / N_ENDINGS,
        "definitions": {
            "acc": "argmax of the summed log-likelihood of ' ' + ending after ctx (build-nanogpt)",
            "acc_norm": "argmax of the mean log-likelihood per ending token (build-nanogpt / domain-token-gpt2)",
            "acc_norm_chars": "argmax of log-likelihood / len(ending chars), harness preprocessing "
                              "(lm-evaluation-harness acc_norm)",
            "acc_harness": "argmax of the summed log-likelihood, harness preprocessing (lm-evaluation-harness acc)",
        },
        "examples": [
            {"ctx": it.ctx, "label": it.label, "pred_acc_norm": int(np.argmax(s.logprob / s.n_tokens)),
             "logprob": [round(float(x), 4) for x in s.logprob], "n_tokens": s.n_tokens.tolist()}
            for it, s in list(zip(items, scores, strict=True))[:10]
        ],
    }
    return TaskResult(task="hellaswag", version=VERSION, metrics=metrics, headline="acc_norm", n_items=total,
                      data_file=data_file, data_sha256=sha, details=details, notes=notes, directions=DIRECTIONS)
