"""Where hf_prune finds a file of a saved model: in a local folder, or downloaded from a Hub repo."""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id


#: `from_pretrained` keyword arguments that also apply to downloading hf_prune's own files.
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "subfolder")


def is_hub_repo_id(name: str) -> bool:
    """Whether `name` (a model's `_name_or_path`) names a Hub repo (`org/model`, `model`) rather than a local
    folder, which the Hub refuses as a model card's `base_model`."""
    if os.path.isabs(name) or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_file(path_or_repo_id: str | os.PathLike, filename: str, required: bool = True,
                 **hub_kwargs: Any) -> str | None:
    """The local path of `filename` in the folder `path_or_repo_id`, or downloaded from that Hub repo.

    Args:
        path_or_repo_id (`str`): a folder, or a Hub repo id.
        filename (`str`): the file's name inside it.
        required (`bool`, *optional*, defaults to `True`): whether a folder or repo without the file is an error;
            if not, `None` is returned for it.
        hub_kwargs: forwarded to `hf_hub_download` (`revision`, `token`, `cache_dir`, ...); `subfolder` also
            applies to a local folder.

    Raises:
        FileNotFoundError: when `path_or_repo_id` is a file, neither a folder nor a reachable Hub repo, or (with
            `required`) lacks `filename`.
    """
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):  # `subfolder` applies to a local folder as it does for transformers
        folder = os.path.join(path, hub_kwargs.get("subfolder") or "")
        local = os.path.join(folder, filename)
        if os.path.isfile(local):
            return local
        if required:
            raise FileNotFoundError(f"No {filename} in {os.path.normpath(folder)}.")
        return None
    if os.path.exists(path):
        raise FileNotFoundError(f"{path} is a file; expected a model folder or a Hub repo id.")
    try:
        return hf_hub_download(path, filename, **hub_kwargs)
    except HFValidationError:
        raise FileNotFoundError(f"No such folder: {path}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{path} is neither a folder nor a Hub model repo.") from None
    except LocalEntryNotFoundError:  # offline, and not in the cache: an optional file counts as absent
        if required:
            raise FileNotFoundError(f"{path} is not a folder, and as a Hub repo id {filename} cannot be fetched: the "
                                    "Hub is unreachable (offline?) and the cache does not have it.") from None
        return None
    except EntryNotFoundError:
        if required:
            raise FileNotFoundError(f"No {filename} in the Hub repo {path}.") from None
        return None
