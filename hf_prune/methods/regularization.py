"""L1 / L2 regularisation of the targeted weights through their gradients (Han et al. 2015, Section 3.1)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..callbacks import add_to_logs
from ..config import PruningConfig
from ..distributed import refuse_sharded
from ..structured.units import pruned_targets
from ..targets import named_weights
from ..validation import check_choice, check_number


PENALTIES = ("l1", "l2")


@torch.no_grad()
def add_penalty_gradient_(params: Mapping[str, torch.Tensor], penalty: str, strength: float) -> None:
    """Adds the gradient of `strength · Σ|w|` (`"l1"`: `strength · sign(w)`) or of `strength · Σw²` (`"l2"`:
    `2 · strength · w`) to the `.grad` of each parameter in `params`, in place; parameters without a gradient
    (frozen) are skipped. A weight that is exactly 0 gets 0 from both penalties."""
    for param in params.values():
        if param.grad is None:
            continue
        if penalty == "l1":
            param.grad.add_(param.sign(), alpha=strength)
        else:
            param.grad.add_(param, alpha=2.0 * strength)


@torch.no_grad()
def penalty_value(params: Mapping[str, torch.Tensor], penalty: str, strength: float) -> float:
    """`strength · Σ|w|` (`"l1"`) or `strength · Σw²` (`"l2"`) over `params`, accumulated in float64."""
    norm = 1 if penalty == "l1" else 2
    return strength * sum(float(torch.linalg.vector_norm(p.detach(), norm, dtype=torch.float64)) ** norm
                          for p in params.values())


class RegularizationCallback(TrainerCallback):
    """L1 or L2 regularisation of the targeted weights (Han et al. 2015, Section 3.1) during `Trainer.train()`.

    Before each optimizer step (`on_pre_optimizer_step`) the gradient of the penalty, `λ·sign(w)` for L1 or `2λ·w`
    for L2, is added to the gradients of the targeted weights (those pruning under `config` masks; pass the
    pruning callback's config to regularise the weights it prunes). The logs get `<penalty>_strength` (λ) and
    `<penalty>_penalty` (its value `λ·Σ|w|` or `λ·Σw²` at logging time).

    Why through the gradients and not the loss: a callback has no access to the loss, only to the model, its
    gradients and the optimizer. For SGD this is exactly the same update as adding the penalty to the loss. For
    Adam(W) the penalty gradient goes through the adaptive normalisation like the task gradient: this is
    L2-regularisation-through-the-gradient (Adam with `L2`), not the decoupled weight decay of AdamW (Loshchilov &
    Hutter 2019, which `TrainingArguments.weight_decay` applies to all weights). The Trainer computes (and
    clips) the gradient norm before this event, so the gradients are already unscaled under fp16 and the penalty
    gradient itself is never clipped.

    With a pruning callback (`MagnitudePruningCallback` or a subclass) in the same Trainer, in either order,
    pruned weights stay pruned: they are exactly 0 at this point (re-masked after every step), and the gradient
    of both penalties at 0 is 0 (`sign(0) = 0`, `2λ·0 = 0`), so nothing is added at the pruned positions, before
    or after the pruning callback zeroes their gradients.

    ```python
    config = PruningConfig(final_sparsity=0.8, schedule="iterative", pruning_frequency=500)
    callbacks = [RegularizationCallback("l1", strength=1e-6, config=config), MagnitudePruningCallback(config)]
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks)
    ```

    Args:
        penalty (`str`, *optional*, defaults to `"l2"`): `"l1"` (`λ·Σ|w|`) or `"l2"` (`λ·Σw²`).
        strength (`float`, *optional*, defaults to `1e-5`): λ ≥ 0.
        config (`PruningConfig` or `dict`, *optional*): which weights are regularised (`target_modules`,
            `exclude_modules`, `prune_head`, `structure`); defaults to `PruningConfig()`'s targets.
    """

    def __init__(self, penalty: str = "l2", strength: float = 1e-5, config: PruningConfig | None = None) -> None:
        check_choice("penalty", penalty, PENALTIES)
        check_number("strength", strength, 0.0)
        if isinstance(config, dict):
            config = PruningConfig.from_dict(config)
        if config is not None and not isinstance(config, PruningConfig):
            raise ValueError(f"`config` must be a PruningConfig (or its to_dict()) or None; got "
                             f"{type(config).__name__} {config!r}.")
        self.penalty = penalty
        self.strength = float(strength)
        self.config = config if config is not None else PruningConfig()
        self.params: dict[str, nn.Parameter] = {}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        model = extract_model_from_parallel(model)
        params = named_weights(model)
        self.params = {t.name: params[t.name] for t in pruned_targets(model, self.config)}
        refuse_sharded(self.params.values(), "RegularizationCallback")

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        add_penalty_gradient_(self.params, self.penalty, self.strength)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not self.params or logs is None:
            return
        entries = {f"{self.penalty}_strength": self.strength,
                   f"{self.penalty}_penalty": penalty_value(self.params, self.penalty, self.strength)}
        add_to_logs(logs, state, entries)
