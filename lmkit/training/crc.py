"""CRC-32 helpers: zlib's ``crc32_combine`` (which Python's :mod:`zlib` does not expose) and a
file's CRC-32 computed on several threads with it."""

from __future__ import annotations

import functools
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_PIECE = 1 << 24  # bytes of a file CRC'd by one thread at a time
_CRC_POLY = 0xEDB88320  # CRC-32 (zlib), reflected


def _multmodp(a: int, b: int) -> int:
    """``a(x) * b(x) mod p(x)`` over GF(2), reflected bit order (zlib's ``multmodp``)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


@functools.lru_cache(maxsize=256)
def _shift_operator(n_bytes: int) -> int:
    """``x^(8 n_bytes) mod p(x)``: multiplying a CRC by it appends ``n_bytes`` zero bytes."""
    p, square, n = 1 << 31, 1 << 30, n_bytes * 8  # p = x^0; square = x^1, squared each round
    while n:
        if n & 1:
            p = _multmodp(square, p)
        square = _multmodp(square, square)
        n >>= 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``A + B`` from ``crc1 = crc32(A)``, ``crc2 = crc32(B)`` and
    ``len2 = len(B)`` (zlib's ``crc32_combine``, which Python's ``zlib`` does not expose;
    algorithm of zlib 1.2.12, ``crc32.c``)."""
    return _multmodp(_shift_operator(len2), crc1) ^ crc2


def file_crc32(path: Path, threads: int | None = None) -> str:
    """CRC-32 (zlib) of a file's bytes as 8 hex digits, read in 16 MiB pieces on ``threads``
    threads and joined with :func:`crc32_combine` (the value of
    one ``zlib.crc32`` over the whole file)."""
    size = path.stat().st_size
    pieces = [(offset, min(_PIECE, size - offset)) for offset in range(0, size, _PIECE)]
    fd = os.open(path, os.O_RDONLY)
    try:
        def one(piece: tuple[int, int]) -> int:
            data = os.pread(fd, piece[1], piece[0])
            if len(data) != piece[1]:
                raise OSError(f"{path}: shorter than {size} bytes")
            return zlib.crc32(data)

        workers = max(1, min(threads or torch.get_num_threads(), len(pieces)))
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                crcs = list(pool.map(one, pieces))
        else:
            crcs = [one(piece) for piece in pieces]
    finally:
        os.close(fd)
    crc = 0
    for (_, length), piece_crc in zip(pieces, crcs, strict=True):
        crc = crc32_combine(crc, piece_crc, length)
    return f"{crc:08x}"


__all__ = ["crc32_combine", "file_crc32"]
