"""The few collectives hf_prune needs: whether a run is multi-process, where its collectives run, and the
`ShardReduce` of a process group (`hf_prune.masks` finds global thresholds with it, no rank gathering the model)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """Whether `torch.distributed` is initialised with more than one process (in `group`, default: the world)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def is_main_rank() -> bool:
    """Whether this process is rank 0 of the world, or the only process: the one that logs warnings."""
    return not is_distributed() or dist.get_rank() == 0


def collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """CPU for gloo and MPI, else the current accelerator (NCCL and its kind only reduce device tensors)."""
    backend = dist.get_backend(group)
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    if hasattr(torch, "accelerator"):  # torch >= 2.6
        return torch.device(torch.accelerator.current_accelerator().type, torch.accelerator.current_device_index())
    return torch.device("cuda", torch.cuda.current_device())


def from_main_rank(value: str) -> str:
    """`value` as rank 0 of the world has it (a broadcast; `value` itself in a single process): what every rank must
    agree on, such as the id a run writes into each checkpoint."""
    if not is_distributed():
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def sum_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Elementwise sums of `tensors` over the world's ranks, in one all-reduce (flattened and concatenated on the
    collective device); each comes back in its shape, dtype float32, on its device. Every rank passes tensors of
    the same shapes, in the same order."""
    device = collective_device(None)
    total = torch.cat([t.detach().to(device, torch.float32).flatten() for t in tensors])
    dist.all_reduce(total)
    return [part.view(t.shape).to(t.device) for part, t in zip(total.split([t.numel() for t in tensors]), tensors)]


def max_and_min(values: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise maximum and minimum of `values` over the ranks of `group`, in one all-reduce."""
    both = torch.cat([values, -values]).to(collective_device(group))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    high, negated_low = both.cpu().chunk(2)
    return high, -negated_low


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
        self.device = collective_device(group)

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
