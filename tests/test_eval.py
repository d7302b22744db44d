"""lmkit eval: bits per byte by hand, seed 000's arithmetic metrics (and its legacy EOS bug),
result files with their provenance, checkpoint sweeps, errors."""

from __future__ import annotations

import json
import shutil
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmkit.config import ModelConfig, build_run_config
from lmkit.data.arithmetic import ArithmeticExample, depth_labels, write_jsonl
from lmkit.data.arithmetic import evaluate as eval_expr
from lmkit.data.tokenizers import CharTokenizer
from lmkit.errors import ConfigError
from lmkit.evaluation.perplexity import loss_sums, token_byte_lengths
from lmkit.evaluation.task import EvalContext
from lmkit.models.gpt import GPT

from conftest import TINY_PRESET, run_cli, shared


@pytest.fixture(scope="module")
def arith_run(tmp_path_factory):
    """A tiny arithmetic run (40 steps, checkpoints at 10..40) trained once for the module."""
    from lmkit.training.loop import train

    root = tmp_path_factory.mktemp("eval")
    preset = root / "tiny.yaml"
    preset.write_text(TINY_PRESET.format(pos="rope", steps=40, eval_interval=20, ckpt_interval=20))
    summary = train(build_run_config(str(preset), [], {"out_dir": ("--out-dir", str(root / "runs")),
                                                       "name": ("--name", "r")}))
    return root, root / "runs" / "r", summary


# ------------------------------------------------------------------------------ bits per byte


def test_bpb_by_hand_on_three_tokens():
    """x = <BOS> a é, y = a é <EOS>: 'a' is 1 byte, 'é' 2 bytes, <EOS> 0 bytes (and 0 nats)."""
    tok = CharTokenizer("aé")
    a, e_acute = tok.encode("aé")
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, d_ff=16, block_size=4, vocab_size=tok.vocab_size,
                            dropout=0.0)).eval()
    x = np.array([[tok.bos_id, a, e_acute]])
    y = np.array([[a, e_acute, tok.eos_id]])
    table = token_byte_lengths(tok)
    assert table[a] == 1 and table[e_acute] == 2 and table[tok.eos_id] == table[tok.bos_id] == table[tok.pad_id] == 0

    with torch.no_grad():
        logits, _ = model(torch.from_numpy(x))
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    ce = [-float(logp[t, int(y[0, t])]) for t in range(3)]
    expected_bpb = (ce[0] + ce[1]) / (math.log(2) * (1 + 2))

    sums = loss_sums(model, [(x, y)], table, torch.device("cpu"))
    assert sums.n_tokens == 3 and sums.n_bytes == 3
    assert sums.mean_loss == pytest.approx(sum(ce) / 3, rel=1e-5)
    assert sums.bpb == pytest.approx(expected_bpb, rel=1e-5)
    # ignored targets count neither nats nor bytes
    y_ignored = np.array([[a, -100, tok.eos_id]])
    part = loss_sums(model, [(x, y_ignored)], table, torch.device("cpu"))
    assert part.n_bytes == 1 and part.bpb == pytest.approx(ce[0] / math.log(2), rel=1e-5)


def test_bpb_drops_only_special_targets_that_stand_for_no_text():
    """Per-target byte counts: a text token with 0 bytes (a piece of a character another
    piece already counted) still costs its nats; a separator (special, 0 bytes) does not;
    a special token that was in the text (bytes > 0) counts both."""
    tok = CharTokenizer("ab")
    a, b = tok.encode("ab")
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, d_ff=16, block_size=4, vocab_size=tok.vocab_size,
                            dropout=0.0)).eval()
    x = np.array([[tok.bos_id, a, b, a]])
    y = np.array([[a, b, tok.eos_id, tok.eos_id]])
    y_bytes = np.array([[1, 0, 0, 5]])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.from_numpy(x))[0][0].double(), dim=-1)
    ce = [-float(logp[t, int(y[0, t])]) for t in range(4)]
    special = np.zeros(tok.vocab_size, dtype=bool)
    special[[tok.pad_id, tok.bos_id, tok.eos_id]] = True
    sums = loss_sums(model, [(x, y, y_bytes)], None, torch.device("cpu"), special=special)
    assert sums.n_bytes == 6 and sums.n_tokens == 4
    assert sums.bpb_nats == pytest.approx(ce[0] + ce[1] + ce[3], rel=1e-6)
    assert sums.bpb == pytest.approx((ce[0] + ce[1] + ce[3]) / (math.log(2) * 6), rel=1e-6)


def test_gpt2_byte_table_uses_raw_token_bytes(monkeypatch):
    """A GPT-2 token holding half of a UTF-8 character has 1 byte, not the 3 bytes of U+FFFD."""
    from lmkit.data.tokenizers import GPT2Tokenizer

    monkeypatch.setenv("LMKIT_GPT2_DIR", str(shared("gpt2-tokenizer")))
    tok = GPT2Tokenizer.load_default()
    table = token_byte_lengths(tok)
    half = tok.enc.encode_single_token(b"\xc3")
    assert len(tok.decode([half]).encode("utf-8")) == 3  # what decode-based tables would count
    assert table[half] == 1
    assert table[tok.enc.encode_single_token(b" the")] == 4
    assert table[tok.eos_id] == 0 and len(table) == 50257


# ------------------------------------------------------------------------------ arithmetic


class SevenThenEOS(torch.nn.Module):
    """A stand-in model whose logits depend only on the last input token: after the space
    of ``" = "`` it predicts '7', after anything else <EOS>. So it always predicts <EOS>
    after the true answer (seed 000's metric: 100%) but answers 7 to everything."""

    def __init__(self, tok: CharTokenizer):
        super().__init__()
        self.config = SimpleNamespace(block_size=32)
        self.transformer = torch.nn.ModuleDict({"h": torch.nn.ModuleList()})
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        table = torch.full((tok.vocab_size, tok.vocab_size), -5.0)
        table[:, tok.eos_id] = 5.0
        table[tok.encode(" ")[0]] = -5.0
        table[tok.encode(" ")[0], tok.encode("7")[0]] = 5.0
        self.register_buffer("table", table)

    def forward(self, idx, targets=None, *, last_only=False, position_ids=None, attn_mask=None, kv_cache=None):
        logits = self.table[idx]
        return (logits[:, -1:] if last_only else logits), None


def _seed_files(folder, exprs_by_split):
    for split, exprs in exprs_by_split.items():
        write_jsonl([ArithmeticExample(e, eval_expr(e), depth_labels(e)) for e in exprs],
                    folder / f"pilot_{split}.jsonl")
    return folder


def test_legacy_eos_metric_differs_from_exact_match(tmp_path):
    from lmkit.evaluation.arithmetic import evaluate

    tok = CharTokenizer()
    folder = _seed_files(tmp_path, {"train": ["1+1"], "val": ["2*3", "10-1", "(4+4)*2"],
                                    "test_flat": ["5+6", "9*9"], "test_paren": ["(1+2)*3", "2*(3+4)"]})
    model = SevenThenEOS(tok)
    ctx = EvalContext(model=model, tokenizer=tok, config=SimpleNamespace(model=SimpleNamespace(block_size=32)),
                      run_dir=tmp_path, device=torch.device("cpu"), step=0, data=folder,
                      options={"legacy_eos_metric": True})
    result = evaluate(ctx)
    m = result.metrics
    assert m["legacy_acc_val"] == m["legacy_acc_flat"] == m["legacy_acc_paren"] == 1.0
    assert m["acc_val"] == m["acc_flat"] == m["acc_paren"] == 0.0
    assert m["tf_acc_val"] == 0.0
    assert result.n_items == 7 and result.headline == "acc_val"
    assert result.details["splits"]["val"]["examples"][0]["generated"] == "7"
    assert any("<EOS>" in note and "legacy" in note for note in result.notes)
    # without the flag the legacy numbers are not reported
    ctx.options = {}
    assert not any(k.startswith("legacy_") for k in evaluate(ctx).metrics)


def test_exact_match_counts_an_answer_of_seven(tmp_path):
    """The same model is right where the answer is 7: exact match and teacher forcing agree."""
    from lmkit.evaluation.arithmetic import evaluate

    tok = CharTokenizer()
    folder = _seed_files(tmp_path, {"train": ["1+1"], "val": ["3+4", "2*5"]})
    ctx = EvalContext(model=SevenThenEOS(tok), tokenizer=tok,
                      config=SimpleNamespace(model=SimpleNamespace(block_size=32)), run_dir=tmp_path,
                      device=torch.device("cpu"), step=0, data=folder)
    m = evaluate(ctx).metrics
    assert m["acc_val"] == 0.5 and m["tf_acc_val"] == 0.5


# ------------------------------------------------------------------------------ the command


def test_eval_cli_writes_results_with_provenance(arith_run):
    root, run, summary = arith_run
    proc = run_cli("eval", str(run), "--task", "arithmetic", "--task", "perplexity", "--legacy-eos-metric",
                   "--json", cwd=root)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "lmkit eval" in proc.stderr and "legacy_acc_val" in proc.stderr  # the table goes to stderr
    by_task = {r["task"]: r for r in out["results"]}
    for task in ("arithmetic", "perplexity"):
        rec = by_task[task]
        on_disk = json.loads((run / "eval" / f"{task}.json").read_text())
        assert on_disk["metrics"] == pytest.approx(rec["metrics"])
        for key in ("version", "data_file", "n_items", "checkpoint", "step", "tokens", "wall_time_s",
                    "lmkit_version", "headline", "items_per_s"):
            assert on_disk[key] is not None, key
        assert on_disk["step"] == 40 and on_disk["checkpoint"].endswith("best.pt")
    arith = by_task["arithmetic"]
    assert arith["n_items"] == 32 + 16 + 16
    assert arith["metrics"]["paren_gap"] == pytest.approx(arith["metrics"]["acc_paren"] - arith["metrics"]["acc_flat"])
    assert any("legacy" in n for n in arith["notes"])
    # the val loss of the rebuilt val split is the one training measured at that step
    ppl = by_task["perplexity"]["metrics"]
    assert ppl["mean_loss"] == pytest.approx(summary["best_val_loss"], rel=1e-5)
    assert ppl["perplexity"] == pytest.approx(math.exp(ppl["mean_loss"]))
    det = by_task["perplexity"]["details"]
    assert det["n_bytes"] == det["n_tokens"] - 32  # every target is a 1-byte character except the 32 <EOS>
    assert ppl["bpb"] == pytest.approx(det["bpb_nats"] / (math.log(2) * det["n_bytes"]))


def test_a_result_on_other_items_is_replaced_with_a_warning(arith_run, tmp_path):
    root, run, _ = arith_run
    work = tmp_path / "copy"
    shutil.copytree(run, work)  # the module's run stays as the other tests expect it
    first = run_cli("eval", str(work), "--task", "perplexity", cwd=root)
    assert first.returncode == 0 and "warning: replaced" not in first.stdout + first.stderr
    from lmkit.cli.eval import _replaced_note

    same = json.loads((work / "eval" / "perplexity.json").read_text())
    assert _replaced_note(work / "eval" / "perplexity.json", dict(same)) is None  # the same items: no warning
    cut = run_cli("eval", str(work), "--task", "perplexity", "--limit", "1", cwd=root)
    assert cut.returncode == 0, cut.stderr
    line = next(ln for ln in cut.stdout.splitlines() if ln.startswith("warning: replaced"))
    assert "perplexity.json, which held a result on other items (items " in line and "-> 1)" in line
    assert json.loads((work / "eval" / "perplexity.json").read_text())["n_items"] == 1


def test_eval_cli_sweep_writes_per_checkpoint_files_curve_and_table(arith_run):
    root, run, _ = arith_run
    text = root / "text.txt"
    text.write_text("12+(3*4) = 24\n" * 40 + "1+1 = 2\n")
    proc = run_cli("eval", "r", "--out-dir", str(root / "runs"), "--task", "perplexity", "--checkpoint", "all",
                   "--data", str(text), cwd=root)
    assert proc.returncode == 0, proc.stderr
    folder = run / "eval" / "perplexity"
    rows = json.loads((folder / "checkpoint_results.json").read_text())
    assert [r["step"] for r in rows] == [20, 40]
    assert all(r["tokens"] > 0 and r["metrics"]["bpb"] > 0 for r in rows)
    for row in rows:
        rec = json.loads((folder / f"step_{row['step']:07d}.json").read_text())
        assert rec["data_file"] == str(text) and len(rec["data_sha256"]) == 64
        assert rec["metrics"] == pytest.approx(row["metrics"])
    png = folder / "curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "sweep of 2 checkpoints" in proc.stdout and "curve.png" in proc.stdout


def test_unknown_and_unavailable_tasks_exit_2(arith_run, monkeypatch):
    root, run, _ = arith_run
    proc = run_cli("eval", str(run), "--task", "mmlu", cwd=root)
    assert proc.returncode == 2
    assert "unknown task" in proc.stderr and "hellaswag" in proc.stderr and "Traceback" not in proc.stderr

    from lmkit.cli.eval import resolve_tasks
    from lmkit.evaluation import task

    monkeypatch.setitem(task.TASKS, "ghost", "lmkit.evaluation.ghost_task:evaluate")
    with pytest.raises(ConfigError, match="--task ghost: not available in this build"):
        resolve_tasks(["perplexity", "ghost"])


def test_arithmetic_task_on_a_text_run_says_what_to_pass(tmp_path):
    """The task needs <BOS>/<EOS> and arithmetic data: a byte-tokenizer run gets one line, exit 2."""
    from lmkit.errors import DataError
    from lmkit.evaluation.arithmetic import evaluate

    tok = SimpleNamespace(bos_id=None, eos_id=256, kind="byte")
    ctx = EvalContext(model=None, tokenizer=tok, config=None, run_dir=tmp_path, device=torch.device("cpu"), step=0)
    with pytest.raises(DataError, match="no <BOS>/<EOS>"):
        evaluate(ctx)


def test_trained_bpe_byte_table_sums_to_the_utf8_length():
    """Byte-level BPE pieces are counted in raw bytes: over any text, the table's sum over the
    ids equals the text's UTF-8 length (accents and a CJK character included)."""
    from lmkit.data.tokenizers import HFTokenizer

    corpus = ["Zoë's café serves crème brûlée; 東京 is far. " * 3, "plain ascii words and more words " * 5]
    tok = HFTokenizer.train_bpe(corpus, vocab_size=300)
    table = token_byte_lengths(tok)
    for text in ("Zoë's café, 東京.", "more words"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert sum(int(table[i]) for i in ids) == len(text.encode("utf-8"))
