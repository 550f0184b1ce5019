"""Multi-process pruning: every rank must hold the same masks (DDP), and sharded weights rank their rows together.

Under DDP (`torchrun`, `accelerate launch`) every rank holds the full weights, identical after each step, so the
deterministic radix select of `hf_prune.masks` gives identical masks everywhere. `check_ranks_agree` verifies it
after every pruning event with two small all-reduces, so a divergence stops training instead of being silently
trained on.

With sharded weights (FSDP2 `fully_shard`: DTensors placed `Shard(0)` on a 1-D mesh) each rank holds a block of rows
of every weight and the mask of that block only. `ProcessGroupReduce` is the `ShardReduce` of `hf_prune.masks`
that finds the global threshold from the shards with collectives (no rank gathers the model), `gather_mask` builds a
full mask for saving the way transformers gathers a sharded state dict (`DTensor.full_tensor()`), `local_rows`
takes a rank's block of a full mask (so mask files load under any world size), and `check_thresholds_agree` is the
rank-agreement check of sharded runs.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard


_HASH_MULTIPLIER = 0x9E3779B1  # Knuth's multiplicative hash: 2**32 / golden ratio
_NAMED_IN_ERRORS = 8


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """Whether `torch.distributed` is initialised with more than one process (in `group`, default: the world)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """CPU for gloo and MPI, else the current accelerator (NCCL and its kind only reduce device tensors)."""
    backend = dist.get_backend(group)
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    if hasattr(torch, "accelerator"):  # torch >= 2.6
        return torch.device(torch.accelerator.current_accelerator().type, torch.accelerator.current_device_index())
    return torch.device("cuda", torch.cuda.current_device())


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


def _max_and_min(values: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise maximum and minimum of `values` over the ranks of `group`, in one all-reduce."""
    both = torch.cat([values, -values]).to(_collective_device(group))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    high, negated_low = both.cpu().chunk(2)
    return high, -negated_low


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
    most, fewest = _max_and_min(torch.tensor([len(masks)]), group)
    if int(most) != int(fewest):
        raise RuntimeError(f"Pruning masks differ across ranks at step {step}: ranks hold between {int(fewest)} and "
                           f"{int(most)} masks. Every rank must build the same model and pruning config.")
    high, low = _max_and_min(masks_fingerprint(masks), group)
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
    sizes_high, sizes_low = _max_and_min(torch.tensor([local.numel()]), group)
    if int(sizes_high) == int(sizes_low):
        high, low = _max_and_min(local, group)
        if torch.equal(high, low):
            return
    raise RuntimeError(f"Pruning thresholds differ across ranks at step {step} (this rank: {dict(thresholds)}). "
                       "Refusing to train on inconsistent masks: every rank must build the same model, the same "
                       "pruning config and the same sharding.")


def shard_group(params: Mapping[str, torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group over which `params` are row-sharded, or None when none of them is a DTensor.

    Raises:
        ValueError: when only some are DTensors, or a DTensor is not placed `Shard(0)` on a 1-D mesh shared by all
            (FSDP2's default; HSDP and tensor parallelism are not supported), or a weight is a DeepSpeed ZeRO-3
            partition (not supported yet).
    """
    zero3 = [name for name, p in params.items() if hasattr(p, "ds_tensor")]
    if zero3:
        raise ValueError(f"{zero3[0]} and {len(zero3) - 1} more targeted weights are DeepSpeed ZeRO-3 partitions, "
                         "which hf_prune cannot prune yet (their flat partitions are not row blocks); shard with "
                         "FSDP2 (TrainingArguments(fsdp=True, fsdp_config={'fsdp_version': 2})) or use ZeRO-1/2.")
    sharded = {name: p for name, p in params.items() if isinstance(p, DTensor)}
    if not sharded:
        return None
    mesh = next(iter(sharded.values())).device_mesh
    problems = [f"{name} is not a DTensor" for name in params if name not in sharded]
    problems += [f"{name} is placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh"
                 for name, p in sharded.items()
                 if p.device_mesh != mesh or p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),)]
    if problems:
        shown = "; ".join(problems[:_NAMED_IN_ERRORS]) + ("; ..." if len(problems) > _NAMED_IN_ERRORS else "")
        raise ValueError(f"Sharded pruning needs every targeted weight row-sharded (DTensor placed (Shard(dim=0),) on "
                         f"one 1-D device mesh, as FSDP2's fully_shard does): {shown}.")
    return mesh.get_group()


def refuse_sharded(params: Iterable[torch.Tensor], method: str) -> None:
    """Raises `ValueError` when a weight is sharded (FSDP2 DTensor, DeepSpeed ZeRO-3 partition), for a method that
    does not support sharded weights yet."""
    if any(isinstance(p, DTensor) or hasattr(p, "ds_tensor") for p in params):
        raise ValueError(f"{method} does not support sharded weights (FSDP2 / ZeRO-3) yet; train unsharded (DDP), or "
                         "use MagnitudePruningCallback (criterion 'magnitude' or 'obd'), which supports FSDP2.")


def local_view(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place changes reach the parameter), else `tensor` itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def gather_mask(local: torch.Tensor, like: DTensor) -> torch.Tensor:
    """The full bool mask whose rows `local` holds on this rank, sharded like `like`, on CPU (collective; sent as
    bytes, which every backend can all-gather)."""
    full = DTensor.from_local(local.view(torch.uint8), like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride()).full_tensor()
    return full.cpu().view(torch.bool)


def local_rows(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's block of rows of `full`, sharded like `like` (`torch.chunk` along dim 0, as `Shard(0)` does)."""
    mesh = like.device_mesh
    chunks = full.chunk(mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    return chunks[rank] if rank < len(chunks) else full[:0]


class ProcessGroupReduce:
    """The `hf_prune.masks.ShardReduce` of a `torch.distributed` process group: rank `r` of `group` holds the `r`-th
    block of rows of every scored tensor (`torch.chunk(weight, world_size)[r]`, FSDP2's `Shard(0)` local tensor).

    ```python
    from hf_prune.distributed import ProcessGroupReduce
    from hf_prune.masks import update_masks_

    # on every rank, with this rank's row blocks of the weights and masks
    update_masks_(local_weights, local_masks, classes, MagnitudeCriterion(), 0.5, "class-blind", ProcessGroupReduce())
    ```

    Args:
        group (`ProcessGroup`, *optional*): the ranks sharing the weights (default: all of them).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.device = _collective_device(group)

    def sum(self, counts: torch.Tensor) -> torch.Tensor:
        total = counts.to(self.device, copy=True)
        dist.all_reduce(total, group=self.group)
        return total.to(counts.device)

    def sum_and_preceding(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = counts.to(self.device)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(gathered, local, group=self.group)
        stacked = torch.stack(gathered).to(counts.device)
        return stacked.sum(0), stacked[:dist.get_rank(self.group)].sum(0)
