"""Han et al. 2015, "Learning both Weights and Connections for Efficient Neural Networks", with See et al. 2016's
retraining recipe: L1/L2 regularisation of the targeted weights (`RegularizationCallback`), iterative pruning at
`quality × σ` per layer (`HanConfig`, `HanPruner`, `HanPruningCallback`), the dropout ratio adjustment of the
retraining phases (`apply_dropout_adjustment`) and a learning-rate schedule for retraining
(`get_see_retraining_schedule`, `see_retraining_arguments`).

```python
from hf_prune.han import HanConfig, HanPruningCallback, RegularizationCallback

config = HanConfig(quality=[0.5, 0.7, 0.9], start_step=1000, pruning_frequency=1000)
callbacks = [RegularizationCallback("l2", strength=1e-5, config=config), HanPruningCallback(config)]
trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks)
trainer.train()   # dense training, then prune / retrain three times; the logs carry the resulting sparsity
```
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .callbacks import MagnitudePruningCallback
from .config import PruningConfig, check_choice, is_finite_number
from .distributed import refuse_sharded
from .pruner import Pruner
from .targets import find_targets


PENALTIES = ("l1", "l2")
#: Pruning events of a `HanConfig` whose `iterations` is None and whose `quality` is a single number.
DEFAULT_ITERATIONS = 3


# ------------------------------------------------------------------------------------------- regularisation
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
    for L2, is added to the gradients of the targeted weights (those `find_targets(model, config)` selects; pass
    the pruning callback's config to regularise the weights it prunes). The logs get `<penalty>_strength` (λ) and
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
        config (`PruningConfig`, *optional*): which weights are regularised (`target_modules`,
            `exclude_modules`, `prune_head`); defaults to `PruningConfig()`'s targets.
    """

    def __init__(self, penalty: str = "l2", strength: float = 1e-5, config: PruningConfig | None = None) -> None:
        check_choice("penalty", penalty, PENALTIES)
        if not is_finite_number(strength) or strength < 0:
            raise ValueError(f"`strength` must be a finite number >= 0; got {strength!r}.")
        self.penalty = penalty
        self.strength = float(strength)
        self.config = config if config is not None else PruningConfig()
        self.params: dict[str, nn.Parameter] = {}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        model = extract_model_from_parallel(model)
        params = dict(model.named_parameters())
        self.params = {t.name: params[t.name] for t in find_targets(model, self.config)}
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
        logs.update(entries)
        if state.log_history:
            state.log_history[-1].update(entries)


# ---------------------------------------------------------------------------------------- dropout adjustment
class DropoutRule(NamedTuple):
    """A dropout of a module class: its attribute (an `nn.Dropout`, or a float passed to the attention function),
    the sub-modules whose remaining connections drive it, and the `model.config` key holding its original ratio."""

    attribute: str
    drivers: tuple[str, ...]
    config_key: str


#: Module class name -> its dropouts. See `apply_dropout_adjustment` for the table and the rationale.
DROPOUT_RULES: dict[str, tuple[DropoutRule, ...]] = {
    "BertSelfAttention": (DropoutRule("dropout", ("query", "key"), "attention_probs_dropout_prob"),),
    "BertCrossAttention": (DropoutRule("dropout", ("query", "key"), "attention_probs_dropout_prob"),),
    "BertSelfOutput": (DropoutRule("dropout", ("dense",), "hidden_dropout_prob"),),
    "BertOutput": (DropoutRule("dropout", ("dense",), "hidden_dropout_prob"),),
    "GPT2Attention": (DropoutRule("attn_dropout", ("c_attn",), "attn_pdrop"),
                      DropoutRule("resid_dropout", ("c_proj",), "resid_pdrop")),
    "GPT2MLP": (DropoutRule("dropout", ("c_proj",), "resid_pdrop"),),
    "T5Attention": (DropoutRule("dropout", ("q", "k"), "dropout_rate"),),
    "T5LayerSelfAttention": (DropoutRule("dropout", ("SelfAttention.o",), "dropout_rate"),),
    "T5LayerCrossAttention": (DropoutRule("dropout", ("EncDecAttention.o",), "dropout_rate"),),
    "T5LayerFF": (DropoutRule("dropout", ("DenseReluDense.wo",), "dropout_rate"),),
    "T5DenseActDense": (DropoutRule("dropout", ("wi",), "dropout_rate"),),
    "T5DenseGatedActDense": (DropoutRule("dropout", ("wi_0", "wi_1"), "dropout_rate"),),
}


@torch.no_grad()
def apply_dropout_adjustment(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Sets each known dropout of `model` to `D_r = D_o · √(C_r / C_o)` (Han et al. 2015, Eq. 2); returns the
    new ratio of each, keyed `"<module name>.<attribute>"`.

    `C_o` is the number of connections (weight entries) of the layers driving the dropout and `C_r` how many of
    them `masks` keeps; weights without a mask count as dense, so with no pruning every ratio is `D_o`. `D_o` is
    read from `model.config`, which this never changes: the result depends only on the model's config and the
    masks, so the adjustment is reproducible and can be re-applied after loading (`PrunedModel.from_pretrained`).
    Each dropout is driven by the layer(s) whose output it drops (as Han's dropout after a fully connected layer):

    | module class | dropout | driven by (remaining connections of) | `D_o` (`model.config`) |
    |---|---|---|---|
    | `Bert{Self,Cross}Attention` | `dropout` (attention probs) | `query` + `key` | `attention_probs_dropout_prob` |
    | `BertSelfOutput` | `dropout` | `dense` | `hidden_dropout_prob` |
    | `BertOutput` | `dropout` | `dense` | `hidden_dropout_prob` |
    | `GPT2Attention` | `attn_dropout` (attention probs) | `c_attn` (fused q, k, v) | `attn_pdrop` |
    | `GPT2Attention` | `resid_dropout` | `c_proj` | `resid_pdrop` |
    | `GPT2MLP` | `dropout` | `c_proj` | `resid_pdrop` |
    | `T5Attention` | `dropout` (a float: attention probs) | `q` + `k` | `dropout_rate` |
    | `T5LayerSelfAttention` | `dropout` | `SelfAttention.o` | `dropout_rate` |
    | `T5LayerCrossAttention` | `dropout` | `EncDecAttention.o` | `dropout_rate` |
    | `T5LayerFF` | `dropout` | `DenseReluDense.wo` | `dropout_rate` |
    | `T5DenseActDense` | `dropout` (between `wi` and `wo`) | `wi` | `dropout_rate` |
    | `T5DenseGatedActDense` | `dropout` (between `wi_*` and `wo`) | `wi_0` + `wi_1` | `dropout_rate` |

    The attention-probs dropouts of BERT and GPT-2 are `nn.Dropout` modules whose `p` transformers v5 passes to
    the attention function (eager or SDPA); T5's is a float attribute, set as such. Other dropouts (embeddings,
    classifier heads) and other architectures are left alone (`DROPOUT_RULES` lists what is adjusted).

    Args:
        model (`nn.Module`): the transformers model (not a `PrunedModel`: `masks` are keyed by its own
            parameter names, as `Pruner.masks` are).
        masks (`dict[str, torch.Tensor]`): parameter name -> `torch.bool` mask (True = kept).

    Raises:
        ValueError: when a mask names a parameter `model` does not have.
    """
    params = dict(model.named_parameters())
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ValueError(f"Masks name weights that {type(model).__name__} does not have: {unknown[:6]}.")
    kept_by_weight = {id(params[name]): int(mask.sum()) for name, mask in masks.items()}
    ratios = {}
    for name, module in model.named_modules():
        for rule in DROPOUT_RULES.get(type(module).__name__, ()):
            weights = [module.get_submodule(driver).weight for driver in rule.drivers]
            original = sum(w.numel() for w in weights)
            remaining = sum(kept_by_weight.get(id(w), w.numel()) for w in weights)
            ratio = float(getattr(model.config, rule.config_key)) * math.sqrt(remaining / original)
            dropout = getattr(module, rule.attribute)
            if isinstance(dropout, nn.Dropout):
                dropout.p = ratio
            else:
                setattr(module, rule.attribute, ratio)
            ratios[f"{name}.{rule.attribute}"] = ratio
    return ratios


# -------------------------------------------------------------------------------------- quality × σ pruning
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

    def __post_init__(self) -> None:
        if isinstance(self.quality, tuple):
            self.quality = list(self.quality)
        super().__post_init__()

    def validate(self) -> None:
        """`PruningConfig.validate()`, then the Han fields; raises `ValueError` naming field, value and range."""
        super().validate()
        check_choice("schedule", self.schedule, ("oneshot",))
        check_choice("criterion", self.criterion, ("magnitude",))
        if self.initial_sparsity != 0.0:
            raise ValueError(f"`initial_sparsity` must be 0.0 for HanConfig (the sparsity is set by `quality`); "
                             f"got {self.initial_sparsity!r}.")
        if self.end_step is not None:
            raise ValueError(f"`end_step` must be None for HanConfig (events are set by `iterations` and "
                             f"`pruning_frequency`); got {self.end_step!r}.")
        qualities = self.quality if isinstance(self.quality, list) else [self.quality]
        if not qualities or not all(is_finite_number(q) and q > 0 for q in qualities):
            raise ValueError(f"`quality` must be a finite number > 0 or a non-empty list of them; "
                             f"got {self.quality!r}.")
        if self.iterations is not None and (isinstance(self.iterations, bool) or not isinstance(self.iterations, int)
                                            or self.iterations < 1):
            raise ValueError(f"`iterations` must be an integer >= 1; got {self.iterations!r}.")
        if isinstance(self.quality, list) and self.iterations not in (None, len(self.quality)):
            raise ValueError(f"`iterations` ({self.iterations}) must equal the number of qualities in `quality` "
                             f"({len(self.quality)}), or be None.")
        if not isinstance(self.adjust_dropout, bool):
            raise ValueError(f"`adjust_dropout` must be True or False; got {self.adjust_dropout!r}.")

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
    if max_steps is not None and max_steps > 0 and steps[-1] > max_steps:
        raise ValueError(f"The {count} pruning events cannot happen inside max_steps ({max_steps}): the last is at "
                         f"step {steps[-1]} = start_step + (iterations - 1) * pruning_frequency; accepted: "
                         f"<= max_steps.")
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

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "iteration": self.iteration}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.iteration = int(state["iteration"])


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

    def __init__(self, config: HanConfig | dict[str, Any] | None = None) -> None:
        super().__init__(config if config is not None else HanConfig())
        if not isinstance(self.config, HanConfig):
            raise ValueError(f"`config` must be a HanConfig (or its to_dict()); got {type(self.config).__name__}.")

    def make_pruner(self, model: nn.Module, max_steps: int | None) -> Pruner:
        return HanPruner(model, self.config, max_steps=max_steps)

    def log_entries(self, state: TrainerState) -> dict[str, float]:
        iteration = self.pruner.iteration
        quality = self.config.qualities()[iteration - 1] if iteration else 0.0
        return {**super().log_entries(state), "han_iteration": iteration, "han_quality": quality}

    def _restore_from_checkpoint(self, args: TrainingArguments, state: TrainerState) -> None:
        super()._restore_from_checkpoint(args, state)
        self.pruner.iteration = self.pruner.events_until(state.global_step)


# ------------------------------------------------------------------------------------- See et al. retraining
def _halving(step: int, steps_per_halving: int) -> float:
    return 0.5 ** (step // steps_per_halving)


def get_see_retraining_schedule(optimizer: torch.optim.Optimizer, num_update_steps_per_epoch: int,
                                halve_every_epochs: int = 2, last_epoch: int = -1) -> LambdaLR:
    """See et al. 2016's retraining schedule: the learning rate halved every `halve_every_epochs` epochs.

    A `LambdaLR` like transformers' `get_*_schedule` functions (stepped once per optimizer step, saved and restored
    with Trainer checkpoints): `lr = lr_0 · 0.5 ** (step // (halve_every_epochs · num_update_steps_per_epoch))`.
    With `see_retraining_arguments` (the smaller starting learning rate and fewer epochs) and the Trainer:

    ```python
    args = see_retraining_arguments(args)                 # lr_0 = args.learning_rate / 2, 4 epochs
    trainer = Trainer(model=pruned_model, args=args, train_dataset=ds, callbacks=[pruning_callback])
    trainer.create_optimizer()                            # the Trainer's own optimizer (weight-decay groups, ...)
    steps_per_epoch = math.ceil(len(trainer.get_train_dataloader()) / args.gradient_accumulation_steps)
    trainer.lr_scheduler = get_see_retraining_schedule(trainer.optimizer, steps_per_epoch)
    trainer.train()
    ```

    (or `Trainer(..., optimizers=(optimizer, get_see_retraining_schedule(optimizer, steps_per_epoch)))` with an
    optimizer of your own).

    Args:
        optimizer (`torch.optim.Optimizer`): the optimizer whose learning rates are scheduled.
        num_update_steps_per_epoch (`int`): optimizer steps per epoch (>= 1).
        halve_every_epochs (`int`, *optional*, defaults to 2): epochs between two halvings (>= 1).
        last_epoch (`int`, *optional*, defaults to -1): the index of the last step when resuming by hand.
    """
    for name, value in (("num_update_steps_per_epoch", num_update_steps_per_epoch),
                        ("halve_every_epochs", halve_every_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
    halving = functools.partial(_halving, steps_per_halving=halve_every_epochs * num_update_steps_per_epoch)
    return LambdaLR(optimizer, halving, last_epoch)


def see_retraining_arguments(args: TrainingArguments, learning_rate_factor: float = 0.5,
                             num_train_epochs: float = 4.0) -> TrainingArguments:
    """A copy of `args` for See et al. 2016's retraining: a smaller learning rate (`learning_rate_factor` times
    that of `args`; See et al. restart from half the original rate) for fewer epochs (`max_steps` unset, no
    warmup). The halving every 2 epochs is `get_see_retraining_schedule`'s.

    Args:
        args (`TrainingArguments`): the arguments of the original training.
        learning_rate_factor (`float`, *optional*, defaults to 0.5): in (0, 1].
        num_train_epochs (`float`, *optional*, defaults to 4.0): epochs of retraining (> 0).
    """
    if not is_finite_number(learning_rate_factor) or not 0 < learning_rate_factor <= 1:
        raise ValueError(f"`learning_rate_factor` must be a number in (0, 1]; got {learning_rate_factor!r}.")
    if not is_finite_number(num_train_epochs) or num_train_epochs <= 0:
        raise ValueError(f"`num_train_epochs` must be a number > 0; got {num_train_epochs!r}.")
    return dataclasses.replace(args, learning_rate=args.learning_rate * learning_rate_factor,
                               num_train_epochs=num_train_epochs, max_steps=-1, warmup_steps=0)
