"""Rebuilding a model for a changed config (fewer neurons, heads or blocks) from the tensors of the original: what
`shrink` and `drop_layers` share.

The new model is built on the meta device, so nothing is initialised at random and no random number is drawn; every
parameter and buffer (the non-persistent ones, such as rotary frequencies, too) is then a copy of its counterpart in
the original, with its dtype and device. What lives beside the weights is carried over as well: which parameters
train (`requires_grad`), each module's train / eval mode, gradient checkpointing, and the generation config. Hooks
registered on the original's modules are not: register them on the new model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..adapters import has_adapters


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of `model` by name: its state dict (tied weights under each of their names) and its
    non-persistent buffers."""
    tensors = dict(model.state_dict())
    for name, buffer in model.named_buffers(remove_duplicate=False):
        tensors.setdefault(name, buffer.detach())
    return tensors


def _non_persistent_buffers(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(module, buffer name, full name) of each non-persistent buffer of `model`."""
    found = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        for leaf in module._non_persistent_buffers_set:
            if module._buffers.get(leaf) is not None:
                found.append((module, leaf, f"{module_name}.{leaf}" if module_name else leaf))
    return found


def _listing(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_transformers_model(model: nn.Module, action: str) -> None:
    """Raises a `ValueError` saying how to unwrap `model` when it is not a transformers `PreTrainedModel`."""
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"{action} needs a transformers model (a PreTrainedModel); got {type(model).__name__}. Merge "
                         "peft adapters first (merge_and_unload()), or pass the model inside a wrapper "
                         "(PrunedModel.model, a compiled model's _orig_mod).")
    if has_adapters(model):
        raise ValueError(f"{action} needs a transformers model without peft adapters; this {type(model).__name__} "
                         "carries some (add_adapter / inject_adapter_in_model): merge them first "
                         "(PrunedModel.merge_and_unload()).")


def rebuild(model: nn.Module, config: Any, origin: Callable[[str], str],
            select: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
            dropped: Callable[[str], bool] = lambda name: False, action: str = "rebuild") -> nn.Module:
    """A new model of `type(model)` for `config`, each of its tensors a copy of the tensor of `model` named
    `origin(name)` (passed through `select(name, tensor)` when given, e.g. to keep some rows).

    Names, shapes and coverage are checked on the meta-device model before anything is copied: every tensor the new
    model has must have a counterpart of the shape it needs, and every tensor of `model` must be used unless
    `dropped(name)` (the tensors of removed blocks).

    Args:
        model (`PreTrainedModel`): the original; left as it is.
        config (`PretrainedConfig`): the new model's config.
        origin (`Callable[[str], str]`): the name in `model` of a parameter, buffer or module of the new model.
        select (`Callable`, *optional*): the part of an original tensor the new model keeps.
        dropped (`Callable[[str], bool]`, *optional*): whether a tensor of `model` is meant to go.
        action (`str`, *optional*): what is done, for error messages (`"shrink()"`, `"drop_layers"`).

    Raises:
        ValueError: naming the tensors when the new model's tensors do not correspond one to one to the kept
            tensors of `model` (the architecture's blocks differ by position) or a shape does not fit.
    """
    check_transformers_model(model, action)
    originals = named_tensors(model)
    offloaded = [name for name, tensor in originals.items() if tensor.is_meta]
    if offloaded:
        raise ValueError(f"{action}: {_listing(offloaded)} of {type(model).__name__} hold no data (meta tensors: "
                         "weights offloaded with a device_map, or a model not loaded yet); load the whole model onto "
                         "its devices first.")
    with torch.device("meta"):
        new = type(model)(config)
    wanted = named_tensors(new)
    missing = [name for name in wanted if origin(name) not in originals]
    used = {origin(name) for name in wanted}
    unused = [name for name in originals if name not in used and not dropped(name)]
    if missing or unused:
        raise ValueError(
            f"{action} cannot rebuild {type(model).__name__} for its new config: "
            + (f"the new model has {_listing(missing)} with no counterpart in the original" if missing else "")
            + ("; " if missing and unused else "")
            + (f"{_listing(unused)} of the original would be left unused" if unused else "")
            + ". Its blocks are not all alike (some depend on their position), which hf_prune does not know how to "
              "renumber for this architecture.")
    tensors: dict[str, torch.Tensor] = {}
    copies: dict[tuple, torch.Tensor] = {}  # tied weights stay one tensor
    for name, expected in wanted.items():
        source = originals[origin(name)].detach()
        tensor = source if select is None else select(name, source)
        if tensor.shape != expected.shape:
            raise ValueError(f"{action}: {name} of the new {type(model).__name__} is {tuple(expected.shape)}, its "
                             f"counterpart {origin(name)} gives {tuple(tensor.shape)}.")
        if tensor.untyped_storage().data_ptr() != source.untyped_storage().data_ptr():
            tensors[name] = tensor  # already a new tensor (rows selected)
            continue
        key = (tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride())
        if key not in copies:
            copies[key] = tensor.clone()
        tensors[name] = copies[key]
    new.load_state_dict({name: tensors[name] for name in new.state_dict()}, strict=True, assign=True)
    for module, leaf, name in _non_persistent_buffers(new):
        module._buffers[leaf] = tensors[name]
    new.tie_weights()
    trainable = {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}
    for name, parameter in new.named_parameters():
        parameter.requires_grad_(trainable.get(origin(name), True))
    modules = dict(model.named_modules())
    for name, module in new.named_modules():
        source = modules.get(origin(name)) if name else model
        module.training = source.training if source is not None else model.training
        if getattr(source, "gradient_checkpointing", False):
            module.gradient_checkpointing = True
            if hasattr(source, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = source._gradient_checkpointing_func
    if getattr(model, "generation_config", None) is not None and hasattr(new, "generation_config"):
        new.generation_config = copy.deepcopy(model.generation_config)
    return new
