"""A worker of tests/test_distributed.py, on 2 CPU processes (gloo): the rank-agreement check (identical masks
pass; a moved pruned entry, a different count or a missing mask on rank 1 raise on every rank) and the radix select
over row-sharded weights, and the data-driven criteria under DDP (each rank estimates from its own batches). Writes
`agreement<r>.json`, `shards<r>.safetensors` and `<criterion><r>.safetensors` into `--output_dir`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import TinyClassificationDataset, tiny_bert
from distributed_worker_common import WORLD_SIZE, integer_weights, output_dir, process_group, prune_events
from safetensors.torch import save_file

from hf_prune import Pruner, PruningConfig
from hf_prune.distributed import ProcessGroupReduce, check_ranks_agree, is_distributed, masks_fingerprint


def check_agreement(rank: int, folder: str) -> None:
    """Identical masks pass; a moved pruned entry, a different count or a missing mask on rank 1 raise."""
    pruner = Pruner(tiny_bert(), PruningConfig(final_sparsity=0.5, schedule="oneshot"))
    pruner.update(0)
    check_ranks_agree(pruner.masks, step=0)
    name = next(iter(pruner.masks))
    errors = {}
    for case in ("moved", "count", "missing"):
        masks = {n: m.clone() for n, m in pruner.masks.items()}
        flat = masks[name].view(-1)
        if rank == 1 and case == "moved":  # same number kept, one pruned position elsewhere
            first_pruned, first_kept = int((~flat).nonzero()[0]), int(flat.nonzero()[0])
            flat[first_pruned], flat[first_kept] = True, False
        elif rank == 1 and case == "count":
            flat[flat.nonzero()[0]] = False
        elif rank == 1:
            del masks[name]
        try:
            check_ranks_agree(masks, step=7)
        except RuntimeError as err:
            errors[case] = str(err)
    Path(folder, f"agreement{rank}.json").write_text(json.dumps(
        {"errors": errors, "fingerprint": masks_fingerprint(pruner.masks).tolist(), "name": name}))


def prune_row_shards(rank: int, folder: str) -> None:
    """Each rank keeps only its block of rows of every weight and prunes it with the others."""
    weights, classes = integer_weights()
    shards = {n: w.chunk(WORLD_SIZE)[rank].clone() for n, w in weights.items()}
    del weights
    save_file(prune_events(shards, classes, ProcessGroupReduce()), os.path.join(folder, f"shards{rank}.safetensors"))


def data_criteria(rank: int, folder: str) -> None:
    """`estimate_fisher` + `prune_to` with "obd" and "wanda", each rank on its own half of the batches of
    `data_criterion_batches()`, in two calls (the second adds to the first's statistics, summed over the ranks
    already): the masks must be those of one process given all of them at once."""
    for criterion in ("obd", "wanda"):
        model = tiny_bert()
        pruner = Pruner(model, PruningConfig(final_sparsity=0.5, schedule="oneshot", criterion=criterion))
        batches = data_criterion_batches()[rank::WORLD_SIZE]
        pruner.estimate_fisher(model, batches[:1])
        pruner.estimate_fisher(model, batches[1:])
        pruner.prune_to(0.5)
        save_file(pruner.masks, os.path.join(folder, f"{criterion}{rank}.safetensors"))


def data_criterion_batches() -> list[dict]:
    """Four batches of four examples (the test reads them too, for its one-process reference)."""
    dataset = TinyClassificationDataset(16)
    return [dataset[i:i + 4] for i in range(0, 16, 4)]


def main() -> None:
    folder = output_dir(__doc__.split("\n")[0])
    with process_group() as rank:
        assert is_distributed()
        check_agreement(rank, folder)
        prune_row_shards(rank, folder)
        data_criteria(rank, folder)


if __name__ == "__main__":
    main()
