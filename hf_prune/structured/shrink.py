"""`shrink`: a structured-pruned model rebuilt without its pruned neurons and heads, as an ordinary transformers
model with a standard config (`intermediate_size`, `num_attention_heads`, ...), smaller and faster in plain
transformers.

A standard config has one width per kind for all layers, so every layer must keep the same number of neurons (and
of heads): prune with `scheme="class-uniform"`. Heads shrink only where the config states the head size apart from
the hidden size (`head_dim`, as Llama-style configs do, or as Phi-3's model code reads it when set); BERT-, GPT-2-
and BART-style configs derive it from `hidden_size / num_attention_heads`, and T5 shares one relative position bias
across its layers, so for those `shrink` raises a `ValueError` that says which option gives a portable model (`structure="neurons"`).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .rebuild import check_transformers_model, rebuild
from .selection import group_view
from .units import HEADS, NEURONS, Member, Unit, find_units


#: Config keys that hold the feed-forward width, in the order they are looked for.
WIDTH_KEYS = ("intermediate_size", "n_inner", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_dim",
              "hidden_dim")


def kept_groups(unit: Unit, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The indices of the groups of `unit` that `masks` keep.

    Raises:
        ValueError: when a group is pruned in part (the masks are not those of whole neurons / heads).
    """
    states = [group_view(masks[m.name], m, unit.num_groups) for m in unit.members]
    kept = torch.stack([s.any(1) for s in states]).cpu()
    whole = torch.stack([s.all(1) | ~s.any(1) for s in states]).cpu()
    if not bool(whole.all()) or not bool((kept == kept[0]).all()):
        raise ValueError(f"The masks of {unit.prefix.rstrip('.')} prune parts of {unit.kind}, not whole ones: shrink "
                         "needs masks from a structured run (PruningConfig(structure=...)) with nothing pruned "
                         "inside the kept groups.")
    return kept[0].nonzero().view(-1)


def _width_key(config: object, unit: Unit) -> str:
    """The config key holding the feed-forward width of `unit`."""
    if hasattr(config, "encoder_ffn_dim") and hasattr(config, "decoder_ffn_dim"):
        return "decoder_ffn_dim" if "decoder" in unit.prefix.split(".") else "encoder_ffn_dim"
    for key in WIDTH_KEYS:
        if hasattr(config, key) and getattr(config, key) in (unit.num_groups, None):
            return key
    raise ValueError(f"{type(config).__name__} has no feed-forward width key ({', '.join(WIDTH_KEYS)}) of "
                     f"{unit.num_groups} for {unit.prefix.rstrip('.')}; shrink cannot express the result.")


def _config_key(config: object, unit: Unit) -> str:
    """The config key holding the width of `unit`: its feed-forward width, or `num_key_value_heads`."""
    return _width_key(config, unit) if unit.kind == NEURONS else "num_key_value_heads"


#: Llama-style configs (`head_dim`, `num_key_value_heads`) whose model code couples heads by position: why.
_COUPLED_HEADS = {"diffllama": "pairs its attention heads by position (differential attention: head i with head "
                               "i + num_heads / 2), so removing some would pair the others differently"}


#: Configs without a `head_dim` field whose model code reads `config.head_dim` when it is set (falling back to
#: hidden_size / num_attention_heads), so shrink() can state the head size: Phi-3 / Phi-4.
_HEAD_DIM_WHEN_SET = ("phi3",)


def heads_unexpressible(model: nn.Module, units: Sequence[Unit]) -> str | None:
    """Why a model like `model` with fewer attention heads in `units` is not a standard config of its kind, or
    `None` when it is: configs with an explicit `head_dim` (or whose model code reads one when set) and
    `num_key_value_heads` (Llama-style, Phi-3) whose attention modules hold nothing across the heads besides the
    heads' own projections."""
    config = getattr(model, "config", None)
    if config is None or not any(unit.kind == HEADS for unit in units):
        return None
    why = _COUPLED_HEADS.get(getattr(config, "model_type", None))
    states_head_dim = "head_dim" in getattr(config, "to_dict", dict)() \
        or getattr(config, "model_type", None) in _HEAD_DIM_WHEN_SET
    if why is None and states_head_dim and hasattr(config, "num_key_value_heads"):
        across = _across_heads(model, [unit for unit in units if unit.kind == HEADS])
        if across is None:
            return None
        why = (f"has {across}, sized by all the heads of its layer (per-head gates or attention sinks, or a norm "
               "over the whole query or key as in Olmo2, where the kept heads would compute differently)")
    why = why or ("shares one relative position bias across its layers"
                  if hasattr(config, "relative_attention_num_buckets")
                  else "derives the head size from hidden_size / num_attention_heads")
    return (f"{type(config).__name__} {why}, so a model with fewer heads is not a standard config of it: shrink() "
            "cannot remove pruned heads. Prune with structure='neurons' for a portable shrunk model, or keep the "
            "head masks (PrunedModel) without shrinking.")


def widths_unexpressible(model: nn.Module, scheme: str, units: Sequence[Unit]) -> str | None:
    """Why `shrink()` will refuse `model` pruned over `units` under `scheme`, or `None`: the layers can keep
    different widths, which no standard config expresses (`_new_config` refuses them). `class-blind` ranks the
    groups of every layer together; and blocks left out of `units` (`exclude_modules`) keep their full width beside
    pruned blocks that share their config key."""
    kinds = [unit.kind for unit in units]
    if not units:
        return None
    if scheme == "class-blind" and any(kinds.count(kind) > 1 for kind in set(kinds)):
        return ("scheme='class-blind' ranks the groups of every layer together, so the layers can keep different "
                "widths, which no standard config expresses: shrink() will refuse the model. Use "
                "scheme='class-uniform' for a model that shrinks.")
    pruned = {unit.prefix for unit in units}
    left_out = [u for u in find_units(model, sorted(set(kinds))) if u.prefix not in pruned]
    return _left_out_reason(getattr(model, "config", None), units, left_out)


def _left_out_reason(config: object, units: Sequence[Unit], left_out: Sequence[Unit]) -> str | None:
    """Why the blocks `left_out` of pruning (`exclude_modules`) make the shrunk model inexpressible, or `None`:
    they keep their full width beside pruned `units` with the same config key (a decoder left out whole keeps its
    own key, `decoder_ffn_dim`)."""
    if config is None or not left_out:
        return None
    try:
        keys = {_config_key(config, unit) for unit in units}
        beside = [u for u in left_out if _config_key(config, u) in keys]
    except ValueError:  # no width key: shrink() says so itself
        return None
    if not beside:
        return None
    return (f"{len(beside)} blocks left out of pruning (`exclude_modules`), such as {beside[0].prefix.rstrip('.')}, "
            f"keep their full width beside pruned ones of the same config key ({_config_key(config, beside[0])}), "
            "which no standard config expresses, so shrink() refuses the model. Prune every block of the kind, or "
            "remove whole blocks with drop_layers.")


def _across_heads(model: nn.Module, units: Sequence[Unit]) -> str | None:
    """The first parameter of an attention module of `units`, outside the heads' projections, with a dimension as
    wide as all its (key/value or query) heads, as `name (shape)`: shrink() would not slice it."""
    for unit in units:
        prefix = unit.prefix.rstrip(".")
        projections = tuple(f"{m.module_name}." for m in unit.members)
        heads = {unit.num_groups, unit.num_groups * unit.queries_per_group}
        widths = (heads | {n * unit.head_dim for n in heads}) - {unit.head_dim}  # a norm shared by the heads: fine
        for name, param in model.get_submodule(prefix).named_parameters():
            full = f"{prefix}.{name}"
            if not full.startswith(projections) and any(size in widths for size in param.shape):
                return f"{full} {tuple(param.shape)}"
    return None


def _new_config(model: nn.Module, units: Sequence[Unit], kept: Mapping[str, torch.Tensor],
                left_out: Sequence[Unit]) -> object:
    """A copy of the model's config with the kept widths; every unit of a config key, including those `left_out`
    of pruning (full width), must keep the same count."""
    config = copy.deepcopy(model.config)
    widths: dict[str, set[int]] = defaultdict(set)
    for unit in (*units, *left_out):
        width = len(kept[unit.prefix]) if unit.prefix in kept else unit.num_groups
        widths[_config_key(config, unit)].add(width)
    uneven = {key: sorted(values) for key, values in widths.items() if len(values) > 1}
    reason = _left_out_reason(config, units, left_out) if uneven else None
    if reason:
        raise ValueError(f"The layers keep different widths ({uneven}): {reason}")
    if uneven:
        raise ValueError(f"The layers keep different widths ({uneven}), which a standard config cannot express: "
                         "prune with scheme='class-uniform' so that every layer keeps the same number of neurons and "
                         "heads.")
    for key, (width,) in widths.items():
        if width == 0:
            what = "attention head" if key == "num_key_value_heads" else "feed-forward neuron"
            raise ValueError(f"Every {what} of every layer is pruned ({key}=0), which no config can express (the "
                             "model code divides by it or initialises an empty layer). Prune a lower "
                             "`final_sparsity`, or remove whole blocks with drop_layers.")
        if key == "num_key_value_heads":
            per_group = next(u.queries_per_group for u in units if u.kind == HEADS)
            config.head_dim = next(u.head_dim for u in units if u.kind == HEADS)
            config.num_attention_heads = width * per_group
        setattr(config, key, width)
    validate = getattr(config, "validate", None)  # transformers' own checks, which save_pretrained runs
    if validate is not None:
        try:
            validate()
        except Exception as err:  # huggingface_hub's StrictDataclassClassValidationError wraps the reason
            reason = str(err).strip().splitlines()[-1].strip()
            raise ValueError(f"The shrunk config ({', '.join(f'{key}={w}' for key, (w,) in widths.items())}) is "
                             f"refused by {type(config).__name__}: {reason} Prune to a width it accepts (another "
                             "`final_sparsity`), or keep the masked PrunedModel, which saves and loads at full "
                             "width.") from None
    return config


def _entries(members: Sequence[Member], groups: torch.Tensor) -> torch.Tensor:
    """The positions, along the members' dimension, of the kept groups of every member (in offset order)."""
    ordered = sorted(members, key=lambda m: m.offset)
    return torch.cat([(m.offset + groups[:, None] * m.width + torch.arange(m.width)).reshape(-1) for m in ordered])


def shrink(model: nn.Module, masks: Mapping[str, torch.Tensor], units: Sequence[Unit]) -> nn.Module:
    """A new model of the same class without the pruned groups of `units`, with its config updated; every tensor
    keeps its dtype and device, and which parameters train, gradient checkpointing and the generation config carry
    over (`rebuild`).

    Args:
        model (`PreTrainedModel`): the structured-pruned model (pruned weights are zeros).
        masks (`dict[str, torch.Tensor]`): its masks (whole groups pruned).
        units (`list[Unit]`): the units the masks were made over (`hf_prune.structured.units.units_for`).

    Raises:
        ValueError: for a model that is not a transformers model (a peft model: merge it first), when `masks`
            lack a member weight of `units` (masks made under another config), when a group is
            pruned in part, the layers keep different widths (blocks left out by `exclude_modules` keep their
            full width), every head is pruned, or the config cannot express fewer heads; the model is left as it
            is.
    """
    check_transformers_model(model, "shrink()")
    missing = sorted({m.name for unit in units for m in unit.members} - masks.keys())
    if missing:
        raise ValueError(f"The masks have no mask for {len(missing)} weights of the units to shrink, such as "
                         f"{missing[0]}: they were made under another `structure` or `exclude_modules` than the "
                         "pruning config's. Wrap them with the config of the run that made them.")
    reason = heads_unexpressible(model, units)
    if reason:
        raise ValueError(reason)
    kept = {unit.prefix: kept_groups(unit, masks) for unit in units}
    left_out = [u for u in find_units(model, sorted({u.kind for u in units})) if u.prefix not in kept]
    config = _new_config(model, units, kept, left_out)
    index: dict[str, tuple[int, torch.Tensor]] = {}
    for unit in units:
        by_param: dict[str, list[Member]] = defaultdict(list)
        for member in unit.members:
            by_param[member.name].append(member)
        for name, members in by_param.items():
            index[name] = (members[0].dim, _entries(members, kept[unit.prefix]))
            if members[0].bias is not None:
                index[members[0].bias] = (0, index[name][1])

    def select(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in index:
            return tensor
        dim, positions = index[name]
        return tensor.index_select(dim, positions.to(tensor.device))

    return rebuild(model, config, origin=lambda name: name, select=select, action="shrink()")
