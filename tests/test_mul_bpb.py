"""Bits per byte of the multiplication-tokens study (SEEDS_SPEC §1.2, issue 12): a ``mul_tokens`` run is
scored on injected text, and every mul token counts the UTF-8 bytes of the text it replaced, in text
files (``--data``), chat data (in-training validation and the perplexity task) and after a cut; the
chat data stats recount mul tokens after a cut; an ``hf:`` tokenizer with the mul strings but no
condition says that injection is off.

Independent references: the file's size, the UTF-8 length of the original strings written here,
mul ids written out by hand (SEEDS_SPEC §1.1), and ids counted in the sequences themselves.
"""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from torch import nn

from lmkit.config import DataConfig, build_run_config
from lmkit.data import prepare_data
from lmkit.data.batching import IGNORE_INDEX
from lmkit.data.tokenizers import GPT2Tokenizer
from lmkit.evaluation import perplexity
from lmkit.evaluation.task import EvalContext
from lmkit.events import Notice

from conftest import shared

VOCAB = 50349
SIX_NINE = 50342  # <MUL_6_9_54>
THREE_FOUR = 50322  # <MUL_3_4_12>: 9 facts of a = 1, 8 of a = 2, then (3, 3), (3, 4)
THREE_FIVE = 50323  # <MUL_3_5_15>
MUL_RANGE = range(50304, 50349)


class Uniform(nn.Module):
    """Zero logits over the 50,349 ids (every target costs ln V nats); records its inputs."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.zeros(*x.shape, VOCAB) + 0 * self.anchor, None


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer.from_files(shared("gpt2-tokenizer"))


@pytest.fixture(scope="module")
def toks(gpt2):
    from lmkit.data.tokenizer_mul import GPT2MulTokenizer

    return {c: GPT2MulTokenizer.from_gpt2(gpt2, c) for c in ("baseline", "mul_tokens")}


def _config(dataset, *sets: str):
    return build_run_config(None, ["model.n_layer=1", "model.n_head=1", "model.n_embd=8", "model.d_ff=8",
                                   "model.block_size=64", f"model.vocab_size={VOCAB}", f"data.dataset={dataset}",
                                   "data.tokenizer=gpt2+mul", "training.batch_size=2", "training.max_steps=1", *sets])


def _ctx(tok, cfg, tmp_path, data=None) -> EvalContext:
    return EvalContext(model=Uniform(), tokenizer=tok, config=cfg, run_dir=tmp_path, device=torch.device("cpu"),
                       step=0, data=data, batch_size=2)


# ------------------------------------------------------------------------------ --data FILE


@pytest.mark.parametrize("legacy", [False, True])
def test_perplexity_of_a_file_injects_as_the_mul_run_was_trained(toks, tmp_path, legacy):
    text = "\n6*9=54 and 3 x 4 = 12\nhalf of 2.5*3 is\n"  # the first token ("\n", 1 byte) is never a target
    path = tmp_path / "facts.txt"
    path.write_bytes(text.encode())
    cfg = _config(path, "data.condition=mul_tokens", f"data.legacy_regex={str(legacy).lower()}")
    ctx = _ctx(toks["mul_tokens"], cfg, tmp_path, data=path)
    result = perplexity.evaluate(ctx)
    scored = torch.cat([x.reshape(-1) for x in ctx.model.seen]).tolist()
    assert SIX_NINE in scored and THREE_FOUR in scored
    assert (THREE_FIVE in scored) is legacy  # "2.5*3": only the seed's unguarded regex rewrites it
    assert result.details["text_bytes"] == path.stat().st_size == len(text.encode())
    assert result.details["n_bytes"] == path.stat().st_size - 1  # every byte a target covers
    assert result.details["text_encoding"] == ("mul_tokens injection, legacy regex" if legacy else "mul_tokens injection")
    # uniform logits: every target costs ln V nats, none is special
    n = result.details["n_tokens"]
    assert result.metrics["bpb"] == pytest.approx(n * math.log(VOCAB) / (math.log(2) * (path.stat().st_size - 1)), rel=1e-6)


def test_perplexity_of_a_file_in_the_baseline_stays_plain(toks, gpt2, tmp_path):
    path = tmp_path / "facts.txt"
    path.write_text("\n6*9=54 and 3 x 4 = 12\n")
    ctx = _ctx(toks["baseline"], _config(path, "data.condition=baseline"), tmp_path, data=path)
    result = perplexity.evaluate(ctx)
    scored = torch.cat([x.reshape(-1) for x in ctx.model.seen]).tolist()
    assert scored == gpt2.encode("\n")[:1] + gpt2.encode("6*9=54 and 3 x 4 = 12\n")[:-1]
    assert result.details["text_encoding"] == "plain" and result.details["n_bytes"] == path.stat().st_size - 1


# ------------------------------------------------------------------------------ chat data bytes

QA = [("What is 6*9?", "6*9=54\n#### 54"), ("And 3 x 4?", "It is 3 x 4 = 12, so 12.\n#### 12"),
      ("Name a café.", "Le café 9 × 6 = 54 ☕")]
MESSAGES = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "6*9?"},
                         {"role": "assistant", "content": "6*9=54."}, {"role": "user", "content": "2x3?"},
                         {"role": "assistant", "content": "2x3=6"}]}


def _chat_folder(tmp_path):
    folder = tmp_path / "chat"
    folder.mkdir()
    rows = [{"question": q, "answer": a} for q, a in QA]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, MESSAGES]))
    # what the assistant targets cover, from the original strings: " " + content per assistant turn
    assistant = [[a] for _, a in QA] + [["6*9=54.", "2x3=6"]]
    return folder, [sum(len((" " + c).encode()) for c in turns) for turns in assistant]


def _chat_config(folder, condition, *sets):
    return _config(folder, "data.format=chat", f"data.condition={condition}", *sets)


def _labelled_bytes(seq) -> int:
    return sum(b for b, label in zip(seq.n_bytes[1:], seq.labels[1:], strict=True) if label != IGNORE_INDEX)


def test_chat_targets_carry_the_bytes_of_the_original_text(toks, tmp_path):
    folder, reference = _chat_folder(tmp_path)
    cfg = _chat_config(folder, "mul_tokens", "data.inject_answers=true")
    data = prepare_data(cfg.data, tokenizer=toks["mul_tokens"], block_size=64)
    val = data.sequences["val"]
    assert all(any(i in MUL_RANGE for i in seq) for seq in val)  # every item was injected
    assert [_labelled_bytes(seq) for seq in val] == reference
    assert data.bytes_source("val") == "per token"
    # in-training validation and the perplexity task divide by those bytes
    model = Uniform()
    sums = perplexity.split_loss_sums(model, data, "val", 64, 2, torch.device("cpu"), vocab_size=VOCAB)
    assert sums.n_bytes == sum(reference)
    # loss_on all: every target but position 0 ("User" or "System", one GPT-2 token each): the whole
    # text's bytes but that word's
    everything = prepare_data(_chat_config(folder, "mul_tokens", "data.inject_answers=true", "data.loss_on=all").data,
                              tokenizer=toks["mul_tokens"], block_size=64)
    for seq, text in zip(everything.sequences["val"], everything.texts["val"], strict=True):
        assert _labelled_bytes(seq) == len(text.encode()) - len(text.split(":")[0].encode())


def test_chat_bpb_bytes_are_the_same_in_both_conditions(toks, tmp_path):
    folder, reference = _chat_folder(tmp_path)
    n_bytes = {}
    for condition in ("baseline", "mul_tokens"):
        sets = ("data.inject_answers=true",) if condition == "mul_tokens" else ()
        data = prepare_data(_chat_config(folder, condition, *sets).data, tokenizer=toks[condition], block_size=64)
        n_bytes[condition] = perplexity.split_loss_sums(Uniform(), data, "val", 64, 4, torch.device("cpu"),
                                                        vocab_size=VOCAB).n_bytes
    assert n_bytes["baseline"] == n_bytes["mul_tokens"] == sum(reference)


def test_perplexity_task_and_in_training_eval_on_chat_use_the_original_bytes(toks, tmp_path):
    folder, reference = _chat_folder(tmp_path)
    cfg = _chat_config(folder, "mul_tokens", "data.inject_answers=true")
    result = perplexity.evaluate(_ctx(toks["mul_tokens"], cfg, tmp_path))
    assert result.details["bytes_source"] == "per token"
    assert result.details["n_bytes"] == sum(reference)
    # in-training validation (the Evaluator hook) on the same data: bpb with the same bytes
    from lmkit.training.evaluator import Evaluator

    data = prepare_data(cfg.data, tokenizer=toks["mul_tokens"], block_size=64)
    emitted = []
    plan = types.SimpleNamespace(device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False))
    trainer = types.SimpleNamespace(config=cfg, plan=plan, data=data, model=Uniform(), step=1, best_val_loss=math.inf,
                                    best_step=0, epoch=lambda: 0.0, tokens=0, emit=emitted.append,
                                    hooks=types.SimpleNamespace(call=lambda *a: None),
                                    run=types.SimpleNamespace(path=tmp_path), last_val=None)
    out = Evaluator().evaluate(trainer)
    # uniform logits: ln V nats per learned target except the EOS (a separator: no text, no nats)
    learned = sum(sum(1 for label in seq.labels[1:] if label not in (IGNORE_INDEX, 50256)) for seq in data.sequences["val"])
    assert out.metrics["bpb"] == pytest.approx(learned * math.log(VOCAB) / (math.log(2) * sum(reference)), rel=1e-6)


def test_a_cut_keeps_bytes_aligned_and_recounts_mul_tokens(toks, tmp_path):
    folder = tmp_path / "cut"
    folder.mkdir()
    long_q = "Think about it for a while, then tell me what the product is. " * 2
    rows = [{"question": long_q, "answer": "The product is 6*9=54."},  # the mul token falls after the cut
            {"question": "What is 6*9?", "answer": "6*9=54, done."}]  # kept
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "val.jsonl").write_text(json.dumps(rows[1]) + "\n")
    cfg = _chat_config(folder, "mul_tokens", "data.inject_answers=true")
    whole = prepare_data(cfg.data, tokenizer=toks["mul_tokens"])
    assert whole.stats["mul_tokens_by_split"] == {"train": 2, "val": 1}
    events = []
    cut = prepare_data(cfg.data, events.append, tokenizer=toks["mul_tokens"], block_size=20)
    assert cut.stats["truncated"] == 1
    train = cut.sequences["train"]
    assert len(train[0]) == 21 and SIX_NINE in whole.sequences["train"][0] and SIX_NINE not in train[0]
    # reference: the mul ids counted in the sequences as they are now
    kept = {split: sum(sum(1 for i in seq if i in MUL_RANGE) for seq in seqs) for split, seqs in cut.sequences.items()}
    assert kept == {"train": 1, "val": 1}
    assert cut.stats["mul_tokens_by_split"] == kept and cut.stats["mul_tokens"] == 2
    for seq, full in zip(train, whole.sequences["train"], strict=True):
        assert len(seq.n_bytes) == len(seq) and seq.n_bytes == full.n_bytes[: len(seq)]


# ------------------------------------------------------------------------------ hf: tokenizer, no condition


@pytest.fixture(scope="module")
def hf_mul_tokenizer(toks, tmp_path_factory):
    """The HF tokenizer of a mul_tokens run's ``lmkit export --to hf``, loaded as lmkit loads an
    ``hf:`` tokenizer (kind ``hf:...``, the mul strings added tokens of the backend)."""
    pytest.importorskip("tokenizers")
    from lmkit.data.tokenizers import HFTokenizer
    from lmkit.export.tokenizer import save_hf_tokenizer

    folder = tmp_path_factory.mktemp("hf-mul-tok")
    save_hf_tokenizer(toks["mul_tokens"], folder)
    tok = HFTokenizer.pretrained(str(folder))
    assert tok.encode("<MUL_6_9_54>") == [SIX_NINE] and tok.vocab_size == VOCAB
    return tok


def test_hf_tokenizer_with_mul_strings_but_no_condition_warns(hf_mul_tokenizer, gpt2, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": "6*9=54"}) + "\n" for i in range(3)))
    events = []
    data = prepare_data(DataConfig(dataset=str(path), format="chat", tokenizer="byte"), events.append,
                        tokenizer=hf_mul_tokenizer)
    warnings = [e for e in events if isinstance(e, Notice) and e.level == "warning" and "injection is off" in e.message]
    assert len(warnings) == 1 and "--init-from RUN" in warnings[0].message
    assert SIX_NINE not in data.sequences["train"][0]  # indeed not injected
    # a tokenizer without the strings: no warning
    quiet = []
    prepare_data(DataConfig(dataset=str(path), format="chat", tokenizer="byte"), quiet.append, tokenizer=gpt2)
    assert not [e for e in quiet if isinstance(e, Notice) and "injection is off" in e.message]


def test_hf_tokenizer_with_mul_strings_warns_for_text_data_too(hf_mul_tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("6*9=54 is a fact.\n" * 40)
    events = []
    prepare_data(DataConfig(dataset=str(path), tokenizer="byte", cache_dir=str(tmp_path / "cache")), events.append,
                 tokenizer=hf_mul_tokenizer)
    assert [e for e in events if isinstance(e, Notice) and "injection is off" in e.message]


def test_an_hf_tokenizer_with_the_mul_strings_counts_generated_mul_ids(hf_mul_tokenizer, gpt2):
    """gsm8k / probes on a run fine-tuned from an ``hf:`` export still count mul tokens."""
    from lmkit.evaluation.mul_usage import mul_token_ids

    ids = mul_token_ids(hf_mul_tokenizer)
    assert len(ids) == 45 and SIX_NINE in ids and min(ids) == 50304 and max(ids) == 50348
    assert mul_token_ids(gpt2) == frozenset()
