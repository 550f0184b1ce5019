"""Multi-process pruning: every rank must hold the same masks (DDP), and sharded weights rank their entries together.

Under DDP (`torchrun`, `accelerate launch`) every rank holds the full weights, identical after each step, so the
deterministic radix select of `hf_prune.masks` gives identical masks everywhere. `check_ranks_agree` verifies it
after every pruning event with two small all-reduces, so a divergence stops training instead of being silently
trained on.

Sharded weights are pruned where they live, each rank holding the masks of its own entries only. `layout_of` tells
the layouts apart: `RowShards` (FSDP2 `fully_shard`, DTensors placed `Shard(0)` on a 1-D mesh: a block of rows per
rank), `FlatShards` (FSDP1: a run of the flattened weight per rank) and `ZeroPartitions` (DeepSpeed ZeRO-3: likewise),
next to `Replicated` (whole tensors). Each says which entries a rank holds (`local`), gathers a full-size mask for saving the way transformers
gathers a sharded state dict (`gather`), takes a rank's part of a full mask so mask files load under any world size
(`scatter`), and zeroes every copy of the pruned weights (`zero_pruned_`). `ProcessGroupReduce` is the
`ShardReduce` of `hf_prune.masks` that finds the global threshold from the shards with collectives (no rank gathers
the model), and `check_thresholds_agree` is the rank-agreement check of sharded runs.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from .masks import zero_pruned_


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


def layout_of(params: Mapping[str, torch.Tensor], model: nn.Module) -> Replicated:
    """How `params` (weights of `model`, or of the module an FSDP1 `model` wraps) are laid out across processes:
    `ZeroPartitions` for DeepSpeed ZeRO-3, `RowShards` for FSDP2 DTensors, `FlatShards` for FSDP1 with
    `use_orig_params=True`, `Replicated` for whole tensors (one process, DDP, FSDP1's `NO_SHARD`).

    Raises:
        ValueError: when the weights mix layouts, a DTensor is not placed `Shard(0)` on a 1-D mesh shared by all
            (FSDP2's default; HSDP and tensor parallelism are not supported), or FSDP1 shards them in a hybrid way.
    """
    fsdp1 = _fsdp1_runs(model)
    kinds = {"ZeRO-3": [n for n, p in params.items() if hasattr(p, "ds_tensor")],
             "DTensor": [n for n, p in params.items() if isinstance(p, DTensor)],
             "FSDP1": [n for n, p in params.items() if id(p) in fsdp1.runs]}
    for kind, names in kinds.items():
        if names and len(names) < len(params):
            other = next(n for n in params if n not in set(names))
            raise ValueError(f"Sharded pruning needs every targeted weight laid out alike: {names[0]} is a {kind} "
                             f"shard but {other} is not.")
    if kinds["ZeRO-3"]:
        return ZeroPartitions(next(iter(params.values())).ds_process_group)
    if kinds["FSDP1"]:
        return fsdp1
    if not kinds["DTensor"]:
        return Replicated()
    mesh = next(iter(params.values())).device_mesh
    problems = [f"{name} is placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh"
                for name, p in params.items()
                if p.device_mesh != mesh or p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),)]
    if problems:
        shown = "; ".join(problems[:_NAMED_IN_ERRORS]) + ("; ..." if len(problems) > _NAMED_IN_ERRORS else "")
        raise ValueError(f"Sharded pruning needs every targeted weight row-sharded (DTensor placed (Shard(dim=0),) on "
                         f"one 1-D device mesh, as FSDP2's fully_shard does): {shown}.")
    return RowShards(mesh.get_group())


def _fsdp1_runs(model: nn.Module) -> FlatShards:
    """The `FlatShards` of the parameters that FSDP1 units of `model` shard (none when there are none)."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    runs: dict[int, tuple[tuple[int, ...], int, int]] = {}
    group = None
    for unit in FullyShardedDataParallel.fsdp_modules(model):
        handle = unit._handle
        if handle is None or unit.sharding_strategy == ShardingStrategy.NO_SHARD:
            continue  # no parameters, or every rank holds them whole
        if unit.sharding_strategy not in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP):
            raise ValueError(f"FSDP1 sharding strategy {unit.sharding_strategy.name} is not supported by hf_prune; "
                             "use FULL_SHARD or SHARD_GRAD_OP, or FSDP2.")
        flat = handle.flat_param
        group = unit.process_group
        for param, shape, info in zip(flat._params, flat._shapes, flat._shard_param_infos, strict=True):
            start, length = (info.intra_param_start_idx, info.numel_in_shard) if info.in_shard else (0, 0)
            runs[id(param)] = (tuple(shape), start, length)
    return FlatShards(group, runs)


def refuse_sharded(params: Iterable[torch.Tensor], method: str) -> None:
    """Raises `ValueError` when a weight is sharded (FSDP1 or FSDP2, DeepSpeed ZeRO-3), for a method that does not
    support sharded weights yet."""
    if any(isinstance(p, DTensor) or hasattr(p, "ds_tensor") or getattr(p, "_fsdp_flattened", False)
           for p in params):
        raise ValueError(f"{method} does not support sharded weights (FSDP / ZeRO-3) yet; train unsharded (DDP), or "
                         "use MagnitudePruningCallback, which supports FSDP1, FSDP2 (criterion 'magnitude' or 'obd') "
                         "and ZeRO-3 ('magnitude').")


class Replicated:
    """Every process holds whole tensors (one process, or DDP): a weight's local entries are the weight itself."""

    group: dist.ProcessGroup | None = None
    reduce: ProcessGroupReduce | None = None

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's entries of a weight, of its gradient or of a same-shaped optimizer state (a view)."""
        return tensor

    def full_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        """The unsharded shape of `param`."""
        return tuple(param.shape)

    def gather(self, mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """The full-size mask of `param` from this process's part `mask` (collective when sharded)."""
        return mask

    def scatter(self, full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """This process's part of the full-size mask `full` of `param`."""
        return full

    def zero_pruned_(self, params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
        """Sets the pruned entries of every copy of the weights this process holds to exactly zero."""
        for name, param in params.items():
            zero_pruned_(self.local(param), masks[name])


class RowShards(Replicated):
    """FSDP2 `fully_shard`: each weight is a DTensor placed `Shard(0)` on a 1-D mesh, so rank `r` holds the `r`-th
    block of rows (`torch.chunk` along dim 0), and so do its gradient and optimizer states. Masks are those
    blocks; they are gathered to full size the way transformers gathers a sharded state dict
    (`DTensor.full_tensor()`)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.reduce = ProcessGroupReduce(group)

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    def gather(self, mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        # sent as bytes, which every backend can all-gather
        full = DTensor.from_local(mask.view(torch.uint8), param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride()).full_tensor()
        return full.cpu().view(torch.bool)

    def scatter(self, full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        mesh = param.device_mesh
        chunks = full.chunk(mesh.size(), dim=0)
        rank = mesh.get_local_rank()
        return chunks[rank] if rank < len(chunks) else full[:0]


class FlatShards(Replicated):
    """Each weight is flattened (row-major) and rank `r` holds one run of consecutive entries of it, the runs in
    rank order; masks are 1-D, over those entries. FSDP1 with `use_orig_params=True` lays its weights out this way
    (each parameter is a 1-D view of the rank's part of a `FlatParameter`, possibly empty), and so do their
    gradients and optimizer states.

    Args:
        group (`ProcessGroup`): the ranks sharing the weights.
        runs (`dict[int, tuple]`): `id(param)` -> `(full shape, start, length)` of this rank's run.
    """

    def __init__(self, group: dist.ProcessGroup | None,
                 runs: Mapping[int, tuple[tuple[int, ...], int, int]] | None = None) -> None:
        self.group = group
        self.reduce = ProcessGroupReduce(group) if group is not None else None
        self.runs = dict(runs or {})

    def _run(self, param: torch.Tensor) -> tuple[tuple[int, ...], int, int]:
        """`(full shape, start, length)`: where this rank's entries sit in the flattened weight."""
        return self.runs[id(param)]

    def full_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        return self._run(param)[0]

    def gather(self, mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        shape, start, length = self._run(param)
        device = _collective_device(self.group)
        world_size = dist.get_world_size(self.group)
        places = [torch.empty(2, dtype=torch.int64, device=device) for _ in range(world_size)]
        dist.all_gather(places, torch.tensor([start, length], device=device), group=self.group)
        longest = max(int(place[1]) for place in places)
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[:length] = mask.view(torch.uint8)
        parts = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(parts, padded, group=self.group)
        full = torch.zeros(math.prod(shape), dtype=torch.uint8)
        for (start, length), part in zip((place.tolist() for place in places), parts):
            full[start:start + length] = part[:length].cpu()
        return full.view(torch.bool).view(shape)

    def scatter(self, full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        _, start, length = self._run(param)
        return full.reshape(-1).narrow(0, start, length)


class ZeroPartitions(FlatShards):
    """DeepSpeed ZeRO-3: each weight is flattened and cut into equal partitions, the last one padded; rank `r` holds
    entries `r·P ... r·P + P - 1` in `param.ds_tensor` (`P = param.partition_numel()`) and the optimizer an fp32
    master copy of the same entries.

    Pruning zeroes the partition, the fp32 master copy (else the next step would restore the weights) and, for the
    weights gathered at that moment (the small ones ZeRO-3 keeps gathered between steps, `ds_persist`), re-gathers
    the full tensor from the zeroed partitions. The gradients and optimizer moments live in the optimizer's flat
    buffers, not in `param.grad` or `optimizer.state[param]`, so they are not masked: a pruned weight gets an update
    and is set back to zero right after the step, before any forward sees it.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__(group)
        self.rank = dist.get_rank(group)

    def _run(self, param: torch.Tensor) -> tuple[tuple[int, ...], int, int]:
        size = param.partition_numel()
        start = self.rank * size
        return tuple(param.ds_shape), start, max(0, min(size, param.ds_numel - start))

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.ds_tensor.view(-1).narrow(0, 0, self._run(tensor)[2])

    def zero_pruned_(self, params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        super().zero_pruned_(params, masks)
        for name, param in params.items():
            optimizer = getattr(param, "_z3_optimizer", None)
            if optimizer is None or not param.requires_grad:
                continue  # not under a ZeRO-3 optimizer: the partition is the only copy
            master = safe_get_local_fp32_param(param)  # a view of the optimizer's buffer unless it is offloaded
            zero_pruned_(master.narrow(0, 0, masks[name].numel()), masks[name].to(master.device))
            if optimizer.offload_optimizer:  # then `master` was a copy: write it back
                safe_set_local_fp32_param(param, master)
        gathered = [p for p in params.values() if p.ds_status == ZeroParamStatus.AVAILABLE]
        if gathered:  # re-gather from the zeroed partitions: all_gather alone skips parameters already available
            gathered[0].partition(param_list=gathered)
            gathered[0].all_gather(param_list=gathered)


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
