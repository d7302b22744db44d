"""data.sources mixtures on real files: GSM8K's question+answer fields and Tiny Shakespeare,
weighted by text bytes, seeded, cached under a mixture fingerprint; conflicts are one line."""

import json

import numpy as np
import pytest

from lmkit.config import DataConfig, ModelConfig
from lmkit.config.mixture import SourceConfig
from lmkit.data import prepare_data
from lmkit.errors import ConfigError, DataError

GSM8K_TRAIN = "/work/shared/data/gsm8k/train.jsonl"
SHAKESPEARE = "/work/shared/data/tinyshakespeare"
EOS = 256  # byte tokenizer: one token per byte, documents end with <|endoftext|>


def _config(tmp_path, *sources, **kw):
    # dataset=mixture: DataConfig's arithmetic default would otherwise pin the char tokenizer
    return DataConfig(dataset="mixture", tokenizer="byte", cache_dir=str(tmp_path / "cache"),
                      sources=list(sources), **kw)


def _documents(data, split):
    ids = np.asarray(data.tokens(split), dtype=np.int64)
    ends = np.flatnonzero(ids == EOS)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [bytes(ids[s:e].astype(np.uint8)).decode("utf-8") for s, e in zip(starts, ends, strict=True)]


@pytest.fixture(scope="module")
def reference():
    """Independent of lmkit: the train halves of both files as the split rule defines them
    (the last 10% of rows / lines are val)."""
    rows = [json.loads(line) for line in open(GSM8K_TRAIN, encoding="utf-8")]
    n_val = round(len(rows) * 0.1)
    gsm_train = {f"{r['question']}\n{r['answer']}" for r in rows[: len(rows) - n_val]}
    lines = open(f"{SHAKESPEARE}/input.txt", encoding="utf-8").read().splitlines(keepends=True)
    n_val = round(len(lines) * 0.1)
    shakespeare_train_bytes = len("".join(lines[: len(lines) - n_val]).encode())
    return gsm_train, shakespeare_train_bytes


def _shares(data, gsm_train):
    gsm = shakespeare = 0
    for doc in _documents(data, "train"):
        if doc in gsm_train:
            gsm += len(doc.encode())
        else:
            assert doc.endswith("\n")  # a run of whole Shakespeare lines
            shakespeare += len(doc.encode())
    return gsm, shakespeare


def _gsm_shakespeare(tmp_path, w_gsm, w_shakespeare):
    return _config(tmp_path, SourceConfig(dataset=GSM8K_TRAIN, fields=["question", "answer"], weight=w_gsm),
                   SourceConfig(dataset=SHAKESPEARE, weight=w_shakespeare))


@pytest.fixture(scope="module")
def even_mixture(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mix")
    return tmp, prepare_data(_gsm_shakespeare(tmp, 1.0, 1.0))


@pytest.mark.parametrize("weights", [(1.0, 1.0), (3.0, 1.0)])
def test_weighted_mixture_of_gsm8k_fields_and_shakespeare(tmp_path, reference, even_mixture, weights):
    gsm_train, shakespeare_bytes = reference
    data = even_mixture[1] if weights == (1.0, 1.0) else prepare_data(_gsm_shakespeare(tmp_path, *weights))
    gsm, shakespeare = _shares(data, gsm_train)
    assert shakespeare == shakespeare_bytes  # the scarcer source (per unit of weight) is taken whole
    ratio = weights[0] / weights[1]
    assert gsm == pytest.approx(ratio * shakespeare, abs=2000)  # within a document of the weighted share
    shares = {row["dataset"].split("/")[-1]: row["share"] for row in data.stats["mixture"]}
    assert shares["train.jsonl [question+answer]"] == pytest.approx(ratio / (1 + ratio), abs=1e-3)
    assert "mixture of 2 sources" in data.description


def test_mixture_is_deterministic_and_keyed(reference, even_mixture):
    gsm_train, _ = reference
    tmp, first = even_mixture
    again = prepare_data(_gsm_shakespeare(tmp, 1.0, 1.0))
    assert again.shards.reused and again.text_sha256("train") == first.text_sha256("train")
    other = prepare_data(_gsm_shakespeare(tmp, 1.0, 2.0))
    assert not other.shards.reused and other.shards.directory != first.shards.directory
    assert other.shards.directory.name.startswith("mixture-")
    # the order is shuffled (documents of both sources interleave), not one block after the other
    kinds = [doc in gsm_train for doc in _documents(first, "train")[:50]]
    assert 0 < sum(kinds) < 50


def test_unweighted_sources_are_whole_and_keep_their_split_rules(tmp_path, reference):
    gsm_train, _ = reference
    config = _config(tmp_path, SourceConfig(dataset=GSM8K_TRAIN, fields=["question", "answer"], val_fraction=0.5),
                     SourceConfig(dataset=SHAKESPEARE, val_fraction=0.2))
    data = prepare_data(config)
    rows = [json.loads(line) for line in open(GSM8K_TRAIN, encoding="utf-8")]
    lines = open(f"{SHAKESPEARE}/input.txt", encoding="utf-8").read().splitlines(keepends=True)
    gsm_val = [f"{r['question']}\n{r['answer']}" for r in rows[len(rows) - round(len(rows) * 0.5):]]
    shakespeare_val = "".join(lines[len(lines) - round(len(lines) * 0.2):])
    val_docs = _documents(data, "val")
    assert sorted(d for d in val_docs if not d.endswith("\n") or d in set(gsm_val)) == sorted(gsm_val)
    assert sum(len(d.encode()) for d in val_docs if d not in set(gsm_val)) == len(shakespeare_val.encode())
    gsm_bytes = sum(len(d.encode()) for d in _documents(data, "train") if d in gsm_train)
    assert gsm_bytes == sum(len(f"{r['question']}\n{r['answer']}".encode())
                            for r in rows[: len(rows) - round(len(rows) * 0.5)])


def test_conflicts_and_bad_sources_are_one_line(tmp_path):
    src = SourceConfig(dataset=SHAKESPEARE)
    with pytest.raises(ConfigError, match="conflicts with data.sources"):
        prepare_data(DataConfig(dataset=SHAKESPEARE, tokenizer="byte", sources=[src]))
    with pytest.raises(ConfigError, match="a mixture is text data"):
        prepare_data(_config(tmp_path, src, format="chat"))
    with pytest.raises(ConfigError, match="the list is empty"):
        prepare_data(_config(tmp_path))
    with pytest.raises(ConfigError, match="needs data.sources"):
        prepare_data(DataConfig(dataset="mixture", tokenizer="byte"))
    with pytest.raises(DataError, match="plain text .*fields apply to JSON"):
        prepare_data(_config(tmp_path, SourceConfig(dataset=SHAKESPEARE, fields=["text"])))
    with pytest.raises(DataError, match="no column 'solution'; columns: question, answer"):
        prepare_data(_config(tmp_path, SourceConfig(dataset=GSM8K_TRAIN, fields=["question", "solution"])))


def test_too_short_split_advice_names_what_helps(tmp_path):
    """Issue 16: a larger val_fraction makes the train split shorter still."""
    text = tmp_path / "small.txt"
    text.write_text("".join(f"line {i}\n" for i in range(40)))
    model = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=300, vocab_size=257)
    data = prepare_data(DataConfig(dataset=str(text), tokenizer="byte", val_fraction=0.5,
                                   cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match=r"the train split .* a smaller data.val_fraction"):
        data.check_model(model)
    data = prepare_data(DataConfig(dataset=str(text), tokenizer="byte", val_fraction=0.05,
                                   cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match=r"the val split .* a larger data.val_fraction"):
        data.check_model(model.model_copy(update={"block_size": 100}))
