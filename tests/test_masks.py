import copy
from unittest import mock

import pytest
import torch
from conftest import TINY_MODELS
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import prune

from hf_prune import Pruner, PruningConfig
from hf_prune import masks as masks_module
from hf_prune.criteria import Criterion, MagnitudeCriterion
from hf_prune.masks import prune_lowest_, update_masks_


def magnitude_fns(weights):
    return [lambda rows, w=w: w[rows].abs().float() for w in weights]


@pytest.mark.parametrize("kind", ["bert", "gpt2", "t5"])
@pytest.mark.parametrize("sparsity", [0.3, 0.9])
def test_class_blind_equals_torch_global_unstructured(kind, sparsity):
    model = TINY_MODELS[kind]()
    reference = copy.deepcopy(model)
    pruner = Pruner(model, PruningConfig(final_sparsity=sparsity, schedule="oneshot"))
    pruner.update(0)
    modules = dict(reference.named_modules())
    pairs = [(modules[name.removesuffix(".weight")], "weight") for name in pruner.masks]
    prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured, amount=sparsity)
    for name, mask in pruner.masks.items():
        assert torch.equal(mask, modules[name.removesuffix(".weight")].weight_mask.bool()), name
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n][~m], torch.zeros(int((~m).sum()))) for n, m in pruner.masks.items())


shapes = st.lists(st.tuples(st.integers(1, 17), st.integers(1, 23)), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(shapes=shapes, sparsity=st.floats(0.0, 0.999), levels=st.sampled_from([None, 3, 50]), seed=st.integers(0, 99))
def test_exact_count_threshold_order_and_determinism(shapes, sparsity, levels, seed):
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=generator) for s in shapes]
    if levels is not None:  # many exact ties, including exact zeros
        weights = [torch.round(w * levels / 3) for w in weights]
    total = sum(w.numel() for w in weights)
    target = round(sparsity * total)
    masks = [torch.ones(s, dtype=torch.bool) for s in shapes]
    prune_lowest_(magnitude_fns(weights), masks, target)
    assert sum(int((~m).sum()) for m in masks) == target
    pruned = torch.cat([w.abs()[~m] for w, m in zip(weights, masks)])
    kept = torch.cat([w.abs()[m] for w, m in zip(weights, masks)])
    if pruned.numel() and kept.numel():
        assert pruned.max() <= kept.min()
    again = [torch.ones(s, dtype=torch.bool) for s in shapes]
    with mock.patch.object(masks_module, "_BLOCK", 7):  # scored a few rows at a time: the same masks
        prune_lowest_(magnitude_fns(weights), again, target)
    assert all(torch.equal(a, b) for a, b in zip(masks, again))


@settings(max_examples=40, deadline=None)
@given(shapes=shapes, first=st.floats(0.0, 0.9), more=st.floats(0.0, 0.5), seed=st.integers(0, 99))
def test_masks_only_grow_and_keep_earlier_pruning(shapes, first, more, seed):
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=generator) for s in shapes]
    total = sum(w.numel() for w in weights)
    masks = [torch.ones(s, dtype=torch.bool) for s in shapes]
    prune_lowest_(magnitude_fns(weights), masks, round(first * total))
    before = [m.clone() for m in masks]
    weights = [torch.randn(s, generator=generator) for s in shapes]  # weights moved since the last event
    second = min(0.999, first + more)
    prune_lowest_(magnitude_fns(weights), masks, round(second * total))
    assert all(not (m & ~b).any() for m, b in zip(masks, before))
    assert sum(int((~m).sum()) for m in masks) == max(round(second * total), sum(int((~b).sum()) for b in before))


def test_ties_are_broken_in_model_order_then_row_major():
    weights = [torch.ones(2, 3), torch.ones(4)]
    masks = [torch.ones(2, 3, dtype=torch.bool), torch.ones(4, dtype=torch.bool)]
    prune_lowest_(magnitude_fns(weights), masks, 7)
    assert masks[0].sum() == 0 and masks[1].tolist() == [False, True, True, True]


def test_class_uniform_prunes_each_class_exactly():
    model = TINY_MODELS["bert"]()
    pruner = Pruner(model, PruningConfig(final_sparsity=0.6, schedule="oneshot", scheme="class-uniform"))
    pruner.update(0)
    for cls in set(pruner.classes.values()):
        names = [n for n, c in pruner.classes.items() if c == cls]
        total = sum(pruner.masks[n].numel() for n in names)
        assert sum(int((~pruner.masks[n]).sum()) for n in names) == round(0.6 * total)


def test_class_distribution_ignores_an_inf_weight_in_sigma():
    # with sigma NaN every score of the class would rank first: the whole class pruned, its largest weights too
    weights = {"a.w": torch.arange(1.0, 17.0).reshape(4, 4), "b.w": torch.arange(1.0, 17.0).reshape(4, 4) / 10}
    weights["a.w"][0, 0] = float("inf")
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    update_masks_(weights, masks, {"a.w": "a", "b.w": "b"}, MagnitudeCriterion(), 0.5, "class-distribution")
    assert masks["a.w"][0, 0] and masks["a.w"][3, 3], "the inf and the largest weights of class a stay"
    assert sum(int((~m).sum()) for m in masks.values()) == 16


class ScaledMagnitude(Criterion):
    """|w| times a scale per class, as activation-aware scores (|w|·‖x‖) scale some classes far above others."""

    def score(self, name, weight, rows=slice(None)):
        return weight.detach()[rows].abs().float() * (1000.0 if name.startswith("a.") else 1.0)


def test_class_distribution_divides_another_criterions_scores_by_the_std_of_the_class_scores():
    torch.manual_seed(0)
    weights = {"a.w": torch.randn(40, 40), "b.w": torch.randn(40, 40)}
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    update_masks_(weights, masks, {"a.w": "a", "b.w": "b"}, ScaledMagnitude(), 0.7, "class-distribution")
    # divided by the std of the weights, class b's scores all ranked below a's: b pruned whole, the model broken
    for mask in masks.values():
        assert abs((~mask).float().mean() - 0.7) < 0.05


def test_class_distribution_prunes_below_lambda_sigma_in_every_class():
    torch.manual_seed(0)
    weights = {"a.0.w": torch.randn(40, 40), "a.1.w": torch.randn(40, 40), "b.0.w": 5 * torch.randn(30, 20)}
    classes = {"a.0.w": "a", "a.1.w": "a", "b.0.w": "b"}
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    thresholds = update_masks_(weights, masks, classes, MagnitudeCriterion(), 0.7, "class-distribution")
    lam = thresholds["lambda"]
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.7 * total)
    sigma = {"a": torch.cat([weights["a.0.w"].flatten(), weights["a.1.w"].flatten()]).std().item(),
             "b": weights["b.0.w"].std().item()}
    for name, weight in weights.items():
        limit = lam * sigma[classes[name]]
        assert (weight.abs()[~masks[name]] <= limit * (1 + 1e-5)).all()
        assert (weight.abs()[masks[name]] >= limit * (1 - 1e-5)).all()
    # the wide class b is pruned at the same rate as a, unlike a class-blind ranking
    assert abs((~masks["b.0.w"]).float().mean() - 0.7) < 0.05
