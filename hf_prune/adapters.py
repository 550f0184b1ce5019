"""peft adapters on pruned weights: which modules are adapters, and which LoRA factor entries follow a mask.

A LoRA layer computes `W x + B A x` (times its scaling); pruning `W` alone leaves the update `B A` dense, so the
adapter model is not the one `merge_and_unload()` gives. When a weight's mask removes whole output rows and input
columns (structured pruning: neurons, heads), the update is masked exactly through its factors: the rows of `B` of
the removed outputs and the columns of `A` of the removed inputs are zero, so `(B A) ⊙ M = B A` and the merged
model equals the trained one. An unstructured mask has no such factorisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from .masks import kept_along


def without_peft_wrapper(model: nn.Module) -> nn.Module:
    """The transformers model inside a `PeftModel` (whose adapted layers stay in it; also under `torch.compile`),
    else `model` itself."""
    inner = getattr(model, "_orig_mod", model)
    return inner.get_base_model() if isinstance(inner, PeftModel) else model


def adapter_modules(model: nn.Module) -> set[int]:
    """The `id`s of the modules that belong to a peft adapter (`lora_A.default`, ...) rather than to the model:
    everything inside a peft tuner layer except its base layer."""
    ids: set[int] = set()
    for _, layer in tuner_layers(model):
        base = {id(m) for m in layer.get_base_layer().modules()}
        ids.update(id(m) for m in layer.modules() if m is not layer and id(m) not in base)
    return ids


def tuner_layers(model: nn.Module) -> Iterator[tuple[str, BaseTunerLayer]]:
    """The peft tuner layers of `model` (the layers that wrap an adapted module), with their names."""
    return ((name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer))


def has_adapters(model: nn.Module) -> bool:
    """Whether `model` carries peft adapters: a `PeftModel`, or a transformers model they were injected into
    (`model.add_adapter`, `peft.inject_adapter_in_model`)."""
    return without_peft_wrapper(model) is not model or next(tuner_layers(model), None) is not None


def merge_adapters(model: nn.Module) -> nn.Module:
    """The model with its peft adapters merged into the weights they adapt: `PeftModel.merge_and_unload()`, or for
    adapters injected into a transformers model, each tuner layer merged and replaced by its base layer (in place).

    Raises:
        ValueError: when `model` has no adapters.
    """
    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, PeftModel):
        return inner.merge_and_unload()
    layers = list(tuner_layers(inner))
    if not layers:
        raise ValueError(f"{type(inner).__name__} has no peft adapters to merge.")
    for name, layer in layers:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent), child, layer.get_base_layer())
    # the marks of the adapters: with them transformers' save_pretrained would write an adapter-only folder
    inner.__dict__.pop("peft_config", None)
    if getattr(inner, "_hf_peft_config_loaded", False):
        inner._hf_peft_config_loaded = False
    return inner


def trained_copies(model: nn.Module) -> dict[int, str]:
    """The `id`s of the modules inside peft `modules_to_save` wrappers (a whole module trained as a copy of the
    original), each with its wrapper's name."""
    return {id(m): name for name, wrapper in model.named_modules() if isinstance(wrapper, AuxiliaryTrainingWrapper)
            for m in wrapper.modules() if m is not wrapper}


def adapter_kind(layer: BaseTunerLayer) -> str:
    """The peft method of a tuner layer, for messages: `"LoRA"`, `"DoRA"`, or the tuner's package (`"ia3"`)."""
    if isinstance(layer, LoraLayer):
        return "DoRA" if any(layer.use_dora.values()) or layer.lora_magnitude_vector else "LoRA"
    parts = type(layer).__module__.split(".")
    return parts[2] if parts[:2] == ["peft", "tuners"] and len(parts) > 2 else type(layer).__name__


@dataclass(frozen=True)
class Factor:
    """One LoRA factor parameter of an adapted pruned weight: `side` is `"output"` for `lora_B` (its weight's rows
    and its bias follow the weight's output features) or `"input"` for `lora_A` (its columns follow the inputs)."""

    name: str
    weight: str
    side: str
    output_dim: int


def lora_factors(layers: dict[str, BaseTunerLayer], weight_names: dict[str, str],
                 param_names: dict[int, str]) -> list[Factor]:
    """The factors of every adapter of the LoRA layers `layers` (by module name) whose base weights are pruned
    (`weight_names`: module name -> weight name); `param_names` maps `id(parameter)` to its name.

    Raises:
        ValueError: for an adapter that is not plain LoRA (DoRA, other peft methods), whose update cannot be masked.
    """
    factors = []
    for module_name, layer in layers.items():
        kind = adapter_kind(layer)
        if kind != "LoRA":
            raise ValueError(f"{module_name} carries a {kind} adapter, whose update hf_prune cannot "
                             "mask with the pruned weight; prune it under plain LoRA, exclude it (`exclude_modules`), "
                             "or merge the adapter first (merge_and_unload()).")
        output_dim = 1 if isinstance(layer.get_base_layer(), Conv1D) else 0
        weight = weight_names[module_name]
        for adapter in layer.lora_A:
            for side, factor in (("input", layer.lora_A[adapter]), ("output", layer.lora_B[adapter])):
                for param in factor.parameters():
                    factors.append(Factor(param_names[id(param)], weight, side, output_dim))
    return factors


def factor_mask(factor: Factor, weight_mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The mask of a factor parameter: the output features (or inputs) its weight's mask keeps anything of."""
    along = factor.output_dim if factor.side == "output" else 1 - factor.output_dim
    kept = kept_along(weight_mask, along)
    if param.dim() == 1:  # lora_B's bias
        return kept.clone()
    return (kept[:, None] if factor.side == "output" else kept[None, :]).expand_as(param).clone()
