"""Reweighted Proximal Pruning (Guo et al. 2019, "Reweighted Proximal Pruning for Large-Scale Language
Representation"): `RPPConfig`, the reweighted-L1 proximal operator and `RPPCallback`.

The optimizer minimises the task loss only. After each optimizer step, a proximal operator applies the reweighted
L1 penalty `λ Σ_i α_i |w_i|` to the targeted weights, with `α_i = 1 / (|w_i| + ε)` refreshed every few steps:
small weights are driven to exactly zero while large ones are barely touched (reweighted L1 approximates L0,
Candès et al. 2008). By `end_step` the masks reach `final_sparsity` exactly and are fixed from then on, with the
same mask machinery as `MagnitudePruningCallback`: by one hard prune at `end_step` (`schedule="oneshot"`, Guo et
al.), or along the core's `cubic` / `iterative` schedule over the proximal window.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments

from ..callbacks import MagnitudePruningCallback
from ..config import PruningConfig
from ..distributed import refuse_sharded
from ..pruner import Pruner
from ..schedules import check_fits, resolve_end_step
from ..validation import check_choice, check_int, check_number


logger = logging.getLogger(__name__)

PENALTY_SCHEDULES = ("constant", "linear")
#: α is stored in bfloat16: 2 bytes per targeted weight, the exponent range of float32 (float16 would overflow
#: to inf at α = 1/ε for ε < 1.5e-5) and a 0.4% relative error on each weight's penalty.
ALPHA_DTYPE = torch.bfloat16
#: Smallest ε: α = 1/ε must stay finite in `ALPHA_DTYPE` with a wide margin.
MIN_EPSILON = 1e-12


@dataclass
class RPPConfig(PruningConfig):
    """Configuration of Reweighted Proximal Pruning; the fields of `PruningConfig` keep their meaning.

    The proximal operator runs on optimizer steps `start_step + 1 ... end_step` (counted like
    `TrainerState.global_step` after the step). With `schedule="oneshot"` (Guo et al.), right after step
    `end_step` one hard prune (ranked by `criterion` under `scheme`) sets exactly `final_sparsity`. With
    `"cubic"` or `"iterative"` the masks instead grow along that schedule over the same window, as in
    `MagnitudePruningCallback`, reaching `final_sparsity` at `end_step`; between pruning events the proximal
    operator keeps shrinking the weights still kept. Either way the masks stay fixed after `end_step`.

    Choosing `penalty`: with `α` refreshed continuously and no gradient, the operator moves a weight as
    `d(|w|²/2 + ε|w|) = -λ·lr` per step, so it zeroes the weights with `|w₀|²/2 + ε|w₀| < λ·Σ lr_t` over the
    window. A `λ` of `(w*²/2 + ε·w*) / Σ lr_t`, with `w*` the magnitude at the target quantile of the initial
    weights, aims the proximal phase at the target; the task gradient holds up the weights that matter. That
    suits `"oneshot"`, where the proximal zeros are the mask. With `"cubic"` masks ranked by `criterion="obd"` the
    masks do the pruning, and the proximal step is best kept weak: about 1/100 of that λ measured best on
    all-MiniLM-L6-v2 / SST-2 at 80% (README, "RPP with a weak proximal step").
    `ε` bounds `α ≤ 1/ε`: once α is refreshed, a zeroed weight is thresholded at `lr·λ/ε` per step while Adam
    moves a coordinate by about `lr` (`|m̂|/√v̂` is typically ≤ 1), so with `λ` well above `ε` zeros stay zero.

    Args:
        penalty (`float`, *optional*, defaults to `0.01`):
            λ ≥ 0, the strength of the reweighted L1 penalty (0 turns the proximal operator off: the run is then
            dense fine-tuning with a one-shot prune at `end_step`).
        penalty_schedule (`str`, *optional*, defaults to `"constant"`):
            `"constant"`: λ on every step of the window; `"linear"`: warm-up `λ·(step - start_step) /
            (end_step - start_step)`, reaching λ on step `end_step`.
        epsilon (`float`, *optional*, defaults to `1e-3`):
            ε >= 1e-12 in `α_i = 1 / (|w_i| + ε)`; bounds the penalty of weights at or near zero.
        reweight_every (`int`, *optional*, defaults to `10`):
            α is recomputed from the current weights on the first step of the window and every `reweight_every`
            steps after it.
        schedule (`str`, *optional*, defaults to `"oneshot"`):
            `"oneshot"`: the masks are set once, at `end_step` (`initial_sparsity` must stay 0 and
            `pruning_frequency` unset). `"cubic"` / `"iterative"`: the core's schedules, over the proximal window.
    """

    schedule: str = field(default="oneshot", metadata={"help": "'oneshot' (masks set at end_step), 'cubic' or "
                                                                "'iterative' (masks grow over the window)."})
    penalty: float = field(default=0.01, metadata={"help": "λ >= 0, reweighted L1 penalty strength."})
    penalty_schedule: str = field(default="constant", metadata={"help": f"One of {PENALTY_SCHEDULES}."})
    epsilon: float = field(default=1e-3, metadata={"help": f"ε >= {MIN_EPSILON:g} in α = 1 / (|w| + ε)."})
    reweight_every: int = field(default=10, metadata={"help": "Optimizer steps between refreshes of α (>= 1)."})
    callback_name: ClassVar[str] = "RPPCallback"

    def _check_oneshot_fields(self) -> None:
        """With `schedule="oneshot"` RPP prunes once, at `end_step`: `end_step` is the step of that prune."""
        if self.initial_sparsity != 0.0:
            raise ValueError(f"`initial_sparsity` must be 0.0 for RPP with schedule='oneshot' (it prunes once, at "
                             f"end_step); got {self.initial_sparsity!r}.")
        if self.pruning_frequency is not None:
            raise ValueError(f"`pruning_frequency` must be None for RPP with schedule='oneshot' (it prunes once, "
                             f"at end_step); got {self.pruning_frequency!r}.")

    def validate(self) -> None:
        """`PruningConfig.validate()`, then the RPP fields; raises `ValueError` naming field, value and range."""
        super().validate()
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(f"`end_step` ({self.end_step}) must be greater than `start_step` ({self.start_step}).")
        check_number("penalty", self.penalty, 0.0)
        check_choice("penalty_schedule", self.penalty_schedule, PENALTY_SCHEDULES)
        check_number("epsilon", self.epsilon, MIN_EPSILON)
        check_int("reweight_every", self.reweight_every, 1)


@dataclass(frozen=True)
class PenaltySchedule:
    """λ and the α refreshes as functions of the optimizer step `step` (1-based: `global_step` after the step).

    The proximal window is `start < step <= end`; outside it λ is 0 and nothing is refreshed.
    """

    kind: str
    penalty: float
    start: int
    end: int
    reweight_every: int

    @classmethod
    def from_config(cls, config: RPPConfig, max_steps: int | None = None) -> PenaltySchedule:
        """Resolves the window with the core's `end_step` default and checks that it fits in `max_steps`."""
        end = resolve_end_step(config.start_step, config.end_step, max_steps)
        check_fits(end, max_steps, f"the proximal window ends at `end_step` {end}")
        return cls(config.penalty_schedule, config.penalty, config.start_step, end, config.reweight_every)

    def active(self, step: int) -> bool:
        return self.start < step <= self.end

    def __call__(self, step: int) -> float:
        if not self.active(step):
            return 0.0
        if self.kind == "linear":
            return self.penalty * (step - self.start) / (self.end - self.start)
        return self.penalty

    def reweights_at(self, step: int) -> bool:
        return self.active(step) and (step - self.start - 1) % self.reweight_every == 0


@torch.no_grad()
def reweight(weights: Mapping[str, torch.Tensor], epsilon: float) -> dict[str, torch.Tensor]:
    """`α_i = 1 / (|w_i| + ε)` for every weight, stored in `ALPHA_DTYPE` (bfloat16)."""
    return {name: w.detach().abs().float().add_(epsilon).reciprocal_().to(ALPHA_DTYPE)
            for name, w in weights.items()}


@torch.no_grad()
def soft_threshold_(weight: torch.Tensor, alpha: torch.Tensor | float, scale: float = 1.0) -> torch.Tensor:
    """`w ← sign(w) · max(|w| - scale·α, 0)`, in place: the proximal operator of `scale · Σ α_i |w_i|`.

    Entries with `|w_i| <= scale·α_i` become exactly 0; the others move towards 0 without crossing it, so no
    entry ever changes sign. Returns `weight`.
    """
    magnitude = weight.abs().sub_(alpha, alpha=scale).clamp_(min=0)
    return weight.copy_(magnitude.mul_(weight.sign()))


def learning_rates(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The current learning rate of each parameter's optimizer group; 0.0 for parameters it does not update."""
    by_param = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
    return {name: by_param.get(id(p), 0.0) for name, p in params.items()}


@torch.no_grad()
def proximal_step_(weights: Mapping[str, torch.Tensor], alphas: Mapping[str, torch.Tensor],
                   lrs: Mapping[str, float], penalty: float) -> torch.Tensor:
    """One reweighted-L1 proximal step on `weights`, in place; returns the number of exact zeros (a tensor).

    Each weight is soft-thresholded at `lr · λ · α_i`, with `lr` the current learning rate of its optimizer group
    (the one the optimizer step just used), not Adam's per-coordinate step size `lr / (√v̂_i + eps)`. This is
    the decoupled form, as AdamW decouples weight decay (Loshchilov & Hutter 2019). The proximal-gradient step
    in Adam's diagonal metric would threshold coordinate `i` at `lr · λ · α_i / (√v̂_i + eps)`: the penalty would
    be rescaled by the gradient statistics, `1 / (√v̂_i + eps)` times larger on coordinates with small gradients
    (up to `1/eps` where the gradient is zero) and changing whenever the gradient scale does. Decoupled, the
    shrink per step is exactly `lr · λ · α_i`, the same for every coordinate with the same `α_i`, whatever its
    gradients, and it follows the learning-rate schedule.
    """
    counts = []
    for name, weight in weights.items():
        scale = lrs[name] * penalty
        if scale:  # a zero step changes nothing, and 0 * α must not meet an α that overflowed
            soft_threshold_(weight, alphas[name], scale)
        counts.append(weight.eq(0).sum())
    return torch.stack([count.to(counts[0].device) for count in counts]).sum()  # no host sync


def mask_config(config: RPPConfig, end_step: int) -> PruningConfig:
    """The `PruningConfig` the `Pruner` of an RPP run follows: one-shot to `final_sparsity` at `end_step`, or
    `config`'s cubic / iterative schedule ending at `end_step` (the proximal window's resolved end)."""
    base = {f.name: getattr(config, f.name) for f in dataclasses.fields(PruningConfig)}
    if config.schedule == "oneshot":
        return PruningConfig(**{**base, "schedule": "oneshot", "start_step": end_step, "end_step": None})
    return PruningConfig(**{**base, "end_step": end_step})


class RPPPruner(Pruner):
    """The `Pruner` of an RPP run: masks along `mask_config(config, end)` and, on the optimizer steps of the
    proximal window, the reweighted-L1 proximal step; usable from a custom training loop.

    After each `optimizer.step()` call `proximal_step_(step, optimizer)` (with `step` the 1-based number of the
    optimizer step just taken), then `apply_()`, then `update(step, optimizer)`, as with a `Pruner`. α (`reweight`)
    is refreshed from the weights on the first step of the window and every `reweight_every` steps after it; it
    costs 2 bytes per targeted weight (bfloat16) and is freed after the window.

    Args:
        model (`nn.Module`): the model to prune (unsharded).
        config (`RPPConfig`): the RPP configuration (`self.config` is the mask schedule derived from it).
        max_steps (`int`, *optional*): the run's number of optimizer steps, for the `end_step` default.
    """

    def __init__(self, model: nn.Module, config: RPPConfig, max_steps: int | None = None) -> None:
        config.validate()  # again: a field may have been set after construction (the Pruner sees mask_config's)
        self.rpp_config = config
        self.penalty_schedule = PenaltySchedule.from_config(config, max_steps)
        # A one-shot Pruner prunes at end_step, not at the start of the proximal window (config.start_step).
        super().__init__(model, mask_config(config, self.penalty_schedule.end), max_steps=max_steps)
        refuse_sharded(self.params.values(), "RPP")
        frozen = [name for name, p in self.params.items() if not p.requires_grad]
        if frozen:
            raise ValueError(f"RPP's proximal step moves the targeted weights at their optimizer's learning rate, but "
                             f"{len(frozen)} targeted weights are frozen (requires_grad=False, as under LoRA), such "
                             f"as {frozen[0]}: they would be cut once by magnitude, without the reweighted-L1 phase. "
                             "Train them, leave them out (`exclude_modules`), or prune them with "
                             "MagnitudePruningCallback.")
        self.alphas: dict[str, torch.Tensor] | None = None
        self._zeros: torch.Tensor | None = None
        self._optimizer_checked = False

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raises `ValueError` unless `optimizer` updates every targeted weight: the proximal step takes each
        weight's learning rate from the optimizer's groups, and finds none for a weight the optimizer does not
        hold (DeepSpeed ZeRO-1/2 step flat fp32 copies instead; a custom optimizer may leave weights out)."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self.params.items() if id(p) not in held]
        if missing:
            raise ValueError(f"RPP's proximal step moves each targeted weight at its optimizer group's learning rate, "
                             f"but the optimizer ({type(optimizer).__name__}) does not hold {len(missing)} of them, "
                             f"such as {missing[0]} (DeepSpeed ZeRO-1/2 step flat copies of the weights); the step "
                             "would do nothing there. Give the optimizer the model's weights, or leave those out "
                             "(`exclude_modules`).")
        self._optimizer_checked = True

    def proximal_step_(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """The proximal step of optimizer step `step`, at the learning rates `optimizer` just used; outside the
        window, nothing (and α is freed)."""
        if not self.penalty_schedule.active(step):
            self.alphas = None
            return
        if not self._optimizer_checked:
            self.check_optimizer(optimizer)
        if self.alphas is None or self.penalty_schedule.reweights_at(step):
            self.alphas = reweight(self.params, self.rpp_config.epsilon)
        self._zeros = proximal_step_(self.params, self.alphas, learning_rates(optimizer, self.params),
                                     self.penalty_schedule(step))

    def proximal_zero_fraction(self) -> float | None:
        """Exact zeros among the targeted weights after the latest proximal step (None before the first one)."""
        if self._zeros is None:
            return None
        return int(self._zeros) / sum(p.numel() for p in self.params.values())


class RPPCallback(MagnitudePruningCallback):
    """Reweighted Proximal Pruning during `Trainer.train()`, routing the Trainer's events to an `RPPPruner`.

    On each optimizer step of the window `(start_step, end_step]` (`on_optimizer_step`, after the optimizer's
    update, with the learning rate that update used), the proximal step soft-thresholds the targeted weights at
    `lr · λ · α_i`. The inherited machinery prunes at the end of step `end_step` (`"oneshot"`) or at each event of
    the cubic / iterative schedule, by `criterion` (the proximal zeros go first), clears the optimizer moments
    there, and keeps the pruned weights exactly zero from then on; checkpoints, resume, logs and
    `PrunedModel.from_trainer` work as for `MagnitudePruningCallback`. The logs also get `rpp_penalty` (λ of the
    step just taken, 0 outside the window) and `rpp_zero_fraction` (exact zeros among the targeted weights, masked
    or not, after the latest proximal step, frozen at its value before the last pruning event).

    Resume: α is not saved; after `resume_from_checkpoint` it is recomputed from the restored weights on the
    first step of the window that follows. A checkpoint at a step where `(step - start_step) % reweight_every
    == 0` (e.g. `save_steps` a multiple of `reweight_every`, `start_step` 0) therefore resumes exactly as the
    uninterrupted run; otherwise α is refreshed early, from the checkpoint's weights.

    ```python
    from hf_prune import RPPCallback, RPPConfig

    callback = RPPCallback(RPPConfig(final_sparsity=0.9, penalty=0.1, end_step=3000))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()
    ```

    Args:
        config (`RPPConfig` or `dict`, *optional*): the RPP configuration (a dict is `RPPConfig.to_dict()`
            output). Defaults to `RPPConfig()`.
        override_checkpoint_config (`bool`, *optional*, defaults to `False`): as for `MagnitudePruningCallback`.
    """

    config_class = RPPConfig

    def __init__(self, config: RPPConfig | dict[str, Any] | None = None,
                 override_checkpoint_config: bool = False) -> None:
        super().__init__(config, override_checkpoint_config)
        self._optimizer: torch.optim.Optimizer | None = None  # the Trainer's, from on_train_begin to make_pruner

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        self._optimizer = optimizer  # checked by make_pruner, before anything is pruned
        try:
            super().on_train_begin(args, state, control, optimizer=optimizer, **kwargs)
        finally:
            self._optimizer = None
        window, step = self.pruner.penalty_schedule, state.global_step + 1
        if (state.global_step > 0 and window.active(step) and not window.reweights_at(step)
                and state.is_world_process_zero):
            logger.warning("Resuming RPP at step %d, between two refreshes of α (every %d steps from step %d): α is "
                           "recomputed from the checkpoint's weights, so the run differs slightly from an "
                           "uninterrupted one. Save at multiples of reweight_every to resume exactly.",
                           state.global_step, self.config.reweight_every, window.start)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        self.pruner.proximal_step_(state.global_step + 1, optimizer)
        super().on_optimizer_step(args, state, control, optimizer=optimizer, **kwargs)

    @classmethod
    def check_schedule(cls, config: RPPConfig, max_steps: int) -> None:
        """The proximal window, then the mask schedule that ends with it (as `RPPPruner` builds them)."""
        super().check_schedule(mask_config(config, PenaltySchedule.from_config(config, max_steps).end), max_steps)

    @classmethod
    def holding_config(cls, saved: RPPConfig, sparsity: float) -> RPPConfig:
        """As for `MagnitudePruningCallback`, with the proximal operator off (`penalty=0`): it would zero kept
        weights."""
        return dataclasses.replace(super().holding_config(saved, sparsity), penalty=0.0)

    def prunes_after_train_begin(self) -> bool:
        # the proximal step moves and zeroes weights over its window, the hard prune ends it
        return not self._holds_saved_masks

    def make_pruner(self, model: torch.nn.Module, max_steps: int | None) -> Pruner:
        pruner = RPPPruner(model, self.config, max_steps=max_steps)
        if self._optimizer is not None:
            pruner.check_optimizer(self._optimizer)
        return pruner

    def log_entries(self, state: TrainerState) -> dict[str, float]:
        entries = {**super().log_entries(state), "rpp_penalty": self.pruner.penalty_schedule(state.global_step)}
        zero_fraction = self.pruner.proximal_zero_fraction()
        if zero_fraction is not None:
            entries["rpp_zero_fraction"] = zero_fraction
        return entries
