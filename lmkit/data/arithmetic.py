"""The arithmetic experiment's arithmetic task: integer expressions with ``+ - *`` and parentheses.

Grammar (SEEDS_SPEC 3.1): integers 1..99 without leading zeros, no spaces, 2..4
numbers, nesting at most 2. For each expression the generator draws the number count
``n ~ U{2,3,4}``, then the depth ``d ~ U{0..max_depth}``, then one of fixed templates.
Splits, in this order from one ``random.Random(seed)`` (seed 42): train 2000 and val
200 (mixed, about two thirds parenthesised), test_flat 100 (no parentheses) and
test_paren 100 (each contains ``(``). The draws follow the seed's generator call for
call, so the same seed gives the seed's data.

Depth labels: ``(`` increments then records, ``)`` decrements then records, any other
character records the current depth: ``(1+(2*3))`` -> ``[1,1,1,2,2,2,2,1,0]``.

Sequence format (SEEDS_SPEC 3.2): ``<BOS> expr " = " result <EOS>`` in the ``char``
tokenizer; the model reads ``seq[:-1]`` and predicts ``seq[1:]``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from lmkit.config import ArithmeticConfig
from lmkit.errors import DataError

OPERATORS = ("+", "-", "*")
SPLITS = ("train", "val", "test_flat", "test_paren")
ANSWER_SEPARATOR = " = "

# Templates by depth and number count. Placeholders {0}..{3} are numbers, {o0}..{o2}
# operators. The order of each list is the seed's, so ``randint(0, len - 1)`` picks the
# same template for the same draw.
_TEMPLATES: dict[int, dict[int, list[str]]] = {
    1: {
        2: ["({0}{o0}{1})"],
        3: ["({0}{o0}{1}){o1}{2}", "{0}{o0}({1}{o1}{2})", "({0}{o0}{1}{o1}{2})"],
        4: ["({0}{o0}{1}){o1}({2}{o2}{3})", "({0}{o0}{1}{o1}{2}){o2}{3}", "{0}{o0}({1}{o1}{2}{o2}{3})"],
    },
    2: {
        2: ["(({0}{o0}{1}))"],
        3: ["(({0}{o0}{1}){o1}{2})", "({0}{o0}({1}{o1}{2}))", "(({0}{o0}{1})){o1}{2}", "{0}{o0}(({1}{o1}{2}))"],
        4: ["(({0}{o0}{1}){o1}({2}{o2}{3}))", "({0}{o0}({1}{o1}{2})){o2}{3}", "{0}{o0}(({1}{o1}{2}){o2}{3})"],
    },
}


@dataclass(frozen=True)
class ArithmeticExample:
    """One expression, its integer value and the per-character depth labels."""

    expr: str
    result: int
    depth: list[int] = field(hash=False)

    @property
    def has_parens(self) -> bool:
        return "(" in self.expr

    @property
    def prompt(self) -> str:
        """What the model is given at evaluation: ``expr + " = "``."""
        return self.expr + ANSWER_SEPARATOR

    @property
    def answer(self) -> str:
        return str(self.result)

    def to_json(self) -> dict:
        return {"expr": self.expr, "result": self.result, "depth": list(self.depth)}


def depth_labels(expr: str) -> list[int]:
    """Parenthesis depth of every character of ``expr`` (rule in the module docstring)."""
    labels, depth = [], 0
    for ch in expr:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        labels.append(depth)
    return labels


def evaluate(expr: str) -> int:
    """Value of an expression of non-negative integers, ``+ - *`` and parentheses,
    with the usual precedence (``*`` binds tighter; left to right). No ``eval``.

    Raises:
        ValueError: when ``expr`` is not such an expression.
    """
    pos = 0

    def peek() -> str:
        return expr[pos] if pos < len(expr) else ""

    def parse_sum() -> int:
        nonlocal pos
        value = parse_product()
        while peek() in ("+", "-"):
            op = expr[pos]
            pos += 1
            rhs = parse_product()
            value = value + rhs if op == "+" else value - rhs
        return value

    def parse_product() -> int:
        nonlocal pos
        value = parse_atom()
        while peek() == "*":
            pos += 1
            value *= parse_atom()
        return value

    def parse_atom() -> int:
        nonlocal pos
        if peek() == "(":
            pos += 1
            value = parse_sum()
            if peek() != ")":
                raise ValueError(f"missing ')' at {pos} in {expr!r}")
            pos += 1
            return value
        start = pos
        while peek().isdigit():
            pos += 1
        if start == pos:
            raise ValueError(f"expected a number at {pos} in {expr!r}")
        return int(expr[start:pos])

    result = parse_sum()
    if pos != len(expr):
        raise ValueError(f"unexpected {expr[pos]!r} at {pos} in {expr!r}")
    return result


class _Generator:
    """Draws expressions in exactly the seed's order of random calls."""

    def __init__(self, seed: int, max_depth: int):
        self.rng = random.Random(seed)
        self.max_depth = max_depth

    def number(self) -> str:
        return str(self.rng.randint(1, 99))

    def op(self) -> str:
        return self.rng.choice(OPERATORS)

    def flat(self, n: int) -> str:
        parts = [self.number()]
        for _ in range(n - 1):
            parts.append(self.op())
            parts.append(self.number())
        return "".join(parts)

    def nested(self, depth: int, n: int) -> str:
        templates = _TEMPLATES[depth][n]
        if len(templates) == 1:  # n == 2: the seed draws number, operator, number
            a, o, b = self.number(), self.op(), self.number()
            return templates[0].format(a, b, o0=o)
        template = templates[self.rng.randint(0, len(templates) - 1)]
        nums = [self.number() for _ in range(n)]
        ops = [self.op() for _ in range(n - 1)]
        return template.format(*nums, **{f"o{i}": o for i, o in enumerate(ops)})

    def expression(self, allow_parens: bool) -> str:
        n = self.rng.randint(2, 4)
        if not allow_parens:
            return self.flat(n)
        depth = self.rng.randint(0, self.max_depth)
        return self.flat(n) if depth == 0 else self.nested(depth, n)

    def example(self, allow_parens: bool) -> ArithmeticExample:
        expr = self.expression(allow_parens)
        return ArithmeticExample(expr, evaluate(expr), depth_labels(expr))


def generate_arithmetic(config: ArithmeticConfig | None = None) -> dict[str, list[ArithmeticExample]]:
    """The four splits ``train``, ``val``, ``test_flat``, ``test_paren``.

    ``test_paren`` needs parentheses, so it is empty when ``max_depth == 0``.
    """
    config = config or ArithmeticConfig()
    gen = _Generator(config.seed, config.max_depth)
    splits = {
        "train": [gen.example(True) for _ in range(config.n_train)],
        "val": [gen.example(True) for _ in range(config.n_val)],
        "test_flat": [gen.example(False) for _ in range(config.n_test_flat)],
    }
    paren: list[ArithmeticExample] = []
    attempts = 0
    while config.max_depth > 0 and len(paren) < config.n_test_paren and attempts < 100_000:
        attempts += 1
        ex = gen.example(True)
        if ex.has_parens:
            paren.append(ex)
    splits["test_paren"] = paren
    return splits


def write_jsonl(examples: list[ArithmeticExample], path: Path) -> None:
    """Write one ``{"expr", "result", "depth"}`` object per line (the seed's format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_json()) + "\n")


def read_jsonl(path: Path) -> list[ArithmeticExample]:
    """Read examples in the seed's JSONL form; ``depth`` is recomputed when absent.

    Raises:
        DataError: unreadable file, bad JSON, missing keys, or a result that is not the
            expression's value -- naming the file and line.
    """
    examples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            expr, result = str(obj["expr"]), int(obj["result"])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path}:{lineno}: expected a JSON object with 'expr' and 'result'") from None
        try:
            value = evaluate(expr)
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: {exc}") from None
        if value != result:
            raise DataError(f"{path}:{lineno}: result {result} is not the value of {expr!r} ({value})")
        examples.append(ArithmeticExample(expr, result, obj.get("depth") or depth_labels(expr)))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def load_arithmetic_files(path: Path) -> dict[str, list[ArithmeticExample]]:
    """Splits from a folder of JSONL files named like the seed's (``pilot_train.jsonl``,
    ``pilot_val.jsonl``, ``pilot_test_flat.jsonl``, ``pilot_test_paren.jsonl``) or a
    single JSONL file (then it is the training split and val is carved from it later).

    Raises:
        DataError: no training file, or unreadable files.
    """
    if path.is_file():
        return {"train": read_jsonl(path)}
    found: dict[str, list[ArithmeticExample]] = {}
    for file in sorted(path.glob("*.jsonl")):
        stem = file.stem.lower()
        for split in ("test_paren", "test_flat", "train", "val"):
            if stem.endswith(split) or stem == split or (split == "val" and stem.endswith("valid")):
                found[split] = read_jsonl(file)
                break
    if "train" not in found:
        raise DataError(f"{path}: no *train.jsonl file with arithmetic examples")
    return found


def encode_example(example: ArithmeticExample, tokenizer) -> list[int]:
    """``[BOS] + chars(expr + " = " + result) + [EOS]`` as ids."""
    return [tokenizer.bos_id, *tokenizer.encode(example.prompt + example.answer), tokenizer.eos_id]
