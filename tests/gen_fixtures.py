"""Tiny trained runs shared by the generation-task tests (test_generate/gsm8k/probes).

``train_arith_run`` trains the conftest tiny arithmetic preset (char tokenizer, block 32).
``train_chat_run`` trains a byte-level model on a small "User: …\\nAssistant: …" corpus
written into the test folder, so prompts of the probe/GSM8K shape fit its context.
"""

from __future__ import annotations

import random
from pathlib import Path

from lmkit.config import build_run_config
from lmkit.training.loop import train

CHAT_PRESET = """\
model:
  n_layer: 2
  n_head: 2
  n_embd: 48
  d_ff: 96
  block_size: 128
  pos_encoding: {pos}
  dropout: 0.0
data:
  dataset: {data}
  tokenizer: byte
training:
  batch_size: 16
  max_steps: {steps}
  lr: 3.0e-3
  warmup_steps: 5
  schedule: cosine
  log_interval: 10
  eval_interval: {steps}
  checkpoint_interval: {steps}
  keep_last: 1
  seed: 1
"""


def train_arith_run(root: Path, pos: str = "rope", steps: int = 40) -> Path:
    """Train the tiny arithmetic preset; return the run folder."""
    from conftest import TINY_PRESET

    root.mkdir(parents=True, exist_ok=True)
    preset = root / f"tiny_{pos}.yaml"
    preset.write_text(TINY_PRESET.format(pos=pos, steps=steps, eval_interval=steps, ckpt_interval=steps))
    name = f"arith_{pos}"
    train(build_run_config(str(preset), [], {"out_dir": ("--out-dir", str(root / "runs")),
                                             "name": ("--name", name)}))
    return root / "runs" / name


def chat_corpus(n: int = 3000, seed: int = 0) -> str:
    """Dialogue turns about small products and sums, a blank line between turns; half the
    answers in the probe style (``The answer is c.``), half GSM8K-style (``… #### c``)."""
    rng = random.Random(seed)
    turns = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        word, op, c = ("times", "*", a * b) if rng.random() < 0.5 else ("plus", "+", a + b)
        if rng.random() < 0.5:
            answer = f"The answer is {c}."
        else:
            answer = f"{a}{op}{b}=<<{a}{op}{b}={c}>>{c}\n#### {c}"
        turns.append(f"User: What is {a} {word} {b}?\nAssistant: {answer}")
    return "\n\n".join(turns) + "\n"


_RUNS: dict[tuple[str, str], Path] = {}


def shared_chat_run(tmp_path_factory, pos: str = "rope") -> Path:
    """:func:`train_chat_run` once per test session (memoised), in a session temp folder."""
    key = ("chat", pos)
    if key not in _RUNS:
        _RUNS[key] = train_chat_run(tmp_path_factory.mktemp(f"chat_{pos}"), pos)
    return _RUNS[key]


def train_chat_run(root: Path, pos: str = "rope", steps: int = 150) -> Path:
    """Train a byte-level block-128 model on :func:`chat_corpus`; return the run folder."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "chat.txt"
    data.write_text(chat_corpus())
    preset = root / f"chat_{pos}.yaml"
    preset.write_text(CHAT_PRESET.format(pos=pos, steps=steps, data=str(data)))
    name = f"chat_{pos}"
    train(build_run_config(str(preset), [], {"out_dir": ("--out-dir", str(root / "runs")),
                                             "name": ("--name", name)}))
    return root / "runs" / name
