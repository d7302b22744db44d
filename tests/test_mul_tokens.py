"""The multiplication-fact tokens: the 45 ids and strings, the injection rule in both modes, the drills.

References are transcriptions: the id layout and the examples of the injection rule from the
experiment's description (zhengpu-berkeley/domain-token-gpt2: tokenizer/mul_facts.py,
tokenizer/inject_mul.py and its tests/test_inject_mul.py), and the SHA-256 of the drill block as
the experiment's own ``generate_synthetic_math_data(42)`` (data/prepare_fineweb_pilot.py) prints it.
"""

from __future__ import annotations

import hashlib

import pytest

from lmkit.data import mul_tokens as mt
from lmkit.data.synthetic import synthetic_drills, synthetic_lines

# The 45 strings in id order 50304..50348, typed out (row-major, a <= b).
SPEC_ORDER = """
<MUL_1_1_1> <MUL_1_2_2> <MUL_1_3_3> <MUL_1_4_4> <MUL_1_5_5> <MUL_1_6_6> <MUL_1_7_7> <MUL_1_8_8> <MUL_1_9_9>
<MUL_2_2_4> <MUL_2_3_6> <MUL_2_4_8> <MUL_2_5_10> <MUL_2_6_12> <MUL_2_7_14> <MUL_2_8_16> <MUL_2_9_18>
<MUL_3_3_9> <MUL_3_4_12> <MUL_3_5_15> <MUL_3_6_18> <MUL_3_7_21> <MUL_3_8_24> <MUL_3_9_27>
<MUL_4_4_16> <MUL_4_5_20> <MUL_4_6_24> <MUL_4_7_28> <MUL_4_8_32> <MUL_4_9_36>
<MUL_5_5_25> <MUL_5_6_30> <MUL_5_7_35> <MUL_5_8_40> <MUL_5_9_45>
<MUL_6_6_36> <MUL_6_7_42> <MUL_6_8_48> <MUL_6_9_54>
<MUL_7_7_49> <MUL_7_8_56> <MUL_7_9_63>
<MUL_8_8_64> <MUL_8_9_72>
<MUL_9_9_81>
""".split()


def test_the_45_ids_and_strings_in_the_spec_order():
    assert len(SPEC_ORDER) == 45
    assert list(mt.mul_strings()) == SPEC_ORDER
    assert list(mt.mul_strings().values()) == list(range(50304, 50349))
    assert [f"<MUL_{a}_{b}_{c}>" for a, b, c in mt.mul_facts()] == SPEC_ORDER
    assert mt.mul_token_id(6, 9) == mt.mul_token_id(9, 6) == 50342  # the spec's worked example
    assert mt.mul_token_string(9, 6) == "<MUL_6_9_54>"
    assert mt.mul_token_id(1, 1) == mt.MUL_FIRST_ID == 50304 and mt.mul_token_id(9, 9) == 50348
    assert mt.MUL_VOCAB_SIZE == 50349 and list(mt.MUL_IDS) == list(range(50304, 50349))
    assert list(mt.PADDING_IDS) == list(range(50257, 50304)) and len(mt.PADDING_IDS) == 47
    assert mt.padding_token_string(0) == "<|padding_0|>" and mt.padding_token_string(46) == "<|padding_46|>"
    assert mt.is_mul_id(50304) and mt.is_mul_id(50348) and not mt.is_mul_id(50303) and not mt.is_mul_id(50349)
    assert mt.count_mul_ids([1, 50303, 50304, 50342, 50349]) == 2
    with pytest.raises(ValueError, match="1..9"):
        mt.mul_token_id(0, 5)


# (text, default result, legacy result): the spec's examples (section 1.2) and the original's unit tests.
EXAMPLES = [
    ("6*9=54", "<MUL_6_9_54>", "<MUL_6_9_54>"),
    ("9 × 6", "<MUL_6_9_54>", "<MUL_6_9_54>"),
    ("3x4", "<MUL_3_4_12>", "<MUL_3_4_12>"),
    ("6*9=55", "6*9=55", "6*9=55"),
    ("10*5", "10*5", "10*5"),
    ("15*20=300", "15*20=300", "15*20=300"),
    ("106*3", "106*3", "1<MUL_3_6_18>"),
    ("2.5*3", "2.5*3", "2.<MUL_3_5_15>"),
    ("9 * 2 = <<9*2=18>>18", "<MUL_2_9_18> = <<<MUL_2_9_18>>>18", "<MUL_2_9_18> = <<<MUL_2_9_18>>>18"),
    ("6 * 9 = 54", "<MUL_6_9_54>", "<MUL_6_9_54>"),
    ("6  *  9", "<MUL_6_9_54>", "<MUL_6_9_54>"),
    ("3×4=12", "<MUL_3_4_12>", "<MUL_3_4_12>"),
    ("3 x 4", "<MUL_3_4_12>", "<MUL_3_4_12>"),
    ("2xy", "2xy", "2xy"),
    ("solve for 2x", "solve for 2x", "solve for 2x"),
    ("0*5", "0*5", "0*5"),
    ("Calculate 6*9 and 3*4.", "Calculate <MUL_6_9_54> and <MUL_3_4_12>.", "Calculate <MUL_6_9_54> and <MUL_3_4_12>."),
    ("The product of 6*9 is 54.", "The product of <MUL_6_9_54> is 54.", "The product of <MUL_6_9_54> is 54."),
    ("Valid: 6*9, Invalid: 10*5, Wrong: 3*4=15", "Valid: <MUL_6_9_54>, Invalid: 10*5, Wrong: 3*4=15",
     "Valid: <MUL_6_9_54>, Invalid: 10*5, Wrong: 3*4=15"),
    # lmkit's guards also keep decimals on the right whole
    ("3*2.5", "3*2.5", "<MUL_2_3_6>.5"),
    ("6*9=54.5", "6*9=54.5", "<MUL_6_9_54>.5"),
    # ... and digit groups (thousands separators) on both sides; a comma + space is punctuation
    ("3 x 4,000 people", "3 x 4,000 people", "<MUL_3_4_12>,000 people"),
    ("2 x 1,500 = 3,000", "2 x 1,500 = 3,000", "<MUL_1_2_2>,500 = 3,000"),
    ("2 * 3 = 6,000", "2 * 3 = 6,000", "<MUL_2_3_6>,000"),
    ("1,2*3", "1,2*3", "1,<MUL_2_3_6>"),
    ("1,234*5", "1,234*5", "1,234*5"),
    ("2*3=6, yes", "<MUL_2_3_6>, yes", "<MUL_2_3_6>, yes"),
    ("1, 2*3", "1, <MUL_2_3_6>", "1, <MUL_2_3_6>"),
]


@pytest.mark.parametrize("legacy", [False, True], ids=["guarded", "legacy"])
@pytest.mark.parametrize(("text", "guarded", "legacy_out"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_injection_examples_in_both_modes(text, guarded, legacy_out, legacy):
    expected = legacy_out if legacy else guarded
    assert mt.inject(text, legacy_regex=legacy) == expected


@pytest.mark.parametrize("legacy", [False, True])
def test_segments_keep_the_original_text_of_every_mul_token(legacy):
    text = "9 * 2 = <<9*2=18>>18 and 6 × 9, <MUL_3_4_12> here, 106*3 too"
    segments = mt.inject_segments(text, legacy_regex=legacy)
    assert "".join(s if isinstance(s, str) else s[1] for s in segments) == text
    pairs = [s for s in segments if not isinstance(s, str)]
    expected = [(50320, "9 * 2"), (50320, "9*2=18"), (50342, "6 × 9"), (50322, "<MUL_3_4_12>")]
    assert pairs == (expected + [(50324, "06*3")] if legacy else expected)
    assert all(not (isinstance(a, str) and isinstance(b, str)) for a, b in zip(segments, segments[1:], strict=False))


def test_synthetic_drills_are_the_experiments_block():
    text = synthetic_drills(42)
    # generate_synthetic_math_data(42) of data/prepare_fineweb_pilot.py: 19,224 characters, this hash
    assert len(text) == 19224
    assert hashlib.sha256(text.encode()).hexdigest() == (
        "db2c2c56a1184f996401c6c9bcdc27de751409255fa32881a129799a821c93b1")
    lines = synthetic_lines(42)
    assert lines[:4] == ["\n\n=== Multiplication Tables ===\n", "1 times 1 equals 1.", "1*1=1", "1 × 1 = 1"]
    assert "If you have 4 boxes with 2 balls each, you have 4*2=8 balls in total." in lines
    assert lines[-1] == "8 × 8 = 64"
    assert sum(line.startswith("If you have") for line in lines) == 200
    assert synthetic_drills(7) != text
