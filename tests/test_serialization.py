import os

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
