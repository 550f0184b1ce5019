"""Building a transformers model for a saved folder: its class, its names and shapes before anything is allocated,
and loading weights with every key checked (transformers only reports what did not load)."""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
import transformers
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from safetensors import SafetensorError
from torch import nn
from transformers.utils import GENERATION_CONFIG_NAME

from .hub import resolve_file


def auto_model_class(config: transformers.PretrainedConfig) -> type:
    """The transformers class named in `config.architectures`, else `AutoModel`."""
    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def meta_model(model_class: type, config: transformers.PretrainedConfig, trust_remote_code: bool | None = None
               ) -> nn.Module:
    """`model_class` (a model class, or an `AutoModel*` class) of `config` on the meta device: its names and
    shapes, with nothing allocated."""
    from_config = getattr(model_class, "from_config", None)  # the AutoModel* classes
    with torch.device("meta"):
        if from_config is None:
            return model_class(config)
        options = {} if trust_remote_code is None else {"trust_remote_code": trust_remote_code}
        return from_config(config, **options)


def parameter_shapes(config: transformers.PretrainedConfig, model_class: type | None = None
                     ) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of `model_class` (default: the class `config` names): what a masks file may name,
    known before anything is allocated."""
    model = meta_model(model_class or auto_model_class(config), config)
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


def load_auto_config(path: str | os.PathLike, **kwargs: Any) -> Any:
    """`transformers.AutoConfig.from_pretrained(path, **kwargs)`; a config whose fields fail transformers' checks
    (a field of the wrong type) is a `ValueError` naming the folder."""
    try:
        return transformers.AutoConfig.from_pretrained(path, **kwargs)
    except (StrictDataclassFieldValidationError, StrictDataclassClassValidationError) as err:
        raise ValueError(f"{path}: its config does not pass transformers' checks ({' '.join(str(err).split())})."
                         ) from None


def config_and_model_kwargs(path: str | os.PathLike, kwargs: Mapping[str, Any], hub_kwargs: Mapping[str, Any]
                            ) -> tuple[transformers.PretrainedConfig, dict[str, Any]]:
    """The model's config and the keyword arguments left for its `from_pretrained`, as `from_pretrained(path,
    **kwargs)` makes them, for a model built from a config and a state dict (whose config transformers leaves as
    it is): a `config=` object as given (the other kwargs go to the model); else the folder's (or `config=`'s
    path's) config with the config attributes among `kwargs` applied (`output_hidden_states=True`, ...)."""
    given = kwargs.get("config")
    if isinstance(given, transformers.PretrainedConfig):
        return copy.deepcopy(given), {key: value for key, value in kwargs.items() if key != "config"}
    named = inspect.signature(transformers.PreTrainedModel.from_pretrained).parameters
    kept = ("trust_remote_code",)  # read by the config and by the model class
    attributes = {key: value for key, value in kwargs.items()
                  if key not in named and key not in hub_kwargs and key not in kept}
    config, unused = load_auto_config(
        given if given is not None else path, return_unused_kwargs=True, **hub_kwargs, **attributes,
        **{key: kwargs[key] for key in kept if key in kwargs})
    left = {key: value for key, value in kwargs.items() if key not in attributes and key != "config"}
    return config, {**left, **unused}


def load_generation_config(model: nn.Module, path: str | os.PathLike, hub_kwargs: Mapping[str, Any]) -> None:
    """Gives `model` the folder's `generation_config.json`, if it generates and the folder has one (transformers
    reads it only when it loads the weights from the folder itself)."""
    if not getattr(model, "can_generate", lambda: False)():
        return
    if resolve_file(path, GENERATION_CONFIG_NAME, required=False, **hub_kwargs) is not None:
        model.generation_config = transformers.GenerationConfig.from_pretrained(path, **hub_kwargs)


def load_dense(model_class: type, path: str | os.PathLike, config: transformers.PretrainedConfig,
               kwargs: Mapping[str, Any], state_dict: dict[str, torch.Tensor] | None = None,
               needed: Callable[[nn.Module], Collection[str]] | None = None) -> nn.Module:
    """`model_class.from_pretrained(path)` (or, with `state_dict`, the model of `config` with those tensors, as
    transformers loads them: `dtype`, `device_map`, `attn_implementation` and tied weights as for a folder),
    refused when a saved tensor did not load or a weight was left newly initialised (transformers only lists
    those in its load report): a folder saved from another head. With `needed` (the loaded model -> names), only
    those weights must load (the others may be new: a fresh head on a saved body). A weights file that cannot be
    read is a `ValueError`."""
    try:
        if state_dict is None:
            model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
        else:
            model, info = model_class.from_pretrained(None, config=config, state_dict=state_dict,
                                                      output_loading_info=True, **kwargs)
    except SafetensorError as err:
        raise ValueError(f"{path}: a weights file cannot be read ({err}).") from None
    except RuntimeError as err:  # transformers raises, rather than list mismatched_keys, unless told to ignore them
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise ValueError(f"{path} does not load as {model_class.__name__}: saved tensors of another shape than its "
                         "config.json gives (transformers' load report, logged above, lists them). Was config.json "
                         "edited, or the weights saved from another model?") from None
    missing, mismatched = sorted(info.get("missing_keys") or ()), info.get("mismatched_keys") or ()
    unexpected = sorted(info.get("unexpected_keys") or ()) if needed is None else []
    if needed is not None:
        needed = set(needed(model))
        missing = [key for key in missing if key in needed]
        mismatched = [key for key in mismatched if (key[0] if isinstance(key, tuple) else key) in needed]
    problems = {"weights the folder lacks (they would be random)": missing,
                "saved tensors the model has no place for": unexpected,
                "saved tensors of another shape": sorted(str(key) for key in mismatched),
                "errors": list(info.get("error_msgs") or ())}
    problems = {what: keys for what, keys in problems.items() if keys}
    if problems:
        raise ValueError(f"{path} does not load as {type(model).__name__} (config.json's architectures: "
                         f"{getattr(config, 'architectures', None)}): "
                         + "; ".join(f"{what}: {keys}" for what, keys in problems.items())
                         + ". Pass model_class= the class the folder was saved from.")
    return model
