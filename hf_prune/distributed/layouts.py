"""Where the entries of each weight live across processes, and how to mask, gather and scatter them.

`layout_of` tells the layouts apart: `RowShards` (FSDP2 `fully_shard`, DTensors placed `Shard(0)` on a 1-D mesh:
a block of rows per rank), `FlatShards` (FSDP1: a run of the flattened weight per rank) and `ZeroPartitions`
(DeepSpeed ZeRO-3: likewise), next to `Replicated` (whole tensors: one process, DDP). Each says which entries a
rank holds (`local`), gathers a full-size mask for saving the way transformers gathers a sharded state dict
(`gather`), takes a rank's part of a full mask so mask files load under any world size (`scatter`), and zeroes
every copy of the pruned weights (`zero_pruned_`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from ..masks import zero_pruned_
from .collectives import ProcessGroupReduce, collective_device


_NAMED_IN_ERRORS = 8


def is_sharded(param: torch.Tensor) -> bool:
    """Whether `param` is a shard rather than a whole weight: an FSDP2 DTensor, an FSDP1 flat-parameter view
    (`use_orig_params=True`) or a DeepSpeed ZeRO-3 partitioned parameter. The one test every module uses."""
    return isinstance(param, DTensor) or is_zero3(param) or getattr(param, "_fsdp_flattened", False)


def is_zero3(param: torch.Tensor) -> bool:
    """Whether `param` is partitioned by DeepSpeed ZeRO-3 (its entries live in `param.ds_tensor`)."""
    return hasattr(param, "ds_tensor")


def layout_of(params: Mapping[str, torch.Tensor], model: nn.Module) -> Replicated:
    """How `params` (weights of `model`, or of the module an FSDP1 `model` wraps) are laid out across processes:
    `ZeroPartitions` for DeepSpeed ZeRO-3, `RowShards` for FSDP2 DTensors, `FlatShards` for FSDP1 with
    `use_orig_params=True`, `Replicated` for whole tensors (one process, DDP, FSDP1's `NO_SHARD`).

    Raises:
        ValueError: when the weights mix layouts, a DTensor is not placed `Shard(0)` on a 1-D mesh shared by all
            (FSDP2's default; HSDP and tensor parallelism are not supported), or FSDP1 shards them in a hybrid way.
    """
    fsdp1 = _fsdp1_runs(model)
    kinds = {"ZeRO-3": [n for n, p in params.items() if is_zero3(p)],
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
    if any(is_sharded(p) for p in params):
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
        device = collective_device(self.group)
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
