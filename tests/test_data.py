"""Text sources through `datasets`, token shards and their cache, data/model agreement."""

import json
import os
import time

import numpy as np
import pytest

from lmkit.config import DataConfig, ModelConfig
from lmkit.data import prepare_data
from lmkit.data import sources as sources_module
from lmkit.data.shards import token_dtype
from lmkit.errors import ConfigError, DataError
from lmkit.events import DataReady

from conftest import shared


def collect():
    events = []
    return events, events.append


def test_single_file_is_split_90_10_by_rows():
    path = shared("tinyshakespeare", "input.txt")
    events, emit = collect()
    data = prepare_data(DataConfig(dataset=str(path), tokenizer="byte"), emit)
    ready = [e for e in events if isinstance(e, DataReady)][0]
    assert "train 36,000 rows, val 4,000 rows" in ready.description
    lines = path.read_text().splitlines(keepends=True)
    train_text, val_text = "".join(lines[:36000]), "".join(lines[36000:])
    assert data.split_sizes() == {"val": len(val_text.encode()), "train": len(train_text.encode())}
    assert data.tokenizer.decode(data.tokens("val")[:200].tolist()) == val_text[:200]
    assert data.shards.dtype == np.uint16


def test_shards_are_reused_until_the_source_changes(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i} of some text\n" for i in range(500)))
    config = DataConfig(dataset=str(text), tokenizer="char")
    first = prepare_data(config)
    meta = json.loads((first.shards.directory / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "char" and meta["splits"]["train"]["tokens"] > 0
    fingerprint = meta["source"]["fingerprint"]
    mtime = os.stat(first.shards.directory / "train.bin").st_mtime_ns
    time.sleep(0.01)
    events, emit = collect()
    second = prepare_data(config, emit)
    assert second.shards.reused and second.shards.directory == first.shards.directory
    assert os.stat(second.shards.directory / "train.bin").st_mtime_ns == mtime
    assert [e for e in events if isinstance(e, DataReady)][0].reused
    np.testing.assert_array_equal(second.tokens("train"), first.tokens("train"))

    text.write_text(text.read_text() + "one more line\n")
    third = prepare_data(config)
    assert not third.shards.reused and third.shards.directory != first.shards.directory
    assert json.loads((third.shards.directory / "meta.json").read_text())["source"]["fingerprint"] != fingerprint


def test_tokenizer_change_rebuilds(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("abc def\n" * 300)
    a = prepare_data(DataConfig(dataset=str(text), tokenizer="char"))
    b = prepare_data(DataConfig(dataset=str(text), tokenizer="byte"))
    assert a.shards.directory != b.shards.directory


def test_truncated_shard_is_detected(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("hello world\n" * 300)
    config = DataConfig(dataset=str(text), tokenizer="byte")
    data = prepare_data(config)
    shard = data.shards.directory / "train.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"train.bin: .* truncated or corrupt"):
        prepare_data(config)


def test_latin1_files_fail_clearly_then_load_with_encoding():
    folder = shared("europarl-en")
    with pytest.raises(DataError) as info:
        prepare_data(DataConfig(dataset=str(folder), tokenizer="byte"))
    message = str(info.value)
    assert "not valid utf-8" in message and "--encoding latin-1" in message and ".al" in message
    data = prepare_data(DataConfig(dataset=str(folder), tokenizer="char", encoding="latin-1"))
    assert sum(data.split_sizes().values()) > 2_000_000
    assert "í" in data.tokenizer.alphabet  # decoded from byte 0xED


def test_folder_with_named_splits(tmp_path):
    (tmp_path / "wiki.train.raw").write_text("train text here\n" * 200)
    (tmp_path / "wiki.valid.raw").write_text("valid text here\n" * 50)
    (tmp_path / "wiki.test.raw").write_text("test text here\n" * 50)
    data = prepare_data(DataConfig(dataset=str(tmp_path), tokenizer="byte"))
    assert data.split_sizes() == {"val": 16 * 50, "train": 16 * 200, "test": 15 * 50}


def test_folder_without_train_file(tmp_path):
    (tmp_path / "wiki.valid.raw").write_text("x\n")
    with pytest.raises(DataError, match="no training file"):
        prepare_data(DataConfig(dataset=str(tmp_path), tokenizer="byte"))


def test_jsonl_documents_are_separated_by_eos(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"content": f"document number {i}"}) + "\n" for i in range(40)))
    with pytest.raises(DataError, match="has no column 'text'; columns: content"):
        prepare_data(DataConfig(dataset=str(path), tokenizer="byte"))
    data = prepare_data(DataConfig(dataset=str(path), tokenizer="byte", text_field="content"))
    train = data.tokens("train")
    assert int((train == 256).sum()) == 36  # one EOS after each of the 36 training documents


def test_missing_path_and_unknown_name():
    with pytest.raises(DataError, match="not a file or folder, nor a known data set"):
        prepare_data(DataConfig(dataset="no/such/file.txt", tokenizer="byte"))


def test_hub_name_offline_fails_fast_with_local_alternative(monkeypatch):
    monkeypatch.setattr(sources_module, "_hub_reachable", lambda timeout=3.0: False)
    started = time.time()
    with pytest.raises(DataError) as info:
        prepare_data(DataConfig(dataset="wikitext-2-raw-v1", tokenizer="byte"))
    assert time.time() - started < 15
    message = str(info.value)
    assert "wikitext-2-raw-v1" in message and "no network" in message and "--data path/to/train.txt" in message


def test_streamed_source_takes_val_first_then_train(tmp_path, monkeypatch):
    path = tmp_path / "stream.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i} " * 20}) + "\n" for i in range(200)))
    spec = sources_module.HubSource("json", None, streaming=True, separator="eos", kwargs={"data_files": str(path)})
    monkeypatch.setitem(sources_module.HUB_SOURCES, "local-stream", spec)
    monkeypatch.setattr(sources_module, "_hub_reachable", lambda timeout=3.0: True)
    with pytest.raises(DataError, match="data.max_tokens"):
        prepare_data(DataConfig(dataset="local-stream", tokenizer="byte"))
    data = prepare_data(DataConfig(dataset="local-stream", tokenizer="byte", max_tokens=5000, val_fraction=0.1))
    assert data.split_sizes() == {"val": 500, "train": 5000}
    assert data.tokenizer.decode(data.tokens("val")[:6].tolist()) == "doc 0 "


def test_token_dtype():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(250002) == np.uint32


def test_arithmetic_jsonl_folder_is_detected(tmp_path):
    from lmkit.data.arithmetic import generate_arithmetic, write_jsonl

    splits = generate_arithmetic()
    write_jsonl(splits["train"][:100], tmp_path / "pilot_train.jsonl")
    write_jsonl(splits["val"][:20], tmp_path / "pilot_val.jsonl")
    data = prepare_data(DataConfig(dataset=str(tmp_path), tokenizer="char"))
    assert data.task == "arithmetic" and data.split_sizes() == {"train": 100, "val": 20}


def test_data_must_fit_the_model(tmp_path):
    data = prepare_data(DataConfig())
    ok = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=32, vocab_size=35)
    data.check_model(ok)
    with pytest.raises(ConfigError, match="block_size: 16 is shorter than the longest example"):
        data.check_model(ok.model_copy(update={"block_size": 16}))
    with pytest.raises(ConfigError, match="smaller than the char tokenizer"):
        data.check_model(ok.model_copy(update={"vocab_size": 20}))


def test_val_split_shorter_than_a_window_is_bad_input(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("".join(f"line {i}\n" for i in range(20)))
    data = prepare_data(DataConfig(dataset=str(text), tokenizer="char"))
    model = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=32, vocab_size=data.tokenizer.vocab_size)
    with pytest.raises(DataError, match=r"the val split has \d+ tokens, fewer than block_size \+ 1 = 33"):
        data.check_model(model)


def test_utf16_without_bom_is_one_line():
    with pytest.raises(DataError, match="not valid utf-16"):
        prepare_data(DataConfig(dataset=str(shared("europarl-en")), tokenizer="byte", encoding="utf-16"))


def test_nested_text_field_in_local_jsonl(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"translation": {"en": f"sentence {i}", "fr": "phrase"}}) + "\n"
                            for i in range(30)))
    data = prepare_data(DataConfig(dataset=str(path), tokenizer="byte", text_field="translation.en"))
    assert data.tokenizer.decode(data.tokens("train")[:10].tolist()) == "sentence 0"


def test_non_text_column_and_empty_file_and_markers(tmp_path):
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(30)))
    with pytest.raises(DataError, match="holds int values, not text"):
        prepare_data(DataConfig(dataset=str(numbers), tokenizer="byte"))
    empty = tmp_path / "empty" / "train.txt"
    empty.parent.mkdir()
    empty.write_text("")
    with pytest.raises(DataError, match="train.txt is empty"):
        prepare_data(DataConfig(dataset=str(empty), tokenizer="byte"))
    folder = tmp_path / "spark"
    folder.mkdir()
    (folder / "_SUCCESS").write_text("")
    (folder / "part-0.txt").write_text("some text\n" * 100)
    assert prepare_data(DataConfig(dataset=str(folder), tokenizer="byte")).split_sizes()["train"] > 0


# ------------------------------------------------------------------------------ per-token byte counts


def test_shards_store_byte_counts_and_old_entries_fall_back_to_the_table(tmp_path):
    """Each split gets ``SPLIT.bytes`` (uint8, widened to uint16 when a token covers more than
    255 bytes) adding up to its text's UTF-8 length, and the text's SHA-256; an entry written
    before these existed still loads, with the per-id table and a SHA-256 of the decoded text."""
    import hashlib

    from lmkit.data.tokenizers import AddedToken

    long = "<" + "x" * 298 + ">"
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"línea {i} 🙂 {long if i % 7 == 0 else ''}\n" for i in range(200)), encoding="utf-8")
    lines = text.read_text(encoding="utf-8").splitlines(keepends=True)
    val_text = "".join(lines[-20:])
    data = prepare_data(DataConfig(dataset=str(text), tokenizer="byte"), added_tokens=(AddedToken(long, 400),))
    meta = json.loads((data.shards.directory / "meta.json").read_text())
    assert meta["splits"]["val"]["bytes_dtype"] == "uint16" and (data.shards.directory / "val.bytes").is_file()
    assert int(data.token_bytes("val").sum()) == len(val_text.encode()) == meta["splits"]["val"]["n_bytes"]
    assert int(np.asarray(data.token_bytes("val")).max()) == 300
    assert data.text_sha256("val") == hashlib.sha256(val_text.encode()).hexdigest()

    plain = prepare_data(DataConfig(dataset=str(text), tokenizer="byte"))
    meta = json.loads((plain.shards.directory / "meta.json").read_text())
    assert meta["splits"]["val"]["bytes_dtype"] == "uint8"
    for info in meta["splits"].values():  # make it look like an entry from before the byte counts
        (plain.shards.directory / info.pop("bytes_file")).unlink()
        for key in ("bytes_dtype", "n_bytes", "text_sha256"):
            info.pop(key)
    (plain.shards.directory / "meta.json").write_text(json.dumps(meta))
    old = prepare_data(DataConfig(dataset=str(text), tokenizer="byte"))
    assert old.shards.reused and old.bytes_source("val") == "per-id table"
    assert int(old.token_bytes("val").sum()) == len(val_text.encode())
    assert old.text_sha256("val") == hashlib.sha256(val_text.encode()).hexdigest()


def test_a_truncated_byte_count_file_is_one_line_error(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}\n" for i in range(100)))
    data = prepare_data(DataConfig(dataset=str(text), tokenizer="byte"))
    path = data.shards.directory / "val.bytes"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match="val.bytes.*truncated"):
        prepare_data(DataConfig(dataset=str(text), tokenizer="byte"))
