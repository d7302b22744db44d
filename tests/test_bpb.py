"""Bits per byte against a byte-level count of the same text: a SentencePiece-style
(Unigram + Metaspace) tokenizer on real Europarl text, per-token byte counts in the shards,
the whole --data file scored (tail included), and the eval's data provenance."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lmkit.config import DataConfig, build_run_config
from lmkit.data import prepare_data
from lmkit.data.tokenizers import ByteTokenizer, CharTokenizer, GPT2Tokenizer, HFTokenizer
from lmkit.evaluation.perplexity import scored_windows, split_loss_sums, token_byte_lengths

from conftest import run_cli, shared

EUROPARL_TRAIN = ("ep-00-01-18.al",)  # tokenizer training text (483 KB)
EUROPARL_RUN = "ep-00-01-19.al"  # the run's data (202 KB)
EUROPARL_EVAL = "ep-00-02-18.al"  # scored with --data (77 KB, Latin-1)

PRESET = """\
model: {{n_layer: 1, n_head: 2, n_embd: 32, d_ff: 64, block_size: 64, pos_encoding: rope, dropout: 0.0}}
data: {{dataset: {data}, tokenizer: "hf:{tok}", encoding: latin-1, val_fraction: 0.1}}
training: {{batch_size: 8, max_steps: 6, lr: 3.0e-3, eval_interval: 6, checkpoint_interval: 6, seed: 1}}
"""


def _latin1(name: str) -> str:
    return shared("europarl-en", name).read_text(encoding="latin-1")


def _unigram_metaspace(folder):
    """A Unigram + Metaspace tokenizer (xlm-roberta's kind) trained with ``tokenizers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lines = [line for name in EUROPARL_TRAIN for line in _latin1(name).splitlines(keepends=True)]
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=1000, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    backend.train_from_iterator(lines, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def metaspace_run(tmp_path_factory):
    """A tiny run on Europarl text with a local ``hf:`` Unigram + Metaspace tokenizer."""
    from lmkit.training.loop import train

    root = tmp_path_factory.mktemp("bpb")
    mp = pytest.MonkeyPatch()
    mp.setenv("LMKIT_CACHE_DIR", str(root / "cache"))
    tok_dir = _unigram_metaspace(root / "unigram")
    data = root / "data" / EUROPARL_RUN  # a copy: one test edits it
    data.parent.mkdir()
    data.write_bytes(shared("europarl-en", EUROPARL_RUN).read_bytes())
    preset = root / "p.yaml"
    preset.write_text(PRESET.format(data=data, tok=tok_dir))
    train(build_run_config(str(preset), [], {"out_dir": ("--out-dir", str(root / "runs")), "name": ("--name", "ms")}))
    yield root, root / "runs" / "ms", tok_dir
    mp.undo()


def _reference_bits(run, text: str) -> tuple[float, int]:
    """Independent count: the ``tokenizers`` backend's ids of every line, the model's
    -log2 p of every token but the first (windows of block_size from the start, the tail
    included), summed."""
    from lmkit.runs import load_run

    loaded = load_run(run, "best")
    backend = loaded.tokenizer.backend
    ids = [i for line in text.splitlines(keepends=True) for i in backend.encode(line, add_special_tokens=False).ids]
    block = loaded.config.model.block_size
    starts = list(range(0, len(ids) - 1, block))
    bits = 0.0
    with torch.no_grad():
        for first in range(0, len(starts), 64):
            rows = [(ids[s : s + block], ids[s + 1 : s + block + 1]) for s in starts[first : first + 64]]
            for width in sorted({len(y) for _, y in rows}):  # the tail is shorter
                x = torch.tensor([xs[:width] for xs, y in rows if len(y) == width])
                y = torch.tensor([y for _, y in rows if len(y) == width])
                logp = torch.log_softmax(loaded.model(x)[0].double(), dim=-1)
                bits -= float(logp.gather(-1, y[..., None]).sum()) / math.log(2)
    return bits, len(ids)


def test_metaspace_bpb_equals_a_byte_level_count_of_the_file(metaspace_run):
    """`lmkit eval --task perplexity --data FILE --encoding latin-1` on a Metaspace `hf:` run:
    n_bytes is the file's UTF-8 length (less the first token, which is never predicted) and
    bpb is sum(-log2 p) / UTF-8 bytes. Dropping the ``▁`` (decode([id])) gives ~20% fewer bytes."""
    root, run, _ = metaspace_run
    path = shared("europarl-en", EUROPARL_EVAL)
    text = _latin1(EUROPARL_EVAL)
    n_utf8 = len(text.encode("utf-8"))
    proc = run_cli("eval", str(run), "--task", "perplexity", "--data", str(path), "--encoding", "latin-1", "--json",
                   cwd=root, env={"LMKIT_CACHE_DIR": str(root / "cache")})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)["results"][0]
    details = result["details"]
    bits, n_ids = _reference_bits(run, text)
    assert details["n_tokens"] == n_ids - 1  # the whole file: the tail shorter than a window too
    first_token_bytes = n_utf8 - details["n_bytes"]
    assert 0 <= first_token_bytes <= 16  # within one token of the file's UTF-8 length
    assert details["text_bytes"] == n_utf8
    assert result["metrics"]["bpb"] == pytest.approx(bits / n_utf8, rel=3e-4)
    assert result["version"] == "2" and result["data_sha256"] is not None


def test_shards_store_per_token_bytes_that_add_up_to_the_text(metaspace_run):
    """The val shard's byte counts add up to the UTF-8 length of the val text exactly; the
    per-id fallback table is within one byte per line (the ``▁`` prepended at line starts)."""
    root, run, tok_dir = metaspace_run
    config = DataConfig(dataset=str(root / "data" / EUROPARL_RUN), tokenizer=f"hf:{tok_dir}",
                        encoding="latin-1", val_fraction=0.1, cache_dir=str(root / "cache"))
    data = prepare_data(config)
    assert data.shards.reused and data.bytes_source("val") == "per token"
    lines = _latin1(EUROPARL_RUN).splitlines(keepends=True)
    n_val = round(len(lines) * 0.1)
    val_text = "".join(lines[-n_val:])
    per_token = data.token_bytes("val")
    assert len(per_token) == len(data.tokens("val"))
    assert int(per_token.sum()) == len(val_text.encode("utf-8"))
    assert data.text_sha256("val") == __import__("hashlib").sha256(val_text.encode("utf-8")).hexdigest()
    table = token_byte_lengths(data.tokenizer)
    by_table = int(table[np.asarray(data.tokens("val"), dtype=np.int64)].sum())
    assert 0 <= by_table - len(val_text.encode("utf-8")) <= n_val
    # what in-training validation calls: the whole split, every token but the first
    from lmkit.runs import load_run

    loaded = load_run(run, "best")
    sums = split_loss_sums(loaded.model.eval(), data, "val", 64, 16, torch.device("cpu"))
    assert sums.n_tokens == len(per_token) - 1 and sums.n_bytes == int(per_token[1:].sum())
    assert split_loss_sums(loaded.model, data, "val", 64, 16, torch.device("cpu"), limit=3, tail=False).n_tokens == 192


def _eval_in_process(run, root) -> dict:
    """``lmkit eval RUN --task perplexity --json`` through Typer's runner (no new interpreter)."""
    from typer.testing import CliRunner

    from lmkit.cli import app

    result = CliRunner().invoke(app, ["eval", str(run), "--task", "perplexity", "--json"],
                                env={"LMKIT_CACHE_DIR": str(root / "cache")})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])["results"][0]


def test_default_eval_records_and_checks_the_val_data(metaspace_run):
    """The default eval (the run's val split) writes the val text's SHA-256 and checks the
    checkpoint's data fingerprint; a source edited since training is reported, and compare
    then sees that the two results come from different data."""
    import hashlib
    import shutil

    from lmkit.compare import compare_runs

    root, run, _ = metaspace_run
    ok = _eval_in_process(run, root)
    data_file = root / "data" / EUROPARL_RUN
    original = data_file.read_text(encoding="latin-1")
    lines = original.splitlines(keepends=True)
    val_utf8 = "".join(lines[-round(len(lines) * 0.1):]).encode("utf-8")
    assert ok["data_sha256"] == hashlib.sha256(val_utf8).hexdigest()
    assert ok["details"]["data_fingerprint_matches"] is True
    assert 0 <= len(val_utf8) - ok["details"]["n_bytes"] <= 16  # the whole split, tail included

    other = root / "runs" / "edited"
    shutil.copytree(run, other)
    try:
        data_file.write_text("".join(lines[:-5]), encoding="latin-1")  # the source changed after training
        moved = _eval_in_process(other, root)
    finally:
        data_file.write_text(original, encoding="latin-1")
    assert moved["details"]["data_fingerprint_matches"] is False
    assert any("differs from the run's" in note for note in moved["notes"])
    assert moved["data_sha256"] not in (None, ok["data_sha256"])
    comparison = compare_runs([str(run), str(other)])
    assert any("different data files" in note for note in comparison.notes)


# ------------------------------------------------------------------------------ per-token bytes, every kind

TEXT = "First Citizen:\nBefore we proceed, hear me.\n  café — naïve 🙂 東京\n"


@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "gpt2"])
def test_every_kind_counts_the_bytes_of_its_text(kind):
    """Per text, the counts add up to its UTF-8 length; byte-level kinds count each token's raw bytes."""
    if kind == "char":
        tok = CharTokenizer.from_texts(["First Citizen:\nBefore we proceed, hear me.\n"])  # no é, 🙂: <UNK>
    elif kind == "byte":
        tok = ByteTokenizer()
    elif kind == "bpe":
        tok = HFTokenizer.train_bpe([TEXT * 4], vocab_size=300)
    else:
        tok = GPT2Tokenizer.from_files(shared("gpt2-tokenizer"))
    for text in (TEXT, "x", "🙂🙂", "  \n"):
        ids, n_bytes = tok.encode_with_bytes(text)
        assert ids == tok.encode(text) and len(n_bytes) == len(ids)
        assert int(np.sum(n_bytes)) == len(text.encode("utf-8"))
    if kind == "char":
        ids, n_bytes = tok.encode_with_bytes("e🙂")
        assert ids == [tok.stoi["e"], tok.unk_id] and list(n_bytes) == [1, 4]  # <UNK> stands for 4 bytes here
    if kind == "gpt2":
        ids, n_bytes = tok.encode_with_bytes("🙂")
        assert list(n_bytes) == [len(tok.enc.decode_single_token_bytes(i)) for i in ids]


def test_scored_windows_cover_every_token_but_the_first():
    tokens = np.arange(11)
    n, batches = scored_windows(tokens, tokens * 10, block_size=4, batch_size=2)
    batches = list(batches)
    assert n == 3 and [b[0].shape for b in batches] == [(2, 4), (1, 2)]
    targets = np.concatenate([b[1].ravel() for b in batches])
    np.testing.assert_array_equal(targets, np.arange(1, 11))
    np.testing.assert_array_equal(np.concatenate([b[2].ravel() for b in batches]), np.arange(1, 11) * 10)
    n, batches = scored_windows(tokens, None, block_size=4, batch_size=2, limit=2)
    assert n == 2 and sum(b[1].size for b in batches) == 8
