"""Canonical Huffman coding of integer streams, stored JPEG-style (the number of codes of each length, then the
symbols in code order) and decoded in vectorised blocks. Deep Compression's third stage (Han et al. 2016)."""

from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass

import numpy as np


#: Longest Huffman code: a 32-bit window plus the up-to-7-bit misalignment still fits one uint64 read.
MAX_CODE_LENGTH = 32
#: Symbols per block; blocks decode in parallel. Its bit length, at most BLOCK_SIZE * MAX_CODE_LENGTH = 32768, is a
#: uint16 in the table.
BLOCK_SIZE = 1024

_SYMBOL_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64))
_TABLE_HEADER = struct.Struct("<QBBI")  # number of symbols, symbol width in bytes, longest code, distinct symbols
_BYTE_SHIFTS = np.arange(56, -8, -8, dtype=np.uint64)


@dataclass(frozen=True, eq=False)
class HuffmanTable:
    """What `huffman_decode` needs besides the bits: a canonical Huffman code in JPEG's compact form and the
    stream's layout.

    Args:
        num_symbols (`int`): length of the stream.
        dtype (`np.dtype`): the symbols' dtype (uint8, uint16, uint32 or uint64).
        symbols (`np.ndarray`): the distinct symbols in code order (by code length, then value).
        length_counts (`np.ndarray`): uint32; `length_counts[l - 1]` codes have `l` bits. Empty when the stream
            has fewer than 2 distinct symbols: then no bits are written at all.
        block_bits (`np.ndarray`): uint16, the bit length of each block of `BLOCK_SIZE` symbols.
    """

    num_symbols: int
    dtype: np.dtype
    symbols: np.ndarray
    length_counts: np.ndarray
    block_bits: np.ndarray

    def __post_init__(self) -> None:
        distinct, longest = len(self.symbols), len(self.length_counts)
        blocks = -(-self.num_symbols // BLOCK_SIZE) if longest else 0
        if self.dtype not in _SYMBOL_DTYPES or self.symbols.dtype != self.dtype:
            raise ValueError(f"Huffman symbols must be one of {[d.name for d in _SYMBOL_DTYPES]}; got {self.dtype}.")
        if (self.num_symbols == 0) != (distinct == 0) or distinct > self.num_symbols:
            raise ValueError(f"Huffman table has {distinct} distinct symbols for a stream of {self.num_symbols}.")
        if (distinct >= 2) != (longest > 0) or longest > MAX_CODE_LENGTH or len(self.block_bits) != blocks:
            raise ValueError(f"Huffman table with {distinct} symbols has codes of up to {longest} bits (accepted: "
                             f"1..{MAX_CODE_LENGTH}) and {len(self.block_bits)} blocks (expected {blocks}).")
        kraft = sum(int(count) << (longest - length) for length, count in enumerate(self.length_counts, start=1))
        if longest and (int(self.length_counts.sum()) != distinct or kraft != 1 << longest):
            raise ValueError("Huffman table is not a complete prefix code (corrupt code-length counts).")
        if longest:  # a block of n symbols takes n * shortest ... n * longest bits
            sizes = np.full(blocks, BLOCK_SIZE, dtype=np.int64)
            sizes[-1] = self.num_symbols - BLOCK_SIZE * (blocks - 1)
            shortest = int(np.flatnonzero(self.length_counts)[0]) + 1
            bits = self.block_bits.astype(np.int64)
            bad = np.flatnonzero((bits < sizes * shortest) | (bits > sizes * longest))
            if bad.size:
                k = int(bad[0])
                raise ValueError(f"Huffman table gives block {k} of {int(sizes[k])} symbols {int(bits[k])} bits; codes "
                                 f"of {shortest}..{longest} bits need {int(sizes[k]) * shortest}.."
                                 f"{int(sizes[k]) * longest} (corrupt block lengths).")

    def to_bytes(self) -> bytes:
        """Little-endian: the header, the code-length counts (uint32), the symbols, the block bit lengths (uint16)."""
        header = _TABLE_HEADER.pack(self.num_symbols, self.dtype.itemsize, len(self.length_counts), len(self.symbols))
        return b"".join((header, self.length_counts.astype("<u4").tobytes(),
                         self.symbols.astype(self.dtype.newbyteorder("<")).tobytes(),
                         self.block_bits.astype("<u2").tobytes()))

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple[HuffmanTable, int]:
        """Parses `to_bytes()` output at the start of `data`; returns the table and the number of bytes it took.

        Raises:
            ValueError: when `data` is too short or describes an invalid code.
        """
        if len(data) < _TABLE_HEADER.size:
            raise ValueError(f"Huffman table truncated: {len(data)} bytes, its header takes {_TABLE_HEADER.size}.")
        num_symbols, width, longest, distinct = _TABLE_HEADER.unpack_from(data)
        dtype = next((d for d in _SYMBOL_DTYPES if d.itemsize == width), None)
        if dtype is None:
            raise ValueError(f"Huffman table has symbols of {width} bytes; accepted: 1, 2, 4, 8.")
        blocks = -(-num_symbols // BLOCK_SIZE) if longest else 0
        sizes = (4 * longest, width * distinct, 2 * blocks)
        offset = _TABLE_HEADER.size
        if len(data) < offset + sum(sizes):
            raise ValueError(f"Huffman table truncated: {len(data)} bytes, it needs {offset + sum(sizes)}.")
        arrays = []
        for size, item_dtype in zip(sizes, ("<u4", dtype.newbyteorder("<"), "<u2")):
            arrays.append(np.frombuffer(data, dtype=item_dtype, count=size // np.dtype(item_dtype).itemsize,
                                        offset=offset))
            offset += size
        counts, symbols, block_bits = arrays
        table = cls(num_symbols, dtype, symbols.astype(dtype), counts.astype(np.uint32), block_bits.astype(np.uint16))
        return table, offset


def _tree_depths(freqs: np.ndarray) -> np.ndarray:
    """Depth of each leaf of a Huffman tree over `freqs` (at least 2 of them); ties broken by creation order."""
    heap = [(int(f), i) for i, f in enumerate(freqs)]
    heapq.heapify(heap)
    parent = [0] * (2 * len(heap) - 1)
    node = len(heap)
    while len(heap) > 1:
        (f1, a), (f2, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (f1 + f2, node))
        node += 1
    depth = [0] * len(parent)
    for child in range(len(parent) - 2, -1, -1):  # parents are created after their children
        depth[child] = depth[parent[child]] + 1
    return np.array(depth[:len(freqs)], dtype=np.int64)


def huffman_code_lengths(freqs: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths for symbol frequencies `freqs` (at least 2, all > 0), none longer than `max_length`.

    When the optimal code is too deep, the frequencies are halved (rounding up) and the tree rebuilt, until it
    fits; this only happens for very skewed (Fibonacci-like) counts and costs little compression.
    """
    if len(freqs) > 1 << max_length:
        raise ValueError(f"{len(freqs)} distinct symbols cannot have codes of at most {max_length} bits.")
    freqs = np.asarray(freqs, dtype=np.int64)
    lengths = _tree_depths(freqs)
    while lengths.max() > max_length:
        freqs = (freqs + 1) // 2
        lengths = _tree_depths(freqs)
    return lengths


def _first_codes(length_counts: np.ndarray) -> np.ndarray:
    """The canonical code of the first symbol of each length (int64; lengths 1..L)."""
    first, code = [], 0
    for count in length_counts:
        first.append(code)
        code = (code + int(count)) << 1
    return np.array(first, dtype=np.int64)


def huffman_encode(symbols: np.ndarray) -> tuple[bytes, HuffmanTable]:
    """Canonical Huffman coding of a stream of unsigned integers (any shape, read flattened).

    Returns the bits (most significant first, zero-padded to a whole byte) and the `HuffmanTable`. A stream with
    fewer than 2 distinct symbols takes no bits at all. Codes are at most `MAX_CODE_LENGTH` bits.

    Raises:
        ValueError: when `symbols` is not uint8, uint16, uint32 or uint64.
    """
    flat = np.asarray(symbols).reshape(-1)
    if flat.dtype not in _SYMBOL_DTYPES:
        raise ValueError(f"Huffman symbols must be one of {[d.name for d in _SYMBOL_DTYPES]}; got {flat.dtype}.")
    values, inverse, freqs = np.unique(flat, return_inverse=True, return_counts=True)
    no_bits = (np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.uint16))
    if len(values) < 2:
        return b"", HuffmanTable(flat.size, flat.dtype, values, *no_bits)
    lengths = huffman_code_lengths(freqs)
    order = np.lexsort((values, lengths))
    length_counts = np.bincount(lengths, minlength=int(lengths.max()) + 1)[1:].astype(np.uint32)
    sorted_lengths = lengths[order]
    offsets = np.cumsum(length_counts) - length_counts
    codes = np.empty(len(values), dtype=np.int64)
    codes[order] = (_first_codes(length_counts)[sorted_lengths - 1] + np.arange(len(values))
                    - offsets[sorted_lengths - 1])
    stream_lengths, stream_codes = lengths[inverse], codes[inverse]
    starts = np.cumsum(stream_lengths) - stream_lengths
    bits = np.zeros(int(starts[-1] + stream_lengths[-1]), dtype=np.uint8)
    for j in range(len(length_counts)):  # bit j (from the most significant) of every code longer than j
        rows = np.flatnonzero(stream_lengths > j)
        bits[starts[rows] + j] = (stream_codes[rows] >> (stream_lengths[rows] - 1 - j)) & 1
    block_bits = np.add.reduceat(stream_lengths, np.arange(0, flat.size, BLOCK_SIZE)).astype(np.uint16)
    return np.packbits(bits).tobytes(), HuffmanTable(flat.size, flat.dtype, values[order], length_counts, block_bits)


def _read_window(buffer: np.ndarray, positions: np.ndarray, width: int) -> np.ndarray:
    """The `width` bits starting at each bit position (reads past the end see the last byte; never used)."""
    index = np.minimum((positions >> 3)[:, None] + np.arange(8), buffer.size - 1)
    word = np.bitwise_or.reduce(buffer[index].astype(np.uint64) << _BYTE_SHIFTS, axis=1)
    return ((word << (positions & 7).astype(np.uint64)) >> np.uint64(64 - width)).astype(np.int64)


def huffman_decode(data: bytes, table: HuffmanTable) -> np.ndarray:
    """Inverse of `huffman_encode`: the 1-D stream, in `table.dtype`.

    The blocks of `BLOCK_SIZE` symbols decode side by side, one symbol of every block per vectorised step; a
    code's length is found by comparing the next bits with each length's last code (canonical codes are ordered).

    Raises:
        ValueError: when `data` does not hold exactly the bits `table` describes.
    """
    longest = len(table.length_counts)
    if not longest:
        if data:
            raise ValueError(f"Huffman payload has {len(data)} bytes; a stream of one repeated symbol has none.")
        return np.full(table.num_symbols, table.symbols[0] if table.num_symbols else 0, dtype=table.dtype)
    ends = np.cumsum(table.block_bits.astype(np.int64))
    if len(data) != (int(ends[-1]) + 7) // 8:
        raise ValueError(f"Huffman payload has {len(data)} bytes; its table describes {(int(ends[-1]) + 7) // 8}.")
    counts = table.length_counts.astype(np.int64)
    first = _first_codes(counts)
    code_lengths = np.arange(1, longest + 1)
    limits = (first + counts) << (longest - code_lengths)  # left-aligned end of each length's codes
    offsets = np.cumsum(counts) - counts
    buffer = np.frombuffer(data, dtype=np.uint8)
    sizes = np.minimum(BLOCK_SIZE, table.num_symbols - BLOCK_SIZE * np.arange(len(ends)))
    positions = ends - table.block_bits.astype(np.int64)
    decoded = np.empty((len(ends), BLOCK_SIZE), dtype=table.dtype)
    for i in range(int(sizes.max())):
        window = _read_window(buffer, positions, longest)
        length_index = np.searchsorted(limits, window, side="right")
        shift = longest - code_lengths[length_index]
        decoded[:, i] = table.symbols[offsets[length_index] + (window >> shift) - first[length_index]]
        positions += np.where(i < sizes, code_lengths[length_index], 0)
    if not np.array_equal(positions, ends):
        raise ValueError("Corrupt Huffman payload: its blocks do not decode to the recorded bit lengths.")
    return decoded.reshape(-1)[:table.num_symbols]
