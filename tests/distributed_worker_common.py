"""What the worker programs `distributed_worker_*.py` share with each other and with tests/test_distributed.py: the
pruning configs of the sharded runs, the reference computations, a driver of the Trainer's callback events, and the
process group a worker runs in (set up from torchrun's environment, torn down on every exit path).

Each worker is a program of its own, started by test_distributed.py with `torchrun --standalone --nproc_per_node 2
tests/distributed_worker_<purpose>.py --output_dir DIR` on CPU (gloo); it writes what it saw into DIR and the tests
read it there.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import torch
import torch.distributed as dist
from conftest import TinyClassificationDataset, tiny_bert
from transformers import TrainerControl, TrainerState

from hf_prune import MagnitudePruningCallback, PrunedModel, PruningConfig
from hf_prune.criteria import MagnitudeCriterion
from hf_prune.masks import update_masks_
from hf_prune.targets import find_targets


WORLD_SIZE = 2
SHARDED_EVENTS = {"class-blind": (0.3, 0.6), "class-uniform": (0.5,), "class-distribution": (0.55,)}
# the pruning and the steps of every training run of the workers: events at steps 0, 2 and 4, from 20% to 70%
RUN_CONFIG = PruningConfig(initial_sparsity=0.2, final_sparsity=0.7, schedule="cubic", start_step=0, end_step=4,
                           pruning_frequency=2)
RUN_STEPS = 6
OBD_CONFIG = PruningConfig(final_sparsity=0.6, schedule="cubic", start_step=0, end_step=4, pruning_frequency=2,
                           criterion="obd", fisher_steps=2)
# ZeRO-3 keeps the 32x32 attention weights (1024 entries) gathered between steps, not the 37x32 feed-forward ones
PERSISTENT = "bert.encoder.layer.0.attention.self.query.weight"
PARTITIONED = "bert.encoder.layer.0.intermediate.dense.weight"


# ------------------------------------------------------------------------------------------- the worker's life
def output_dir(description: str) -> str:
    """The `--output_dir` argument of a worker program."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output_dir", required=True)
    return parser.parse_args().output_dir


@contextlib.contextmanager
def process_group() -> Iterator[int]:
    """A gloo group of the `WORLD_SIZE` processes torchrun started (rank, world size and rendezvous from its
    environment); yields this process's rank, and on every way out destroys the groups (`destroy_process_groups`)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        assert dist.get_world_size() == WORLD_SIZE, dist.get_world_size()
        yield dist.get_rank()
        dist.barrier()  # no rank tears its connections down while another one still talks to it
    finally:
        destroy_process_groups()


def destroy_process_groups() -> None:
    """Destroys every process group, and when DeepSpeed took the world group over (`deepspeed.init_distributed`),
    through DeepSpeed, which also drops the groups it keeps (a copy of the world group among them): a group lives,
    and its gloo threads with it, as long as anything refers to it, and threads still running when the interpreter
    tears itself down can abort the process ("terminate called without an active exception")."""
    if not dist.is_initialized():
        return
    deepspeed_comm = sys.modules.get("deepspeed.comm.comm")
    if deepspeed_comm is not None and deepspeed_comm.cdb is not None:
        deepspeed_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
    gc.collect()  # groups that only reference cycles still hold


def exit_cleanly() -> None:
    """Ends a worker that finished its work and tore its groups down: flushes the output and leaves without the
    interpreter's teardown, in which a native thread that still runs (DeepSpeed's, gloo's) can abort the process
    with "terminate called without an active exception" after every file was written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------ reference computations
def integer_weights() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The targeted weights of the tiny BERT rounded to integers (|w| <= ~8: thousands of exact ties, many zeros),
    and their weight classes."""
    model = tiny_bert()
    params = dict(model.named_parameters())
    targets = find_targets(model, PruningConfig())
    weights = {t.name: torch.round(params[t.name].detach() * 100) for t in targets}
    return weights, {t.name: t.weight_class for t in targets}


def prune_events(weights: dict[str, torch.Tensor], classes: dict[str, str], reduce=None) -> dict[str, torch.Tensor]:
    """Masks after each scheme's events of SHARDED_EVENTS, keyed `<scheme>/<name>`."""
    out = {}
    for scheme, sparsities in SHARDED_EVENTS.items():
        masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
        for sparsity in sparsities:
            update_masks_(weights, masks, classes, MagnitudeCriterion(), sparsity, scheme, reduce)
        out.update({f"{scheme}/{n}": m for n, m in masks.items()})
    return out


def rows(start: int, count: int) -> dict[str, torch.Tensor]:
    """Rows `start ... start + count - 1` of the tiny classification dataset as one batch."""
    dataset = TinyClassificationDataset(start + count)
    return {key: torch.stack([dataset[i][key] for i in range(start, start + count)]) for key in dataset[0]}


# --------------------------------------------------------------------------------- the Trainer's events, driven
def drive_callback(callback: MagnitudePruningCallback, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   args: SimpleNamespace, state, engine=None) -> dict[str, torch.Tensor]:
    """Calls `callback`'s events in the order `Trainer.train()` does, for `state.max_steps` AdamW steps on `batch`;
    returns the full-size masks of the first event (at train begin). With a DeepSpeed `engine`, in accelerate's
    order: the engine steps inside `accelerator.backward`, before the Trainer's optimizer-step events."""
    control = TrainerControl()
    optimizer = engine.optimizer if engine else torch.optim.AdamW(model.parameters(), lr=5e-3)
    callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    first_event = callback.pruner.full_masks()
    for _ in range(state.max_steps):
        if engine is not None:
            engine.backward(engine(**batch).loss)
            engine.step()
        else:
            model(**batch).loss.backward()
        callback.on_pre_optimizer_step(args, state, control)
        if engine is None:
            optimizer.step()
        callback.on_optimizer_step(args, state, control)
        if engine is None:
            optimizer.zero_grad()
        state.global_step += 1
        callback.on_step_end(args, state, control, optimizer=optimizer)
    return first_event


def log_and_save(callback: MagnitudePruningCallback, model: torch.nn.Module, args: SimpleNamespace, state,
                 pruned_folder: str) -> dict[str, float]:
    """What the Trainer does after training with the callback: a log (returned), a checkpoint, and the script's
    `PrunedModel.from_trainer(trainer).save_pretrained(pruned_folder)` on every rank."""
    logs: dict[str, float] = {"loss": 0.0}  # a training step's logs (the Trainer's own dict)
    callback.on_log(args, state, TrainerControl(), logs=logs)
    callback.on_save(args, state, TrainerControl())
    trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[callback]), model=model,
                              is_world_process_zero=lambda: state.is_world_process_zero)
    PrunedModel.from_trainer(trainer).save_pretrained(pruned_folder, is_main_process=state.is_world_process_zero)
    return logs


def resume(model: torch.nn.Module, args: SimpleNamespace, rank: int,
           config: PruningConfig = RUN_CONFIG) -> MagnitudePruningCallback:
    """A fresh callback resumed on `model` at the end of the run whose checkpoint is under `args.output_dir`."""
    callback = MagnitudePruningCallback(config)
    state = TrainerState(max_steps=RUN_STEPS, global_step=RUN_STEPS, is_world_process_zero=rank == 0)
    callback.on_train_begin(args, state, TrainerControl(), model=model, optimizer=None)
    return callback


def error_of(call: Callable[[], object], error: type[Exception] = ValueError) -> str:
    """The message of the `error` that `call()` raises, "" when it raises none."""
    try:
        call()
    except error as raised:
        return str(raised)
    return ""
