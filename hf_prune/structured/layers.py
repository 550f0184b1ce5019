"""Whole-block removal: `drop_layers` rebuilds a model without some of its Transformer blocks, as an ordinary
transformers model whose config says how many are left (`num_hidden_layers`, `n_layer`, `num_layers` /
`num_decoder_layers`, `encoder_layers` / `decoder_layers`), and `block_influence` scores the blocks on calibration
batches so that the least useful ones can be chosen.

Block influence (Men et al. 2024, "ShortGPT") is `BI_i = 1 - E_t[cos(x_t, y_t)]`, the mean over the (non-padding)
tokens `t` of one minus the cosine similarity between block `i`'s input `x_t` and output `y_t`: a block that
barely turns its input changes the model least when it goes.

```python
scores = block_influence(model, calibration_batches)   # {"bert.encoder.layer": [0.21, 0.08, ...]}
layers = sorted(range(6), key=scores["bert.encoder.layer"].__getitem__)[:2]
small = drop_layers(model, layers)                      # then fine-tune it (with neuron pruning, distillation)
```
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..batches import model_inputs
from ..targets import clean_name, matches
from .rebuild import rebuild


logger = logging.getLogger(__name__)


#: The block stacks hf_prune knows: (the ModuleList's name, or the end of it, and the config key of its length),
#: the longer names first.
STACK_RULES: tuple[tuple[str, str], ...] = (
    ("encoder.layer", "num_hidden_layers"),  # BERT-style encoders
    ("transformer.layer", "n_layers"),  # DistilBERT
    ("encoder.block", "num_layers"),  # T5
    ("decoder.block", "num_decoder_layers"),  # T5
    ("encoder.layers", "encoder_layers"),  # BART
    ("decoder.layers", "decoder_layers"),  # BART
    ("h", "n_layer"),  # GPT-2
    ("layers", "num_hidden_layers"),  # Llama-style decoders
)


def find_stacks(model: nn.Module) -> dict[str, str]:
    """The block stacks of `model`: the name of each `nn.ModuleList` of Transformer blocks, with the config key that
    holds its length, in module order.

    Raises:
        ValueError: when `model` has no stack hf_prune knows.
    """
    config = getattr(model, "config", None)
    stacks = {}
    for raw_name, module in model.named_modules():
        name = clean_name(raw_name)
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        for suffix, key in STACK_RULES:
            if matches(name, [suffix]) and getattr(config, key, None) == len(module):
                stacks[name] = key
                break
    if not stacks:
        raise ValueError(f"No stack of Transformer blocks found in {type(model).__name__} (hf_prune knows the block "
                         "lists of BERT, DistilBERT, GPT-2, Llama, T5 and BART models), so `drop_layers` cannot remove any.")
    return stacks


def _layers_by_stack(model: nn.Module, layers: Sequence[int] | Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """`layers` as sorted block indices per stack name, checked against `model`."""
    stacks = find_stacks(model)
    if not isinstance(layers, Mapping):
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise ValueError(f"`layers` must be a list of block indices (or, per stack, a dict of them); got "
                             f"{layers!r}.")
        if len(stacks) > 1:
            raise ValueError(f"`layers` must be a dict of block indices per stack for {type(model).__name__}, which "
                             f"has {len(stacks)} ({', '.join(stacks)}); got {layers!r}.")
        layers = {next(iter(stacks)): layers}
    unknown = sorted(set(layers) - set(stacks))
    if unknown:
        raise ValueError(f"`layers` names {', '.join(unknown)}, not a block stack of {type(model).__name__}; its "
                         f"stacks are {', '.join(stacks)}.")
    found = {}
    for name, given in layers.items():
        count = len(model.get_submodule(name))
        indices = _block_indices(given)
        if indices is None or any(not 0 <= i < count for i in indices) or len(set(indices)) != len(indices):
            raise ValueError(f"`layers` of {name} must be distinct block indices in [0, {count - 1}]; got "
                             f"{given!r}.")
        if len(indices) == count:
            raise ValueError(f"`layers` of {name} would remove all {count} of its blocks; keep at least one.")
        if indices:
            found[name] = sorted(indices)
    if not found:
        raise ValueError(f"`layers` names no block to remove; got {layers!r}.")
    return found


def _block_indices(given: Any) -> list[int] | None:
    """`given` as a list of Python ints (from ints, numpy or 0-d torch integers), or `None` if it is not one."""
    if isinstance(given, (str, bytes)) or not isinstance(given, Iterable):
        return None
    indices = []
    for item in given:
        if isinstance(item, bool) or (isinstance(item, torch.Tensor) and item.dtype == torch.bool):
            return None
        try:
            indices.append(operator.index(item))
        except TypeError:
            return None
    return indices


def _per_layer_fields(config: Any, count: int, kept: list[int], single_stack: bool) -> dict[str, list]:
    """The config's lists about blocks (attributes with "layer" in their name), as they must read without the
    dropped blocks: a list with one entry per block keeps the kept blocks' entries; a list of block indices
    (`mlp_only_layers`) keeps the kept ones, renumbered.

    Raises:
        ValueError: naming the field when it is neither, or the model has more than one stack (the list's blocks
            are then ambiguous).
    """
    fields = {}
    new_index = {old: new for new, old in enumerate(kept)}
    for key, value in vars(config).items():
        if "layer" not in key or not isinstance(value, (list, tuple)):
            continue
        if single_stack and list(value) == list(range(count)):  # every block by index (Llama 4's moe_layers)
            fields[key] = list(range(len(kept)))
        elif single_stack and len(value) == count:
            fields[key] = [value[i] for i in kept]
        elif single_stack and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < count for i in value):
            fields[key] = [new_index[i] for i in value if i in new_index]
        else:
            raise ValueError(f"{type(config).__name__}.{key} = {value!r} describes the blocks by position, and "
                             "`drop_layers` cannot tell how it reads without some of them (it renumbers lists with "
                             "one entry per block, or of block indices, in models with one stack of blocks).")
    return fields


def _new_config(model: nn.Module, stacks: Mapping[str, str], kept: Mapping[str, list[int]]) -> Any:
    config = copy.deepcopy(model.config)
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError(f"{type(config).__name__}.scale_attn_by_inverse_layer_idx is True: the attention of each "
                         "block is scaled by its position, so a model without some blocks computes differently in "
                         "the blocks after them. `drop_layers` needs this option off.")
    for name, indices in kept.items():
        count = getattr(config, stacks[name])
        for key, value in _per_layer_fields(config, count, indices, len(stacks) == 1).items():
            setattr(config, key, value)
        setattr(config, stacks[name], len(indices))
    return config


def drop_layers(model: nn.Module, layers: Sequence[int] | Mapping[str, Sequence[int]]) -> nn.Module:
    """A new model of the same class without the Transformer blocks `layers`, its config updated: an ordinary
    transformers model whose `save_pretrained` folder loads with `AutoModel*.from_pretrained`. The kept blocks keep
    their weights and order (each block's own index, such as its key/value-cache slot, is renumbered), so its
    outputs are those of the original model with these blocks skipped. T5's relative position bias, which only the
    first block holds, moves to the new first block (UMT5's, one per block, stays with its block); config lists about the blocks (`layer_types`, one entry per
    block, or `mlp_only_layers`, block indices) are cut and renumbered. Every tensor keeps its dtype and device,
    and which parameters train, gradient checkpointing and the generation config carry over (`rebuild`).

    Args:
        model (`PreTrainedModel`): a BERT-style encoder, GPT-2, a Llama-style decoder, T5 or BART.
        layers (`list[int]` or `dict[str, list[int]]`): the indices of the blocks to remove; for a model with more
            than one stack (encoder-decoders) a dict keyed by the stack's module name (`find_stacks`), such as
            `{"encoder.block": [3], "decoder.block": [2, 5]}`.

    Raises:
        ValueError: naming the stack, field or tensors when `model` has no known block stack, `layers` is not a
            set of its block indices (or names none), it would remove every block of a stack, or the blocks depend
            on their position in a way it cannot renumber (a config field, blocks whose parameters differ); the
            model is left as it is.
    """
    stacks = find_stacks(model)
    dropped = _layers_by_stack(model, layers)
    kept = {name: [i for i in range(len(model.get_submodule(name))) if i not in drop] for name, drop in dropped.items()}
    config = _new_config(model, stacks, kept)

    def block_of(name: str) -> tuple[str, int, str] | None:
        """(stack, block index, rest of the name) of a name inside a block of a changed stack."""
        stack = next((n for n in kept if name.startswith(n + ".")), None)
        if stack is None:
            return None
        index, _, rest = name[len(stack) + 1:].partition(".")
        return stack, int(index), rest

    originals = set(model.state_dict())

    def origin(name: str) -> str:
        found = block_of(name)
        if found is None:
            return name
        stack, index, rest = found
        renumbered = ".".join(filter(None, (stack, str(kept[stack][index]), rest)))
        if "relative_attention_bias" in name and renumbered not in originals:
            return name  # T5's bias, which only the first block has, stays with the (new) first block; UMT5's own
        return renumbered

    def is_dropped(name: str) -> bool:
        found = block_of(name)
        return found is not None and found[1] not in kept[found[0]]

    small = rebuild(model, config, origin, dropped=is_dropped, action="drop_layers")
    _check_blocks_compute_as_before(model, small, block_of, origin)
    if getattr(config, "model_type", None) in ("t5", "mt5", "umt5") and config.num_layers < config.num_decoder_layers:
        logger.warning(
            "drop_layers: this %s keeps %d encoder blocks and %d decoder blocks. transformers sizes the key/value "
            "cache of generate() from the encoder's count (`num_layers`), so generate(use_cache=True) fails with an "
            "IndexError; pass cache=EncoderDecoderCache(DynamicCache(), DynamicCache()) to generate(), or "
            "drop at least as many decoder blocks as encoder blocks.",
            type(small).__name__, config.num_layers, config.num_decoder_layers)
    return small


#: Block attributes `drop_layers` renumbers or moves on purpose: each block's index (its key/value-cache slot) and
#: T5's relative position bias, which only the first block holds.
_RENUMBERED_ATTRIBUTES = frozenset({"layer_idx", "has_relative_attention_bias"})


def _check_blocks_compute_as_before(model: nn.Module, small: nn.Module, block_of: Callable[[str], Any],
                                    origin: Callable[[str], str]) -> None:
    """Raises `ValueError` when a kept block of `small` holds a plain number or flag (set from its index when the
    block is built, such as DiffLlama's `lambda_init`) other than its original's: it would compute differently,
    and copying the original's value would not survive `from_pretrained`, which builds the block again."""
    differing = []
    for name, module in small.named_modules():
        if block_of(name) is None:
            continue
        source = model.get_submodule(origin(name))
        for key, value in vars(module).items():
            if (not key.startswith("_") and key not in _RENUMBERED_ATTRIBUTES and type(value) in (bool, int, float)
                    and getattr(source, key, value) != value):
                differing.append(f"{name}.{key} = {value!r} (the original block's: {getattr(source, key)!r})")
    if differing:
        raise ValueError(f"drop_layers: the kept blocks of {type(model).__name__} compute with values set from their "
                         f"position ({'; '.join(differing[:3])}{' ...' if len(differing) > 3 else ''}), so a model "
                         "without some blocks computes differently in the blocks after them; this architecture's "
                         "blocks cannot be dropped.")


def _token_weights(kwargs: Mapping[str, Any], decoder: bool) -> torch.Tensor | None:
    """1 for the tokens that count, 0 for padding: the attention mask (the decoder's own, or else its `labels`
    other than -100, as `DataCollatorForSeq2Seq` pads them), or `None` when every token counts."""
    if not decoder:
        mask = kwargs.get("attention_mask")
    elif kwargs.get("decoder_attention_mask") is not None:
        mask = kwargs["decoder_attention_mask"]
    else:
        labels, inputs = kwargs.get("labels"), kwargs.get("decoder_input_ids")
        # DataCollatorForSeq2Seq(model=...) adds decoder_input_ids shifted from the labels: position for position
        aligned = isinstance(labels, torch.Tensor) and (inputs is None or tuple(inputs.shape) == tuple(labels.shape))
        mask = labels.ne(-100) if aligned else None
    return None if mask is None else mask.float()


def _hidden(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable[Any]) -> dict[str, list[float]]:
    """The block influence `1 - mean cos(input, output)` of every Transformer block, per stack, on `batches` (dicts
    of the model's forward arguments, such as a DataLoader of a few hundred training examples). Padding tokens
    (`attention_mask` 0) do not count; the decoder of an encoder-decoder counts its `decoder_attention_mask`, or
    without one the positions of its `labels` other than -100 (how `DataCollatorForSeq2Seq` pads them).

    Raises:
        ValueError: when `model` has no known block stack, or `batches` is empty or its batches do not fit the model.
    """
    stacks = find_stacks(model)
    sums = {name: [0.0] * len(model.get_submodule(name)) for name in stacks}
    counts = {name: [0.0] * len(model.get_submodule(name)) for name in stacks}
    weights: dict[str, torch.Tensor | None] = {}

    def record(name: str, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            given = _hidden(args[0] if args else kwargs["hidden_states"]).float()
            cosine = nn.functional.cosine_similarity(given, _hidden(output).float(), dim=-1)
            weight = weights.get(name)
            if weight is None or weight.shape != cosine.shape:
                weight = torch.ones_like(cosine)
            sums[name][index] += float((cosine * weight).sum())
            counts[name][index] += float(weight.sum())
        return hook

    device = next(model.parameters()).device
    handles = [block.register_forward_hook(record(name, i), with_kwargs=True)
               for name in stacks for i, block in enumerate(model.get_submodule(name))]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            args, kwargs = model_inputs(batch, device, "batches")
            for name in stacks:
                weights[name] = _token_weights(kwargs, decoder="decoder" in name.split("."))
            try:
                model(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:
                raise ValueError(f"{type(model).__name__} does not accept the batches of `batches` "
                                 f"({type(err).__name__}: {err}); they must be dicts of keyword arguments of the "
                                 "model's forward (input_ids, attention_mask, ...).") from err
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    unreached = [name for name in stacks if not counts[name][0]]
    if unreached:
        raise ValueError(f"{', '.join(unreached)} received no input from `batches`: it is empty or its batches do not "
                         "reach these blocks (an encoder-decoder needs `labels` or `decoder_input_ids`); "
                         "block_influence needs calibration batches, e.g. a DataLoader of a few hundred examples.")
    return {name: [1.0 - s / c for s, c in zip(sums[name], counts[name])] for name in stacks}
