"""`Pruner`: owns the masks of a model's targeted weights and keeps them applied. Works without a Trainer."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import numbers
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters import Factor, adapter_kind, factor_mask, lora_factors, tuner_layers, without_peft_wrapper
from .config import PruningConfig
from .criteria import CRITERIA
from .distributed import (
    Replicated,
    ZeroPartitions,
    check_ranks_agree,
    check_thresholds_agree,
    is_distributed,
    is_main_rank,
    layout_of,
)
from .distributed.collectives import collective_device, sum_over_ranks
from .masks import check_masks_match, kept_along, update_masks_, zero_pruned_
from .schedules import SparsitySchedule
from .structured.selection import check_groups_left, uniform_sparsity, update_group_masks_
from .structured.shrink import heads_unexpressible, widths_unexpressible
from .structured.units import Unit, pruned_targets, units_for
from .targets import Target, clean_name, exclusion_for, named_weights, prunable_modules, unprunable_block_weights
from .validation import check_fraction, check_int, check_number


logger = logging.getLogger(__name__)


def _kept_gradient(masks: Mapping[str, torch.Tensor], name: str, gradient: torch.Tensor) -> torch.Tensor:
    """`gradient` with the entries `masks[name]` prunes set to zero (the mask looked up when backward runs)."""
    return gradient * masks[name]


def _in_backward_pass() -> bool:
    """Whether autograd is running a backward pass on this thread: where activation checkpointing re-runs the
    forward of a checkpointed block (both its reentrant and non-reentrant forms recompute inside backward)."""
    return torch._C._current_graph_task_id() != -1


class Pruner:
    """Masks for `model` under `config`, updated on a schedule and applied in place.

    Masks are `torch.bool` tensors (True = kept) keyed by parameter name; the weights stay ordinary parameters
    under their own names, so `save_pretrained` / `from_pretrained` see a normal model whose pruned entries are
    zeros. In a custom training loop:

    ```python
    pruner = Pruner(model, PruningConfig(final_sparsity=0.8, schedule="cubic", end_step=1000))
    pruner.update(0)
    for step, batch in enumerate(loader, start=1):
        model(**batch).loss.backward()
        pruner.observe_gradients_(step)  # only does something for criterion="obd" (gradients)
        pruner.mask_gradients_()
        optimizer.step()
        pruner.apply_()
        optimizer.zero_grad()
        pruner.update(step, optimizer)
    ```

    Sharded weights (FSDP2 `fully_shard`, DTensors placed `Shard(0)`; FSDP1 with `use_orig_params=True`; DeepSpeed
    ZeRO-3) are pruned where they live: each rank's `masks` cover its own rows (FSDP2) or its run of the flattened
    weight (FSDP1, ZeRO-3: 1-D masks), the global threshold comes from all-reduced histograms (no rank gathers the
    model), and `full_masks()` / `load_masks()` / `state_dict()` speak full-size masks, so a mask file loads under
    any world size. Under sharding every rank must call `update`, `prune_to`, `sparsity*`, `full_masks`,
    `state_dict` and `check_ranks_agree` together (they are collectives).

    Args:
        model (`nn.Module`): the model to prune, or its DDP / FSDP1 wrapper.
        config (`PruningConfig`): what to prune and when.
        max_steps (`int`, *optional*): the run's number of optimizer steps, used for `end_step` defaults.
    """

    def __init__(self, model: nn.Module, config: PruningConfig, max_steps: int | None = None) -> None:
        config.validate()  # again: a field may have been set after construction
        self.config = config
        self.schedule = SparsitySchedule.from_config(config, max_steps)
        # the module that owns the weights (inside a peft model: the transformers model with its adapted layers)
        self.module = module = without_peft_wrapper(extract_model_from_parallel(model))
        if config.structures() and type(layout_of(named_weights(module), model)) is not Replicated:
            # before the units are read from the weights' shapes, which a shard does not have
            raise ValueError(f"`structure` {config.structure!r} does not support sharded weights (FSDP / ZeRO-3) "
                             "yet; train unsharded (DDP), or use structure='unstructured'.")
        #: With `config.structure`: the feed-forward / attention blocks whose neurons / heads are pruned whole.
        self.units: list[Unit] = units_for(module, config) if config.structures() else []
        targets = pruned_targets(module, config, self.units)
        reasons = (heads_unexpressible(module, self.units), widths_unexpressible(module, config.scheme, self.units))
        for reason in reasons:
            if reason and is_main_rank():
                logger.warning("%s The masks train, save and load as usual.", reason)
        params = named_weights(module)
        check_groups_left(self.units, params, config.final_sparsity, config.scheme, "final_sparsity")
        if config.scheme == "class-uniform":
            _warn_uniform_rounding(self.units, params, config.final_sparsity)
        hidden = [t.name for t in targets if t.name not in params]
        if hidden:
            raise ValueError(f"{len(hidden)} targeted weights, such as {hidden[0]}, are not parameters of "
                             f"{type(module).__name__}: FSDP1 with use_orig_params=False flattens them away. Set "
                             "fsdp_config={'use_orig_params': True}, or use FSDP2 ({'fsdp_version': 2}).")
        self.params: dict[str, nn.Parameter] = {t.name: params[t.name] for t in targets}
        self.classes: dict[str, str] = {t.name: t.weight_class for t in targets}
        if config.target_modules is None and not self.units:
            _warn_unprunable(module, self.params)
        self.layout = layout_of(self.params, model)
        self.group = self.layout.group
        #: The biases of pruned neurons / heads (structured pruning) follow their weights' masks.
        self.bias_params: dict[str, nn.Parameter] = {m.bias: params[m.bias] for u in self.units
                                                     for m in u.members if m.bias}
        self.bias_masks: dict[str, torch.Tensor] = {name: torch.ones_like(p, dtype=torch.bool)
                                                    for name, p in self.bias_params.items()}
        #: The LoRA factors of adapted pruned weights (peft), masked so that their update is zero where the weight is.
        self.factors: dict[str, Factor] = self._lora_factors(module, targets, params)
        self.factor_params: dict[str, nn.Parameter] = {name: params[name] for name in self.factors}
        self.factor_masks: dict[str, torch.Tensor] = {name: torch.ones_like(p, dtype=torch.bool)
                                                      for name, p in self.factor_params.items()}
        self.masks: dict[str, torch.Tensor] = {
            name: torch.ones_like(self.layout.local(p), dtype=torch.bool) for name, p in self.params.items()
        }
        self.criterion = CRITERIA[config.criterion]()
        if self.criterion.needs_gradients and isinstance(self.layout, ZeroPartitions):
            raise ValueError(f"`criterion` {config.criterion!r} needs each weight's gradient, which DeepSpeed ZeRO-3 "
                             "keeps in its optimizer's flat buffers; use criterion='magnitude' under ZeRO-3, or "
                             "shard with FSDP2.")
        if self.criterion.needs_inputs and type(self.layout) is not Replicated:
            raise ValueError(f"`criterion` {config.criterion!r} weighs each input feature of a weight, which FSDP / "
                             "ZeRO-3 shard along with it; use it unsharded (one process or DDP), or use "
                             "criterion='magnitude' or 'obd' (FSDP2).")
        self.target_sparsity = 0.0
        self.thresholds: dict[str, float] = {}
        self._emptied: set[str] = set()  # the targeted matrices a pruning event has pruned entirely (warned once)
        self._recording_inputs = False
        self._estimating = False  # estimate_fisher's passes, in eval mode
        self._gradients_checked = False  # by the first `update` with events ahead (the masks may load before)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        if type(self.layout) is Replicated:
            self._register_gradient_hooks()
        if self.criterion.needs_inputs:
            self._register_input_hooks(module)
            self._record_inputs_for(1)

    def _lora_factors(self, module: nn.Module, targets: list[Target], params: dict[str, nn.Parameter]
                      ) -> dict[str, Factor]:
        """The LoRA factors of the targeted weights that carry peft adapters; refuses an unstructured mask on them."""
        targeted = {t.module_name for t in targets}
        adapted = {clean_name(name): layer for name, layer in tuner_layers(module) if clean_name(name) in targeted}
        if adapted and not self.units:
            names = sorted(adapted)
            kinds = ", ".join(sorted({adapter_kind(layer) for layer in adapted.values()}))
            leave_out = (f"Leave them out ({exclusion_for(names, sorted(targeted))}), or prune"
                         if len(names) < len(targeted) else "Every pruned layer carries one: adapt fewer layers, "
                         "merge the adapters first, or prune")
            raise ValueError(f"{len(names)} pruned layers carry peft adapters ({kinds}), such as {names[0]}. With "
                             f"`structure` {self.config.structure!r} the adapters' update (LoRA's B @ A) stays "
                             f"dense, so merge_and_unload() would not give the model that was trained. {leave_out} "
                             "whole neurons / heads (structure='neurons' or 'heads': the LoRA factors are masked "
                             "with them).")
        ids = {id(p): name for name, p in params.items()}
        return {f.name: f for f in lora_factors(adapted, {t.module_name: t.name for t in targets}, ids)}

    def _register_gradient_hooks(self) -> None:
        """Tensor hooks that zero the pruned entries of each gradient as backward produces it, before it is
        accumulated: gradient clipping, the logged `grad_norm` and DDP's all-reduce see the kept weights' gradients
        only, as if the pruned weights were not there. Unsharded weights only; `mask_gradients_` (before each
        optimizer step) is what guarantees the zeros under every layout."""
        for params, masks in ((self.params, self.masks), (self.bias_params, self.bias_masks),
                              (self.factor_params, self.factor_masks)):
            for name, param in params.items():
                if param.requires_grad:
                    self._hooks.append(param.register_hook(functools.partial(_kept_gradient, masks, name)))

    def _register_input_hooks(self, module: nn.Module) -> None:
        """Forward pre-hooks that pass each targeted layer's inputs to the criterion: in training mode while
        `_recording_inputs` (an event's window; evaluation passes in between are not recorded), and in
        `estimate_fisher`. The forward passes that activation checkpointing re-runs during the backward pass are
        not recorded a second time."""
        modules = prunable_modules(module)
        for name in self.params:
            layer = modules[name.rpartition(".")[0]]
            input_dim = 0 if isinstance(layer, Conv1D) else 1

            def observe(layer: nn.Module, args: tuple[Any, ...], name: str = name, input_dim: int = input_dim) -> None:
                if ((self._recording_inputs and layer.training) or self._estimating) and not _in_backward_pass():
                    self.criterion.observe_inputs(name, args[0], input_dim)

            self._hooks.append(layer.register_forward_pre_hook(observe))

    def remove_hooks(self) -> None:
        """Removes the pruner's hooks on the model: those that mask gradients as they arrive and those that record
        layer inputs ("wanda"). `MagnitudePruningCallback` calls it when a new `train()` replaces this pruner."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _statistics_for_event(self) -> None:
        """Before the first collective of an event: under DDP, wanda's input norms summed over the batches of every
        rank (each recorded its own), and under sharding every rank told whether any has statistics, so that a
        missing-statistics error is raised on all of them (a rank holding no entries of a weight scores none of
        it, and would otherwise wait in the event's first all-reduce)."""
        criterion = self.criterion
        if not (criterion.needs_gradients or criterion.needs_inputs):
            return
        if criterion.needs_inputs and self.group is None and is_distributed():
            self._sum_inputs_over_ranks()
        elif self.group is not None:
            flag = torch.tensor([float(criterion.has_statistics())], device=collective_device(self.group))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            if not flag.item():
                raise criterion.missing_statistics()
            return
        if not criterion.has_statistics():
            raise criterion.missing_statistics()

    def _sum_inputs_over_ranks(self) -> None:
        """Wanda's squared input sums of every targeted layer, summed over the world's ranks (DDP: each rank ran
        its own batches), in one all-reduce; a layer that ran on no input of a rank adds zeros."""
        modules = prunable_modules(self.module)
        input_dims = {name: 0 if isinstance(modules[name.rpartition(".")[0]], Conv1D) else 1 for name in self.params}
        recorded = self.criterion.squared_inputs
        parts = [recorded[name][0] if name in recorded else torch.zeros(p.shape[input_dims[name]], device=p.device)
                 for name, p in self.params.items()]
        *sums, ranks_recording = sum_over_ranks([*parts, torch.tensor([float(bool(recorded))])])
        self.criterion.squared_inputs = {} if not ranks_recording.item() else {  # empty: no rank recorded anything
            name: (values, input_dims[name]) for name, values in zip(self.params, sums)}

    def _record_inputs_for(self, step: int) -> None:
        """Whether the forward passes of optimizer step `step` are recorded: a pruning event falls on one of the
        steps `step ... step + fisher_steps - 1`, as for gradients (`observe_gradients_`)."""
        self._recording_inputs = self.schedule(step + self.config.fisher_steps - 1) > self.target_sparsity

    def update(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Prunes to the schedule's target at `step` if it is above the current one; returns whether it did.

        With an `optimizer`, its per-weight state (Adam's moments, momentum) is cleared at the newly pruned
        positions, so no stale momentum pushes a pruned weight off zero. For a criterion that ranks by layer inputs
        ("wanda"), it also decides whether the forward passes of step `step + 1` are recorded (an event's window),
        so call it after every optimizer step, and once with the step reached before resuming.
        """
        if isinstance(step, numbers.Integral) and not isinstance(step, bool):
            step = int(step)  # a NumPy integer too
        check_int("step", step, 0)
        _check_optimizer(optimizer)
        if not self._gradients_checked and self.schedule.final > self.target_sparsity:  # events lie ahead
            self._check_gradients_reach_targets()
            self._gradients_checked = True
        target = self.schedule(step)
        pruned = target > self.target_sparsity
        if pruned:
            self.prune_to(target, optimizer)
        if self.criterion.needs_inputs:  # the next forward pass is that of step + 1 (after a resume too)
            self._record_inputs_for(step + 1)
        return pruned

    def _check_gradients_reach_targets(self) -> None:
        """Refuses a gradient criterion ("obd") while targeted weights are frozen: they would score zero."""
        if not self.criterion.needs_gradients:
            return
        frozen = [name for name, p in self.params.items() if not p.requires_grad]
        if frozen:
            raise ValueError(f"`criterion` {self.config.criterion!r} ranks weights by their gradients, but "
                             f"{len(frozen)} targeted weights are frozen (requires_grad=False, as under LoRA), such as "
                             f"{frozen[0]}; use criterion='magnitude' or 'wanda', or train them.")

    def prune_to(self, sparsity: float, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Prunes the targeted weights to `sparsity` now, whatever the schedule says.

        A criterion's gradient statistics ("obd") are used and then freed.

        Raises:
            ValueError: when `sparsity` is not a number in [0, 1), would prune every neuron or head (structured
                pruning: `check_groups_left`), or `optimizer` is not an optimizer; nothing changes.
        """
        if isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool):
            sparsity = float(sparsity)  # a NumPy float too
        check_fraction("sparsity", sparsity)
        _check_optimizer(optimizer)
        weights = {name: self.layout.local(p) for name, p in self.params.items()}
        check_groups_left(self.units, weights, sparsity, self.config.scheme, "sparsity")
        self._statistics_for_event()
        if self.units:
            self.thresholds = {**self.thresholds, **update_group_masks_(  # a kind that lost no group keeps its own
                self.units, weights, self.masks, self.criterion, sparsity, self.config.scheme)}
            self._update_follower_masks()
        else:
            self.thresholds = update_masks_(weights, self.masks, self.classes, self.criterion, sparsity,
                                            self.config.scheme, self.layout.reduce)
            self._warn_fully_pruned(sparsity)
        self.criterion.reset()
        self.target_sparsity = sparsity
        self.apply_()
        if optimizer is not None:
            self.mask_optimizer_state_(optimizer)

    def _warn_fully_pruned(self, sparsity: float) -> None:
        """Says when this event prunes a targeted weight matrix entirely (its layer then outputs its bias only):
        under `class-blind` a whole class can rank below the others (OBD's or Wanda's scores differ in scale from
        class to class). Each matrix is named once, at the event that empties it."""
        empty = self._empty_targets()
        emptied = [name for name in empty if name not in self._emptied]
        self._emptied = set(empty)
        if emptied and is_main_rank():
            logger.warning("Sparsity %.4g prunes every weight of %d targeted matrices, such as %s: their layers "
                           "output their bias only. scheme='class-uniform' or 'class-distribution' prunes each "
                           "class to its share, or exclude the layer (exclude_modules).", sparsity, len(emptied),
                           emptied[0])

    def _empty_targets(self) -> list[str]:
        """The targeted weights whose masks keep nothing (over all shards), in model order."""
        names = list(self.masks)
        kept = torch.tensor([int(self.masks[name].sum()) for name in names], dtype=torch.int64)
        if self.layout.reduce is not None:
            kept = self.layout.reduce.sum(kept)
        return [name for name, count in zip(names, kept.tolist()) if count == 0]

    @torch.no_grad()
    def apply_(self) -> None:
        """Sets the pruned weights (and the biases of pruned neurons / heads) to exactly zero, in place (under
        ZeRO-3, the optimizer's fp32 copy too)."""
        self.layout.zero_pruned_(self.params, self.masks)
        for param, mask in self._follower_masks():
            zero_pruned_(param, mask)

    def _update_follower_masks(self) -> None:
        """A bias entry of a unit member is kept while its output feature's row of the weight mask keeps anything;
        a LoRA factor keeps the rows (`lora_B`) / columns (`lora_A`) of the features its weight keeps."""
        for name, factor in self.factors.items():
            self.factor_masks[name] = factor_mask(factor, self.masks[factor.weight], self.factor_params[name])
        for unit in self.units:
            for member in unit.members:
                if member.bias is None:
                    continue
                mask = self.masks[member.name]
                kept = kept_along(mask, member.dim)
                span = slice(member.offset, member.offset + unit.num_groups * member.width)
                self.bias_masks[member.bias][span] = kept[span]

    def check_ranks_agree(self, step: int) -> None:
        """Raises `RuntimeError` on every rank when the ranks prune differently (see `hf_prune.distributed`):
        unsharded, all must hold the same masks; sharded, all must have used the same thresholds."""
        if self.group is None:
            check_ranks_agree(self.masks, step)
        else:
            check_thresholds_agree(self.thresholds, step, self.group)

    def observe_gradients_(self, step: int) -> bool:
        """Passes the targeted weights' gradients to a criterion that ranks by them ("obd") when an event is near.

        Call after `backward()` and before `mask_gradients_()`, with the `step` that `update(step)` gets after
        this optimizer step (`TrainerState.global_step + 1` during the step). The gradients are recorded only if
        a pruning event falls on one of the steps `step ... step + fisher_steps - 1`: the event at step `e` sees
        those of steps `e - fisher_steps + 1 ... e`, and between these windows the criterion holds no statistics
        and no memory. Returns whether the gradients were recorded.
        """
        window_end = step + self.config.fisher_steps - 1
        if not self.criterion.needs_gradients or self.schedule(window_end) <= self.target_sparsity:
            return False
        self.criterion.observe_gradients({name: self.layout.local(p.grad) for name, p in self.params.items()
                                          if p.grad is not None})
        return True

    def estimate_fisher(self, model: nn.Module, dataloader: Iterable[Mapping[str, Any]],
                        num_batches: int | None = None) -> None:
        """Records the statistics of a data-driven criterion (`"obd"`'s gradients, `"wanda"`'s layer inputs) from
        data, without training (one-shot pruning).

        Each batch is one observation: the gradient of `model(**batch).loss` with respect to the targeted weights,
        taken with `torch.autograd.grad` (no `.grad` is touched, no weight changes) in eval mode (no dropout; the
        model gets its mode back). With one example per batch the statistics are the per-example empirical
        Fisher; batches of B examples give mean squared batch gradients, about that Fisher / B near a minimum.
        For `"wanda"` each batch only runs forward (no gradients), its layer inputs recorded. The next `prune_to`
        uses the statistics and frees them.

        ```python
        pruner = Pruner(model, PruningConfig(schedule="oneshot", final_sparsity=0.5, criterion="obd"))
        pruner.estimate_fisher(model, DataLoader(train_examples[:128], batch_size=1, collate_fn=collator))
        pruner.prune_to(0.5)
        ```

        Args:
            model (`nn.Module`): the model this pruner was built for.
            dataloader (`Iterable`): dicts of keyword arguments of `model`'s forward, labels included.
            num_batches (`int`, *optional*): how many batches to use; all by default.

        Raises:
            ValueError: when the criterion uses no data ("magnitude"), a gradient criterion's targeted weights are
                frozen, `num_batches` is not a positive integer, or a batch is not a dict or gives no loss.
        """
        if not (self.criterion.needs_gradients or self.criterion.needs_inputs):
            accepted = ", ".join(repr(name) for name, cls in CRITERIA.items() if cls.needs_gradients or cls.needs_inputs)
            raise ValueError(f"`criterion` {self.config.criterion!r} does not use data; estimate_fisher is for "
                             f"{accepted}.")
        check_int("num_batches", num_batches, 1, optional=True)
        if self.criterion.needs_gradients and self.group is not None:
            raise ValueError(f"estimate_fisher with `criterion` {self.config.criterion!r} takes the gradients of whole "
                             "weights, which FSDP / ZeRO-3 do not give torch.autograd.grad; estimate it on the "
                             "unsharded model, or let the callback record the gradients of the steps before the event.")
        self._check_gradients_reach_targets()
        params = {name: p for name, p in self.params.items() if p.requires_grad}
        device = next(iter(self.params.values())).device
        was_training = model.training
        model.eval()
        self._estimating = self.criterion.needs_inputs
        # DDP: each rank takes its own batches' gradients, summed over the ranks at the end; what was recorded before
        # (an earlier call, training steps) holds every rank's already, so it is set aside and added back after
        over_ranks = self.criterion.needs_gradients and is_distributed()
        if over_ranks:
            earlier = self.criterion.squared_gradients, self.criterion.observations
            self.criterion.squared_gradients, self.criterion.observations = {}, 0
        try:
            with torch.set_grad_enabled(self.criterion.needs_gradients):
                for batch in itertools.islice(dataloader, num_batches):
                    loss = _batch_loss(model, batch, device)
                    if not self.criterion.needs_gradients:
                        continue
                    gradients = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                    self.criterion.observe_gradients({n: self.layout.local(g) for n, g in zip(params, gradients)
                                                      if g is not None})
        except BaseException:
            if over_ranks:
                self.criterion.squared_gradients, self.criterion.observations = earlier
            raise
        finally:
            self._estimating = False
            model.train(was_training)
        if over_ranks:
            self._sum_gradient_statistics_over_ranks(*earlier)

    def _sum_gradient_statistics_over_ranks(self, earlier: Mapping[str, torch.Tensor], earlier_observations: int
                                            ) -> None:
        """OBD's squared gradients and observation count of one `estimate_fisher` call summed over the world's
        ranks (under DDP `torch.autograd.grad` bypasses DDP's all-reduce), in one all-reduce, then added to the
        `earlier` ones (every rank's already): every rank then ranks by the batches of all of them, as one process
        given them all would."""
        recorded = self.criterion.squared_gradients
        parts = [recorded.get(name, torch.zeros_like(p, dtype=torch.float32)) for name, p in self.params.items()]
        *sums, observations = sum_over_ranks([*parts, torch.tensor([float(self.criterion.observations)])])
        self.criterion.squared_gradients = {name: total + earlier[name] if name in earlier else total
                                            for name, total in zip(self.params, sums)}
        self.criterion.observations = int(observations.item()) + earlier_observations

    @torch.no_grad()
    def mask_gradients_(self) -> None:
        """Zeroes the gradients of pruned weights (call before `optimizer.step()`)."""
        for param, mask in self._masked_params():
            if param.grad is not None:
                zero_pruned_(self.layout.local(param.grad), mask)

    @torch.no_grad()
    def mask_optimizer_state_(self, optimizer: torch.optim.Optimizer) -> None:
        """Zeroes every per-weight optimizer buffer (same shape as the weight) at the pruned positions."""
        for param, mask in self._masked_params():
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    zero_pruned_(self.layout.local(value), mask)

    def _masked_params(self) -> Iterable[tuple[nn.Parameter, torch.Tensor]]:
        """Each masked parameter with its mask: the targeted weights, then `_follower_masks()`."""
        return itertools.chain(((p, self.masks[n]) for n, p in self.params.items()), self._follower_masks())

    def _follower_masks(self) -> Iterable[tuple[nn.Parameter, torch.Tensor]]:
        """The biases of structured units and the LoRA factors, each with its mask (they follow the weights')."""
        return itertools.chain(((p, self.bias_masks[n]) for n, p in self.bias_params.items()),
                               ((p, self.factor_masks[n]) for n, p in self.factor_params.items()))

    def sparsity(self) -> float:
        """Fraction of the targeted weights that are pruned (over all shards)."""
        counts = self._kept_and_total_by_class().values()
        return 1.0 - sum(kept for kept, _ in counts) / sum(total for _, total in counts)

    def sparsity_by_class(self) -> dict[str, float]:
        """Fraction pruned in each weight class (over all shards)."""
        return {cls: 1.0 - kept / total for cls, (kept, total) in self._kept_and_total_by_class().items()}

    def _kept_and_total_by_class(self) -> dict[str, list[int]]:
        """`[kept, total]` entries of the masks of each weight class, summed over the shards."""
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for name, mask in self.masks.items():
            counts[self.classes[name]][0] += int(mask.sum())
            counts[self.classes[name]][1] += mask.numel()
        if self.layout.reduce is not None:
            summed = self.layout.reduce.sum(torch.tensor(list(counts.values()), dtype=torch.int64)).tolist()
            counts = dict(zip(counts, summed))
        return counts

    def full_masks(self) -> dict[str, torch.Tensor]:
        """The masks at the weights' full shapes: `masks` itself unsharded, else gathered from every rank (CPU)."""
        return {name: self.layout.gather(mask, self.params[name]) for name, mask in self.masks.items()}

    def resolved_schedule(self) -> dict[str, Any]:
        """When the pruning events fall in this run, with the config's defaults resolved (`end_step`,
        `pruning_frequency` derived from `max_steps`), as JSON values: a checkpoint records it, so that resuming
        under another `max_steps`, which would move the remaining events, is caught."""
        return dataclasses.asdict(self.schedule)

    def state_dict(self) -> dict[str, Any]:
        """Full-size masks (copies: later events do not change them) and schedule position (for `accelerate`'s
        `register_for_checkpointing` or a custom loop)."""
        return {"masks": {name: mask.clone() for name, mask in self.full_masks().items()},
                "target_sparsity": self.target_sparsity}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores `state_dict()` output (masks and `target_sparsity`, the schedule's sparsity reached so far) and
        re-applies the masks to the weights."""
        if not isinstance(state, Mapping) or not {"masks", "target_sparsity"} <= state.keys():
            raise ValueError(f"`state` must be a dict with `masks` and `target_sparsity` (Pruner.state_dict()); got "
                             f"{sorted(state) if isinstance(state, Mapping) else type(state).__name__}.")
        check_number("target_sparsity", state["target_sparsity"], 0.0, 1.0, strict_maximum=True)
        target_sparsity = float(state["target_sparsity"])  # checked before anything changes
        self.load_masks(state["masks"])
        self.target_sparsity = target_sparsity

    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        """The full (unsharded) shape of every targeted weight, by name: what a masks file for it may hold."""
        return {name: tuple(self.layout.full_shape(p)) for name, p in self.params.items()}

    def load_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Replaces the masks by full-size ones (names and shapes must match the targets exactly; sharded, each
        rank keeps its rows) and applies them."""
        check_masks_match(masks, self.target_shapes())
        for name, mask in masks.items():
            local = self.layout.scatter(mask, self.params[name])
            # contiguous: the pruning events index the masks through flat views (a transposed mask has none)
            self.masks[name] = local.to(device=self.masks[name].device, dtype=torch.bool).clone(
                memory_format=torch.contiguous_format)
        self._update_follower_masks()
        self._emptied = set(self._empty_targets()) if not self.units else set()
        self.apply_()


def _warn_unprunable(module: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
    """Says which matrices of the blocks the default targets leave out because no Linear layer holds them (fused
    mixture-of-experts weights): the sparsity is reached over the targeted weights only."""
    skipped = unprunable_block_weights(module)
    if skipped and is_main_rank():
        share = sum(skipped.values()) / (sum(skipped.values()) + sum(p.numel() for p in params.values()))
        logger.warning("%d weight matrices inside the blocks are not nn.Linear / Conv1D layers and are not pruned, "
                       "such as %s (fused mixture-of-experts weights, routers): %.0f%% of the blocks' matrices. "
                       "`final_sparsity` and the reported sparsity count the targeted weights only.",
                       len(skipped), max(skipped, key=skipped.get), 100 * share)


def _warn_uniform_rounding(units: Sequence[Unit], params: Mapping[str, nn.Parameter], sparsity: float) -> None:
    """Says when `class-uniform`'s whole groups per block put a kind's final sparsity half a point or more away
    from `final_sparsity` (0 at 0.25 with 2 heads a block)."""
    for kind, reached in uniform_sparsity(units, params, sparsity).items():
        if abs(reached - sparsity) >= 0.005 and is_main_rank():
            counts = sorted({unit.num_groups for unit in units if unit.kind == kind})
            logger.warning("`final_sparsity` %s with scheme='class-uniform' prunes %.4f of the %s' weights: every "
                           "block loses round(%s x n) of its n = %s groups. Choose a final_sparsity of whole groups "
                           "(k / n), or scheme='class-blind'.", sparsity, reached, kind, sparsity,
                           " or ".join(map(str, counts)))


def _check_optimizer(optimizer: Any) -> None:
    """`optimizer` must be None or an optimizer (its `state` is cleared at newly pruned positions)."""
    if optimizer is not None and not (hasattr(optimizer, "state") and hasattr(optimizer, "param_groups")):
        raise ValueError(f"`optimizer` must be None or a torch optimizer (with `state` and `param_groups`); got "
                         f"{type(optimizer).__name__}.")


def _batch_loss(model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise ValueError(f"`dataloader` must yield dicts of keyword arguments of the model's forward (labels "
                         f"included); got a {type(batch).__name__}.")
    loss = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}).loss
    if loss is None:
        raise ValueError(f"{type(model).__name__} returned no loss for a batch of `dataloader`: its batches must "
                         "include labels.")
    return loss
