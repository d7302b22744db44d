"""Chat data (data.format: chat): seed 004's SFT text, the loss mask from turn lengths, the
legacy pad mask, mul-token injection on assistant turns only, and prepare_data's chat path."""

import json

import numpy as np
import pytest

from lmkit.config import DataConfig
from lmkit.data import make_train_batches, prepare_data
from lmkit.data.batching import IGNORE_INDEX, LabelledSequence, pad_sequences
from lmkit.data.chat import ChatItem, Turn, chat_parts, chat_text, encode_chat, item_from_row
from lmkit.data.tokenizers import ByteTokenizer
from lmkit.errors import ConfigError, DataError
from lmkit.events import DataReady, Notice

GSM8K = "/work/shared/data/gsm8k"
EOS = 256  # the byte tokenizer's <|endoftext|>, also its padding here (as GPT-2's eos = pad in the seed)


def _item(row):
    return item_from_row(row, "test")


def test_text_format_system_first_exact_strings():
    tulu = _item({"messages": [
        {"role": "user", "content": "  Hi there \n"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": ""},  # empty turns are left out (as the seed's format_messages_to_text)
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."},
    ]})
    # seed 004 sft_tulu.py: system moved first, "Role: content" joined by "\n" (EOS added at encode time)
    assert chat_text(tulu) == "System: Be brief.\nUser: Hi there\nAssistant: Hello!\nUser: Bye\nAssistant: Bye."
    gsm = _item({"question": " What is 2+3? ", "answer": "2+3=5\n#### 5 "})
    # seed 004 sft_gsm8k.py: f"User: {question}\nAssistant: {answer}{eos}"
    assert chat_text(gsm) == "User: What is 2+3?\nAssistant: 2+3=5\n#### 5"
    parts = chat_parts(tulu)
    assert "".join(seg for segs, _ in parts for seg in segs) == chat_text(tulu)
    assert [("".join(segs), a) for segs, a in parts] == [
        ("System: Be brief.\nUser: Hi there\nAssistant:", False), (" Hello!", True),
        ("\nUser: Bye\nAssistant:", False), (" Bye.", True)]


def test_bad_rows_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="unknown role 'tool'"):
        _item({"messages": [{"role": "tool", "content": "x"}]})
    with pytest.raises(DataError, match="needs 'messages' or 'question' and 'answer'"):
        _item({"text": "x"})
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{not json\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not a JSON object"):
        prepare_data(DataConfig(dataset=str(bad), format="chat", tokenizer="byte"))


def _reference_labels(text, answer_spans, eos_labelled=True):
    """Byte tokenizer: one id per byte, so the expected labels follow from character offsets."""
    ids = list(text.encode()) + [EOS]
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in answer_spans:
        for i in range(start, end):
            labels[i] = ids[i]
    if eos_labelled:
        labels[-1] = EOS
    return ids, labels


def test_mask_from_lengths_learns_eos_and_hides_prompt():
    items = [_item({"question": "Hi?", "answer": "Yo."}),
             _item({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                 {"role": "user", "content": "c"}, {"role": "assistant", "content": "dd"}]})]
    enc = encode_chat(items, ByteTokenizer())
    text0 = "User: Hi?\nAssistant: Yo."
    start = text0.index("Assistant:") + len("Assistant:")  # the answer's leading space onwards
    ids0, labels0 = _reference_labels(text0, [(start, len(text0))])
    assert list(enc.sequences[0]) == ids0 and enc.sequences[0].labels == labels0
    text1 = "User: a\nAssistant: b\nUser: c\nAssistant: dd"
    first = text1.index("Assistant:") + 10
    second = text1.rindex("Assistant:") + 10
    ids1, labels1 = _reference_labels(text1, [(first, first + 2), (second, len(text1))])
    assert list(enc.sequences[1]) == ids1 and enc.sequences[1].labels == labels1
    assert enc.label_tokens == sum(1 for s in enc.sequences for x in s.labels[1:] if x != IGNORE_INDEX)

    # pad == eos: in a padded batch the real final EOS is still a target; the padding is not
    x, y = pad_sequences(enc.sequences, pad_id=EOS)
    n0 = len(ids0) - 1
    assert y[0, n0 - 1] == EOS  # the last target of the short row: its EOS
    assert (y[0, n0:] == IGNORE_INDEX).all() and (x[0, n0:] == EOS).all()
    assert y[1, -1] == EOS
    # the prompt is not learned: no target inside "User: Hi?\nAssistant:"
    assert (y[0, : start - 1] == IGNORE_INDEX).all() and y[0, start - 1] == ord(" ")


def test_legacy_pad_mask_hides_eos_and_learns_prompt():
    item = _item({"question": "Hi?", "answer": "Yo."})
    seq = encode_chat([item], ByteTokenizer(), legacy_pad_mask=True).sequences[0]
    text = "User: Hi?\nAssistant: Yo."
    # seed: labels = input_ids; labels[input_ids == pad_id (= eos)] = -100
    assert seq.labels == list(text.encode()) + [IGNORE_INDEX]
    x, y = pad_sequences([seq], pad_id=EOS)
    assert y[0, -1] == IGNORE_INDEX and (y[0, :-1] != IGNORE_INDEX).all()


def test_loss_on_all_labels_every_token():
    item = _item({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                               {"role": "assistant", "content": "a"}]})
    seq = encode_chat([item], ByteTokenizer(), loss_on="all").sequences[0]
    assert seq.labels == list(seq) and seq[-1] == EOS
    with pytest.raises(DataError, match="loss_on"):
        encode_chat([item], ByteTokenizer(), loss_on="prompt")


def test_truncation_counts_and_keeps_the_fingerprint(tmp_path):
    rows = [{"question": "q" * n, "answer": "a" * n} for n in (2, 3, 40, 50, 4, 5)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = DataConfig(dataset=str(path), format="chat", tokenizer="byte", val_fraction=0.34)
    whole = prepare_data(config)
    events = []
    cut = prepare_data(config, events.append, block_size=40)
    assert cut.stats["truncated"] == 2 and "2 of 6 cut to block_size + 1 = 41 tokens" in cut.description
    assert any(isinstance(e, Notice) and "2 of 6 conversations" in e.message for e in events)
    assert max(len(s) for seqs in cut.sequences.values() for s in seqs) == 41
    assert cut.fingerprint() == whole.fingerprint()  # what a resume or eval compares
    ready = [e for e in events if isinstance(e, DataReady)][-1]
    assert ready.unit == "examples" and ready.split_sizes == {"train": 4, "val": 2}


def test_gsm8k_files_splits_and_batches():
    data = prepare_data(DataConfig(dataset=GSM8K, format="chat", tokenizer="byte"))
    assert data.task == "chat" and data.unit == "examples"
    # train.jsonl (7,473 rows) loses its last 10% to val; test.jsonl stays the test split
    assert data.split_sizes() == {"train": 6726, "val": 747, "test": 1319}
    with open(f"{GSM8K}/train.jsonl") as f:
        first = json.loads(f.readline())
    assert data.texts["train"][0] == f"User: {first['question'].strip()}\nAssistant: {first['answer'].strip()}"
    batches = make_train_batches(data, block_size=4096, batch_size=4, seed=0)  # nothing cut
    x, y = batches.batch(0)
    for row in range(4):
        real = int((x[row] != EOS).sum())  # byte ids: the text has no 256 before its EOS
        assert y[row, real - 1] == EOS  # every conversation's EOS is a target
    assert data.text_sha256("val") != data.text_sha256("train")


def test_inject_answers_needs_the_mul_condition():
    with pytest.raises(ConfigError, match="inject_answers.*needs data.condition: mul_tokens"):
        prepare_data(DataConfig(dataset=GSM8K, format="chat", tokenizer="byte", inject_answers=True))


def test_given_tokenizer_is_used(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": "d"}\n')
    tok = ByteTokenizer()
    data = prepare_data(DataConfig(dataset=str(path), format="chat", tokenizer="char"), tokenizer=tok)
    assert data.tokenizer is tok and data.sequences["train"][0][-1] == EOS


def _mul_tokenizer(monkeypatch, condition):
    pytest.importorskip("lmkit.data.tokenizer_mul", reason="the gpt2+mul tokenizer (helper MUL) is not here yet")
    monkeypatch.setenv("LMKIT_GPT2_DIR", "/work/shared/data/gpt2-tokenizer")
    from lmkit.data.tokenizers import build_tokenizer

    return build_tokenizer("gpt2+mul", condition=condition)


def test_mul_injection_only_in_assistant_turns(monkeypatch, tmp_path):
    tok = _mul_tokenizer(monkeypatch, "mul_tokens")
    mul_6_9 = 50342  # <MUL_6_9_54> (SEEDS_SPEC 1.1)
    rows = [{"messages": [{"role": "system", "content": "Use 6*9=54."}, {"role": "user", "content": "6*9?"},
                          {"role": "assistant", "content": "6*9=54, and 9 x 6 too."}]},
            {"question": "What is 6*9?", "answer": "6*9=54\n#### 54"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))

    def first_two(**kw):
        data = prepare_data(DataConfig(dataset=str(path), format="chat", tokenizer="gpt2+mul", val_fraction=0.34,
                                       **kw), tokenizer=tok)
        return data, data.sequences["train"][:2]

    data, (tulu, gsm) = first_two(condition="mul_tokens")
    prompt_len = len(tok.encode("System: Use 6*9=54.\nUser: 6*9?\nAssistant:"))
    assert mul_6_9 not in tulu[:prompt_len]  # system and user turns keep their text
    assert list(tulu[prompt_len:-1]).count(mul_6_9) == 2  # "6*9=54" and "9 x 6" in the reply
    assert all(label == i for label, i in zip(tulu.labels[prompt_len:], tulu[prompt_len:], strict=True))
    assert mul_6_9 not in gsm  # GSM8K answers: only with data.inject_answers (the seed's A1 option)
    assert data.stats["mul_tokens_by_split"]["train"] == 4  # 2 of the 3 repeats of each row are train
    assert data.stats["mul_tokens"] == 6
    _, (_, gsm_a1) = first_two(condition="mul_tokens", inject_answers=True)
    assert list(gsm_a1).count(mul_6_9) == 1
    assert tok.decode(gsm_a1).startswith("User: What is 6*9?\nAssistant: <MUL_6_9_54>")


def test_baseline_condition_injects_nothing(monkeypatch, tmp_path):
    tok = _mul_tokenizer(monkeypatch, "baseline")
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "6*9=54"}]}) + "\n" * 1 +
                    json.dumps({"question": "a", "answer": "b"}) + "\n")
    data = prepare_data(DataConfig(dataset=str(path), format="chat", tokenizer="gpt2+mul", condition="baseline"),
                        tokenizer=tok)
    assert not any(i >= 50257 for seqs in data.sequences.values() for s in seqs for i in s[:-1])
    with pytest.raises(DataError, match="the tokenizer given is the baseline one"):
        prepare_data(DataConfig(dataset=str(path), format="chat", tokenizer="gpt2+mul", condition="mul_tokens"),
                     tokenizer=tok)


def test_labelled_sequence_checks_lengths():
    with pytest.raises(ValueError):
        LabelledSequence([1, 2], [1])
    seq = LabelledSequence([1, 2, 3], [IGNORE_INDEX, 2, 3]).truncated(2)
    assert list(seq) == [1, 2] and seq.labels == [IGNORE_INDEX, 2]
    assert isinstance(np.asarray(seq), np.ndarray)


def test_chat_item_without_turns_is_skipped():
    assert _item({"messages": [{"role": "user", "content": "  "}]}) is None
    assert ChatItem((Turn("user", "x"),), "messages").kind == "messages"


def test_given_tokenizer_encodes_text_shards(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i} é\n" for i in range(200)))
    tok = ByteTokenizer()
    data = prepare_data(DataConfig(dataset=str(text), tokenizer="char", cache_dir=str(tmp_path / "c")), tokenizer=tok)
    assert data.tokenizer is tok
    assert bytes(np.asarray(data.tokens("train"))[:10].astype(np.uint8)).decode() == "line 0 é\n"


def test_max_tokens_takes_whole_items_in_order():
    budget = 20_000
    data = prepare_data(DataConfig(dataset=GSM8K, format="chat", tokenizer="byte", max_tokens=budget))
    used, n = 0, 0
    with open(f"{GSM8K}/train.jsonl") as f:  # reference: bytes of the seed's text + 1 EOS per item
        for line in f:
            row = json.loads(line)
            used += len(f"User: {row['question'].strip()}\nAssistant: {row['answer'].strip()}".encode()) + 1
            n += 1
            if used >= budget:
                break
    sizes = data.split_sizes()
    assert sizes["train"] + sizes["val"] == n and sizes["val"] == round(n * 0.1) and sizes["test"] == 1319
    with pytest.raises(ConfigError, match="max_tokens: a chat budget"):
        prepare_data(DataConfig(dataset=GSM8K, format="chat", tokenizer="bpe", max_tokens=budget))
    with pytest.raises(ConfigError, match="include_synthetic"):
        prepare_data(DataConfig(dataset=GSM8K, format="chat", tokenizer="byte", include_synthetic=True))


def test_hub_chat_data_offline_is_one_line(hub_offline):
    with pytest.raises(DataError, match="cannot load 'hf:allenai/tulu-3-sft-mixture'.*no network"):
        prepare_data(DataConfig(dataset="hf:allenai/tulu-3-sft-mixture", format="chat", tokenizer="byte",
                                max_tokens=1000))
