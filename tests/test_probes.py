"""Seed 004's arithmetic probes: the 281 items exactly as the seed draws them, the answer
rules (first number; the seed's last-number rule), evaluate() and `lmkit eval` end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from gen_fixtures import shared_chat_run

from lmkit.evaluation.probes import (
    CATEGORIES,
    evaluate,
    first_number,
    generate_probes,
    predict,
    probes_sha256,
)
from lmkit.evaluation.task import EvalContext
from lmkit.runs import load_run


def test_counts_order_and_wording():
    probes = generate_probes()
    assert len(probes) == 281
    counts = {cat: sum(p.category == cat for p in probes) for cat in CATEGORIES}
    assert counts == {"mul_table": 81, "mul_multidigit": 100, "addition": 100}
    # 81 ordered table pairs (both 2x3 and 3x2), row-major
    table = [(p.a, p.b) for p in probes[:81]]
    assert table == [(a, b) for a in range(1, 10) for b in range(1, 10)]
    assert probes[0].question == "What is 1 times 1?" and probes[80].answer == "81"
    assert all(10 <= p.a <= 99 and 2 <= p.b <= 9 and p.question == f"What is {p.a} times {p.b}?"
               and p.answer == str(p.a * p.b) for p in probes[81:181])
    assert all(1 <= p.a <= 100 and 1 <= p.b <= 100 and p.question == f"What is {p.a} plus {p.b}?"
               and p.answer == str(p.a + p.b) for p in probes[181:])


def test_the_seed_draws_are_reproduced():
    probes = generate_probes()
    # random.seed(42) before each random set: the seed's first draws
    assert [(p.a, p.b) for p in probes[81:84]] == [(91, 3), (13, 6), (41, 5)]
    assert [(p.a, p.b) for p in probes[181:184]] == [(82, 15), (4, 95), (36, 32)]
    assert probes_sha256(probes) == "22ab38fc538f0b285192d85cde6e86790034e8b8b8b321258bb6c5cf36db9e18"


def test_generation_is_deterministic_and_leaves_the_global_random_state_alone():
    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    first = generate_probes()
    assert random.random() == expected_next
    assert generate_probes() == first


@pytest.mark.parametrize(("response", "first", "legacy"), [
    (" 42.", "42", "42"),
    (" 6. 6*9=54", "6", "54"),  # the seed's rule reads a later number
    (" 7. The answer is 8", "7", "8"),  # ... or a later "The answer is"
    (" 54 #### 12", "54", "12"),
    (" <MUL_6_9_54>", "54", "54"),  # a mul-token string is its product, not its first digit
    (" <MUL_6_9_54> and 3", "54", "3"),
    (" -3 degrees", "-3", "-3"),
    (" 1,234 in all", "1234", "234"),
    (" 12.50", "12.5", "12.5"),
    (" 18.0", "18", "18"),
    (" twelve", "", ""),
    ("", "", ""),
])
def test_answer_rules(response, first, legacy):
    assert predict(response) == first
    assert predict(response, legacy_last_number=True) == legacy


def test_first_number_raw():
    assert first_number("x 3,000 y") == "3000"
    assert first_number("none") is None


# --------------------------------------------------------------------------------------
# evaluate() and the CLI on a tiny model trained on probe-shaped dialogue
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return shared_chat_run(tmp_path_factory)


def _ctx(loaded, **kw) -> EvalContext:
    return EvalContext(model=loaded.model, tokenizer=loaded.tokenizer, config=loaded.config, run_dir=Path("."),
                       device=torch.device("cpu"), step=loaded.step, **kw)


def test_evaluate_reports_overall_and_per_category(run_dir):
    loaded = load_run(run_dir, "latest")
    result = evaluate(_ctx(loaded, batch_size=64))
    assert result.task == "arithmetic-probes" and result.n_items == 281 and result.headline == "accuracy"
    per_cat = result.details["per_category"]
    assert {cat: per_cat[cat]["total"] for cat in CATEGORIES} == {"mul_table": 81, "mul_multidigit": 100,
                                                                  "addition": 100}
    rows = result.details["probes"]
    assert len(rows) == 281
    for row in rows:
        assert row["prediction"] == predict(row["response"])
        assert row["correct"] == (row["prediction"] == row["answer"])
    correct = sum(r["correct"] for r in rows)
    assert result.metrics["accuracy"] == correct / 281
    for cat in CATEGORIES:
        assert result.metrics[f"acc_{cat}"] == per_cat[cat]["correct"] / per_cat[cat]["total"]
    assert result.details["extraction"] == "first_number" and result.notes[0].startswith("answers read with first_number")
    assert all(len(r["response"]) > 0 for r in rows)

    legacy = evaluate(_ctx(loaded, batch_size=64, limit=81, options={"legacy_last_number": True},
                           data=Path("ignored.jsonl")))
    assert any("is not used" in note for note in legacy.notes)
    assert legacy.n_items == 81 and set(legacy.details["per_category"]) == {"mul_table"}
    assert legacy.details["extraction"] == "legacy_last_number" and "LAST number" in legacy.notes[0]
    for row in legacy.details["probes"]:
        assert row["prediction"] == predict(row["response"], legacy_last_number=True)
    # same generations, only the reading differs
    assert [r["response"] for r in legacy.details["probes"]] == [r["response"] for r in rows[:81]]


def test_lmkit_eval_runs_the_probes_end_to_end(run_dir):
    from conftest import run_cli

    proc = run_cli("eval", str(run_dir), "--task", "arithmetic-probes", "--limit", "10", "--checkpoint", "latest",
                   "--json", cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((run_dir / "eval" / "arithmetic-probes.json").read_text())
    assert saved["task"] == "arithmetic-probes" and saved["n_items"] == 10
    assert saved["metrics"]["accuracy"] == sum(r["correct"] for r in saved["details"]["probes"]) / 10
    assert "arithmetic-probes" in proc.stdout
