"""Han et al. 2015's dropout ratio adjustment for pruned layers: `D_r = D_o · √(C_r / C_o)` (Eq. 2)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from ..masks import check_masks_match


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
        ValueError: when a mask names a parameter `model` does not have, or no config holds a dropout's `D_o`;
            no dropout is changed then.
    """
    ratios = dropout_ratios(model, masks)
    for (module, attribute), ratio in ratios.items():
        dropout = getattr(module, attribute)
        if isinstance(dropout, nn.Dropout):
            dropout.p = ratio
        else:
            setattr(module, attribute, ratio)
    names = {id(module): name for name, module in model.named_modules()}
    return {f"{names[id(module)]}.{attribute}": ratio for (module, attribute), ratio in ratios.items()}


def unadjusted_dropouts(model: nn.Module) -> dict[str, float]:
    """The non-zero dropout ratios of `model.config` (keys naming a dropout: `*dropout*`, `*pdrop*`) when no module
    of `model` has a `DROPOUT_RULES` entry, so that `apply_dropout_adjustment` leaves them all as they are (BART,
    whose dropouts are functional calls on config values); empty otherwise."""
    if any(type(module).__name__ in DROPOUT_RULES for module in model.modules()):
        return {}
    config = getattr(model, "config", None)
    values = config.to_dict() if hasattr(config, "to_dict") else {}
    return {key: value for key, value in sorted(values.items()) if ("dropout" in key or "pdrop" in key)
            and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0}


def dropout_ratios(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[tuple[nn.Module, str], float]:
    """The ratio `apply_dropout_adjustment` gives each known dropout of `model`, keyed `(module, attribute)`,
    changing nothing. `D_o` is read from the config of the innermost model holding the module (the encoder's or
    the decoder's in an `EncoderDecoderModel`).

    Raises:
        ValueError: when a mask names a parameter `model` does not have, or no config holds a dropout's `D_o`.
    """
    params = dict(model.named_parameters())
    check_masks_match(masks, {name: tuple(p.shape) for name, p in params.items()}, require_all=False)
    kept_by_weight = {id(params[name]): int(mask.sum()) for name, mask in masks.items()}
    configs = [(name, module.config) for name, module in model.named_modules() if hasattr(module, "config")]
    configs.sort(key=lambda item: -len(item[0]))  # innermost first
    ratios = {}
    for name, module in model.named_modules():
        for rule in DROPOUT_RULES.get(type(module).__name__, ()):
            weights = [module.get_submodule(driver).weight for driver in rule.drivers]
            original = sum(w.numel() for w in weights)
            remaining = sum(kept_by_weight.get(id(w), w.numel()) for w in weights)
            holders = [config for prefix, config in configs if not prefix or name == prefix
                       or name.startswith(prefix + ".")]
            config = next((c for c in holders if hasattr(c, rule.config_key)), None)
            if config is None:
                raise ValueError(f"No config of {type(model).__name__} holds `{rule.config_key}`, the original "
                                 f"dropout of {name}.{rule.attribute}; set HanConfig(adjust_dropout=False) to "
                                 "leave the dropouts as they are.")
            ratios[(module, rule.attribute)] = float(getattr(config, rule.config_key)) * math.sqrt(remaining / original)
    return ratios
