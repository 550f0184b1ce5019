"""Swapping a pruned model's masked Linear layers for `SparseLinear` where that pays, and back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import has_adapters
from ..targets import PRUNABLE_MODULES, clean_name
from .selection import (
    DEFAULT_MIN_SPARSITY,
    DEFAULT_MIN_SPEEDUP,
    DEFAULT_NUM_TOKENS,
    DEFAULT_REPEATS,
    KernelChoice,
    check_selection_options,
    select_kernel,
)
from .sparse_linear import SparseLinear


@dataclass(frozen=True)
class SparseInferenceReport:
    """What `to_sparse_inference` did with each targeted layer, in model order; `str(report)` is a table.

    Args:
        choices (`tuple[KernelChoice, ...]`): one decision per targeted layer.
        num_threads (`int`): `torch.get_num_threads()` during the conversion (measured decisions depend on it).
    """

    choices: tuple[KernelChoice, ...]
    num_threads: int

    @property
    def converted(self) -> list[str]:
        """Names of the layers that now multiply with a sparse weight."""
        return [c.layer for c in self.choices if c.is_sparse]

    @property
    def kept_dense(self) -> list[str]:
        """Names of the targeted layers left dense."""
        return [c.layer for c in self.choices if not c.is_sparse]

    def to_markdown(self) -> str:
        rows = [f"| {c.layer} | {c.sparsity:.1%} | {c.spec or 'dense'} | "
                f"{'-' if c.speedup is None else f'{c.speedup:.2f}x'} | {c.reason} |" for c in self.choices]
        return "\n".join(["| layer | sparsity | kernel | measured speedup | reason |", "|---|---|---|---|---|", *rows])

    def __str__(self) -> str:
        width = max([len(c.layer) for c in self.choices] + [5])
        lines = [f"{len(self.converted)} of {len(self.choices)} layers sparse ({self.num_threads} thread{'s' if self.num_threads != 1 else ''})"]
        lines += [f"{c.layer:<{width}}  {c.sparsity:6.1%}  {str(c.spec or 'dense'):<26}  "
                  f"{'' if c.speedup is None else f'{c.speedup:5.2f}x'}" for c in self.choices]
        return "\n".join(lines)


def _layer_names(masks: Mapping[str, torch.Tensor], layers: Sequence[str] | None) -> list[str]:
    if layers is None:
        return [name.removesuffix(".weight") for name in masks if name.endswith(".weight")]
    if isinstance(layers, str):
        raise ValueError(f"`layers` must be a list of module names, not the string {layers!r}.")
    if not isinstance(layers, (list, tuple)) or not all(isinstance(name, str) for name in layers):
        raise ValueError(f"`layers` must be a list of module names (str) or None; got {layers!r}.")
    return list(dict.fromkeys(name.removesuffix(".weight") for name in layers))


def to_sparse_inference(model: nn.Module, masks: Mapping[str, torch.Tensor], layers: Sequence[str] | None = None,
                        kernel: str = "auto", measure: bool = True, num_tokens: int = DEFAULT_NUM_TOKENS,
                        repeats: int = DEFAULT_REPEATS, min_speedup: float = DEFAULT_MIN_SPEEDUP,
                        min_sparsity: float = DEFAULT_MIN_SPARSITY) -> SparseInferenceReport:
    """Replaces the masked `nn.Linear` / `Conv1D` layers of `model` by `SparseLinear` where `select_kernel` finds
    that a sparse kernel pays, in place, and puts the model in eval mode; returns the report.

    Everything is checked, and every decision made, before the first layer is replaced: on a `ValueError` the
    model is unchanged. The converted model is for inference: a backward pass through a `SparseLinear` raises
    (`restore_dense_layers` undoes the conversion).

    Args:
        model (`nn.Module`): the model, its pruned weights zero (merge a peft model's adapters first).
        masks (`Mapping[str, torch.Tensor]`): the pruning masks, keyed by weight name (`"<layer>.weight"`).
        layers (`Sequence[str]`, *optional*): module names of the layers to consider, all masked; by default every
            masked layer.
        kernel, measure, num_tokens, repeats, min_speedup, min_sparsity: see `select_kernel`.

    Raises:
        ValueError: for no masks, a peft model, a layer that is not a module of the model, not an `nn.Linear` /
            `Conv1D` (e.g. one already converted), without a mask, tied to another module's weight or on the meta
            device, or an invalid option.
    """
    check_selection_options(kernel, measure, num_tokens, repeats, min_speedup, min_sparsity)
    if not masks:
        raise ValueError(f"{type(model).__name__} has no pruning masks: there is nothing to make sparse.")
    if has_adapters(model):
        raise ValueError("to_sparse_inference does not convert the layers of a peft model; merge the adapters "
                         "first (PrunedModel.merge_and_unload()).")
    names = {clean_name(name): name for name, _ in model.named_modules()}
    modules = dict(model.named_modules())
    shared: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(name)
    selected = []
    for layer in _layer_names(masks, layers):
        module = modules[names[layer]] if layer in names else None
        if module is None:
            raise ValueError(f"Layer {layer!r} is not a module of {type(model).__name__}.")
        if not isinstance(module, PRUNABLE_MODULES):
            hint = (" (already converted; restore_dense_layers(model) undoes it)" if isinstance(module, SparseLinear)
                    else "")
            raise ValueError(f"Layer {layer!r} is a {type(module).__name__}{hint}, not an nn.Linear or Conv1D: "
                             "only those can multiply with a sparse weight.")
        if f"{layer}.weight" not in masks:
            raise ValueError(f"Layer {layer!r} has no pruning mask; masked layers include "
                             f"{list(masks)[:3]}.")
        tied = [name for name in shared.get(id(module.weight), ()) if clean_name(name) != f"{layer}.weight"]
        if tied:
            raise ValueError(f"Layer {layer!r} shares its weight with {tied[0]} (tied embeddings): a sparse copy "
                             "would untie them; leave it out of `layers`.")
        if module.weight.is_meta:
            raise ValueError(f"Layer {layer!r} is on the meta device (a sharded or not yet loaded model).")
        selected.append((layer, module))
    options = {"kernel": kernel, "measure": measure, "num_tokens": num_tokens, "repeats": repeats,
               "min_speedup": min_speedup, "min_sparsity": min_sparsity}
    choices = [select_kernel(module, layer, **options) for layer, module in selected]
    replacements = {layer: SparseLinear.from_module(module, choice.spec)
                    for (layer, module), choice in zip(selected, choices) if choice.is_sparse}
    model.eval()
    for layer, replacement in replacements.items():
        parent, _, child = names[layer].rpartition(".")
        setattr(model.get_submodule(parent), child, replacement)
    return SparseInferenceReport(tuple(choices), torch.get_num_threads())


def restore_dense_layers(model: nn.Module) -> list[str]:
    """Replaces every `SparseLinear` of `model` by the `nn.Linear` / `Conv1D` it computes (trainable again), in
    place; returns their module names."""
    restored = [name for name, module in model.named_modules() if isinstance(module, SparseLinear)]
    for name in restored:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, model.get_submodule(name).to_dense_module())
    return restored
