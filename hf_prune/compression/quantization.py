"""Trained quantization (Han, Mao & Dally 2016, §3): the kept entries of each pruned weight share `2**bits`
values, found by k-means with linear initialisation (`quantize_weights`) and fine-tuned by their centroids'
gradients during training (`TrainedQuantizer`, driven by `QuantizationCallback` under a Trainer)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from ..distributed import refuse_sharded
from ..masks import check_masks_match
from ..validation import check_int, check_number


logger = logging.getLogger(__name__)

MIN_BITS, MAX_BITS = 1, 8


def check_bits(bits: Any) -> None:
    """Raises `ValueError` unless `bits` is an integer in 1..8 (the paper uses 2..8)."""
    check_int("bits", bits, MIN_BITS, MAX_BITS)


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
    """Index of the nearest of the sorted `centroids` for each value: a binary search among the midpoints, in
    float64, where the midpoint of two float32 values is exact (in float32 it can round onto the upper one, or
    overflow)."""
    wide = centroids.double()
    return torch.bucketize(values.double(), (wide[:-1] + wide[1:]) / 2)


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


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one host synchronisation."""
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def centroid_gradients(quantized: QuantizedWeight, weight_grad: torch.Tensor) -> torch.Tensor:
    """dL/dc_k = sum of dL/dw over the kept entries assigned to centroid k (Han et al. 2016, eq. 3)."""
    kept = weight_grad.detach()[quantized.mask].float()
    return torch.bincount(quantized.indices, weights=kept, minlength=quantized.centroids.numel()).float()


class TrainedQuantizer:
    """The kept weights of a pruned model shared among `2**bits` values per layer and trained through those values
    (Han et al. 2016, §3.2); usable from a custom training loop.

    `quantize_(masks)` clusters each masked weight (`quantize_weights`) and overwrites it with its centroid values
    (0 at the pruned positions). At each optimizer step, `step_(optimizer)` (after `backward()` and any gradient
    clipping, before `optimizer.step()`) moves each centroid by one plain SGD step on the summed gradients of the
    weights assigned to it, `c_k <- c_k - lr * sum_{w in cluster k} dL/dw`, and drops those weights' gradients so
    the optimizer leaves them alone; `write_weights_()` (after `optimizer.step()`) rewrites the weights from their
    centroids. Masks and cluster assignments never change.

    ```python
    quantizer = TrainedQuantizer(model, bits=4)
    quantizer.quantize_(pruned.masks)
    for batch in loader:
        model(**batch).loss.backward()
        quantizer.step_(optimizer)
        optimizer.step()
        quantizer.write_weights_()
        optimizer.zero_grad()
    save_deep_compressed("model.safetensors", quantizer.quantized, {})
    ```

    Args:
        model (`nn.Module`): the pruned model (or its DDP wrapper; sharded weights are not supported).
        bits (`int`, *optional*, defaults to 4): 1..8, for `2**bits` shared values per weight.
        learning_rate (`float`, *optional*): the centroids' SGD learning rate (finite, > 0); defaults to the
            current learning rate of the optimizer group holding each weight.
        max_iter (`int`, *optional*, defaults to 100): most k-means iterations per weight (>= 1).
    """

    def __init__(self, model: nn.Module, bits: int = 4, learning_rate: float | None = None,
                 max_iter: int = 100) -> None:
        check_quantizer_arguments(bits, learning_rate, max_iter)
        self.params: dict[str, nn.Parameter] = dict(extract_model_from_parallel(model).named_parameters())
        refuse_sharded(self.params.values(), "Trained quantization")
        self.bits = bits
        self.learning_rate = learning_rate
        self.max_iter = max_iter
        self.quantized: dict[str, QuantizedWeight] = {}

    def quantize_(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Clusters the kept entries of every masked weight and writes the shared values into the model."""
        self._check(masks)
        self.quantized = quantize_weights({name: self.params[name] for name in masks}, masks, self.bits,
                                          self.max_iter)
        self.write_weights_()

    def load_quantized_(self, quantized: Mapping[str, QuantizedWeight]) -> None:
        """Takes over saved quantized weights (a checkpoint's) and writes them into the model."""
        self._check({name: q.mask for name, q in quantized.items()})
        self.quantized = {name: q.to(self.params[name].device) for name, q in quantized.items()}
        self.write_weights_()

    @torch.no_grad()
    def differing_weights(self, quantized: Mapping[str, QuantizedWeight]) -> list[str]:
        """The names of the model's weights that are not exactly the values `quantized` holds for them (checked
        before `load_quantized_` takes over a checkpoint's file, once the Trainer has loaded its weights)."""
        self._check({name: q.mask for name, q in quantized.items()})
        differing = []
        for name, q in quantized.items():
            param = self.params[name]
            mask = q.mask.to(param.device)
            values = q.kept_values().to(device=param.device, dtype=param.dtype)
            if bool(param[~mask].any()) or not torch.equal(param[mask], values):
                differing.append(name)
        return differing

    @torch.no_grad()
    def step_(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """One SGD step of every centroid on its weights' gradients, which are then dropped.

        A step where any parameter of the model has a gradient that is not finite (an fp16 overflow, which the
        gradient scaler answers by skipping the optimizer step) moves no centroid: the quantized weights'
        gradients are dropped, the shared values stay as they were.

        Raises:
            ValueError: when a quantized weight has a gradient but no learning rate (neither `learning_rate` nor
                an optimizer group holding it).
        """
        lrs = {} if self.learning_rate is not None or optimizer is None else {
            id(param): group["lr"] for group in optimizer.param_groups for param in group["params"]}
        finite = _all_finite([param.grad for param in self.params.values() if param.grad is not None])
        updates = {}
        for name, quantized in self.quantized.items():
            param = self.params[name]
            if param.grad is None:
                continue
            lr = lrs.get(id(param), self.learning_rate)
            if lr is None:
                raise ValueError(f"{name} is not in the optimizer, so it has no learning rate; pass `learning_rate`.")
            updates[name] = (lr, centroid_gradients(quantized, param.grad))
            param.grad = None
        if not finite:
            logger.warning("Non-finite gradients at this step: no centroid moved (as an fp16 scaler skips the step).")
            return
        for name, (lr, gradient) in updates.items():
            self.quantized[name].centroids.sub_(gradient, alpha=lr)

    @torch.no_grad()
    def write_weights_(self) -> None:
        """Every quantized weight set to its centroid values at the kept positions, exactly 0 elsewhere."""
        for name, quantized in self.quantized.items():
            param = self.params[name]
            param.zero_().masked_scatter_(quantized.mask, quantized.kept_values().to(param.dtype))

    def _check(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Masks named as the model's parameters, shaped like them (others are reported as unexpected)."""
        shapes = {name: tuple(self.params[name].shape) for name in masks if name in self.params}
        check_masks_match(masks, shapes)


def check_quantizer_arguments(bits: Any, learning_rate: Any, max_iter: Any) -> None:
    """The checks of `TrainedQuantizer`'s arguments, also run by `QuantizationCallback` before training."""
    check_bits(bits)
    check_number("learning_rate", learning_rate, 0.0, strict_minimum=True, optional=True)
    check_int("max_iter", max_iter, 1)
