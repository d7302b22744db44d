"""Tokenizer round trips, the seed vocabulary, saving and offline reloading."""

import pytest

from lmkit.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    HFTokenizer,
    build_tokenizer,
    load_tokenizer,
)
from lmkit.errors import DataError

from conftest import shared

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n  café — naïve 🙂\n"


def test_char_is_seed_000_vocabulary():
    tok = CharTokenizer()
    assert tok.vocab_size == 35
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.encode("0") == [4] and tok.encode(",") == [34]
    ids = tok.encode("(12+3)*4 = 60")
    assert tok.decode(ids) == "(12+3)*4 = 60"
    assert tok.encode("x") == [3]  # unknown -> <UNK>
    assert tok.decode([1, *tok.encode("7"), 2, 0]) == "7"  # specials dropped


def test_char_from_text_covers_the_text():
    tok = CharTokenizer.from_texts([TEXT])
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.vocab_size == 4 + len(set(TEXT))


def test_byte_round_trip_including_unicode():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eos_id == 256
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert max(tok.encode(TEXT)) < 256


def test_bpe_trains_to_size_and_round_trips():
    text = shared("tinyshakespeare", "input.txt").read_text()[:200_000]
    tok = HFTokenizer.train_bpe(text.splitlines(keepends=True), vocab_size=600)
    assert tok.vocab_size == 600 and tok.eos_id is not None
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert len(tok.encode(text[:5000])) < 5000 / 2  # merges actually compress


def test_gpt2_from_local_openai_files():
    tok = GPT2Tokenizer.from_files(shared("gpt2-tokenizer"))
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_gpt2_without_files_or_network_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("LMKIT_GPT2_DIR", str(tmp_path))
    with pytest.raises(DataError, match="encoder.json"):
        build_tokenizer("gpt2")


@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "gpt2"])
def test_save_and_reload_offline(kind, tmp_path):
    if kind == "gpt2":
        shared("gpt2-tokenizer")
    texts = [TEXT * 3]
    tok = build_tokenizer(kind, train_texts=iter(texts), bpe_vocab_size=300)
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.kind == tok.kind and again.vocab_size == tok.vocab_size
    assert again.encode(TEXT) == tok.encode(TEXT)
    assert again.decode(again.encode(TEXT)) == TEXT
    assert again.fingerprint() == tok.fingerprint()


def test_load_tokenizer_missing_meta(tmp_path):
    with pytest.raises(DataError, match="tokenizer_meta.json"):
        load_tokenizer(tmp_path)


def test_hf_tokenizer_from_local_file(tmp_path):
    tok = HFTokenizer.train_bpe([TEXT * 5], vocab_size=280)
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    loaded = build_tokenizer(f"hf:{tmp_path / 'tokenizer.json'}")
    assert loaded.encode(TEXT) == tok.encode(TEXT)
