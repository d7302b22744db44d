"""Added tokens at fixed ids on every tokenizer kind: encoding, decoding, byte counts,
saving and reloading, the shard cache key, and the Hugging Face export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmkit.config import DataConfig
from lmkit.data import prepare_data
from lmkit.data.token_bytes import special_id_mask, token_byte_table
from lmkit.data.tokenizers import (
    AddedToken,
    ByteTokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    HFTokenizer,
    build_tokenizer,
    load_tokenizer,
)
from lmkit.errors import DataError

from conftest import shared

TEXT = "hear me speak, café 🙂\nthe end\n"


def _make(kind: str, tmp_path):
    if kind == "char":
        return CharTokenizer.from_texts([TEXT])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        return GPT2Tokenizer.from_files(shared("gpt2-tokenizer"))
    bpe = HFTokenizer.train_bpe([TEXT * 5], vocab_size=300)
    if kind == "bpe":
        return bpe
    bpe.backend.save(str(tmp_path / "tokenizer.json"))
    return build_tokenizer(f"hf:{tmp_path}")


@pytest.fixture(params=["char", "byte", "bpe", "gpt2", "hf"])
def with_added(request, tmp_path):
    """A tokenizer of each kind with ``<A>`` at base+3 and a special ``<SEP>`` at base+5
    (base+0..2 and base+4 unused)."""
    tok = _make(request.param, tmp_path)
    base = tok.vocab_size
    tok.add_tokens([AddedToken("<A>", base + 3), AddedToken("<SEP>", base + 5, special=True)])
    return tok, base


def test_added_tokens_encode_decode_and_count_bytes(with_added):
    tok, base = with_added
    assert tok.vocab_size == base + 6 and tok.base_vocab_size == base
    text = "hear<A>me<SEP> speak<A>"
    ids = tok.encode(text)
    plain = tok.encode("hear") + [base + 3] + tok.encode("me") + [base + 5] + tok.encode(" speak") + [base + 3]
    assert ids == plain
    assert tok.encode_batch([text, "the"]) == [plain, tok.encode("the")]
    assert tok.decode(ids) == "hear<A>me speak<A>"  # the special one is dropped
    assert tok.decode([base, base + 4]) == ""  # unused ids decode to nothing
    got, n_bytes = tok.encode_with_bytes(text)
    assert got == ids and int(np.sum(n_bytes)) == len(text.encode("utf-8"))
    assert n_bytes[ids.index(base + 3)] == 3
    table = token_byte_table(tok, size=base + 10)
    assert table[base + 3] == 3 and table[base + 5] == 0 and table[base + 4] == 0 and len(table) == base + 10
    mask = special_id_mask(tok, size=base + 10)
    assert list(np.flatnonzero(mask[base:])) == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_added_tokens_survive_save_and_load(with_added, tmp_path):
    tok, base = with_added
    tok.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "tokenizer_meta.json").read_text())
    assert meta["vocab_size"] == base + 6 and len(meta["added_tokens"]) == 2
    again = load_tokenizer(tmp_path / "saved")
    assert again.added_tokens == tok.added_tokens and again.vocab_size == base + 6
    assert again.encode("x<A>y<SEP>") == tok.encode("x<A>y<SEP>")
    assert again.fingerprint() == tok.fingerprint()


def test_added_tokens_change_the_fingerprint(tmp_path):
    plain = ByteTokenizer()
    extended = ByteTokenizer()
    extended.add_tokens([("<A>", 300)])
    other = ByteTokenizer()
    other.add_tokens([("<A>", 301)])
    assert len({plain.fingerprint(), extended.fingerprint(), other.fingerprint()}) == 3
    assert ByteTokenizer().fingerprint() == plain.fingerprint()


def test_bad_added_tokens_are_one_line_errors():
    tok = CharTokenizer("abc")
    with pytest.raises(DataError, match="id 5 is taken"):
        tok.add_tokens([("<A>", 5)])
    tok.add_tokens([("<A>", 10)])
    with pytest.raises(DataError, match="already '<A>'"):
        tok.add_tokens([("<B>", 10)])
    with pytest.raises(DataError, match="already a token"):
        tok.add_tokens([("<A>", 11)])
    with pytest.raises(DataError, match="already a token"):
        tok.add_tokens([("a", 12)])
    with pytest.raises(DataError, match="empty"):
        tok.add_tokens([("", 13)])


def mul_tokens() -> list[AddedToken]:
    """The 45 ``<MUL_a_b_c>`` tokens (a <= b) at 50304..50348, row-major (domain-token-gpt2)."""
    pairs = [(a, b) for a in range(1, 10) for b in range(a, 10)]
    return [AddedToken(f"<MUL_{a}_{b}_{a * b}>", 50304 + k) for k, (a, b) in enumerate(pairs)]


def test_gpt2_mul_token_layout():
    tok = GPT2Tokenizer.from_files(shared("gpt2-tokenizer"))
    tok.add_tokens(mul_tokens())
    assert tok.vocab_size == 50349
    assert tok.encode("<MUL_6_9_54>") == [50342] and tok.encode("<MUL_1_1_1>") == [50304]
    assert tok.encode("so <MUL_9_9_81>.") == [568, 220, 50348, 13]
    assert tok.encode("<MUL_6_9_55>") != [50342]  # not a token: plain BPE
    table = token_byte_table(tok)
    assert table[50342] == len("<MUL_6_9_54>") and not table[50257:50304].any() and table[50256] == 0


@pytest.mark.parametrize("kind", ["gpt2", "bpe", "char"])
def test_export_writes_added_tokens_at_their_ids(kind, tmp_path):
    """transformers' PreTrainedTokenizerFast, loading the exported folder, gives the added
    tokens their ids (unused ids are special placeholders) and lmkit's ids for text."""
    from transformers import PreTrainedTokenizerFast

    from lmkit.export.tokenizer import save_hf_tokenizer

    tok = _make(kind, tmp_path)
    if kind == "gpt2":
        tok.add_tokens(mul_tokens())
        text = "What is 6*9? <MUL_6_9_54>, so 54.<MUL_2_3_6>"
    else:
        base = tok.vocab_size
        tok.add_tokens([AddedToken("<A>", base + 2), AddedToken("<SEP>", base + 4, special=True)])
        text = "hear<A>me speak<SEP>the end"
    out = tmp_path / "export"
    out.mkdir()
    info = save_hf_tokenizer(tok, out)
    assert info["added_tokens"] == len(tok.added_tokens)
    hf = PreTrainedTokenizerFast.from_pretrained(str(out))
    assert len(hf) == tok.vocab_size
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    for added in tok.added_tokens:
        assert hf.convert_tokens_to_ids(added.text) == added.id
    entries = {e["id"]: e for e in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    unused = set(range(tok.base_vocab_size, tok.vocab_size)) - {t.id for t in tok.added_tokens}
    assert unused and all(entries[i]["special"] and entries[i]["content"].startswith("<|padding_") for i in unused)


def test_added_tokens_are_part_of_the_shard_cache_key(tmp_path):
    """Shards made with added tokens hold their ids and are never reused for a tokenizer
    with other (or no) added tokens."""
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: 6*9 is <MUL>\n" for i in range(300)))
    config = DataConfig(dataset=str(text), tokenizer="byte")
    plain = prepare_data(config)
    added = prepare_data(config, added_tokens=(AddedToken("<MUL>", 300),))
    assert added.shards.directory != plain.shards.directory and not added.shards.reused
    assert added.tokenizer.added_tokens == (AddedToken("<MUL>", 300),)
    assert 300 in np.asarray(added.tokens("train")) and 300 not in np.asarray(plain.tokens("train"))
    assert added.fingerprint() != plain.fingerprint()
    # the added token's bytes are its text's: the split's counts still add up to the text
    lines = text.read_text().splitlines(keepends=True)
    assert int(added.token_bytes("val").sum()) == len("".join(lines[-30:]).encode())
    again = prepare_data(config, added_tokens=(AddedToken("<MUL>", 300),))
    assert again.shards.reused and again.shards.directory == added.shards.directory
    moved = prepare_data(config, added_tokens=(AddedToken("<MUL>", 301),))
    assert not moved.shards.reused and moved.shards.directory != added.shards.directory
    assert 301 in np.asarray(moved.tokens("train"))


def test_a_changed_local_hf_tokenizer_file_rebuilds_the_shards(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i} of some text\n" for i in range(300)))
    folder = tmp_path / "tok"
    folder.mkdir()
    HFTokenizer.train_bpe([text.read_text()], vocab_size=280).backend.save(str(folder / "tokenizer.json"))
    config = DataConfig(dataset=str(text), tokenizer=f"hf:{folder}")
    first = prepare_data(config)
    assert prepare_data(config).shards.reused
    HFTokenizer.train_bpe([text.read_text()], vocab_size=300).backend.save(str(folder / "tokenizer.json"))
    second = prepare_data(config)
    assert not second.shards.reused and second.shards.directory != first.shards.directory
    assert second.tokenizer.vocab_size == 300


def test_a_token_replacing_other_text_counts_the_text_it_replaced():
    """A condition that rewrites ``6*9=54`` into ``<MUL_6_9_54>`` gives the token the 6 bytes
    it replaced (a per-id table would say 12)."""
    tok = GPT2Tokenizer.from_files(shared("gpt2-tokenizer"))
    tok.add_tokens(mul_tokens())
    [(ids, n_bytes)] = tok.encode_segments_with_bytes([["so ", (50342, "6*9=54"), ", 9 × 6", (50342, "")]])
    assert ids == tok.encode("so ") + [50342] + tok.encode(", 9 × 6") + [50342]
    assert int(n_bytes[len(tok.encode("so "))]) == 6 and int(n_bytes[-1]) == 0
    assert int(n_bytes.sum()) == len("so 6*9=54, 9 × 6".encode())
