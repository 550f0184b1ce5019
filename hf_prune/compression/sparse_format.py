"""The sparse file format (`hf_prune.sparse.v1`): each targeted weight stored as its kept values only, in its own
dtype and in row-major order of the kept positions (the positions are the masks file's), every other tensor as it
is; loads back bit-exact."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ..constants import COMPRESSED_FORMAT
from ..serialization import atomic_save_safetensors, read_tagged_safetensors
from ..version import __version__


VALUES_SUFFIX = ".values"


def save_sparse(path: str | os.PathLike, weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                other_tensors: Mapping[str, torch.Tensor]) -> None:
    """Writes the kept values of each of `weights` (under `<name>.values`) and `other_tensors`, atomically."""
    values = {f"{name}{VALUES_SUFFIX}": weight[masks[name]] for name, weight in weights.items()}
    atomic_save_safetensors({**values, **other_tensors}, path,
                            {"format": COMPRESSED_FORMAT, "hf_prune_version": __version__})


def read_sparse(path: str | os.PathLike, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict stored by `save_sparse`, the masked weights dense again (zeros at the pruned positions).

    Raises:
        ValueError: when the file is unreadable, of another format, or a weight's stored values do not fill its
            mask.
    """
    _, tensors = read_tagged_safetensors(path, COMPRESSED_FORMAT, "compressed checkpoint")
    for name, mask in masks.items():
        values = tensors.pop(f"{name}{VALUES_SUFFIX}", None)
        if values is None or values.numel() != int(mask.sum()):
            raise ValueError(f"{path} is corrupt: {name} has {None if values is None else values.numel()} stored "
                             f"values, its mask keeps {int(mask.sum())}.")
        tensors[name] = torch.zeros(mask.shape, dtype=values.dtype)
        tensors[name][mask] = values
    return tensors
