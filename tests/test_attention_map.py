"""The attention task: bracket pairs, probabilities (causal, rows summing to 1, the same as
softmax(q k^T / sqrt(d)) computed by hand for layer 0), the grid PNG and the matching number."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmkit.config import ModelConfig
from lmkit.data.tokenizers import CharTokenizer
from lmkit.errors import ConfigError
from lmkit.evaluation import attention_map as am
from lmkit.evaluation.task import EvalContext

TOK = CharTokenizer()


def ctx_for(tmp_path, **options):
    from lmkit.models import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, d_ff=32, block_size=32, vocab_size=TOK.vocab_size,
                      dropout=0.0, pos_encoding="learned")
    return EvalContext(model=build_model(cfg, device="cpu").eval(), tokenizer=TOK, run_dir=tmp_path / "run",
                       device=torch.device("cpu"), step=7, config=SimpleNamespace(model=cfg), options=options)


def test_matching_brackets():
    assert am.matching_brackets("(1+(2*3))") == [(7, 3), (8, 0)]
    assert am.matching_brackets("1+2)") == []
    assert am.matching_brackets("(1+2)*(3)") == [(4, 0), (8, 6)]


def test_probabilities_are_the_attention_of_layer_0_by_hand(tmp_path):
    ctx = ctx_for(tmp_path)
    labels, probs = am.attention_probs(ctx, "(1+2) = ")
    assert labels == ["BOS", "(", "1", "+", "2", ")", "␣", "=", "␣"]
    T = len(labels)
    assert probs.shape == (2, 2, T, T)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(probs, k=1) == 0)  # causal
    model = ctx.model
    ids = torch.tensor([[TOK.bos_id, *TOK.encode("(1+2) = ")]])
    with torch.no_grad():  # learned positions: layer 0 sees ln_1(wte + wpe)
        x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(T))
        q, k, _ = model.transformer.h[0].attn.c_attn(model.transformer.h[0].ln_1(x)).split(16, dim=2)
        q, k = (t.view(1, T, 2, 8).transpose(1, 2) for t in (q, k))
        scores = (q @ k.transpose(-2, -1)) / np.sqrt(8)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        want = torch.softmax(scores, -1)[0].numpy()
    np.testing.assert_allclose(probs[0], want, atol=1e-5)


def test_task_writes_the_grid_and_the_matching_number(tmp_path):
    ctx = ctx_for(tmp_path)
    res = am.evaluate(ctx)  # default expression (1+(2*3))
    png = tmp_path / "run" / "eval" / "attention" / "00_L1pL2x3RR.png"
    assert res.details["files"] == [str(png)] and png.stat().st_size > 5000
    _, probs = am.attention_probs(ctx, "(1+(2*3)) = ")
    # queries ')' at characters 7 and 8 (positions 8, 9 after <BOS>) -> keys '(' at 3 and 0 (positions 4, 1)
    want = (probs[:, :, 8, 4] + probs[:, :, 9, 1]) / 2
    assert res.details["match_attn"]["L1H0"] == pytest.approx(float(want[1, 0]), abs=1e-6)
    assert res.metrics["match_attn_best"] == pytest.approx(float(want.max()), abs=1e-6)
    assert res.metrics["match_attn_uniform"] == pytest.approx((1 / 9 + 1 / 10) / 2)
    assert res.metrics["n_closing_brackets"] == 2


def test_bad_expressions_are_one_line_errors(tmp_path):
    ctx = ctx_for(tmp_path, expr=["(1+x)"])
    with pytest.raises(ConfigError, match="outside"):
        am.evaluate(ctx)
    ctx.options = {"expr": ["1+" * 20 + "1"]}
    with pytest.raises(ConfigError, match="block_size"):
        am.evaluate(ctx)
