"""Kept positions as Huffman-coded gaps, shared by the deep-compressed weights file and the gap-coded masks file.

In the flattened row-major order, kept position `p_i` is stored as `p_i - p_{i-1}` (`p_{-1} = -1`, so every gap is
>= 1). A gap up to 255 is the symbol `gap`; a longer one is preceded by filler symbols 0, each meaning "255
positions with no kept weight" (Han et al.'s filler zeros, here in a separate stream so fillers carry no cluster
index). Streams use the canonical Huffman code of `hf_prune.compression.huffman`, table first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .huffman import HuffmanTable, huffman_decode, huffman_encode


#: Largest gap stored as one symbol; symbol 0 is the filler (skip GAP_LIMIT positions).
GAP_LIMIT = 255


def gap_symbols(mask: torch.Tensor) -> np.ndarray:
    """The kept positions of `mask` (row-major) as uint8 gap symbols: 1..255 = gap, 0 = filler (skip 255)."""
    positions = np.flatnonzero(mask.detach().reshape(-1).cpu().numpy())
    gaps = np.diff(positions, prepend=-1)
    fillers = (gaps - 1) // GAP_LIMIT
    stream = np.zeros(len(gaps) + int(fillers.sum()), dtype=np.uint8)
    stream[np.cumsum(fillers + 1) - 1] = gaps - GAP_LIMIT * fillers
    return stream


def positions_from_gaps(stream: np.ndarray) -> np.ndarray:
    """Inverse of `gap_symbols`: the kept flat positions (int64, increasing)."""
    steps = np.where(stream == 0, GAP_LIMIT, stream).astype(np.int64)
    return np.cumsum(steps)[stream != 0] - 1


def encode_stream(symbols: np.ndarray) -> bytes:
    data, table = huffman_encode(symbols)
    return table.to_bytes() + data


def decode_stream(data: bytes, max_symbols: int, exact: bool = False) -> np.ndarray:
    """A uint8 stream of at most (`exact`: exactly) `max_symbols` symbols, checked before it is decoded."""
    table, size = HuffmanTable.from_bytes(data)
    if table.num_symbols > max_symbols or (exact and table.num_symbols != max_symbols):
        raise ValueError(f"a stream of {table.num_symbols} symbols where {'' if exact else 'at most '}{max_symbols} "
                         "fit")
    if table.dtype != np.uint8:
        raise ValueError(f"a stream of {table.dtype} symbols; they are uint8")
    return huffman_decode(data[size:], table)


def encode_positions(mask: torch.Tensor) -> bytes:
    """The kept positions of `mask` as one Huffman-coded gap stream (table, then bits)."""
    return encode_stream(gap_symbols(mask))


def decode_positions(data: bytes, shape: Sequence[int], kept: int) -> torch.Tensor:
    """Inverse of `encode_positions`: the bool mask of `shape` keeping `kept` entries.

    `shape` and `kept` bound the decoding (at most `kept + numel // 255` symbols), so check them first.

    Raises:
        ValueError: when `data` does not decode to exactly `kept` positions inside `shape`.
    """
    numel = math.prod(shape)
    positions = positions_from_gaps(decode_stream(data, kept + numel // GAP_LIMIT))
    if len(positions) != kept or (kept and positions[-1] >= numel):
        raise ValueError(f"decoded {len(positions)} positions, expected {kept} within {numel} entries")
    mask = np.zeros(numel, dtype=bool)
    mask[positions] = True
    return torch.from_numpy(mask).reshape(tuple(shape))
