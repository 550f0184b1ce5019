"""A saved folder as one save: which weights formats it may hold, moving a staged save into it, and checking
on load that its files are those its `pruning_config.json` records."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

from transformers.utils import (
    GENERATION_CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from .constants import COMPRESSED_WEIGHTS_NAME, DEEP_COMPRESSED_WEIGHTS_NAME, TEMP_PREFIX
from .hub import resolve_file
from .serialization import file_record, fsync_directory, fsync_file, is_count, read_json_object


try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a concurrent save's staging folder is not protected there
    fcntl = None


#: The weights file(s) of each way a folder can hold the model's weights; one folder holds one of them.
WEIGHT_FORMATS = {SAFE_WEIGHTS_NAME: "dense", SAFE_WEIGHTS_INDEX_NAME: "dense, sharded", WEIGHTS_NAME: "dense",
                  WEIGHTS_INDEX_NAME: "dense, sharded", COMPRESSED_WEIGHTS_NAME: "sparse",
                  DEEP_COMPRESSED_WEIGHTS_NAME: "deep"}
#: transformers' weights files: one file or shards and their index, safetensors or the older .bin, each with or
#: without a `variant` (`model.fp16.safetensors`, `model.fp16-00001-of-00002.safetensors`,
#: `model.safetensors.index.fp16.json`).
_DENSE_WEIGHTS_FILE = re.compile(r"(model|pytorch_model)(\.[\w-]+)?(-\d+-of-\d+)?\.(safetensors|bin)"
                                 r"|(model|pytorch_model)\.(safetensors|bin)\.index(\.[\w-]+)?\.json")
#: A peft adapter's files: transformers loads an adapter it finds beside the weights on top of them.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def weights_format(path: str | os.PathLike, hub_kwargs: Mapping[str, Any]) -> tuple[str, str | None]:
    """Which format holds the weights (`"dense"`, `"sparse"` or `"deep"`) and its file (for `"dense"`, the one
    transformers reads; `None` when there is none, and transformers reports that).

    Raises:
        ValueError: when the folder holds the weights in two formats (a file left by an older save).
    """
    # on the Hub, a stale pickled .bin beside the weights would be downloaded only to be refused: not looked for
    names = [name for name in WEIGHT_FORMATS if os.path.isdir(path) or not name.startswith("pytorch_model")]
    found = {name: local for name in names if (local := resolve_file(path, name, required=False, **hub_kwargs))}
    if len(found) > 1:
        raise ValueError(f"{path} holds the weights in {len(found)} formats: "
                         + ", ".join(f"{name} ({WEIGHT_FORMATS[name]})" for name in found)
                         + "; a folder holds one save. Delete the files of the formats you do not want, or save "
                         "again with PrunedModel.save_pretrained (it removes the others).")
    name, local = next(iter(found.items()), (None, None))
    kind = "dense" if name is None or WEIGHT_FORMATS[name].startswith("dense") else WEIGHT_FORMATS[name]
    return kind, local


def _identity(local: str) -> tuple[int, ...]:
    """What changes when a file is replaced or rewritten: device, inode, size, modification time."""
    st = os.stat(local)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check_saved_files(path: str | os.PathLike, config_file: str, hub_kwargs: Mapping[str, Any],
                      only: Collection[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Checks every file `pruning_config.json` (`config_file`) records as part of its save (`files`: name ->
    sha256 and size; with `only`, those of these names) against the file of that name in `path`; a folder without
    a record (written before hf_prune recorded its files) passes. Returns the identity of each checked file, for
    `check_unchanged` once they are read.

    Raises:
        ValueError: naming the first file that is missing or differs from the recorded one: the folder mixes
            two saves (an interrupted `save_pretrained`) or was edited.
        FileNotFoundError: when a Hub repo's recorded file cannot be fetched (offline and not in the cache, or
            not in the repo).
    """
    identities = {config_file: _identity(config_file)}
    records = read_json_object(config_file, "a PruningConfig").get("files")
    if records is None:
        return identities
    if not isinstance(records, dict) or not all(
            os.path.basename(name) == name and name not in ("", ".", "..") and isinstance(record, dict)
            and isinstance(record.get("sha256"), str) and is_count(record.get("size")) for name, record in records.items()):
        raise ValueError(f"{config_file} is corrupt: `files` must map file names to {{\"sha256\": hex digest, "
                         f"\"size\": bytes}}; got {str(records)[:120]}.")
    if only is None:
        _check_no_unrecorded_files(path, config_file, records, hub_kwargs)
    for name, record in records.items():
        if only is not None and name not in only:
            continue
        # from a Hub repo, resolve_file's error says why a recorded file cannot be had (offline and not cached?)
        local = resolve_file(path, name, required=not os.path.isdir(path), **hub_kwargs)
        if local is None:
            raise ValueError(f"{path} has no {name}, which {config_file} records as part of its save: the folder is "
                             "incomplete or mixes two saves (an interrupted save_pretrained?). Save the model again.")
        identities[local] = _identity(local)
        found = {"size": os.path.getsize(local)}
        if found["size"] == record["size"]:
            found = file_record(local)
        if (found["size"], found.get("sha256")) != (record["size"], record["sha256"]):
            raise ValueError(f"{local} does not belong to the save that {config_file} records (found "
                             f"{_describe(found)}, recorded {_describe(record)}): the folder mixes files of two "
                             "saves (an interrupted save_pretrained?) or the file was changed after saving. Save the "
                             f"model again; to load the folder as it is, delete the `files` entry of {config_file}.")
    return identities


def _check_no_unrecorded_files(path: str | os.PathLike, config_file: str, records: Collection[str],
                               hub_kwargs: Mapping[str, Any]) -> None:
    """Raises `ValueError` for a weights file in the local folder (of any format, shard or variant) that is not
    part of the recorded save (a Hub repo holds only what `push_to_hub` uploaded: it deletes the others). A peft
    adapter or a generation config written after the save is loaded with it, as transformers does."""
    folder = os.path.join(os.fspath(path), hub_kwargs.get("subfolder") or "")
    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        if name not in records and _is_weights_file(name):
            raise ValueError(f"{os.path.join(folder, name)} is not part of the save that {config_file} records: "
                             "weights of another save (another `variant`?), which transformers could load instead "
                             "of the recorded ones. Delete it, or save the model again.")


def check_unchanged(identities: Mapping[str, tuple[int, ...]]) -> None:
    """Raises `ValueError` when a file `check_saved_files` checked was replaced or rewritten since (a save into the
    folder ran while it was being loaded: what was read may mix the two saves)."""
    for local, identity in identities.items():
        if not os.path.exists(local) or _identity(local) != identity:
            raise ValueError(f"{local} changed while the folder was being loaded (a save_pretrained into it ran "
                             "meanwhile): what was read may mix two saves. Load it again.")


def _describe(record: Mapping[str, Any]) -> str:
    digest = f", sha256 {record['sha256'][:16]}..." if "sha256" in record else ""
    return f"{record['size']} bytes{digest}"


def files_under(folder: str) -> list[str]:
    """The files in `folder` and its subfolders, as paths relative to it."""
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)


def _is_weights_file(name: str) -> bool:
    """Whether the file `name` of a folder holds model weights (of any format, shard or variant)."""
    return bool(_DENSE_WEIGHTS_FILE.fullmatch(name)) or name in WEIGHT_FORMATS


@contextlib.contextmanager
def staging_folder(folder: str) -> Iterator[str]:
    """A new temporary folder inside `folder` for a save to write into, removed afterwards. It is locked
    (`flock`) while the save runs, so that `remove_temporaries` of another process leaves it alone."""
    staging = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=folder)
    try:
        with _locked(staging, blocking=True):
            yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_temporaries(folder: str) -> None:
    """Removes what interrupted writes left in `folder` (names starting with `TEMP_PREFIX`); a staging folder
    that a running save holds locked is left alone."""
    for name in os.listdir(folder):
        if name.startswith(TEMP_PREFIX):
            target = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                if not os.path.isdir(target) or os.path.islink(target):
                    os.remove(target)
                    continue
                with _locked(target, blocking=False):  # BlockingIOError (an OSError) while a save holds it
                    shutil.rmtree(target)


@contextlib.contextmanager
def _locked(directory: str, blocking: bool) -> Iterator[None]:
    """An exclusive advisory lock on `directory` (none where the platform has no `flock`)."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)  # releases the lock


def stale_files(names: Iterable[str], members: Collection[str]) -> list[str]:
    """Of the files `names` of a folder (or of a Hub repo: paths, only its root's count), those a new save whose
    files are `members` replaces: weights of other formats, shards and variants, a generation config and peft
    adapter files it does not have. `commit` removes them from a folder, `push_to_hub` from the repo."""
    return [name for name in names if "/" not in name and name not in members
            and (_is_weights_file(name) or name in (GENERATION_CONFIG_NAME, *ADAPTER_FILES))]


def commit(staging: str, folder: str, members: Mapping[str, Any]) -> None:
    """Moves every file of `staging` into `folder` (the save's own files last), then removes the weights of other
    formats, a generation config and a peft adapter that the new save does not have. Each file reaches the disk before it is
    moved, and the moves before anything is removed."""
    names = sorted(files_under(staging), key=lambda name: name in members)
    for name in names:
        fsync_file(os.path.join(staging, name))
    for name in names:
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        os.replace(os.path.join(staging, name), os.path.join(folder, name))
    for directory in {os.path.dirname(os.path.join(folder, name)) for name in names}:
        fsync_directory(directory)
    for name in stale_files(os.listdir(folder), members):
        os.remove(os.path.join(folder, name))
