"""Seed 000's arithmetic metric, done right (SEEDS_SPEC 3.5).

The seed's "accuracy" compared the teacher-forced argmax at the last label position,
which is ``<EOS>``: it measured "predicts the end of the sequence", not the answer.
Here an example is correct when greedy generation from ``<BOS> expr " = "`` produces
exactly the answer's characters followed by ``<EOS>``. Reported per split: ``acc_val``,
``acc_flat`` (no parentheses), ``acc_paren`` (with parentheses) and
``paren_gap = acc_paren - acc_flat``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from lmkit.data.arithmetic import ArithmeticExample
from lmkit.data.tokenizers import Tokenizer
from lmkit.training.device import DevicePlan

#: Metric name for each split that has one.
SPLIT_METRICS = {"val": "acc_val", "test_flat": "acc_flat", "test_paren": "acc_paren"}


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], plan: DevicePlan,
                   block_size: int, max_new_tokens: int = 16, batch_size: int = 256) -> list[list[int] | None]:
    """Greedy continuation of ``<BOS> + prompt`` up to ``<EOS>``, for each prompt.

    Prompts of equal length are batched together, so no padding enters the model.
    Returns the generated ids before ``<EOS>``, or ``None`` when no ``<EOS>`` came within
    ``max_new_tokens`` tokens (or the context filled up). Compare ids, not decoded text:
    decoding drops special tokens, so ``1<PAD>2`` would read as ``12``.
    """
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_id
    encoded = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    answers: list[list[int] | None] = [None] * len(prompts)
    try:
        for length, indices in sorted(by_length.items()):
            for start in range(0, len(indices), batch_size):
                rows = indices[start : start + batch_size]
                idx = torch.tensor([encoded[i] for i in rows], dtype=torch.long, device=plan.device)
                generated = []
                for _ in range(min(max_new_tokens, block_size - length + 1)):
                    if idx.size(1) > block_size:
                        break
                    with plan.autocast():
                        logits, _ = model(idx, last_only=True)
                    nxt = logits[:, -1, :].argmax(dim=-1)
                    generated.append(nxt)
                    if bool((torch.stack(generated, 1) == eos).any(dim=1).all()):
                        break
                    idx = torch.cat([idx, nxt[:, None]], dim=1)
                out = torch.stack(generated, 1).tolist() if generated else [[] for _ in rows]
                for row, ids in zip(rows, out, strict=True):
                    if eos in ids:
                        answers[row] = ids[: ids.index(eos)]
    finally:
        model.train(was_training)
    return answers


def exact_match(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[ArithmeticExample], plan: DevicePlan,
                block_size: int) -> float:
    """Fraction of ``examples`` whose generated ids equal the ids of ``str(result)``."""
    if not examples:
        return float("nan")
    answers = greedy_answers(model, tokenizer, [ex.prompt for ex in examples], plan, block_size)
    return sum(a == tokenizer.encode(ex.answer) for a, ex in zip(answers, examples, strict=True)) / len(examples)


def arithmetic_metrics(model: nn.Module, tokenizer: Tokenizer, splits: dict[str, list[ArithmeticExample]],
                       plan: DevicePlan, block_size: int) -> dict[str, float]:
    """``acc_val``, ``acc_flat``, ``acc_paren`` (for the splits present) and ``paren_gap``."""
    metrics = {}
    for split, name in SPLIT_METRICS.items():
        if splits.get(split):
            metrics[name] = exact_match(model, tokenizer, splits[split], plan, block_size)
    if "acc_flat" in metrics and "acc_paren" in metrics:
        metrics["paren_gap"] = metrics["acc_paren"] - metrics["acc_flat"]
    return metrics
