"""Batches as a pure function of a batch index, so a run can resume at any micro-batch.

* :class:`TokenWindows` -- random windows over a token stream: batch ``i`` draws its
  ``batch_size`` start positions from ``numpy.random.default_rng([seed, i])``.
* :class:`ExampleBatches` -- whole examples (arithmetic, chat), shuffled once per epoch with
  ``default_rng([seed, epoch])`` and padded to the longest in the batch: inputs with
  ``pad_id``, targets with ``-100`` (ignored by the loss). An example given as a
  :class:`LabelledSequence` (chat data) brings its own targets: position ``t`` learns
  ``labels[t + 1]``, ``-100`` where the loss mask hides it.

Both return ``(x, y)`` as ``int64`` numpy arrays of shape ``(B, T)``; ``y`` is ``x``
shifted by one token. The position to resume from is just the next batch index.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from lmkit.errors import DataError

IGNORE_INDEX = -100


class LabelledSequence(list):
    """Token ids of one example with a label per position (chat data, :mod:`lmkit.data.chat`).

    ``labels[i]`` is the id the model must learn at position ``i`` (so the target of input
    ``i`` is ``labels[i + 1]``), or :data:`IGNORE_INDEX` where the loss mask hides it; it has
    the length of the ids. ``n_bytes[i]``, when given, is the UTF-8 length of the original
    text id ``i`` covers (a mul token counts the text it replaced, an EOS 0): the bits-per-byte
    denominator of its target. Slicing gives plain lists (labels and bytes stay on the whole
    sequence).

    Raises:
        ValueError: ``labels`` or ``n_bytes`` is not as long as ``ids``.
    """

    def __init__(self, ids: Sequence[int], labels: Sequence[int], n_bytes: Sequence[int] | None = None):
        super().__init__(ids)
        if len(labels) != len(ids):
            raise ValueError(f"{len(labels)} labels for {len(ids)} ids")
        if n_bytes is not None and len(n_bytes) != len(ids):
            raise ValueError(f"{len(n_bytes)} byte counts for {len(ids)} ids")
        self.labels = list(labels)
        self.n_bytes = None if n_bytes is None else [int(b) for b in n_bytes]

    def truncated(self, length: int) -> LabelledSequence:
        """The first ``length`` ids, their labels and byte counts."""
        return LabelledSequence(self[:length], self.labels[:length],
                                None if self.n_bytes is None else self.n_bytes[:length])


class TokenWindows:
    """Random ``(block_size + 1)``-token windows from ``tokens``.

    Args:
        tokens: 1-D ids (a memmap is read lazily).
        block_size: ``T``, the model's context.
        batch_size: ``B`` windows per batch.
        seed: with the batch index, fixes every window.

    Raises:
        DataError: fewer than ``block_size + 1`` tokens.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, split: str = "train"):
        if len(tokens) < block_size + 1:
            raise DataError(
                f"the {split} split has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                "use more data or a smaller model.block_size"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self._offsets = np.arange(block_size + 1, dtype=np.int64)

    @property
    def batches_per_epoch(self) -> int:
        """Batches whose tokens add up to one pass over the stream (at least 1)."""
        return max(1, len(self.tokens) // (self.batch_size * self.block_size))

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, index])
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        chunk = np.asarray(self.tokens[starts[:, None] + self._offsets], dtype=np.int64)
        return np.ascontiguousarray(chunk[:, :-1]), np.ascontiguousarray(chunk[:, 1:])


def sequential_windows(tokens: np.ndarray, block_size: int, batch_size: int,
                       max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows from the start of ``tokens`` (deterministic evaluation).

    Yields ``(x, y)`` of shape ``(b, block_size)`` with ``b <= batch_size``; stops after
    ``max_batches`` batches or when the stream is used up.
    """
    n_windows = (len(tokens) - 1) // block_size
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    offsets = np.arange(block_size + 1, dtype=np.int64)
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows), dtype=np.int64) * block_size
        chunk = np.asarray(tokens[starts[:, None] + offsets], dtype=np.int64)
        yield np.ascontiguousarray(chunk[:, :-1]), np.ascontiguousarray(chunk[:, 1:])


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``seq[:-1]`` padded with ``pad_id`` and targets ``seq[1:]`` padded with -100
    (``seq.labels[1:]`` for a :class:`LabelledSequence`); both ``(len(sequences), T)`` int64
    with ``T`` the longest sequence minus one."""
    width = max(len(s) for s in sequences) - 1
    x = np.full((len(sequences), width), pad_id, dtype=np.int64)
    y = np.full((len(sequences), width), IGNORE_INDEX, dtype=np.int64)
    for row, seq in enumerate(sequences):
        n = len(seq) - 1
        x[row, :n] = seq[:-1]
        labels = getattr(seq, "labels", None)
        y[row, :n] = seq[1:] if labels is None else labels[1:]
    return x, y


class ExampleBatches:
    """Shuffled, padded batches of whole examples; the last batch of an epoch may be smaller."""

    def __init__(self, sequences: Sequence[Sequence[int]], batch_size: int, seed: int, pad_id: int):
        if not sequences:
            raise DataError("the training split has no examples")
        self.sequences = list(sequences)
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.sequences) / self.batch_size)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.sequences))
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, pos = divmod(index, self.batches_per_epoch)
        ids = self._permutation(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]
        return pad_sequences([self.sequences[i] for i in ids], self.pad_id)


def target_bytes(sequences: Sequence[Sequence[int]]) -> np.ndarray | None:
    """Each target's UTF-8 byte count, ``(len(sequences), T)`` int64 laid out as the targets of
    :func:`pad_sequences` (``n_bytes[1:]``, padding 0), or ``None`` unless every sequence is a
    :class:`LabelledSequence` that carries ``n_bytes``."""
    counts = [getattr(s, "n_bytes", None) for s in sequences]
    if not counts or any(c is None for c in counts):
        return None
    width = max(len(s) for s in sequences) - 1
    out = np.zeros((len(sequences), width), dtype=np.int64)
    for row, c in enumerate(counts):
        out[row, : len(c) - 1] = c[1:]
    return out


def example_batches_in_order(sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int, *,
                             with_bytes: bool = False) -> Iterator[tuple[np.ndarray, ...]]:
    """All examples in order (evaluation), padded per batch: ``(x, y)``, or with ``with_bytes``
    ``(x, y, y_bytes)`` for batches whose sequences all carry byte counts (:func:`target_bytes`)."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        x, y = pad_sequences(chunk, pad_id)
        y_bytes = target_bytes(chunk) if with_bytes else None
        yield (x, y) if y_bytes is None else (x, y, y_bytes)
