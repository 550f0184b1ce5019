import json

import pytest
import torch
from conftest import TinyClassificationDataset, tiny_bert, tiny_llama

from hf_prune import Pruner, PruningConfig


def test_custom_training_loop_keeps_pruned_weights_at_zero():
    model = tiny_bert()
    pruner = Pruner(model, PruningConfig(initial_sparsity=0.2, final_sparsity=0.8, schedule="iterative",
                                         end_step=8, pruning_frequency=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    loader = torch.utils.data.DataLoader(TinyClassificationDataset(80), batch_size=8)
    pruner.update(0, optimizer)
    assert pruner.sparsity() == pytest.approx(0.2, abs=1e-4)
    seen = []
    for step, batch in enumerate(loader, start=1):
        model(**batch).loss.backward()
        pruner.mask_gradients_()
        optimizer.step()
        pruner.apply_()
        optimizer.zero_grad()
        pruner.update(step, optimizer)
        seen.append(round(pruner.sparsity(), 3))
        params = dict(model.named_parameters())
        for name, mask in pruner.masks.items():
            assert (params[name][~mask] == 0).all()
    assert seen == sorted(seen) and seen[-1] == pytest.approx(0.8, abs=1e-3)


def test_optimizer_moments_are_cleared_at_newly_pruned_positions():
    model = tiny_bert()
    pruner = Pruner(model, PruningConfig(final_sparsity=0.5, schedule="oneshot", start_step=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = TinyClassificationDataset(8)[0]
    model(**{k: v[None] for k, v in batch.items()}).loss.backward()
    optimizer.step()
    assert pruner.update(1, optimizer)
    for name, param in pruner.params.items():
        state = optimizer.state[param]
        assert (state["exp_avg"][~pruner.masks[name]] == 0).all()
        assert (state["exp_avg_sq"][~pruner.masks[name]] == 0).all()


def test_state_dict_round_trip_and_mismatch_errors():
    model = tiny_bert()
    pruner = Pruner(model, PruningConfig(final_sparsity=0.7, schedule="oneshot"))
    pruner.update(0)
    state = pruner.state_dict()
    fresh = Pruner(tiny_bert(), PruningConfig(final_sparsity=0.7, schedule="oneshot"))
    fresh.load_state_dict(state)
    assert fresh.target_sparsity == 0.7
    assert all(torch.equal(fresh.masks[n], m) for n, m in pruner.masks.items())
    assert fresh.sparsity() == pytest.approx(0.7, abs=1e-4)
    (name, mask), *_ = state["masks"].items()
    with pytest.raises(ValueError, match="missing mask for"):
        fresh.load_masks({n: m for n, m in state["masks"].items() if n != name})
    with pytest.raises(ValueError, match=f"mask {name} has shape"):
        fresh.load_masks({**state["masks"], name: mask[:, :3]})
    with pytest.raises(ValueError, match="unexpected mask"):
        fresh.load_masks({**state["masks"], "classifier.weight": torch.ones(2, 32, dtype=torch.bool)})


def test_pruner_of_a_compiled_model_names_and_prunes_as_the_plain_model():
    config = PruningConfig(final_sparsity=0.5, schedule="oneshot")
    compiled, plain = Pruner(torch.compile(tiny_bert()), config), Pruner(tiny_bert(), config)
    compiled.update(0)
    plain.update(0)
    assert compiled.masks.keys() == plain.masks.keys()
    assert all(torch.equal(compiled.masks[name], mask) for name, mask in plain.masks.items())


def test_a_config_field_set_after_construction_is_checked_again():
    config = PruningConfig(final_sparsity=0.5, schedule="oneshot")
    config.final_sparsity = 1.5
    with pytest.raises(ValueError, match="`final_sparsity`"):
        Pruner(tiny_bert(), config)


@pytest.mark.parametrize("sparsity", [1.5, 1.0, -0.1, float("nan"), "0.5", True])
def test_prune_to_refuses_a_sparsity_outside_0_1_and_changes_nothing(sparsity):
    model = tiny_bert()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    pruner = Pruner(model, PruningConfig(final_sparsity=0.5, schedule="oneshot"))
    with pytest.raises(ValueError, match=r"`sparsity` must be a number in \[0, 1\)"):
        pruner.prune_to(sparsity)
    assert all(mask.all() for mask in pruner.masks.values()) and pruner.target_sparsity == 0.0
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


def test_prune_to_a_percentage_says_which_fraction_it_means():
    pruner = Pruner(tiny_bert(), PruningConfig(final_sparsity=0.5, schedule="oneshot"))
    with pytest.raises(ValueError, match=r"A fraction is expected: 0\.8 for 80%"):
        pruner.prune_to(80)


def test_tuples_set_after_construction_are_stored_as_lists():
    # As JSON gives them back: a resumed run compares the config with its checkpoint's copy.
    config = PruningConfig(target_modules=("query", "key"))
    config.exclude_modules = ("layer.0.attention",)
    assert (config.target_modules, config.exclude_modules) == (["query", "key"], ["layer.0.attention"])
    assert PruningConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    structured = PruningConfig(structure="neurons", scheme="class-uniform", schedule="oneshot")
    structured.structure = ("neurons", "heads")
    assert structured.structure == ["neurons", "heads"]
    Pruner(tiny_llama(), structured)  # validates again: a tuple is a valid structure


def test_state_dict_is_a_snapshot_and_load_state_dict_checks_it():
    model = tiny_bert()
    pruner = Pruner(model, PruningConfig(final_sparsity=0.8, schedule="iterative", start_step=0, end_step=4,
                                         pruning_frequency=1, initial_sparsity=0.2))
    pruner.update(0)
    snapshot = pruner.state_dict()
    pruner.update(4)  # later events change the live masks in place, not the snapshot
    kept = sum(int(m.sum()) for m in snapshot["masks"].values()) / sum(m.numel() for m in snapshot["masks"].values())
    assert kept == pytest.approx(0.8, abs=1e-3) and snapshot["target_sparsity"] == 0.2
    for bad, message in (({**snapshot, "target_sparsity": float("nan")}, "`target_sparsity` must be a number in"),
                         ({**snapshot, "target_sparsity": 1.0}, "`target_sparsity` must be a number in"),
                         ({"masks": snapshot["masks"]}, "must be a dict with `masks` and `target_sparsity`"),
                         ({**snapshot, "masks": {n: m.numpy() for n, m in snapshot["masks"].items()}},
                          "is a ndarray, not a torch.Tensor")):
        with pytest.raises(ValueError, match=message):
            pruner.load_state_dict(bad)
    assert pruner.target_sparsity == pytest.approx(0.8)


@pytest.mark.parametrize("call, message", [
    (lambda pruner, model: pruner.prune_to(0.5, model.parameters()), "`optimizer` must be None or a torch optimizer"),
    (lambda pruner, model: pruner.update(0, [torch.zeros(1)]), "`optimizer` must be None or a torch optimizer"),
    (lambda pruner, model: pruner.update("3"), "`step` must be an integer >= 0"),
])
def test_bad_arguments_of_prune_to_and_update_raise_before_anything_changes(call, message):
    model = tiny_bert()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    pruner = Pruner(model, PruningConfig(final_sparsity=0.5, schedule="oneshot"))
    with pytest.raises(ValueError, match=message):
        call(pruner, model)
    assert pruner.target_sparsity == 0.0
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


def test_update_and_prune_to_take_numpy_numbers():
    import numpy as np

    pruner = Pruner(tiny_bert(), PruningConfig(final_sparsity=0.5, schedule="oneshot"))
    assert pruner.update(np.int64(0)) and pruner.sparsity() == pytest.approx(0.5, abs=1e-3)
    pruner.prune_to(np.float32(0.75))
    assert pruner.sparsity() == pytest.approx(0.75, abs=1e-3)


def test_masks_loaded_from_a_transposed_view_prune_further():
    pruner = Pruner(tiny_bert(), PruningConfig(schedule="cubic", final_sparsity=0.8, end_step=10))
    generator = torch.Generator().manual_seed(0)
    masks = {name: (torch.rand(p.shape[1], p.shape[0], generator=generator) > 0.2).T  # same shape, not contiguous
             for name, p in pruner.params.items()}
    pruner.load_masks(masks)
    pruner.prune_to(0.5)  # a RuntimeError on the masks' flat view, before
    assert pruner.sparsity() == pytest.approx(0.5, abs=1e-3)
    assert all(bool((pruner.masks[name] <= mask).all()) for name, mask in masks.items())


def test_class_blind_names_a_matrix_it_prunes_entirely_once(caplog):
    model = tiny_bert()
    with torch.no_grad():  # one class far smaller than the others: class-blind ranks all of it first
        for layer in model.bert.encoder.layer:
            layer.output.dense.weight.mul_(1e-3)
    pruner = Pruner(model, PruningConfig(final_sparsity=0.6, schedule="oneshot", scheme="class-blind"))
    with caplog.at_level("WARNING", logger="hf_prune"):
        pruner.prune_to(0.3)
        pruner.prune_to(0.4)
    emptied = [name for name, mask in pruner.masks.items() if not mask.any()]
    assert emptied == ["bert.encoder.layer.0.output.dense.weight", "bert.encoder.layer.1.output.dense.weight"]
    warnings = [r.getMessage() for r in caplog.records if "prunes every weight of" in r.getMessage()]
    assert len(warnings) == 1 and "2 targeted matrices, such as bert.encoder.layer.0.output.dense.weight" in warnings[0]
    caplog.clear()
    resumed = Pruner(model, PruningConfig(final_sparsity=0.6, schedule="oneshot", scheme="class-blind"))
    resumed.load_state_dict(pruner.state_dict())
    with caplog.at_level("WARNING", logger="hf_prune"):
        resumed.prune_to(0.45)  # the empty matrices were empty before: nothing new to say
        uniform = Pruner(tiny_bert(), PruningConfig(final_sparsity=0.6, schedule="oneshot"))
        uniform.prune_to(0.6)
    assert not [r for r in caplog.records if "prunes every weight of" in r.getMessage()]
