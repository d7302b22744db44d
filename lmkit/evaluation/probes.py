"""The multiplication-tokens experiment's arithmetic probes (zhengpu-berkeley/domain-token-gpt2):
281 questions, greedy answers, exact match (SEEDS_SPEC §1.3).

The probe sets are generated exactly as its ``eval/run_arithmetic_probes.py`` does:

- ``mul_table`` (81): every ordered pair ``a, b`` in 1..9 (``for a: for b:``), question
  ``What is {a} times {b}?``; no randomness.
- ``mul_multidigit`` (100): ``random.seed(42)``, then per item ``a = randint(10, 99)``,
  ``b = randint(2, 9)``; ``What is {a} times {b}?``.
- ``addition`` (100): ``random.seed(42)`` again, then per item ``a = randint(1, 100)``,
  ``b = randint(1, 100)``; ``What is {a} plus {b}?``.

(The module-level ``random`` state is saved and restored around the draws, so evaluating
does not disturb a caller's random stream.) Prompt: ``User: {question}\\nAssistant: The
answer is``; greedy decoding of at most ``max_new_tokens`` (32) tokens with the KV-cached
:func:`lmkit.evaluation.generate.generate_ex`, stopping at EOS; the response is the
decoded new tokens.

Scoring -- the response's answer, normalised with
:func:`lmkit.evaluation.gsm8k.normalize_answer`, must equal ``str(true value)``:

- default, :func:`first_number`: the FIRST number in the response (``-?\\d+(,\\d{3})*(\\.\\d+)?``,
  commas dropped). A mul-token string ``<MUL_a_b_c>`` counts as the number ``c`` (the
  product it stands for), not as its first digit ``a``.
- ``legacy_last_number``: the original rule, :func:`lmkit.evaluation.gsm8k.extract_answer_legacy`
  (``####`` -> ``The answer is`` -> LAST number). Since the prompt already ends with "The
  answer is", this almost always reads the last number of the response, e.g. ``54`` in
  ``" 6. 6*9=54"`` and the inner number of a mul-token string.

Metrics: ``accuracy`` (headline, overall) and ``acc_mul_table``, ``acc_mul_multidigit``,
``acc_addition``; when the tokenizer has the 45 mul tokens
(:func:`lmkit.evaluation.mul_usage.mul_token_ids`) also ``total_mul_tokens`` (generated ids in
50304..50348, counted from the ids up to EOS) and ``mul_tokens_per_probe``, and each
category's ``mul_tokens``. Details hold per-category correct/total/accuracy(/mul_tokens),
the answer rule (``extraction``: ``first_number`` or ``legacy_last_number``, described in
``extraction_rule`` and in a note), ``n_answers_from_mul_token`` (answers read from a
mul-token string; a note says how many, and that under the legacy rule it is a number inside
the string), the mean response length in tokens, and every probe's response and prediction.

Options read from ``ctx.options``:
    legacy_last_number (bool, default False): score with the original last-number rule.
    max_new_tokens (int, default 32): generation budget per probe.
``ctx.limit`` keeps the first N probes (in the order above); ``ctx.data`` is not used.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass

from lmkit.errors import ConfigError
from lmkit.evaluation.gsm8k import extract_answer_legacy_span, normalize_answer
from lmkit.evaluation.mul_usage import count_mul, mul_token_ids
from lmkit.evaluation.task import EvalContext, TaskResult

VERSION = "1"
SEED = 42
CATEGORIES = ("mul_table", "mul_multidigit", "addition")
#: Metric directions (see :class:`lmkit.evaluation.task.TaskResult`): every accuracy is higher-better.
DIRECTIONS = {"accuracy": "higher", **{f"acc_{cat}": "higher" for cat in CATEGORIES},
              "total_mul_tokens": "neither", "mul_tokens_per_probe": "neither"}
#: What each answer rule reads (named in every result's details and notes).
RULES = {
    "first_number": "the FIRST number of the response (a mul-token string <MUL_a_b_c> reads as its product c)",
    "legacy_last_number": "the original rule (domain-token-gpt2): '####', then 'The answer is', then the LAST number of the response "
                          "(which can be a number inside a mul-token string)",
}
PROMPT = "User: {question}\nAssistant: The answer is"
DEFAULT_MAX_NEW_TOKENS = 32

_MUL_TOKEN = re.compile(r"<MUL_(\d+)_(\d+)_(\d+)>")
_FIRST_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


@dataclass(frozen=True)
class Probe:
    """One question, its true answer (a string) and its category."""

    question: str
    answer: str
    category: str
    a: int
    b: int


def _mul_table() -> list[Probe]:
    return [Probe(f"What is {a} times {b}?", str(a * b), "mul_table", a, b)
            for a in range(1, 10) for b in range(1, 10)]


def _mul_multidigit(n: int = 100, seed: int = SEED) -> list[Probe]:
    random.seed(seed)
    out = []
    for _ in range(n):
        a = random.randint(10, 99)
        b = random.randint(2, 9)
        out.append(Probe(f"What is {a} times {b}?", str(a * b), "mul_multidigit", a, b))
    return out


def _addition(n: int = 100, seed: int = SEED) -> list[Probe]:
    random.seed(seed)
    out = []
    for _ in range(n):
        a = random.randint(1, 100)
        b = random.randint(1, 100)
        out.append(Probe(f"What is {a} plus {b}?", str(a + b), "addition", a, b))
    return out


def generate_probes(seed: int = SEED) -> list[Probe]:
    """The 281 probes in the original order: 81 table pairs, 100 two-digit × one-digit, 100 additions.

    Uses (and then restores) the global ``random`` state, because the original reseeds the
    global generator (``random.seed(seed)``) before each random set.
    """
    state = random.getstate()
    try:
        return _mul_table() + _mul_multidigit(100, seed) + _addition(100, seed)
    finally:
        random.setstate(state)


def probes_sha256(probes: list[Probe]) -> str:
    """SHA-256 of the probes as JSON lines (question, answer, category): identifies the item set."""
    lines = "".join(json.dumps([p.question, p.answer, p.category]) + "\n" for p in probes)
    return hashlib.sha256(lines.encode()).hexdigest()


def _first_number_read(response: str) -> tuple[str | None, bool]:
    """``(first number or None, whether it is a mul-token string's product)``."""
    pieces: list[str] = []
    products: list[tuple[int, int]] = []  # spans of the substituted products in the new text
    pos = length = 0
    for m in _MUL_TOKEN.finditer(response):
        pieces.append(response[pos : m.start()])
        length += m.start() - pos
        pieces.append(f" {m.group(3)} ")
        products.append((length + 1, length + 1 + len(m.group(3))))
        length += len(m.group(3)) + 2
        pos = m.end()
    pieces.append(response[pos:])
    match = _FIRST_NUMBER.search("".join(pieces))
    if not match:
        return None, False
    inside = any(a <= match.start() < b for a, b in products)
    return match.group(0).replace(",", ""), inside


def first_number(response: str) -> str | None:
    """The first number in ``response`` (mul-token strings read as their product), or ``None``."""
    return _first_number_read(response)[0]


def read_answer(response: str, legacy_last_number: bool = False) -> tuple[str, bool]:
    """``(normalised prediction, from_mul_token)``: the prediction (``""`` when the response
    has no number) and whether the number was read from a mul-token string ``<MUL_a_b_c>``
    in the text: as its product ``c`` by :func:`first_number`, or -- with the legacy rule --
    as a number inside the string (the last number of ``" 6 <MUL_6_9_54>"`` is ``54``, of
    ``" <MUL_6_9_54>>"`` too; SEEDS_SPEC §1.3)."""
    if legacy_last_number:
        found = extract_answer_legacy_span(response)
        if not found:
            return "", False
        raw, start, _ = found
        inside = any(m.start() < start < m.end() for m in _MUL_TOKEN.finditer(response))
    else:
        raw, inside = _first_number_read(response)
    return (normalize_answer(raw) if raw else ""), bool(raw) and inside


def predict(response: str, legacy_last_number: bool = False) -> str:
    """The normalised prediction for a response ("" when it has no number)."""
    return read_answer(response, legacy_last_number)[0]


def evaluate(ctx: EvalContext) -> TaskResult:
    """Run the probes on ``ctx.model`` (see the module docstring).

    Raises:
        ConfigError: ``max_new_tokens`` < 1.
    """
    from lmkit.evaluation.generate import generate_ex

    legacy = bool(ctx.options.get("legacy_last_number") or False)
    max_new = ctx.options.get("max_new_tokens")
    max_new = DEFAULT_MAX_NEW_TOKENS if max_new is None else max_new
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise ConfigError(f"--max-new-tokens must be an integer >= 1, got {max_new!r}")

    probes = generate_probes()
    if ctx.limit is not None:
        probes = probes[: ctx.limit]
    tok = ctx.tokenizer
    prompts = [tok.encode(PROMPT.format(question=p.question)) for p in probes]
    gen = generate_ex(ctx.model, prompts, max_new_tokens=max_new, eos_id=tok.eos_id,
                      batch_size=ctx.batch_size, progress=ctx.progress)

    mul_ids = mul_token_ids(tok)
    per_cat: dict[str, dict[str, float]] = {}
    rows = []
    n_tokens = n_mul = n_from_mul = 0
    for probe, ids in zip(probes, gen.tokens, strict=True):
        response = tok.decode(ids)
        prediction, from_mul = read_answer(response, legacy)
        ok = prediction == normalize_answer(probe.answer)
        stats = per_cat.setdefault(probe.category, {"correct": 0, "total": 0, **({"mul_tokens": 0} if mul_ids else {})})
        stats["correct"] += ok
        stats["total"] += 1
        n_tokens += len(ids)
        n_from_mul += from_mul
        row = {**asdict(probe), "response": response, "prediction": prediction, "correct": ok,
               "answer_from_mul_token": from_mul}
        if mul_ids:
            row["n_mul_tokens"] = count_mul(ids, mul_ids)
            stats["mul_tokens"] += row["n_mul_tokens"]
            n_mul += row["n_mul_tokens"]
        rows.append(row)
    for stats in per_cat.values():
        stats["accuracy"] = stats["correct"] / stats["total"]
    total = len(probes)
    correct = sum(s["correct"] for s in per_cat.values())
    metrics = {"accuracy": correct / total if total else float("nan")}
    metrics.update({f"acc_{cat}": per_cat[cat]["accuracy"] for cat in CATEGORIES if cat in per_cat})
    if mul_ids:
        metrics.update(total_mul_tokens=float(n_mul), mul_tokens_per_probe=n_mul / total if total else 0.0)
    rule = "legacy_last_number" if legacy else "first_number"
    notes = [f"answers read with {rule}: {RULES[rule]}"
             + ("" if legacy else "; --legacy-last-number scores with the original last-number rule")]
    if n_from_mul:
        where = ("the number was inside a mul-token string <MUL_a_b_c> (the last number of the text, not "
                 "necessarily the answer)" if legacy else "a mul-token string <MUL_a_b_c> was read as its product c")
        notes.append(f"{n_from_mul} of {total} answers came from a mul-token string: {where}")
    if ctx.data is not None:
        notes.append(f"--data {ctx.data} is not used: the probes are generated (random.seed({SEED}) per set)")
    n_truncated = sum(gen.prompt_truncated)
    if n_truncated:
        notes.append(f"{n_truncated} of {total} prompts were longer than block_size "
                     f"{ctx.model.config.block_size} and were cut from the left")
    return TaskResult(
        task="arithmetic-probes",
        version=VERSION,
        metrics=metrics,
        directions=DIRECTIONS,
        headline="accuracy",
        n_items=total,
        data_file=f"generated: domain-token-gpt2 probes, random.seed({SEED}) per set",
        data_sha256=None,
        details={
            "extraction": rule, "extraction_rule": RULES[rule], "n_answers_from_mul_token": n_from_mul,
            "mul_tokens_counted": bool(mul_ids), "seed": SEED, "probes_sha256": probes_sha256(probes), "max_new_tokens": max_new,
            "correct": correct, "total": total, "per_category": per_cat,
            "mean_response_tokens": n_tokens / total if total else 0.0,
            "finish_reasons": dict(Counter(gen.finish)), "n_prompts_truncated": n_truncated,
            "probes": rows,
        },
        notes=notes,
    )
