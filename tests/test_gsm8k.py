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
    extract_answer_legacy,
    format_prompt,
    is_correct,
    load_items,
    normalize_answer,
    train_file_for,
)
from lmkit.evaluation.task import EvalContext, file_sha256
from lmkit.runs import load_run

from conftest import shared


# Expected answers written by hand from reading each text (what a person takes as the
# final answer), not derived from the module's regexes.
@pytest.mark.parametrize(("text", "raw", "normalized"), [
    # rule 1: "####" wins over everything else; thousands separators removed
    ("Janet sells 9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18", "18"),
    ("The answer is 6. #### 5", "5", "5"),
    ("#### 1,234", "1234", "1234"),
    ("#### 1,234,567", "1234567", "1234567"),
    ("#### 1,234.5", "1234.5", "1234.5"),
    ("#### $1,000", "1000", "1000"),
    ("####-7", "-7", "-7"),
    ("#### -1,250.75", "-1250.75", "-1250.75"),
    ("#### 3.50", "3.50", "3.5"),
    ("#### 18.0", "18.0", "18"),
    ("#### -0", "-0", "0"),
    # rule 2: "The answer is" / "the answer is"
    ("So the answer is 12.", "12", "12"),
    ("The answer is -3 apples", "-3", "-3"),
    ("The answer is 2.5", "2.5", "2.5"),
    ("The answer is 1,234", "1234", "1234"),
    ("The answer is $1,234.", "1234", "1234"),
    ("The answer is: 40", "40", "40"),
    ("The answer is 7. Then 8 more.", "7", "7"),
    # rule 3: the last number anywhere
    ("5 apples and 7 pears", "7", "7"),
    ("it costs 0.50 each", "0.50", "0.5"),
    ("from 3 down to -12", "-12", "-12"),
    ("about 1,234 dollars", "1234", "1234"),
    ("She paid $1,234.", "1234", "1234"),
    ("That is 2,000,000 grains.", "2000000", "2000000"),
    ("10 - 4 = 6", "6", "6"),
    ("pages 5-8", "8", "8"),                      # a hyphen, not a minus sign
    ("x = -3.5.", "-3.5", "-3.5"),                # a trailing period is not a decimal part
    ("digits 1,23", "23", "23"),                  # not a thousands group
    ("12,3456 items", "3456", "3456"),            # four digits after the comma: not a group either
    # nothing
    ("no numbers here", None, ""),
    ("", None, ""),
])
def test_extraction_reads_thousands_separators_and_decimals(text, raw, normalized):
    assert extract_answer(text) == raw
    assert normalize_answer(raw) == normalized


# The original rules (SEEDS_SPEC 1.4, domain-token-gpt2 rl/rewards.py), each case worked by
# hand through its three regexes: what --legacy-extraction must reproduce.
@pytest.mark.parametrize(("text", "raw"), [
    ("#### 1,234", "1234"),
    ("#### 1,234.5", "1234"),           # the decimal part after a group is dropped
    ("#### 3.50", "3.50"),
    ("#### $1,000", "000"),             # "####\s*" cannot skip "$": the last number wins
    ("The answer is 1,234", "1"),        # no commas in rule 2
    ("The answer is $12", "12"),         # rule 2 fails on "$"; the last number is 12
    ("about 1,234 dollars", "234"),      # rule 3 reads the digits after the comma
    ("She paid $1,234.", "234"),
    ("pages 5-8", "-8"),                # rule 3 takes the hyphen as a sign
    ("The answer is 6. #### 5", "5"),
    ("no numbers here", None),
])
def test_legacy_extraction_keeps_the_original_rules(text, raw):
    assert extract_answer_legacy(text) == raw


@pytest.mark.parametrize(("raw", "normalized"), [
    (" 7 ", "7"), ("1,000,000", "1000000"), ("42.000", "42"), ("-3.25", "-3.25"), ("abc", "abc"),
    ("1e20", "1e20"), ("10000000000000000", "10000000000000000"), ("999999999999999", "999999999999999"),
    (None, ""),
])
def test_normalize_edge_cases(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_correct_needs_a_non_empty_equal_prediction():
    from lmkit.evaluation.gsm8k import score

    assert score("#### 18", "... #### 18") == ("18", "18", True)
    assert score("The answer is 18.0", "#### 18") == ("18", "18", True)
    assert score("#### 17", "#### 18")[2] is False
    assert score("The answer is 1,234", "#### 1,234") == ("1234", "1234", True)
    assert score("The answer is 1,234", "#### 1,234", legacy=True) == ("1", "1234", False)
    assert not is_correct("", "")


def test_every_real_gold_answer_extracts_to_its_final_number():
    counts = {}
    for name in ("test.jsonl", "train.jsonl"):
        rows = [json.loads(line) for line in shared("gsm8k", name).read_text(encoding="utf-8").splitlines()]
        counts[name] = len(rows)
        for row in rows:
            tail = row["answer"].rsplit("####", 1)[1].strip()  # the gold's own final line
            expected = tail.replace(",", "")
            assert extract_answer(row["answer"]) == expected, row["answer"][-80:]
            assert normalize_answer(extract_answer_legacy(row["answer"])) == normalize_answer(expected)
    assert counts == {"test.jsonl": 1319, "train.jsonl": 7473}


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


def test_hub_unreachable_is_a_one_line_data_error(hub_offline):
    import time

    started = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_items(None, limit=2)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot load openai/gsm8k (test) from the hub (no network and no cached copy)")
    assert "pass --data path/to/gsm8k/test.jsonl" in message
    assert time.perf_counter() - started < 10  # no retries against an unreachable hub


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


# Scripted responses (as if generated) for gold answers, with the verdicts worked out by hand:
# (response, gold solution, correct with the default extraction, correct with the original rules).
SCRIPTED = [
    ("6*7=42\n#### 42", "6*7=<<6*7=42>>42\n#### 42", True, True),
    ("The answer is 1,234", "1000+234=<<1000+234=1234>>1234\n#### 1234", True, False),   # legacy reads 1
    ("She paid $1,234.", "#### 1,234", True, False),                                     # legacy reads 234
    ("#### 1,234.5", "#### 1234.5", True, False),                                         # legacy reads 1234
    ("The answer is 19.", "#### 18", False, False),
    ("I do not know", "#### 3", False, False),
    ("It drops to -4 degrees", "#### -4", True, True),
    ("pages 5-8", "#### 8", True, False),                                                 # legacy reads -8
]


class _CharTokenizer:
    """One id per character (ids = code points), enough for prompts and scripted responses."""

    eos_id = None

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def test_evaluate_scores_scripted_responses_as_worked_out_by_hand(tmp_path, monkeypatch):
    import types

    from lmkit.evaluation import generate

    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q{i}", "answer": gold}) + "\n"
                            for i, (_, gold, _, _) in enumerate(SCRIPTED)))
    tok = _CharTokenizer()
    seen_prompts = []

    def scripted(model, prompts, **kw):  # generation replaced: the responses are fixed text
        seen_prompts.extend(tok.decode(p) for p in prompts)
        # a stop string after the response is cut off by the task
        return generate.Generation(tokens=[tok.encode(r + "\n\nUser: more") for r, *_ in SCRIPTED],
                                   finish=["stop"] * len(prompts), prompt_truncated=[False] * len(prompts))

    monkeypatch.setattr(generate, "generate_ex", scripted)
    model = types.SimpleNamespace(config=types.SimpleNamespace(block_size=64))
    ctx = EvalContext(model=model, tokenizer=tok, config=None, run_dir=tmp_path, device=torch.device("cpu"),
                      step=0, data=data, options={"legacy_extraction": True})
    result = evaluate(ctx)

    assert seen_prompts == [f"User: Q{i}\nAssistant:" for i in range(len(SCRIPTED))]
    assert result.task == "gsm8k" and result.headline == "accuracy" and result.n_items == 8
    assert result.data_file == str(data) and result.data_sha256 == file_sha256(data)
    # by hand: 6 of 8 correct now, 2 of 8 with the original rules
    assert result.metrics["correct"] == 6 and result.metrics["accuracy"] == 0.75
    assert result.metrics["correct_legacy"] == 2 and result.metrics["accuracy_legacy"] == 0.25
    assert result.metrics["total"] == 8
    assert [e["correct"] for e in result.details["examples"]] == [c for *_, c, _ in SCRIPTED]
    assert [e["correct_legacy"] for e in result.details["examples"]] == [c for *_, c in SCRIPTED]
    assert [e["prediction_legacy"] for e in result.details["examples"]][1:4] == ["1", "234", "1234"]
    # response length counts the generated tokens (characters here) including the cut tail
    lengths = [len(r + "\n\nUser: more") for r, *_ in SCRIPTED]
    assert result.metrics["mean_response_tokens"] == sum(lengths) / 8
    assert result.details["examples"][0]["response"] == "6*7=42\n#### 42"
    assert result.directions["accuracy"] == "higher" and result.directions["total"] == "neither"
    assert any("accuracy_legacy" in n for n in result.notes)

    plain = evaluate(EvalContext(model=model, tokenizer=tok, config=None, run_dir=tmp_path,
                                 device=torch.device("cpu"), step=0, data=data))
    assert plain.metrics["accuracy"] == 0.75 and "accuracy_legacy" not in plain.metrics


def test_evaluate_on_a_trained_model_stops_at_the_turn_boundary(setup):
    loaded, data = setup
    calls = []
    result = evaluate(_ctx(loaded, data, batch_size=5, progress=lambda d, t: calls.append((d, t))))
    assert result.n_items == 12 and len(result.details["examples"]) == 12
    for ex in result.details["examples"]:
        assert "\n\n" not in ex["response"] and "\nUser:" not in ex["response"]
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


def test_cli_legacy_extraction_writes_both_metrics_and_their_directions(setup, tmp_path):
    from conftest import run_cli

    loaded, data = setup
    run_dir = loaded.checkpoint.parent.parent if loaded.checkpoint.parent.name == "checkpoints" else None
    assert run_dir is not None and (run_dir / "config.yaml").is_file()
    proc = run_cli("eval", str(run_dir), "--task", "gsm8k", "--data", str(data), "--limit", "3",
                   "--max-new-tokens", "8", "--legacy-extraction", "--json", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)["results"][0]
    assert {"accuracy", "accuracy_legacy", "correct", "correct_legacy"} <= set(record["metrics"])
    assert record["options"]["legacy_extraction"] is True and record["version"] == "2"
    assert record["directions"]["accuracy_legacy"] == "higher" and record["directions"]["total"] == "neither"
    on_disk = json.loads((run_dir / "eval" / "gsm8k.json").read_text())
    assert on_disk["directions"] == record["directions"]
