"""Multi-process pruning: layouts of sharded weights, rank agreement, collectives, and gathering a full model.

Under DDP every rank holds the full weights, identical after each step, so the deterministic radix select of
`hf_prune.masks` gives identical masks everywhere; `check_ranks_agree` verifies it after every pruning event.
Sharded weights (FSDP1, FSDP2, ZeRO-3) are pruned where they live, each rank holding the masks of its own entries
(`layouts`), the global threshold found from all-reduced histograms (`collectives.ProcessGroupReduce`).
"""

from .agreement import check_ranks_agree, check_thresholds_agree, masks_fingerprint
from .collectives import ProcessGroupReduce, from_main_rank, is_distributed, is_main_rank
from .gather import gather_unsharded
from .layouts import (
    FlatShards,
    Replicated,
    RowShards,
    ZeroPartitions,
    is_sharded,
    is_zero3,
    layout_of,
    refuse_sharded,
)


__all__ = [
    "FlatShards",
    "ProcessGroupReduce",
    "Replicated",
    "RowShards",
    "ZeroPartitions",
    "check_ranks_agree",
    "check_thresholds_agree",
    "gather_unsharded",
    "from_main_rank",
    "is_distributed",
    "is_main_rank",
    "is_sharded",
    "is_zero3",
    "layout_of",
    "masks_fingerprint",
    "refuse_sharded",
]
