"""A worker of tests/test_distributed.py, on 2 CPU processes (gloo, DeepSpeed on its CPU accelerator:
`DS_ACCELERATOR=cpu`): `MagnitudePruningCallback` on a DeepSpeed ZeRO-3 engine, driven in accelerate's event order,
then a checkpoint, `PrunedModel.from_trainer`, a resume into a fresh engine and the refusal of OBD. Writes
`zero3_rank<r>.safetensors`, the checkpoint and the pruned model into `--output_dir`.

The engines are destroyed and the groups torn down through DeepSpeed before the worker leaves, so that no gloo
thread outlives them, and a worker that finished its work leaves without the interpreter's teardown
(`exit_cleanly`): it could otherwise abort at exit with "terminate called without an active exception" after every
file was written."""

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
    drive_callback,
    error_of,
    exit_cleanly,
    log_and_save,
    output_dir,
    process_group,
    resume,
    rows,
)
from safetensors.torch import save_file
from transformers import TrainerState

from hf_prune import MagnitudePruningCallback, Pruner


ZERO3_CONFIG = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "torch_adam": True}},
                # 32x32 attention weights (1024 entries) stay gathered between steps, 37x32 feed-forward ones do not
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1100}}


def zero3_engine(model: torch.nn.Module):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=ZERO3_CONFIG, model_parameters=model.parameters())
    return engine


def gathered(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    """The full weights `names` of a ZeRO-3 model (what a forward uses) and the full fp32 master copies."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params, out = dict(model.named_parameters()), {}
    for name in names:
        with deepspeed.zero.GatheredParameters([params[name]]):
            out[f"weight/{name}"] = params[name].detach().cpu().clone()
        out[f"master/{name}"] = safe_get_full_fp32_param(params[name]).detach().cpu().clone()
    return out


def zero3_training(rank: int, folder: str, engines: list) -> None:
    """`MagnitudePruningCallback` on a DeepSpeed ZeRO-3 engine, driven in accelerate's event order (the engine steps
    inside `accelerator.backward`, before the Trainer's optimizer-step events), one batch per rank; then a
    checkpoint, `PrunedModel.from_trainer`, a resume into a fresh engine, and the refusal of OBD. The engines it
    makes are appended to `engines`."""
    model = tiny_bert()
    engines.append(zero3_engine(model))
    args = SimpleNamespace(output_dir=os.path.join(folder, "zero3_trainer"), resume_from_checkpoint=None,
                           should_save=rank == 0)
    state = TrainerState(max_steps=RUN_STEPS, is_world_process_zero=rank == 0)
    callback = MagnitudePruningCallback(RUN_CONFIG)
    first_event = drive_callback(callback, model, rows(4 * rank, 4), args, state, engines[-1])
    # what the next forward uses of the weights ZeRO-3 keeps gathered between steps (the others come from the
    # partitions, checked below)
    persistent = {n: p.data.clone() for n, p in model.named_parameters() if n in callback.masks and p.ds_persist}
    logs = log_and_save(callback, model, args, state, os.path.join(folder, "zero3_pruned"))

    resumed_model = tiny_bert()
    engines.append(zero3_engine(resumed_model))
    resumed = resume(resumed_model, args, rank)
    obd_refusal = error_of(lambda: Pruner(resumed_model, OBD_CONFIG))

    tensors = {f"first/{n}": m for n, m in first_event.items()}
    tensors.update({f"local/{n}": m for n, m in callback.masks.items()})
    tensors.update({f"trained_{k}": v for k, v in gathered(model, callback.masks).items()})
    tensors.update({f"persistent/{n}": w for n, w in persistent.items()})
    tensors.update({f"resumed_local/{n}": m for n, m in resumed.masks.items()})
    tensors.update({f"resumed_{k}": v for k, v in gathered(resumed_model, resumed.masks).items()})
    metadata = {"logs": json.dumps(logs), "obd_refusal": obd_refusal,
                "persist": json.dumps({n: bool(p.ds_persist) for n, p in model.named_parameters()})}
    save_file(tensors, os.path.join(folder, f"zero3_rank{rank}.safetensors"), metadata=metadata)


def main() -> None:
    import deepspeed

    folder = output_dir(__doc__.split("\n")[0])
    engines: list = []
    with process_group() as rank:
        deepspeed.init_distributed(dist_backend="gloo")  # takes the group over
        try:
            zero3_training(rank, folder, engines)
        finally:  # their hooks and buffers, before the groups they use go
            for engine in engines:
                engine.destroy()
            engines.clear()
    exit_cleanly()


if __name__ == "__main__":
    main()
