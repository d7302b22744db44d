"""The head-ablation task: zeroing a head is removing its slice of the output projection's
input, the impact formula, the three accuracy metrics on a model whose answers are known,
and the scan's table, intervals and heatmap on constructed accuracies."""

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmkit.config import ModelConfig
from lmkit.data.arithmetic import ArithmeticExample, depth_labels, write_jsonl
from lmkit.data.arithmetic import evaluate as eval_expr
from lmkit.data.tokenizers import CharTokenizer
from lmkit.errors import ConfigError
from lmkit.evaluation import head_ablation as ha
from lmkit.evaluation.task import EvalContext
from lmkit.models import build_model

TOK = CharTokenizer()


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(n_layer=2, n_head=4, n_embd=32, d_ff=48, block_size=32, vocab_size=TOK.vocab_size, dropout=0.0,
                pos_encoding="rope")
    base.update(kw)
    return build_model(ModelConfig(**base), device="cpu").eval()


def ex(expr):
    return ArithmeticExample(expr, eval_expr(expr), depth_labels(expr))


@pytest.mark.parametrize("heads", [[(1, 2)], [(0, 1), (1, 3)], [(0, 0), (0, 3)]])
def test_zeroing_a_head_is_removing_its_columns_of_the_output_projection(heads):
    model = tiny()
    idx = torch.randint(4, TOK.vocab_size, (3, 12))
    with torch.no_grad():
        plain = model(idx)[0]
        with model.capture(edit_heads=ha.zero_heads(heads)):
            got = model(idx)[0]
        ref = copy.deepcopy(model)  # the independent reference: the projection without those input columns
        hd = 32 // 4
        for layer, head in heads:
            ref.transformer.h[layer].attn.c_proj.weight[:, head * hd:(head + 1) * hd] = 0
        want = ref(idx)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the ablation did change the output


def test_impact_formula():
    # SEEDS_SPEC 3.5's 10M finding: paren 0.92 -> 0.89, flat 0.96 unchanged -> +0.03
    assert ha.impact(0.92, 0.89, 0.96, 0.96) == pytest.approx(0.03)
    assert ha.impact(0.5, 0.3, 0.6, 0.5) == pytest.approx(0.1)  # paren drops 0.2, flat 0.1
    assert ha.impact(0.5, 0.5, 0.6, 0.4) == pytest.approx(-0.2)  # only flat suffers: negative


def test_parse_heads():
    assert ha.parse_heads("L0H2,l0-h3, L0H2", 4, 4) == [(0, 2), (0, 3)]
    for bad in ("L4H0", "L0H4", "head2", ""):
        with pytest.raises(ConfigError):
            ha.parse_heads(bad, 4, 4)


def rigged():
    """A GPT whose next-token argmax depends only on the current token: ' ' -> '4', '4' -> '2',
    '2' -> <EOS> (block outputs zeroed, one-hot embeddings, a hand-set untied head)."""
    model = tiny(n_embd=48, tie_embeddings=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")):
                p.zero_()
        model.transformer.wte.weight.zero_()
        model.transformer.wte.weight[:, :TOK.vocab_size] = torch.eye(TOK.vocab_size)
        model.lm_head.weight.zero_()
        sp, four, two = (TOK.encode(c)[0] for c in " 42")
        for src, dst in ((sp, four), (four, two), (two, TOK.eos_id)):
            model.lm_head.weight[dst, src] = 10.0
    return model


# answer 42 (all right), 4 (answer right, then '2' not <EOS>), 7 (wrong), 22 (wrong, but <EOS> after '2')
ITEMS = [ex("40+2"), ex("2+2"), ex("3+4"), ex("20+2"), ex("(1+1)*21")]
TF, LEGACY, EXACT = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1], [1, 0, 0, 0, 1]


@pytest.mark.parametrize("accuracy, want", [("teacher-forced", TF), ("legacy-eos", LEGACY), ("exact-match", EXACT)])
@pytest.mark.parametrize("batch_size", [2, 256])
def test_accuracy_metrics_on_a_model_with_known_answers(accuracy, want, batch_size):
    got = ha.item_correct(rigged(), TOK, ITEMS, accuracy, device=torch.device("cpu"), batch_size=batch_size)
    assert got.astype(int).tolist() == want


def test_teacher_forced_agrees_with_the_arithmetic_task():
    from lmkit.evaluation.arithmetic import teacher_forced

    for model in (rigged(), tiny(3)):
        all_ok, legacy = ha.teacher_forced_flags(model, TOK, ITEMS, device=torch.device("cpu"), batch_size=3)
        ref_all, ref_legacy = teacher_forced(model, TOK, ITEMS, block_size=32, device=torch.device("cpu"))
        assert all_ok.tolist() == ref_all and legacy.tolist() == ref_legacy


def _folder(tmp_path, flat, paren):
    for split, exprs in {"train": ["1+1"], "test_flat": flat, "test_paren": paren}.items():
        write_jsonl([ex(e) for e in exprs], tmp_path / f"pilot_{split}.jsonl")
    return tmp_path


def _ablated(edit, n_layer, n_head):
    if edit is None:
        return set()
    probe = torch.ones(1, n_head, 1, 1)
    return {(layer, h) for layer in range(n_layer) for h in range(n_head) if edit(layer, probe)[0, h, 0, 0] == 0}


def test_scan_on_constructed_accuracies(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "data", ["1+2", "3+4", "5+6", "7+8"], ["(1+2)", "(3+4)", "(5+6)", "(7+8)"])
    base = np.array([1, 1, 1, 0, 1, 1, 1, 1], dtype=bool)  # flat 0.75, paren 1.0

    def fake(model, tok, items, accuracy, *, device, edit=None, batch_size=256):
        assert accuracy == "teacher-forced" and len(items) == 8
        ok = base.copy()
        heads = _ablated(edit, 2, 2)
        if (0, 1) in heads:
            ok[[4, 5]] = False  # two paren items lost: impact +0.5
        if (1, 0) in heads:
            ok[0] = False  # one flat item lost: impact -0.25
        return ok

    monkeypatch.setattr(ha, "item_correct", fake)
    run_dir = tmp_path / "run"
    ctx = EvalContext(model=None, tokenizer=TOK, run_dir=run_dir, device=torch.device("cpu"), step=5, data=folder,
                      config=SimpleNamespace(model=SimpleNamespace(n_layer=2, n_head=2, block_size=32)),
                      options={"ablate_heads": "L0H1,L1H0"})
    res = ha.evaluate(ctx)
    m = {k.removeprefix("tf_"): v for k, v in res.metrics.items()}
    assert res.headline == "tf_top_impact" and "tf_base_acc_flat" in res.metrics and "n_heads" in res.metrics
    assert (m["base_acc_flat"], m["base_acc_paren"], m["base_paren_gap"]) == (0.75, 1.0, 0.25)
    rows = {r["name"]: r for r in res.details["heads"]}
    assert [r["name"] for r in res.details["heads"]][0] == "L0H1" and res.details["heads"][-1]["name"] == "L1H0"
    assert rows["L0H1"]["impact"] == pytest.approx(0.5) and rows["L0H1"]["acc_paren"] == 0.5
    assert rows["L0H1"]["gap"] == pytest.approx(-0.25) and rows["L0H1"]["drop_paren"] == 0.5
    assert rows["L1H0"]["impact"] == pytest.approx(-0.25) and rows["L1H0"]["drop_flat"] == 0.25
    assert rows["L0H0"]["impact"] == 0 and rows["L0H0"]["p_value"] == 1.0
    assert rows["L0H1"]["impact_low"] <= 0.5 <= rows["L0H1"]["impact_high"]
    assert m["top_impact"] == pytest.approx(0.5) and m["min_impact"] == pytest.approx(-0.25)
    assert m["n_heads"] == 4 and m["n_significant"] == 0  # 4 items per split: nothing survives Holm
    assert m["targeted_impact"] == pytest.approx(0.5 - 0.25)
    assert m["targeted_acc_flat"] == 0.5 and m["targeted_acc_paren"] == 0.5
    assert res.details["top5"][0] == "L0H1" and res.details["accuracy"] == "teacher-forced"
    assert any(n.startswith("accuracy teacher-forced") for n in res.notes)
    assert (run_dir / "eval" / "head-ablation" / "heatmap_teacher-forced.png").stat().st_size > 1000
    json.dumps(res.to_dict())  # the command writes it as JSON
    assert set(res.directions) == set(res.metrics)


def test_scan_end_to_end_on_a_tiny_model(tmp_path):
    folder = _folder(tmp_path / "data", ["1+2", "30*4"], ["(1+2)*3", "4-(5+6)"])
    ctx = EvalContext(model=tiny(), tokenizer=TOK, run_dir=tmp_path / "run", device=torch.device("cpu"), step=0,
                      data=folder, config=SimpleNamespace(model=SimpleNamespace(n_layer=2, n_head=4, block_size=32)),
                      options={"accuracy": "legacy-eos"})
    res = ha.evaluate(ctx)
    assert len(res.details["heads"]) == 8 and res.n_items == 4
    assert res.details["accuracy"] == "legacy-eos" and any("legacy-eos" in n for n in res.notes)
    assert res.headline == "legacy_top_impact" and "legacy_base_acc_paren" in res.metrics
    ctx.options = {"accuracy": "bogus"}
    with pytest.raises(ConfigError):
        ha.evaluate(ctx)


@pytest.mark.parametrize("task", ["head_ablation", "depth_probe"])
def test_a_tokenizer_without_bos_eos_is_a_one_line_error(tmp_path, task):
    import importlib

    from lmkit.errors import DataError

    module = importlib.import_module(f"lmkit.evaluation.{task}")
    ctx = EvalContext(model=None, tokenizer=SimpleNamespace(bos_id=None, eos_id=None, kind="byte"), run_dir=tmp_path,
                      device=torch.device("cpu"), step=0,
                      config=SimpleNamespace(model=SimpleNamespace(n_layer=2, n_head=2, block_size=32)))
    with pytest.raises(DataError, match="no <BOS>/<EOS>"):
        module.evaluate(ctx)
