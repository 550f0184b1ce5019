"""The deep-compressed file format (`hf_prune.deep.v1`): quantized weights with Huffman-coded cluster indices and
gaps between kept positions, plus any other tensors as they are, in one safetensors file.

The gaps: in the flattened row-major order, kept position `p_i` is stored as `p_i - p_{i-1}` (`p_{-1} = -1`, so
every gap is >= 1). A gap up to 255 is the symbol `gap`; a longer one is preceded by filler symbols 0, each
meaning "255 positions with no kept weight" (the paper's filler zeros, here in a separate stream so fillers carry
no cluster index). Both streams use the canonical Huffman code of `hf_prune.compression.huffman`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..constants import DEEP_COMPRESSED_FORMAT, MASKS_NAME
from ..serialization import atomic_save_safetensors, read_tagged_safetensors
from ..version import __version__
from .huffman import HuffmanTable, huffman_decode, huffman_encode
from .quantization import QuantizedWeight, check_bits, dequantize


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


def _encode_stream(symbols: np.ndarray) -> bytes:
    data, table = huffman_encode(symbols)
    return table.to_bytes() + data


def _decode_stream(data: bytes, max_symbols: int) -> np.ndarray:
    table, size = HuffmanTable.from_bytes(data)
    if table.num_symbols > max_symbols:
        raise ValueError(f"a stream of {table.num_symbols} symbols where at most {max_symbols} fit")
    return huffman_decode(data[size:], table)


def _encode_layer(quantized: QuantizedWeight) -> tuple[torch.Tensor, dict[str, Any]]:
    """One layer as bytes (centroids, coded indices, coded gaps) and its header entry."""
    sections = (quantized.centroids.detach().cpu().numpy().astype("<f4").tobytes(),
                _encode_stream(quantized.indices.cpu().numpy()),
                _encode_stream(gap_symbols(quantized.mask)))
    entry = {"shape": list(quantized.shape), "bits": quantized.bits, "kept": quantized.indices.numel(),
             "sections": [len(section) for section in sections]}
    return torch.frombuffer(bytearray(b"".join(sections)), dtype=torch.uint8), entry


def _decode_layer(blob: bytes, entry: Mapping[str, Any]) -> QuantizedWeight:
    shape, bits, kept = tuple(entry["shape"]), int(entry["bits"]), int(entry["kept"])
    centroid_bytes, index_bytes, gap_bytes = entry["sections"]
    check_bits(bits)
    if centroid_bytes != 4 << bits or centroid_bytes + index_bytes + gap_bytes != len(blob):
        raise ValueError(f"sections {entry['sections']} do not fit {len(blob)} bytes and {bits} bits")
    numel = int(np.prod(shape, dtype=np.int64))
    centroids = np.frombuffer(blob, dtype="<f4", count=1 << bits).astype(np.float32)
    indices = _decode_stream(blob[centroid_bytes:centroid_bytes + index_bytes], kept)
    positions = positions_from_gaps(_decode_stream(blob[centroid_bytes + index_bytes:], kept + numel // GAP_LIMIT))
    if indices.dtype != np.uint8 or len(indices) != kept or len(positions) != kept or (kept and (
            int(indices.max()) >= 1 << bits or positions[-1] >= numel)):
        raise ValueError(f"decoded {len(indices)} indices and {len(positions)} positions, expected {kept} within "
                         f"{2 ** bits} clusters and {numel} entries")
    mask = np.zeros(numel, dtype=bool)
    mask[positions] = True
    return QuantizedWeight(torch.from_numpy(centroids), torch.from_numpy(indices.copy()),
                           torch.from_numpy(mask).reshape(shape))


def _digest(name: str, tensor: torch.Tensor) -> str:
    """sha256 of a tensor's name, dtype, shape and bytes."""
    hasher = hashlib.sha256(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
    hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()


def _header_digest(header: Mapping[str, str]) -> str:
    return hashlib.sha256("\0".join(header.get(key, "") for key in ("layers", "metadata", "checksums")).encode()
                          ).hexdigest()


def save_deep_compressed(path: str | os.PathLike, quantized: Mapping[str, QuantizedWeight],
                         other_tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None) -> None:
    """Writes quantized weights (Huffman coded) and other tensors (as they are) into one safetensors file, atomically.

    Each quantized weight is one uint8 tensor under its own name: its float32 centroids, then its cluster indices
    and its gap symbols, each as a `HuffmanTable.to_bytes()` followed by the coded bits. The header (format
    `hf_prune.deep.v1`) holds per weight its shape, bits, kept count and section sizes, the JSON `metadata`, a
    sha256 of every tensor (name, dtype, shape, bytes) and one of the header entries themselves.

    Args:
        path (`str`): the file to write.
        quantized (`dict[str, QuantizedWeight]`): the quantized weights, by parameter name.
        other_tensors (`dict[str, torch.Tensor]`): everything else to store (no tensor may share memory with
            another: drop tied duplicates first).
        metadata (`dict`, *optional*): JSON-serialisable, returned by `read_deep_compressed`.

    Raises:
        ValueError: when a name is both quantized and in `other_tensors`.
    """
    overlap = sorted(set(quantized) & set(other_tensors))
    if overlap:
        raise ValueError(f"Tensors {overlap} are both quantized and in `other_tensors`; store each once.")
    tensors, layers = {}, {}
    for name, weight in quantized.items():
        tensors[name], layers[name] = _encode_layer(weight)
    tensors.update({name: tensor.detach().cpu().contiguous() for name, tensor in other_tensors.items()})
    header = {"format": DEEP_COMPRESSED_FORMAT, "hf_prune_version": __version__,
              "layers": json.dumps(layers, sort_keys=True),
              "metadata": json.dumps(dict(metadata or {}), sort_keys=True),
              "checksums": json.dumps({name: _digest(name, t) for name, t in tensors.items()}, sort_keys=True)}
    header["header_sha256"] = _header_digest(header)
    atomic_save_safetensors(tensors, path, header)


def _read_checked(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """The layer entries, metadata and tensors of a deep-compressed file, every checksum verified."""
    header, tensors = read_tagged_safetensors(path, DEEP_COMPRESSED_FORMAT, "deep-compressed checkpoint")
    if header.get("header_sha256") != _header_digest(header):
        raise ValueError(f"{path} is corrupt: its header does not match its checksum.")
    try:
        layers, metadata, checksums = (json.loads(header[key]) for key in ("layers", "metadata", "checksums"))
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is corrupt: unreadable header entry {err}.") from None
    if set(checksums) != set(tensors):
        raise ValueError(f"{path} is corrupt: tensors {sorted(set(checksums) ^ set(tensors))} lack data or checksum.")
    corrupt = sorted(name for name, tensor in tensors.items() if _digest(name, tensor) != checksums[name])
    if corrupt:
        raise ValueError(f"{path} is corrupt: checksum mismatch for {corrupt}.")
    return layers, metadata, tensors


def read_deep_compressed(path: str | os.PathLike
                         ) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict[str, Any]]:
    """Reads a `save_deep_compressed` file: `(quantized weights, other tensors, metadata)`, all checksums verified.

    Raises:
        ValueError: when the file is unreadable, truncated, of another format, fails a checksum or does not decode;
            nothing is returned then.
    """
    layers, metadata, tensors = _read_checked(path)
    quantized = {}
    for name, entry in layers.items():
        if name not in tensors:
            raise ValueError(f"{path} is corrupt: no data for quantized weight {name!r}.")
        try:
            quantized[name] = _decode_layer(tensors.pop(name).numpy().tobytes(), entry)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise ValueError(f"{path} is corrupt: quantized weight {name!r} does not decode ({err}).") from None
    return quantized, tensors, metadata


def load_deep_compressed(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`(dense float32 quantized weights, other tensors)` from a `save_deep_compressed` file; the weights equal
    `dequantize` of what was saved, bit for bit. Raises `ValueError` as `read_deep_compressed` does."""
    quantized, others, _ = read_deep_compressed(path)
    return {name: dequantize(q) for name, q in quantized.items()}, others


def read_deep_state_dict(path: str | os.PathLike, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of a `save_pretrained(compression="deep")` file, quantized weights dequantized.

    Raises:
        ValueError: as `read_deep_compressed`, and when the file's masks differ from `masks` (the masks file's).
    """
    quantized, others, _ = read_deep_compressed(path)
    mismatched = sorted(n for n in masks.keys() | quantized.keys()
                        if n not in quantized or n not in masks or not torch.equal(quantized[n].mask, masks[n]))
    if mismatched:
        raise ValueError(f"{path} does not match {MASKS_NAME}: the masks of {mismatched} differ.")
    return {**{name: dequantize(q) for name, q in quantized.items()}, **others}


@dataclass(frozen=True)
class DeepCompressionSizes:
    """Bytes of the quantized weights: as dense float32, and in a `save_deep_compressed` file by part."""

    dense_bytes: int
    codebook_bytes: int
    index_bytes: int
    position_bytes: int

    @property
    def compressed_bytes(self) -> int:
        return self.codebook_bytes + self.index_bytes + self.position_bytes

    @property
    def ratio(self) -> float:
        """Dense float32 size over compressed size."""
        return self.dense_bytes / max(1, self.compressed_bytes)


def deep_compression_sizes(path: str | os.PathLike) -> DeepCompressionSizes:
    """Sizes of the quantized weights in a `save_deep_compressed` file (from its header; the tensors are not read).

    `index_bytes` and `position_bytes` include their Huffman tables; the other tensors and the file header are
    not counted.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            layers = json.loads((f.metadata() or {})["layers"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable deep-compressed file: {err}") from None
    sections = np.array([entry["sections"] for entry in layers.values()], dtype=np.int64).reshape(-1, 3)
    codebook, indices, positions = (int(size) for size in sections.sum(axis=0))
    dense = sum(4 * int(np.prod(entry["shape"], dtype=np.int64)) for entry in layers.values())
    return DeepCompressionSizes(dense, codebook, indices, positions)
