"""The multiplication drill block the domain-token experiment puts before its corpus.

Source: zhengpu-berkeley/domain-token-gpt2, ``data/prepare_fineweb_pilot.py``
(``generate_synthetic_math_data``), reproduced line for line with the same random stream
(Python's Mersenne Twister seeded with ``seed``, calls in the same order):

1. a heading, then for every canonical pair ``a <= b`` (1..9): ``"a times b equals c."``,
   ``"a*b=c"``, ``"a × b = c"`` and, with probability 0.3, ``"What is a*b? The answer is c."``;
2. a heading and 200 word problems ``"If you have a boxes with b ITEM each, you have a*b=c ITEM in total."``;
3. a heading and 300 drills, each ``"a*b=c"``, ``"a × b = c"`` or ``"axb=c"``;

joined by newlines into one document. With ``data.include_synthetic: true`` it is the first
row of the training split in both conditions (in ``mul_tokens`` the injection then collapses
its facts into tokens).
"""

from __future__ import annotations

import random

ITEMS = ("apples", "oranges", "books", "pencils", "cookies", "toys", "balls", "cards")


def synthetic_lines(seed: int = 42) -> list[str]:
    """The drill block's lines (headings included), as the experiment generates them."""
    rng = random.Random(seed)
    lines = ["\n\n=== Multiplication Tables ===\n"]
    for a in range(1, 10):
        for b in range(a, 10):
            c = a * b
            lines.append(f"{a} times {b} equals {c}.")
            lines.append(f"{a}*{b}={c}")
            lines.append(f"{a} × {b} = {c}")
            if rng.random() < 0.3:
                lines.append(f"What is {a}*{b}? The answer is {c}.")
    lines.append("\n\n=== Math Word Problems ===\n")
    for _ in range(200):
        a = rng.randint(1, 9)
        b = rng.randint(1, 9)
        item = rng.choice(ITEMS)
        lines.append(f"If you have {a} boxes with {b} {item} each, you have {a}*{b}={a * b} {item} in total.")
    lines.append("\n\n=== Quick Drills ===\n")
    for _ in range(300):
        a = rng.randint(1, 9)
        b = rng.randint(1, 9)
        fmt = rng.choice(["asterisk", "times", "x"])
        if fmt == "asterisk":
            lines.append(f"{a}*{b}={a * b}")
        elif fmt == "times":
            lines.append(f"{a} × {b} = {a * b}")
        else:
            lines.append(f"{a}x{b}={a * b}")
    return lines


def synthetic_drills(seed: int = 42) -> str:
    """The drill block as one document (its lines joined by ``"\\n"``, no trailing newline)."""
    return "\n".join(synthetic_lines(seed))


__all__ = ["ITEMS", "synthetic_drills", "synthetic_lines"]
