"""From scores and a target sparsity to boolean masks (True = kept), under See et al.'s three schemes.

Global thresholds are found by a two-pass radix select over the float32 bit patterns of the scores, one tensor
at a time: no concatenation of all weights, no sort, no `torch.quantile` (capped at 2**24 elements). The extra
memory is a few temporaries of the largest single weight, whatever the model size. Ties at the threshold are
broken in a fixed order (targets in model order, then row-major index), so the number of pruned weights equals
`round(sparsity * n)` exactly and the same inputs always give the same masks.

With sharded weights (FSDP2, ZeRO-3) each process scores only its rows and the histograms are summed across
processes (`ShardReduce`): the shard masks together equal the unsharded masks exactly.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import torch

from .criteria import Criterion


#: See et al. 2016's ranking schemes, as `update_masks_` implements them (`PruningConfig.scheme`).
SCHEMES = ("class-blind", "class-uniform", "class-distribution")
#: Scores of a block of rows of one tensor: `score(rows)` is shaped like `tensor[rows]`.
ScoreFn = Callable[[slice], torch.Tensor]

_HIGH_BINS = 1 << 15  # non-negative float32 bit patterns are < 2**31: 15 high bits after the shift by 16
_LOW_BINS = 1 << 16
_BLOCK = 1 << 16  # entries scored at a time (whole rows): every temporary stays below ~1 MiB, whatever the layer


def _row_blocks(mask: torch.Tensor) -> list[slice]:
    """Slices of consecutive rows of about `_BLOCK` entries (at least one row)."""
    rows = max(1, _BLOCK // max(1, mask.numel() // max(1, mask.shape[0])))
    return [slice(start, start + rows) for start in range(0, mask.shape[0], rows)]


class ShardReduce(Protocol):
    """How processes that each hold a shard of every scored tensor combine their counts (sharded weights).

    A shard is a block of consecutive rows (`torch.chunk` along dim 0, like FSDP2's `Shard(0)`) or of consecutive
    entries of the flattened tensor (a 1-D shard, like a ZeRO-3 partition), shards ordered by rank, so the
    unsharded order is: target, then rank, then row-major index inside the shard. Only histograms
    (a few hundred kB) and per-tensor tie counts are exchanged. `hf_prune.distributed.ProcessGroupReduce`
    implements it over a `torch.distributed` process group.
    """

    def sum(self, counts: torch.Tensor) -> torch.Tensor:
        """`counts` summed elementwise over all shards (an `all_reduce`)."""

    def sum_and_preceding(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`counts` summed elementwise over all shards, and over the shards of lower rank only."""


class _Unsharded:
    """Whole tensors: the sums are the counts themselves and no shard precedes this one."""

    def sum(self, counts: torch.Tensor) -> torch.Tensor:
        return counts

    def sum_and_preceding(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return counts, torch.zeros_like(counts)


def _keys(score: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """int32 keys ordered like the non-negative float32 `score` (computed in place: -0.0 maps to +0.0, and
    entries outside `mask` to 0)."""
    if score.dtype != torch.float32:
        raise TypeError(f"scores must be float32, got {score.dtype}")
    keys = score.contiguous().view(torch.int32).clamp_(min=0)
    return keys.mul_(mask.view(torch.uint8)) if mask is not None else keys


def _kth_key(scores: Sequence[ScoreFn], masks: Sequence[torch.Tensor], k: int,
             reduce: ShardReduce) -> tuple[int, int]:
    """Key of the k-th smallest kept score (1-based) and how many entries equal to it are among the k.

    Pruned entries are counted in bin 0 by the histograms and subtracted from it, so no tensor is ever indexed by
    a mask (boolean indexing materialises int64 indices of every kept entry).
    """
    pruned = sum(mask.numel() - int(mask.sum()) for mask in masks)
    high = torch.zeros(_HIGH_BINS, dtype=torch.int64, device=masks[0].device)
    for score, mask in zip(scores, masks):
        for rows in _row_blocks(mask):
            keys = _keys(score(rows), mask[rows]).view(-1)
            high += torch.bincount(keys.bitwise_right_shift_(16), minlength=_HIGH_BINS)
    high[0] -= pruned
    cumulative = reduce.sum(high).cumsum(0)
    bucket = int(torch.searchsorted(cumulative, k))
    below = int(cumulative[bucket - 1]) if bucket else 0

    low = torch.zeros(_LOW_BINS, dtype=torch.int64, device=masks[0].device)
    for score, mask in zip(scores, masks):
        for rows in _row_blocks(mask):
            keys = _keys(score(rows), mask[rows]).view(-1)
            low += torch.bincount(keys[keys.bitwise_right_shift(16) == bucket].bitwise_and_(0xFFFF),
                                  minlength=_LOW_BINS)
    if bucket == 0:
        low[0] -= pruned
    cumulative = reduce.sum(low).cumsum(0)
    offset = int(torch.searchsorted(cumulative, k - below))
    below += int(cumulative[offset - 1]) if offset else 0
    return (bucket << 16) | offset, k - below


def prune_lowest_(scores: Sequence[ScoreFn], masks: Sequence[torch.Tensor], num_pruned: int,
                  reduce: ShardReduce | None = None) -> float | None:
    """Updates `masks` in place so exactly `num_pruned` of their entries, together, are False.

    Entries already False stay False; among the kept ones the lowest scores are pruned. Each `scores[i](rows)`
    returns a fresh non-negative float32 tensor shaped like `masks[i][rows]`; it is called for blocks of rows,
    three times over (nothing of the size of a whole layer, let alone of all scores together, is ever held). Returns the score threshold, or None when no
    new weight had to be pruned.

    With `reduce` (see `ShardReduce`), `scores` and `masks` are this process's shards, `num_pruned` counts entries
    of the whole tensors, every process of the group calls this together, and the union of the shard masks is
    exactly what one process holding the whole tensors would get.
    """
    reduce = reduce or _Unsharded()
    local = [sum(mask.numel() - int(mask.sum()) for mask in masks), sum(mask.numel() for mask in masks)]
    already, total = reduce.sum(torch.tensor(local)).tolist()
    k = num_pruned - already
    if k <= 0:
        return None
    if k >= total - already:
        for mask in masks:
            mask.zero_()
        return None
    threshold, ties = _kth_key(scores, masks, k, reduce)
    for score, mask in zip(scores, masks):
        tied = []
        for rows in _row_blocks(mask):
            keys, block = _keys(score(rows)), mask[rows]
            block.logical_and_(keys >= threshold)
            if ties:
                tied.append(((keys == threshold) & block).view(-1).nonzero().view(-1) + rows.start * block[0].numel())
        if ties:  # every process gets here together (ties is global); a shard may be empty
            tied = torch.cat(tied) if tied else torch.zeros(0, dtype=torch.int64, device=mask.device)
            everywhere, preceding = (int(n) for n in reduce.sum_and_preceding(torch.tensor([tied.numel()])))
            mask.view(-1)[tied[:max(ties - preceding, 0)]] = False
            ties = max(ties - everywhere, 0)
    return torch.tensor([threshold], dtype=torch.int32).view(torch.float32).item()


def _kept_std(values: Iterable[torch.Tensor], masks: Sequence[torch.Tensor], reduce: ShardReduce) -> float:
    count, total, squares = 0, 0.0, 0.0
    for value, mask in zip(values, masks):  # one tensor of `values` at a time (scores are computed on demand)
        kept = value.detach()[mask].double()
        kept = kept[kept.isfinite()]  # one inf would make sigma NaN, and the whole class rank first
        count += kept.numel()
        total += float(kept.sum())
        squares += float(kept.square().sum())
    count, total, squares = reduce.sum(torch.tensor([count, total, squares], dtype=torch.float64)).tolist()
    if count < 2:
        return 1.0
    sigma = max((squares - total * total / count) / (count - 1), 0.0) ** 0.5
    return sigma if 0.0 < sigma < math.inf else 1.0


def update_masks_(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    classes: Mapping[str, str],
    criterion: Criterion,
    sparsity: float,
    scheme: str,
    reduce: ShardReduce | None = None,
) -> dict[str, float]:
    """Prunes `masks` in place to `sparsity` under a See et al. 2016 scheme; returns the thresholds used.

    - `class-blind`: one ranking of all weights; `round(sparsity * n)` pruned overall.
    - `class-uniform`: `round(sparsity * n_c)` pruned in each class `c`.
    - `class-distribution`: scores are divided by `σ_c`, the std of the kept weights of class `c` (of its kept
      scores, for a criterion other than magnitude: `Criterion.spread_values`), and ranked together, which
      prunes `score < λ·σ_c` in every class with the one λ that meets the overall target.
    Masks only ever lose entries: pruned weights stay pruned. Returned keys: `"threshold"` (class-blind),
    `"lambda"` (class-distribution) or `"threshold/<class>"` (class-uniform). With `reduce`, `weights` and
    `masks` are this process's shards (see `prune_lowest_`).
    """
    reduce = reduce or _Unsharded()
    by_class: dict[str, list[str]] = defaultdict(list)
    for name in masks:
        by_class[classes[name]].append(name)

    def scorer(name: str, divisor: float = 1.0) -> ScoreFn:
        if divisor == 1.0:
            return lambda rows: criterion.score(name, weights[name], rows)
        return lambda rows: criterion.score(name, weights[name], rows).div_(divisor)

    def prune(names: Sequence[str], divisors: Mapping[str, float] | None = None) -> float | None:
        total = int(reduce.sum(torch.tensor(sum(masks[n].numel() for n in names))))
        fns = [scorer(n, divisors[n] if divisors else 1.0) for n in names]
        return prune_lowest_(fns, [masks[n] for n in names], round(sparsity * total), reduce)

    thresholds: dict[str, float | None] = {}
    if scheme == "class-blind":
        thresholds["threshold"] = prune(list(masks))
    elif scheme == "class-uniform":
        for cls, names in by_class.items():
            thresholds[f"threshold/{cls}"] = prune(names)
    elif scheme == "class-distribution":
        sigma = {cls: _kept_std((criterion.spread_values(n, weights[n]) for n in names), [masks[n] for n in names],
                                reduce)
                 for cls, names in by_class.items()}
        thresholds["lambda"] = prune(list(masks), {n: sigma[classes[n]] for n in masks})
    else:
        raise ValueError(f"Unknown scheme {scheme!r}.")
    return {key: value for key, value in thresholds.items() if value is not None}


def zero_pruned_(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`tensor *= mask` in place. Multiplying by the mask's bytes (`uint8` view of the bool) is the same product and
    runs ~2x faster on CPU than by the bool itself; this is the per-step hot path."""
    return tensor.mul_(mask.view(torch.uint8))


def kept_along(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Which indices along `dim` of `mask` (a weight's rows for `dim=0`) keep any entry: a 1-D `torch.bool`."""
    return mask.movedim(dim, 0).reshape(mask.shape[dim], -1).any(1)


def check_masks_match(masks: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
                      require_all: bool = True) -> None:
    """The one check of masks against the weights they belong to (`shapes`: weight name -> shape).

    Raises `ValueError` naming every mask that is unexpected (no such weight) or of the wrong shape and, with
    `require_all`, every weight that has no mask.
    """
    problems = [f"missing mask for {n}" for n in shapes if n not in masks] if require_all else []
    problems += [f"unexpected mask {n} (not a targeted weight)" for n in masks if n not in shapes]
    problems += [f"mask {n} is a {type(m).__name__}, not a torch.Tensor" for n, m in masks.items()
                 if n in shapes and not isinstance(m, torch.Tensor)]
    problems += [f"mask {n} has shape {tuple(m.shape)}, weight has {tuple(shapes[n])}"
                 for n, m in masks.items() if n in shapes and isinstance(m, torch.Tensor)
                 and tuple(m.shape) != tuple(shapes[n])]
    if problems:
        raise ValueError("Masks do not match the model: " + "; ".join(problems) + ".")
