"""Trainer callbacks: thin event handlers over a `Pruner`."""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import uuid
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .config import PruningConfig, all_subclasses, canonical_structure
from .constants import CONFIG_NAME, MASKS_NAME, TRAINER_STATE_NAME
from .distributed import Replicated, from_main_rank, is_main_rank
from .folders import check_saved_files, remove_temporaries
from .hub import resolve_file
from .pruner import Pruner
from .schedules import SparsitySchedule
from .serialization import load_masks, read_masks_metadata, save_masks
from .validation import check_bool


logger = logging.getLogger(__name__)

#: `PruningConfig` fields that do not change which weights are pruned: a resumed run may change them freely.
_FIELDS_THAT_KEEP_MASKS = ("base_model_name_or_path",)
#: The `TrainerState` attribute naming the pruning callback of its Trainer (see `MagnitudePruningCallback._claim`).
_CLAIM = "_hf_prune_pruning_callback"


def add_to_logs(logs: dict[str, float], state: TrainerState, entries: dict[str, float]) -> None:
    """Adds a callback's `entries` to what `Trainer.log` is logging: to its `log_history` entry always, and to
    `logs`, which the console and the callbacks after this one see, only for a training step's logs.

    The Trainer passes its callbacks the very dict that `evaluate()` and the end of `train()` return to their
    caller; a hyperparameter search sums that dict into its objective, so extra keys there would change what is
    optimised. A training step's logs (the ones with `loss`) are a dict of the Trainer's own, used for nothing else.
    """
    if state.log_history:
        state.log_history[-1].update(entries)
    if "loss" in logs:
        logs.update(entries)


def checkpoint_folder(args: TrainingArguments, state: TrainerState, create: bool = True) -> str:
    """The folder of the checkpoint the Trainer writes at `state.global_step` (made if needed, with `create`): where
    a callback's `on_save` puts its own files. `output_dir/checkpoint-<step>`; in a hyperparameter-search trial, the
    trial's `output_dir/<run name>/checkpoint-<step>` (with no `hp_name`, the run name holds a trial id the callbacks
    are not given: the folder of that step whose `trainer_state.json` the Trainer wrote last)."""
    name = f"checkpoint-{state.global_step}"
    if state.trial_params is None:
        folder = os.path.join(args.output_dir, name)
    elif state.trial_name is not None:
        folder = os.path.join(args.output_dir, state.trial_name, name)
    else:
        written = glob.glob(os.path.join(glob.escape(args.output_dir), "*", name, TRAINER_STATE_NAME))
        if not written:
            raise FileNotFoundError(f"A hyperparameter-search trial saves at step {state.global_step}, but no "
                                    f"{os.path.join(args.output_dir, '<run>', name)} holds the Trainer's "
                                    f"{TRAINER_STATE_NAME}.")
        folder = os.path.dirname(max(written, key=os.path.getmtime))
    if create:
        os.makedirs(folder, exist_ok=True)
    return folder


def checkpoint_being_pushed(args: TrainingArguments, state: TrainerState, filename: str) -> str | None:
    """In `on_push_begin`: the checkpoint folder the Trainer has just written and is about to upload (with
    `push_to_hub`, before `on_save` runs) when it still lacks `filename`; else None (the push at the end of
    training, or a step without a checkpoint)."""
    if not args.push_to_hub:
        return None
    folder = checkpoint_folder(args, state, create=False)
    written = os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME))
    return folder if written and not os.path.isfile(os.path.join(folder, filename)) else None


def checkpoint_being_written(args: TrainingArguments, state: TrainerState) -> str | None:
    """In a callback's `state()`, which the Trainer calls while it writes a checkpoint (after the model, before its
    `trainer_state.json` and before `save_total_limit` deletes older checkpoints, all of which precede `on_save`):
    that checkpoint's folder, where the callback's own files go in already, so that a process killed before
    `on_save` leaves a complete checkpoint to resume from. None where this process does not write it, in a
    hyperparameter-search trial (whose folder is found by its `trainer_state.json`: `on_save` only), and when
    `state()` is called outside a save."""
    if not args.should_save or state.trial_params is not None:
        return None
    folder = checkpoint_folder(args, state, create=False)
    written = os.path.isdir(folder) and not os.path.exists(os.path.join(folder, TRAINER_STATE_NAME))
    return folder if written else None


def _two_pruning_callbacks(first: str, second: str) -> ValueError:
    return ValueError(f"Two pruning callbacks in one Trainer ({first} and {second}): both would prune the model, and "
                      "every checkpoint holds one masks file. Use one; its config's target_modules / "
                      "exclude_modules choose the weights.")


def _pruning_callbacks_listed(state: TrainerState) -> list[str]:
    """The class names of the pruning callbacks `state.stateful_callbacks` lists (the Trainer's own at a fresh
    `train()`; a resumed one's are those of the run that saved the checkpoint), one entry per callback."""
    names = {cls.__name__ for cls in (MagnitudePruningCallback, *all_subclasses(MagnitudePruningCallback))}
    listed = (state.stateful_callbacks or {}).items()
    return [name for name, entry in listed if name in names
            for _ in (entry if isinstance(entry, list) else [entry])]


def pruning_callback_of(state: TrainerState) -> MagnitudePruningCallback | None:
    """The pruning callback of the Trainer whose `state` this is (the one that has claimed it), if any."""
    return getattr(state, _CLAIM, None)


def mismatch_causes(args: TrainingArguments, state: TrainerState, in_loaded_folder: bool) -> str:
    """For the error saying that a callback's file is not that of the checkpoint the Trainer loaded: what can cause
    it. `in_loaded_folder`: whether the file was found in that checkpoint's folder (the best checkpoint, or a
    `TrainingArguments.resume_from_checkpoint` folder), not only in `output_dir` (`find_checkpoint_file`)."""
    copied = ("files come from different saves (copied between checkpoints, or edited): resume from an intact "
              "checkpoint")
    if in_loaded_folder:
        return f"The checkpoint's {copied}."
    return (f"Either the checkpoint being resumed is outside output_dir ({args.output_dir}), whose "
            f"checkpoint-{state.global_step} is another run's or step's (set TrainingArguments.resume_from_checkpoint "
            f"to the checkpoint's folder, or resume in its output_dir), or the checkpoint's {copied}.")


def find_checkpoint_file(args: TrainingArguments, state: TrainerState, filename: str, written_by: str) -> str:
    """The `filename` of the checkpoint a run resumes from: in `args.resume_from_checkpoint` when it is a folder,
    else in `output_dir/checkpoint-<global_step>`.

    Raises:
        FileNotFoundError: naming the folders looked in and `written_by`, the callback that writes the file.
    """
    folders = [os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
    if isinstance(args.resume_from_checkpoint, str):
        folders.insert(0, args.resume_from_checkpoint)
    paths = [os.path.join(folder, filename) for folder in folders]
    found = next((path for path in paths if os.path.isfile(path)), None)
    if found is None:
        raise FileNotFoundError(
            f"Resuming at step {state.global_step}, but none of {paths} exists. Resume from a checkpoint written with "
            f"{written_by} (set TrainingArguments.resume_from_checkpoint to its folder if it is not under output_dir; "
            f"step {state.global_step} is what the checkpoint's {TRAINER_STATE_NAME} says)."
        )
    return found


class MagnitudePruningCallback(TrainerCallback, ExportableState):
    """Gradual pruning during `Trainer.train()`: masks follow `config.schedule`, pruned weights stay exactly 0.

    Per optimizer step: gradients of pruned weights are zeroed before the step (`on_pre_optimizer_step`),
    the weights re-masked after it (`on_optimizer_step`), and at each pruning event (`on_step_end`) the masks
    grow and the optimizer's moments are cleared at the newly pruned positions, before any log or checkpoint
    of that step. Every checkpoint gets `pruning_masks.safetensors`, and `resume_from_checkpoint` restores it
    (after checking it belongs to the checkpoint's `trainer_state.json`). With `load_best_model_at_end`, the best
    checkpoint's masks are loaded with its weights; a run that ends before the schedule does (early stopping) says
    so. Sparsity (overall and per weight class) is added to the logs.

    With `TrainingArguments(restore_callback_states_from_checkpoint=True)` the Trainer replaces this callback on a
    resume by one built from the checkpoint's `state()` (its config): take the masks from
    `PrunedModel.from_trainer(trainer)`, not from the object passed in.

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
        override_checkpoint_config (`bool`, *optional*, defaults to `False`): on `resume_from_checkpoint`, a
            checkpoint written under a config that prunes differently (another `final_sparsity`, schedule,
            criterion, targets, ...) is an error; set this to continue from its masks under `config` instead
            (with a warning). Masks never shrink: a checkpoint already sparser than the new schedule keeps its
            sparsity to the end.
    """

    #: The config class of the callback's method: a dict `config` is read as one, and the default is one.
    config_class: type[PruningConfig] = PruningConfig

    def __init__(self, config: PruningConfig | dict[str, Any] | None = None,
                 override_checkpoint_config: bool = False) -> None:
        if isinstance(config, dict):
            config = self.config_class.from_dict(config)
        if config is not None and not isinstance(config, self.config_class):
            raise ValueError(f"`config` must be a {self.config_class.__name__} (or its to_dict()); got "
                             f"{type(config).__name__} {config!r}.")
        check_bool("override_checkpoint_config", override_checkpoint_config)
        self.config = config if config is not None else self.config_class()
        self.override_checkpoint_config = override_checkpoint_config
        self.pruner: Pruner | None = None
        self._initial_state: dict[str, Any] | None = None
        self._holds_saved_masks = False  # from_pretrained without a config: the saved masks are final
        self._run_id: str | None = None  # made at each train(): ties each checkpoint's masks to its trainer_state
        self._step = 0
        self._training: tuple[TrainingArguments, TrainerState] | None = None  # from on_train_begin to on_train_end
        self._written_early: str | None = None  # the masks file state() wrote into the checkpoint being written

    @classmethod
    def from_pretrained(cls, pretrained_path: str | os.PathLike, config: PruningConfig | None = None,
                        **hub_kwargs: Any) -> MagnitudePruningCallback:
        """A callback that starts from the masks saved by `PrunedModel.save_pretrained` (a folder or a Hub repo).

        With no `config` the saved targets and scheme are kept and the sparsity is held fixed (`oneshot` at the
        saved sparsity, see `holding_config`; the save may come from any pruning callback); pass a config with a
        higher `final_sparsity` to prune further. The masks are read when
        training begins, checked against the model's targeted weights (names and shapes) before they are decoded.

        Raises:
            ValueError: when the masks file is not the one `pruning_config.json` records (a save interrupted
                between the two, or a file changed after saving).
        """
        saved = PruningConfig.from_pretrained(pretrained_path, **hub_kwargs)
        # the masks must be those of the save pruning_config.json records, not of a save interrupted after them
        config_file = resolve_file(pretrained_path, CONFIG_NAME, required=False, **hub_kwargs)
        if config_file is not None:  # else a Trainer checkpoint, whose masks file records the config
            check_saved_files(pretrained_path, config_file, hub_kwargs, only=[MASKS_NAME])
        masks_file = resolve_file(pretrained_path, MASKS_NAME, **hub_kwargs)
        metadata = read_masks_metadata(masks_file)
        target = float(metadata.get("achieved_sparsity", metadata.get("target_sparsity", saved.final_sparsity)))
        callback = cls(config if config is not None else cls.holding_config(saved, target))
        callback._initial_state = {"masks_file": masks_file, "target_sparsity": target}
        callback._holds_saved_masks = config is None
        return callback

    @classmethod
    def holding_config(cls, saved: PruningConfig, sparsity: float) -> PruningConfig:
        """The config `from_pretrained` trains under when given none: a `config_class` with `saved`'s targets,
        scheme and criterion (of a save by another method, the fields the two configs share), with nothing pruned
        beyond the saved masks (a one-shot prune at step 0 to their `sparsity`)."""
        shared = {f.name for f in dataclasses.fields(saved)} & {f.name for f in dataclasses.fields(cls.config_class)}
        return cls.config_class(**{**{name: getattr(saved, name) for name in shared}, "schedule": "oneshot",
                                   "initial_sparsity": 0.0, "final_sparsity": sparsity, "start_step": 0,
                                   "end_step": None, "pruning_frequency": None})

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name -> `torch.bool` mask (True = kept); empty before training starts."""
        return self.pruner.masks if self.pruner is not None else {}

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self._claim(state)  # a second pruning callback given to the Trainer is refused before anything runs

    def _claim(self, state: TrainerState) -> None:
        """Marks `state` (shared by the callbacks of one Trainer) as this callback's.

        Raises:
            ValueError: when another pruning callback of the same Trainer has marked it.
        """
        owner = pruning_callback_of(state)
        if owner is not None and owner is not self:
            raise _two_pruning_callbacks(type(owner).__name__, type(self).__name__)
        setattr(state, _CLAIM, self)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                       **kwargs: Any) -> None:
        if state.global_step == 0:  # a fresh run's state lists the Trainer's callbacks, those added after its
            # construction too: a second pruning callback is refused before the first one prunes at step 0
            found = _pruning_callbacks_listed(state)
            if len(found) > 1:
                raise _two_pruning_callbacks(*found[:2])
        self._claim(state)
        if self.pruner is not None:  # an earlier train() of this callback, interrupted before on_train_end
            self.pruner.remove_hooks()
        self.pruner = self.make_pruner(model, state.max_steps)
        # one id for every rank: with save_on_each_node each node's checkpoint (and its trainer_state) names it
        self._run_id, self._step = from_main_rank(uuid.uuid4().hex), state.global_step
        self._training = args, state
        if state.global_step > 0:
            self._restore_from_checkpoint(args, state)
        elif self._initial_state is not None:
            initial = dict(self._initial_state)
            masks = load_masks(initial.pop("masks_file"), self.pruner.target_shapes())
            self.pruner.load_state_dict({**initial, "masks": masks})
        self.pruner.update(state.global_step, optimizer)
        self.pruner.check_ranks_agree(state.global_step)

    @classmethod
    def check_schedule(cls, config: PruningConfig, max_steps: int) -> None:
        """Raises the `ValueError` that training would raise at its start if `config`'s schedule cannot run in
        `max_steps` optimizer steps (for scripts that check their options before loading a model)."""
        SparsitySchedule.from_config(config, max_steps)

    def prunes_after_train_begin(self) -> bool:
        """Whether a fresh `train()` with this callback can prune after `on_train_begin`: False only when the masks
        are final once training begins (`schedule="oneshot"` at `start_step=0`, or saved masks that
        `from_pretrained` holds fixed). What a callback that needs final masks from the start
        (`QuantizationCallback`) checks up front."""
        return not (self._holds_saved_masks or (self.config.schedule == "oneshot" and self.config.start_step == 0))

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
        self._step = state.global_step
        if self.pruner.update(state.global_step, optimizer):
            self.pruner.check_ranks_agree(state.global_step)
            logger.info("Step %d: pruned to %.4f sparsity (%s).", state.global_step, self.pruner.target_sparsity,
                        ", ".join(f"{k}={v:.4g}" for k, v in self.pruner.thresholds.items()))

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self.pruner is None or logs is None:
            return
        add_to_logs(logs, state, self.log_entries(state))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if self.pruner is None:
            return
        if self._written_early is not None:  # state() wrote this checkpoint's masks already (replicated weights)
            written, self._written_early = self._written_early, None
            if written == os.path.join(checkpoint_folder(args, state, create=False), MASKS_NAME):
                return
        pruner_state = self.pruner.state_dict()  # collective when the weights are sharded
        if args.should_save:  # where the Trainer writes the checkpoint: world rank 0, or each node's first
            self._save_masks(os.path.join(checkpoint_folder(args, state), MASKS_NAME), pruner_state, state)

    def on_push_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        # With push_to_hub the Trainer uploads a checkpoint before on_save: the masks go in first (main process
        # only, so only where they need no collective), and a Hub checkpoint resumes like a local one. It uploads
        # output_dir too (the model alone: `PrunedModel.push_to_hub` uploads it with its masks), without what a
        # killed write left there.
        if self.pruner is None or type(self.pruner.layout) is not Replicated or not state.is_world_process_zero:
            return
        if os.path.isdir(args.output_dir):
            remove_temporaries(args.output_dir)
        folder = checkpoint_being_pushed(args, state, MASKS_NAME)
        if folder is not None:
            self._save_masks(os.path.join(folder, MASKS_NAME), self.pruner.state_dict(), state)

    def _save_masks(self, path: str, pruner_state: dict[str, Any], state: TrainerState) -> None:
        masks = pruner_state.pop("masks")
        save_masks(masks, path, {"global_step": state.global_step, **pruner_state,
                                 "pruning_config": self.config.to_dict(),
                                 "schedule": self.pruner.resolved_schedule(), "masks_id": self._masks_id()})

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.pruner is None:
            return
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best is not None:  # the Trainer has loaded that checkpoint's weights
            path = os.path.join(best, MASKS_NAME)
            if os.path.isfile(path):
                self._load_masks_file(path, read_masks_metadata(path))
                logger.info("Loaded the masks of the best checkpoint %s with its weights (sparsity %.4f).", best,
                            self.pruner.target_sparsity)
            elif is_main_rank():
                logger.warning("The best checkpoint %s has no %s: the masks are the last step's, not those of the "
                               "weights the Trainer loaded from it.", best, MASKS_NAME)
        final = self.pruner.schedule.final
        if self.pruner.target_sparsity < final and is_main_rank():
            loaded = f" (the best checkpoint, {best}, was loaded)" if args.load_best_model_at_end and best else ""
            logger.warning("Training ended at step %d with the masks at sparsity %.4f, below the schedule's "
                           "final_sparsity %s%s: the pruning schedule did not finish (early stopping, or a "
                           "checkpoint from before its end).", state.global_step, self.pruner.target_sparsity,
                           final, loaded)
        self._training = self._written_early = None
        # The masks stay (for `PrunedModel.from_trainer`); the gradient hooks go, or any later training of this model,
        # by a Trainer without this callback or a loop of the user's, would silently keep the pruned weights at 0.
        self.pruner.remove_hooks()

    def state(self) -> dict[str, Any]:
        state = {"args": {"config": self.config.to_dict(),
                          "override_checkpoint_config": self.override_checkpoint_config}, "attributes": {}}
        if self._run_id is None:
            return state
        self._save_masks_into_checkpoint_being_written()
        return {**state, "masks_id": self._masks_id()}

    def _save_masks_into_checkpoint_being_written(self) -> None:
        """Writes the masks into the checkpoint the Trainer is writing (see `checkpoint_being_written`); `on_save`
        then has nothing to write. Replicated weights only (sharded ones need every rank, and only the saving ones
        are here)."""
        if self._training is None or self.pruner is None or type(self.pruner.layout) is not Replicated:
            return
        folder = checkpoint_being_written(*self._training)
        if folder is not None:
            self._written_early = os.path.join(folder, MASKS_NAME)
            self._save_masks(self._written_early, self.pruner.state_dict(), self._training[1])

    def _masks_id(self) -> str:
        """Names the masks of the current step of this `train()`: written both into the checkpoint's masks file
        (`on_save`) and, through `state()`, into its `trainer_state.json`, so a resume can tell they belong."""
        return f"{self._run_id}-{self._step}"

    def _load_masks_file(self, path: str, metadata: dict[str, Any]) -> None:
        """Loads the pruner's state from a masks file written by `on_save` (`metadata`: its metadata)."""
        pruner_state = {key: value for key, value in metadata.items()
                        if key not in ("pruning_config", "schedule", "masks_id")}
        self.pruner.load_state_dict({**pruner_state, "masks": load_masks(path, self.pruner.target_shapes())})

    def _restore_from_checkpoint(self, args: TrainingArguments, state: TrainerState) -> None:
        """Loads the pruner's state from the masks file of the checkpoint being resumed (see `on_save`), after
        checking that the file is that checkpoint's and was written under the same config."""
        path = find_checkpoint_file(args, state, MASKS_NAME, type(self).__name__)
        metadata = read_masks_metadata(path)
        saved_state = (state.stateful_callbacks or {}).get(type(self).__name__)
        expected = saved_state.get("masks_id") if isinstance(saved_state, dict) else None
        if expected is not None and metadata.get("masks_id") != expected:
            raise ValueError(
                f"{path} holds the masks of another checkpoint than the one being resumed (its trainer_state.json, "
                f"of step {state.global_step}, names masks {expected!r}; the file holds {metadata.get('masks_id')!r}, "
                f"of step {metadata.get('global_step')}). "
                f"{mismatch_causes(args, state, isinstance(args.resume_from_checkpoint, str))}")
        changes = self._check_checkpoint_config(metadata.get("pruning_config"), metadata.get("schedule"), path)
        self._load_masks_file(path, metadata)
        logger.info("Restored pruning masks from %s (sparsity %.4f).", path, self.pruner.sparsity())
        step, window = state.global_step, self.pruner.config.fisher_steps
        gathers = self.pruner.criterion.needs_gradients or self.pruner.criterion.needs_inputs
        if gathers and window > 1 and self.pruner.schedule(step + window - 1) > self.pruner.target_sparsity \
                and is_main_rank():
            logger.warning("Resuming at step %d inside the %d-step window of statistics of the next pruning event "
                           "(criterion %r): statistics are not checkpointed, so that event ranks by the steps after "
                           "the resume only.", step, window, self.pruner.config.criterion)
        if changes and state.is_world_process_zero:
            reached, final = self.pruner.target_sparsity, self.config.final_sparsity
            kept = (f" Masks never shrink: the run ends at the checkpoint's sparsity, above the new final_sparsity "
                    f"{final}.") if reached > final else ""
            logger.warning("Resuming from %s under a config that prunes differently (%s), as "
                           "override_checkpoint_config=True: the masks continue from the checkpoint's (sparsity "
                           "%.4f) under the new config.%s", path, changes, reached, kept)

    def _check_checkpoint_config(self, saved: dict[str, Any] | None, saved_schedule: dict[str, Any] | None,
                                 path: str) -> str:
        """Raises `ValueError` when the checkpoint's masks were made under a config that prunes differently, or
        whose schedule resolved differently (defaults derived from another `max_steps`), unless
        `override_checkpoint_config`; returns the differences (`""` for none, or a checkpoint without a config)."""
        if saved is None:
            return ""
        if "structure" in saved:  # as the config spells it now (a checkpoint may hold ["neurons"] for "neurons")
            saved = {**saved, "structure": canonical_structure(saved["structure"])}
        current = self.config.to_dict()
        changed = sorted(key for key in saved.keys() | current.keys()
                         if key not in _FIELDS_THAT_KEEP_MASKS and saved.get(key) != current.get(key))
        details = "; ".join(f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}" for key in changed)
        schedule = self.pruner.resolved_schedule()
        if not changed and saved_schedule is not None:  # a checkpoint of an older hf_prune may lack some keys
            changed = [key for key in schedule if key in saved_schedule and saved_schedule[key] != schedule[key]]
            if changed:
                details = ("the schedule its defaults resolve to (the run's max_steps changed?): " + "; ".join(
                    f"{key}: checkpoint {saved_schedule[key]!r}, now {schedule[key]!r}" for key in changed))
        if changed and not self.override_checkpoint_config:
            raise ValueError(f"The checkpoint {path} was pruned under another config ({details}). Resume with the "
                             f"checkpoint's config, or pass override_checkpoint_config=True to "
                             f"{type(self).__name__} (--override_checkpoint_config in the example scripts) to "
                             "continue from its masks under the new one.")
        return details
