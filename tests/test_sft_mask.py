"""The SFT loss mask, end to end through lmkit's own trainer: a tiny byte-level GPT fine-tuned
on a handful of chat items learns to emit EOS right after its answer; with seed 004's buggy
mask (data.legacy_pad_mask: labels hidden wherever id == pad == eos) it never does."""

import json

import pytest

from lmkit.config import build_run_config
from lmkit.data.chat import chat_prompt
from lmkit.data.tokenizers import ByteTokenizer
from lmkit.evaluation.generate import generate_ex
from lmkit.training.loop import Trainer

EOS = 256
ITEMS = [("a", "apple"), ("b", "bread"), ("c", "cocoa"), ("d", "dates"), ("e", "eggs"), ("f", "figs")]

PRESET = """\
model:
  n_layer: 2
  n_head: 2
  n_embd: 32
  d_ff: 64
  block_size: 32
  pos_encoding: rope
  dropout: 0.0
data:
  dataset: {data}
  format: chat
  tokenizer: byte
training:
  batch_size: 6
  max_steps: 100
  lr: 1.0e-2
  warmup_steps: 5
  schedule: cosine
  log_interval: 50
  eval_interval: 100
  eval_at_start: false
  keep_last: 1
  seed: 1
  device: cpu
  threads: 1
"""


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    rows = [{"question": q, "answer": a} for q, a in ITEMS]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "val.jsonl").write_text(json.dumps({"question": "g", "answer": "grapes"}) + "\n")
    return folder


def _finetune(tmp_path, folder, *overrides):
    preset = tmp_path / "sft.yaml"
    preset.write_text(PRESET.format(data=folder))
    config = build_run_config(str(preset), list(overrides), {"out_dir": ("--out-dir", str(tmp_path / "runs")),
                                                             "name": ("--name", "sft")})
    trainer = Trainer(config)
    summary = trainer.run()
    assert summary["status"] == "completed"
    tok = ByteTokenizer()
    prompts = [tok.encode(chat_prompt(q)) for q, _ in ITEMS]  # held-in prompts: "User: a\nAssistant:"
    trainer.model.eval()
    gen = generate_ex(trainer.model, prompts, max_new_tokens=12, eos_id=EOS)
    return [tok.decode(ids) for ids in gen.tokens], gen.finish


def test_fine_tuned_model_stops_after_its_answer(tmp_path, chat_folder):
    texts, finish = _finetune(tmp_path, chat_folder)
    stopped_right = [t == f" {a}" and f == "eos" for t, (_, a), f in zip(texts, ITEMS, finish, strict=True)]
    assert sum(stopped_right) >= 5, list(zip(texts, finish, strict=True))


def test_legacy_pad_mask_never_learns_to_stop(tmp_path, chat_folder):
    texts, finish = _finetune(tmp_path, chat_folder, "data.legacy_pad_mask=true")
    # EOS was never a target: the model runs on past its answer (into the next "User:" turn or beyond)
    assert "eos" not in finish, list(zip(texts, finish, strict=True))
    assert sum(t.startswith(f" {a}") for t, (_, a) in zip(texts, ITEMS, strict=True)) >= 3, texts  # it learned answers
