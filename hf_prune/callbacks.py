"""Trainer callbacks: thin event handlers over a `Pruner`."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .config import PruningConfig, resolve_file
from .constants import MASKS_NAME
from .pruner import Pruner
from .schedules import SparsitySchedule
from .serialization import load_masks, read_masks_metadata, save_masks


logger = logging.getLogger(__name__)


class MagnitudePruningCallback(TrainerCallback, ExportableState):
    """Gradual pruning during `Trainer.train()`: masks follow `config.schedule`, pruned weights stay exactly 0.

    Per optimizer step: gradients of pruned weights are zeroed before the step (`on_pre_optimizer_step`),
    the weights re-masked after it (`on_optimizer_step`), and at each pruning event (`on_step_end`) the masks
    grow and the optimizer's moments are cleared at the newly pruned positions, before any log or checkpoint
    of that step. Every checkpoint gets `pruning_masks.safetensors`, and `resume_from_checkpoint` restores it.
    Sparsity (overall and per weight class) is added to the logs.

    ```python
    from hf_prune import MagnitudePruningCallback, PruningConfig

    callback = MagnitudePruningCallback(PruningConfig(initial_sparsity=0.5, final_sparsity=0.9,
                                                      schedule="iterative", pruning_frequency=1000))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()
    callback.masks  # parameter name -> torch.bool tensor, True = kept
    ```

    Args:
        config (`PruningConfig` or `dict`, *optional*): the pruning configuration (a dict is what `state()`
            stores in `trainer_state.json`). Defaults to `PruningConfig()`.
    """

    def __init__(self, config: PruningConfig | dict[str, Any] | None = None) -> None:
        if isinstance(config, dict):
            config = PruningConfig.from_dict(config)
        self.config = config if config is not None else PruningConfig()
        self.pruner: Pruner | None = None
        self._initial_masks: dict[str, torch.Tensor] | None = None
        self._initial_target = 0.0

    @classmethod
    def from_pretrained(cls, pretrained_path: str | os.PathLike, config: PruningConfig | None = None,
                        **hub_kwargs: Any) -> MagnitudePruningCallback:
        """A callback that starts from the masks saved by `PrunedModel.save_pretrained` (a folder or a Hub repo).

        With no `config` the saved targets and scheme are kept and the sparsity is held fixed (`oneshot` at the
        saved sparsity); pass a config with a higher `final_sparsity` to prune further.
        """
        saved = PruningConfig.from_pretrained(pretrained_path, **hub_kwargs)
        masks_file = resolve_file(pretrained_path, MASKS_NAME, **hub_kwargs)
        target = float(read_masks_metadata(masks_file).get("target_sparsity", saved.final_sparsity))
        if config is None:
            config = dataclasses.replace(saved, schedule="oneshot", initial_sparsity=0.0, final_sparsity=target,
                                         start_step=0, end_step=None, pruning_frequency=None)
        callback = cls(config)
        callback._initial_masks = load_masks(masks_file)
        callback._initial_target = target
        return callback

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name -> `torch.bool` mask (True = kept); empty before training starts."""
        return self.pruner.masks if self.pruner is not None else {}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                       **kwargs: Any) -> None:
        self.pruner = self.make_pruner(model, state.max_steps)
        if state.global_step > 0:
            self._restore_from_checkpoint(args, state)
        elif self._initial_masks is not None:
            self.pruner.load_masks(self._initial_masks)
            self.pruner.target_sparsity = self._initial_target
        self.pruner.update(state.global_step, optimizer)
        self.pruner.check_ranks_agree(state.global_step)

    @classmethod
    def check_schedule(cls, config: PruningConfig, max_steps: int) -> None:
        """Raises the `ValueError` that training would raise at its start if `config`'s schedule cannot run in
        `max_steps` optimizer steps (for scripts that check their options before loading a model)."""
        SparsitySchedule.from_config(config, max_steps)

    def make_pruner(self, model: torch.nn.Module, max_steps: int | None) -> Pruner:
        """The `Pruner` this callback drives; subclasses with their own pruning event return a subclass."""
        return Pruner(model, self.config, max_steps=max_steps)

    def log_entries(self, state: TrainerState) -> dict[str, float]:
        """What `on_log` adds to the Trainer's logs: overall and per-class sparsity."""
        entries = {"sparsity": self.pruner.sparsity()}
        entries.update({f"sparsity/{cls}": value for cls, value in self.pruner.sparsity_by_class().items()})
        return entries

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        # OBD's Fisher sees the gradients the optimizer gets: accumulated over the micro-batches of the step and
        # already clipped. Clipping scales a whole step by one factor: the ranking within the step is unchanged
        # and a step with outlying gradients weighs no more than one at max_grad_norm. They are recorded before
        # the pruned entries are zeroed (those have w = 0, hence saliency 0, and stay pruned anyway).
        self.pruner.observe_gradients_(state.global_step + 1)
        self.pruner.mask_gradients_()

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> None:
        self.pruner.apply_()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        if self.pruner.update(state.global_step, optimizer):
            self.pruner.check_ranks_agree(state.global_step)
            logger.info("Step %d: pruned to %.4f sparsity (%s).", state.global_step, self.pruner.target_sparsity,
                        ", ".join(f"{k}={v:.4g}" for k, v in self.pruner.thresholds.items()))

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self.pruner is None or logs is None:
            return
        entries = self.log_entries(state)
        logs.update(entries)
        if state.log_history:
            state.log_history[-1].update(entries)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if self.pruner is None:
            return
        masks = self.pruner.full_masks()  # collective when the weights are sharded
        if not state.is_world_process_zero:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(checkpoint, exist_ok=True)
        save_masks(masks, os.path.join(checkpoint, MASKS_NAME),
                   {"global_step": state.global_step, "target_sparsity": self.pruner.target_sparsity})

    def state(self) -> dict[str, Any]:
        return {"args": {"config": self.config.to_dict()}, "attributes": {}}

    def _restore_from_checkpoint(self, args: TrainingArguments, state: TrainerState) -> None:
        candidates = [os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        if isinstance(args.resume_from_checkpoint, str):
            candidates.insert(0, args.resume_from_checkpoint)
        for folder in candidates:
            path = os.path.join(folder, MASKS_NAME)
            if os.path.isfile(path):
                self.pruner.load_masks(load_masks(path))
                self.pruner.target_sparsity = float(read_masks_metadata(path)["target_sparsity"])
                logger.info("Restored pruning masks from %s (sparsity %.4f).", path, self.pruner.sparsity())
                return
        raise FileNotFoundError(
            f"Resuming at step {state.global_step}, but no {MASKS_NAME} was found in {candidates}. Resume from a "
            "checkpoint written with this callback (set TrainingArguments.resume_from_checkpoint to its folder "
            "if it is not under output_dir)."
        )
