"""Every rank must prune alike: after each pruning event, `check_ranks_agree` (whole weights: the same masks on
every rank, under DDP) or `check_thresholds_agree` (sharded weights: the same thresholds) stops training with an
error on every rank instead of letting it train on a divergence. Each costs two small all-reduces."""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch
import torch.distributed as dist

from .collectives import is_distributed, max_and_min


_HASH_MULTIPLIER = 0x9E3779B1  # Knuth's multiplicative hash: 2**32 / golden ratio
_NAMED_IN_ERRORS = 8


def masks_fingerprint(masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """An int64 CPU tensor of shape `(len(masks), 3)`: per mask, the CRC32 of its name, its number of kept entries
    and a checksum of the kept positions (the sum over kept row-major indices `i` of `(i * 0x9E3779B1) mod 2**31`).

    Two sets of masks with equal fingerprints are equal but for a hash collision; computing it holds the kept
    indices of one mask at a time.
    """
    rows = []
    for name, mask in masks.items():
        kept = mask.reshape(-1).nonzero().view(-1)
        checksum = int(((kept * _HASH_MULTIPLIER) & 0x7FFFFFFF).sum())
        rows.append([zlib.crc32(name.encode()), kept.numel(), checksum])
    return torch.tensor(rows, dtype=torch.int64).view(-1, 3)


def check_ranks_agree(masks: Mapping[str, torch.Tensor], step: int, group: dist.ProcessGroup | None = None) -> None:
    """Raises `RuntimeError` on every rank when the ranks of `group` do not hold the same masks; a no-op outside
    multi-process runs. Every rank of `group` must call it at the same point (it runs two small all-reduces).

    Args:
        masks (`dict[str, torch.Tensor]`): this rank's masks, keyed by parameter name.
        step (`int`): the optimizer step of the pruning event, named in the error.
        group (`ProcessGroup`, *optional*): the ranks that must agree (default: all of them).
    """
    if not is_distributed(group):
        return
    most, fewest = max_and_min(torch.tensor([len(masks)]), group)
    if int(most) != int(fewest):
        raise RuntimeError(f"Pruning masks differ across ranks at step {step}: ranks hold between {int(fewest)} and "
                           f"{int(most)} masks. Every rank must build the same model and pruning config.")
    high, low = max_and_min(masks_fingerprint(masks), group)
    differing = [(name, int(low[i, 1]), int(high[i, 1])) for i, name in enumerate(masks)
                 if not torch.equal(high[i], low[i])]
    if differing:
        named = ", ".join(f"{name} (kept {fewest}..{most})" for name, fewest, most in differing[:_NAMED_IN_ERRORS])
        more = f" and {len(differing) - _NAMED_IN_ERRORS} more" if len(differing) > _NAMED_IN_ERRORS else ""
        raise RuntimeError(
            f"Pruning masks differ across ranks at step {step} in {len(differing)} of {len(masks)} tensors: "
            f"{named}{more}. Refusing to train on different masks. Under DDP every rank must hold the same weights: "
            "check that all ranks start from the same checkpoint, that nothing rank-specific changes the weights, "
            "and that the model is not wrapped differently on some ranks."
        )


def check_thresholds_agree(thresholds: Mapping[str, float], step: int, group: dist.ProcessGroup | None = None) -> None:
    """The rank-agreement check of sharded weights, whose masks differ by design: raises `RuntimeError` on every rank
    when the ranks of `group` did not prune with the same thresholds (same keys, same values); a no-op outside
    multi-process runs. Collective: every rank of `group` calls it at the same point."""
    if not is_distributed(group):
        return
    keys = ",".join(sorted(thresholds))
    local = torch.tensor([zlib.crc32(keys.encode()), *(thresholds[k] for k in sorted(thresholds))],
                         dtype=torch.float64)
    sizes_high, sizes_low = max_and_min(torch.tensor([local.numel()]), group)
    if int(sizes_high) == int(sizes_low):
        high, low = max_and_min(local, group)
        if torch.equal(high, low):
            return
    raise RuntimeError(f"Pruning thresholds differ across ranks at step {step} (this rank: {dict(thresholds)}). "
                       "Refusing to train on inconsistent masks: every rank must build the same model, the same "
                       "pruning config and the same sharding.")
