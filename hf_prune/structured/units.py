"""Which weights prune together: the feed-forward neurons and attention heads of a Transformer's blocks.

A `Unit` is one feed-forward block or one attention block of one layer. It holds `num_groups` groups (neurons, or
heads), and each group is a slice of every member weight: a neuron is a row of the up / gate projections (their
input side: one output feature each) and the matching column of the down projection; a head is its `head_dim`
rows of Q / K / V and the matching columns of the output projection. With grouped-query attention a group is one
key/value head with all the query heads that share it, so every kept key/value head keeps the same number of query
heads and the result is still a standard config.

The rules below name the modules by their place inside a block; they cover BERT-style encoders (BERT, RoBERTa,
DistilBERT), GPT-2 (fused `c_attn`, `Conv1D` weights stored `(in, out)`), Llama-style decoders, T5 and BART, and the
decoders with a fused `gate_up_proj` (Phi-3 / Phi-4, GLM, GLM-4) or a fused Linear `qkv_proj` (Phi-3 / Phi-4).
A model none of them matches is a `ValueError` naming the structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..adapters import trained_copies
from ..targets import (
    Target,
    clean_name,
    describe_entry,
    find_targets,
    matches,
    prunable_modules,
    refuse_quantized,
    refuse_trained_copies,
    unmatched_entry,
    weight_class,
)


if TYPE_CHECKING:
    from ..config import PruningConfig


NEURONS, HEADS = "neurons", "heads"
STRUCTURES = ("unstructured", NEURONS, HEADS)

#: Feed-forward blocks: (the up / gate projections, the down projection), named under the same parent module.
FFN_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("intermediate.dense",), "output.dense"),  # BERT: under the layer
    (("c_fc",), "c_proj"),  # GPT-2: under `mlp`
    (("gate_proj", "up_proj"), "down_proj"),  # Llama
    (("wi_0", "wi_1"), "wo"),  # T5 v1.1 (gated)
    (("wi",), "wo"),  # T5
    (("fc1",), "fc2"),  # BART: under the layer
    (("lin1",), "lin2"),  # DistilBERT: under `ffn`
)
#: Feed-forward blocks whose gate and up projections are one Linear, its output the gate half then the up half
#: (`chunk(2)` in the model code): Phi-3 / Phi-4, GLM, GLM-4. A neuron is a row of each half and a down column.
FFN_FUSED = ("gate_up_proj", "down_proj")
#: Attention blocks: (Q, K, V, output), named under the same parent; GPT-2's fused QKV is `ATTENTION_FUSED`.
ATTENTION_RULES: tuple[tuple[str, str, str, str], ...] = (
    ("self.query", "self.key", "self.value", "output.dense"),  # BERT: under `attention`
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # Llama
    ("q_proj", "k_proj", "v_proj", "out_proj"),  # BART
    ("q", "k", "v", "o"),  # T5
    ("q_lin", "k_lin", "v_lin", "out_lin"),  # DistilBERT: under `attention`
)
ATTENTION_FUSED = ("c_attn", "c_proj")  # GPT-2: under `attn`
#: Attention blocks whose Q, K and V are one Linear, its output all query heads, then the key heads, then the value
#: heads (Phi-3 / Phi-4): (fused QKV, output), under `self_attn`.
ATTENTION_FUSED_LINEAR = ("qkv_proj", "o_proj")


@dataclass(frozen=True)
class Member:
    """The part of one weight that a unit's groups cover: along `dim` of the weight as stored, group `g` is the
    entries `offset + g * width ... offset + (g + 1) * width - 1`. `bias` is the parameter name of the bias whose
    entries belong to the groups (the same slices), when the groups run along the output features."""

    name: str
    module_name: str
    dim: int
    offset: int
    width: int
    bias: str | None = None


@dataclass(frozen=True)
class Unit:
    """One feed-forward block (`kind="neurons"`) or attention block (`kind="heads"`) of one layer."""

    kind: str
    prefix: str
    num_groups: int
    members: tuple[Member, ...]
    #: heads: the query heads in one group (1 without grouped-query attention) and the head size.
    queries_per_group: int = 1
    head_dim: int = 0

    @property
    def weight_class(self) -> str:
        """The unit's weight class: its kind and its place with the layer index removed."""
        return f"{self.kind}:{weight_class(self.prefix.rstrip('.'))}"


def _layout(module: nn.Module) -> tuple[int, int, int]:
    """`(output dim, input dim, number of output features)` of a Linear (`(out, in)`) or Conv1D (`(in, out)`)."""
    if isinstance(module, Conv1D):
        return 1, 0, module.weight.shape[1]
    return 0, 1, module.weight.shape[0]


def _bias(name: str, module: nn.Module) -> str | None:
    return f"{name}.bias" if getattr(module, "bias", None) is not None else None


def _ffn_unit(modules: dict[str, nn.Module], prefix: str, ups: Sequence[str], down: str) -> Unit | None:
    names = [prefix + up for up in ups]
    down_name = prefix + down
    if not all(n in modules for n in (*names, down_name)):
        return None
    widths = {_layout(modules[n])[2] for n in names}
    down_in = modules[down_name].weight.shape[_layout(modules[down_name])[1]]
    if len(widths) != 1 or widths != {down_in}:
        return None
    members = [Member(f"{n}.weight", n, _layout(modules[n])[0], 0, 1, _bias(n, modules[n])) for n in names]
    members.append(Member(f"{down_name}.weight", down_name, _layout(modules[down_name])[1], 0, 1))
    return Unit(NEURONS, prefix, down_in, tuple(members))


def _fused_ffn_unit(model: nn.Module, everything: dict[str, nn.Module], modules: dict[str, nn.Module],
                    prefix: str) -> Unit | None:
    fused_name, down_name = (prefix + n for n in FFN_FUSED)
    if not all(n in modules for n in (fused_name, down_name)):
        return None
    fused, down = modules[fused_name], modules[down_name]
    out_dim, _, fused_out = _layout(fused)
    down_in = down.weight.shape[_layout(down)[1]]
    if fused_out != 2 * down_in:
        return None
    halves = [Member(f"{fused_name}.weight", fused_name, out_dim, half * down_in, 1, _bias(fused_name, fused))
              for half in range(2)]
    return Unit(NEURONS, prefix, down_in, (*halves, Member(f"{down_name}.weight", down_name, _layout(down)[1], 0, 1)))


def _heads_of(attention: nn.Module | None, config: object, q_out: int, kv_out: int) -> tuple[int, int] | None:
    """`(number of query heads, head size)` of an attention block, from its module or the model config."""
    for source in (attention, config):
        if source is None:
            continue
        heads = next((getattr(source, a) for a in ("num_heads", "num_attention_heads", "n_heads", "n_head")
                      if isinstance(getattr(source, a, None), int)), None)
        head_dim = next((getattr(source, a) for a in ("head_dim", "attention_head_size", "key_value_proj_dim",
                                                       "d_kv") if isinstance(getattr(source, a, None), int)), None)
        if heads and not head_dim and q_out % heads == 0:
            head_dim = q_out // heads
        if heads and head_dim and heads * head_dim == q_out and kv_out % head_dim == 0:
            return heads, head_dim
    return None


def _query_groups(model: nn.Module, everything: dict[str, nn.Module], prefix: str, q_out: int,
                  kv_out: int) -> tuple[int, int, int] | None:
    """`(key/value heads, query heads per key/value head, head size)` of the attention block `prefix` with `q_out`
    query and `kv_out` key (and value) features, or `None` when its heads cannot be told apart."""
    heads = _heads_of(everything.get(prefix.rstrip(".")), getattr(model, "config", None), q_out, kv_out)
    if heads is None:
        return None
    num_heads, head_dim = heads
    kv_heads = kv_out // head_dim
    if num_heads % kv_heads:
        return None
    return kv_heads, num_heads // kv_heads, head_dim


def _attention_unit(model: nn.Module, everything: dict[str, nn.Module], modules: dict[str, nn.Module], prefix: str,
                    names: Sequence[str]) -> Unit | None:
    full = [prefix + n for n in names]
    if not all(n in modules for n in full):
        return None
    q, k, v, o = (modules[n] for n in full)
    q_out, kv_out = _layout(q)[2], _layout(k)[2]
    if _layout(v)[2] != kv_out or o.weight.shape[_layout(o)[1]] != q_out:
        return None
    groups = _query_groups(model, everything, prefix, q_out, kv_out)
    if groups is None:
        return None
    kv_heads, per_group, head_dim = groups
    members = [Member(f"{full[0]}.weight", full[0], _layout(q)[0], 0, per_group * head_dim, _bias(full[0], q))]
    members += [Member(f"{n}.weight", n, _layout(m)[0], 0, head_dim, _bias(n, m)) for n, m in zip(full[1:3], (k, v))]
    members.append(Member(f"{full[3]}.weight", full[3], _layout(o)[1], 0, per_group * head_dim))
    return Unit(HEADS, prefix, kv_heads, tuple(members), per_group, head_dim)


def _fused_attention_unit(model: nn.Module, everything: dict[str, nn.Module], modules: dict[str, nn.Module],
                          prefix: str) -> Unit | None:
    qkv_name, out_name = (prefix + n for n in ATTENTION_FUSED)
    if not all(n in modules for n in (qkv_name, out_name)) or not isinstance(modules[qkv_name], Conv1D):
        return None
    hidden = modules[qkv_name].weight.shape[1] // 3
    heads = _heads_of(everything.get(prefix.rstrip(".")), getattr(model, "config", None), hidden, hidden)
    if heads is None:
        return None
    num_heads, head_dim = heads
    members = tuple(Member(f"{qkv_name}.weight", qkv_name, 1, part * hidden, head_dim,
                           _bias(qkv_name, modules[qkv_name])) for part in range(3))
    return Unit(HEADS, prefix, num_heads, (*members, Member(f"{out_name}.weight", out_name, 0, 0, head_dim)), 1,
                head_dim)


def _fused_linear_attention_unit(model: nn.Module, everything: dict[str, nn.Module], modules: dict[str, nn.Module],
                                 prefix: str) -> Unit | None:
    qkv_name, out_name = (prefix + n for n in ATTENTION_FUSED_LINEAR)
    if not all(n in modules for n in (qkv_name, out_name)):
        return None
    qkv, out = modules[qkv_name], modules[out_name]
    qkv_dim, _, qkv_out = _layout(qkv)
    out_in = _layout(out)[1]
    q_out = out.weight.shape[out_in]
    kv_out, odd = divmod(qkv_out - q_out, 2)
    groups = None if odd or kv_out <= 0 else _query_groups(model, everything, prefix, q_out, kv_out)
    if groups is None:
        return None
    kv_heads, per_group, head_dim = groups
    bias = _bias(qkv_name, qkv)
    members = (Member(f"{qkv_name}.weight", qkv_name, qkv_dim, 0, per_group * head_dim, bias),
               Member(f"{qkv_name}.weight", qkv_name, qkv_dim, q_out, head_dim, bias),
               Member(f"{qkv_name}.weight", qkv_name, qkv_dim, q_out + kv_out, head_dim, bias),
               Member(f"{out_name}.weight", out_name, out_in, 0, per_group * head_dim))
    return Unit(HEADS, prefix, kv_heads, members, per_group, head_dim)


#: The rules of one fused first module, after those above: (its name, the function building the unit of a block).
_FUSED_RULES = {NEURONS: ((FFN_FUSED[0], _fused_ffn_unit),),
                HEADS: ((ATTENTION_FUSED[0], _fused_attention_unit),
                        (ATTENTION_FUSED_LINEAR[0], _fused_linear_attention_unit))}


def find_units(model: nn.Module, structures: Sequence[str]) -> list[Unit]:
    """The units of `structures` (`"neurons"`, `"heads"`) in `model`, in module order.

    Raises:
        ValueError: naming the structure when `model` has none of its units.
    """
    everything = {clean_name(name): m for name, m in model.named_modules()}
    modules = prunable_modules(model)
    units: list[Unit] = []
    seen: set[str] = set()
    for name in modules:
        for kind in structures:
            for unit in _units_named(model, everything, modules, name, kind):
                if not {m.name for m in unit.members} & seen:
                    units.append(unit)
                    seen.update(m.name for m in unit.members)
    for kind in structures:
        if not any(unit.kind == kind for unit in units):
            raise ValueError(f"`structure` {kind!r}: no {'feed-forward blocks' if kind == NEURONS else 'attention heads'}"
                             f" found in {type(model).__name__} (hf_prune knows the module names of BERT, DistilBERT, "
                             "GPT-2, Llama, Phi-3, GLM, T5 and BART blocks); use structure='unstructured'.")
    return units


def _units_named(model: nn.Module, everything: dict[str, nn.Module], modules: dict[str, nn.Module], name: str,
                 kind: str) -> list[Unit]:
    """The units of `kind` whose first member is the module `name`."""
    found = []
    if kind == NEURONS:
        for ups, down in FFN_RULES:
            if matches(name, [ups[0]]):
                unit = _ffn_unit(modules, name[:-len(ups[0])], ups, down)
                if unit is not None:
                    found.append(unit)
                    break
    else:
        for rule in ATTENTION_RULES:
            if matches(name, [rule[0]]):
                unit = _attention_unit(model, everything, modules, name[:-len(rule[0])], rule)
                if unit is not None:
                    found.append(unit)
                    break
    for first, build in _FUSED_RULES[kind]:
        if not found and matches(name, [first]):
            unit = build(model, everything, modules, name[:-len(first)])
            if unit is not None:
                found.append(unit)
    return found


def units_for(model: nn.Module, config: PruningConfig) -> list[Unit]:
    """The units `config.structure` prunes in `model`: every unit of its kinds, less those with a member module
    matched by `config.exclude_modules`.

    Raises:
        ValueError: when a kind has no unit in `model`, `exclude_modules` matches no member, nothing is left, or a
            member lies in a peft `modules_to_save` copy or stores its weight quantized.
    """
    units = find_units(model, config.structures())
    if config.exclude_modules is not None:
        entry = unmatched_entry(config.exclude_modules, (m.module_name for unit in units for m in unit.members))
        if entry is not None:
            raise ValueError(f"`exclude_modules` {describe_entry(config.exclude_modules, entry)} matches no module of "
                             f"the {config.structure!r} blocks of {type(model).__name__}.")
        kept = [u for u in units if not any(matches(m.module_name, config.exclude_modules) for m in u.members)]
        for kind in config.structures():  # each kind: with both, excluding every head must not pass unnoticed
            if not any(u.kind == kind for u in kept):
                raise ValueError(f"`exclude_modules` {config.exclude_modules!r} leaves no {kind!r} block of "
                                 f"{type(model).__name__} to prune.")
        units = kept
    modules = prunable_modules(model)
    copies = trained_copies(model)
    members = sorted({m.module_name for unit in units for m in unit.members})
    refuse_trained_copies([name for name in members if id(modules[name]) in copies])
    refuse_quantized([(name, modules[name].weight) for name in members])
    return units


def unit_targets(units: Sequence[Unit], granularity: str) -> list[Target]:
    """The weights the units prune, once each (GPT-2's fused QKV belongs to three members), as `Target`s."""
    targets: dict[str, Target] = {}
    for unit in units:
        for m in unit.members:
            targets.setdefault(m.name, Target(m.name, m.module_name, weight_class(m.module_name, granularity)))
    return list(targets.values())


def pruned_targets(model: nn.Module, config: PruningConfig, units: Sequence[Unit] | None = None) -> list[Target]:
    """The weights that pruning under `config` masks in `model`: with a `structure`, the members of its neuron /
    head units (`units`, found with `units_for` when not given); unstructured, `find_targets(model, config)`."""
    if not config.structures():
        return find_targets(model, config)
    return unit_targets(units_for(model, config) if units is None else units, config.class_granularity)
