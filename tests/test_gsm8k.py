"""GSM8K: the spec's answer extraction and normalisation, prompts, few-shot draw, and
evaluate() on a tiny model trained in the test on GSM8K-shaped dialogue."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from gen_fixtures import shared_chat_run

from lmkit.errors import DataError
from lmkit.evaluation.gsm8k import (
    evaluate,
    extract_answer,
    format_prompt,
    is_correct,
    load_items,
    normalize_answer,
    score,
    train_file_for,
)
from lmkit.evaluation.task import EvalContext, file_sha256
from lmkit.runs import load_run

from conftest import shared


@pytest.mark.parametrize(("text", "raw", "normalized"), [
    # rule 1: "####" wins over everything else; commas (thousands groups) removed
    ("Janet sells 9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18", "18"),
    ("The answer is 6. #### 5", "5", "5"),
    ("#### 1,234", "1234", "1234"),
    ("#### 1,234,567", "1234567", "1234567"),
    ("####-7", "-7", "-7"),
    ("#### 3.50", "3.50", "3.5"),
    ("#### 18.0", "18.0", "18"),
    ("#### -0", "-0", "0"),
    # rule 2: "The answer is" / "the answer is" (no commas read: the seed's behaviour)
    ("So the answer is 12.", "12", "12"),
    ("The answer is -3 apples", "-3", "-3"),
    ("The answer is 2.5", "2.5", "2.5"),
    ("The answer is 1,234", "1", "1"),
    # rule 3: the last number anywhere
    ("5 apples and 7 pears", "7", "7"),
    ("it costs 0.50 each", "0.50", "0.5"),
    ("from 3 down to -12", "-12", "-12"),
    ("about 1,234 dollars", "234", "234"),
    ("10 - 4 = 6", "6", "6"),
    # nothing
    ("no numbers here", None, ""),
    ("", None, ""),
])
def test_extraction_and_normalisation_follow_the_spec(text, raw, normalized):
    assert extract_answer(text) == raw
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize(("raw", "normalized"), [
    (" 7 ", "7"), ("1,000,000", "1000000"), ("42.000", "42"), ("-3.25", "-3.25"), ("abc", "abc"),
    ("1e20", "1e20"), ("10000000000000000", "10000000000000000"), ("999999999999999", "999999999999999"),
    (None, ""),
])
def test_normalize_edge_cases(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_correct_needs_a_non_empty_equal_prediction():
    assert score("#### 18", "... #### 18") == ("18", "18", True)
    assert score("The answer is 18.0", "#### 18") == ("18", "18", True)
    assert score("#### 17", "#### 18")[2] is False
    assert not is_correct("", "")


def test_every_real_gold_answer_extracts_to_its_final_number():
    for name in ("test.jsonl", "train.jsonl"):
        rows = [json.loads(line) for line in shared("gsm8k", name).read_text(encoding="utf-8").splitlines()]
        for row in rows:
            tail = row["answer"].rsplit("####", 1)[1].strip()
            assert normalize_answer(extract_answer(row["answer"])) == normalize_answer(tail)
    assert len(rows) == 7473


def test_prompt_formats():
    assert format_prompt(" What is 2+2? ") == "User: What is 2+2?\nAssistant:"
    shots = [{"question": "Q1", "answer": "A1\n#### 1"}, {"question": "Q2", "answer": "A2\n#### 2"}]
    assert format_prompt("Q", shots) == ("User: Q1\nAssistant: A1\n#### 1\n\nUser: Q2\nAssistant: A2\n#### 2"
                                         "\n\nUser: Q\nAssistant:")


def test_local_files_and_train_lookup(tmp_path):
    test = shared("gsm8k", "test.jsonl")
    items, name, sha = load_items(test, limit=5)
    assert len(items) == 5 and name == str(test) and sha == file_sha256(test)
    assert items[0]["question"].startswith("Janet")
    assert train_file_for(test) == test.with_name("train.jsonl")
    other = tmp_path / "gsm8k_test.jsonl"
    other.write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match="train"):
        train_file_for(other)
    (tmp_path / "gsm8k_train.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    assert train_file_for(other) == tmp_path / "gsm8k_train.jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        load_items(bad)


def test_hub_unreachable_is_a_one_line_data_error():
    with pytest.raises(DataError, match="--data"):
        load_items(None, limit=2)


# --------------------------------------------------------------------------------------
# evaluate() on a tiny model trained on GSM8K-shaped dialogue
# --------------------------------------------------------------------------------------


def _write_split(path: Path, pairs: list[tuple[int, int]]) -> None:
    rows = [{"question": f"What is {a} times {b}?", "answer": f"{a}*{b}=<<{a}*{b}={a * b}>>{a * b}\n#### {a * b}"}
            for a, b in pairs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    loaded = load_run(shared_chat_run(tmp_path_factory), "latest")
    data = tmp_path_factory.mktemp("gsm8k_data")
    rng = random.Random(5)
    _write_split(data / "test.jsonl", [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(12)])
    _write_split(data / "train.jsonl", [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(30)])
    return loaded, data / "test.jsonl"


def _ctx(loaded, data, **kw) -> EvalContext:
    return EvalContext(model=loaded.model, tokenizer=loaded.tokenizer, config=loaded.config,
                       run_dir=Path("."), device=torch.device("cpu"), step=loaded.step, data=data, **kw)


def test_evaluate_scores_what_it_reports(setup):
    loaded, data = setup
    calls = []
    result = evaluate(_ctx(loaded, data, batch_size=5, progress=lambda d, t: calls.append((d, t))))
    assert result.task == "gsm8k" and result.headline == "accuracy" and result.n_items == 12
    assert result.data_file == str(data) and result.data_sha256 == file_sha256(data)
    examples = result.details["examples"]
    assert len(examples) == 12
    for ex in examples:
        assert "\n\n" not in ex["response"] and "\nUser:" not in ex["response"]
        assert (ex["prediction"], ex["gold"], ex["correct"]) == score(ex["response"], f"#### {ex['gold']}")
    assert result.metrics["correct"] == sum(ex["correct"] for ex in examples)
    assert result.metrics["accuracy"] == result.metrics["correct"] / 12
    assert result.metrics["mean_response_tokens"] == sum(ex["n_tokens"] for ex in examples) / 12
    assert calls[-1] == (12, 12) and len(calls) == 12
    # the trained model answers in the corpus format, so at least some responses end at a stop
    assert set(result.details["finish_reasons"]) <= {"eos", "stop", "length", "context"}
    assert result.details["finish_reasons"].get("stop", 0) > 0


def test_batching_does_not_change_the_answers(setup):
    loaded, data = setup
    one = evaluate(_ctx(loaded, data, batch_size=1, limit=6))
    many = evaluate(_ctx(loaded, data, batch_size=6, limit=6))
    assert [e["response"] for e in one.details["examples"]] == [e["response"] for e in many.details["examples"]]
    assert one.n_items == 6


def test_fewshot_draws_fixed_train_examples(setup):
    loaded, data = setup
    a = evaluate(_ctx(loaded, data, limit=3, options={"fewshot": 2, "max_new_tokens": 16}))
    b = evaluate(_ctx(loaded, data, limit=3, options={"fewshot": 2, "max_new_tokens": 16}))
    assert a.details["fewshot_ids"] == b.details["fewshot_ids"] == random.Random(1234).sample(range(30), 2)
    assert a.details["fewshot_source"] == str(data.with_name("train.jsonl"))
    assert a.details["examples"] == b.details["examples"]
    assert all(e["n_tokens"] <= 16 for e in a.details["examples"])
    c = evaluate(_ctx(loaded, data, limit=3, options={"fewshot": 2, "seed": 7, "max_new_tokens": 4}))
    assert c.details["fewshot_ids"] == random.Random(7).sample(range(30), 2)
