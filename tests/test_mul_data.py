"""The ``gpt2+mul`` tokenizer and the token shards of the two conditions (``baseline``, ``mul_tokens``).

Independent references: GPT-2's own encoding of the same text (the baseline), the UTF-8 length
of the replaced text (bytes), the baseline entry's token count (compression), a hand-counted
parameter total (presets).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmkit.config import DataConfig, build_run_config
from lmkit.data.shards import prepare_shards, token_dtype
from lmkit.data.sources import TextSource, load_text_source
from lmkit.data.synthetic import synthetic_drills
from lmkit.data.tokenizer_mul import GPT2MulTokenizer
from lmkit.data.tokenizers import GPT2Tokenizer, build_tokenizer, load_tokenizer
from lmkit.errors import DataError
from lmkit.events import DataProgress

from conftest import shared

EOT = 50256


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer.from_files(shared("gpt2-tokenizer"))


@pytest.fixture(scope="module")
def toks(gpt2) -> dict[str, GPT2MulTokenizer]:
    return {c: GPT2MulTokenizer.from_gpt2(gpt2, c) for c in ("baseline", "mul_tokens")}


# ------------------------------------------------------------------------------ tokenizer


def test_mul_strings_are_atomic_in_mul_tokens_and_plain_text_in_baseline(gpt2, toks):
    text = "so <MUL_6_9_54> and <MUL_1_1_1>, not <|padding_3|>"
    plain = gpt2.encode(text)
    assert toks["baseline"].encode(text) == plain  # the baseline never matches the strings
    mul = toks["mul_tokens"].encode(text)
    assert mul == gpt2.encode("so ") + [50342] + gpt2.encode(" and ") + [50304] + gpt2.encode(", not <|padding_3|>")
    for tok in toks.values():
        assert tok.vocab_size == 50349 and tok.base_vocab_size == 50257
        assert tok.decode([50342]) == "<MUL_6_9_54>"  # printed in both conditions
        assert tok.decode(gpt2.encode("a") + [50260, 50342, EOT]) == "a<MUL_6_9_54>"  # padding, EOT dropped
        assert 50260 in tok.special_ids() and 50342 not in tok.special_ids()
        assert tok.decode(tok.encode(text)) == text


def test_save_and_load_keep_the_condition(tmp_path, toks):
    fingerprints = {}
    for condition, tok in toks.items():
        tok.save(tmp_path / condition)
        meta = json.loads((tmp_path / condition / "tokenizer_meta.json").read_text())
        assert meta["kind"] == "gpt2+mul" and meta["condition"] == condition and meta["vocab_size"] == 50349
        loaded = load_tokenizer(tmp_path / condition)
        assert isinstance(loaded, GPT2MulTokenizer) and loaded.condition == condition
        assert loaded.fingerprint() == tok.fingerprint()
        assert loaded.added_tokens == tok.added_tokens
        assert loaded.encode("x <MUL_6_9_54>") == tok.encode("x <MUL_6_9_54>")
        fingerprints[condition] = tok.fingerprint()
    assert fingerprints["baseline"] != fingerprints["mul_tokens"]


def test_gpt2_mul_and_data_condition_go_together():
    with pytest.raises(DataError, match="data.condition"):
        build_tokenizer("gpt2+mul")
    with pytest.raises(DataError, match="data.tokenizer=gpt2"):
        build_tokenizer("gpt2", condition="mul_tokens")
    assert build_tokenizer("gpt2+mul", condition="baseline").condition == "baseline"
    assert token_dtype(50349) == np.uint16


@pytest.mark.parametrize(("original", "n_bytes"), [("6*9=54", 6), ("6 * 9 = 54", 10), ("9 × 6", 6)])
def test_a_mul_token_carries_the_bytes_of_the_text_it_replaced(toks, original, n_bytes):
    from lmkit.data.mul_tokens import inject_segments

    text = f"So {original}, café."
    [(ids, counts)] = toks["mul_tokens"].encode_segments_with_bytes([inject_segments(text)])
    assert ids.count(50342) == 1
    assert int(counts[ids.index(50342)]) == n_bytes == len(original.encode())
    assert int(counts.sum()) == len(text.encode())
    # what an evaluation of raw text uses: the same, and plain GPT-2 in the baseline condition
    [(ids2, counts2)] = toks["mul_tokens"].encode_text_with_bytes([text])
    assert ids2 == ids and counts2.tolist() == counts.tolist()
    [(base_ids, base_counts)] = toks["baseline"].encode_text_with_bytes([text])
    assert base_ids == toks["baseline"].encode(text) and int(base_counts.sum()) == len(text.encode())


# ------------------------------------------------------------------------------ shards

DOCS = ["Tom has 6 * 9 = 54 apples and 3x4 pears.", "No facts here, only 106*3 and 2.5*3.",
        "Mia sells 7 × 8 = 56 cups; <MUL_2_2_4> is literal.", "Plain text " * 20,
        "Then 9 * 2 = <<9*2=18>>18 cookies.", "Last one: 5*5=25, café ☕."]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 3), encoding="utf-8")
    return path


def _shards(path, tmp_path, **data):
    config = DataConfig(dataset=str(path), tokenizer="gpt2+mul", cache_dir=str(tmp_path / "cache"),
                        val_fraction=1 / 3, **data)
    events: list = []
    shards, tok = prepare_shards(load_text_source(config), config, events.append)
    return shards, tok, events


def test_condition_legacy_and_synthetic_are_in_the_cache_key(jsonl, tmp_path):
    base, _, _ = _shards(jsonl, tmp_path, condition="baseline")
    mul, tok, _ = _shards(jsonl, tmp_path, condition="mul_tokens")
    legacy, _, _ = _shards(jsonl, tmp_path, condition="mul_tokens", legacy_regex=True)
    synth, _, _ = _shards(jsonl, tmp_path, condition="mul_tokens", include_synthetic=True)
    assert len({base.directory, mul.directory, legacy.directory, synth.directory}) == 4
    assert tok.condition == "mul_tokens"
    assert base.dtype == mul.dtype == np.uint16
    assert not np.isin(np.asarray(base.tokens("train")), np.arange(50304, 50349)).any()
    assert np.isin(np.asarray(mul.tokens("train")), np.arange(50304, 50349)).any()
    # the legacy regex also rewrites 106*3 and 2.5*3: more mul tokens than the guarded one
    assert legacy.stats["mul_tokens"] > mul.stats["mul_tokens"]
    again, tok_again, _ = _shards(jsonl, tmp_path, condition="baseline")  # switching back reuses baseline's
    assert again.reused and again.directory == base.directory and tok_again.condition == "baseline"
    assert again.stats == base.stats


def test_shards_count_the_original_bytes_and_the_stats_match_the_baseline(jsonl, tmp_path):
    base, _, events = _shards(jsonl, tmp_path, condition="baseline")
    mul, tok, _ = _shards(jsonl, tmp_path, condition="mul_tokens")
    rows = {"train": (DOCS * 3)[:12], "val": (DOCS * 3)[12:]}  # the last third of the rows is val
    for split in ("train", "val"):
        ids = np.asarray(mul.tokens(split), dtype=np.int64)
        counts = np.asarray(mul.token_bytes(split), dtype=np.int64)
        # each document is [EOT] (0 bytes) + tokens, whose bytes add up to the original's UTF-8 length
        starts = np.flatnonzero(ids == EOT)
        assert starts[0] == 0 and len(starts) == len(rows[split]) and counts[starts].sum() == 0
        sums = [int(counts[s:e].sum()) for s, e in zip(starts, [*starts[1:], len(ids)], strict=True)]
        assert sums == [len(doc.encode()) for doc in rows[split]]
        assert counts.sum() == np.asarray(base.token_bytes(split), dtype=np.int64).sum()
    train = np.asarray(mul.tokens("train"), dtype=np.int64)
    train_bytes = np.asarray(mul.token_bytes("train"), dtype=np.int64)
    assert train_bytes[np.flatnonzero(train == 50342)[0]] == len(b"6 * 9 = 54") == 10
    assert train_bytes[np.flatnonzero(train == 50322)[0]] == len(b"3x4")
    assert train_bytes[np.flatnonzero(train == 50313)[0]] == len(b"<MUL_2_2_4>")  # a literal string
    assert train_bytes[np.flatnonzero(train == 50344)[0]] == len("7 × 8 = 56".encode()) == 11
    # stats: the same text without injection is exactly the baseline entry's token count
    total = base.count("train") + base.count("val")
    assert mul.stats["baseline_tokens"] == base.stats["total_tokens"] == total
    assert mul.stats["total_tokens"] == mul.count("train") + mul.count("val")
    assert mul.stats["tokens_saved"] == total - mul.stats["total_tokens"] > 0
    n_mul = sum(int(np.isin(np.asarray(mul.tokens(s)), np.arange(50304, 50349)).sum()) for s in ("train", "val"))
    assert mul.stats["mul_tokens"] == n_mul and mul.stats["mul_token_ratio"] == n_mul / mul.stats["total_tokens"]
    assert base.stats["mul_tokens"] == 0 and base.stats["tokens_saved"] == 0
    # progress: documents done, tokens so far, a final event that reads as done
    final = [e for e in events if isinstance(e, DataProgress) and e.stage == "tokenize train"][-1]
    assert final.unit == "documents" and final.completed == final.total == 12 and final.tokens == base.count("train")


def test_synthetic_drills_open_the_train_split_in_both_conditions(jsonl, tmp_path):
    for condition in ("baseline", "mul_tokens"):
        shards, tok, _ = _shards(jsonl, tmp_path, condition=condition, include_synthetic=True)
        train = np.asarray(shards.tokens("train"), dtype=np.int64)
        ends = np.flatnonzero(train == EOT)
        assert ends[0] == 0
        first = tok.decode(train[1 : ends[1]].tolist())
        expected = synthetic_drills() if condition == "baseline" else None
        if expected is not None:
            assert first == expected
        else:
            assert first.startswith("\n\n=== Multiplication Tables ===\n\n1 times 1 equals 1.\n<MUL_1_1_1>\n<MUL_1_1_1>")
        assert int(np.asarray(shards.token_bytes("train"))[: ends[1]].sum()) == len(synthetic_drills().encode())
        assert shards.stats["synthetic_tokens"] == ends[1]
        val = tok.decode(np.asarray(shards.tokens("val")).tolist())
        assert "Multiplication Tables" not in val


def test_a_streamed_source_goes_through_the_same_path(tmp_path, toks):
    docs = [f"Doc {i}: {i % 9 + 1} * 7 = {(i % 9 + 1) * 7} items." for i in range(600)]
    source = TextSource({"train": lambda: iter(docs)}, {"train": None}, "fake-stream", "eos", "fake (streamed)",
                        streaming=True)
    config = DataConfig(dataset="fineweb-edu", tokenizer="gpt2+mul", condition="mul_tokens", include_synthetic=True,
                        max_tokens=10_000, val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    shards, tok, = prepare_shards(source, config, lambda e: None)
    val = np.asarray(shards.tokens("val"), dtype=np.int64)
    train = np.asarray(shards.tokens("train"), dtype=np.int64)
    assert val[0] == EOT and tok.decode(val[1:9].tolist()).startswith("Doc 0: <MUL_1_7_7> items.")
    assert tok.decode(train[1:40].tolist()).startswith("\n\n=== Multiplication Tables ===")
    assert shards.stats["mul_tokens"] > 60  # the drills' facts and one per document
    starts = np.flatnonzero(val == EOT)
    counts = np.asarray(shards.token_bytes("val"), dtype=np.int64)
    whole = [int(counts[s:e].sum()) for s, e in zip(starts[:-1], starts[1:], strict=True)]  # the last may be cut
    assert len(whole) > 10 and whole == [len(d.encode()) for d in docs[: len(whole)]]
    # the documents read past the val budget start the train split, after the drills
    assert tok.decode(train[np.flatnonzero(train == EOT)[1] + 1 :][:9].tolist()).startswith(
        docs[len(starts)].replace("* 7 = ", "").split(":")[0])


def test_a_given_tokenizer_is_used_and_must_be_of_the_condition(jsonl, tmp_path, toks):
    config = DataConfig(dataset=str(jsonl), tokenizer="gpt2+mul", condition="mul_tokens", cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="data.condition=baseline"):
        prepare_shards(load_text_source(config), config, lambda e: None, tokenizer=toks["baseline"])
    shards, used = prepare_shards(load_text_source(config), config, lambda e: None, tokenizer=toks["mul_tokens"])
    assert used is toks["mul_tokens"] and shards.stats["mul_tokens"] > 0
    again, used_again = prepare_shards(load_text_source(config), config, lambda e: None, tokenizer=toks["mul_tokens"])
    assert again.reused and used_again is toks["mul_tokens"]


def test_data_condition_needs_gpt2_mul(jsonl, tmp_path):
    config = DataConfig(dataset=str(jsonl), tokenizer="gpt2", condition="mul_tokens", cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="gpt2\\+mul"):
        prepare_shards(load_text_source(config), config, lambda e: None)
    config = DataConfig(dataset=str(jsonl), tokenizer="gpt2+mul", cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="data.condition"):
        prepare_shards(load_text_source(config), config, lambda e: None)


# ------------------------------------------------------------------------------ presets


def test_presets_of_the_study():
    from lmkit.models import build_model

    big = build_run_config("gpt2-124m-mul")
    n_params = sum(p.numel() for p in build_model(big.model, device="meta").parameters())
    # 124,475,904 (gpt2-124m, 50,304 rows) + 45 more rows of 768
    assert n_params == 124_475_904 + 45 * 768 == 124_510_464 == big.target_params
    t = big.training
    assert (t.warmup_steps, t.warmup_form, t.max_steps, t.lr, t.min_lr_ratio) == (715, "(s+1)/W", 19073, 6e-4, 0.1)
    assert t.batch_size * t.grad_accum_steps * big.model.block_size == 524_288
    assert (t.precision, t.compile, t.checkpoint_interval, t.eval_interval, t.eval_iters) == ("bf16", True, 2000, 500, 20)
    d = big.data
    assert (d.dataset, d.tokenizer, d.condition, d.include_synthetic) == ("fineweb-edu", "gpt2+mul", "mul_tokens", True)
    assert build_run_config("gpt2-124m-mul", ["data.condition=baseline"]).data.condition == "baseline"
    tiny = build_run_config("gpt2-mul-tiny")
    # 50,349*64 (tied) + 512*64 + 2 blocks * (12*64^2 + 13*64) + 2*64
    assert sum(p.numel() for p in build_model(tiny.model, device="meta").parameters()) == 3_355_200
    assert tiny.model.vocab_size == 50349 and tiny.data.include_synthetic and tiny.data.tokenizer == "gpt2+mul"


def test_passing_the_tokenizers_own_added_tokens_again_reuses_the_entry(jsonl, tmp_path):
    """An evaluation rebuilds the val split with the run tokenizer's added tokens; for gpt2+mul
    those are its own 92: the same cache entry, not a second build that adds them twice."""
    first, tok, _ = _shards(jsonl, tmp_path, condition="mul_tokens")
    config = DataConfig(dataset=str(jsonl), tokenizer="gpt2+mul", cache_dir=str(tmp_path / "cache"),
                        val_fraction=1 / 3, condition="mul_tokens")
    again, tok_again = prepare_shards(load_text_source(config), config, lambda e: None,
                                      added_tokens=tuple(tok.added_tokens))
    assert again.reused and again.directory == first.directory
    assert tok_again.fingerprint() == tok.fingerprint()
