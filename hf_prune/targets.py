"""Which parameters are pruned, and the weight class each belongs to."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters import adapter_modules, trained_copies, without_peft_wrapper
from .distributed.layouts import is_sharded


if TYPE_CHECKING:
    from .config import PruningConfig


PRUNABLE_MODULES = (nn.Linear, Conv1D)
_BLOCK_INDEX = re.compile(r"(^|\.)\d+(?=\.|$)")
_WRAPPERS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod|base_layer|original_module"
                       r"|modules_to_save\.[^.]+)(?=\.|$)")


def clean_name(name: str) -> str:
    """A module or parameter name without the wrapper levels FSDP1, activation checkpointing, `torch.compile` and
    peft's adapted layers insert (`encoder.layer.0._fsdp_wrapped_module.attention` -> `encoder.layer.0.attention`,
    `attention.self.query.base_layer.weight` -> `attention.self.query.weight`), as the unwrapped model names it. A
    peft `modules_to_save` wrapper's original and trained copy both get the wrapped module's name."""
    return _WRAPPERS.sub("", name).lstrip(".")


def named_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of `model` under the clean name `find_targets` uses (inside a peft model: the name in the
    model without adapters)."""
    return {clean_name(name): p for name, p in without_peft_wrapper(model).named_parameters()}


def prunable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The `nn.Linear` / `Conv1D` layers of `model` by clean name, in `named_modules` order, without the layers of
    peft adapters (an adapted layer's name is that of its base layer)."""
    model = without_peft_wrapper(model)
    adapters = adapter_modules(model)
    return {clean_name(name): module for name, module in model.named_modules()
            if isinstance(module, PRUNABLE_MODULES) and id(module) not in adapters}


def unprunable_block_weights(model: nn.Module) -> dict[str, int]:
    """The matrices inside the Transformer blocks that no Linear / `Conv1D` layer (nor an embedding) holds, by clean
    name, with their sizes: fused mixture-of-experts weights as transformers v5 stores them (`mlp.experts.gate_up_proj`,
    3-D), routers, convolutions. hf_prune does not prune them."""
    model = without_peft_wrapper(model)
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, (*PRUNABLE_MODULES, nn.Embedding)) or not _BLOCK_INDEX.search(module_name):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param.dim() >= 2:
                found[clean_name(f"{module_name}.{param_name}")] = param.numel()
    return found


@dataclass(frozen=True)
class Target:
    """One prunable weight: its parameter name, its module's name and its weight class."""

    name: str
    module_name: str
    weight_class: str


def matches(module_name: str, patterns: str | Sequence[str]) -> bool:
    """peft's rule: a string is a regex on the full name, a list matches exact names or dotted suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module_name) is not None
    return any(module_name == p or module_name.endswith("." + p) for p in patterns)


def unmatched_entry(patterns: str | Sequence[str], names: Iterable[str]) -> str | list[str] | None:
    """The first entry of `patterns` (a regex is one entry; a list entry comes as a one-entry list) that matches none
    of `names`, else None: each entry must match (a misspelt one would leave its modules dense, or prune those it was
    meant to keep)."""
    names = list(names)
    entries = [patterns] if isinstance(patterns, str) else [[p] for p in patterns]
    return next((entry for entry in entries if not any(matches(n, entry) for n in names)), None)


def describe_entry(patterns: str | Sequence[str], entry: str | list[str]) -> str:
    """How an error names `entry` of `patterns`: the regex or one-entry list itself, else the entry with its list."""
    if isinstance(patterns, str) or len(patterns) == 1:
        return repr(patterns if isinstance(patterns, str) else list(patterns))
    return f"entry {entry[0]!r} (of {list(patterns)!r})"


def weight_class(module_name: str, granularity: str = "role") -> str:
    """`"bert.encoder.layer.3.attention.self.query"` -> `"bert.encoder.layer.*.attention.self.query"` for
    `granularity="role"`; the module name itself for `"tensor"`."""
    if granularity == "tensor":
        return module_name
    return _BLOCK_INDEX.sub(r"\1*", module_name)


def exclusion_for(names: Sequence[str], among: Sequence[str]) -> str:
    """An `exclude_modules` value that matches exactly `names` of the modules `among`: a regex of their roles
    (`r"encoder\\.layer\\.\\d+\\.attention\\.self\\.query"`) where it matches nothing else there, else the list."""
    roles = "|".join(sorted({re.escape(weight_class(n)).replace(r"\*", r"\d+") for n in names}))
    if {n for n in among if re.fullmatch(roles, n)} == set(names):
        return f'exclude_modules=r"{roles}"'
    return f"exclude_modules={sorted(names)!r}"


def _storage(weight: torch.Tensor) -> int:
    """What tied weights share: their storage, or for a sharded weight (an FSDP2 DTensor, an FSDP1 or ZeRO-3 shard,
    whose local part may be empty, with `data_ptr()` 0) the parameter itself."""
    return id(weight) if is_sharded(weight) else weight.data_ptr()


def refuse_trained_copies(names: list[str]) -> None:
    """Raises a `ValueError` naming the modules `names` that would be pruned inside peft
    `modules_to_save` copies (a whole module trained as a copy beside the original), which hf_prune does not prune."""
    if names:
        raise ValueError(f"{names[0]} lies in a peft `modules_to_save` copy ({len(names)} such modules would be "
                         "pruned), which hf_prune does not prune: the copy trains beside a frozen original. Leave it "
                         "out (exclude_modules, prune_head=False), or train it as a LoRA target instead.")


def refuse_quantized(weights: list[tuple[str, torch.Tensor]]) -> None:
    """Raises a `ValueError` naming the modules whose weights are stored quantized (bitsandbytes' 4-bit / 8-bit
    layers, as under QLoRA): a mask on packed integers is not a mask on the weights."""
    quantized = [(n, w.dtype) for n, w in weights if not w.dtype.is_floating_point]
    if quantized:
        name, dtype = quantized[0]
        raise ValueError(f"{name} stores its weight as {dtype} ({len(quantized)} targeted modules are quantized, as "
                         "in a bitsandbytes 4-bit / 8-bit model), which hf_prune cannot mask. Prune the model in "
                         "full or half precision and quantize it afterwards, or leave these modules out "
                         "(`exclude_modules`).")


def find_targets(model: nn.Module, config: PruningConfig) -> list[Target]:
    """The weights `config` prunes in `model`, in `named_modules` order, by clean name (`named_weights(model)` maps
    them to the parameters).

    By default: the weights of the `nn.Linear` / GPT-2 `Conv1D` layers inside the Transformer blocks (modules
    under an indexed `ModuleList`, such as `encoder.layer.3`), so embeddings, LayerNorms, biases, the pooler
    and the task head are left alone. `prune_head=True` adds the Linear layers outside the blocks. A weight
    shared with an embedding (a tied LM head) is never a target, nor are the layers of peft adapters (an adapted
    layer's weight is named as in the model without adapters). `target_modules` selects among those layers (the
    blocks', and with `prune_head` the others) instead of taking them all, and `exclude_modules` removes modules
    from the selection.

    Raises:
        ValueError: when `target_modules` or `exclude_modules` matches no prunable module, nothing is left, a
            target sits in a peft `modules_to_save` copy, or its weight is stored quantized (an integer dtype).
    """
    model = without_peft_wrapper(model)
    modules = prunable_modules(model)
    seen = {_storage(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    candidates, tied = [], []
    for name, module in modules.items():  # a weight shared with an embedding, or an earlier layer: not a target
        (tied if _storage(module.weight) in seen else candidates).append((name, module))
        seen.add(_storage(module.weight))
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or Conv1D layers (other than tied embeddings) "
                         "to prune.")
    names = [name for name, _ in candidates]
    shared = f" ({', '.join(n for n, _ in tied)}: tied to an embedding or another layer, never pruned)" if tied else ""
    in_scope = [n for n in names if config.prune_head or _BLOCK_INDEX.search(n)]
    if config.target_modules is not None:
        entry = unmatched_entry(config.target_modules, in_scope)
        if entry is not None:
            outside = [n for n in names if n not in in_scope and matches(n, entry)]
            hint = (f" inside the Transformer blocks (it matches {outside[:3]}, outside them: set prune_head=True "
                    "to prune those)" if outside else "")
            raise ValueError(f"`target_modules` {describe_entry(config.target_modules, entry)} matches no prunable "
                             f"Linear/Conv1D module{hint} of {type(model).__name__}{shared}; candidates include "
                             f"{names[:6]} (a string is a regular expression over the whole module name, a list "
                             "holds name suffixes).")
        selected = [n for n in in_scope if matches(n, config.target_modules)]
    else:
        selected = in_scope
    if config.exclude_modules is not None:  # naming a tied layer (never pruned anyway) is fine
        entry = unmatched_entry(config.exclude_modules, modules)
        if entry is not None:
            raise ValueError(f"`exclude_modules` {describe_entry(config.exclude_modules, entry)} matches no "
                             f"Linear/Conv1D module of {type(model).__name__}; candidates include {names[:6]} (a "
                             "string is a regular expression over the whole module name, a list holds name "
                             "suffixes).")
        excluded = {n for n in modules if matches(n, config.exclude_modules)}
        selected = [n for n in selected if n not in excluded]
    if not selected:
        raise ValueError(f"No weights of {type(model).__name__} are left to prune with target_modules="
                         f"{config.target_modules!r}, exclude_modules={config.exclude_modules!r}, prune_head="
                         f"{config.prune_head} (no Linear layer sits inside an indexed block); set `target_modules`.")
    copies = trained_copies(model)
    refuse_trained_copies([n for n, module in candidates if n in selected and id(module) in copies])
    refuse_quantized([(n, module.weight) for n, module in candidates if n in selected])
    return [Target(f"{n}.weight", n, weight_class(n, config.class_granularity)) for n in selected]
