import math

import pytest
import torch
from conftest import TinyClassificationDataset, tiny_bert
from testing_utils import assert_refused_before_training, tiny_training_args
from transformers import Trainer, TrainerCallback

from hf_prune import PrunedModel, Pruner, PruningConfig
from hf_prune.methods.rpp import (
    ALPHA_DTYPE,
    MIN_EPSILON,
    PenaltySchedule,
    RPPCallback,
    RPPConfig,
    learning_rates,
    mask_config,
    proximal_step_,
    reweight,
    soft_threshold_,
)


# ------------------------------------------------------------------------------------------ proximal operator
def test_soft_threshold_matches_closed_form_by_hand():
    # dyadic values, so every result is exact; threshold = scale * alpha = 0.25 * alpha
    weight = torch.tensor([[0.75, -0.75, 0.25, -0.25], [0.5, -0.5, 0.0, 2.0], [0.375, -0.375, 0.125, -1.0]])
    alpha = torch.tensor([[1.0, 1.0, 2.0, 2.0], [2.0, 2.0, 4.0, 4.0], [1.0, 1.0, 0.5, 0.5]], dtype=ALPHA_DTYPE)
    before = weight.clone()
    expected = torch.tensor([[0.5, -0.5, 0.0, 0.0],     # above: shrink by 0.25; below (0.25 < 0.5): 0
                             [0.0, 0.0, 0.0, 1.0],      # exactly at the threshold: 0; zero stays zero
                             [0.125, -0.125, 0.0, -0.875]])

    out = soft_threshold_(weight, alpha, scale=0.25)

    assert out is weight
    assert torch.equal(weight, expected)
    assert (weight * before >= 0).all(), "no entry may cross zero"
    assert (weight[before.abs() <= 0.25 * alpha.float()] == 0).all()


def test_proximal_step_uses_each_groups_learning_rate_and_counts_zeros():
    fast, slow, frozen = (torch.nn.Parameter(torch.tensor([0.3, -0.3, 0.01, -0.01])) for _ in range(3))
    optimizer = torch.optim.SGD([{"params": [fast], "lr": 0.5}, {"params": [slow], "lr": 0.125}], lr=1.0)
    params = {"fast": fast, "slow": slow, "frozen": frozen}
    alphas = {name: torch.full((4,), 0.5, dtype=ALPHA_DTYPE) for name in params}

    lrs = learning_rates(optimizer, params)
    zeros = proximal_step_(params, alphas, lrs, penalty=0.25)

    assert lrs == {"fast": 0.5, "slow": 0.125, "frozen": 0.0}
    # thresholds lr * λ * α: 0.0625 for fast, 0.015625 for slow, 0 for frozen (not updated by the optimizer)
    torch.testing.assert_close(fast.detach(), torch.tensor([0.2375, -0.2375, 0.0, 0.0]))
    torch.testing.assert_close(slow.detach(), torch.tensor([0.284375, -0.284375, 0.0, 0.0]))
    assert torch.equal(frozen.detach(), torch.tensor([0.3, -0.3, 0.01, -0.01]))
    assert int(zeros) == 4


def test_reweight_is_inverse_magnitude_in_bfloat16():
    weight = torch.tensor([[0.0, 0.5, -0.5, 1e-4], [-2.0, 3e-3, 1.0, -1e-6]])
    alphas = reweight({"w": weight}, epsilon=1e-3)

    assert alphas["w"].dtype == ALPHA_DTYPE
    torch.testing.assert_close(alphas["w"].float(), 1.0 / (weight.abs() + 1e-3), rtol=2 ** -8, atol=0.0)
    assert alphas["w"].float().max() <= 1e3 * (1 + 2 ** -8), "ε bounds α"


# ----------------------------------------------------------------------------------------------- schedules
def test_penalty_schedule_window_warmup_and_refresh_steps():
    constant = PenaltySchedule.from_config(RPPConfig(penalty=0.5, start_step=2, end_step=11, reweight_every=3))
    linear = PenaltySchedule.from_config(RPPConfig(penalty=0.5, start_step=2, end_step=11, reweight_every=3,
                                                   penalty_schedule="linear"))

    assert [constant(step) for step in (2, 3, 11, 12)] == [0.0, 0.5, 0.5, 0.0]
    assert [linear(step) for step in (2, 3, 11, 12)] == [0.0, 0.5 / 9, 0.5, 0.0]
    assert [step for step in range(20) if constant.reweights_at(step)] == [3, 6, 9]


def test_penalty_schedule_defaults_end_step_like_the_core():
    schedule = PenaltySchedule.from_config(RPPConfig(start_step=1), max_steps=100)
    assert (schedule.start, schedule.end) == (1, 75)
    with pytest.raises(ValueError, match="max_steps"):
        PenaltySchedule.from_config(RPPConfig(end_step=120), max_steps=100)


def test_mask_config_is_a_oneshot_at_end_step():
    config = RPPConfig(final_sparsity=0.7, scheme="class-uniform", start_step=3, end_step=20,
                       target_modules=["query", "key"])
    hard = mask_config(config, 20)
    assert type(hard) is PruningConfig
    assert (hard.schedule, hard.start_step, hard.final_sparsity, hard.scheme, hard.target_modules) == \
           ("oneshot", 20, 0.7, "class-uniform", ["query", "key"])


def test_mask_config_keeps_a_gradual_schedule_over_the_window():
    config = RPPConfig(initial_sparsity=0.1, final_sparsity=0.7, schedule="cubic", start_step=3,
                       pruning_frequency=4, criterion="obd", fisher_steps=4)
    gradual = mask_config(config, 30)
    assert type(gradual) is PruningConfig
    assert (gradual.schedule, gradual.initial_sparsity, gradual.start_step, gradual.end_step,
            gradual.pruning_frequency, gradual.criterion) == ("cubic", 0.1, 3, 30, 4, "obd")


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("field, value, accepted", [
    ("penalty", -0.1, ">= 0"),
    ("penalty", float("nan"), ">= 0"),
    ("penalty", True, ">= 0"),
    ("epsilon", float("inf"), ">= 1e-12"),
    ("epsilon", 0.0, ">= 1e-12"),
    ("epsilon", -1e-3, ">= 1e-12"),
    ("epsilon", 1e-40, ">= 1e-12"),
    ("reweight_every", 0, ">= 1"),
    ("reweight_every", 2.5, ">= 1"),
    ("penalty_schedule", "cosine", "'constant', 'linear'"),
    ("schedule", "exponential", "'oneshot', 'iterative', 'cubic'"),
    ("initial_sparsity", 0.2, "0.0"),
    ("pruning_frequency", 5, "None"),
    ("end_step", 3, "greater than `start_step`"),
])
def test_bad_config_raises_naming_field_value_and_range(field, value, accepted):
    with pytest.raises(ValueError, match=f"`{field}`") as error:
        RPPConfig(start_step=3, **{field: value})
    assert repr(value) in str(error.value) or str(value) in str(error.value)
    assert accepted in str(error.value)


def test_config_round_trips_through_the_core_from_dict():
    config = RPPConfig(final_sparsity=0.9, penalty=0.2, penalty_schedule="linear", epsilon=1e-4, reweight_every=7,
                       end_step=50)
    loaded = PruningConfig.from_dict(config.to_dict())
    assert type(loaded) is RPPConfig and loaded == config


def test_callback_rejects_a_plain_pruning_config():
    with pytest.raises(ValueError, match="RPPConfig"):
        RPPCallback(PruningConfig())


# ----------------------------------------------------------------------------------------- Trainer runs
CONFIG = dict(final_sparsity=0.8, end_step=9, penalty=0.01, epsilon=1e-3, reweight_every=3)


class Probe(TrainerCallback):
    """Placed after the RPP callback: records the steps α is refreshed on, whether the masks stay dense before
    end_step, and the steps from end_step on after which every pruned weight is exactly zero."""

    def __init__(self, rpp: RPPCallback) -> None:
        self.rpp = rpp
        self.alphas = None
        self.refresh_steps: list[int] = []
        self.zero_steps: list[int] = []
        self.masks_before_end_are_dense = True

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.rpp.pruner.alphas is not None and self.rpp.pruner.alphas is not self.alphas:
            self.refresh_steps.append(state.global_step + 1)
        self.alphas = self.rpp.pruner.alphas

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step < CONFIG["end_step"]:
            self.masks_before_end_are_dense &= all(bool(mask.all()) for mask in self.rpp.masks.values())
            return
        params = dict(model.named_parameters())
        if all(bool((params[name].detach()[~mask] == 0).all()) for name, mask in self.rpp.masks.items()):
            self.zero_steps.append(state.global_step)


def train(output_dir, max_steps=12, save_steps=3, **overrides):
    callback = RPPCallback(RPPConfig(**CONFIG))
    probe = Probe(callback)
    args = tiny_training_args(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=save_steps,
                              **overrides)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=TinyClassificationDataset(96),
                      callbacks=[callback, probe])
    return trainer, callback, probe


@pytest.mark.slow
def test_trainer_run_reaches_exact_target_and_resumes_to_the_same_masks(tmp_path):
    full, callback, probe = train(tmp_path / "out")
    full.train()

    assert probe.refresh_steps == [1, 4, 7], "α is refreshed on the first step of the window and every 3 steps"
    assert callback.pruner.alphas is None, "α is freed after the window"
    assert probe.masks_before_end_are_dense
    assert probe.zero_steps == [9, 10, 11, 12]
    total = sum(mask.numel() for mask in callback.masks.values())
    assert total - sum(int(mask.sum()) for mask in callback.masks.values()) == round(0.8 * total)

    logs = [entry for entry in full.state.log_history if "loss" in entry]
    assert [entry["rpp_penalty"] for entry in logs] == [0.01, 0.01, 0.01, 0.01, 0.0, 0.0]
    zero_fractions = [entry["rpp_zero_fraction"] for entry in logs]
    assert 0.0 < zero_fractions[0] <= zero_fractions[4] < 0.8, "the proximal operator zeroes weights on its own"
    assert zero_fractions[4] == zero_fractions[5], "frozen at its value before the hard prune"

    resumed, resumed_callback, resumed_probe = train(tmp_path / "out")
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))
    assert resumed_probe.refresh_steps == [7] and resumed_probe.zero_steps == [9, 10, 11, 12]
    for name, mask in callback.masks.items():
        assert torch.equal(mask, resumed_callback.masks[name]), name
    resumed_params = dict(resumed.model.named_parameters())
    for name, param in full.model.named_parameters():
        torch.testing.assert_close(param, resumed_params[name])

    PrunedModel.from_trainer(full).save_pretrained(tmp_path / "pruned")
    loaded = PrunedModel.from_pretrained(tmp_path / "pruned")
    assert loaded.pruning_config == RPPConfig(**CONFIG)
    for name, mask in callback.masks.items():
        assert torch.equal(loaded.masks[name], mask), name


@pytest.mark.slow
def test_resume_between_two_refreshes_warns_and_still_reaches_the_target(tmp_path, caplog):
    first, _, _ = train(tmp_path / "out", save_steps=4)
    first.train()
    resumed, callback, probe = train(tmp_path / "out", save_steps=4)
    with caplog.at_level("WARNING", logger="hf_prune.methods.rpp"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))

    assert "between two refreshes of α" in caplog.text
    assert probe.refresh_steps == [5, 7], "α is recomputed on the first step after the resume, then on schedule"
    assert probe.zero_steps == [9, 10, 11, 12]
    total = sum(mask.numel() for mask in callback.masks.values())
    assert total - sum(int(mask.sum()) for mask in callback.masks.values()) == round(0.8 * total)


def test_gradual_schedule_grows_the_masks_over_the_window_while_the_proximal_step_runs(tmp_path):
    config = RPPConfig(**{**CONFIG, "schedule": "cubic", "pruning_frequency": 3})  # events at steps 3, 6, 9
    callback = RPPCallback(config)
    sparsities: dict[int, float] = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sparsities[state.global_step] = callback.pruner.sparsity()

    args = tiny_training_args(tmp_path, logging_steps=1, weight_decay=0.0)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=TinyClassificationDataset(96),
                      callbacks=[callback, Record()])
    trainer.train()

    expected = {step: 0.8 * (1 - (1 - min(step // 3 * 3, 9) / 9) ** 3) for step in range(1, 13)}
    for step, sparsity in sparsities.items():
        assert sparsity == pytest.approx(expected[step], abs=1e-3), step
    assert 0 < sparsities[3] < sparsities[6] < sparsities[9] == sparsities[12]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    zeros = {entry["step"]: entry["rpp_zero_fraction"] for entry in logs}  # after the step's proximal operator
    assert zeros[1] > 0 and zeros[2] > zeros[1], "before the first event the proximal step zeroes weights"
    assert all(zeros[step] >= sparsities[step - 1] for step in range(2, 10)), "masked weights stay zero"
    params = dict(trainer.model.named_parameters())
    total = sum(mask.numel() for mask in callback.masks.values())
    assert total - sum(int(mask.sum()) for mask in callback.masks.values()) == round(0.8 * total)
    for name, mask in callback.masks.items():
        assert bool((params[name].detach()[~mask] == 0).all()), name


# ------------------------------------------------------------------- finite updates (issue 16, item 10)
def test_epsilon_is_bounded_so_alpha_stays_finite_on_zero_weights():
    assert MIN_EPSILON == 1e-12
    for epsilon in (1e-40, 1e-13, 0.0, float("nan")):
        with pytest.raises(ValueError, match=">= 1e-12"):
            RPPConfig(epsilon=epsilon)
    alphas = reweight({"w": torch.zeros(3, 4)}, RPPConfig(epsilon=MIN_EPSILON).epsilon)
    assert alphas["w"].dtype == ALPHA_DTYPE and bool(torch.isfinite(alphas["w"]).all())
    torch.testing.assert_close(alphas["w"].float(), torch.full((3, 4), 1e12), rtol=2 ** -8, atol=0.0)


@pytest.mark.parametrize("lr, penalty", [(0.0, 0.25), (0.5, 0.0), (0.0, 0.0)])
def test_a_zero_step_leaves_weights_unchanged_even_where_alpha_overflowed(lr, penalty):
    weight = torch.tensor([[0.0, 0.5, -0.25], [0.0, -0.0, 1e-30]])
    alphas = {"w": torch.tensor([[float("inf"), 2.0, float("inf")], [float("inf"), float("inf"), 1.0]],
                                dtype=ALPHA_DTYPE)}
    before = weight.clone()
    zeros = proximal_step_({"w": weight}, alphas, {"w": lr}, penalty)
    assert bool(torch.isfinite(weight).all()), "0 * inf must not reach the weights"
    assert torch.equal(weight, before) and int(zeros) == 3


def test_a_nonzero_step_with_huge_alpha_zeroes_instead_of_making_nan():
    weight = torch.tensor([0.0, 0.5, -0.25, 3.0])
    alphas = {"w": torch.tensor([1e12, float("inf"), 1.0, 0.5], dtype=ALPHA_DTYPE)}
    proximal_step_({"w": weight}, alphas, {"w": 0.5}, penalty=0.5)
    assert torch.equal(weight, torch.tensor([0.0, 0.0, 0.0, 2.875]))


@pytest.mark.parametrize("penalty, learning_rate", [(0.0, 5e-3), (0.01, 0.0)], ids=["penalty-0", "lr-0"])
def test_trainer_run_with_a_zero_proximal_step_keeps_every_weight_finite(tmp_path, penalty, learning_rate):
    config = RPPConfig(final_sparsity=0.8, end_step=9, penalty=penalty, epsilon=MIN_EPSILON, reweight_every=3)
    callback = RPPCallback(config)
    model = tiny_bert()
    with torch.no_grad():  # exact zeros before the window: α = 1/ε = 1e12 there from the first refresh
        for name, param in model.named_parameters():
            if name.endswith("attention.self.query.weight"):
                param[:, :8] = 0.0
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    args = tiny_training_args(tmp_path, learning_rate=learning_rate, lr_scheduler_type="constant", weight_decay=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=TinyClassificationDataset(96), callbacks=[callback])
    trainer.train()

    params = dict(model.named_parameters())
    assert all(bool(torch.isfinite(param).all()) for param in params.values())
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)
    total = sum(mask.numel() for mask in callback.masks.values())
    assert total - sum(int(mask.sum()) for mask in callback.masks.values()) == round(0.8 * total)
    if learning_rate == 0.0:  # nothing but the hard prune at end_step moved the weights
        for name, mask in callback.masks.items():
            assert torch.equal(params[name].detach()[mask], before[name][mask]), name
    else:  # λ = 0: the proximal step is off (AdamW moves the zeros set above), the masks come from the hard prune
        logs = [entry for entry in trainer.state.log_history if "rpp_zero_fraction" in entry]
        assert logs and all(entry["rpp_penalty"] == 0.0 and entry["rpp_zero_fraction"] < 0.01 for entry in logs)


@pytest.mark.parametrize("field, value", [("penalty", -1.0), ("penalty_schedule", "cosine"), ("epsilon", 0.0),
                                          ("reweight_every", 0)])
def test_an_rpp_field_set_after_construction_is_checked_when_training_begins(tmp_path, field, value):
    callback = RPPCallback(RPPConfig(final_sparsity=0.5, end_step=4))
    setattr(callback.config, field, value)
    trainer = Trainer(model=tiny_bert(), args=tiny_training_args(tmp_path),
                      train_dataset=TinyClassificationDataset(32), callbacks=[callback])
    assert_refused_before_training(trainer, f"`{field}`")


def test_an_optimizer_without_the_targeted_weights_is_refused_before_the_first_step(tmp_path):
    # the proximal step would find no learning rate for them (as under DeepSpeed ZeRO-1/2's flat copies)
    model = tiny_bert()
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    trainer = Trainer(model=model, args=tiny_training_args(tmp_path), train_dataset=TinyClassificationDataset(32),
                      callbacks=[RPPCallback(RPPConfig(final_sparsity=0.5, schedule="cubic", end_step=4))],
                      optimizers=(torch.optim.SGD(biases, lr=0.1), None))
    assert_refused_before_training(trainer, r"the optimizer \(\w+\) does not hold 12 of them, such as bert\.encoder")


def test_from_pretrained_without_a_config_holds_the_saved_masks_fixed(tmp_path):
    model = tiny_bert()
    pruner = Pruner(model, PruningConfig(final_sparsity=0.6, schedule="oneshot"), max_steps=1)
    pruner.update(0)
    PrunedModel(model, pruner.masks, RPPConfig(**CONFIG)).save_pretrained(tmp_path / "pruned")
    loaded = PrunedModel.from_pretrained(tmp_path / "pruned")
    callback = RPPCallback.from_pretrained(tmp_path / "pruned")
    assert not callback.prunes_after_train_begin()  # so QuantizationCallback can follow it
    trainer = Trainer(model=loaded.model, args=tiny_training_args(tmp_path / "out", max_steps=6),
                      train_dataset=TinyClassificationDataset(96), callbacks=[callback])
    trainer.train()
    params = dict(loaded.model.named_parameters())
    for name, mask in pruner.masks.items():
        assert torch.equal(callback.masks[name], mask), name
        assert (params[name][mask] != 0).all(), f"{name}: the proximal step zeroed kept weights"
    zero_fractions = [entry["rpp_zero_fraction"] for entry in trainer.state.log_history if "loss" in entry]
    assert zero_fractions == [pytest.approx(0.6, abs=1e-4)] * 3, "no zeros beyond the saved masks"
