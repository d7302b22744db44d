"""HellaSwag: acc vs acc_norm vs acc_norm_chars against scores computed here, row by row;
the harness preprocessing on real strings; the shared-context packing; truncation; data errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmkit.config import ModelConfig
from lmkit.data.tokenizers import CharTokenizer
from lmkit.errors import DataError
from lmkit.evaluation.hellaswag import (
    HellaSwagItem,
    evaluate,
    harness_context,
    hellaswag_metrics,
    load_items,
    preprocess,
    score_items,
)
from lmkit.evaluation.task import EvalContext
from lmkit.models.gpt import GPT

from conftest import shared

CPU = torch.device("cpu")


def _gpt(vocab: int, block_size: int = 128, pos: str = "learned", seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, d_ff=64, block_size=block_size, vocab_size=vocab,
                           pos_encoding=pos, dropout=0.0)).eval()


@torch.no_grad()
def _loglik(model, tok, context: str, continuation: str) -> tuple[float, int]:
    """log p(continuation | context) from one plain forward pass over context + continuation."""
    ctx_ids, cont_ids = tok.encode(context), tok.encode(continuation)
    ids = ctx_ids + cont_ids
    logits, _ = model(torch.tensor([ids[:-1]]))
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    first = len(ctx_ids) - 1
    return sum(float(logp[first + i, t]) for i, t in enumerate(cont_ids)), len(cont_ids)


# Real HellaSwag-like rows with very unequal ending lengths, so that the summed and the
# per-token log-likelihoods can prefer different endings.
CANDIDATES = [
    ("Baking cookies", "A woman puts flour in a bowl.", "she",
     ["mixes.", "adds two eggs and stirs the batter slowly with a wooden spoon.",
      "pours the batter onto a tray and slides it into the hot oven.", "walks away from the kitchen table."]),
    ("Washing a car", "A man sprays the car with a hose.", "he",
     ["dries.", "scrubs the doors with a big yellow sponge and soapy water.",
      "rinses the roof and the windows until they shine in the sun.", "drives off down the road."]),
    ("Playing guitar", "A boy sits on a chair holding a guitar.", "the boy",
     ["sings.", "strums a few chords and then tunes the strings carefully.",
      "plays a song while tapping his foot along to the beat.", "puts the guitar down on the floor."]),
    ("Walking the dog", "A girl clips a leash onto a dog.", "the dog",
     ["barks.", "pulls her down the sidewalk toward the park at the corner.",
      "sniffs the grass and wags its tail at a passing cyclist.", "sits down and refuses to move."]),
    ("Painting a fence", "Two men stand by a wooden fence with buckets.", "they",
     ["paint.", "dip their brushes and paint the boards white from top to bottom.",
      "argue about the colour and then start on opposite ends.", "leave the buckets in the shed."]),
]


def _alphabet() -> str:
    text = "".join(a + ": " + c + " " + b + b.capitalize() + " ".join(e) for a, c, b, e in CANDIDATES)
    return "".join(sorted(set(text)))


def test_acc_and_acc_norm_disagree_on_a_hand_made_file(tmp_path):
    tok = CharTokenizer(_alphabet())
    model = _gpt(tok.vocab_size)
    rows = []
    for activity, ctx_a, ctx_b, endings in CANDIDATES:
        ctx = f"{ctx_a} {ctx_b}"
        scored = [_loglik(model, tok, ctx, " " + e) for e in endings]
        by_sum = int(np.argmax([s for s, _ in scored]))
        by_mean = int(np.argmax([s / n for s, n in scored]))
        if by_sum != by_mean:  # keep items where the two normalisations pick different endings
            harness = [_loglik(model, tok, f"{activity}: {ctx_a} {ctx_b.capitalize()}", " " + e)[0] / len(e)
                       for e in endings]
            rows.append({"ind": len(rows), "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
                         "endings": endings, "label": str(by_sum), "_by_mean": by_mean,
                         "_by_chars": int(np.argmax(harness))})
        if len(rows) == 2:
            break
    assert len(rows) == 2, "the candidates no longer give two items where acc and acc_norm disagree"
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n" for r in rows))

    ctx = EvalContext(model=model, tokenizer=tok, config=SimpleNamespace(model=SimpleNamespace(block_size=128)),
                      run_dir=tmp_path, device=CPU, step=0, data=path, batch_size=1)
    result = evaluate(ctx)
    # gold = the ending with the largest summed log-likelihood: acc is right on both, acc_norm on neither
    assert result.metrics["acc"] == 1.0
    assert result.metrics["acc_norm"] == 0.0
    expected_chars = np.mean([r["_by_chars"] == int(r["label"]) for r in rows])
    assert result.metrics["acc_norm_chars"] == expected_chars
    assert result.n_items == 2 and result.headline == "acc_norm" and len(result.data_sha256) == 64
    assert [e["pred_acc_norm"] for e in result.details["examples"]] == [r["_by_mean"] for r in rows]
    assert not result.notes  # ctx_a/ctx_b present, nothing truncated


def test_harness_preprocessing_on_real_strings():
    items, _, _ = load_items(shared("hellaswag", "hellaswag_val.jsonl"))
    roof = items[0]
    assert roof.ctx == "A man is sitting on a roof. he"
    # the local file has no ctx_a/ctx_b: the context is used as it is
    assert harness_context(roof) == "Roof shingle removal: A man is sitting on a roof. he"
    # with the hub's columns, ctx_b is capitalised (lm-evaluation-harness _process_doc)
    hub_row = HellaSwagItem(ctx=roof.ctx, endings=roof.endings, label=roof.label, activity_label=roof.activity_label,
                            ctx_a="A man is sitting on a roof.", ctx_b="he")
    assert harness_context(hub_row) == "Roof shingle removal: A man is sitting on a roof. He"

    toddler = next(it for it in items if "[www.kiddio.org]" in it.ctx)
    assert "Visit a site like to find loads" in harness_context(toddler)  # tag removed, double space collapsed
    pixie = next(it for it in items if "[style a pixie cut | pixie cut]" in it.ctx)
    assert "A can provide short straight hair" in harness_context(pixie)
    # the raw hub form of WikiHow rows: " [title]" becomes ". ", other tags vanish; strip() runs first, so a
    # leading tag leaves a leading space, exactly as the harness does
    assert preprocess("[header] How to make a paper airplane [title] Fold the paper in half. [step] Crease it.") \
        == " How to make a paper airplane. Fold the paper in half. Crease it."
    assert preprocess("  plain text stays  ") == "plain text stays"


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_shared_context_packing_equals_one_row_per_ending(pos, monkeypatch):
    from lmkit.data.tokenizers import GPT2Tokenizer

    monkeypatch.setenv("LMKIT_GPT2_DIR", str(shared("gpt2-tokenizer")))
    tok = GPT2Tokenizer.load_default()
    items, _, _ = load_items(shared("hellaswag", "hellaswag_val.jsonl"), limit=24)
    model = _gpt(tok.vocab_size, block_size=256, pos=pos)
    packed = score_items(model, tok, items, block_size=256, device=CPU, pack=True, items_per_pass=8)
    rows = score_items(model, tok, items, block_size=256, device=CPU, pack=False, items_per_pass=8)
    for a, b in zip(packed, rows, strict=True):
        np.testing.assert_allclose(a.logprob, b.logprob, atol=1e-3)
        np.testing.assert_allclose(a.logprob_harness, b.logprob_harness, atol=1e-3)
        assert (a.n_tokens == b.n_tokens).all()
    assert hellaswag_metrics(items, packed) == hellaswag_metrics(items, rows)
    # and one ending scored by hand
    s, n = _loglik(model, tok, items[3].ctx, " " + items[3].endings[2])
    assert packed[3].logprob[2] == pytest.approx(s, abs=1e-3) and packed[3].n_tokens[2] == n


def test_long_items_are_truncated_from_the_left_and_reported(tmp_path, monkeypatch):
    from lmkit.data.tokenizers import GPT2Tokenizer

    monkeypatch.setenv("LMKIT_GPT2_DIR", str(shared("gpt2-tokenizer")))
    tok = GPT2Tokenizer.load_default()
    model = _gpt(tok.vocab_size, block_size=48)
    ctx = EvalContext(model=model, tokenizer=tok, config=SimpleNamespace(model=SimpleNamespace(block_size=48)),
                      run_dir=tmp_path, device=CPU, step=0, data=shared("hellaswag", "hellaswag_val.jsonl"),
                      limit=40)
    result = evaluate(ctx)
    assert result.n_items == 40 and 0 < result.details["n_truncated"] <= 40
    assert any("truncated from the left" in n for n in result.notes)
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())


def test_bad_rows_and_no_hub_are_one_line_errors(tmp_path, hub_offline):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"ctx": "a", "endings": ["x", "y", "z", "w"], "label": "1"}) + "\n"
                   + json.dumps({"ctx": "a", "endings": ["x", "y"], "label": "0"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected 4 endings"):
        load_items(bad)
    with pytest.raises(DataError, match=r"Rowan/hellaswag.*no network and no cached copy.*--data") as info:
        load_items(None, limit=5)
    assert "\n" not in str(info.value)
