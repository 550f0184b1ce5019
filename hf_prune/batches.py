"""Calibration batches: how the one-shot methods (OBS, block influence) turn one batch into a forward call."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def model_inputs(batch: Any, device: torch.device, field: str) -> tuple[tuple, dict[str, Any]]:
    """`(args, kwargs)` of the model's forward for `batch`, its tensors moved to `device`: a dict is keyword
    arguments (input_ids, attention_mask, ...), a tensor the first positional argument.

    Raises:
        ValueError: naming `field` (the argument the batches came from) for anything else.
    """
    if isinstance(batch, Mapping):
        return (), {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return (batch.to(device),), {}
    raise ValueError(f"`{field}` must yield dicts of keyword arguments of the model's forward (input_ids, "
                     f"attention_mask, ...) or tensors of inputs; got a {type(batch).__name__}.")
