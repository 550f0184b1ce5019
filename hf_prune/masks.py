"""From scores and a target sparsity to boolean masks (True = kept), under See et al.'s three schemes.

Global thresholds are found by a two-pass radix select over the float32 bit patterns of the scores, one tensor
at a time: no concatenation of all weights, no sort, no `torch.quantile` (capped at 2**24 elements). The extra
memory is a few temporaries of the largest single weight, whatever the model size. Ties at the threshold are
broken in a fixed order (targets in model order, then row-major index), so the number of pruned weights equals
`round(sparsity * n)` exactly and the same inputs always give the same masks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import torch

from .criteria import Criterion


ScoreFn = Callable[[], torch.Tensor]

_HIGH_BINS = 1 << 15  # non-negative float32 bit patterns are < 2**31: 15 high bits after the shift by 16
_LOW_BINS = 1 << 16


def _keys(score: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like the non-negative float32 `score` (modified in place; -0.0 maps to +0.0)."""
    if score.dtype != torch.float32:
        raise TypeError(f"scores must be float32, got {score.dtype}")
    return score.contiguous().view(torch.int32).clamp_(min=0)


def _kth_key(scores: Sequence[ScoreFn], masks: Sequence[torch.Tensor], k: int) -> tuple[int, int]:
    """Key of the k-th smallest kept score (1-based) and how many entries equal to it are among the k."""
    high = torch.zeros(_HIGH_BINS, dtype=torch.int64)
    for score, mask in zip(scores, masks):
        high += torch.bincount(_keys(score())[mask] >> 16, minlength=_HIGH_BINS)
    cumulative = high.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, k))
    below = int(cumulative[bucket - 1]) if bucket else 0

    low = torch.zeros(_LOW_BINS, dtype=torch.int64)
    for score, mask in zip(scores, masks):
        kept = _keys(score())[mask]
        low += torch.bincount(kept[(kept >> 16) == bucket] & 0xFFFF, minlength=_LOW_BINS)
    cumulative = low.cumsum(0)
    offset = int(torch.searchsorted(cumulative, k - below))
    below += int(cumulative[offset - 1]) if offset else 0
    return (bucket << 16) | offset, k - below


def prune_lowest_(scores: Sequence[ScoreFn], masks: Sequence[torch.Tensor], num_pruned: int) -> float | None:
    """Updates `masks` in place so exactly `num_pruned` of their entries, together, are False.

    Entries already False stay False; among the kept ones the lowest scores are pruned. Each `scores[i]()`
    returns a fresh non-negative float32 tensor shaped like `masks[i]` (it is called up to three times, so
    nothing of the size of all scores together is ever held). Returns the score threshold, or None when no
    new weight had to be pruned.
    """
    already = sum(mask.numel() - int(mask.sum()) for mask in masks)
    k = num_pruned - already
    if k <= 0:
        return None
    if k >= sum(mask.numel() for mask in masks) - already:
        for mask in masks:
            mask.zero_()
        return None
    threshold, ties = _kth_key(scores, masks, k)
    for score, mask in zip(scores, masks):
        keys = _keys(score())
        mask.logical_and_(keys >= threshold)
        if ties:
            tied = ((keys == threshold) & mask).view(-1).nonzero().view(-1)[:ties]
            mask.view(-1)[tied] = False
            ties -= tied.numel()
    return torch.tensor([threshold], dtype=torch.int32).view(torch.float32).item()


def _kept_std(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> float:
    count, total, squares = 0, 0.0, 0.0
    for weight, mask in zip(weights, masks):
        kept = weight.detach()[mask].double()
        count += kept.numel()
        total += float(kept.sum())
        squares += float(kept.square().sum())
    if count < 2:
        return 1.0
    variance = (squares - total * total / count) / (count - 1)
    return max(variance, 0.0) ** 0.5 or 1.0


def update_masks_(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    classes: Mapping[str, str],
    criterion: Criterion,
    sparsity: float,
    scheme: str,
) -> dict[str, float]:
    """Prunes `masks` in place to `sparsity` under a See et al. 2016 scheme; returns the thresholds used.

    - `class-blind`: one ranking of all weights; `round(sparsity * n)` pruned overall.
    - `class-uniform`: `round(sparsity * n_c)` pruned in each class `c`.
    - `class-distribution`: scores are divided by `σ_c`, the std of the kept weights of class `c`, and ranked
      together, which prunes `score < λ·σ_c` in every class with the one λ that meets the overall target.
    Masks only ever lose entries: pruned weights stay pruned. Returned keys: `"threshold"` (class-blind),
    `"lambda"` (class-distribution) or `"threshold/<class>"` (class-uniform).
    """
    by_class: dict[str, list[str]] = defaultdict(list)
    for name in masks:
        by_class[classes[name]].append(name)

    def scorer(name: str, divisor: float = 1.0) -> ScoreFn:
        if divisor == 1.0:
            return lambda: criterion.score(name, weights[name])
        return lambda: criterion.score(name, weights[name]).div_(divisor)

    def prune(names: Sequence[str], divisors: Mapping[str, float] | None = None) -> float | None:
        total = sum(masks[n].numel() for n in names)
        fns = [scorer(n, divisors[n] if divisors else 1.0) for n in names]
        return prune_lowest_(fns, [masks[n] for n in names], round(sparsity * total))

    thresholds: dict[str, float | None] = {}
    if scheme == "class-blind":
        thresholds["threshold"] = prune(list(masks))
    elif scheme == "class-uniform":
        for cls, names in by_class.items():
            thresholds[f"threshold/{cls}"] = prune(names)
    elif scheme == "class-distribution":
        sigma = {cls: _kept_std([weights[n] for n in names], [masks[n] for n in names])
                 for cls, names in by_class.items()}
        thresholds["lambda"] = prune(list(masks), {n: sigma[classes[n]] for n in masks})
    else:
        raise ValueError(f"Unknown scheme {scheme!r}.")
    return {key: value for key, value in thresholds.items() if value is not None}
