import os
import stat

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_prune.serialization import (
    atomic_write_text,
    load_masks,
    pack_mask,
    read_masks_metadata,
    save_masks,
    unpack_mask,
)


@settings(max_examples=50, deadline=None)
@given(shape=st.lists(st.integers(1, 19), min_size=1, max_size=3), seed=st.integers(0, 1000))
def test_bit_packing_round_trips(shape, seed):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, tuple(shape)), mask)


def test_masks_file_round_trips_with_metadata(tmp_path):
    masks = {"a.weight": torch.rand(37, 32) > 0.3, "b.weight": torch.rand(5) > 0.5}
    path = tmp_path / "m.safetensors"
    save_masks(masks, path, {"target_sparsity": 0.25})
    loaded = load_masks(path)
    assert loaded.keys() == masks.keys() and all(torch.equal(loaded[k], masks[k]) for k in masks)
    assert read_masks_metadata(path) == {"target_sparsity": 0.25}
    assert os.path.getsize(path) < 37 * 32 / 8 + 5 + 1024  # 1 bit per weight plus the header
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left behind


def test_corrupt_and_foreign_files_are_clear_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_masks({"a.weight": torch.ones(64, 64, dtype=torch.bool)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="not a readable hf_prune masks file"):
        load_masks(path)
    from safetensors.torch import save_file

    save_file({"a.weight": torch.ones(3)}, str(path))
    with pytest.raises(ValueError, match="has format None, expected 'hf_prune.bitmask.v1'"):
        load_masks(path)


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write_text(path, "old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


# --------------------------------------------------- malformed headers and writing paths (issue 16, items 6, 7)
def write_masks_header(path, **entries) -> None:
    """A masks file with one 2x8 mask and the header entries given (None: left out)."""
    from safetensors.torch import save_file

    header = {"format": "hf_prune.bitmask.v1", "shapes": '{"a.weight": [2, 8]}', "metadata": "{}"}
    header.update(entries)
    save_file({"a.weight": torch.zeros(2, dtype=torch.uint8)}, str(path),
              {key: value for key, value in header.items() if value is not None})


BAD_HEADERS = {
    "shapes missing": ({"shapes": None}, "has no `shapes` entry"),
    "shapes not JSON": ({"shapes": "{a.weight: [2, 8]"}, "header entry `shapes` is not JSON"),
    "shapes not a dict": ({"shapes": "[[2, 8]]"}, "header entry `shapes` must be a JSON object; got \\[\\[2, 8\\]\\]"),
    "negative dimension": ({"shapes": '{"a.weight": [-2, -8]}'}, "`shapes\\['a.weight'\\]` must be a non-empty list "
                                                                   "of positive integers .*; got \\[-2, -8\\]"),
    "float dimension": ({"shapes": '{"a.weight": [2.0, 8]}'}, "`shapes\\['a.weight'\\]` must be .*; got \\[2.0, 8\\]"),
    "zero-size shape": ({"shapes": '{"a.weight": [0, 8]}'}, "`shapes\\['a.weight'\\]` must be .*; got \\[0, 8\\]"),
    "empty shape": ({"shapes": '{"a.weight": []}'}, "`shapes\\['a.weight'\\]` must be .*; got \\[\\]"),
    "shape not a list": ({"shapes": '{"a.weight": 16}'}, "`shapes\\['a.weight'\\]` must be .*; got 16"),
    "boolean dimension": ({"shapes": '{"a.weight": [true, 16]}'}, "`shapes\\['a.weight'\\]` must be .*; got \\[true"),
    "wrong byte count": ({"shapes": '{"a.weight": [4, 8]}'}, "mask 'a.weight' holds 2 bytes, shape \\[4, 8\\] needs 4"),
    "name without data": ({"shapes": '{"a.weight": [2, 8], "b.weight": [3]}'}, "masks \\['b.weight'\\] lack a shape"),
    "gap-coded, kept missing": ({"format": "hf_prune.gapmask.v1"}, "has no `kept` entry"),
}


def forbid_tensor_reads(monkeypatch) -> None:
    """Makes reading any tensor out of a safetensors file an AssertionError: what a check refuses, it refuses
    from the header alone."""
    import hf_prune.serialization as serialization

    real_safe_open = serialization.safe_open

    class HeaderOnly:
        def __init__(self, *args, **kwargs):
            self.file = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def get_tensor(self, name):
            raise AssertionError(f"tensor {name} was read before the file was checked")

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(serialization, "safe_open", HeaderOnly)


@pytest.fixture
def tensor_reads_fail(monkeypatch):
    forbid_tensor_reads(monkeypatch)


@pytest.mark.parametrize("entries, message", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_a_masks_file_with_a_bad_header_is_a_value_error_naming_file_and_field(tmp_path, entries, message,
                                                                               tensor_reads_fail):
    path = tmp_path / "m.safetensors"
    write_masks_header(path, **entries)
    with pytest.raises(ValueError, match=f"^{path}.*{message}"):
        load_masks(path)


@pytest.mark.parametrize("metadata", ["not json", "[1, 2]", "3"])
def test_masks_metadata_that_is_not_an_object_is_a_value_error(tmp_path, metadata):
    path = tmp_path / "m.safetensors"
    write_masks_header(path, metadata=metadata)
    with pytest.raises(ValueError, match=f"^{path} is corrupt: header entry `metadata`"):
        read_masks_metadata(path)


@pytest.mark.parametrize("metadata", ['{"target_sparsity": "0.5"}', '{"achieved_sparsity": 1.5}',
                                      '{"target_sparsity": true}'])
def test_masks_metadata_with_a_bad_sparsity_is_a_value_error_naming_it(tmp_path, metadata):
    path = tmp_path / "m.safetensors"
    write_masks_header(path, metadata=metadata)
    with pytest.raises(ValueError, match=f"^{path}: metadata field `(target|achieved)_sparsity` must be a number"):
        read_masks_metadata(path)


@pytest.mark.parametrize("encoding", ["bitmask", "gaps"])
def test_masks_are_checked_against_the_model_before_any_is_read(tmp_path, monkeypatch, encoding):
    path = tmp_path / "m.safetensors"
    save_masks({"a.weight": torch.ones(4, 4, dtype=torch.bool), "b.weight": torch.ones(3, dtype=torch.bool)}, path,
               encoding=encoding)
    with monkeypatch.context() as patch:
        forbid_tensor_reads(patch)
        with pytest.raises(ValueError, match=f"^{path}: Masks do not match the model: unexpected mask b.weight .*; "
                                             "mask a.weight has shape \\(4, 4\\), weight has \\(4, 5\\)"):
            load_masks(path, {"a.weight": (4, 5)})
    assert load_masks(path, {"a.weight": (4, 4), "b.weight": (3,), "c.weight": (2,)}).keys() == {"a.weight",
                                                                                                 "b.weight"}


def test_atomic_write_writes_through_a_symlink(tmp_path):
    target = tmp_path / "real" / "file.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target) and target.read_text() == "new"
    assert sorted(os.listdir(target.parent)) == ["file.json"]
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "real" / "created.json")
    atomic_write_text(dangling, "created")
    assert dangling.is_symlink() and (tmp_path / "real" / "created.json").read_text() == "created"


def test_atomic_write_refuses_what_is_not_a_regular_file(tmp_path):
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link-to-folder").symlink_to(tmp_path / "folder")
    for path, kind in ((tmp_path / "folder", "a directory"), (tmp_path / "pipe", "a named pipe"),
                       ("/dev/null", "a character device"), (tmp_path / "link-to-folder", "a directory")):
        with pytest.raises(ValueError, match=f"Cannot write .*: it is {kind}; hf_prune writes regular files only"):
            atomic_write_text(path, "x")
    assert os.path.isdir(tmp_path / "folder") and stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_gives_new_files_the_umask_mode_and_keeps_an_existing_mode(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "new.txt", "x")
        save_masks({"a.weight": torch.ones(3, dtype=torch.bool)}, tmp_path / "m.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "new.txt").st_mode) == mode
    assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == mode
    os.chmod(tmp_path / "new.txt", 0o640)
    atomic_write_text(tmp_path / "new.txt", "y")
    assert stat.S_IMODE(os.stat(tmp_path / "new.txt").st_mode) == 0o640


@pytest.mark.parametrize("encoding", ["bitmask", "gaps"])
def test_a_masks_file_whose_data_decodes_to_other_masks_is_refused(tmp_path, encoding):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    first = torch.tensor([True, False, True, False] * 16).reshape(8, 8)
    second = first.roll(1, dims=1)  # the same shape and kept count: every header check passes
    save_masks({"w": first}, tmp_path / "a.safetensors", encoding=encoding)
    save_masks({"w": second}, tmp_path / "b.safetensors", encoding=encoding)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        header = f.metadata()
    save_file(load_file(str(tmp_path / "b.safetensors")), str(tmp_path / "a.safetensors"), header)
    with pytest.raises(ValueError, match="the mask of w differs from the checksum the file records .*corrupt"):
        load_masks(tmp_path / "a.safetensors")
    assert torch.equal(load_masks(tmp_path / "b.safetensors")["w"], second)
