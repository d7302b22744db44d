"""`lmkit export --to hf` of the multiplication-tokens study: the HF tokenizer per condition
(checked with transformers' AutoTokenizer), teacher-forced logits on mul ids, --legacy-hf-tokenizer;
and two export rough edges: no transformers tokenizer warning, model.safetensors mode = the others'."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest
import torch
from typer.testing import CliRunner

from conftest import shared

transformers = pytest.importorskip("transformers")

from lmkit.cli import app  # noqa: E402
from lmkit.config import build_run_config  # noqa: E402
from lmkit.data.tokenizers import GPT2Tokenizer  # noqa: E402
from lmkit.export import hf  # noqa: E402
from lmkit.export.safetensors_export import export_safetensors  # noqa: E402
from lmkit.models import build_model  # noqa: E402
from lmkit.runs import load_run  # noqa: E402
from lmkit.training.checkpoint import save_checkpoint  # noqa: E402

# SEEDS_SPEC §1.1, written out by hand
MUL_STRINGS = [(f"<MUL_{a}_{b}_{a * b}>", 50304 + k) for k, (a, b) in
               enumerate((a, b) for a in range(1, 10) for b in range(a, 10))]
PRESET = """\
model: {{n_layer: 1, n_head: 2, n_embd: 32, d_ff: 32, block_size: 32, pos_encoding: learned, dropout: 0.0,
         activation: gelu_tanh, vocab_size: 50349}}
data: {{dataset: {data}, tokenizer: gpt2+mul, condition: {condition}}}
training: {{batch_size: 2, max_steps: 1, seed: 1}}
"""


def _make_run(root, name: str, condition: str, text_file):
    """A run folder built by hand (config.yaml, a step-0 checkpoint, the gpt2+mul tokenizer):
    the export reads nothing else, and a fresh GPT-2-initialised model is as good as a trained
    one for checking that HF computes the same logits."""
    from lmkit.data.tokenizer_mul import GPT2MulTokenizer

    preset = root / f"{name}.yaml"
    preset.write_text(PRESET.format(data=text_file, condition=condition))
    config = build_run_config(str(preset), [], {"name": ("--name", name), "out_dir": ("--out-dir", str(root))})
    torch.manual_seed(0)
    model = build_model(config.model)
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(config.to_yaml())
    save_checkpoint({"model": model.state_dict(), "config": config.model_dump(mode="json"), "step": 0,
                     "tokens": 0}, run / "checkpoints" / "latest.pt")
    GPT2MulTokenizer.from_gpt2(GPT2Tokenizer.from_files(shared("gpt2-tokenizer")), condition).save(run / "tokenizer")
    return run


@pytest.fixture(scope="session")
def mul_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-mul")
    text = root / "sample.txt"
    # longer than block_size (32 tokens): transformers would warn about the sequence length
    text.write_text(shared("gsm8k", "train.jsonl").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return {"mul": _make_run(root, "mul", "mul_tokens", text), "base": _make_run(root, "base", "baseline", text),
            "text": text}


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="session")
def exported(mul_runs, tmp_path_factory):
    """Each condition exported once, with transformers' warnings recorded (``"log"``) and its
    verbosity before and after (``"verbosity"``)."""
    out = tmp_path_factory.mktemp("hf-mul")
    keep, logger = _Keep(), logging.getLogger("transformers")
    before = transformers.utils.logging.get_verbosity()
    logger.addHandler(keep)
    try:
        result = {
            "mul": hf.export_hf(mul_runs["mul"], out / "mul", sample_text=mul_runs["text"]),
            "base": hf.export_hf(mul_runs["base"], out / "base", sample_text=mul_runs["text"]),
        }
    finally:
        logger.removeHandler(keep)
    return {**result, "log": keep.records, "verbosity": (before, transformers.utils.logging.get_verbosity())}


def _auto(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def test_mul_export_tokenizer_has_every_string_at_its_id_and_round_trips(exported, mul_runs):
    result = exported["mul"]
    assert result.status == "verified"
    tok = _auto(result.out)
    assert len(tok) == 50349
    for text, token_id in MUL_STRINGS:
        assert tok.convert_tokens_to_ids(text) == token_id
    assert [tok.convert_tokens_to_ids(f"<|padding_{i}|>") for i in (0, 46)] == [50257, 50303]
    # add_tokens, not special: skip_special_tokens keeps them
    assert tok.decode([50342, 50304], skip_special_tokens=True) == "<MUL_6_9_54><MUL_1_1_1>"
    # the padding strings are special, as lmkit marks them: skip_special_tokens drops them as lmkit's decode
    lmkit_tok = load_run(mul_runs["mul"]).tokenizer
    assert tok.decode([50257, 50342, 50303], skip_special_tokens=True) == "<MUL_6_9_54>"
    assert lmkit_tok.decode([50257, 50342, 50303]) == "<MUL_6_9_54>"
    assert tok.decode([50260]) == "<|padding_3|>"
    # ... and, like <|endoftext|>, HF still reads their literal text as the id where lmkit spells it out:
    # documented in the verification, which compares ordinary text only
    assert tok("a <|padding_3|>", add_special_tokens=False)["input_ids"] == [64, 220, 50260]
    assert 50260 not in lmkit_tok.encode("a <|padding_3|>")
    assert "<|padding_i|>" in json.loads((result.out / "lmkit_export.json").read_text())[
        "verification"]["mul_tokens"]["padding_strings"]
    text = "Then 6 * 9 is <MUL_6_9_54>, and <MUL_9_9_81>!\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert 50342 in ids and 50348 in ids
    assert ids == load_run(mul_runs["mul"]).tokenizer.encode(text)  # the same ids as lmkit's tokenizer
    assert tok.decode(ids, skip_special_tokens=True) == text
    meta = json.loads((result.out / "lmkit_export.json").read_text())
    check = meta["verification"]
    assert check["mul_ids_in_batch"] == 45 and check["max_abs_diff"]["mul"] < 1e-4
    assert check["mul_tokens"]["strings_at_their_ids"] and check["mul_tokens"]["text_ids_equal"]
    assert meta["tokenizer"]["mul_tokens"]["condition"] == "mul_tokens"


def test_teacher_forced_logits_on_mul_ids_match_independently(exported, mul_runs):
    loaded = load_run(mul_runs["mul"])
    ids = [50342, 11, 50304, 50348, 464, 50310] * 5  # mul ids among BPE ids, 30 positions
    idx = torch.tensor([ids])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(exported["mul"].out), local_files_only=True,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        ours, theirs = loaded.model(idx)[0], model(input_ids=idx).logits
    assert theirs.shape == (1, 30, 50349)
    assert float((ours - theirs).abs().max()) < 1e-4


def test_baseline_export_leaves_the_strings_as_text(exported, mul_runs):
    result = exported["base"]
    assert result.status == "verified"
    tok = _auto(result.out)
    assert len(tok) == 50257  # plain GPT-2; the model still has 50,349 rows
    assert json.loads((result.out / "config.json").read_text())["vocab_size"] == 50349
    text = "so <MUL_6_9_54> here"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < 50257 and ids == load_run(mul_runs["base"]).tokenizer.encode(text)
    meta = json.loads((result.out / "lmkit_export.json").read_text())
    assert meta["verification"]["mul_ids_in_batch"] == 45  # logits still checked on the mul rows
    assert meta["tokenizer"]["mul_tokens"]["mul_strings"].startswith("plain text")


def test_legacy_hf_tokenizer_adds_the_strings_and_warns(mul_runs, tmp_path):
    out = tmp_path / "legacy"
    res = CliRunner().invoke(app, ["export", str(mul_runs["base"]), str(out), "--to", "hf", "--legacy-hf-tokenizer",
                                   "--sample-text", str(mul_runs["text"])])
    assert res.exit_code == 0, res.output
    assert "warning: --legacy-hf-tokenizer" in res.output and "differ" in res.output
    tok = _auto(out)
    assert len(tok) == 50349 and all(tok.convert_tokens_to_ids(s) == i for s, i in MUL_STRINGS)
    assert tok.decode([50342], skip_special_tokens=True) == "<MUL_6_9_54>"
    check = json.loads((out / "lmkit_export.json").read_text())["verification"]
    assert check["passed"] and check["mul_tokens"]["text_ids_equal"] is False
    assert "expected" in check["mul_tokens"]["differs_from_lmkit"]
    # --to safetensors has no HF tokenizer: refused (exit 2)
    bad = CliRunner().invoke(app, ["export", str(mul_runs["base"]), str(tmp_path / "st"), "--to", "safetensors",
                                   "--legacy-hf-tokenizer"])
    assert bad.exit_code == 2


def test_export_lets_no_transformers_tokenizer_warning_through(exported, mul_runs):
    # the sample is longer than the 32-token model_max_length, so transformers would warn
    assert len(load_run(mul_runs["mul"]).tokenizer.encode(mul_runs["text"].read_text())) > 32
    assert exported["mul"].metadata["verification"]["tokenizer_ids_equal"] is True
    assert not [r for r in exported["log"] if "Token indices sequence length" in r.getMessage()]
    before, after = exported["verbosity"]
    assert after == before  # scoped: transformers' own verbosity is put back


def test_exported_files_share_one_mode_that_respects_the_umask(mul_runs, tmp_path):
    umask = 0o002  # not the usual 022: the modes must follow the umask, not be fixed at 644
    old = os.umask(umask)
    try:
        hf_out = hf.export_hf(mul_runs["mul"], tmp_path / "hf", verify=False).out
        st_out = export_safetensors(mul_runs["mul"], tmp_path / "st", verify=False).out
    finally:
        os.umask(old)
    for folder in (hf_out, st_out):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}
        assert modes["model.safetensors"] == 0o666 & ~umask, modes
        assert set(modes.values()) == {0o666 & ~umask}, modes


def test_legacy_hf_tokenizer_in_the_mul_condition_adds_padding_non_special(mul_runs, tmp_path):
    from lmkit.export.tokenizer import save_hf_tokenizer

    info = save_hf_tokenizer(load_run(mul_runs["mul"]).tokenizer, tmp_path, run_tokenizer_dir=mul_runs["mul"] / "tokenizer",
                             legacy_hf_tokenizer=True)
    assert info["mul_tokens"]["padding_strings"].endswith("as the original)")
    tok = _auto(tmp_path)
    assert tok.decode([50257, 50342], skip_special_tokens=True) == "<|padding_0|><MUL_6_9_54>"
