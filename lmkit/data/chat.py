"""Chat data for supervised fine-tuning (``data.format: chat``).

Rows are JSON objects, one per line (``.jsonl``) or a JSON list (``.json``), in a local file
or folder (files named ``*train*``/``*val*``/``*test*`` give those splits) or a hub data set
(``hf:owner/name[:config]``):

* ``{"question": ..., "answer": ...}`` (GSM8K): one user turn and one assistant turn;
* ``{"messages": [{"role": ..., "content": ...}, ...]}`` (Tulu-3 style), roles ``system``,
  ``user``, ``assistant``.

The text is seed 004's SFT format (``sft/sft_tulu.py``, ``sft/sft_gsm8k.py``): each turn
``"User: …"``, ``"Assistant: …"`` or ``"System: …"`` (content stripped, empty turns left
out), system turns moved to the front (in their order), the turns joined by ``"\\n"``, then
the tokenizer's end-of-text token. GSM8K: ``User: {question}\\nAssistant: {answer}<EOS>``.

Each item becomes one :class:`~lmkit.data.batching.LabelledSequence`, trained as a whole
padded sequence. The loss mask is built from the lengths of the turns' token spans, never
from token values, so the final EOS is learned although padding uses the same id:

* ``data.loss_on: assistant`` (default): labels on the assistant turns' content (from the
  space after ``Assistant:`` to the end of the turn) and the final EOS; ``all``: every token;
* ``data.legacy_pad_mask: true``: the seed's bug -- labels on every token except where the id
  equals its pad id (= EOS), so the final EOS is hidden and the model never learns to stop.

Injection of multiplication-fact tokens (``data.condition: mul_tokens``,
:func:`lmkit.data.mul_tokens.inject_segments`) applies to assistant turns only: always for
``messages`` rows (the seed's Tulu stage), for GSM8K answers only with
``data.inject_answers: true`` (the seed's ``--inject-mul-tokens``, option "A1"). Prompts are
never rewritten. Text outside the injected turns is encoded as the tokenizer encodes any
text (``gpt2+mul`` in the ``baseline`` condition keeps a mul-token string as plain text).

Every id carries the UTF-8 bytes of the original text it covers
(:attr:`~lmkit.data.batching.LabelledSequence.n_bytes`; a mul id the bytes of the text it
replaced, ``"6*9=54"`` 6, not the 12 of ``<MUL_6_9_54>``), so bits per byte divides by the
original text in both conditions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmkit.data.batching import IGNORE_INDEX, LabelledSequence
from lmkit.errors import DataError

#: Role -> the name written before its content.
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}

Segment = str | tuple[int, str]


@dataclass(frozen=True)
class Turn:
    """One message: ``role`` is ``system``, ``user`` or ``assistant``; ``content`` is stripped."""

    role: str
    content: str


@dataclass(frozen=True)
class ChatItem:
    """One conversation. ``kind`` is ``"qa"`` (a question/answer row) or ``"messages"``."""

    turns: tuple[Turn, ...]
    kind: str


def item_from_row(row: Any, where: str) -> ChatItem | None:
    """The conversation of one JSON row (``None`` when it has no non-empty turn).

    Raises:
        DataError: not an object, neither ``messages`` nor ``question``/``answer``, a role other
            than system/user/assistant, or content that is not text (naming ``where``).
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: a chat row must be a JSON object, not {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        turns = []
        for message in messages:
            if not isinstance(message, dict):
                raise DataError(f"{where}: a message must be a {{role, content}} object")
            role = str(message.get("role", "")).lower()
            content = message.get("content") or ""
            if role not in ROLE_NAMES:
                raise DataError(f"{where}: unknown role {role!r} (expected system, user or assistant)")
            if not isinstance(content, str):
                raise DataError(f"{where}: the content of a {role} message is {type(content).__name__}, not text")
            if content.strip():
                turns.append(Turn(role, content.strip()))
        return ChatItem(tuple(turns), "messages") if turns else None
    if "question" in row and "answer" in row:
        question, answer = row["question"], row["answer"]
        if not isinstance(question, str) or not isinstance(answer, str):
            raise DataError(f"{where}: 'question' and 'answer' must be text")
        return ChatItem((Turn("user", question.strip()), Turn("assistant", answer.strip())), "qa")
    keys = ", ".join(sorted(row)[:6])
    raise DataError(f"{where}: a chat row needs 'messages' or 'question' and 'answer' (it has {keys})")


def ordered_turns(item: ChatItem) -> list[Turn]:
    """System turns first (in their order), then the others in their order."""
    return [t for t in item.turns if t.role == "system"] + [t for t in item.turns if t.role != "system"]


def chat_text(item: ChatItem) -> str:
    """The seed's text of ``item``, without the final EOS (e.g. ``"User: q\\nAssistant: a"``)."""
    return "\n".join(f"{ROLE_NAMES[t.role]}: {t.content}" for t in ordered_turns(item))


def chat_prompt(question: str) -> str:
    """The generation prompt of a single question: ``"User: {question}\\nAssistant:"``."""
    return f"User: {question.strip()}\nAssistant:"


def chat_parts(item: ChatItem, inject: Callable[[str], list[Segment]] | None = None) -> list[tuple[list[Segment], bool]]:
    """``item``'s text as consecutive parts ``(segments, is_assistant)``: the assistant turns'
    content (with its leading space) is its own part, everything else is prompt. With
    ``inject``, the assistant parts are the segments it returns (text and ``(id, text)``
    tokens); concatenating every part's text gives :func:`chat_text` exactly."""
    parts: list[tuple[list[Segment], bool]] = []
    prompt = ""
    for i, turn in enumerate(ordered_turns(item)):
        head = ("\n" if i else "") + f"{ROLE_NAMES[turn.role]}:"
        if turn.role != "assistant":
            prompt += f"{head} {turn.content}"
            continue
        parts.append(([prompt + head], False))
        prompt = ""
        body = " " + turn.content
        parts.append((inject(body) if inject is not None else [body], True))
    if prompt:
        parts.append(([prompt], False))
    return parts


@dataclass
class EncodedChat:
    """The items of one split encoded. ``truncated`` items lost their tail (and EOS) to the
    length limit; ``mul_tokens`` counts the injected mul ids kept; ``label_tokens`` the learned
    targets; ``mul_positions[k]`` are the positions of sequence ``k``'s injected mul ids (before
    any cut: :func:`count_injected` recounts after one). Each sequence carries ``n_bytes``, the
    UTF-8 bytes of the original text per id (a mul id: the text it replaced; the EOS: 0)."""

    sequences: list[LabelledSequence]
    texts: list[str]
    truncated: int = 0
    mul_tokens: int = 0
    label_tokens: int = 0
    mul_positions: list[list[int]] = field(default_factory=list)


def count_injected(sequences: Sequence[Sequence[int]], mul_positions: Sequence[Sequence[int]]) -> int:
    """Injected mul ids still in ``sequences`` (cut or not): the positions below each length."""
    return sum(sum(1 for p in positions if p < len(seq)) for seq, positions in zip(sequences, mul_positions,
                                                                                 strict=True))


def encode_chat(items: Sequence[ChatItem], tokenizer: Any, *, loss_on: str = "assistant",
                legacy_pad_mask: bool = False, inject: Callable[[str], list[Segment]] | None = None,
                inject_qa: bool = False, max_length: int | None = None) -> EncodedChat:
    """Encode chat items as labelled sequences (ids + final EOS).

    Args:
        items: the conversations.
        tokenizer: an lmkit :class:`~lmkit.data.tokenizer_base.Tokenizer` with an ``eos_id``.
        loss_on: ``"assistant"`` (assistant content + final EOS labelled) or ``"all"``.
        legacy_pad_mask: seed 004's labels: every position whose id is not the pad id (the
            seed's pad is EOS), prompt included, so the final EOS is unlabelled.
        inject: the assistant-content rewrite (mul tokens), or ``None``.
        inject_qa: apply ``inject`` to question/answer rows too (else ``messages`` rows only).
        max_length: keep at most this many ids per item (``block_size + 1``), counting cut items.

    Returns:
        :class:`EncodedChat`; ``sequences[k].labels[t]`` is ``ids[t]`` or -100 (position 0 is
        never a target).

    Raises:
        DataError: the tokenizer has no end-of-text token, or ``loss_on`` is unknown.
    """
    eos = tokenizer.eos_id
    if eos is None:
        raise DataError(f"data.format: chat needs a tokenizer with an end-of-text token; {tokenizer.kind} has none")
    if loss_on not in ("assistant", "all"):
        raise DataError(f"data.loss_on: {loss_on!r} is not 'assistant' or 'all'")
    item_parts = [chat_parts(item, inject if inject is not None and (item.kind == "messages" or inject_qa)
                             else None) for item in items]
    rows = [segments for parts in item_parts for segments, _ in parts]
    # Plain text goes through encode (added tokens as the tokenizer matches them, e.g. by its
    # condition); injected parts are segments, each mul token standing for its original text.
    plain = [k for k, row in enumerate(rows) if len(row) == 1 and isinstance(row[0], str)]
    mixed = [k for k, row in enumerate(rows) if not (len(row) == 1 and isinstance(row[0], str))]
    encoded: list[tuple[list[int], list[int]]] = [([], []) for _ in rows]
    if plain:
        for k, (ids, nbytes) in zip(plain, tokenizer.encode_batch_with_bytes([rows[k][0] for k in plain]), strict=True):
            encoded[k] = (list(ids), [int(b) for b in nbytes])
    if mixed:
        for k, (ids, nbytes) in zip(mixed, tokenizer.encode_segments_with_bytes([rows[k] for k in mixed]), strict=True):
            encoded[k] = (list(ids), [int(b) for b in nbytes])
    out = EncodedChat([], [chat_text(item) for item in items])
    position = 0
    for parts in item_parts:
        ids: list[int] = []
        nbytes: list[int] = []
        learn: list[bool] = []
        injected: list[int] = []  # positions of the injected mul ids
        for segments, is_assistant in parts:
            piece, piece_bytes = encoded[position]
            position += 1
            if any(not isinstance(seg, str) for seg in segments):
                # one id per (id, text) segment, in order, among the base tokenizer's ids
                wanted = iter(seg[0] for seg in segments if not isinstance(seg, str))
                want = next(wanted, None)
                for t, i in enumerate(piece):
                    if i == want:
                        injected.append(len(ids) + t)
                        want = next(wanted, None)
            ids.extend(piece)
            nbytes.extend(piece_bytes)
            learn.extend([is_assistant or loss_on == "all"] * len(piece))
        ids.append(eos)
        nbytes.append(0)
        learn.append(True)
        if legacy_pad_mask:
            labels = [i if i != eos else IGNORE_INDEX for i in ids]
        else:
            labels = [i if keep else IGNORE_INDEX for i, keep in zip(ids, learn, strict=True)]
        seq = LabelledSequence(ids, labels, nbytes)
        if max_length is not None and len(seq) > max_length:
            seq = seq.truncated(max_length)
            out.truncated += 1
        out.label_tokens += sum(1 for label in seq.labels[1:] if label != IGNORE_INDEX)
        out.mul_positions.append(injected)
        out.mul_tokens += sum(1 for p in injected if p < len(seq))
        out.sequences.append(seq)
    return out


# --------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------


@dataclass
class ChatRows:
    """The items of a chat data set per split, with a fingerprint of their content."""

    splits: dict[str, list[ChatItem]]
    fingerprint: str
    description: str
    skipped: int = 0


def _json_rows(file: Path, encoding: str) -> Iterator[tuple[Any, str]]:
    try:
        text = file.read_text(encoding=encoding)
    except UnicodeDecodeError:
        raise DataError(f"{file}: not valid {encoding}; pass --encoding with the file's real encoding") from None
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc.strerror})") from None
    stripped = text.lstrip()
    if file.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as exc:
            raise DataError(f"{file}: not valid JSON ({exc})") from None
        for i, row in enumerate(rows):
            yield row, f"{file}[{i}]"
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line), f"{file}:{number}"
        except ValueError as exc:
            raise DataError(f"{file}:{number}: not a JSON object ({exc.msg})") from None


def load_chat_rows(dataset: str, *, encoding: str = "utf-8", val_fraction: float = 0.1,
                   take: Callable[[Iterator[ChatItem]], list[ChatItem]] | None = None) -> ChatRows:
    """Read chat rows of ``dataset`` (a local JSON/JSONL file or folder, or ``hf:NAME[:CONFIG]``).

    A data set without a ``val`` split gets one: the last ``val_fraction`` of the training
    items (at least one). A ``test`` split is kept as such (never trained on).

    Args:
        take: reads the training items it needs from the (lazy) iterator of all of them, in
            file order, e.g. up to a token budget; a hub data set is then streamed, so only
            the rows taken are downloaded. The validation split is cut from what it took.

    Raises:
        DataError: a missing path, a non-JSON file, a bad row (naming file and line), no items,
            too few items to split off a validation set, or an unreachable hub.
    """
    from lmkit.data.sources import is_hub_name, split_files

    digest = hashlib.sha256(b"chat-rows-1")
    splits: dict[str, list[ChatItem]] = {}
    skipped = 0
    if is_hub_name(dataset):
        if not dataset.startswith("hf:"):
            raise DataError(f"data.format: chat reads conversation rows; {dataset!r} is a text corpus "
                            "(use a local JSONL file or hf:owner/name)")
        raw = _hub_rows(dataset, streaming=take is not None)
        digest.update(dataset.encode())
    else:
        path = Path(dataset).expanduser()
        if not path.exists():
            raise DataError(f"data.dataset: {dataset!r} is not a file or folder (chat data is JSON lines)")
        raw = {}
        for split, files in split_files(path).items():
            for file in files:
                if file.suffix.lower() not in (".jsonl", ".json"):
                    raise DataError(f"data.format: chat reads .jsonl/.json files, not {file.name}")
                digest.update(f"{split}:{file.name}:{hashlib.sha256(file.read_bytes()).hexdigest()}".encode())
            raw[split] = (row for file in files for row in _json_rows(file, encoding))
    def items_of(rows: Iterable[tuple[Any, str]]) -> Iterator[ChatItem]:
        nonlocal skipped
        for row, where in rows:
            item = item_from_row(row, where)
            if item is None:
                skipped += 1
            else:
                yield item

    for split, rows in raw.items():
        name = {"validation": "val", "valid": "val"}.get(split, split)
        splits[name] = take(items_of(rows)) if take is not None and name == "train" else list(items_of(rows))
    if not splits.get("train"):
        raise DataError(f"data.dataset: {dataset} holds no training conversations")
    if "val" not in splits:
        train = splits["train"]
        n_val = max(1, int(round(len(train) * val_fraction)))
        if len(train) - n_val < 1:
            raise DataError(f"data.dataset: {dataset} has only {len(train)} conversations, too few to split off "
                            "a validation set; add rows or a *val* file")
        splits = {**splits, "train": train[:-n_val], "val": train[-n_val:]}
        digest.update(f"val_fraction={val_fraction}".encode())
    order = [k for k in ("train", "val", "test") if k in splits] + [k for k in splits if k not in ("train", "val", "test")]
    splits = {k: splits[k] for k in order}
    counts = ", ".join(f"{k} {len(v):,}" for k, v in splits.items())
    return ChatRows(splits, digest.hexdigest()[:16], f"chat data {dataset} ({counts} conversations)", skipped)


def _hub_rows(name: str, streaming: bool = False) -> dict[str, Iterable[tuple[Any, str]]]:
    import datasets

    from lmkit.data.sources import _offline_if_unreachable, _quiet_datasets
    from lmkit.errors import first_line

    _quiet_datasets()
    repo, _, subset = name.removeprefix("hf:").partition(":")
    with _offline_if_unreachable() as online:
        try:
            loaded = datasets.load_dataset(repo, subset or None, streaming=streaming)
        except Exception as exc:
            why = "no network and no cached copy" if not online else first_line(exc)
            raise DataError(f"data.dataset: cannot load {name!r} from the Hugging Face hub ({why}); "
                            "use a local JSONL file of {messages} or {question, answer} rows") from None
    return {split: ((row, f"{name} {split}[{i}]") for i, row in enumerate(ds)) for split, ds in loaded.items()}


__all__ = [
    "ROLE_NAMES",
    "ChatItem",
    "ChatRows",
    "EncodedChat",
    "Turn",
    "chat_parts",
    "chat_prompt",
    "chat_text",
    "count_injected",
    "encode_chat",
    "item_from_row",
    "load_chat_rows",
    "ordered_turns",
]
