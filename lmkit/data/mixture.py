"""Data mixtures (``data.sources``): several data sets as one text corpus.

Each entry (:class:`~lmkit.config.mixture.SourceConfig`) is read as ``data.dataset`` would be
(:func:`lmkit.data.sources.load_text_source`: a local file or folder, or a hub name) with its
own ``fields`` (JSON/JSONL/parquet columns joined by a newline, e.g. GSM8K's ``question`` and
``answer``), ``encoding`` and split rule (``val_fraction`` when it has no validation split).

The mixture is a list of documents per split, tokenised like any corpus whose rows are
documents (each followed by EOS, :mod:`lmkit.data.shards`):

* a JSON/parquet row is one document; the lines of a text file are grouped into documents
  of consecutive lines of about :data:`CHUNK_BYTES` UTF-8 bytes (cut at line ends, so the
  text itself is unchanged);
* **weights** (training split only): the sources with a ``weight`` share the weighted part of
  the mixture in proportion to their weights, measured in UTF-8 bytes of text (the same for
  every tokenizer, so the mixture does not depend on it; token shares follow closely). The
  weighted part is as large as it can be without repeating a document: the source with the
  least text per unit of weight is taken whole, the others are subsampled (documents in a
  seeded random order, up to their share). A source without a weight is taken whole, once.
  Validation and test splits are taken whole;
* order: every split's documents are shuffled with a fixed seed (:data:`MIXTURE_SEED`), so
  the same config always gives the same corpus; the mixture's fingerprint (every source's
  content fingerprint, fields, weight, split rule, encoding) is part of the token cache key.

Streamed hub sources (``fineweb-edu``) cannot be sized and are refused in a mixture.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmkit.config import DataConfig
from lmkit.data.sources import TextSource, load_text_source
from lmkit.errors import ConfigError, DataError
from lmkit.events import Event, null_emit

#: Seed of the subsampling and of the document order.
MIXTURE_SEED = 0
#: Target size of a document made of a text file's consecutive lines (UTF-8 bytes).
CHUNK_BYTES = 4096
MIXTURE_FORMAT = 1


def check_sources(config: DataConfig) -> None:
    """Refuse settings that contradict ``data.sources``.

    Raises:
        ConfigError: an empty list, ``data.dataset`` set to a data set as well, chat data, or
            an arithmetic source (one line each).
    """
    if not config.sources:
        raise ConfigError("data.sources: the list is empty; name at least one data set or drop data.sources")
    if "dataset" in config.model_fields_set and config.dataset not in ("arithmetic", "mixture"):
        raise ConfigError(f"data.dataset: {config.dataset!r} conflicts with data.sources (a mixture replaces "
                          "data.dataset); drop one of them, or set data.dataset=mixture")
    if config.format == "chat":
        raise ConfigError("data.sources: a mixture is text data; for chat fine-tuning name one data set "
                          "with data.dataset (data.format: chat)")
    for src in config.sources:
        if src.dataset == "arithmetic":
            raise ConfigError("data.sources: the arithmetic task cannot be part of a text mixture")


@dataclass
class _Part:
    label: str
    weight: float | None
    docs: dict[str, list[str]]
    fingerprint: str


def load_mixture(config: DataConfig, emit: Callable[[Event], None] = null_emit) -> TextSource:
    """The mixture of ``config.sources`` as one :class:`~lmkit.data.sources.TextSource`
    (documents, separator ``eos``); ``extra["mixture"]`` holds per source the training bytes
    available and taken, the documents taken and the share of the training text.

    Raises:
        ConfigError: see :func:`check_sources`.
        DataError: a source that cannot be read (as for ``data.dataset``), a streamed source,
            or a source whose training split is empty.
    """
    check_sources(config)
    assert config.sources is not None
    parts = []
    for src in config.sources:
        sub = config.model_copy(update={
            "dataset": src.dataset, "sources": None,
            "val_fraction": src.val_fraction if src.val_fraction is not None else config.val_fraction,
            "encoding": src.encoding if src.encoding is not None else config.encoding})
        source = load_text_source(sub, fields=src.fields)
        if source.streaming:
            raise DataError(f"data.sources: {src.dataset!r} is streamed, so its size is unknown; a mixture needs "
                            "local files or non-streamed hub data sets")
        docs = {split: list(_documents(source.splits[split](), source.separator)) for split in source.splits}
        label = src.dataset + (f" [{'+'.join(src.fields)}]" if src.fields else "")
        if not docs.get("train"):
            raise DataError(f"data.sources: {label} has no training text")
        key = (f"{source.fingerprint}|fields={src.fields}|weight={src.weight}|val={sub.val_fraction}"
               f"|enc={sub.encoding}|sep={source.separator}")
        parts.append(_Part(label, src.weight, docs, key))

    taken = _weighted_train(parts)
    split_names = ["train"] + sorted({s for p in parts for s in p.docs if s != "train"},
                                     key=lambda s: (s != "val", s != "test", s))
    mixed: dict[str, list[str]] = {}
    for k, split in enumerate(split_names):
        pool = [doc for p, chosen in zip(parts, taken, strict=True)
                for doc in (chosen if split == "train" else p.docs.get(split, []))]
        order = np.random.default_rng([MIXTURE_SEED, 1000 + k]).permutation(len(pool))
        mixed[split] = [pool[i] for i in order]

    total_train = sum(_nbytes(d) for d in mixed["train"])
    extra = []
    for p, chosen in zip(parts, taken, strict=True):
        taken_bytes = sum(_nbytes(d) for d in chosen)
        extra.append({"dataset": p.label, "weight": p.weight, "train_bytes": sum(_nbytes(d) for d in p.docs["train"]),
                      "train_bytes_taken": taken_bytes, "train_documents_taken": len(chosen),
                      "share": taken_bytes / total_train if total_train else 0.0})
    digest = hashlib.sha256(f"mixture-{MIXTURE_FORMAT}|seed={MIXTURE_SEED}|chunk={CHUNK_BYTES}".encode())
    for p in parts:
        digest.update(p.fingerprint.encode())
    shares = ", ".join(f"{_short(e['dataset'])} {100 * e['share']:.1f}%" for e in extra)
    sizes = ", ".join(f"{k} {len(v):,}" for k, v in mixed.items())
    description = f"mixture of {len(parts)} sources ({shares} of the training text; {sizes} documents)"
    return TextSource({k: _iterate(v) for k, v in mixed.items()}, {k: len(v) for k, v in mixed.items()},
                      digest.hexdigest()[:16], "eos", description, extra={"mixture": extra})


def _short(label: str) -> str:
    """``/a/b/train.jsonl [q+a]`` -> ``train.jsonl [q+a]`` (hub names stay whole)."""
    return label if label.startswith("hf:") else label.rsplit("/", 1)[-1] if "/" in label.split(" [")[0] else label


def _iterate(docs: list[str]) -> Callable[[], Iterator[str]]:
    return lambda: iter(docs)


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))


def _documents(rows: Iterator[str], separator: str) -> Iterator[str]:
    """Rows as documents: documents as they are; lines grouped into ~CHUNK_BYTES runs."""
    if separator != "newline":
        yield from (row for row in rows if row)
        return
    chunk: list[str] = []
    size = 0
    for line in rows:
        line = line if line.endswith("\n") else line + "\n"
        chunk.append(line)
        size += _nbytes(line)
        if size >= CHUNK_BYTES:
            yield "".join(chunk)
            chunk, size = [], 0
    if chunk:
        yield "".join(chunk)


def _weighted_train(parts: list[_Part]) -> list[list[str]]:
    """Per source, the training documents taken (see the module docstring)."""
    sizes = [sum(_nbytes(d) for d in p.docs["train"]) for p in parts]
    weighted = [i for i, p in enumerate(parts) if p.weight is not None]
    taken = [list(p.docs["train"]) for p in parts]
    if not weighted:
        return taken
    total = sum(parts[i].weight for i in weighted)  # type: ignore[misc]
    share = {i: parts[i].weight / total for i in weighted}  # type: ignore[operator]
    budget = min(sizes[i] / share[i] for i in weighted)  # the weighted part's bytes, no document repeated
    for i in weighted:
        target = share[i] * budget
        docs = parts[i].docs["train"]
        if target >= sizes[i] * (1 - 1e-12):
            continue  # the limiting source: whole
        order = np.random.default_rng([MIXTURE_SEED, i]).permutation(len(docs))
        chosen, got = [], 0
        for j in order:
            if got >= target:
                break
            chosen.append(docs[j])
            got += _nbytes(docs[j])
        taken[i] = chosen
    return taken


def describe(source: TextSource) -> list[dict[str, Any]]:
    """The per-source rows of a mixture (``[]`` for a single data set)."""
    return list(source.extra.get("mixture", []))


__all__ = ["CHUNK_BYTES", "MIXTURE_SEED", "check_sources", "describe", "load_mixture"]
