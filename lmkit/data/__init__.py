"""Data: from ``data.dataset`` (or a ``data.sources`` mixture) to token ids ready for batching.

:func:`prepare_data` returns a :class:`PreparedData` for one of three tasks:

* ``"lm"`` -- a token stream per split (memory-mapped shards, see
  :mod:`lmkit.data.shards`), trained on random windows; one data set or a mixture of
  several (:mod:`lmkit.data.mixture`);
* ``"arithmetic"`` -- the arithmetic experiment's examples (built in, or the seed's JSONL files), trained
  as whole padded sequences and evaluated by exact match of the generated answer;
* ``"chat"`` -- conversations for supervised fine-tuning (``data.format: chat``,
  :mod:`lmkit.data.chat`), trained as whole padded sequences whose targets carry the loss
  mask (:class:`~lmkit.data.batching.LabelledSequence`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmkit.config import DataConfig, ModelConfig
from lmkit.data.arithmetic import (
    ArithmeticExample,
    encode_example,
    generate_arithmetic,
    load_arithmetic_files,
)
from lmkit.data.batching import ExampleBatches, LabelledSequence, TokenWindows
from lmkit.data.shards import TokenShards, prepare_shards
from lmkit.data.sources import load_text_source
from lmkit.data.token_bytes import token_byte_table
from lmkit.data.tokenizers import AddedToken, CharTokenizer, Tokenizer
from lmkit.errors import ConfigError, DataError
from lmkit.events import DataReady, Event, Notice, null_emit


@dataclass
class PreparedData:
    """Tokenised data of a run.

    Attributes:
        task: ``"lm"``, ``"arithmetic"`` or ``"chat"``.
        tokenizer: the tokenizer the ids come from (saved into the run directory).
        description: human-readable source description.
        shards: token shards (``lm``).
        examples / sequences: per split, the examples and their id sequences (``arithmetic``;
            ``chat`` has sequences only, each a :class:`LabelledSequence`).
        texts: per split, each conversation's text (``chat``).
        stats: data statistics of the build (:class:`~lmkit.events.DataReady` ``stats``).
        max_id: the largest id in any split (must be < ``model.vocab_size``).
    """

    task: str
    tokenizer: Tokenizer
    description: str
    max_id: int
    shards: TokenShards | None = None
    examples: dict[str, list[ArithmeticExample]] = field(default_factory=dict)
    sequences: dict[str, list[list[int]]] = field(default_factory=dict)
    texts: dict[str, list[str]] = field(default_factory=dict)
    stats: dict | None = None
    _fixed_fingerprint: str | None = field(default=None, repr=False)
    _table_bytes: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def unit(self) -> str:
        return "tokens" if self.task == "lm" else "examples"

    def split_sizes(self) -> dict[str, int]:
        if self.shards is not None:
            return {s: self.shards.count(s) for s in self.shards.splits}
        return {s: len(v) for s, v in self.sequences.items()}

    def tokens(self, split: str) -> np.ndarray:
        if self.shards is None:
            raise DataError(f"the {self.task} task has no token stream")
        if split not in self.shards.splits:
            raise DataError(f"the data has no {split} split (splits: {', '.join(self.shards.splits)})")
        return self.shards.tokens(split)

    def token_bytes(self, split: str) -> np.ndarray:
        """Per token of :meth:`tokens` ``(split)``, the UTF-8 bytes of the text it covers
        (0 for separators and other special tokens): a 1-D array of the same length, whose
        sum over a range of targets is the denominator of bits per byte.

        The counts come from the shard (per occurrence, exact: see
        :mod:`lmkit.data.token_bytes`); a cache entry written before they existed falls
        back to the per-id table (:func:`~lmkit.data.token_bytes.token_byte_table`),
        computed here over the whole split (:meth:`bytes_source` says which).

        Raises:
            DataError: no token stream (``arithmetic``), no such split, or a damaged file.
        """
        tokens = self.tokens(split)
        assert self.shards is not None
        stored = self.shards.token_bytes(split)
        if stored is not None:
            return stored
        if split not in self._table_bytes:
            table = token_byte_table(self.tokenizer)
            out = np.empty(len(tokens), dtype=np.uint16)
            for start in range(0, len(tokens), 1 << 24):
                chunk = np.asarray(tokens[start : start + (1 << 24)], dtype=np.int64)
                out[start : start + len(chunk)] = table[np.minimum(chunk, len(table) - 1)]
            self._table_bytes[split] = out
        return self._table_bytes[split]

    def bytes_source(self, split: str) -> str:
        """``"per token"`` (counts stored with the shard, or carried by every chat sequence:
        :attr:`~lmkit.data.batching.LabelledSequence.n_bytes`) or ``"per-id table"`` (an older
        shard, arithmetic examples).

        Raises:
            DataError: no such split.
        """
        if self.shards is None:
            if split not in self.sequences:
                raise DataError(f"the data has no {split} split (splits: {', '.join(self.sequences)})")
            seqs = self.sequences[split]
            per_token = bool(seqs) and all(getattr(s, "n_bytes", None) is not None for s in seqs)
            return "per token" if per_token else "per-id table"
        self.tokens(split)
        assert self.shards is not None
        return "per token" if "bytes_file" in self.shards.meta["splits"][split] else "per-id table"

    def text_sha256(self, split: str) -> str:
        """SHA-256 of the UTF-8 text of ``split``: identifies the data whatever the tokenizer.

        Text data: the rows as tokenized (from the shard's meta.json; for an older entry,
        of the decoded ids, which is the same text for the lossless byte/gpt2/bpe/char
        tokenizers). Arithmetic: of the split's examples, one ``expr=result`` per line. Chat: of
        the conversations' texts, one per line.
        """
        import hashlib

        if self.task == "chat":
            if split not in self.texts:
                raise DataError(f"the data has no {split} split (splits: {', '.join(self.texts)})")
            return hashlib.sha256("".join(t + "\n" for t in self.texts[split]).encode()).hexdigest()
        if self.shards is None:
            lines = "".join(f"{ex.expr}={ex.result}\n" for ex in self.examples.get(split, []))
            return hashlib.sha256(lines.encode()).hexdigest()
        stored = self.shards.text_sha256(split)
        if stored is not None:
            return stored
        text = self.tokenizer.decode(np.asarray(self.tokens(split), dtype=np.int64).tolist())
        return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()

    def fingerprint(self) -> str:
        """Identifies the exact token ids of every split (tokenizer + source content), so a
        resume can refuse data that changed since the run started. Chat data: of the ids and
        labels as encoded, before any cut to the model's length (which the run config fixes)."""
        import hashlib

        if self._fixed_fingerprint is not None:
            return self._fixed_fingerprint
        h = hashlib.sha256(self.tokenizer.fingerprint().encode())
        if self.shards is not None:
            h.update(str(self.shards.meta["source"]["fingerprint"]).encode())
            h.update(json.dumps(self.split_sizes(), sort_keys=True).encode())
        else:
            for split in sorted(self.sequences):
                h.update(split.encode())
                for seq in self.sequences[split]:
                    h.update(np.asarray(seq, dtype=np.int32).tobytes())
                    labels = getattr(seq, "labels", None)
                    if labels is not None:
                        h.update(np.asarray(labels, dtype=np.int32).tobytes())
        return h.hexdigest()[:16]

    def truncate(self, block_size: int) -> int:
        """Cut every chat sequence to ``block_size + 1`` ids (``block_size`` inputs; a cut item
        loses its final EOS); return how many were cut now. Other tasks: nothing (0)."""
        if self.task != "chat":
            return 0
        cut = 0
        for seqs in self.sequences.values():
            for k, seq in enumerate(seqs):
                if len(seq) > block_size + 1:
                    seqs[k] = seq.truncated(block_size + 1) if isinstance(seq, LabelledSequence) else seq[:block_size + 1]
                    cut += 1
        return cut

    def longest_sequence(self) -> int:
        """Longest example in ids (arithmetic), including BOS and EOS."""
        return max((len(s) for seqs in self.sequences.values() for s in seqs), default=0)

    def check_model(self, model: ModelConfig) -> None:
        """Raise when the data does not fit the model.

        Raises:
            ConfigError: ``model.vocab_size`` smaller than the tokenizer's vocabulary, or
                ``model.block_size`` shorter than the longest example.
            DataError: an id in the data is >= ``model.vocab_size``.
        """
        vocab = model.vocab_size
        if vocab is None:
            raise ConfigError("model.vocab_size is not resolved")
        if vocab < self.tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {vocab} is smaller than the {self.tokenizer.kind} tokenizer's "
                f"vocabulary ({self.tokenizer.vocab_size}); remove model.vocab_size or raise it"
            )
        max_id = self.max_id
        if self.shards is not None:
            max_id = max(max_id, self.shards.scan_max_id())
        if max_id >= vocab:
            raise DataError(
                f"the data holds token id {max_id}, but model.vocab_size is {vocab}; "
                "the shards were made with another tokenizer -- delete the token cache or fix data.tokenizer"
            )
        if self.task == "lm" and self.shards is not None:
            for split in ("train", "val"):
                count = self.shards.count(split)
                if count < model.block_size + 1:
                    # A larger val_fraction grows val but shrinks train (and does nothing for a val file).
                    fix = "a smaller" if split == "train" else "a larger"
                    fix += " data.val_fraction (when val is split off the training text)"
                    raise DataError(
                        f"the {split} split has {count:,} tokens, fewer than block_size + 1 = {model.block_size + 1}; "
                        f"use more data, {fix}, or a smaller model.block_size"
                    )
        if self.task == "chat":
            self.truncate(model.block_size)
        if self.task == "arithmetic":
            need = self.longest_sequence() - 1
            if need > model.block_size:
                raise ConfigError(
                    f"model.block_size: {model.block_size} is shorter than the longest example "
                    f"({need} input tokens); raise it to at least {need}"
                )


def prepare_data(config: DataConfig, emit: Callable[[Event], None] = null_emit, *,
                 added_tokens: tuple[AddedToken, ...] = (), tokenizer: Tokenizer | None = None,
                 block_size: int | None = None) -> PreparedData:
    """Load, tokenise (or reuse cached shards) and describe the data of a run.

    Args:
        config: the run's data settings.
        emit: receives data events (:class:`~lmkit.events.DataProgress`, a
            :class:`~lmkit.events.Notice` when chat items are cut, then
            :class:`~lmkit.events.DataReady` with the build's ``stats``).
        added_tokens: tokens added to the tokenizer at fixed ids (text data only).
        tokenizer: encode with this tokenizer (e.g. the source run's, when fine-tuning)
            instead of building or training the one ``data.tokenizer`` names.
        block_size: the model's context; chat items longer than ``block_size + 1`` ids are cut
            here and counted in the description (without it, :meth:`PreparedData.check_model`
            cuts them).

    Raises:
        ConfigError: conflicting settings (``data.dataset`` and ``data.sources``, a mixture of
            chat data, ``data.inject_answers`` outside the ``mul_tokens`` condition).
        DataError: any problem with the source (one line naming the file or name).
    """
    dataset = config.dataset
    if config.sources is None and dataset == "mixture":
        raise ConfigError("data.dataset: mixture needs data.sources (the list of data sets to mix)")
    if config.sources is not None:
        from lmkit.data.mixture import check_sources

        check_sources(config)
    elif config.format == "chat":
        from lmkit.data.chat_data import prepare_chat_data

        if _is_arithmetic_jsonl(dataset) or dataset == "arithmetic":
            raise ConfigError(f"data.format: chat reads conversations; {dataset!r} is arithmetic data")
        return prepare_chat_data(config, emit, added_tokens=tuple(added_tokens), tokenizer=tokenizer,
                                 block_size=block_size)
    if config.sources is None and (dataset == "arithmetic" or _is_arithmetic_jsonl(dataset)):
        if added_tokens:
            raise DataError("added tokens apply to text data, not to the arithmetic task's fixed vocabulary")
        if tokenizer is not None and tokenizer.fingerprint() != CharTokenizer().fingerprint():
            raise DataError(f"the arithmetic task has its own character vocabulary; the given {tokenizer.kind} "
                            "tokenizer cannot encode it")
        if dataset == "arithmetic":
            splits = generate_arithmetic(config.arithmetic)
            data = _arithmetic_data(splits, "built-in arithmetic task (seed "
                                    f"{config.arithmetic.seed})", config)
        else:
            splits = load_arithmetic_files(Path(dataset))
            data = _arithmetic_data(splits, f"arithmetic examples from {dataset}", config)
        emit(DataReady(description=data.description, tokenizer=data.tokenizer.kind,
                       vocab_size=data.tokenizer.vocab_size, split_sizes=data.split_sizes(),
                       unit="examples", cache_dir=None, reused=False))
        return data
    if config.sources is not None:
        from lmkit.data.mixture import load_mixture

        source = load_mixture(config, emit)
        shard_config = config.model_copy(update={"dataset": "mixture"})
    else:
        source = load_text_source(config)
        shard_config = config
    shards, used = _shards_with(source, shard_config, emit, tuple(added_tokens), tokenizer)
    notice = mul_injection_notice(used, config.condition)
    if notice is not None:
        emit(notice)
    max_id = max(shards.max_id(s) for s in shards.splits)
    stats = getattr(shards, "stats", None)  # token counts of the build (mul tokens, compression)
    if source.extra.get("mixture"):
        stats = {**(stats or {}), "mixture": source.extra["mixture"]}
    data = PreparedData("lm", used, source.description, max_id, shards=shards, stats=stats)
    emit(DataReady(description=source.description, tokenizer=used.kind,
                   vocab_size=used.vocab_size, split_sizes=data.split_sizes(), unit="tokens",
                   cache_dir=str(shards.directory), reused=shards.reused, stats=stats))
    return data


def mul_injection_notice(tokenizer: Tokenizer, condition: str | None) -> Notice | None:
    """A warning when ``tokenizer`` encodes each of the 45 ``<MUL_a_b_c>`` strings as its single
    id (50304..50348: e.g. the ``hf:`` export of a ``mul_tokens`` run) but no ``data.condition``
    is in effect, so nothing in the data is injected (SEEDS_SPEC 1.2); ``None`` otherwise."""
    if condition is not None or tokenizer.vocab_size < 50349:
        return None
    from lmkit.data.mul_tokens import mul_facts, mul_token_id, mul_token_string

    facts = mul_facts()
    strings = [mul_token_string(a, b) for a, b, _ in facts]
    if tokenizer.encode_batch(strings) != [[mul_token_id(a, b)] for a, b, _ in facts]:
        return None
    return Notice(level="warning", message=(
        f"the {tokenizer.kind} tokenizer has the 45 multiplication tokens (<MUL_6_9_54> ...) but no data.condition "
        "is in effect, so mul-token injection is off: facts such as 6*9=54 stay plain text in this data; to inject "
        "them, fine-tune from the lmkit run itself (--init-from RUN keeps data.tokenizer gpt2+mul and "
        "data.condition mul_tokens) rather than from its hf: export"))


def _shards_with(source, config: DataConfig, emit: Callable[[Event], None], added_tokens: tuple[AddedToken, ...],
                 tokenizer: Tokenizer | None) -> tuple[TokenShards, Tokenizer]:
    """:func:`prepare_shards`, encoding with ``tokenizer`` when one is given."""
    if tokenizer is None:
        return prepare_shards(source, config, emit, added_tokens=added_tokens)
    import inspect

    if "tokenizer" in inspect.signature(prepare_shards).parameters:
        return prepare_shards(source, config, emit, added_tokens=added_tokens, tokenizer=tokenizer)
    # Until the shard builder takes a tokenizer: the one built from the same settings must be it.
    shards, built = prepare_shards(source, config, emit, added_tokens=tuple(added_tokens) or tokenizer.added_tokens)
    if built.fingerprint() != tokenizer.fingerprint():
        raise DataError(f"data.tokenizer: the {built.kind} tokenizer built for {config.dataset} differs from the "
                        f"given {tokenizer.kind} tokenizer; encoding text shards with a given tokenizer needs "
                        "lmkit.data.shards.prepare_shards(tokenizer=...)")
    return shards, tokenizer


def sequences_start_with_bos(config: DataConfig) -> bool:
    """Whether the training sequences of ``config`` begin with the tokenizer's BOS id: the
    arithmetic examples do (``[<BOS>] prompt answer [<EOS>]``,
    :func:`lmkit.data.arithmetic.encode_example`); a token stream of text, a mixture and chat
    data do not. A prompt is encoded the same way (:func:`lmkit.evaluation.sample.prompt_ids`,
    the exported Hugging Face tokenizer)."""
    return (config.sources is None and config.format != "chat"
            and (config.dataset == "arithmetic" or _is_arithmetic_jsonl(config.dataset)))


def _is_arithmetic_jsonl(dataset: str) -> bool:
    path = Path(dataset).expanduser()
    candidates = [path] if path.is_file() else sorted(path.glob("*.jsonl")) if path.is_dir() else []
    for file in candidates[:1]:
        if file.suffix != ".jsonl":
            return False
        try:
            with file.open(encoding="utf-8") as f:
                first = f.readline()
        except (OSError, UnicodeDecodeError):
            return False
        return '"expr"' in first and '"result"' in first
    return False


def _arithmetic_data(splits: dict[str, list[ArithmeticExample]], description: str,
                     config: DataConfig) -> PreparedData:
    if config.tokenizer != "char":
        raise ConfigError(f"data.tokenizer: arithmetic examples use the 'char' tokenizer, not {config.tokenizer!r}")
    tokenizer = CharTokenizer()
    if "val" not in splits:
        train = splits["train"]
        n_val = max(1, int(round(len(train) * config.val_fraction)))
        if len(train) - n_val < 1:
            raise DataError(f"{description}: too few examples to split off a validation set")
        splits = {**splits, "train": train[:-n_val], "val": train[-n_val:]}
    sequences: dict[str, list[list[int]]] = {}
    for name, examples in splits.items():
        seqs = [encode_example(ex, tokenizer) for ex in examples]
        for ex, seq in zip(examples, seqs, strict=True):
            if tokenizer.unk_id in seq:
                raise DataError(f"{description}: {ex.expr!r} has characters outside the arithmetic vocabulary")
        sequences[name] = seqs
    max_id = max(max(seq) for seqs in sequences.values() for seq in seqs)
    return PreparedData("arithmetic", tokenizer, description, max_id, examples=splits, sequences=sequences)


def make_train_batches(data: PreparedData, block_size: int, batch_size: int, seed: int) -> TokenWindows | ExampleBatches:
    """The training batcher of ``data`` (see :mod:`lmkit.data.batching`)."""
    if data.task == "lm":
        return TokenWindows(data.tokens("train"), block_size, batch_size, seed, split="train")
    if data.task == "chat":  # seed 004 pads with EOS; padded positions are never targets
        data.truncate(block_size)
        return ExampleBatches(data.sequences["train"], batch_size, seed, data.tokenizer.eos_id)
    pad_id = data.tokenizer.pad_id if data.tokenizer.pad_id is not None else 0
    return ExampleBatches(data.sequences["train"], batch_size, seed, pad_id)


__all__ = [
    "AddedToken",
    "PreparedData",
    "make_train_batches",
    "mul_injection_notice",
    "prepare_data",
]
