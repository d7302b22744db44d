"""Seed 004's mul-token accounting in `gsm8k` and `arithmetic-probes`: counted from the generated
ids whenever the tokenizer has the 45 mul tokens, absent otherwise; the probes' answer rule named."""

from __future__ import annotations

import json
import types

import pytest
import torch

from lmkit.data.tokenizers import AddedToken, GPT2Tokenizer
from lmkit.evaluation import generate, gsm8k, probes
from lmkit.evaluation.mul_usage import mul_token_ids
from lmkit.evaluation.task import EvalContext

from conftest import shared

# Written out by hand from SEEDS_SPEC §1.1 (not derived from lmkit.data.mul_tokens).
SIX_NINE = 50342  # <MUL_6_9_54>
TWO_THREE = 50304 + 9 + 1  # <MUL_2_3_6>: a = 1 has 9 facts, then (2, 2), (2, 3)
ONE_ONE = 50304  # <MUL_1_1_1>
NINE_NINE = 50348  # <MUL_9_9_81>


def _mul_strings_by_hand() -> list[tuple[str, int]]:
    out, i = [], 50304
    for a in range(1, 10):
        for b in range(a, 10):
            out.append((f"<MUL_{a}_{b}_{a * b}>", i))
            i += 1
    return out


@pytest.fixture(scope="session")
def gpt2_tokenizers():
    """``(plain, mul)``: GPT-2, and GPT-2 + 47 padding strings + the 45 mul strings (the
    ``mul_tokens`` condition's added tokens), built with ``add_tokens``."""
    plain = GPT2Tokenizer.from_files(shared("gpt2-tokenizer"))
    mul = GPT2Tokenizer(plain.mergeable_ranks)
    mul.add_tokens([AddedToken(f"<|padding_{i}|>", 50257 + i) for i in range(47)]
                   + [AddedToken(text, i) for text, i in _mul_strings_by_hand()])
    return plain, mul


def test_mul_token_ids_are_decided_by_the_tokenizers_added_tokens(gpt2_tokenizers):
    plain, mul = gpt2_tokenizers
    assert mul_token_ids(mul) == frozenset(range(50304, 50349))
    assert mul_token_ids(plain) == frozenset()
    assert mul_token_ids(types.SimpleNamespace()) == frozenset()
    # gpt2+mul has the ids in both conditions (the baseline encodes the strings as text, but a
    # generated mul id is still one): both conditions count
    from lmkit.data.tokenizer_mul import GPT2MulTokenizer

    for condition in ("baseline", "mul_tokens"):
        assert mul_token_ids(GPT2MulTokenizer(plain.mergeable_ranks, condition)) == frozenset(range(50304, 50349))
    # the padding strings alone (or a wrong string at a mul id) are not mul tokens
    odd = GPT2Tokenizer(plain.mergeable_ranks)
    odd.add_tokens([AddedToken("<|padding_0|>", 50257), AddedToken("<MUL_6_9_55>", SIX_NINE)])
    assert mul_token_ids(odd) == frozenset()


def _scripted(monkeypatch, rows: list[list[int]], seen: list | None = None) -> None:
    def fake(model, prompts, **kw):
        if seen is not None:
            seen.append(kw)
        return generate.Generation(tokens=[list(r) for r in rows], finish=["eos"] * len(rows),
                                   prompt_truncated=[False] * len(rows))

    monkeypatch.setattr(generate, "generate_ex", fake)


def _ctx(tok, tmp_path, data=None, **options) -> EvalContext:
    model = types.SimpleNamespace(config=types.SimpleNamespace(block_size=64))
    return EvalContext(model=model, tokenizer=tok, config=None, run_dir=tmp_path, device=torch.device("cpu"),
                       step=0, data=data, options=options)


def _gsm8k_file(tmp_path, golds: list[str]):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({"question": f"Q{i}", "answer": g}) + "\n" for i, g in enumerate(golds)))
    return path


def test_gsm8k_counts_generated_mul_ids(gpt2_tokenizers, tmp_path, monkeypatch):
    _, mul = gpt2_tokenizers
    enc = mul._encode_batch  # plain BPE: the mul-token STRING spelled out in ordinary tokens
    rows = [
        [SIX_NINE] + enc([" so #### 54"])[0],                         # 1 mul token
        enc([" 2*3"])[0] + [TWO_THREE, ONE_ONE, NINE_NINE],            # 3
        enc([" <MUL_6_9_54> #### 54"])[0],                             # 0: the text, not the id
        enc([" no idea"])[0],                                          # 0
    ]
    assert mul.decode(rows[2]) == " <MUL_6_9_54> #### 54" and SIX_NINE not in rows[2]
    _scripted(monkeypatch, rows)
    result = gsm8k.evaluate(_ctx(mul, tmp_path, _gsm8k_file(tmp_path, ["#### 54"] * 4)))
    assert result.metrics["mul_token_count"] == 4.0
    assert result.metrics["mul_tokens_per_response"] == 1.0
    assert [e["n_mul_tokens"] for e in result.details["examples"]] == [1, 3, 0, 0]
    assert result.details["mul_tokens_counted"] is True
    assert result.directions["mul_token_count"] == "neither"
    assert result.directions["mul_tokens_per_response"] == "neither"
    assert result.metrics["accuracy"] == 0.5  # rows 0 and 2 say #### 54


def test_gsm8k_without_mul_tokens_reports_no_counts(gpt2_tokenizers, tmp_path, monkeypatch):
    plain, _ = gpt2_tokenizers
    _scripted(monkeypatch, [[SIX_NINE, 11], [TWO_THREE]])  # ids in the mul range, but the tokenizer has none
    result = gsm8k.evaluate(_ctx(plain, tmp_path, _gsm8k_file(tmp_path, ["#### 1", "#### 2"])))
    assert "mul_token_count" not in result.metrics and "mul_tokens_per_response" not in result.metrics
    assert result.details["mul_tokens_counted"] is False
    assert "n_mul_tokens" not in result.details["examples"][0]


def _probe_rows(tok) -> list[list[int]]:
    """281 scripted responses: mul tokens on some table and multidigit probes, none on additions."""
    enc = tok._encode_batch
    rows = [enc([" 0."])[0] for _ in range(281)]  # no probe's answer is 0
    rows[0] = [ONE_ONE]                      # 1 x 1: the product 1 as a token
    rows[1] = enc([" 2 "])[0] + [TWO_THREE]  # 1 x 2: first number 2 (right); last number 6 inside the token
    rows[53] = [SIX_NINE, SIX_NINE]          # 6 x 9 = 54 (index 5*9 + 8)
    rows[81] = enc([" 273"])[0] + [NINE_NINE]  # 91 x 3 = 273
    return rows


def test_probes_count_mul_tokens_per_category(gpt2_tokenizers, tmp_path, monkeypatch):
    _, mul = gpt2_tokenizers
    _scripted(monkeypatch, _probe_rows(mul))
    result = probes.evaluate(_ctx(mul, tmp_path))
    assert result.metrics["total_mul_tokens"] == 5.0
    assert result.metrics["mul_tokens_per_probe"] == pytest.approx(5 / 281)
    cats = result.details["per_category"]
    assert (cats["mul_table"]["mul_tokens"], cats["mul_multidigit"]["mul_tokens"],
            cats["addition"]["mul_tokens"]) == (4, 1, 0)
    assert [r["n_mul_tokens"] for r in result.details["probes"][:2]] == [1, 1]
    # first_number: 1x1 (the token's product), 1x2, 6x9 and 91x3 right
    assert cats["mul_table"]["correct"] == 3 and cats["mul_multidigit"]["correct"] == 1
    assert result.details["extraction"] == "first_number"
    assert any(n.startswith("answers read with first_number") for n in result.notes)
    # answers taken from a token: probes 0 and 53 (product); probe 1 and 81 read plain digits first
    assert result.details["n_answers_from_mul_token"] == 2
    assert any("2 of 281 answers came from a mul-token string" in n for n in result.notes)
    assert result.directions["total_mul_tokens"] == "neither"


def test_probes_legacy_rule_is_named_and_inner_numbers_are_flagged(gpt2_tokenizers, tmp_path, monkeypatch):
    _, mul = gpt2_tokenizers
    _scripted(monkeypatch, _probe_rows(mul))
    result = probes.evaluate(_ctx(mul, tmp_path, legacy_last_number=True))
    assert result.details["extraction"] == "legacy_last_number"
    assert any(n.startswith("answers read with legacy_last_number") for n in result.notes)
    rows = result.details["probes"]
    # last number: "1" inside <MUL_1_1_1>, "6" inside <MUL_2_3_6> (wrong for 1x2), "54", "81" (wrong for 91x3)
    assert [r["prediction"] for r in (rows[0], rows[1], rows[53], rows[81])] == ["1", "6", "54", "81"]
    assert [r["answer_from_mul_token"] for r in (rows[0], rows[1], rows[53], rows[81], rows[2])] == \
        [True, True, True, True, False]
    assert result.details["n_answers_from_mul_token"] == 4
    assert any("4 of 281 answers came from a mul-token string: the number was inside" in n for n in result.notes)


def test_probes_without_mul_tokens_have_no_counts(gpt2_tokenizers, tmp_path, monkeypatch):
    plain, _ = gpt2_tokenizers
    _scripted(monkeypatch, _probe_rows(plain))
    result = probes.evaluate(_ctx(plain, tmp_path))
    assert "total_mul_tokens" not in result.metrics
    assert "mul_tokens" not in result.details["per_category"]["mul_table"]


@pytest.mark.parametrize(("response", "answer", "inside"), [
    (" <MUL_6_9_54>", "54", True),
    (" 6 <MUL_6_9_54>", "54", True),
    (" <MUL_6_9_54> and 3", "3", False),
    (" The answer is 7 <MUL_1_7_7>", "7", False),  # 'The answer is' wins, before the token
    ("  8", "8", False),
])
def test_legacy_span_tells_a_number_inside_a_mul_string(response, answer, inside):
    assert probes.read_answer(response, legacy_last_number=True) == (answer, inside)
    found = gsm8k.extract_answer_legacy_span(response)
    assert found[0] == answer and response[found[1]:found[2]] == answer
