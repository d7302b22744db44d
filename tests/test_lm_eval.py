"""lm-eval:TASK: a local lm-evaluation-harness task over the shared HellaSwag file equals lmkit's
own hellaswag task on the same items (acc = acc_harness, acc_norm = acc_norm_chars, and the
per-choice log-likelihoods); the LM wrapper's rolling log-likelihood and generation against
plain loops; a missing harness in one line."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmkit.config import ModelConfig
from lmkit.data.tokenizers import CharTokenizer
from lmkit.errors import ConfigError
from lmkit.models.gpt import GPT

from conftest import TINY_PRESET, run_cli, shared

pytest.importorskip("lm_eval")

N_ITEMS = 20
TASK_YAML = """\
task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{gold}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
GSM8K_YAML = """\
task: gsm8k_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  until: ["Question:"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
# the harness's tasks/hellaswag/utils.py, for a file with ``ctx`` instead of ctx_a/ctx_b
TASK_UTILS = '''\
import re


def preprocess(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\\\[.*?\\\\]", "", text)
    text = text.replace("  ", " ")
    return text


def process_docs(dataset):
    def _process_doc(doc):
        return {"query": preprocess(doc["activity_label"] + ": " + doc["ctx"]),
                "choices": [preprocess(e) for e in doc["endings"]],
                "gold": int(doc["label"])}
    return dataset.map(_process_doc)
'''


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory) -> Path:
    """runs/hs: a tiny GPT (block 128) trained 3 steps on Shakespeare with the GPT-2 tokenizer;
    tasks/: the local HellaSwag task."""
    from lmkit.config import build_run_config
    from lmkit.training.loop import train

    data = shared("hellaswag", "hellaswag_val.jsonl")
    root = tmp_path_factory.mktemp("lm_eval")
    preset = root / "tiny.yaml"
    preset.write_text(TINY_PRESET.format(pos="rope", steps=3, eval_interval=3, ckpt_interval=3)
                      .replace("block_size: 32", "block_size: 128").replace("batch_size: 16", "batch_size: 4"))
    text = root / "shakespeare.txt"
    text.write_text(shared("tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:8000], encoding="utf-8")
    flags = {"out_dir": ("--out-dir", str(root / "runs")), "name": ("--name", "hs"),
             "data.dataset": ("--data", str(text)), "data.tokenizer": ("--tokenizer", "gpt2")}
    with pytest.MonkeyPatch.context() as mp:  # the autouse env fixture is per test: set its variables here
        mp.setenv("LMKIT_GPT2_DIR", str(shared("gpt2-tokenizer")))
        mp.setenv("LMKIT_CACHE_DIR", str(root / "cache"))
        train(build_run_config(str(preset), [], flags))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "hellaswag_local.yaml").write_text(TASK_YAML.format(data=data))
    (tasks / "utils.py").write_text(TASK_UTILS)
    (tasks / "gsm8k_local.yaml").write_text(GSM8K_YAML.format(data=shared("gsm8k", "test.jsonl")))
    return root


def test_harness_hellaswag_equals_lmkit_hellaswag(gpt2_run):
    from lmkit.compare import load_run_data
    from lmkit.evaluation.hellaswag import hellaswag_metrics, load_items, score_items
    from lmkit.rundir import RunDir
    from lmkit.runs import load_run

    root = gpt2_run
    proc = run_cli("eval", "hs", "--out-dir", "runs", "--task", "lm-eval:hellaswag_local", "--include-path", "tasks",
                   "--limit", str(N_ITEMS), "--device", "cpu", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""  # no harness logging, tqdm bars or `git describe` noise
    result = json.loads((root / "runs" / "hs" / "eval" / "lm-eval_hellaswag_local.json").read_text())
    assert result["task"] == "lm-eval:hellaswag_local" and result["n_items"] == N_ITEMS
    assert result["headline"] == "acc_norm"
    assert result["directions"] == {"acc": "higher", "acc_stderr": "neither", "acc_norm": "higher",
                                    "acc_norm_stderr": "neither"}
    data = shared("hellaswag", "hellaswag_val.jsonl")
    assert result["data_file"] == str(data)

    # lmkit's own hellaswag task (the functions its evaluate() runs) on the same items
    loaded = load_run(root / "runs" / "hs", "best")
    items, _, _ = load_items(data, N_ITEMS)
    scores = score_items(loaded.model, loaded.tokenizer, items, block_size=128, device=torch.device("cpu"))
    own = hellaswag_metrics(items, scores)
    m = result["metrics"]
    assert m["acc"] == own["acc_harness"] and m["acc_norm"] == own["acc_norm_chars"]
    for name in ("acc", "acc_norm"):  # the harness's mean_stderr: sample std / sqrt(n)
        p = m[name]
        assert m[f"{name}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (N_ITEMS - 1)), rel=1e-9)

    # per item and choice, the harness's log-likelihoods are lmkit's harness rendering
    examples = result["details"]["examples"]
    assert [e["doc_id"] for e in examples] == list(range(10))
    for e in examples:
        item, s = items[e["doc_id"]], scores[e["doc_id"]]
        assert e["target"] == item.label
        assert [r[0] for r in e["resps"]] == pytest.approx(s.logprob_harness.tolist(), abs=1e-3)

    run = load_run_data(RunDir(root / "runs" / "hs"))  # what `lmkit compare` reads
    assert run.evals["lm-eval:hellaswag_local"]["metrics"]["acc_norm"] == m["acc_norm"]


def test_a_local_generation_task_runs_on_lmkits_decoder(gpt2_run):
    """generate_until through the harness (a local GSM8K task, 3 items): each response is lmkit's
    greedy KV-cache generation of the harness's prompt (cut at the task's stop string; the 3-step
    model writes newlines, which is why the task stops only at "Question:")."""
    from lmkit.evaluation.generate import generate_ex
    from lmkit.evaluation.task import EvalContext, get_task
    from lmkit.runs import load_run

    root = gpt2_run
    loaded = load_run(root / "runs" / "hs", "best")
    ctx = EvalContext(model=loaded.model, tokenizer=loaded.tokenizer, config=loaded.config,
                      run_dir=root / "runs" / "hs", device=torch.device("cpu"), step=loaded.step, limit=3,
                      options={"include_path": str(root / "tasks")})
    result = get_task("lm-eval:gsm8k_local")(ctx)
    assert result.task == "lm-eval:gsm8k_local" and result.n_items == 3 and result.headline == "exact_match"
    assert result.metrics["exact_match"] == 0.0 and result.directions["exact_match"] == "higher"
    rows = [json.loads(line) for line in shared("gsm8k", "test.jsonl").read_text().splitlines()[:3]]
    prompts = [loaded.tokenizer.encode(f"Question: {r['question']}\nAnswer:")[-(128 - 16):] for r in rows]
    gen = generate_ex(loaded.model, prompts, max_new_tokens=16, eos_id=loaded.tokenizer.eos_id)
    expected = [loaded.tokenizer.decode(t).split("Question:")[0] for t in gen.tokens]
    got = {e["doc_id"]: e["resps"][0] for e in result.details["examples"]}
    assert [got[i] for i in range(3)] == expected and any(expected)
    assert [e["target"] for e in sorted(result.details["examples"], key=lambda e: e["doc_id"])] == \
        [r["answer"].split("####")[-1].strip() for r in rows]


def _char_model(block_size: int = 8, seed: int = 0) -> tuple[GPT, CharTokenizer]:
    tok = CharTokenizer("abcdefgh ")
    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, d_ff=64, block_size=block_size,
                            vocab_size=tok.vocab_size, pos_encoding="learned", dropout=0.0)).eval()
    return model, tok


def _lm(model, tok, block_size: int):
    from lmkit.evaluation.lm_eval_model import LmkitLM

    return LmkitLM(model, tok, block_size=block_size, device=torch.device("cpu"), batch_size=3)


def _req(*args):
    return SimpleNamespace(args=args)


@torch.no_grad()
def _logp_next(model, ids: list[int]) -> torch.Tensor:
    logits, _ = model(torch.tensor([ids]))
    return torch.log_softmax(logits[0, -1].double(), dim=-1)


@torch.no_grad()
def test_rolling_loglikelihood_follows_the_harness_windows():
    """The harness's rule (LM.loglikelihood_rolling docstring): windows of max length L; the first
    predicts tokens[0:L] from [EOS] + tokens[:L-1]; each next one the next L tokens from the token
    before them on; the last, shorter one keeps a full L-token input and scores only its tail."""
    L = 8
    model, tok = _char_model(L)
    texts = ["abcabc", "abcdefgh abcdefgh abcdefgh abc"]  # 6 tokens (one window) and 30 (four)
    got = _lm(model, tok, L).loglikelihood_rolling([_req(t) for t in texts])
    for text, value in zip(texts, got, strict=True):
        ids = tok.encode(text)
        total, start = 0.0, 0
        while start < len(ids):
            end = min(start + L, len(ids))
            if start == 0:
                inputs = [tok.eos_id, *ids[: end - 1]]
            else:
                inputs = ids[end - 1 - L: end - 1]
            logits, _ = model(torch.tensor([inputs]))
            logp = torch.log_softmax(logits[0].double(), dim=-1)
            for t in range(start, end):  # token t is predicted at input position t - (end - len(inputs))
                total += float(logp[t - (end - len(inputs)), ids[t]])
            start = end
        assert value == pytest.approx(total, rel=1e-5)


@torch.no_grad()
def test_loglikelihood_moves_trailing_spaces_and_conditions_empty_context_on_eos():
    model, tok = _char_model(16)
    lm = _lm(model, tok, 16)
    assert lm.encode_pair("ab ", "cd") == (tok.encode("ab"), tok.encode(" cd"))
    (ab, _), (empty, _), (long_ctx, _) = lm.loglikelihood(
        [_req("ab ", "cd"), _req("", "cd"), _req("abcdefgh" * 3, "ab")])

    def ref(ctx_ids, cont_ids):
        return sum(float(_logp_next(model, (ctx_ids + cont_ids[:i])[-16:])[cont_ids[i]]) for i in range(len(cont_ids)))

    assert ab == pytest.approx(ref(tok.encode("ab"), tok.encode(" cd")), rel=1e-5)
    assert empty == pytest.approx(ref([tok.eos_id], tok.encode("cd")), rel=1e-5)
    # 24 + 2 ids > block 16: HFLM's rule, one input (context + continuation)[-17:][:-1], the last 2 scored
    ids = tok.encode("abcdefgh" * 3 + "ab")
    logits, _ = model(torch.tensor([ids[-17:-1]]))
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    assert long_ctx == pytest.approx(float(logp[-2, ids[-2]] + logp[-1, ids[-1]]), rel=1e-5)


@torch.no_grad()
def test_generate_until_matches_a_greedy_loop_and_stops_at_the_until_string():
    block = 24
    model, tok = _char_model(block, seed=3)
    prompts = ["abc", "hgfe dcba" * 3]  # the second (27 chars) is cut to block - max_gen_toks = 18 ids

    def greedy(prompt: str, n: int) -> str:
        ids = tok.encode(prompt)[-(block - n):]
        out: list[int] = []
        for _ in range(n):
            nxt = int(_logp_next(model, ids + out).argmax())
            if nxt == tok.eos_id:
                break
            out.append(nxt)
        return tok.decode(out)

    free = [greedy(p, 6) for p in prompts]
    assert all(free)
    # stop at the third generated character of the first prompt's continuation
    until = free[0][2]
    got = _lm(model, tok, block).generate_until([_req(p, {"until": [until], "max_gen_toks": 6}) for p in prompts])
    assert got == [text.split(until)[0] for text in free]
    assert len(got[0]) <= 2


def test_missing_harness_is_one_config_error_line(monkeypatch):
    from lmkit.evaluation import lm_eval as task

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ConfigError) as err:
        task.evaluate(SimpleNamespace(options={}), "hellaswag")
    message = str(err.value)
    assert "pip install 'lmkit[lm-eval]'" in message and "\n" not in message


def test_unknown_task_is_one_config_error_line_with_the_closest_names(monkeypatch, tmp_path):
    import lm_eval.tasks

    from lmkit.evaluation import lm_eval as task

    class FakeManager:  # the real index of ~15,000 built-in YAML files takes ~10 s to build
        def __init__(self, include_path=None, include_defaults=True):
            self.all_tasks = ["hellaswag", "hellaswag_local"] if include_defaults else ["hellaswag_local"]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeManager)
    ctx = SimpleNamespace(options={"include_path": str(tmp_path)})
    with pytest.raises(ConfigError) as err:
        task.evaluate(ctx, "helaswag_local")
    message = str(err.value)
    assert message.startswith("--task lm-eval:helaswag_local: no such lm-evaluation-harness task")
    assert "did you mean hellaswag_local" in message and "\n" not in message


def test_harness_result_keys_become_metric_names_with_directions():
    from lmkit.evaluation.lm_eval import _directions, harness_metrics

    block = {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05,
             "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": "N/A",
             "acc,none": 0.5, "acc_norm,none": 0.4, "word_perplexity,none": 30.0, "samples": 8}
    metrics = harness_metrics(block)
    assert metrics == {"exact_match_strict-match": 0.25, "exact_match_strict-match_stderr": 0.05,
                       "exact_match_flexible-extract": 0.5, "acc": 0.5, "acc_norm": 0.4, "word_perplexity": 30.0}
    directions = _directions(metrics, {"exact_match": True, "acc": True, "acc_norm": False, "word_perplexity": False})
    assert directions == {"exact_match_strict-match": "higher", "exact_match_strict-match_stderr": "neither",
                          "exact_match_flexible-extract": "higher", "acc": "higher", "acc_norm": "lower",
                          "word_perplexity": "lower"}
