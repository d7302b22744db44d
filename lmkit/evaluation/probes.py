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
``acc_addition``; details hold per-category correct/total/accuracy, the mean response
length in tokens, and every probe's response and prediction.

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
from lmkit.evaluation.gsm8k import extract_answer_legacy, normalize_answer
from lmkit.evaluation.task import EvalContext, TaskResult

VERSION = "1"
SEED = 42
CATEGORIES = ("mul_table", "mul_multidigit", "addition")
#: Metric directions (see :class:`lmkit.evaluation.task.TaskResult`): every accuracy is higher-better.
DIRECTIONS = {"accuracy": "higher", **{f"acc_{cat}": "higher" for cat in CATEGORIES}}
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


def first_number(response: str) -> str | None:
    """The first number in ``response`` (mul-token strings read as their product), or ``None``."""
    text = _MUL_TOKEN.sub(lambda m: f" {m.group(3)} ", response)
    match = _FIRST_NUMBER.search(text)
    return match.group(0).replace(",", "") if match else None


def predict(response: str, legacy_last_number: bool = False) -> str:
    """The normalised prediction for a response ("" when it has no number)."""
    raw = extract_answer_legacy(response) if legacy_last_number else first_number(response)
    return normalize_answer(raw) if raw else ""


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

    per_cat: dict[str, dict[str, float]] = {}
    rows = []
    n_tokens = 0
    for probe, ids in zip(probes, gen.tokens, strict=True):
        response = tok.decode(ids)
        prediction = predict(response, legacy)
        ok = prediction == normalize_answer(probe.answer)
        stats = per_cat.setdefault(probe.category, {"correct": 0, "total": 0})
        stats["correct"] += ok
        stats["total"] += 1
        n_tokens += len(ids)
        rows.append({**asdict(probe), "response": response, "prediction": prediction, "correct": ok})
    for stats in per_cat.values():
        stats["accuracy"] = stats["correct"] / stats["total"]
    total = len(probes)
    correct = sum(s["correct"] for s in per_cat.values())
    metrics = {"accuracy": correct / total if total else float("nan")}
    metrics.update({f"acc_{cat}": per_cat[cat]["accuracy"] for cat in CATEGORIES if cat in per_cat})
    rule = "legacy_last_number" if legacy else "first_number"
    notes = []
    if legacy:
        notes.append("legacy_last_number: scored with the original rule (#### / 'The answer is' / LAST number "
                     "of the response), which can read a later number than the answer")
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
            "extraction": rule, "seed": SEED, "probes_sha256": probes_sha256(probes), "max_new_tokens": max_new,
            "correct": correct, "total": total, "per_category": per_cat,
            "mean_response_tokens": n_tokens / total if total else 0.0,
            "finish_reasons": dict(Counter(gen.finish)), "n_prompts_truncated": n_truncated,
            "probes": rows,
        },
        notes=notes,
    )
