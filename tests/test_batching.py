"""Batches as a function of the batch index: windows, padding, epochs."""

import numpy as np
import pytest

from lmkit.data.batching import ExampleBatches, TokenWindows, pad_sequences, sequential_windows
from lmkit.errors import DataError


def test_windows_are_shifted_and_deterministic():
    tokens = np.arange(1000, dtype=np.uint16)
    windows = TokenWindows(tokens, block_size=8, batch_size=4, seed=3)
    x, y = windows.batch(5)
    assert x.shape == y.shape == (4, 8) and x.dtype == np.int64
    np.testing.assert_array_equal(y, x + 1)  # tokens are 0..999, so the next token is +1
    x2, _ = TokenWindows(tokens, 8, 4, seed=3).batch(5)
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(windows.batch(6)[0], x)
    assert x.max() + 1 <= 999


def test_windows_need_enough_tokens():
    with pytest.raises(DataError, match="fewer than block_size"):
        TokenWindows(np.arange(8), block_size=8, batch_size=1, seed=0, split="val")


def test_sequential_windows_cover_the_stream_without_overlap():
    tokens = np.arange(101)
    xs = [x for x, _ in sequential_windows(tokens, block_size=10, batch_size=3)]
    flat = np.concatenate(xs).reshape(-1)
    np.testing.assert_array_equal(flat, np.arange(100))
    assert len(list(sequential_windows(tokens, 10, 3, max_batches=2))) == 2


def test_padding_uses_pad_for_inputs_and_ignore_for_targets():
    x, y = pad_sequences([[1, 5, 6, 2], [1, 7, 2]], pad_id=0)
    np.testing.assert_array_equal(x, [[1, 5, 6], [1, 7, 0]])
    np.testing.assert_array_equal(y, [[5, 6, 2], [7, 2, -100]])


def test_example_batches_visit_each_example_once_per_epoch():
    seqs = [[1, i, 2] for i in range(10, 33)]
    batches = ExampleBatches(seqs, batch_size=5, seed=0, pad_id=0)
    assert batches.batches_per_epoch == 5
    for epoch in range(2):
        seen = [int(v) for i in range(5) for v in batches.batch(epoch * 5 + i)[0][:, 1]]
        assert sorted(seen) == list(range(10, 33))
    first = [int(v) for v in batches.batch(0)[0][:, 1]]
    second = [int(v) for v in batches.batch(5)[0][:, 1]]
    assert first != second  # reshuffled each epoch
