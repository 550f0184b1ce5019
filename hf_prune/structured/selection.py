"""From a criterion and a target sparsity to structured masks: whole neurons and heads pruned, lowest score first.

A group's score sums its entries' scores over every member weight (`Criterion.group_norm`: the L2 norm for
`"magnitude"`, the summed saliency for `"obd"` and `"wanda"`). Each structure kind is ranked on its own, so that
neurons and heads each reach the target: under `class-uniform` every unit (every layer's feed-forward or attention
block) loses `round(sparsity · num_groups)` groups, so all layers keep the same width (the count is exact to half a
group per block: `uniform_sparsity` says what a sparsity reaches); under `class-blind` the groups of all units of a
kind are ranked together, the count is exact to one group over the model, and layers end up with different
widths. Ties are broken in model order, then group order; groups pruned before stay pruned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..criteria import Criterion
from .units import HEADS, Member, Unit


#: The schemes structured masks support (`class-distribution` normalises per-entry scores, not groups).
STRUCTURED_SCHEMES = ("class-blind", "class-uniform")


def group_view(tensor: torch.Tensor, member: Member, num_groups: int) -> torch.Tensor:
    """The entries of `tensor` (a member's weight, mask or scores) as `(num_groups, entries per group)`; a copy
    when the groups do not run along dimension 0."""
    part = tensor.narrow(member.dim, member.offset, num_groups * member.width)
    return part.movedim(member.dim, 0).reshape(num_groups, -1)


def group_scores(unit: Unit, weights: Mapping[str, torch.Tensor], criterion: Criterion) -> torch.Tensor:
    """The float64 score of each group of `unit`: its entries' scores summed, or for `group_norm=2` their L2 norm
    (the square root of the sum of their squares)."""
    total = torch.zeros(unit.num_groups, dtype=torch.float64)
    for member in unit.members:
        scores = group_view(criterion.score(member.name, weights[member.name]), member, unit.num_groups).double()
        total += (scores.square() if criterion.group_norm == 2 else scores).sum(1).cpu()
    return total.sqrt() if criterion.group_norm == 2 else total


def pruned_groups(unit: Unit, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Bool `(num_groups,)`: the groups whose entries the masks already prune entirely."""
    first = unit.members[0]
    return ~group_view(masks[first.name], first, unit.num_groups).any(1).cpu()


def group_size(unit: Unit, weights: Mapping[str, torch.Tensor]) -> int:
    """Weight entries in one group of `unit` (biases not counted)."""
    return sum(group_view(weights[m.name], m, unit.num_groups).shape[1] for m in unit.members)


def check_groups_left(units: Sequence[Unit], weights: Mapping[str, torch.Tensor], sparsity: float, scheme: str,
                      field: str) -> None:
    """Raises `ValueError` (naming `field`, which holds `sparsity`) when `update_group_masks_` at `sparsity` would
    prune every group of a structure kind: of every unit under `class-uniform`, of the whole model under
    `class-blind` (where the weights left would be under half a group). A model without any of them (a
    feed-forward block of width 0, attention without heads) is no model its config can describe."""
    for kind in dict.fromkeys(unit.kind for unit in units):
        members = [unit for unit in units if unit.kind == kind]
        what = "(key/value) heads" if kind == HEADS else "neurons"
        instead = ("prune the feed-forward neurons only (structure='neurons')" if kind == HEADS else
                   "remove whole blocks with drop_layers")
        if scheme == "class-uniform":
            for unit in members:
                n = unit.num_groups
                if sparsity * n > n - 1 + 1e-9:  # (the rounding would take them all from (n - 0.5) / n)
                    raise ValueError(f"`{field}` {sparsity} with scheme='class-uniform' leaves less than one of the "
                                     f"{n} {what} of every block, such as {unit.prefix.rstrip('.')}. Accepted: at "
                                     f"most {n - 1}/{n} ({(n - 1) / n:.4g}) for this model, or {instead}.")
            continue
        sizes = [group_size(unit, weights) for unit in members]
        total = float(sum(size * unit.num_groups for size, unit in zip(sizes, members)))
        if total - sparsity * total < max(sizes) / 2:
            raise ValueError(f"`{field}` {sparsity} with scheme={scheme!r} prunes all {what} of the model (what it "
                             f"keeps is less than half of one): nothing of them would be left. Accepted: at most "
                             f"{1 - max(sizes) / (2 * total):.4g} for this model, or {instead}.")


def uniform_count(unit: Unit, sparsity: float) -> int:
    """The groups of `unit` that `class-uniform` prunes at `sparsity`."""
    return round(sparsity * unit.num_groups)


def uniform_sparsity(units: Sequence[Unit], weights: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, float]:
    """Per structure kind, the fraction of its weights that `class-uniform` prunes at `sparsity` (whole groups per
    unit: 0 at 0.25 with 2 heads a block)."""
    reached: dict[str, float] = {}
    for kind in dict.fromkeys(unit.kind for unit in units):
        members = [unit for unit in units if unit.kind == kind]
        sizes = [group_size(unit, weights) for unit in members]
        reached[kind] = (sum(size * uniform_count(unit, sparsity) for size, unit in zip(sizes, members))
                         / sum(size * unit.num_groups for size, unit in zip(sizes, members)))
    return reached


def prune_groups_(unit: Unit, masks: Mapping[str, torch.Tensor], groups: torch.Tensor) -> None:
    """Sets the entries of `groups` (indices) of every member of `unit` to False in `masks`, in place."""
    for member in unit.members:
        mask = masks[member.name]
        for group in groups.tolist():
            mask.narrow(member.dim, member.offset + group * member.width, member.width).fill_(False)


def _lowest(scores: torch.Tensor, already: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` lowest `scores`, groups in `already` first; ties by index (a stable sort)."""
    ranked = torch.where(already, torch.tensor(float("-inf"), dtype=scores.dtype), scores)
    return torch.sort(ranked, stable=True).indices[:count]


def update_group_masks_(units: Sequence[Unit], weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                        criterion: Criterion, sparsity: float, scheme: str) -> dict[str, float]:
    """Prunes whole groups of `units` in `masks` (in place) to `sparsity` of each structure kind's weights; returns
    the highest score of the groups this call pruned, per kind (`"threshold/neurons"`, `"threshold/heads"`), for
    the logs (no entry for a kind that lost no new group)."""
    if scheme not in STRUCTURED_SCHEMES:
        raise ValueError(f"`scheme` must be one of {STRUCTURED_SCHEMES} with a `structure`; got {scheme!r}.")
    thresholds: dict[str, float] = {}
    for kind in dict.fromkeys(unit.kind for unit in units):
        members = [unit for unit in units if unit.kind == kind]
        scores = [group_scores(unit, weights, criterion) for unit in members]
        already = [pruned_groups(unit, masks) for unit in members]
        if scheme == "class-uniform":
            chosen = [_lowest(s, a, max(uniform_count(unit, sparsity), int(a.sum())))
                      for unit, s, a in zip(members, scores, already)]
        else:
            chosen = _blind(members, scores, already, [group_size(u, weights) for u in members], sparsity)
        for unit, groups in zip(members, chosen):
            prune_groups_(unit, masks, groups)
        pruned = [s[g][~a[g]] for s, a, g in zip(scores, already, chosen)]
        pruned = [p for p in pruned if len(p)]
        if pruned:
            thresholds[f"threshold/{kind}"] = float(torch.cat(pruned).max())
    return thresholds


def _blind(units: Sequence[Unit], scores: Sequence[torch.Tensor], already: Sequence[torch.Tensor],
           sizes: Sequence[int], sparsity: float) -> list[torch.Tensor]:
    """Class-blind: all groups of `units` ranked together; the pruned prefix is the one whose weight count is
    closest to `sparsity` of the total (never fewer groups than are pruned already)."""
    owner = torch.cat([torch.full((u.num_groups,), i) for i, u in enumerate(units)])
    index = torch.cat([torch.arange(u.num_groups) for u in units])
    size = torch.cat([torch.full((u.num_groups,), s, dtype=torch.float64) for u, s in zip(units, sizes)])
    order = _lowest(torch.cat(list(scores)), torch.cat(list(already)), len(owner))
    cumulative = torch.cumsum(size[order], 0)
    target = sparsity * float(size.sum())
    count = int(torch.argmin((torch.cat([torch.zeros(1, dtype=torch.float64), cumulative]) - target).abs()))
    count = max(count, int(torch.cat(list(already)).sum()))
    picked = order[:count]
    return [index[picked[owner[picked] == i]] for i in range(len(units))]
