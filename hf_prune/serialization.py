"""On-disk formats: atomic writes, JSON and safetensors headers read with checks, boolean masks in safetensors
(bit-packed, or as Huffman-coded gaps between kept positions). No pickle anywhere."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import stat
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .constants import GAP_MASK_FORMAT, MASK_FORMAT, MASKS_NAME, TEMP_PREFIX
from .masks import check_masks_match
from .validation import check_choice


#: How `save_masks` stores the masks: 1 bit per weight, Huffman-coded gaps between kept positions, or whichever
#: of the two takes fewer bytes.
MASK_ENCODINGS = ("bitmask", "gaps", "smallest")

_JSON_KINDS = {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def writable_target(path: str | os.PathLike) -> tuple[str, int | None]:
    """The file a write to `path` replaces (symlinks followed to their target) and its permission bits, or `None`
    when it does not exist yet.

    Raises:
        ValueError: when `path` (or the file a symlink points to) exists and is not a regular file.
    """
    target = os.path.realpath(path)
    try:
        status = os.stat(target)
    except FileNotFoundError:
        return target, None
    if not stat.S_ISREG(status.st_mode):
        via = f" (the target of the symlink {os.fspath(path)})" if target != os.path.abspath(path) else ""
        raise ValueError(f"Cannot write {target}{via}: it is {_file_kind(status.st_mode)}; hf_prune writes "
                         "regular files only (a new path, a regular file, or a symlink to one).")
    return target, stat.S_IMODE(status.st_mode)


def fsync_file(path: str) -> None:
    """Writes a file's content through to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: str) -> None:
    """Makes a rename in `directory` durable (where the platform allows opening a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls `write(tmp_path)` on a new temp file beside the target, then renames it over the target.

    A symlink is written through (its target is replaced, the link stays). A new file gets the mode the umask
    gives (as `open` would); an existing one keeps its permission bits.

    Raises:
        ValueError: when `path` exists and is not a regular file (a directory, a device node, a pipe, ...).
    """
    target, mode = writable_target(path)
    directory, name = os.path.split(target)
    tmp = os.path.join(directory, f"{TEMP_PREFIX}{name}-{secrets.token_hex(6)}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else 0o600))
    if mode is None:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 less the umask, as `open` gives a new file
    try:
        write(tmp)
        os.chmod(tmp, mode)  # `write` may have replaced the file (safetensors writes 0o600)
        fsync_file(tmp)  # the content is on disk before the rename makes it the target
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_directory(directory)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` so readers see either the old file or the whole new one."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str]) -> None:
    """`safetensors.torch.save_file`, written to a temp file and renamed into place."""
    atomic_write(path, lambda tmp: save_file(dict(tensors), tmp, metadata=dict(metadata)))


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """`{"sha256": hex digest, "size": bytes}` of a file."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"sha256": digest, "size": os.path.getsize(path)}


def read_json_object(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The JSON object in the file `path`; `what` names the kind of file in the error.

    Raises:
        ValueError: when the file is not UTF-8 JSON or holds something other than an object.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected {what}, a JSON object.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object ({what}); got a JSON {_JSON_KINDS[type(data)]}.")
    return data


def header_json(path: str | os.PathLike, header: Mapping[str, str], key: str, kind: type) -> Any:
    """The JSON entry `key` of a safetensors header, which must decode to a `kind` (dict, list or str).

    Raises:
        ValueError: naming `path` and `key`, when the entry is missing, not JSON, or of another kind.
    """
    if key not in header:
        raise ValueError(f"{path} is corrupt: its header has no `{key}` entry.")
    try:
        value = json.loads(header[key])
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path} is corrupt: header entry `{key}` is not JSON ({err}).") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path} is corrupt: header entry `{key}` must be a JSON {_JSON_KINDS[kind]}; got "
                         f"{json.dumps(value)[:80]}.")
    return value


def is_count(value: Any, minimum: int = 0) -> bool:
    """True for an int (not a bool) >= `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def checked_shape(path: str | os.PathLike, field: str, shape: Any) -> tuple[int, ...]:
    """`shape` as a tuple when it is a non-empty list of positive integers.

    Raises:
        ValueError: naming `path` and `field` otherwise (negative, zero, float or missing dimensions).
    """
    if not isinstance(shape, list) or not shape or not all(is_count(d, 1) for d in shape):
        raise ValueError(f"{path} is corrupt: `{field}` must be a non-empty list of positive integers (a weight's "
                         f"shape); got {json.dumps(shape)[:80]}.")
    return tuple(shape)


def check_against_model(path: str | os.PathLike, shapes: Mapping[str, Sequence[int]],
                        expected: Mapping[str, Sequence[int]] | None) -> None:
    """Checks the masks a file declares (`shapes`) against the model's weights (`expected`, name -> shape) before
    any of them is allocated; nothing to check when `expected` is None. Raises `ValueError` naming `path`."""
    if expected is None:
        return
    declared = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    try:
        check_masks_match(declared, expected, require_all=False)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 entries per byte (little bit order, row-major)."""
    bits = mask.detach().reshape(-1).cpu().numpy()
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_mask`."""
    numel = int(np.prod(shape, dtype=np.int64))
    bits = np.unpackbits(packed.numpy(), count=numel, bitorder="little").astype(bool)
    return torch.from_numpy(bits).reshape(shape)


def mask_digest(mask: torch.Tensor, packed: torch.Tensor | None = None) -> str:
    """sha256 of a mask's shape and bits (`packed`: its `pack_mask`, when at hand): checked when the mask is read
    back, and by the files whose weights sit at its positions (sparse and deep), so that they load only with the
    masks they were saved with."""
    hasher = hashlib.sha256(f"{list(mask.shape)}\0".encode())
    hasher.update((pack_mask(mask) if packed is None else packed).numpy().tobytes())
    return hasher.hexdigest()


def check_mask_digests(path: str | os.PathLike, recorded: Any, masks: Mapping[str, torch.Tensor],
                       meaning: str) -> None:
    """Raises `ValueError` when `recorded` (a header's name -> `mask_digest`; None in a file written before they
    were recorded) is malformed, or a mask of `masks` it names has another digest; `meaning` says what that means."""
    if recorded is None:
        return
    if not isinstance(recorded, dict) or not all(isinstance(d, str) for d in recorded.values()):
        raise ValueError(f"{path} is corrupt: its mask checksums must map names to sha256 hex digests.")
    differing = [name for name, digest in recorded.items() if name in masks and mask_digest(masks[name]) != digest]
    if differing:
        more = f" and {len(differing) - 1} more" if len(differing) > 1 else ""
        raise ValueError(f"{path}: the mask of {differing[0]}{more} differs from the checksum the file records "
                         f"({meaning}).")


def save_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike,
               metadata: Mapping[str, object] | None = None, encoding: str = "bitmask") -> None:
    """Writes `masks` (name -> bool tensor, True = kept) into a safetensors file, atomically.

    The shapes and any `metadata` (JSON-serialisable) are stored in the file's header. `encoding="bitmask"`
    (format `hf_prune.bitmask.v1`) stores 1 bit per weight; `encoding="gaps"` (`hf_prune.gapmask.v1`) the gaps
    between kept positions, Huffman coded as in the deep-compressed format, with each mask's kept count in the
    header: about half a bit per weight at 90% sparsity, but more than one bit near 50% or for tiny masks (each
    has its own code table); `encoding="smallest"` picks whichever of the two takes fewer bytes.
    """
    check_choice("encoding", encoding, MASK_ENCODINGS)
    packed = {name: pack_mask(mask) for name, mask in masks.items()}
    header = {
        "format": MASK_FORMAT,
        "shapes": json.dumps({name: list(mask.shape) for name, mask in masks.items()}),
        "metadata": json.dumps(dict(metadata or {})),
        "digests": json.dumps({name: mask_digest(mask, packed[name]) for name, mask in masks.items()}),
    }
    tensors = packed if encoding != "gaps" else {}
    if encoding != "bitmask":
        from .compression.positions import encode_positions  # lazily: the compression package imports this module

        coded = {name: torch.frombuffer(bytearray(encode_positions(mask)), dtype=torch.uint8)
                 for name, mask in masks.items()}
        if not tensors or sum(t.numel() for t in coded.values()) < sum(t.numel() for t in tensors.values()):
            tensors = coded
            header.update(format=GAP_MASK_FORMAT, kept=json.dumps({name: int(m.sum()) for name, m in masks.items()}))
    atomic_save_safetensors(tensors, path, header)


def read_masks_metadata(path: str | os.PathLike) -> dict[str, object]:
    """The `metadata` dict stored by `save_masks`.

    Raises:
        ValueError: when the file is unreadable, its `metadata` entry is not a JSON object, or a sparsity it
            records (`target_sparsity`, `achieved_sparsity`) is not a number in [0, 1].
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable hf_prune masks file: {err}") from None
    metadata = header_json(path, {"metadata": "{}", **header}, "metadata", dict)
    for key in ("target_sparsity", "achieved_sparsity"):
        value = metadata.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{path}: metadata field `{key}` must be a number in [0, 1]; got {value!r}.")
    return metadata


def read_tagged_safetensors(path: str | os.PathLike, expected_format: str | tuple[str, ...], what: str,
                            check: Callable[[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]], None] | None = None,
                            read_tensors: bool = True, file_name: str | None = None
                            ) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Header and tensors of a safetensors file hf_prune wrote with `format` tag `expected_format` (or one of).

    `check(header, layout)`, with `layout` name -> (dtype, shape) from the file's header, runs before any tensor
    is read: the place to check names, shapes and counts against the model. With `read_tensors=False` no tensor
    is read (the dict returned is empty): the header alone, checked. `file_name`, the name `save_pretrained` gives
    such a file, goes into the error for a folder passed as `path`.

    Raises:
        ValueError: when the file is unreadable (truncated, not safetensors) or carries another format tag;
            `what` names the kind of file in the message.
    """
    formats = (expected_format,) if isinstance(expected_format, str) else tuple(expected_format)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a {what}: pass the file"
                         + (f" ({os.path.join(path, file_name)} in a saved folder)." if file_name else "."))
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") not in formats:
                raise ValueError(f"{path} has format {header.get('format')!r}, expected "
                                 f"{' or '.join(repr(f) for f in formats)}: it is not a {what}.")
            if check is not None:
                check(header, {key: (f.get_slice(key).get_dtype(), tuple(f.get_slice(key).get_shape()))
                               for key in f.keys()})
            tensors = {key: f.get_tensor(key) for key in f.keys()} if read_tensors else {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable {what}: {err}") from None
    return header, tensors


def load_masks(path: str | os.PathLike, expected: Mapping[str, Sequence[int]] | None = None
               ) -> dict[str, torch.Tensor]:
    """Reads a file written by `save_masks` (either encoding).

    Args:
        path (`str`): the file.
        expected (`dict[str, tuple]`, *optional*): the model's weight shapes by name. When given, every mask must
            name one of them with its shape. Every check (names, shapes, byte counts, `expected`) runs on the
            file's header, before any mask is read.

    Raises:
        ValueError: naming the file and the field, on a corrupt or foreign file or one that does not fit `expected`.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    kept: dict[str, int] = {}

    def check(header: dict[str, str], layout: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        declared = header_json(path, header, "shapes", dict)
        shapes.update({name: checked_shape(path, f"shapes[{name!r}]", shape) for name, shape in declared.items()})
        if set(shapes) != set(layout):
            raise ValueError(f"{path} is corrupt: masks {sorted(set(layout) ^ set(shapes))} lack a shape or data.")
        bad = sorted(name for name, (dtype, shape) in layout.items() if dtype != "U8" or len(shape) != 1)
        if bad:
            raise ValueError(f"{path} is corrupt: the data of masks {bad} is not 1-D uint8.")
        if header["format"] == GAP_MASK_FORMAT:
            kept.update(_checked_kept_counts(path, header, shapes))
        else:
            for name, shape in shapes.items():
                needed = (math.prod(shape) + 7) // 8
                if layout[name][1][0] != needed:
                    raise ValueError(f"{path} is corrupt: mask {name!r} holds {layout[name][1][0]} bytes, "
                                     f"shape {list(shape)} needs {needed}.")
        check_against_model(path, shapes, expected)

    header, packed = read_tagged_safetensors(path, (MASK_FORMAT, GAP_MASK_FORMAT), "hf_prune masks file", check,
                                             file_name=MASKS_NAME)
    if header["format"] == GAP_MASK_FORMAT:
        masks = _decode_gap_masks(path, packed, shapes, kept)
    else:
        masks = {name: unpack_mask(packed[name], shape) for name, shape in shapes.items()}
    digests = header_json(path, header, "digests", dict) if "digests" in header else None
    check_mask_digests(path, digests, masks, "the file is corrupt")
    return masks


def _checked_kept_counts(path: str | os.PathLike, header: Mapping[str, str],
                         shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """The kept count of each gap-coded mask, from the header: one per mask, each in 0..its number of entries."""
    kept = header_json(path, header, "kept", dict)
    if set(kept) != set(shapes):
        raise ValueError(f"{path} is corrupt: header entry `kept` names {sorted(kept)}, `shapes` {sorted(shapes)}.")
    for name, shape in shapes.items():
        if not is_count(kept[name]) or kept[name] > math.prod(shape):
            raise ValueError(f"{path} is corrupt: `kept[{name!r}]` must be an integer in 0..{math.prod(shape)} "
                             f"(the entries of shape {list(shape)}); got {kept[name]!r}.")
    return kept


def _decode_gap_masks(path: str | os.PathLike, coded: Mapping[str, torch.Tensor],
                      shapes: Mapping[str, tuple[int, ...]], kept: Mapping[str, int]) -> dict[str, torch.Tensor]:
    from .compression.positions import decode_positions

    masks = {}
    for name, shape in shapes.items():
        try:
            masks[name] = decode_positions(coded[name].numpy().tobytes(), shape, kept[name])
        except ValueError as err:
            raise ValueError(f"{path} is corrupt: mask {name!r} does not decode ({err}).") from None
    return masks
