"""A worker of tests/test_distributed.py, on 2 CPU processes (gloo): `MagnitudePruningCallback` on FSDP2
(`fully_shard`) and FSDP1 (`FullyShardedDataParallel`, `use_orig_params=True`) shards of the tiny BERT, driven
through the Trainer's events (the Trainer cannot shard on CPU: accelerate enables FSDP on accelerators only).
Writes `fsdp2_rank<r>.safetensors`, `fsdp1_rank<r>.safetensors`, the checkpoints and the pruned models into
`--output_dir`."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch
from conftest import tiny_bert
from distributed_worker_common import (
    OBD_CONFIG,
    RUN_CONFIG,
    RUN_STEPS,
    WORLD_SIZE,
    drive_callback,
    error_of,
    log_and_save,
    output_dir,
    process_group,
    resume,
    rows,
)
from safetensors.torch import save_file
from transformers import TrainerControl, TrainerState

from hf_prune import MagnitudePruningCallback, Pruner, PruningConfig, RegularizationCallback
from hf_prune.distributed import check_thresholds_agree
from hf_prune.methods.rpp import RPPCallback, RPPConfig


def sharded_tiny_bert(mesh) -> torch.nn.Module:
    """The tiny BERT under FSDP2 `fully_shard` per layer and at the root (intermediate size 37: uneven shards)."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_bert()
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def fsdp2_training(rank: int, folder: str) -> None:
    """Drives `MagnitudePruningCallback` through the Trainer's events on an FSDP2 model, one batch per rank, then
    saves a checkpoint, gathers a `PrunedModel`, resumes from the checkpoint into a fresh sharded model, checks a
    threshold disagreement and the methods that refuse shards, and trains with `criterion="obd"` on the same batch
    on both ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    model = sharded_tiny_bert(mesh)
    args = SimpleNamespace(output_dir=os.path.join(folder, "fsdp2_trainer"), resume_from_checkpoint=None,
                           should_save=rank == 0)
    state, control = TrainerState(max_steps=RUN_STEPS, is_world_process_zero=rank == 0), TrainerControl()
    callback = MagnitudePruningCallback(RUN_CONFIG)
    first_event = drive_callback(callback, model, rows(4 * rank, 4), args, state)
    logs = log_and_save(callback, model, args, state, os.path.join(folder, "fsdp2_pruned"))

    resumed_model = sharded_tiny_bert(mesh)
    resumed = resume(resumed_model, args, rank)
    refused = {type(unsupported).__name__: error_of(lambda u=unsupported: u.on_train_begin(
        args, TrainerState(max_steps=RUN_STEPS), control, model=resumed_model))
        for unsupported in (RPPCallback(RPPConfig(final_sparsity=0.5)), RegularizationCallback("l1"))}
    refused["wanda"] = error_of(lambda: Pruner(resumed_model, PruningConfig(schedule="oneshot", criterion="wanda")))
    obd_pruner = Pruner(resumed_model, PruningConfig(schedule="oneshot", criterion="obd"))
    refused["estimate_fisher"] = error_of(lambda: obd_pruner.estimate_fisher(resumed_model, [rows(0, 4)]))
    disagreement = error_of(lambda: check_thresholds_agree({"threshold": 0.5 + rank}, step=3), RuntimeError)
    params, resumed_params = dict(model.named_parameters()), dict(resumed_model.named_parameters())
    obd = MagnitudePruningCallback(OBD_CONFIG)
    drive_callback(obd, sharded_tiny_bert(mesh), rows(0, 4), args, TrainerState(max_steps=RUN_STEPS))
    tensors = {f"first/{n}": m for n, m in first_event.items()}
    tensors.update({f"local/{n}": m for n, m in callback.masks.items()})
    tensors.update({f"obd/{n}": m for n, m in obd.pruner.full_masks().items()})
    tensors.update({f"weight/{n}": params[n].full_tensor().detach() for n in callback.masks})
    tensors.update({f"resumed_local/{n}": m for n, m in resumed.masks.items()})
    tensors.update({f"resumed_weight/{n}": resumed_params[n].full_tensor().detach() for n in resumed.masks})
    metadata = {"logs": json.dumps(logs), "disagreement": disagreement, "refused": json.dumps(refused)}
    save_file(tensors, os.path.join(folder, f"fsdp2_rank{rank}.safetensors"), metadata=metadata)


def fsdp1_tiny_bert() -> torch.nn.Module:
    """The tiny BERT under FSDP1 (`FullyShardedDataParallel`, one unit per layer and one at the root,
    `use_orig_params=True`, on CPU): each weight becomes a 1-D run of its flattened entries, empty on some ranks."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.bert.modeling_bert import BertLayer

    return FullyShardedDataParallel(tiny_bert(), auto_wrap_policy=ModuleWrapPolicy({BertLayer}),
                                    use_orig_params=True, device_id=torch.device("cpu"))


def fsdp1_training(rank: int, folder: str) -> None:
    """`MagnitudePruningCallback` on an FSDP1 model, through the Trainer's events, one batch per rank; then a
    checkpoint, `PrunedModel.from_trainer`, a resume into a fresh FSDP1 model, and `criterion="obd"` trained on the
    same batch on both ranks."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = fsdp1_tiny_bert()
    args = SimpleNamespace(output_dir=os.path.join(folder, "fsdp1_trainer"), resume_from_checkpoint=None,
                           should_save=rank == 0)
    state = TrainerState(max_steps=RUN_STEPS, is_world_process_zero=rank == 0)
    callback = MagnitudePruningCallback(RUN_CONFIG)
    first_event = drive_callback(callback, model, rows(4 * rank, 4), args, state)
    logs = log_and_save(callback, model, args, state, os.path.join(folder, "fsdp1_pruned"))
    resumed_model = fsdp1_tiny_bert()
    resumed = resume(resumed_model, args, rank)
    obd = MagnitudePruningCallback(OBD_CONFIG)
    drive_callback(obd, fsdp1_tiny_bert(), rows(0, 4), args, TrainerState(max_steps=RUN_STEPS))
    flat_only = FullyShardedDataParallel(tiny_bert(), use_orig_params=False, device_id=torch.device("cpu"))
    refusal = error_of(lambda: Pruner(flat_only, RUN_CONFIG))

    tensors = {f"first/{n}": m for n, m in first_event.items()}
    tensors.update({f"local/{n}": m for n, m in callback.masks.items()})
    tensors.update({f"resumed_local/{n}": m for n, m in resumed.masks.items()})
    tensors.update({f"obd/{n}": m for n, m in obd.pruner.full_masks().items()})
    for kind, wrapped in (("weight", model), ("resumed_weight", resumed_model)):
        with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
            params = dict(wrapped.named_parameters())
            tensors.update({f"{kind}/{n}": params[n].detach().clone() for n in callback.masks})
    save_file(tensors, os.path.join(folder, f"fsdp1_rank{rank}.safetensors"),
              metadata={"logs": json.dumps(logs), "refusal": refusal})


def main() -> None:
    folder = output_dir(__doc__.split("\n")[0])
    with process_group() as rank:
        fsdp2_training(rank, folder)
        fsdp1_training(rank, folder)


if __name__ == "__main__":
    main()
