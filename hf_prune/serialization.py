"""On-disk formats: atomic writes, bit-packed boolean masks in safetensors. No pickle anywhere."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .constants import MASK_FORMAT


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls `write(tmp_path)` on a temp file in the target's folder, then renames it over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` so readers see either the old file or the whole new one."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str]) -> None:
    """`safetensors.torch.save_file`, written to a temp file and renamed into place."""
    atomic_write(path, lambda tmp: save_file(dict(tensors), tmp, metadata=dict(metadata)))


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 entries per byte (little bit order, row-major)."""
    bits = mask.detach().reshape(-1).cpu().numpy()
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_mask`."""
    numel = int(np.prod(shape, dtype=np.int64))
    bits = np.unpackbits(packed.numpy(), count=numel, bitorder="little").astype(bool)
    return torch.from_numpy(bits).reshape(shape)


def save_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike,
               metadata: Mapping[str, object] | None = None) -> None:
    """Writes `masks` (name -> bool tensor, True = kept) bit-packed into a safetensors file, atomically.

    The shapes and any `metadata` (JSON-serialisable) are stored in the file's header.
    """
    header = {
        "format": MASK_FORMAT,
        "shapes": json.dumps({name: list(mask.shape) for name, mask in masks.items()}),
        "metadata": json.dumps(dict(metadata or {})),
    }
    atomic_save_safetensors({name: pack_mask(mask) for name, mask in masks.items()}, path, header)


def read_masks_metadata(path: str | os.PathLike) -> dict[str, object]:
    """The `metadata` dict stored by `save_masks`."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("metadata", "{}"))


def read_tagged_safetensors(path: str | os.PathLike, expected_format: str,
                            what: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Header and tensors of a safetensors file hf_prune wrote with `format` tag `expected_format`.

    Raises:
        ValueError: when the file is unreadable (truncated, not safetensors) or carries another format tag;
            `what` names the kind of file in the message.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable {what}: {err}") from None
    if header.get("format") != expected_format:
        raise ValueError(f"{path} has format {header.get('format')!r}, expected {expected_format!r} "
                         f"(an {what}).")
    return header, tensors


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a file written by `save_masks`; raises `ValueError` on a corrupt or foreign file."""
    header, packed = read_tagged_safetensors(path, MASK_FORMAT, "hf_prune masks file")
    shapes = json.loads(header["shapes"])
    if set(shapes) != set(packed):
        raise ValueError(f"{path} is corrupt: masks {sorted(set(packed) ^ set(shapes))} lack a shape or data.")
    masks = {}
    for name, shape in shapes.items():
        numel = int(np.prod(shape, dtype=np.int64))
        if packed[name].dtype != torch.uint8 or packed[name].numel() != (numel + 7) // 8:
            raise ValueError(f"{path} is corrupt: mask {name!r} holds {packed[name].numel()} bytes, "
                             f"shape {shape} needs {(numel + 7) // 8}.")
        masks[name] = unpack_mask(packed[name], tuple(shape))
    return masks
