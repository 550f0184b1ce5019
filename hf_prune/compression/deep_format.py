"""The deep-compressed file format (`hf_prune.deep.v2`; `hf_prune.deep.v1` files are still read): quantized weights
with Huffman-coded cluster indices, and (unless the positions are kept in the masks file) Huffman-coded gaps between
kept positions, plus any other tensors as they are, in one safetensors file.

The cluster indices and the gaps are Huffman-coded streams of `hf_prune.compression.positions`, whose gap stream
is also how a `hf_prune.gapmask.v1` masks file stores each mask.

Reading checks every count and shape of the header (against the masks and the model's shapes when given) before
anything is decoded, so what a file decodes to is bounded by the model it is loaded into, not by the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..constants import DEEP_COMPRESSED_FORMAT, DEEP_COMPRESSED_FORMAT_V1, DEEP_COMPRESSED_WEIGHTS_NAME, MASKS_NAME
from ..serialization import (
    atomic_save_safetensors,
    check_mask_digests,
    checked_shape,
    header_json,
    is_count,
    mask_digest,
    read_tagged_safetensors,
)
from ..version import __version__
from .positions import decode_positions, decode_stream, encode_positions, encode_stream
from .quantization import QuantizedWeight, dequantize


#: Header `positions` of a v2 file: every layer carries its gap stream, or the positions are the masks file's.
POSITIONS = ("gaps", "masks")


def _encode_layer(quantized: QuantizedWeight, store_positions: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """One layer as bytes (centroids, coded indices and, with `store_positions`, coded gaps) and its header entry."""
    sections = [quantized.centroids.detach().cpu().numpy().astype("<f4").tobytes(),
                encode_stream(quantized.indices.cpu().numpy())]
    entry = {"shape": list(quantized.shape), "bits": quantized.bits, "kept": quantized.indices.numel()}
    if store_positions:
        sections.append(encode_positions(quantized.mask))
    else:  # ties the layer to the masks file that holds its positions
        entry["mask_sha256"] = mask_digest(quantized.mask)
    entry["sections"] = [len(section) for section in sections]
    return torch.frombuffer(bytearray(b"".join(sections)), dtype=torch.uint8), entry


def _check_entry(path: str | os.PathLike, name: str, entry: Any, positions: str,
                 stored: Mapping[str, tuple[str, tuple[int, ...]]]) -> tuple[tuple[int, ...], int, int, list[int]]:
    """`(shape, bits, kept, sections)` of a layer entry whose every field is well-formed and fits its data."""
    field = f"layers[{name!r}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is corrupt: `{field}` must be a JSON object; got {json.dumps(entry)[:80]}.")
    shape = checked_shape(path, f"{field}.shape", entry.get("shape"))
    bits, kept, sections = entry.get("bits"), entry.get("kept"), entry.get("sections")
    if not is_count(bits, 1) or bits > 8:
        raise ValueError(f"{path} is corrupt: `{field}.bits` must be an integer in 1..8; got {bits!r}.")
    if not is_count(kept) or kept > math.prod(shape):
        raise ValueError(f"{path} is corrupt: `{field}.kept` must be an integer in 0..{math.prod(shape)} (the "
                         f"entries of shape {list(shape)}); got {kept!r}.")
    count = 3 if positions == "gaps" else 2
    if not isinstance(sections, list) or len(sections) != count or not all(is_count(s) for s in sections) \
            or sections[0] != 4 << bits:
        raise ValueError(f"{path} is corrupt: `{field}.sections` must list {count} byte counts, the first "
                         f"{4 << bits} ({2 ** bits} float32 centroids); got {json.dumps(sections)[:80]}.")
    if stored.get(name) != ("U8", (sum(sections),)):
        raise ValueError(f"{path} is corrupt: the data of {name!r} is {stored.get(name)} (dtype, shape), its "
                         f"sections need ('U8', ({sum(sections)},)).")
    return shape, bits, kept, sections


def _decode_layer(path: str | os.PathLike, name: str, blob: bytes, layout: tuple[tuple[int, ...], int, int, list[int]],
                  mask: torch.Tensor | None) -> QuantizedWeight:
    """The layer stored in `blob`; its positions from its gap stream (checked against `mask` when given) or,
    without one, `mask` itself."""
    shape, bits, kept, sections = layout
    centroids = np.frombuffer(blob, dtype="<f4", count=1 << bits).astype(np.float32)
    try:
        indices = decode_stream(blob[sections[0]:sections[0] + sections[1]], kept, exact=True)
        if kept and int(indices.max()) >= 1 << bits:
            raise ValueError(f"cluster index {int(indices.max())} of {2 ** bits} clusters")
        decoded = decode_positions(blob[sections[0] + sections[1]:], shape, kept) if len(sections) == 3 else mask
    except ValueError as err:
        raise ValueError(f"{path} is corrupt: quantized weight {name!r} does not decode ({err}).") from None
    if mask is not None and not torch.equal(decoded, mask.cpu()):
        raise ValueError(f"{path} does not match {MASKS_NAME}: the positions of {name!r} differ.")
    return QuantizedWeight(torch.from_numpy(centroids), torch.from_numpy(indices.copy()), decoded)


def _digest(name: str, tensor: torch.Tensor) -> str:
    """sha256 of a tensor's name, dtype, shape and bytes."""
    hasher = hashlib.sha256(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
    hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()


def _header_digest(header: Mapping[str, str]) -> str:
    keys = ("layers", "metadata", "checksums") + (("positions",) if header.get("format") != DEEP_COMPRESSED_FORMAT_V1
                                                   else ())
    return hashlib.sha256("\0".join(header.get(key, "") for key in keys).encode()).hexdigest()


def save_deep_compressed(path: str | os.PathLike, quantized: Mapping[str, QuantizedWeight],
                         other_tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None,
                         store_positions: bool = True) -> None:
    """Writes quantized weights (Huffman coded) and other tensors (as they are) into one safetensors file, atomically.

    Each quantized weight is one uint8 tensor under its own name: its float32 centroids, then its cluster indices
    and (with `store_positions`) its gap symbols, each as a `HuffmanTable.to_bytes()` followed by the coded bits.
    The header (format `hf_prune.deep.v2`) holds per weight its shape, bits, kept count and section sizes,
    `positions` (`"gaps"`, or `"masks"`: the positions are those of the masks saved beside, which a reader must
    pass), the JSON `metadata`, a sha256 of every tensor (name, dtype, shape, bytes) and one of the header entries.

    Args:
        path (`str`): the file to write.
        quantized (`dict[str, QuantizedWeight]`): the quantized weights, by parameter name.
        other_tensors (`dict[str, torch.Tensor]`): everything else to store (no tensor may share memory with
            another: drop tied duplicates first).
        metadata (`dict`, *optional*): JSON-serialisable, returned by `read_deep_compressed`.
        store_positions (`bool`, *optional*, defaults to `True`): `False` leaves the kept positions out, for a
            file stored beside the masks (as `PrunedModel.save_pretrained` does); it then reads only with them.

    Raises:
        ValueError: when a name is both quantized and in `other_tensors`.
    """
    overlap = sorted(set(quantized) & set(other_tensors))
    if overlap:
        raise ValueError(f"Tensors {overlap} are both quantized and in `other_tensors`; store each once.")
    tensors, layers = {}, {}
    for name, weight in quantized.items():
        tensors[name], layers[name] = _encode_layer(weight, store_positions)
    tensors.update({name: tensor.detach().cpu().contiguous() for name, tensor in other_tensors.items()})
    header = {"format": DEEP_COMPRESSED_FORMAT, "hf_prune_version": __version__,
              "layers": json.dumps(layers, sort_keys=True),
              "metadata": json.dumps(dict(metadata or {}), sort_keys=True),
              "checksums": json.dumps({name: _digest(name, t) for name, t in tensors.items()}, sort_keys=True),
              "positions": POSITIONS[0] if store_positions else POSITIONS[1]}
    header["header_sha256"] = _header_digest(header)
    atomic_save_safetensors(tensors, path, header)


def _read(path: str | os.PathLike, masks: Mapping[str, torch.Tensor] | None,
          shapes: Mapping[str, Sequence[int]] | None
          ) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict[str, Any]]:
    """Header checked (against `masks` and the model's state-dict `shapes` when given), then the tensors read,
    their checksums verified, and the quantized weights decoded."""
    layers, metadata, header, tensors = _read_checked(path, masks, shapes)
    checksums = header_json(path, header, "checksums", dict)
    if set(checksums) != set(tensors):
        raise ValueError(f"{path} is corrupt: tensors {sorted(set(checksums) ^ set(tensors))} lack data or checksum.")
    corrupt = sorted(name for name, tensor in tensors.items() if _digest(name, tensor) != checksums[name])
    if corrupt:
        raise ValueError(f"{path} is corrupt: checksum mismatch for {corrupt}.")
    quantized = {name: _decode_layer(path, name, tensors.pop(name).numpy().tobytes(), layout,
                                     None if masks is None else masks[name])
                 for name, layout in layers.items()}
    return quantized, tensors, metadata


def _read_checked(path: str | os.PathLike, masks: Mapping[str, torch.Tensor] | None,
                  shapes: Mapping[str, Sequence[int]] | None, decoding: bool = True
                  ) -> tuple[dict[str, tuple[tuple[int, ...], int, int, list[int]]], dict[str, Any], dict[str, str],
                             dict[str, torch.Tensor]]:
    """`(layers, metadata, header, tensors)` of a deep-compressed file, its header checked by `_check_header`
    before any tensor is read; without `decoding`, none is (`tensors` is empty)."""
    checked = []
    header, tensors = read_tagged_safetensors(
        path, (DEEP_COMPRESSED_FORMAT, DEEP_COMPRESSED_FORMAT_V1), "deep-compressed checkpoint",
        lambda header, stored: checked.append(_check_header(path, header, stored, masks, shapes, decoding)),
        read_tensors=decoding, file_name=DEEP_COMPRESSED_WEIGHTS_NAME)
    return (*checked[0], header, tensors)


def _check_header(path: str | os.PathLike, header: Mapping[str, str], stored: Mapping[str, tuple[str, tuple[int, ...]]],
                  masks: Mapping[str, torch.Tensor] | None, shapes: Mapping[str, Sequence[int]] | None,
                  decoding: bool = True
                  ) -> tuple[dict[str, tuple[tuple[int, ...], int, int, list[int]]], dict[str, Any]]:
    if header.get("header_sha256") != _header_digest(header):
        raise ValueError(f"{path} is corrupt: its header does not match its checksum.")
    entries, metadata = header_json(path, header, "layers", dict), header_json(path, header, "metadata", dict)
    positions = header.get("positions", POSITIONS[0]) if header["format"] == DEEP_COMPRESSED_FORMAT else POSITIONS[0]
    if positions not in POSITIONS:
        raise ValueError(f"{path} is corrupt: header entry `positions` must be one of {POSITIONS}; got {positions!r}.")
    if positions == "masks" and masks is None and decoding:
        raise ValueError(f"{path} keeps the kept positions in the masks saved beside it ({MASKS_NAME}); pass its "
                         "masks to read it.")
    layers = {name: _check_entry(path, name, entry, positions, stored) for name, entry in entries.items()}
    if masks is not None:
        problems = [f"{name} is not quantized in it" for name in masks if name not in layers]
        problems += [f"{name} has no mask" for name in layers if name not in masks]
        problems += [f"{name} has shape {list(shape)} and {kept} kept entries, its mask {list(masks[name].shape)} and "
                     f"{int(masks[name].sum())}" for name, (shape, _, kept, _) in layers.items()
                     if name in masks and (shape != tuple(masks[name].shape) or kept != int(masks[name].sum()))]
        if problems:
            raise ValueError(f"{path} does not match {MASKS_NAME}: " + "; ".join(problems) + ".")
        recorded = {name: entry["mask_sha256"] for name, entry in entries.items() if "mask_sha256" in entry}
        check_mask_digests(path, recorded or None, masks, f"it was saved with other masks than this {MASKS_NAME}: "
                                                          "the folder mixes two saves")
    if shapes is not None:
        others = {name: shape for name, (_, shape) in stored.items() if name not in layers}
        problems = [f"{name} (not in the model)" for name in others if name not in shapes]
        problems += [f"{name} of shape {list(shape)} (the model's is {list(shapes[name])})"
                     for name, shape in others.items() if name in shapes and tuple(shapes[name]) != shape]
        if problems:
            raise ValueError(f"{path} does not match the model: it stores " + ", ".join(problems) + ".")
    return layers, metadata


def read_deep_compressed(path: str | os.PathLike, masks: Mapping[str, torch.Tensor] | None = None
                         ) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict[str, Any]]:
    """Reads a `save_deep_compressed` file: `(quantized weights, other tensors, metadata)`, all checksums verified.

    Args:
        path (`str`): the file.
        masks (`dict[str, torch.Tensor]`, *optional*): the masks saved beside it; required for a file written
            with `store_positions=False`. When given, every layer's name, shape and kept count must match them
            (checked before decoding) and stored positions must equal them.

    Raises:
        ValueError: when the file is unreadable, truncated, of another format, fails a checksum, does not decode
            or does not match `masks`; nothing is returned then.
    """
    return _read(path, masks, None)


def load_deep_compressed(path: str | os.PathLike, masks: Mapping[str, torch.Tensor] | None = None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`(dense float32 quantized weights, other tensors)` from a `save_deep_compressed` file; the weights equal
    `dequantize` of what was saved, bit for bit. `masks` and errors as in `read_deep_compressed`."""
    quantized, others, _ = read_deep_compressed(path, masks)
    return {name: dequantize(q) for name, q in quantized.items()}, others


def read_deep_state_dict(path: str | os.PathLike, masks: Mapping[str, torch.Tensor],
                         shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a `save_pretrained(compression="deep")` file, quantized weights dequantized.

    Args:
        path (`str`): the file.
        masks (`dict[str, torch.Tensor]`): the masks file's masks (the positions, for a v2 file).
        shapes (`dict[str, tuple]`, *optional*): the model's state-dict shapes; every other tensor must be one of
            them, checked before any data is read.

    Raises:
        ValueError: as `read_deep_compressed`, and when the file does not match `masks` or `shapes`.
    """
    quantized, others, _ = _read(path, masks, shapes)
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
    not counted. `position_bytes` is 0 for a file written with `store_positions=False` (as by
    `PrunedModel.save_pretrained`): its positions are the masks file's, whose size the caller must add.

    Raises:
        ValueError: for a corrupt or foreign file: the header is checked as on reading.
    """
    layers = _read_checked(path, None, None, decoding=False)[0].values()
    dense = sum(4 * math.prod(shape) for shape, _, _, _ in layers)
    codebook, indices, positions = (sum(section[i] if i < len(section) else 0 for _, _, _, section in layers)
                                    for i in range(3))
    return DeepCompressionSizes(dense, codebook, indices, positions)
