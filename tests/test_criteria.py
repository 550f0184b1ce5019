import dataclasses
import math
import os

import pytest
import torch
from conftest import TinyClassificationDataset, tiny_bert
from testing_utils import magnitude_trainer, train_until_first_checkpoint
from torch import nn

from hf_prune import Pruner, PruningConfig, SparsitySchedule
from hf_prune.constants import MASKS_NAME
from hf_prune.criteria import OBDCriterion
from hf_prune.serialization import load_masks


# ------------------------------------------------------------------------------------ OBD on an exact quadratic
def regression_at_a_minimum(pairs: int = 8):
    """Least squares `L(w) = mean_k (x_kᵀw − y_k)²` built so that, at the returned `w`, every residual `r_k` is
    ±1/√2 and the residuals cancel in pairs of identical rows: `∇L(w) = 0`, and the per-example empirical
    Fisher diagonal `mean_k (2·r_k·x_ki)² = 2·mean_k x_ki²` equals the Hessian diagonal `H_ii = 2·mean_k x_ki²`
    exactly.
    Columns of very different scales make the OBD ranking differ from the magnitude ranking."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.1, 3.0, 1.0, 0.3, 2.0, 0.5], dtype=torch.float64)
    x = (torch.randn(pairs, len(scales), generator=generator, dtype=torch.float64) * scales).repeat_interleave(2, 0)
    w = torch.tensor([1.0, 0.2, 0.5, 2.0, 0.3, 0.8], dtype=torch.float64)
    residuals = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(pairs) / math.sqrt(2.0)
    return x, x @ w - residuals, w


def mean_loss(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x @ w - y).square().mean()


def hessian_diagonal_by_finite_differences(x, y, w, h: float = 1e-3) -> torch.Tensor:
    """Central differences of the autograd gradient (float64): exact up to rounding for a quadratic loss."""
    def gradient(point: torch.Tensor) -> torch.Tensor:
        point = point.clone().requires_grad_(True)
        return torch.autograd.grad(mean_loss(x, y, point), point)[0]

    eye = torch.eye(len(w), dtype=w.dtype)
    return torch.stack([(gradient(w + h * eye[i])[i] - gradient(w - h * eye[i])[i]) / (2 * h)
                        for i in range(len(w))])


def test_obd_saliency_is_the_exact_loss_increase_on_a_quadratic_at_its_minimum():
    x, y, w = regression_at_a_minimum()
    model = nn.Sequential(nn.Linear(len(w), 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w[None])
    config = PruningConfig(criterion="obd", schedule="oneshot", final_sparsity=0.5, start_step=len(x),
                           fisher_steps=len(x), target_modules=["0"])
    pruner = Pruner(model, config)
    for step, (row, target) in enumerate(zip(x.float(), y.float()), start=1):  # one example per "step"
        (model(row[None])[0, 0] - target).square().backward()
        assert pruner.observe_gradients_(step)
        model.zero_grad()
    weight = model[0].weight.detach().clone()

    assert torch.autograd.functional.jacobian(lambda v: mean_loss(x, y, v), w).abs().max() < 1e-12  # a minimum
    hessian_diagonal = hessian_diagonal_by_finite_differences(x, y, w)
    torch.testing.assert_close(hessian_diagonal, 2 * x.square().mean(0), rtol=1e-8, atol=0)
    eye = torch.eye(len(w), dtype=w.dtype)
    loss_increase = torch.stack([mean_loss(x, y, w - w[i] * eye[i]) - mean_loss(x, y, w) for i in range(len(w))])

    saliency = pruner.criterion.score("0.weight", weight)[0]
    assert saliency.dtype == torch.float32
    torch.testing.assert_close(saliency.double(), 0.5 * hessian_diagonal * w.square(), rtol=1e-5, atol=0)
    torch.testing.assert_close(saliency.double(), loss_increase, rtol=1e-5, atol=0)

    assert pruner.update(len(x))
    pruned = set((~pruner.masks["0.weight"][0]).nonzero().view(-1).tolist())
    assert pruned == set(loss_increase.argsort()[:3].tolist())
    assert pruned != set(w.abs().argsort()[:3].tolist())  # magnitude would prune other weights
    assert (model[0].weight[0, sorted(pruned)] == 0).all()


def test_non_finite_statistics_keep_the_weight_and_scores_stay_non_negative_float32():
    criterion = OBDCriterion()
    criterion.observe_gradients({"w": torch.tensor([math.inf, math.nan, 1.0, -2.0])})
    score = criterion.score("w", torch.tensor([0.0, 1.0, 2.0, -1.0]))
    maximum = torch.finfo(torch.float32).max
    assert score.dtype == torch.float32 and score.tolist() == [maximum, maximum, 2.0, 2.0]


# ------------------------------------------------------------------------------------- accumulation window
def test_gradients_are_accumulated_only_in_the_window_before_each_event_and_freed_after_it():
    model = tiny_bert()
    config = PruningConfig(initial_sparsity=0.2, final_sparsity=0.8, schedule="iterative", start_step=4,
                           end_step=10, pruning_frequency=3, criterion="obd", fisher_steps=2)
    pruner = Pruner(model, config)  # events at steps 4, 7 and 10
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(TinyClassificationDataset(80), batch_size=8)
    targeted = sum(p.numel() for p in pruner.params.values())
    held_before_update, held_after_update, recorded = [], [], []
    assert not pruner.update(0, optimizer)
    for step, batch in enumerate(loader, start=1):
        model(**batch).loss.backward()
        if pruner.observe_gradients_(step):
            recorded.append(step)
        held = pruner.criterion.squared_gradients
        assert all(t.dtype == torch.float32 for t in held.values())
        held_before_update.append((sum(t.numel() for t in held.values()), pruner.criterion.observations))
        pruner.mask_gradients_()
        optimizer.step()
        pruner.apply_()
        optimizer.zero_grad()
        pruner.update(step, optimizer)
        held_after_update.append(len(pruner.criterion.squared_gradients))
    assert recorded == [3, 4, 6, 7, 9, 10]
    assert held_before_update == [(0, 0), (0, 0), (targeted, 1), (targeted, 2), (0, 0), (targeted, 1),
                                  (targeted, 2), (0, 0), (targeted, 1), (targeted, 2)]
    n = len(pruner.params)  # freed right after the events at 4, 7 and 10, held between steps 3 and 4, ...
    assert held_after_update == [0, 0, n, 0, 0, n, 0, 0, n, 0]
    assert pruner.sparsity() == pytest.approx(0.8, abs=1e-4)
    assert not Pruner(tiny_bert(), dataclasses.replace(config, criterion="magnitude")).observe_gradients_(4)


def test_an_event_without_gradient_statistics_is_a_clear_error():
    pruner = Pruner(tiny_bert(), PruningConfig(criterion="obd", schedule="oneshot", final_sparsity=0.5))
    with pytest.raises(ValueError, match=r"`start_step` >= `fisher_steps`.*estimate_fisher"):
        pruner.update(0)
    assert all(mask.all() for mask in pruner.masks.values()) and pruner.target_sparsity == 0.0


# ---------------------------------------------------------------------------------------- one-shot (no Trainer)
def test_estimate_fisher_matches_squared_per_example_gradients_and_prunes_exactly():
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dataset = TinyClassificationDataset(8)
    pruner = Pruner(model, PruningConfig(criterion="obd", schedule="oneshot", final_sparsity=0.5))
    pruner.estimate_fisher(model, torch.utils.data.DataLoader(dataset, batch_size=1), num_batches=4)
    assert model.training and pruner.criterion.observations == 4
    assert all(p.grad is None and torch.equal(p, before[n]) for n, p in model.named_parameters())

    model.eval()
    squares = {name: torch.zeros_like(p) for name, p in pruner.params.items()}
    for i in range(4):
        model(**{k: v[None] for k, v in dataset[i].items()}).loss.backward()
        for name, p in pruner.params.items():
            squares[name] += p.grad.square()
        model.zero_grad()
    for name, p in pruner.params.items():
        torch.testing.assert_close(pruner.criterion.score(name, p), 0.5 * squares[name] / 4 * p.detach().square())

    pruner.prune_to(0.5)
    total = sum(mask.numel() for mask in pruner.masks.values())
    assert sum(int((~mask).sum()) for mask in pruner.masks.values()) == round(0.5 * total)
    assert pruner.criterion.squared_gradients == {} and pruner.criterion.observations == 0
    assert all((pruner.params[n][~m] == 0).all() for n, m in pruner.masks.items())


def test_estimate_fisher_bad_input_is_a_clear_error():
    model, loader = tiny_bert(), [{k: v[None] for k, v in TinyClassificationDataset(2)[0].items()}]
    with pytest.raises(ValueError, match="`criterion` 'magnitude' does not use data"):
        Pruner(model, PruningConfig(schedule="oneshot")).estimate_fisher(model, loader)
    pruner = Pruner(model, PruningConfig(criterion="obd", schedule="oneshot"))
    with pytest.raises(ValueError, match="`num_batches`"):
        pruner.estimate_fisher(model, loader, num_batches=0)
    with pytest.raises(ValueError, match="must yield dicts"):
        pruner.estimate_fisher(model, [torch.ones(1, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match="no loss"):
        pruner.estimate_fisher(model, [{"input_ids": torch.ones(1, 4, dtype=torch.long)}])


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "10", None])
def test_bad_fisher_steps_names_the_field(value):
    with pytest.raises(ValueError, match="`fisher_steps` must be an integer >= 1"):
        PruningConfig(criterion="obd", fisher_steps=value)


# --------------------------------------------------------------------------------------------- Trainer runs
OBD = dict(initial_sparsity=0.1, final_sparsity=0.8, schedule="cubic", start_step=4, end_step=10,
           pruning_frequency=3, criterion="obd", fisher_steps=2)  # events at 4, 7 and 10


@pytest.mark.slow
def test_trainer_run_reaches_the_target_with_exact_zeros_and_other_masks_than_magnitude(tmp_path):
    trainer, callback, checker = magnitude_trainer(tmp_path / "obd", PruningConfig(**OBD))
    trainer.train()
    assert checker.violations == []
    schedule = SparsitySchedule.from_config(callback.config, max_steps=12)
    assert all(sparsity == pytest.approx(schedule(step), abs=1e-4)
               for step, sparsity in checker.sparsity_by_step.items())
    total = sum(mask.numel() for mask in callback.masks.values())
    assert sum(int((~mask).sum()) for mask in callback.masks.values()) == round(0.8 * total)
    params = dict(trainer.model.named_parameters())
    assert all((params[name][~mask] == 0).all() for name, mask in callback.masks.items())
    assert callback.pruner.criterion.squared_gradients == {}  # steps 11 and 12 are outside every window

    magnitude, magnitude_callback, _ = magnitude_trainer(tmp_path / "magnitude",
                                                         PruningConfig(**{**OBD, "criterion": "magnitude"}))
    magnitude.train()
    assert magnitude_callback.pruner.sparsity() == pytest.approx(callback.pruner.sparsity(), abs=1e-12)
    assert any(not torch.equal(mask, magnitude_callback.masks[name]) for name, mask in callback.masks.items())


@pytest.mark.slow
def test_resumed_obd_run_restores_the_masks_and_ends_with_the_same_ones(tmp_path):
    # The checkpoint at step 4 lies after the event at 4 and before the window (steps 6, 7) of the event at 7, so
    # the resumed run sees the same gradients in every window as the uninterrupted one.
    full, full_callback, _ = magnitude_trainer(tmp_path / "a", PruningConfig(**OBD), save_strategy="steps",
                                               save_steps=4)
    full.train()
    first, _, _ = magnitude_trainer(tmp_path / "b", PruningConfig(**OBD), save_strategy="steps", save_steps=4)
    checkpoint = train_until_first_checkpoint(first)
    assert checkpoint == str(tmp_path / "b" / "out" / "checkpoint-4")
    saved = load_masks(os.path.join(checkpoint, MASKS_NAME))

    resumed, resumed_callback, checker = magnitude_trainer(tmp_path / "b", PruningConfig(**OBD),
                                                           save_strategy="steps", save_steps=4)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == 12 and checker.violations == []
    restored = SparsitySchedule.from_config(resumed_callback.config, max_steps=12)(4)
    assert checker.sparsity_by_step[5] == pytest.approx(restored, abs=1e-4)  # the masks of step 4, restored
    for name, mask in full_callback.masks.items():
        assert torch.equal(mask, resumed_callback.masks[name]), name
        assert not (mask & ~saved[name]).any(), name  # masks restored at step 4 only lost entries since


# ----------------------------------------------------------------------------------- wanda's recording windows
WANDA = dict(initial_sparsity=0.1, final_sparsity=0.8, schedule="cubic", start_step=2, end_step=10,
             pruning_frequency=4, criterion="wanda", fisher_steps=2)  # events at 2, 6 and 10; windows 1-2, 5-6, 9-10


def test_wanda_records_the_training_passes_of_event_windows_only_also_after_a_resume():
    model = tiny_bert().train()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    trained = Pruner(model, PruningConfig(**WANDA))
    trained.update(0)
    model(input_ids=ids)  # step 1: in the window of the event at 2
    assert trained.update(2)
    resumed = Pruner(model, PruningConfig(**WANDA))  # a resume at step 3: step 4 lies outside every window
    resumed.load_state_dict(trained.state_dict())
    resumed.update(3)
    model(input_ids=ids)
    assert resumed.criterion.squared_inputs == {}
    resumed.update(4)  # step 5 opens the window of the event at 6
    model(input_ids=ids)
    recorded = {name: squares.clone() for name, (squares, _) in resumed.criterion.squared_inputs.items()}
    assert sorted(recorded) == sorted(resumed.params)
    model.eval()(input_ids=ids)  # an evaluation inside the window adds nothing
    assert all(torch.equal(resumed.criterion.squared_inputs[n][0], s) for n, s in recorded.items())


@pytest.mark.slow
def test_resumed_wanda_run_ends_with_the_same_masks(tmp_path):
    full, full_callback, _ = magnitude_trainer(tmp_path / "a", PruningConfig(**WANDA))
    full.train()
    first, _, _ = magnitude_trainer(tmp_path / "b", PruningConfig(**WANDA), save_strategy="steps", save_steps=3)
    checkpoint = train_until_first_checkpoint(first)
    resumed, resumed_callback, checker = magnitude_trainer(tmp_path / "b", PruningConfig(**WANDA),
                                                           save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == 12 and checker.violations == []
    assert all(torch.equal(mask, resumed_callback.masks[name]) for name, mask in full_callback.masks.items())
    assert resumed_callback.pruner.criterion.squared_inputs == {}  # steps 11 and 12 are outside every window


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_wanda_records_each_training_pass_once_under_activation_checkpointing(use_reentrant):
    ids = torch.randint(0, 100, (2, 8))
    recorded = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny_bert().train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
        pruner = Pruner(model, PruningConfig(**WANDA))
        pruner.update(0)
        model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()  # recomputes each block in backward
        recorded.append({name: squares for name, (squares, _) in pruner.criterion.squared_inputs.items()})
    plain, checkpointed = recorded
    assert sorted(plain) == sorted(checkpointed) and len(plain) > 0
    assert all(torch.allclose(plain[name], checkpointed[name]) for name in plain)


def test_wanda_scores_a_layer_that_saw_no_input_zero_and_fails_only_with_no_inputs_at_all():
    model = tiny_bert().train()
    pruner = Pruner(model, PruningConfig(**{**WANDA, "scheme": "class-uniform"}))
    before = {name: mask.clone() for name, mask in pruner.masks.items()}
    with pytest.raises(ValueError, match="no layer inputs"):
        pruner.prune_to(0.5)
    assert pruner.target_sparsity == 0.0 and all(torch.equal(m, before[n]) for n, m in pruner.masks.items())
    seen = next(iter(pruner.params))  # as with layerdrop, or an expert no token was routed to: one layer ran
    inputs = torch.randn(2, 8, pruner.params[seen].shape[1])
    pruner.criterion.observe_inputs(seen, inputs, 1)
    unseen = list(pruner.params)[1]
    assert torch.equal(pruner.criterion.score(unseen, pruner.params[unseen]),
                       torch.zeros_like(pruner.params[unseen]))
    assert torch.allclose(pruner.criterion.score(seen, pruner.params[seen]),
                          pruner.params[seen].detach().abs() * inputs.reshape(-1, inputs.shape[-1]).norm(dim=0))
    pruner.prune_to(0.5)  # class-uniform: every class to 0.5, the unseen layers in a fixed order of their ties
    assert pruner.sparsity() == pytest.approx(0.5, abs=1e-3) and pruner.target_sparsity == 0.5


def test_wanda_keeps_the_weights_of_a_nan_input_norm():
    model = tiny_bert()
    pruner = Pruner(model, PruningConfig(**{**WANDA, "scheme": "class-uniform"}))
    name = next(iter(pruner.params))
    inputs = torch.ones(2, 8, pruner.params[name].shape[1])
    inputs[0, 0, 1] = torch.tensor(float("inf")) - torch.tensor(float("inf"))  # an overflow's NaN (sign bit set on x86)
    for other in pruner.params:
        pruner.criterion.observe_inputs(other, inputs if other == name else torch.ones_like(inputs[..., :1])
                                        .expand(2, 8, pruner.params[other].shape[1]), 1)
    scores = pruner.criterion.score(name, pruner.params[name])
    assert bool(scores[:, 1].eq(torch.finfo(torch.float32).max).all()), "ranked last, as OBD ranks a NaN"
    pruner.prune_to(0.5)
    assert bool(pruner.masks[name][:, 1].all())


@pytest.mark.slow
def test_a_resume_inside_a_window_of_statistics_warns(tmp_path, caplog):
    first, _, _ = magnitude_trainer(tmp_path, PruningConfig(**WANDA), save_strategy="steps", save_steps=5)
    checkpoint = train_until_first_checkpoint(first)  # step 5: the window of the event at 6 is steps 5-6
    resumed, _, _ = magnitude_trainer(tmp_path, PruningConfig(**WANDA), save_strategy="steps", save_steps=5)
    with caplog.at_level("WARNING", logger="hf_prune.callbacks"):
        resumed.train(resume_from_checkpoint=checkpoint)
    assert "Resuming at step 5 inside the 2-step window" in caplog.text
