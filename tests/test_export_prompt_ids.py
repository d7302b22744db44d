"""The exported HF tokenizer starts a prompt the way lmkit does: ``<BOS>`` for ``char`` (trained
with ``<BOS>`` at the start of every arithmetic sequence), nothing for the other kinds; and the
export's verification catches a tokenizer that does otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY_PRESET, shared

transformers = pytest.importorskip("transformers")

from lmkit.config import build_run_config  # noqa: E402
from lmkit.export import hf  # noqa: E402
from lmkit.export import tokenizer as export_tokenizer  # noqa: E402
from lmkit.export.tokenizer import save_hf_tokenizer  # noqa: E402
from lmkit.runs import load_run  # noqa: E402
from lmkit.training.loop import train  # noqa: E402

BPE_PRESET = """\
model: {{n_layer: 1, n_head: 2, n_embd: 32, d_ff: 64, block_size: 32, pos_encoding: learned, dropout: 0.0}}
data: {{dataset: {data}, tokenizer: bpe, bpe_vocab_size: 300, val_fraction: 0.2}}
training: {{batch_size: 8, max_steps: 4, lr: 3.0e-3, eval_interval: 4, checkpoint_interval: 4, seed: 1}}
"""


def _train(root: Path, name: str, preset_text: str) -> Path:
    preset = root / f"{name}.yaml"
    preset.write_text(preset_text)
    train(build_run_config(str(preset), [], {"out_dir": ("--out-dir", str(root)), "name": ("--name", name)}))
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny arithmetic run (``char``, the pilot's tokenizer) and a tiny BPE run on real text."""
    root = tmp_path_factory.mktemp("prompt-runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("LMKIT_CACHE_DIR", str(root / "cache"))
    data = root / "shakespeare.txt"
    data.write_text(shared("tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    yield {"char": _train(root, "char", TINY_PRESET.format(pos="rope", steps=40, eval_interval=40, ckpt_interval=40)),
           "bpe": _train(root, "bpe", BPE_PRESET.format(data=data)),
           "char_text": _train(root, "char_text", BPE_PRESET.format(data=data).replace("tokenizer: bpe", "tokenizer: char"))}
    mp.undo()


def test_hf_tokenizer_of_a_char_run_prepends_bos_like_lmkit_eval(runs, tmp_path):
    """``tok(prompt)`` + ``generate`` in transformers = lmkit's greedy answer from ``<BOS> prompt``."""
    out = tmp_path / "hf"
    meta = hf.export_hf(runs["char"], out).metadata
    loaded = load_run(runs["char"])
    lmk = loaded.tokenizer
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    prompt = "12+(3*4) = "
    # lmkit eval's prompt (arithmetic evaluations: [bos_id, *encode(prompt)]), written out by hand
    expected = [1] + [lmk.stoi[ch] for ch in prompt]
    assert tok(prompt)["input_ids"] == expected
    assert tok(prompt, add_special_tokens=False)["input_ids"] == expected[1:]
    assert tok([prompt, "7-2 = "])["input_ids"][1][0] == 1  # batches too
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    inputs = tok(prompt, return_tensors="pt")
    theirs = model.generate(**inputs, do_sample=False, max_new_tokens=12, eos_token_id=None,
                            pad_token_id=0)[0, inputs["input_ids"].shape[1]:].tolist()
    idx = torch.tensor([expected])  # naive greedy loop with the native model
    with torch.no_grad():
        for _ in range(12):
            idx = torch.cat([idx, loaded.model(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert theirs == idx[0, len(expected):].tolist()
    verification = meta["verification"]
    assert verification["prompt_ids_equal"] and verification["adds_bos"]
    assert verification["prompt_texts"] >= 30
    assert meta["tokenizer"]["add_bos_token"] is True


def test_verification_fails_an_export_whose_tokenizer_drops_bos(runs, tmp_path, monkeypatch):
    """The raw-text check (add_special_tokens=False) cannot see a missing BOS; the prompt check must."""
    monkeypatch.setattr(export_tokenizer, "_with_prompt_template", lambda backend, tokenizer, bos=None: backend)
    with pytest.raises(hf.ExportError) as err:
        hf.export_hf(runs["char"], tmp_path / "hf")
    assert "prompts get other ids from tokenizer(prompt)" in str(err.value)


def test_bpe_run_export_checks_as_many_prompts_as_the_pilot(runs, tmp_path):
    meta = hf.export_hf(runs["bpe"], tmp_path / "hf").metadata
    verification = meta["verification"]
    assert verification["prompt_texts"] >= 100 and verification["prompt_ids_equal"]
    assert verification["adds_bos"] is False and meta["tokenizer"]["add_bos_token"] is False
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    lmk = load_run(runs["bpe"]).tokenizer
    assert tok("Before we proceed")["input_ids"] == lmk.encode("Before we proceed")  # no BOS, no EOS


def _hf_with_own_template(tmp_path: Path):
    """A local ``hf:`` tokenizer whose tokenizer.json wraps text in ``<s> ... </s>`` (as
    xlm-roberta's does); lmkit encodes without it."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from lmkit.data.tokenizers import HFTokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([shared("tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:20_000]],
                                trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0),
                                                                                                 ("</s>", 1)])
    path = tmp_path / "own.json"
    backend.save(str(path))
    return HFTokenizer.pretrained(str(path))


@pytest.mark.parametrize("kind", ["byte", "bpe", "gpt2", "hf-template"])
def test_kinds_without_bos_in_lmkit_get_the_bare_text(kind, tmp_path):
    """byte/bpe/gpt2/hf: lmkit trains and prompts on the bare text: ``tok(prompt)`` adds nothing."""
    from lmkit.data.tokenizers import ByteTokenizer, GPT2Tokenizer, HFTokenizer
    from lmkit.evaluation.sample import prompt_ids

    text = shared("tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:20_000]
    tok = {"byte": ByteTokenizer, "bpe": lambda: HFTokenizer.train_bpe([text], 300),
           "gpt2": lambda: GPT2Tokenizer.from_files(shared("gpt2-tokenizer")),
           "hf-template": lambda: _hf_with_own_template(tmp_path)}[kind]()
    out = tmp_path / "out"
    out.mkdir()
    info = save_hf_tokenizer(tok, out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    prompts = export_tokenizer.prompt_texts([text[:4000]])
    assert len(prompts) >= 100
    for prompt in prompts:
        assert hf_tok(prompt)["input_ids"] == tok.encode(prompt) == prompt_ids(tok, prompt)
    problems: list[str] = []
    assert export_tokenizer.check_prompt_ids(hf_tok, tok, [text[:4000]], problems)["prompt_ids_equal"]
    assert not problems
    assert info["add_bos_token"] is False


def test_prompt_texts_cut_lines_and_long_lines():
    texts = ["first line\n\n" + "word " * 40 + "\nlast", "12+3 = 15"]
    pieces = export_tokenizer.prompt_texts(texts, width=20)
    assert pieces[0] == "first line" and pieces[-2:] == ["last", "12+3 = 15"]
    assert all(len(p) <= 20 for p in pieces)
    assert "".join(pieces[1:-2]) == "word " * 40
    assert len(export_tokenizer.prompt_texts(["a\n"] * 500)) == 200


def test_a_char_run_on_text_prompts_without_bos_as_it_trained(runs, tmp_path):
    """A char-level model of running text never saw <BOS> (its windows are cut from one token
    stream): lmkit's sample prompt and the exported tokenizer both start from the text alone."""
    from lmkit.data import sequences_start_with_bos
    from lmkit.evaluation.sample import prompt_ids

    loaded = load_run(runs["char_text"])
    assert loaded.tokenizer.bos_id is not None and not sequences_start_with_bos(loaded.config.data)
    assert sequences_start_with_bos(load_run(runs["char"]).config.data)
    text = "Before we proceed"
    assert prompt_ids(loaded.tokenizer, text, bos=False) == loaded.tokenizer.encode(text)
    meta = hf.export_hf(runs["char_text"], tmp_path / "hf").metadata
    assert meta["verification"]["prompt_ids_equal"] and meta["verification"]["adds_bos"] is False
    assert meta["tokenizer"]["add_bos_token"] is False
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert tok(text)["input_ids"] == loaded.tokenizer.encode(text)
