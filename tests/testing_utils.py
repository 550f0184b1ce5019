"""What several test modules share beyond conftest.py's fixtures and tiny models: the tiny `TrainingArguments`, a
callback that checks pruned weights stay exactly zero, training interrupted at a checkpoint to resume from, and what a
process killed while the Trainer rotates checkpoints leaves."""

from __future__ import annotations

import concurrent.futures
import os
import types

import pytest
import torch
import transformers
from conftest import TinyClassificationDataset, tiny_bert
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_prune import MagnitudePruningCallback, PruningConfig


TINY_TRAINING = dict(max_steps=12, per_device_train_batch_size=8, learning_rate=5e-3, weight_decay=0.1,
                     max_grad_norm=1.0, logging_steps=2, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                     disable_tqdm=True)


def tiny_training_args(output_dir, **overrides) -> TrainingArguments:
    """`TrainingArguments` for a few CPU steps on the tiny models: 12 AdamW steps of 8 examples at 5e-3 (weight
    decay 0.1, clipping at 1.0), a log every 2 steps, no checkpoint, seed 0; `overrides` replace any of them."""
    return TrainingArguments(output_dir=str(output_dir), **{**TINY_TRAINING, **overrides})


class ZeroChecker(TrainerCallback):
    """Placed after the pruning callback: records any non-zero gradient of a pruned weight right before the
    optimizer step, any non-zero pruned weight after the step and at step end, and the sparsity at each step end."""

    def __init__(self, pruning: MagnitudePruningCallback) -> None:
        self.pruning = pruning
        self.violations: list[tuple[str, int]] = []
        self.sparsity_by_step: dict[int, float] = {}

    def _check(self, event: str, state, model, grad: bool = False) -> None:
        params = dict(model.named_parameters())
        for name, mask in self.pruning.masks.items():
            tensor = params[name].grad if grad else params[name].detach()
            if tensor is not None and (tensor[~mask] != 0).any():
                self.violations.append((event, state.global_step))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._check("gradient", state, model, grad=True)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._check("optimizer_step", state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._check("step_end", state, model)
        self.sparsity_by_step[state.global_step] = self.pruning.pruner.sparsity()


class Interrupt(TrainerCallback):
    """Stops training right after the first checkpoint, as a crash would."""

    def on_save(self, args, state, control, **kwargs):
        control.should_training_stop = True


def train_until_first_checkpoint(trainer: Trainer) -> str:
    """Trains `trainer` until it writes its first checkpoint and stops there, as a crash would; returns the
    checkpoint folder to resume from."""
    trainer.add_callback(Interrupt())
    trainer.train()
    checkpoint = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
    assert os.path.isdir(checkpoint), checkpoint
    return checkpoint


def record_newest_checkpoint_at_rotation(monkeypatch, filename: str) -> list[tuple[str, bool]]:
    """Patches the Trainer's `rotate_checkpoints` (which deletes the older checkpoints before `on_save`) to record
    the newest checkpoint's name and whether it holds `filename` yet: what a process killed there leaves."""
    seen, rotate = [], transformers.trainer.rotate_checkpoints

    def rotating(output_dir, **kwargs):
        newest = max((p for p in os.listdir(output_dir) if p.startswith("checkpoint-")),
                     key=lambda p: int(p.split("-")[1]))
        seen.append((newest, os.path.isfile(os.path.join(output_dir, newest, filename))))
        return rotate(output_dir=output_dir, **kwargs)

    monkeypatch.setattr(transformers.trainer, "rotate_checkpoints", rotating)
    return seen


def magnitude_trainer(tmp_path, config: PruningConfig, max_steps: int = 12, checker: bool = True,
                      optimizer_cls: type[torch.optim.Optimizer] | None = None, **overrides):
    """A `Trainer` of the tiny BERT on 96 examples with `MagnitudePruningCallback(config)`, followed by a
    `ZeroChecker` unless `checker=False`, writing to `tmp_path / "out"`; `optimizer_cls` replaces AdamW (at lr 0.1).
    Returns the trainer, the pruning callback and the last callback (the checker, if any)."""
    callback = MagnitudePruningCallback(config)
    callbacks = [callback] + ([ZeroChecker(callback)] if checker else [])
    model = tiny_bert()
    optimizers = (optimizer_cls(model.parameters(), lr=0.1), None) if optimizer_cls else (None, None)
    trainer = Trainer(model=model, args=tiny_training_args(tmp_path / "out", max_steps=max_steps, **overrides),
                      train_dataset=TinyClassificationDataset(96), callbacks=callbacks, optimizers=optimizers)
    return trainer, callback, callbacks[-1]


class RecordingHubApi:
    """Stands in for the Hub: records the files of every folder the Trainer uploads, at the moment it uploads."""

    def __init__(self):
        self.uploads: list[tuple[str, set[str]]] = []

    def create_repo(self, repo_id, **kwargs):
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, folder_path, path_in_repo=None, **kwargs):
        self.uploads.append((path_in_repo or ".", set(os.listdir(folder_path))))
        done = concurrent.futures.Future()
        done.set_result(None)
        return done


def make_pruned_weights_large(checkpoint: str) -> dict[str, torch.Tensor]:
    """Sets the pruned weights of a Trainer checkpoint's `model.safetensors` to 10, so that a resume which
    recomputed the masks from the weights (magnitude would re-prune the zeros) would keep them: only the saved masks
    say they are pruned. Returns those masks."""
    from safetensors.torch import load_file, save_file

    from hf_prune.constants import MASKS_NAME
    from hf_prune.serialization import load_masks

    masks = load_masks(os.path.join(checkpoint, MASKS_NAME))
    weights_file = os.path.join(checkpoint, "model.safetensors")
    weights = load_file(weights_file)
    for name, mask in masks.items():
        weights[name][~mask] = 10.0
    save_file(weights, weights_file, {"format": "pt"})
    return masks


def assert_refused_before_training(trainer: Trainer, match: str) -> None:
    """`trainer.train()` raises a `ValueError` matching `match` before its first optimizer step, with every
    parameter of the model as it was."""
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[name], p) for name, p in trainer.model.named_parameters())
