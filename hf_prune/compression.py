"""Deep Compression (Han, Mao & Dally 2016) after pruning: trained k-means quantization and Huffman coding.

The three stages, on the weights a `Pruner` targets:

1. pruning (`MagnitudePruningCallback`): a bool mask per weight, True = kept;
2. trained quantization: the kept entries of each weight share `2**bits` values (`quantize_weights`, k-means with
   linear initialisation), fine-tuned during training by `QuantizationCallback`;
3. Huffman coding of the cluster indices and of the gaps between kept positions (`huffman_encode`), stored by
   `save_deep_compressed` in one safetensors file that `load_deep_compressed` reads back bit-exact.

The gaps: in the flattened row-major order, kept position `p_i` is stored as `p_i - p_{i-1}` (`p_{-1} = -1`, so
every gap is >= 1). A gap up to 255 is the symbol `gap`; a longer one is preceded by filler symbols 0, each
meaning "255 positions with no kept weight" (the paper's filler zeros, here in a separate stream so fillers carry
no cluster index). Both streams use a canonical Huffman code stored JPEG-style: the number of codes of each
length, then the symbols in code order.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel
from safetensors import SafetensorError, safe_open
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from . import __version__
from .constants import DEEP_COMPRESSED_FORMAT, QUANTIZATION_STATE_NAME
from .distributed import refuse_sharded
from .pruner import check_masks_match
from .serialization import atomic_save_safetensors, read_tagged_safetensors


logger = logging.getLogger(__name__)

MIN_BITS, MAX_BITS = 1, 8
#: Longest Huffman code: a 32-bit window plus the up-to-7-bit misalignment still fits one uint64 read.
MAX_CODE_LENGTH = 32
#: Symbols per block; blocks decode in parallel. Its bit length, at most BLOCK_SIZE * MAX_CODE_LENGTH = 32768, is a
#: uint16 in the table.
BLOCK_SIZE = 1024
#: Largest gap stored as one symbol; symbol 0 is the filler (skip GAP_LIMIT positions).
GAP_LIMIT = 255

_SYMBOL_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64))
_TABLE_HEADER = struct.Struct("<QBBI")  # number of symbols, symbol width in bytes, longest code, distinct symbols
_BYTE_SHIFTS = np.arange(56, -8, -8, dtype=np.uint64)


def check_bits(bits: Any) -> None:
    """Raises `ValueError` unless `bits` is an integer in 1..8 (the paper uses 2..8)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"`bits` must be an integer in {MIN_BITS}..{MAX_BITS} (each weight keeps 2**bits shared "
                         f"values); got {bits!r}.")


# ------------------------------------------------------------------------------------------ trained quantization
@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """One pruned weight with shared values: `weight[mask] == centroids[indices]`, zero elsewhere.

    Args:
        centroids (`torch.Tensor`): float32, `2**bits` shared values (sorted after k-means; fine-tuning may move
            them in place).
        indices (`torch.Tensor`): uint8, the cluster of each kept entry, in row-major order of the kept positions.
        mask (`torch.Tensor`): bool, the weight's shape, True = kept.
    """

    centroids: torch.Tensor
    indices: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        size = self.centroids.numel()
        if self.centroids.dtype != torch.float32 or self.centroids.dim() != 1 or size & (size - 1) or size < 2:
            raise ValueError(f"`centroids` must be a 1-D float32 tensor of 2**bits values; got {self.centroids.dtype} "
                             f"of shape {tuple(self.centroids.shape)}.")
        if self.indices.dtype != torch.uint8 or self.mask.dtype != torch.bool:
            raise ValueError(f"`indices` must be uint8 and `mask` bool; got {self.indices.dtype} and "
                             f"{self.mask.dtype}.")
        if self.indices.numel() != int(self.mask.sum()):
            raise ValueError(f"{self.indices.numel()} `indices` for a mask keeping {int(self.mask.sum())} entries.")

    @property
    def bits(self) -> int:
        return self.centroids.numel().bit_length() - 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mask.shape)

    def kept_values(self) -> torch.Tensor:
        """`centroids[indices]`: the kept entries in row-major order."""
        return self.centroids[self.indices.int()]

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(self.centroids.to(device), self.indices.to(device), self.mask.to(device))


def _nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted `centroids` for each value: a binary search among the midpoints."""
    return torch.bucketize(values, (centroids[:-1] + centroids[1:]) / 2)


def _cluster_edges(ordered: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid clusters of the sorted values `ordered` as runs: cluster k is `ordered[e[k]:e[k + 1]]`."""
    cuts = torch.searchsorted(ordered, (centroids[:-1] + centroids[1:]) / 2, right=True)
    return torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), ordered.numel())])


def _lloyd(ordered: torch.Tensor, num_clusters: int, max_iter: int) -> torch.Tensor:
    """Lloyd's iterations from the linear initialisation, on sorted values: clusters are runs found by binary
    search and their sums come from one prefix sum (float64), so an iteration costs O(k log n)."""
    low, high = float(ordered[0]), float(ordered[-1])
    prefix = torch.cat([ordered.new_zeros(1, dtype=torch.float64), ordered.double().cumsum(0)])
    centroids = torch.linspace(low, high, num_clusters, device=ordered.device).clamp_(low, high)
    edges = _cluster_edges(ordered, centroids)
    for _ in range(max_iter):
        counts = edges[1:] - edges[:-1]
        means = (prefix[edges[1:]] - prefix[edges[:-1]]) / counts.clamp(min=1)
        centroids = torch.where(counts > 0, means, centroids.double()).float().clamp_(low, high).sort().values
        updated = _cluster_edges(ordered, centroids)
        if torch.equal(updated, edges):
            break
        edges = updated
    return centroids


def kmeans_1d(values: torch.Tensor, num_clusters: int, max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the scalars `values`, with linear initialisation; returns `(centroids, assignments)`.

    The centroids start evenly spaced over `[min, max]` (Han et al. 2016, §3.1: unlike density-based starts, this
    keeps centroids near the rare large weights, which matter most). Each iteration moves every centroid to the
    mean of its cluster (an empty cluster keeps its centroid) and reassigns every value to its nearest centroid,
    until no assignment changes or after `max_iter` iterations. In one dimension the clusters of sorted values are
    contiguous runs, so after one sort each iteration is a few binary searches: no n x k distance matrix, O(n)
    memory. The final assignment is a binary search of each value among the centroids' midpoints.

    Values with at most `num_clusters` distinct entries (weights already shared, e.g. after `QuantizationCallback`)
    are represented exactly instead: the centroids are those entries, the largest repeated to fill up.

    The centroids are sorted float32 values in `[min, max]`, and `assignments` (int64) is always the nearest
    centroid of each value for the returned centroids (a value on a midpoint goes to the lower centroid).
    """
    values = values.detach().reshape(-1).float()
    if values.numel() == 0:
        return torch.zeros(num_clusters, device=values.device), torch.zeros(0, dtype=torch.int64, device=values.device)
    ordered = values.sort().values
    distinct = torch.unique_consecutive(ordered)
    if distinct.numel() <= num_clusters:
        centroids = torch.cat([distinct, distinct[-1:].expand(num_clusters - distinct.numel())])
    else:
        centroids = _lloyd(ordered, num_clusters, max_iter)
    return centroids, _nearest(values, centroids)


def quantize_weight(weight: torch.Tensor, mask: torch.Tensor, bits: int, max_iter: int = 100) -> QuantizedWeight:
    """Clusters the kept entries of one weight into `2**bits` shared values (see `kmeans_1d`)."""
    check_bits(bits)
    mask = mask.to(device=weight.device, dtype=torch.bool).clone()
    centroids, assignments = kmeans_1d(weight.detach()[mask], 2 ** bits, max_iter)
    return QuantizedWeight(centroids, assignments.to(torch.uint8), mask)


def quantize_weights(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], bits: int,
                     max_iter: int = 100) -> dict[str, QuantizedWeight]:
    """Trained quantization's starting point: each weight's kept entries clustered into `2**bits` shared values.

    Args:
        weights (`dict[str, torch.Tensor]`): the targeted weights, by parameter name.
        masks (`dict[str, torch.Tensor]`): a bool mask (True = kept) for every weight in `weights`. Masks that keep
            everything are accepted (quantization without pruning).
        bits (`int`): 1..8; each weight gets `2**bits` centroids (the paper uses 8 for conv, 5 for fc layers).
        max_iter (`int`, *optional*, defaults to 100): most Lloyd iterations per weight.

    Raises:
        ValueError: when `bits` is outside 1..8, `masks` is empty (nothing was pruned yet) or does not match
            `weights` name for name and shape for shape.
    """
    check_bits(bits)
    if not masks:
        raise ValueError("`masks` is empty: Deep Compression quantizes the weights pruning kept, so prune first and "
                         "pass the masks of a PrunedModel or of a MagnitudePruningCallback that has run (in the same "
                         "Trainer, list it before QuantizationCallback).")
    check_masks_match(masks, {name: tuple(weight.shape) for name, weight in weights.items()})
    return {name: quantize_weight(weights[name], masks[name], bits, max_iter) for name in masks}


def dequantize(quantized: QuantizedWeight) -> torch.Tensor:
    """The dense float32 weight: shared values at the kept positions, exactly 0 at the pruned ones."""
    dense = torch.zeros(quantized.shape, dtype=torch.float32, device=quantized.mask.device)
    return dense.masked_scatter_(quantized.mask, quantized.kept_values())


def centroid_gradients(quantized: QuantizedWeight, weight_grad: torch.Tensor) -> torch.Tensor:
    """dL/dc_k = sum of dL/dw over the kept entries assigned to centroid k (Han et al. 2016, eq. 3)."""
    kept = weight_grad.detach()[quantized.mask].float()
    return torch.bincount(quantized.indices, weights=kept, minlength=quantized.centroids.numel()).float()


class QuantizationCallback(TrainerCallback):
    """Trained quantization during `Trainer.train()` of a pruned model (Deep Compression's second stage).

    At train begin, each masked weight's kept entries are clustered into `2**bits` centroids (`quantize_weights`)
    and the weight is overwritten with `dequantize`: its centroid values at the kept positions, 0 elsewhere. Then,
    at every optimizer step:

    - before it (`on_pre_optimizer_step`, after the Trainer's gradient clipping), each centroid takes one plain SGD
      step on the sum of the gradients of the weights assigned to it, as in the paper (§3.2):
      `c_k <- c_k - lr * sum_{w in cluster k} dL/dw`, with `lr` = `learning_rate` or, by default, the current
      learning rate of the optimizer parameter group holding the weight (so the Trainer's schedule applies). The
      weight's gradient is then dropped, so the Trainer's optimizer leaves it alone (no Adam moments, no weight
      decay: the centroid step is its only update);
    - after it (`on_optimizer_step`), each weight is rewritten from its centroids.

    Masks and cluster assignments never change: pruned weights stay exactly 0 and every kept weight is one of its
    layer's centroids. The other parameters (embeddings, LayerNorms, biases, head) train as usual. Each checkpoint
    gets `quantization_state.safetensors`, and `resume_from_checkpoint` restores it. After training, pass
    `callback.quantized` to `save_deep_compressed`. With fp16 mixed precision keep `max_grad_norm > 0`: the
    Trainer unscales the gradients when it clips them, before this callback reads them.

    ```python
    pruning = MagnitudePruningCallback.from_pretrained("pruned")  # or the masks of a PrunedModel
    quantization = QuantizationCallback(pruning, bits=4)
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[pruning, quantization]).train()
    ```

    Args:
        masks (`dict[str, torch.Tensor]`, `MagnitudePruningCallback` or `PrunedModel`): the masks, or what holds
            them, read at train begin; names are the trained model's parameter names. A pruning callback in the
            same Trainer must come before this one and have finished its schedule by then.
        bits (`int`, *optional*, defaults to 4): 1..8, for `2**bits` shared values per weight.
        learning_rate (`float`, *optional*): the centroids' SGD learning rate; defaults to the optimizer's.
        max_iter (`int`, *optional*, defaults to 100): most k-means iterations per weight.

    Raises:
        ValueError: `bits` outside 1..8 (here); at train begin, no masks yet or a pruning schedule still running.
    """

    def __init__(self, masks: Any, bits: int = 4, learning_rate: float | None = None, max_iter: int = 100) -> None:
        check_bits(bits)
        self.source = masks
        self.bits = bits
        self.learning_rate = learning_rate
        self.max_iter = max_iter
        self.quantized: dict[str, QuantizedWeight] = {}
        self.params: dict[str, torch.nn.Parameter] = {}

    def _masks(self) -> Mapping[str, torch.Tensor]:
        pruner = getattr(self.source, "pruner", None)
        if pruner is not None and pruner.target_sparsity < pruner.schedule.final:
            raise ValueError(f"The pruning schedule is still running (sparsity {pruner.target_sparsity:.4f} of "
                             f"{pruner.schedule.final}) when quantization starts; Deep Compression quantizes after "
                             "pruning: finish pruning in an earlier run, or use a oneshot schedule at step 0.")
        return self.source if isinstance(self.source, Mapping) else self.source.masks

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        self.params = dict(extract_model_from_parallel(model).named_parameters())
        refuse_sharded(self.params.values(), "QuantizationCallback")
        if state.global_step > 0:
            self.quantized = self._restore_from_checkpoint(args, state)
        else:
            masks = self._masks()
            check_masks_match(masks, self._shapes(masks))
            self.quantized = quantize_weights({name: self.params[name] for name in masks}, masks, self.bits,
                                              self.max_iter)
        self._write_weights()

    @torch.no_grad()
    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        lrs = {} if self.learning_rate is not None else {
            id(param): group["lr"] for group in optimizer.param_groups for param in group["params"]}
        for name, quantized in self.quantized.items():
            param = self.params[name]
            if param.grad is None:
                continue
            lr = lrs.get(id(param), self.learning_rate)
            if lr is None:
                raise ValueError(f"{name} is not in the optimizer, so it has no learning rate; pass `learning_rate`.")
            quantized.centroids.sub_(centroid_gradients(quantized, param.grad), alpha=lr)
            param.grad = None

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> None:
        self._write_weights()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self.quantized or not state.is_world_process_zero:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(checkpoint, exist_ok=True)
        save_deep_compressed(os.path.join(checkpoint, QUANTIZATION_STATE_NAME), self.quantized, {},
                             {"global_step": state.global_step})

    def _shapes(self, names: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """The shapes of the model's parameters among `names` (others are reported as unexpected)."""
        return {name: tuple(self.params[name].shape) for name in names if name in self.params}

    @torch.no_grad()
    def _write_weights(self) -> None:
        for name, quantized in self.quantized.items():
            param = self.params[name]
            param.zero_().masked_scatter_(quantized.mask, quantized.kept_values().to(param.dtype))

    def _restore_from_checkpoint(self, args: TrainingArguments, state: TrainerState) -> dict[str, QuantizedWeight]:
        folders = [os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        if isinstance(args.resume_from_checkpoint, str):
            folders.insert(0, args.resume_from_checkpoint)
        paths = [os.path.join(folder, QUANTIZATION_STATE_NAME) for folder in folders]
        path = next((p for p in paths if os.path.isfile(p)), None)
        if path is None:
            raise FileNotFoundError(f"Resuming at step {state.global_step}, but none of {paths} exists: resume from "
                                    "a checkpoint written with QuantizationCallback.")
        quantized, _, _ = read_deep_compressed(path)
        check_masks_match({name: q.mask for name, q in quantized.items()}, self._shapes(quantized))
        logger.info("Restored %d quantized weights from %s.", len(quantized), path)
        return {name: q.to(self.params[name].device) for name, q in quantized.items()}


# ----------------------------------------------------------------------------------------------- Huffman coding
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


# ------------------------------------------------------------------------------------------------- file format
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
