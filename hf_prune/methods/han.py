"""Han et al. 2015, "Learning both Weights and Connections for Efficient Neural Networks": iterative pruning at
`quality × σ` per layer (`HanConfig`, `HanPruner`, `HanPruningCallback`), each event followed by retraining with
the masks fixed and, by default, the dropout adjustment of `hf_prune.methods.dropout`. The L1/L2 regularisation
of the paper's first phase is `RegularizationCallback` (`hf_prune.methods.regularization`), and See et al.
2016's retraining schedule is in `hf_prune.methods.retraining`.

```python
from hf_prune import HanConfig, HanPruningCallback, RegularizationCallback

config = HanConfig(quality=[0.5, 0.7, 0.9], start_step=1000, pruning_frequency=1000)
callbacks = [RegularizationCallback("l2", strength=1e-5, config=config), HanPruningCallback(config)]
trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks)
trainer.train()   # dense training, then prune / retrain three times; the logs carry the resulting sparsity
```
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import TrainerState

from ..callbacks import MagnitudePruningCallback
from ..config import PruningConfig
from ..distributed import is_main_rank, refuse_sharded
from ..pruner import Pruner
from ..schedules import check_fits
from ..validation import check_bool, check_choice, check_int, is_finite_number
from .dropout import apply_dropout_adjustment, dropout_ratios, unadjusted_dropouts


logger = logging.getLogger(__name__)


#: Pruning events of a `HanConfig` whose `iterations` is None and whose `quality` is a single number.
DEFAULT_ITERATIONS = 3


@dataclass
class HanConfig(PruningConfig):
    """Configuration of Han et al.'s iterative pruning; the targeting fields of `PruningConfig` keep their meaning.

    Pruning events happen at steps `start_step + k · pruning_frequency`, `k = 0 … iterations - 1` (counted like
    `TrainerState.global_step`: step 0 is before any training), each followed by retraining with the masks
    fixed. Event `k` prunes, in each targeted layer (weight matrix) separately, the kept weights with
    `|w| < quality_k · σ`, where σ is the standard deviation of the weights that layer still keeps at that event
    (see `prune_below_std_`). The resulting sparsity is logged, not targeted: `initial_sparsity`,
    `final_sparsity`, `end_step` and `scheme` are not used (`schedule` stays `"oneshot"`, so the config read as a
    plain `PruningConfig` holds the saved masks fixed), and `criterion` must be `"magnitude"`.

    Args:
        quality (`float` or `list[float]`, *optional*, defaults to `0.5`):
            The quality parameter (> 0): one number for every event, or one per event.
        iterations (`int`, *optional*):
            Number of pruning events; defaults to `len(quality)` for a list (and must equal it if set) and to
            `DEFAULT_ITERATIONS` (3) for a number.
        pruning_frequency (`int`, *optional*):
            Optimizer steps of retraining between two events. Defaults to `(max_steps - start_step) // iterations`
            of the Trainer run, so the last event leaves one interval of retraining.
        adjust_dropout (`bool`, *optional*, defaults to `True`):
            After each event (and when masks are loaded), set the model's dropouts to `D_o · √(C_r / C_o)`
            (`apply_dropout_adjustment`).
    """

    schedule: str = field(default="oneshot", metadata={"help": "Not used by HanPruner; must stay 'oneshot'."})
    final_sparsity: float = field(default=0.0, metadata={"help": "Not used by HanPruner (sparsity is a result)."})
    quality: float | list[float] = field(default=0.5, metadata={"help": "Quality parameter(s) > 0, per event."})
    iterations: int | None = field(default=None, metadata={"help": "Number of pruning events (>= 1)."})
    adjust_dropout: bool = field(default=True, metadata={"help": "Scale dropout by sqrt(C_r / C_o) per layer."})
    callback_name: ClassVar[str] = "HanPruningCallback"

    list_fields = (*PruningConfig.list_fields, "quality")

    def _check_oneshot_fields(self) -> None:
        """Han's events are set by `iterations` and `pruning_frequency`; `initial_sparsity` and `end_step` unused."""
        if self.initial_sparsity != 0.0:
            raise ValueError(f"`initial_sparsity` must be 0.0 for HanConfig (the sparsity is set by `quality`); "
                             f"got {self.initial_sparsity!r}.")
        if self.end_step is not None:
            raise ValueError(f"`end_step` must be None for HanConfig (events are set by `iterations` and "
                             f"`pruning_frequency`); got {self.end_step!r}.")

    def validate(self) -> None:
        """`PruningConfig.validate()`, then the Han fields; raises `ValueError` naming field, value and range."""
        super().validate()
        check_choice("schedule", self.schedule, ("oneshot",))
        check_choice("criterion", self.criterion, ("magnitude",))
        if self.structures():
            raise ValueError(f"`structure` must be 'unstructured' for HanConfig (Han et al. prune single weights below "
                             f"quality x std); got {self.structure!r}. For neurons or heads use PruningConfig with "
                             "MagnitudePruningCallback.")
        qualities = self.quality if isinstance(self.quality, list) else [self.quality]
        if not qualities or not all(is_finite_number(q) and q > 0 for q in qualities):
            raise ValueError(f"`quality` must be a finite number > 0 or a non-empty list of them; "
                             f"got {self.quality!r}.")
        check_int("iterations", self.iterations, 1, optional=True)
        if isinstance(self.quality, list) and self.iterations not in (None, len(self.quality)):
            raise ValueError(f"`iterations` ({self.iterations}) must equal the number of qualities in `quality` "
                             f"({len(self.quality)}), or be None.")
        check_bool("adjust_dropout", self.adjust_dropout)

    def prepare_loaded_model(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        """Re-applies the dropout adjustment to a loaded model (with `adjust_dropout`)."""
        if self.adjust_dropout:
            apply_dropout_adjustment(model, masks)

    def qualities(self) -> list[float]:
        """The quality of each pruning event, in order."""
        if isinstance(self.quality, list):
            return [float(q) for q in self.quality]
        return [float(self.quality)] * (self.iterations or DEFAULT_ITERATIONS)


def event_steps(config: HanConfig, max_steps: int | None = None) -> tuple[int, ...]:
    """The steps of the pruning events of `config`, with the `pruning_frequency` default resolved.

    Raises:
        ValueError: when `pruning_frequency` is None without a `max_steps` to derive it from, or the events do not
            fit in `max_steps`.
    """
    count = len(config.qualities())
    frequency = config.pruning_frequency
    if frequency is None:
        if max_steps is None or max_steps <= 0:
            raise ValueError("`pruning_frequency` is None and there is no Trainer `max_steps` to derive it from; "
                             "set `pruning_frequency`.")
        frequency = (max_steps - config.start_step) // count
        if frequency < 1:
            raise ValueError(f"`start_step` ({config.start_step}) leaves no room for {count} iterations within "
                             f"max_steps ({max_steps}); lower `start_step` or `iterations`.")
    steps = tuple(config.start_step + k * frequency for k in range(count))
    check_fits(steps[-1], max_steps, f"the last of the {count} pruning events is at step {steps[-1]} = start_step + "
                                     "(iterations - 1) * pruning_frequency")
    return steps


@torch.no_grad()
def prune_below_std_(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                     quality: float) -> dict[str, float]:
    """In each layer, prunes the kept weights with `|w| < quality · σ`, σ = std (unbiased, float64) of the weights
    the layer keeps before this call; updates `masks` in place and returns `{"threshold/<name>": threshold}`.

    σ is that of the kept weights at each event, not of all weights at the first one (Distiller's fixed σ):
    removing the smallest weights raises the σ of the survivors, so the threshold grows from one event to the next
    even at a constant quality, as the threshold of Han's iterations does, and every event depends only on the
    current weights and masks (a resumed run needs nothing but the masks). Masks only lose entries; a layer with
    fewer than two kept weights is left as it is.
    """
    thresholds = {}
    for name, weight in weights.items():
        kept = weight.detach()[masks[name]].double()
        threshold = quality * float(kept.std()) if kept.numel() > 1 else 0.0
        masks[name].logical_and_(weight.detach().abs() >= threshold)
        thresholds[f"threshold/{name}"] = threshold
    return thresholds


class HanPruner(Pruner):
    """A `Pruner` whose events are Han et al.'s: at each step of `event_steps`, `prune_below_std_` with that
    event's quality, then the pruned weights are zeroed, the optimizer moments there cleared and (with
    `config.adjust_dropout`) the dropouts adjusted to the new connection counts.

    In a custom training loop, use it as a `Pruner` (`update(step, optimizer)` after each optimizer step);
    `state_dict()` also holds the number of events done.

    Args:
        model (`nn.Module`): the model to prune.
        config (`HanConfig`): targets, qualities and event steps.
        max_steps (`int`, *optional*): the run's number of optimizer steps, for the `pruning_frequency` default.
    """

    def __init__(self, model: nn.Module, config: HanConfig, max_steps: int | None = None) -> None:
        super().__init__(model, config, max_steps)
        refuse_sharded(self.params.values(), "HanPruner")
        self.events = event_steps(config, max_steps)
        if config.adjust_dropout:  # a model whose dropouts it cannot adjust is refused before any event
            dropout_ratios(self.module, {})
            unadjusted = unadjusted_dropouts(self.module)
            if unadjusted and is_main_rank():
                logger.warning("adjust_dropout: %s has no layer whose dropout hf_prune adjusts (BERT, GPT-2 and T5 "
                               "layers: see hf_prune.methods.dropout.DROPOUT_RULES), so its dropouts (%s) stay as "
                               "they are while it is pruned. Set HanConfig(adjust_dropout=False) to say so.",
                               type(self.module).__name__,
                               ", ".join(f"{key}={value}" for key, value in unadjusted.items()))
        self.iteration = 0
        self.dropout: dict[str, float] = {}

    def events_until(self, step: int) -> int:
        """How many pruning events happen at or before `step`."""
        return sum(event <= step for event in self.events)

    def update(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Runs every event due at `step` that has not run yet, in order; returns whether any did."""
        due = self.events_until(step)
        if due <= self.iteration:
            return False
        for iteration in range(self.iteration, due):
            self.thresholds = prune_below_std_(self.params, self.masks, self.config.qualities()[iteration])
        self.iteration = due
        self.target_sparsity = self.sparsity()
        self.apply_()
        if optimizer is not None:
            self.mask_optimizer_state_(optimizer)
        self.adjust_dropout_()
        return True

    def adjust_dropout_(self) -> None:
        """`apply_dropout_adjustment` to the current masks, if `config.adjust_dropout`."""
        if self.config.adjust_dropout:
            self.dropout = apply_dropout_adjustment(self.module, self.masks)

    def load_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        super().load_masks(masks)
        self.adjust_dropout_()

    def resolved_schedule(self) -> dict[str, Any]:
        return {"events": list(self.events)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "iteration": self.iteration}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """`Pruner.load_state_dict`, plus the number of events done; a state without it (saved masks to start
        from, or a checkpoint of an older hf_prune) counts the events up to its `global_step`, if any, as done."""
        super().load_state_dict(state)
        self.iteration = int(state.get("iteration", self.events_until(int(state.get("global_step", -1)))))


class HanPruningCallback(MagnitudePruningCallback):
    """Han et al.'s prune-retrain iterations during `Trainer.train()`: `HanPruner` events at the steps of
    `event_steps(config, max_steps)`, with the masking, optimizer-moment clearing, checkpointing and resuming of
    `MagnitudePruningCallback`. The sparsity is a result: it is logged (overall and per class) with `han_iteration`
    (events done) and `han_quality` (quality of the latest event, 0 before the first). On resume, the masks are
    read from the checkpoint, the dropouts re-adjusted to them, and the events at or before the checkpoint's step
    count as done.

    ```python
    callback = HanPruningCallback(HanConfig(quality=0.7, iterations=3, pruning_frequency=2000))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    ```

    Args:
        config (`HanConfig` or `dict`, *optional*): the configuration (a dict is `HanConfig.to_dict()` output).
            Defaults to `HanConfig()`.
    """

    config_class = HanConfig

    @classmethod
    def from_pretrained(cls, pretrained_path: str | os.PathLike, config: HanConfig | None = None,
                        **hub_kwargs: Any) -> HanPruningCallback:
        """A callback that starts from the masks `PrunedModel.save_pretrained` saved after Han pruning.

        With no `config` the masks are held fixed: every event of the saved config counts as done (none runs),
        and the dropouts are adjusted to the masks (with `adjust_dropout`). Pass a `HanConfig` to run its events
        from the saved masks.
        """
        callback = super().from_pretrained(pretrained_path, config, **hub_kwargs)
        if callback._holds_saved_masks:
            callback._initial_state["iteration"] = len(callback.config.qualities())
        return callback

    @classmethod
    def holding_config(cls, saved: HanConfig, sparsity: float) -> HanConfig:
        """`saved`'s qualities with every event at a step of its own from 0 (`pruning_frequency=1`), so that no
        Trainer `max_steps` is needed to place them; `from_pretrained` counts them all as done."""
        return replace(super().holding_config(saved, sparsity), pruning_frequency=1)

    @classmethod
    def check_schedule(cls, config: HanConfig, max_steps: int) -> None:
        """Raises the `ValueError` training would raise at its start if `config`'s events do not fit `max_steps`."""
        event_steps(config, max_steps)

    def prunes_after_train_begin(self) -> bool:
        return not (self._holds_saved_masks or (len(self.config.qualities()) == 1 and self.config.start_step == 0))

    def make_pruner(self, model: nn.Module, max_steps: int | None) -> Pruner:
        # held masks: the events are all done, wherever max_steps would put them
        return HanPruner(model, self.config, max_steps=None if self._holds_saved_masks else max_steps)

    def log_entries(self, state: TrainerState) -> dict[str, float]:
        iteration = self.pruner.iteration
        quality = self.config.qualities()[iteration - 1] if iteration else 0.0
        return {**super().log_entries(state), "han_iteration": iteration, "han_quality": quality}
