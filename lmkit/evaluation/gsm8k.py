"""GSM8K (Cobbe et al. 2021, arXiv 2110.14168): greedy generation, exact match of the final number.

What is computed (SEEDS_SPEC §1.4: the GSM8K evaluation of
``zhengpu-berkeley/domain-token-gpt2``, ``eval/run_gsm8k.py`` + ``rl/rewards.py``):

- Items: the test split, 1319 problems -- the hub's ``openai/gsm8k`` (config ``main``)
  through ``datasets.load_dataset``, or ``--data PATH``, a JSONL with ``question`` and
  ``answer`` per line (``../shared/data/gsm8k/test.jsonl``).
- Prompt, zero-shot: ``User: {question}\\nAssistant:`` (question stripped). With
  ``fewshot = K``, K solved problems drawn once (``random.Random(seed).sample``) from the
  train split come first as earlier turns, each ``User: {q}\\nAssistant: {answer}``, turns
  joined by a blank line (``\\n\\n``). The train split is the hub's, or with ``--data PATH``
  ``train.jsonl`` next to PATH (or PATH's name with ``test`` replaced by ``train``).
- Generation: :func:`lmkit.evaluation.generate.generate_ex` -- greedy, KV cache, batched
  with left padding, at most ``max_new_tokens`` (256) new tokens; a response ends at EOS,
  at the next turn (``\\nUser:``) or at a blank line (``\\n\\n``), whichever comes first; the
  text is cut there. Prompts longer than the model's ``block_size`` are cut from the left
  (counted in ``details["n_prompts_truncated"]``).
- Answer: :func:`extract_answer` then :func:`normalize_answer`, the same functions for the
  response and for the gold solution; correct iff both normalised strings are equal and
  the prediction is not empty. :func:`extract_answer` reads a number with its thousands
  separators and decimals (``1,234.5``), after ``####`` / ``the answer is`` and in the
  last-number fallback alike; :func:`extract_answer_legacy` is the original
  ``rl/rewards.py`` rule, which reads ``The answer is 1,234`` as ``1``, ``#### 1,234.5``
  as ``1234`` and a last ``$1,234.`` as ``234`` (the 1,319 test and 7,473 train gold
  solutions give the same answer under both).

Metrics: ``accuracy`` (headline), ``correct``, ``total``, ``mean_response_tokens``
(generated tokens up to the stop, EOS and the stop string not counted); when the tokenizer
has the 45 multiplication-fact tokens (:func:`lmkit.evaluation.mul_usage.mul_token_ids`: a
``gpt2+mul`` tokenizer, either condition) also ``mul_token_count`` (generated
ids in 50304..50348, over all responses, counted from the ids up to the stop) and
``mul_tokens_per_response`` (that count / ``total``), with ``n_mul_tokens`` per example
(SEEDS_SPEC §1.2 "Mul-token accounting"); with
``legacy_extraction`` also ``accuracy_legacy`` and ``correct_legacy``, the same responses
scored with :func:`extract_answer_legacy` (for prediction and gold, as the original
does). Details: the first 50 examples (question, response, prediction, gold, correct,
n_tokens; ``prediction_legacy``/``correct_legacy`` with the legacy metric), finish
reasons, the few-shot ids.

Options read from ``ctx.options``:
    fewshot (int, default 0): number of solved train problems in the prompt.
    max_new_tokens (int, default 256): generation budget per problem.
    seed (int, default 1234): the few-shot draw.
    legacy_extraction (bool, default False): also report the original rule's accuracy.

Version history: 1 -- the original extraction; 2 -- thousands separators and decimals
read in every rule (:func:`extract_answer`).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from lmkit.errors import ConfigError, DataError
from lmkit.evaluation.mul_usage import count_mul, mul_token_ids
from lmkit.evaluation.task import EvalContext, TaskResult, file_sha256, iter_jsonl, load_hub_rows

VERSION = "2"
HUB_NAME = "openai/gsm8k"
HUB_CONFIG = "main"
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_FEWSHOT_SEED = 1234
#: The response ends at the first of these (after the EOS token).
STOP_STRINGS = ("\nUser:", "\n\n")
N_EXAMPLES = 50

#: Metric directions (see :class:`lmkit.evaluation.task.TaskResult`).
DIRECTIONS = {"accuracy": "higher", "correct": "higher", "total": "neither", "mean_response_tokens": "neither",
              "accuracy_legacy": "higher", "correct_legacy": "higher",
              "mul_token_count": "neither", "mul_tokens_per_response": "neither"}

# A number: an optional sign (not a hyphen between two words/numbers: "5-3" reads 3), digits
# with optional thousands groups ("1,234,567"; a comma not followed by exactly three digits
# ends the number: "1,23" is 1 then 23), an optional decimal part (a trailing period is not one).
_NUM = r"(?:(?<![\w)\]])-)?(?:\d{1,3}(?:,\d{3}(?!\d))+|\d+)(?:\.\d+)?"
_HASH_ANSWER = re.compile(r"####[\s$]*(" + _NUM + ")")
_THE_ANSWER_IS = re.compile(r"[Tt]he answer is[\s:*$]*(" + _NUM + ")")
_NUMBER = re.compile(_NUM)

# The original rules (SEEDS_SPEC §1.4), kept for --legacy-extraction.
_LEGACY_HASH_ANSWER = re.compile(r"####\s*(-?\d+(?:\.\d+)?(?:,\d{3})*)")
_LEGACY_THE_ANSWER_IS = re.compile(r"[Tt]he answer is\s*(-?\d+(?:\.\d+)?)")
_LEGACY_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The final answer in a GSM8K-style text (commas removed), or ``None``; rules in order:

    1. ``####`` (then spaces or ``$``) and a number -> that number;
    2. else ``The answer is`` / ``the answer is`` (then spaces, ``:``, ``*`` or ``$``) and
       a number -> that number;
    3. else the LAST number anywhere;
    4. else ``None``.

    A number is ``-?`` + digits with optional thousands groups + an optional decimal part:
    ``The answer is 1,234`` -> ``1234``, ``#### 1,234.5`` -> ``1234.5``, ``costs $1,234.``
    -> ``1234``, ``from 3 down to -12`` -> ``-12``. A ``-`` directly after a letter, digit or
    closing bracket is a hyphen, not a sign (``5-3`` -> ``3``). A comma not followed by exactly
    three digits is not a separator (``1,23`` -> ``23``; ``1,2345`` -> ``2345``).
    """
    text = text.strip()
    match = _HASH_ANSWER.search(text) or _THE_ANSWER_IS.search(text)
    if match:
        return match.group(1).replace(",", "")
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def extract_answer_legacy(text: str) -> str | None:
    """The original extraction (``rl/rewards.py``, SEEDS_SPEC §1.4), kept to reproduce
    published numbers (``--legacy-extraction``); rules in order:

    1. ``####`` then a number ``-?\\d+(\\.\\d+)?(,\\d{3})*`` -> that number, commas removed
       (``#### 1,234.5`` gives ``1234``);
    2. else ``The answer is`` / ``the answer is`` then ``-?\\d+(\\.\\d+)?`` -> that number
       (``The answer is 1,234`` gives ``1``);
    3. else the LAST match of ``-?\\d+(\\.\\d+)?`` anywhere (``$1,234.`` gives ``234``);
    4. else ``None``.
    """
    found = extract_answer_legacy_span(text)
    return found[0] if found else None


def extract_answer_legacy_span(text: str) -> tuple[str, int, int] | None:
    """:func:`extract_answer_legacy` with where it read the number: ``(answer, start, end)``,
    ``text[start:end]`` being the matched number in ``text`` itself (before stripping and
    before the commas are removed), or ``None``. Tells, e.g., that the last number of
    ``" 6 <MUL_6_9_54>"`` was read from inside the mul-token string."""
    offset = len(text) - len(text.lstrip())
    stripped = text.strip()
    match = _LEGACY_HASH_ANSWER.search(stripped)
    if match:
        return match.group(1).replace(",", ""), offset + match.start(1), offset + match.end(1)
    match = _LEGACY_THE_ANSWER_IS.search(stripped)
    if match:
        return match.group(1), offset + match.start(1), offset + match.end(1)
    numbers = list(_LEGACY_NUMBER.finditer(stripped))
    if not numbers:
        return None
    last = numbers[-1]
    return last.group(0), offset + last.start(), offset + last.end()


def normalize_answer(answer: str | None) -> str:
    """Canonical string of an extracted answer (SEEDS_SPEC §1.4).

    ``None`` -> ``""``. Otherwise strip, remove commas and parse as a float: an integral
    value prints as an int (``"18.0"`` -> ``"18"``, ``"-0"`` -> ``"0"``), any other as
    ``str(float)`` (``"3.50"`` -> ``"3.5"``); a string that does not parse, or a value with
    ``|x| >= 1e15``, is returned as it is after stripping and removing commas.
    """
    if answer is None:
        return ""
    answer = str(answer).strip().replace(",", "")
    try:
        value = float(answer)
    except (ValueError, OverflowError):
        return answer
    if not (-1e15 < value < 1e15):
        return answer
    if value == int(value):
        return str(int(value))
    return str(value)


def is_correct(prediction: str, gold: str) -> bool:
    """Normalised exact match; an empty prediction is never correct."""
    return prediction != "" and prediction == gold


def score(response: str, gold_solution: str, *, legacy: bool = False) -> tuple[str, str, bool]:
    """``(prediction, gold, correct)`` for a response and a gold solution text, with
    :func:`extract_answer` (or :func:`extract_answer_legacy` for both with ``legacy``)."""
    extract = extract_answer_legacy if legacy else extract_answer
    prediction = normalize_answer(extract(response))
    gold = normalize_answer(extract(gold_solution))
    return prediction, gold, is_correct(prediction, gold)


def format_prompt(question: str, shots: list[dict[str, str]] | None = None) -> str:
    """``User: {q}\\nAssistant:`` after the few-shot turns (each ``User: …\\nAssistant: …``,
    joined by a blank line)."""
    turns = [f"User: {s['question'].strip()}\nAssistant: {s['answer'].strip()}" for s in (shots or [])]
    turns.append(f"User: {question.strip()}\nAssistant:")
    return "\n\n".join(turns)


def cut_response(text: str) -> str:
    """The response up to the first stop string (``\\nUser:`` or a blank line)."""
    cut = min((i for i in (text.find(s) for s in STOP_STRINGS) if i >= 0), default=len(text))
    return text[:cut]


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for lineno, row in iter_jsonl(path, limit):
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise DataError(f"{path}:{lineno}: a GSM8K row needs string fields 'question' and 'answer'")
        rows.append({"question": row["question"], "answer": row["answer"]})
    if not rows:
        raise DataError(f"--data {path}: no GSM8K problems")
    return rows


def _load_hub(split: str, limit: int | None = None) -> list[dict[str, str]]:
    rows = load_hub_rows(HUB_NAME, HUB_CONFIG, split, limit,
                         "pass --data path/to/gsm8k/test.jsonl (question/answer per line; train.jsonl beside it "
                         "for --fewshot)")
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def train_file_for(path: Path) -> Path:
    """The train JSONL that goes with a local test file (for few-shot examples).

    Raises:
        DataError: neither ``train.jsonl`` next to it nor its name with ``test`` -> ``train`` exists.
    """
    candidates = [path.with_name("train.jsonl")]
    if "test" in path.name:
        candidates.append(path.with_name(path.name.replace("test", "train")))
    for candidate in candidates:
        if candidate.is_file() and candidate.resolve() != path.resolve():
            return candidate
    raise DataError(f"--fewshot needs the train split next to --data {path}: looked for "
                    f"{', '.join(str(c) for c in candidates)}")


def load_items(path: Path | None, limit: int | None = None) -> tuple[list[dict[str, str]], str, str | None]:
    """Test problems, the data's name and its SHA-256 (``None`` for the hub).

    Raises:
        DataError: unreadable/invalid file, or the hub unreachable (naming the local alternative).
    """
    if path is None:
        return _load_hub("test", limit), f"hub:{HUB_NAME}/{HUB_CONFIG} (test)", None
    path = Path(path)
    return _read_jsonl(path, limit), str(path), file_sha256(path)


def fewshot_examples(k: int, seed: int, test_path: Path | None) -> tuple[list[dict[str, str]], list[int], str]:
    """``k`` train problems drawn with ``random.Random(seed).sample``, their indices and source."""
    if k == 0:
        return [], [], ""
    if test_path is None:
        train, source = _load_hub("train"), f"hub:{HUB_NAME}/{HUB_CONFIG} (train)"
    else:
        train_path = train_file_for(Path(test_path))
        train, source = _read_jsonl(train_path), str(train_path)
    if k > len(train):
        raise ConfigError(f"--fewshot {k}: the train split has only {len(train)} problems")
    ids = random.Random(seed).sample(range(len(train)), k)
    return [train[i] for i in ids], ids, source


def _int_option(options: dict[str, Any], name: str, default: int, minimum: int) -> int:
    value = options.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
    return value


def evaluate(ctx: EvalContext) -> TaskResult:
    """Run GSM8K on ``ctx.model`` (see the module docstring).

    Raises:
        ConfigError: bad options (``fewshot`` < 0 or larger than the train split,
            ``max_new_tokens`` < 1).
        DataError: the data cannot be read (or the hub reached).
    """
    from lmkit.evaluation.generate import generate_ex

    fewshot = _int_option(ctx.options, "fewshot", 0, 0)
    max_new = _int_option(ctx.options, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS, 1)
    seed = _int_option(ctx.options, "seed", DEFAULT_FEWSHOT_SEED, 0)
    legacy = bool(ctx.options.get("legacy_extraction", False))

    items, data_name, sha = load_items(ctx.data, ctx.limit)
    shots, shot_ids, shot_source = fewshot_examples(fewshot, seed, ctx.data)
    tok = ctx.tokenizer
    prompts = [tok.encode(format_prompt(item["question"], shots)) for item in items]
    gen = generate_ex(ctx.model, prompts, max_new_tokens=max_new, eos_id=tok.eos_id,
                      stop_strings=STOP_STRINGS, decode=tok.decode, batch_size=ctx.batch_size,
                      progress=ctx.progress)

    mul_ids = mul_token_ids(tok)
    correct = correct_legacy = 0
    n_tokens = n_mul = 0
    examples = []
    for i, (item, ids) in enumerate(zip(items, gen.tokens, strict=True)):
        response = cut_response(tok.decode(ids))
        prediction, gold, ok = score(response, item["answer"])
        correct += ok
        n_tokens += len(ids)
        example = {"question": item["question"], "response": response, "prediction": prediction,
                   "gold": gold, "correct": ok, "n_tokens": len(ids)}
        if mul_ids:
            example["n_mul_tokens"] = count_mul(ids, mul_ids)
            n_mul += example["n_mul_tokens"]
        if legacy:
            legacy_prediction, _, legacy_ok = score(response, item["answer"], legacy=True)
            correct_legacy += legacy_ok
            example.update(prediction_legacy=legacy_prediction, correct_legacy=legacy_ok)
        if i < N_EXAMPLES:
            examples.append(example)
    total = len(items)
    metrics = {"accuracy": correct / total, "correct": float(correct), "total": float(total),
               "mean_response_tokens": n_tokens / total}
    if mul_ids:
        metrics.update(mul_token_count=float(n_mul), mul_tokens_per_response=n_mul / total)
    n_truncated = sum(gen.prompt_truncated)
    notes = []
    if n_truncated:
        notes.append(f"{n_truncated} of {total} prompts were longer than block_size "
                     f"{ctx.model.config.block_size} and were cut from the left")
    if legacy:
        metrics.update(accuracy_legacy=correct_legacy / total, correct_legacy=float(correct_legacy))
        notes.append("accuracy_legacy: the original extraction (domain-token-gpt2 rl/rewards.py), which drops "
                     "thousands separators ('The answer is 1,234' reads 1); accuracy reads them")
    return TaskResult(
        task="gsm8k",
        version=VERSION,
        metrics=metrics,
        directions=DIRECTIONS,
        headline="accuracy",
        n_items=total,
        data_file=data_name,
        data_sha256=sha,
        details={
            "fewshot": fewshot, "fewshot_seed": seed if fewshot else None, "fewshot_ids": shot_ids,
            "fewshot_source": shot_source or None, "max_new_tokens": max_new, "legacy_extraction": legacy,
            "stop": ["eos", *STOP_STRINGS], "finish_reasons": dict(Counter(gen.finish)),
            "n_prompts_truncated": n_truncated, "mul_tokens_counted": bool(mul_ids), "examples": examples,
        },
        notes=notes,
    )
