"""The depth-probe task: labels, features at the right positions (against a hand-run forward),
the probe against the majority baseline on synthetic features, and the task end to end."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmkit.config import ModelConfig
from lmkit.data.arithmetic import ArithmeticExample, depth_labels, write_jsonl
from lmkit.data.arithmetic import evaluate as eval_expr
from lmkit.data.tokenizers import CharTokenizer
from lmkit.evaluation import depth_probe as dp
from lmkit.evaluation.task import EvalContext
from lmkit.models import build_model

TOK = CharTokenizer()
EXPRS = ["(1+(2*3))", "((4+5))*6", "7+(8-9)"]


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, d_ff=32, block_size=32, vocab_size=TOK.vocab_size,
                      dropout=0.0, pos_encoding="rope")
    return build_model(cfg, device="cpu").eval()


def test_labels_of_the_spec_example():
    labels = dp.probe_labels("(1+(2*3))")
    assert labels["multi"] == [1, 1, 1, 2, 2, 2, 2, 1, 0]
    assert labels["binary"] == [1, 1, 1, 1, 1, 1, 1, 1, 0]


def test_features_are_the_residual_stream_and_head_outputs_at_the_characters():
    model = tiny()
    resid, heads = dp.probe_features(model, TOK, EXPRS, device=torch.device("cpu"), heads=True, batch_size=2)
    assert len(resid) == 2 and resid[0].shape == (sum(map(len, EXPRS)), 16) and heads[1].shape == (25, 2, 8)
    row = 0
    with torch.no_grad():
        for expr in EXPRS:  # the reference: each expression alone, the blocks run by hand
            ids = torch.tensor([[TOK.bos_id, *TOK.encode(expr), TOK.eos_id]])
            x = model.transformer.wte(ids)
            rope = model.rotary(ids.shape[1])
            with model.capture(heads=True) as cap:
                for layer, block in enumerate(model.transformer.h):
                    x = block(x, rope, None, None, layer)
                    n = len(expr)
                    np.testing.assert_allclose(resid[layer][row:row + n], x[0, 1:n + 1].numpy(), atol=1e-5)
            for layer in range(2):
                want = cap.heads[layer][0].transpose(0, 1)[1:len(expr) + 1]  # (n, H, hd)
                np.testing.assert_allclose(heads[layer][row:row + len(expr)], want.numpy(), atol=1e-5)
            row += len(expr)


def _depth_data(n_expr, seed):
    from lmkit.config import ArithmeticConfig
    from lmkit.data.arithmetic import generate_arithmetic

    exprs = [e.expr for e in generate_arithmetic(ArithmeticConfig(seed=seed, n_train=n_expr, n_val=1,
                                                                  n_test_flat=1, n_test_paren=1))["train"]
             if "(" in e.expr]
    return np.concatenate([dp.probe_labels(e)["multi"] for e in exprs])


@pytest.mark.parametrize("label", ["binary", "multi"])
def test_probe_beats_the_majority_baseline_on_depth_features_and_not_on_noise(label):
    rng = np.random.default_rng(0)
    y_train, y_test = _depth_data(300, 1), _depth_data(100, 2)
    if label == "binary":
        y_train, y_test = (y_train > 0).astype(int), (y_test > 0).astype(int)

    def encode(y):  # a noisy one-hot of the depth in 3 of 8 dimensions
        x = rng.normal(size=(len(y), 8))
        x[np.arange(len(y)), y] += 2.0
        return x

    good = dp.fit_probe(encode(y_train), y_train, encode(y_test), y_test)
    assert good["test_acc"] > good["baseline_test"] + 0.1 and good["converged"]
    noise = dp.fit_probe(rng.normal(size=(len(y_train), 8)), y_train, rng.normal(size=(len(y_test), 8)), y_test)
    assert noise["test_acc"] <= noise["baseline_test"] + 0.02
    values, counts = np.unique(y_train, return_counts=True)
    assert noise["majority_class"] == values[np.argmax(counts)]
    assert noise["baseline_test"] == pytest.approx(np.mean(y_test == noise["majority_class"]))
    assert (good["n_train"], good["n_test"]) == (len(y_train), len(y_test))


def test_task_end_to_end(tmp_path):
    for split, exprs in {"train": [*EXPRS, "1+2", "(3*4)-5", "6*(7+8)"], "test_paren": ["(9+1)*2", "3-(4*5)"],
                         "test_flat": ["1+1"]}.items():
        write_jsonl([ArithmeticExample(e, eval_expr(e), depth_labels(e)) for e in exprs],
                    tmp_path / f"pilot_{split}.jsonl")
    ctx = EvalContext(model=tiny(), tokenizer=TOK, run_dir=tmp_path / "run", device=torch.device("cpu"), step=3,
                      data=tmp_path, config=SimpleNamespace(model=SimpleNamespace(block_size=32)),
                      options={"probe_heads": True})
    res = dp.evaluate(ctx)
    m = res.metrics
    assert m["n_train_positions"] == sum(len(e) for e in [*EXPRS, "(3*4)-5", "6*(7+8)"])  # flat "1+2" skipped
    assert m["n_test_positions"] == 14
    assert {"binary_acc_resid_L0", "multi_acc_resid_L1", "binary_baseline", "binary_acc_head_best"} <= set(m)
    assert res.headline == "binary_acc_resid_best"
    heads = [p for p in res.details["probes"] if p["features"] == "head"]
    assert len(heads) == 2 * 2 * 2  # layers x heads x label kinds
    assert (tmp_path / "run" / "eval" / "depth-probe" / "probe.png").stat().st_size > 1000


def test_majority_baseline_is_the_train_splits_majority_scored_on_each_split():
    x = np.zeros((10, 2))
    y_train = np.array([0] * 7 + [1] * 3)
    y_test = np.array([0] * 2 + [1] * 8)  # the test split's own majority would be 1
    rec = dp.fit_probe(x, y_train, x, y_test)
    assert rec["majority_class"] == 0
    assert (rec["baseline_train"], rec["baseline_test"]) == (0.7, 0.2)
