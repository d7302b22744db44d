"""The parenthesised-arithmetic accuracy (Nishal14/Step-free-arithmetic-transformers), done
right (SEEDS_SPEC 3.5).

The original "accuracy" compared the teacher-forced argmax at the last label position,
which is ``<EOS>``: it measured "predicts the end of the sequence", not the answer.
Here an example is correct when greedy generation from ``<BOS> expr " = "`` produces
exactly the answer's characters followed by ``<EOS>``. Reported per split: ``acc_val``,
``acc_flat`` (no parentheses), ``acc_paren`` (with parentheses) and
``paren_gap = acc_paren - acc_flat``.

:func:`evaluate` (the ``arithmetic`` task of ``lmkit eval``) adds the other two metrics
SEEDS_SPEC 3.5 asks for: teacher-forced "every answer character is the argmax"
(``tf_acc_*``) and, with ``--legacy-eos-metric``, the original number
(``legacy_acc_*``) to reproduce what it reported.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from lmkit.data.arithmetic import ArithmeticExample
from lmkit.data.tokenizers import Tokenizer
from lmkit.device import DevicePlan
from lmkit.evaluation.task import EvalContext, TaskResult

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


def _has_kv_cache(model: nn.Module) -> bool:
    import inspect

    try:
        return "kv_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def exact_match(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[ArithmeticExample], plan: DevicePlan,
                block_size: int) -> float:
    """Fraction of ``examples`` whose generated ids equal the ids of ``str(result)``, then ``<EOS>``.

    Models whose forward takes a ``kv_cache`` decode with :func:`generated_answers` (the
    decoder ``lmkit eval`` uses); others with :func:`greedy_answers`.
    """
    if not examples:
        return float("nan")
    if _has_kv_cache(model):  # lmkit's GPT: the shared KV-cache decoder
        with plan.autocast():
            answers = generated_answers(model, tokenizer, examples)
    else:
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


# ---------------------------------------------------------------------------------------------
# the ``arithmetic`` task of ``lmkit eval``

VERSION = "1"
#: Prefix of the teacher-forced and the legacy metrics.
TF_PREFIX, LEGACY_PREFIX = "tf_", "legacy_"
#: Metric directions (see :class:`lmkit.evaluation.task.TaskResult`): the accuracies are
#: higher-better; ``paren_gap`` (acc_paren - acc_flat) measures a difference, neither.
DIRECTIONS = {prefix + name: "higher" for prefix in ("", TF_PREFIX, LEGACY_PREFIX) for name in SPLIT_METRICS.values()}
DIRECTIONS.update({prefix + "paren_gap": "neither" for prefix in ("", TF_PREFIX, LEGACY_PREFIX)})
MAX_ANSWER_TOKENS = 16


def _prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_id, *tokenizer.encode(text)]


def generated_answers(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[ArithmeticExample], *,
                      batch_size: int = 256, progress=None) -> list[list[int] | None]:
    """Greedy continuation of ``<BOS> expr " = "`` by :func:`lmkit.evaluation.generate.generate_ex`
    (KV cache, left padding): the ids before ``<EOS>``, or ``None`` when no ``<EOS>`` came
    within :data:`MAX_ANSWER_TOKENS` tokens or before the context filled up."""
    from lmkit.evaluation.generate import generate_ex

    was_training = model.training
    model.eval()
    try:
        gen = generate_ex(model, [_prompt_ids(tokenizer, ex.prompt) for ex in examples],
                          max_new_tokens=MAX_ANSWER_TOKENS, eos_id=tokenizer.eos_id, batch_size=batch_size,
                          progress=progress)
    finally:
        model.train(was_training)
    return [ids if why == "eos" else None for ids, why in zip(gen.tokens, gen.finish, strict=True)]


def teacher_forced(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[ArithmeticExample], *,
                   block_size: int, device: torch.device) -> tuple[list[bool], list[bool]]:
    """Two teacher-forced checks per example, from one pass each.

    Returns:
        ``(all_answer, legacy)``: ``all_answer[i]`` -- the argmax after ``<BOS> expr " = "``
        and each true answer prefix is the next answer character, for every answer
        character (``<EOS>`` not included); ``legacy[i]`` -- the argmax at the last label
        position, i.e. after the full answer, is ``<EOS>`` (the original "accuracy").
    """
    from lmkit.evaluation.lm import continuation_logprobs

    answers = continuation_logprobs(
        model, [(_prompt_ids(tokenizer, ex.prompt), tokenizer.encode(ex.answer)) for ex in examples],
        block_size=block_size, device=device)
    legacy = continuation_logprobs(
        model, [(_prompt_ids(tokenizer, ex.prompt + ex.answer), [tokenizer.eos_id]) for ex in examples],
        block_size=block_size, device=device)
    return [a.greedy for a in answers], [e.greedy for e in legacy]


def _splits_for(ctx: EvalContext) -> tuple[dict[str, list[ArithmeticExample]], str, str | None]:
    splits, data_file, sha, _ = arithmetic_splits(ctx, tuple(SPLIT_METRICS))
    return splits, data_file, sha


def arithmetic_splits(ctx: EvalContext, wanted: tuple[str, ...]) -> tuple[dict[str, list[ArithmeticExample]], str,
                                                                        str | None, list[str]]:
    """The splits named in ``wanted`` (of ``train``, ``val``, ``test_flat``, ``test_paren``) that
    the run's data has: ``ctx.data`` (a JSONL file -- its split read from the name, ``val``
    otherwise -- or a folder of the seed's files), else the run's own data rebuilt from its
    config (:func:`lmkit.data.prepare_data`).

    Returns:
        ``(splits, data_file, sha256 | None, notes)``; ``notes`` says when the rebuilt data's
        fingerprint is not the checkpoint's (``ctx.options["data_fingerprint"]``) or when the
        checkpoint records none.

    Raises:
        DataError: a missing ``--data`` path; the run is not an arithmetic run and no
            ``--data`` was given.
    """
    from pathlib import Path

    from lmkit.data.arithmetic import load_arithmetic_files, read_jsonl
    from lmkit.errors import DataError
    from lmkit.evaluation.task import file_sha256

    if ctx.data is not None:
        path = Path(ctx.data)
        if path.is_file():
            stem = path.stem.lower()
            split = next((s for s in ("test_paren", "test_flat", "train") if stem.endswith(s)), "val")
            if split == "train" and "train" not in wanted:  # a training file read as val, as before
                split = "val"
            return ({split: read_jsonl(path)} if split in wanted else {}), str(path), file_sha256(path), []
        if not path.is_dir():
            raise DataError(f"--data {path}: no such file or folder")
        found = load_arithmetic_files(path)
        return {s: v for s, v in found.items() if s in wanted}, str(path), None, []
    from lmkit.data import prepare_data

    data = prepare_data(ctx.config.data)
    if data.task != "arithmetic":
        raise DataError(f"{ctx.run_dir}: the run was trained on {ctx.config.data.dataset}, not arithmetic; "
                        "pass --data with a folder of the arithmetic JSONL files (pilot_val.jsonl, "
                        "pilot_test_flat.jsonl ...)")
    notes = []
    expected = ctx.options.get("data_fingerprint")
    if expected is None:
        notes.append("the checkpoint records no data fingerprint: the rebuilt splits could not be checked against "
                     "the run's")
    elif data.fingerprint() != expected:
        notes.append(f"⚠ {ctx.config.data.dataset}: the splits rebuilt now differ from the run's (data fingerprint "
                     f"{data.fingerprint()}, the checkpoint has {expected}): a data setting changed since training")
    splits = {s: v for s, v in data.examples.items() if s in wanted}
    return splits, f"{ctx.config.data.dataset} ({', '.join(s for s in wanted if splits.get(s))})", None, notes


def evaluate(ctx: EvalContext) -> TaskResult:
    """The arithmetic accuracy, per split (``val``, ``test_flat``, ``test_paren``).

    Metrics: ``acc_*`` -- exact match of the greedily generated answer followed by
    ``<EOS>`` (the headline is ``acc_val``, else the first split present); ``paren_gap =
    acc_paren - acc_flat``; ``tf_acc_*`` -- teacher-forced, every answer character is the
    argmax; with ``options["legacy_eos_metric"]``, ``legacy_acc_*`` -- the original number,
    the argmax at the last label position (which is ``<EOS>``).

    Raises:
        DataError: the run is not an arithmetic run and no ``--data`` was given, or the
            tokenizer has no ``<BOS>``/``<EOS>``.
    """
    from lmkit.errors import DataError

    tok = ctx.tokenizer
    if tok.bos_id is None or tok.eos_id is None:
        raise DataError(f"the run's {tok.kind} tokenizer has no <BOS>/<EOS>; the arithmetic task needs the char "
                        "tokenizer of an arithmetic run")
    splits, data_file, sha = _splits_for(ctx)
    if ctx.limit is not None:
        splits = {s: v[: ctx.limit] for s, v in splits.items()}
    splits = {s: v for s, v in splits.items() if v}
    if not splits:
        raise DataError(f"{data_file}: no val, test_flat or test_paren examples")
    legacy = bool(ctx.options.get("legacy_eos_metric"))
    total = sum(len(v) for v in splits.values())
    done_before = 0
    ctx.progress(0, total)
    metrics: dict[str, float] = {}
    details: dict = {"splits": {}}
    for split, examples in splits.items():
        name = SPLIT_METRICS[split]
        answers = generated_answers(ctx.model, tok, examples, batch_size=max(1, ctx.batch_size),
                                    progress=lambda d, _t, b=done_before: ctx.progress(b + d, total))
        done_before += len(examples)
        gold = [tok.encode(ex.answer) for ex in examples]
        correct = [a == g for a, g in zip(answers, gold, strict=True)]
        tf, leg = teacher_forced(ctx.model, tok, examples, block_size=ctx.config.model.block_size, device=ctx.device)
        n = len(examples)
        metrics[name] = sum(correct) / n
        metrics[TF_PREFIX + name] = sum(tf) / n
        if legacy:
            metrics[LEGACY_PREFIX + name] = sum(leg) / n
        details["splits"][split] = {
            "n": n, "correct": sum(correct), "tf_correct": sum(tf), "legacy_correct": sum(leg),
            "no_eos": sum(a is None for a in answers),
            "examples": [{"expr": ex.expr, "answer": ex.answer,
                          "generated": None if a is None else tok.decode(a), "correct": c}
                         for ex, a, c in list(zip(examples, answers, correct, strict=True))[:20]],
        }
    for prefix in ("", TF_PREFIX, *((LEGACY_PREFIX,) if legacy else ())):
        if prefix + "acc_flat" in metrics and prefix + "acc_paren" in metrics:
            metrics[prefix + "paren_gap"] = metrics[prefix + "acc_paren"] - metrics[prefix + "acc_flat"]
    notes = []
    if legacy:
        notes.append("legacy_acc_* is the original metric of Step-free-arithmetic-transformers: the teacher-forced "
                     "argmax at the last label position, which is <EOS> -- it measures 'predicts end-of-sequence "
                     "after the true answer', not the answer; acc_* (exact match of the generated answer) is the "
                     "real accuracy")
    headline = "acc_val" if "acc_val" in metrics else SPLIT_METRICS[next(iter(splits))]
    return TaskResult(task="arithmetic", version=VERSION, metrics=metrics, headline=headline, n_items=total,
                      data_file=data_file, data_sha256=sha, details=details, notes=notes, directions=DIRECTIONS)
