"""The sparse file format (`hf_prune.sparse.v1`): each targeted weight stored as its kept values only, in its own
dtype and in row-major order of the kept positions (the positions are the masks file's), every other tensor as it
is; loads back bit-exact."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import torch

from ..constants import COMPRESSED_FORMAT, COMPRESSED_WEIGHTS_NAME, MASKS_NAME
from ..serialization import (
    atomic_save_safetensors,
    check_mask_digests,
    header_json,
    mask_digest,
    read_tagged_safetensors,
)
from ..version import __version__


VALUES_SUFFIX = ".values"


def save_sparse(path: str | os.PathLike, weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                other_tensors: Mapping[str, torch.Tensor]) -> None:
    """Writes the kept values of each of `weights` (under `<name>.values`) and `other_tensors`, atomically."""
    values = {f"{name}{VALUES_SUFFIX}": weight[masks[name]] for name, weight in weights.items()}
    digests = {name: mask_digest(masks[name]) for name in weights}  # the positions of the values: the masks file's
    atomic_save_safetensors({**values, **other_tensors}, path, {"format": COMPRESSED_FORMAT,
                                                                "hf_prune_version": __version__,
                                                                "masks": json.dumps(digests)})


def read_sparse(path: str | os.PathLike, masks: Mapping[str, torch.Tensor],
                shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """The state dict stored by `save_sparse`, the masked weights dense again (zeros at the pruned positions).

    Args:
        path (`str`): the file.
        masks (`dict[str, torch.Tensor]`): the masks file's masks: the positions of the stored values.
        shapes (`dict[str, tuple]`, *optional*): the model's state-dict shapes; every other tensor must be one of
            them. Both are checked against the file's header before any tensor is read.

    Raises:
        ValueError: when the file is unreadable, of another format, a weight's stored values do not fill its mask
            or (with `shapes`) a tensor is not the model's.
    """

    def check(header: Mapping[str, str], stored: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
        digests = header_json(path, header, "masks", dict) if "masks" in header else None
        check_mask_digests(path, digests, masks, f"it was saved with other masks than this {MASKS_NAME}: the "
                                                 "folder mixes two saves")
        for name, mask in masks.items():
            _, shape = stored.get(f"{name}{VALUES_SUFFIX}", (None, None))
            if shape is None or shape != (int(mask.sum()),):
                raise ValueError(f"{path} is corrupt: {name} has {None if shape is None else shape[0]} stored "
                                 f"values, its mask keeps {int(mask.sum())}.")
        others = {key: shape for key, (_, shape) in stored.items()
                  if not (key.endswith(VALUES_SUFFIX) and key[:-len(VALUES_SUFFIX)] in masks)}
        if shapes is not None:
            problems = [f"{key} of shape {list(shape)} (the model's: "
                        f"{list(shapes[key]) if key in shapes else 'none'})"
                        for key, shape in others.items() if key not in shapes or tuple(shapes[key]) != shape]
            if problems:
                raise ValueError(f"{path} does not match the model: it stores " + ", ".join(problems) + ".")

    _, tensors = read_tagged_safetensors(path, COMPRESSED_FORMAT, "compressed checkpoint", check,
                                         file_name=COMPRESSED_WEIGHTS_NAME)
    for name, mask in masks.items():
        values = tensors.pop(f"{name}{VALUES_SUFFIX}")
        tensors[name] = torch.zeros(mask.shape, dtype=values.dtype)
        tensors[name][mask] = values
    return tensors
