"""Seed 000's arithmetic generator: statistics, grammar, depth labels, JSONL."""

import json
import re

import pytest
import torch

from lmkit.config import ArithmeticConfig
from lmkit.data.arithmetic import (
    depth_labels,
    evaluate,
    generate_arithmetic,
    load_arithmetic_files,
    read_jsonl,
    write_jsonl,
)
from lmkit.errors import DataError

SPLITS = generate_arithmetic()
NUMBER = re.compile(r"\d+")


def test_split_sizes():
    assert {k: len(v) for k, v in SPLITS.items()} == {"train": 2000, "val": 200, "test_flat": 100, "test_paren": 100}


def test_same_draws_as_the_seed_generator():
    # random.seed(42) and the seed's order of random calls give these first expressions
    # (checked against Step-free-arithmetic-transformers src/data/generate_pilot_dataset.py).
    assert [e.expr for e in SPLITS["train"][:3]] == ["4*36+29+95", "((95*12))", "(4*12)*(28+30)"]


def test_parenthesised_share_and_test_splits():
    share = sum(e.has_parens for e in SPLITS["train"]) / 2000
    assert 0.62 < share < 0.74  # depth ~ U{0,1,2}: two thirds parenthesised (seed: ~68%)
    assert not any(e.has_parens for e in SPLITS["test_flat"])
    assert all(e.has_parens for e in SPLITS["test_paren"])


@pytest.mark.parametrize("split", list(SPLITS))
def test_grammar(split):
    for ex in SPLITS[split]:
        assert set(ex.expr) <= set("0123456789+-*()"), ex.expr
        numbers = NUMBER.findall(ex.expr)
        assert 2 <= len(numbers) <= 4
        assert all(1 <= int(n) <= 99 and not n.startswith("0") for n in numbers)
        assert ex.result == evaluate(ex.expr)
        assert max(ex.depth) <= 2 and ex.depth[-1] == 0
        assert ex.depth == depth_labels(ex.expr)


def test_all_depths_occur():
    assert {max(e.depth) for e in SPLITS["train"]} == {0, 1, 2}


def test_depth_labels_example_from_spec():
    assert depth_labels("(1+(2*3))") == [1, 1, 1, 2, 2, 2, 2, 1, 0]
    assert depth_labels("12+3") == [0, 0, 0, 0]


@pytest.mark.parametrize("expr", ["2+3*4", "(2+3)*4", "10-4-3", "2*3*4-5", "((7-9))*3", "1-(2-(3-4))"])
def test_evaluate_follows_python_precedence(expr):
    assert evaluate(expr) == eval(expr)  # noqa: S307 - fixed test strings


@pytest.mark.parametrize("bad", ["2+", "(2+3", "2+3)", "a+1", ""])
def test_evaluate_rejects_bad_expressions(bad):
    with pytest.raises(ValueError):
        evaluate(bad)


def test_seed_changes_data_and_is_deterministic():
    again = generate_arithmetic()
    assert [e.expr for e in again["val"]] == [e.expr for e in SPLITS["val"]]
    other = generate_arithmetic(ArithmeticConfig(seed=7))
    assert [e.expr for e in other["train"][:20]] != [e.expr for e in SPLITS["train"][:20]]


def test_max_depth_zero_has_no_parens():
    splits = generate_arithmetic(ArithmeticConfig(max_depth=0, n_train=100, n_val=10))
    assert not any(e.has_parens for e in splits["train"]) and splits["test_paren"] == []


def test_jsonl_round_trip_in_the_seed_format(tmp_path):
    path = tmp_path / "pilot_train.jsonl"
    write_jsonl(SPLITS["train"][:50], path)
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"expr", "result", "depth"}
    assert read_jsonl(path) == SPLITS["train"][:50]


def test_load_seed_file_layout(tmp_path):
    for split in ("train", "val", "test_flat", "test_paren"):
        write_jsonl(SPLITS[split][:10], tmp_path / f"pilot_{split}.jsonl")
    loaded = load_arithmetic_files(tmp_path)
    assert set(loaded) == {"train", "val", "test_flat", "test_paren"}
    assert loaded["test_paren"] == SPLITS["test_paren"][:10]


def test_wrong_result_is_reported_with_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"expr": "1+1", "result": 2}\n{"expr": "2*3", "result": 5}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: result 5 is not the value"):
        read_jsonl(path)


class Scripted(torch.nn.Module):
    """Emits a fixed token sequence after any prompt of length `prompt_len` (greedy)."""

    def __init__(self, script, prompt_len, vocab=35):
        super().__init__()
        self.script, self.prompt_len, self.vocab = script, prompt_len, vocab

    def forward(self, idx, targets=None, last_only=False):
        logits = torch.zeros(idx.size(0), 1, self.vocab)
        logits[:, 0, self.script[idx.size(1) - self.prompt_len]] = 1.0
        return logits, None


@pytest.mark.parametrize(
    ("generated", "correct"),
    [("12<EOS>", True), ("1<PAD>2<EOS>", False), ("12<BOS><EOS>", False), ("12", False), ("123<EOS>", False)],
)
def test_exact_match_needs_exactly_the_answer_then_eos(generated, correct):
    from lmkit.config import TrainConfig
    from lmkit.data.arithmetic import ArithmeticExample
    from lmkit.data.tokenizers import CharTokenizer
    from lmkit.device import plan_device
    from lmkit.evaluation.arithmetic import exact_match

    tok = CharTokenizer()
    specials = {"<PAD>": 0, "<BOS>": 1, "<EOS>": 2}
    script = [specials[t] if t in specials else tok.encode(t)[0] for t in re.findall(r"<\w+>|.", generated)]
    script += [tok.encode("9")[0]] * 40  # keeps going without EOS after the script
    example = ArithmeticExample("3*4", 12, depth_labels("3*4"))
    model = Scripted(script, prompt_len=1 + len(example.prompt))
    plan = plan_device(TrainConfig(max_steps=1, device="cpu"))
    assert exact_match(model, tok, [example], plan, block_size=32) == (1.0 if correct else 0.0)
