"""A worker of tests/test_distributed.py: the real `Trainer` under `torchrun --nproc_per_node 2`, on CPU (gloo, DDP)
unless sharded.

Trains the tiny BERT of conftest.py with `MagnitudePruningCallback` for 6 steps under DDP, then every rank writes
`rank<r>.safetensors` into `--output_dir` (its masks, its targeted weights, and in the metadata the world size and
what the `pruned` folder held right after this rank's own `save_pretrained` call). The ranks call
`PrunedModel.save_pretrained(..., is_main_process=trainer.is_world_process_zero())` one after the other, the main
process last, so any file written by another rank would show in that rank's listing.

With `--skew_rank r`, rank `r` prunes one extra weight at every event after the first, as any rank-specific
divergence would: training must stop at step 2 with the rank-agreement error.

With `--sharding fsdp1` / `fsdp2` the Trainer shards the model with FSDP1 / FSDP2, with `--sharding zero3` with
DeepSpeed ZeRO-3 (accelerate enables them on accelerators only: these need GPUs); the masks and weights written per
rank are then the gathered full ones.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from conftest import TinyClassificationDataset, tiny_bert
from distributed_worker_common import RUN_CONFIG, RUN_STEPS
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

from hf_prune import MagnitudePruningCallback, PrunedModel, Pruner


SHARDING_ARGS = {
    "fsdp1": {"fsdp": "full_shard auto_wrap", "fsdp_config": {"transformer_layer_cls_to_wrap": ["BertLayer"],
                                                              "use_orig_params": True}},
    "fsdp2": {"fsdp": True, "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True,
                                            "transformer_layer_cls_to_wrap": ["BertLayer"]}},
    # the 32x32 attention weights stay gathered between steps (ds_persist), the 37x32 feed-forward ones do not
    "zero3": {"deepspeed": {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1100,
                                                  "stage3_gather_16bit_weights_on_model_save": True}}},
}


class SkewedPruner(Pruner):
    """Prunes one more weight than asked at every event after the first one."""

    def prune_to(self, sparsity: float, optimizer=None) -> None:
        super().prune_to(sparsity, optimizer)
        if sparsity > self.config.initial_sparsity:
            mask = next(iter(self.masks.values())).view(-1)
            mask[mask.nonzero()[0]] = False


class SkewedCallback(MagnitudePruningCallback):
    def make_pruner(self, model, max_steps: int | None) -> Pruner:
        return SkewedPruner(model, self.config, max_steps=max_steps)


def full_weights(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    """The whole weights `names` on CPU, gathered (collectively) from FSDP1, FSDP2 or ZeRO-3 shards."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if n in names}
    weights = {}
    for name, param in model.named_parameters():
        if name not in names:
            continue
        if hasattr(param, "ds_tensor"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                weights[name] = param.detach().cpu().clone()
        else:
            weights[name] = getattr(param, "full_tensor", lambda p=param: p)().detach().cpu()
    return weights


def train_and_save(output_dir: str, skew_rank: int | None, sharding: str | None) -> None:
    skewed = skew_rank == int(os.environ.get("RANK", 0))
    callback = (SkewedCallback if skewed else MagnitudePruningCallback)(RUN_CONFIG)
    args = TrainingArguments(output_dir=os.path.join(output_dir, "trainer"), max_steps=RUN_STEPS,
                             per_device_train_batch_size=4, learning_rate=5e-3, save_strategy="steps",
                             save_steps=RUN_STEPS, report_to="none", use_cpu=sharding is None, seed=0,
                             disable_tqdm=True, **SHARDING_ARGS.get(sharding, {}))
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=TinyClassificationDataset(64), callbacks=[callback])
    trainer.train()

    rank, folder = trainer.args.process_index, os.path.join(output_dir, "pruned")
    pruned = PrunedModel.from_trainer(trainer)
    seen_after_own_save: list[str] = []
    for writer in reversed(range(trainer.args.world_size)):
        if rank == writer:
            pruned.save_pretrained(folder, is_main_process=trainer.is_world_process_zero())
            seen_after_own_save = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        trainer.accelerator.wait_for_everyone()

    params = full_weights(trainer.model, callback.masks)
    tensors = {f"mask/{name}": mask.contiguous() for name, mask in callback.pruner.full_masks().items()}
    tensors.update({f"weight/{name}": weight.contiguous() for name, weight in params.items()})
    metadata = {"world_size": str(trainer.args.world_size), "seen_after_own_save": json.dumps(seen_after_own_save),
                "parallel_mode": str(trainer.args.parallel_mode), "fsdp": str(trainer.is_fsdp_enabled),
                "deepspeed": str(trainer.is_deepspeed_enabled),
                "mask_shapes": json.dumps({n: list(m.shape) for n, m in callback.masks.items()}),
                "masks_id": callback.state().get("masks_id", "")}
    save_file(tensors, os.path.join(output_dir, f"rank{rank}.safetensors"), metadata=metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--skew_rank", type=int, default=None)
    parser.add_argument("--sharding", choices=sorted(SHARDING_ARGS), default=None)
    cli = parser.parse_args()
    try:
        train_and_save(cli.output_dir, cli.skew_rank, cli.sharding)
    finally:  # the Trainer set the group up (accelerate); nothing else tears it down
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
