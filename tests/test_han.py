"""Han et al. 2015 + See et al. 2016 retraining: L1/L2 gradients, composition with pruning, quality × σ events,
dropout ratio adjustment, the retraining schedule, Trainer runs with resume, bad configs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_MODELS, TinyClassificationDataset, tiny_bert
from testing_utils import ZeroChecker, tiny_training_args
from torch import nn
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from hf_prune import MagnitudePruningCallback, PrunedModel, PruningConfig
from hf_prune.methods.dropout import apply_dropout_adjustment
from hf_prune.methods.han import HanConfig, HanPruner, HanPruningCallback, event_steps, prune_below_std_
from hf_prune.methods.regularization import RegularizationCallback, penalty_value
from hf_prune.methods.retraining import get_see_retraining_schedule, see_retraining_arguments
from hf_prune.targets import find_targets


# ------------------------------------------------------------------------------------------- regularisation
@pytest.mark.parametrize("penalty", ["l1", "l2"])
def test_penalty_gradient_is_the_closed_form_on_targeted_weights_only(tmp_path, penalty):
    model = tiny_bert()
    generator = torch.Generator().manual_seed(1)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[0, :4] = 0.0  # sign(0) = 0: no L1 gradient
    before = {name: param.grad.clone() for name, param in model.named_parameters()}
    callback = RegularizationCallback(penalty, strength=0.25)
    args, state, control = tiny_training_args(tmp_path), TrainerState(), TrainerControl()

    callback.on_train_begin(args, state, control, model=model)
    callback.on_pre_optimizer_step(args, state, control)

    targeted = {t.name for t in find_targets(model, PruningConfig())}
    assert set(callback.params) == targeted
    for name, param in model.named_parameters():
        weight = param.detach()
        expected = 0.25 * weight.sign() if penalty == "l1" else 2 * 0.25 * weight
        torch.testing.assert_close(param.grad, before[name] + expected if name in targeted else before[name],
                                   rtol=0, atol=0)


def test_penalty_value_by_hand():
    params = {"a": torch.tensor([[1.0, -2.0], [0.5, 0.0]]), "b": torch.tensor([-0.25])}
    assert penalty_value(params, "l1", 0.5) == pytest.approx(0.5 * 3.75, rel=1e-12)
    assert penalty_value(params, "l2", 0.5) == pytest.approx(0.5 * 5.3125, rel=1e-12)


PRUNING = dict(initial_sparsity=0.1, final_sparsity=0.8, schedule="cubic", end_step=6, pruning_frequency=2)


@pytest.mark.parametrize("penalty", ["l1", "l2"])
@pytest.mark.parametrize("regularization_first", [True, False], ids=["regularization-first", "pruning-first"])
def test_regularization_never_revives_pruned_weights(tmp_path, penalty, regularization_first):
    config = PruningConfig(**PRUNING)
    pruning = MagnitudePruningCallback(config)
    regularization = RegularizationCallback(penalty, strength=0.5, config=config)
    checker = ZeroChecker(pruning)
    callbacks = [regularization, pruning] if regularization_first else [pruning, regularization]
    trainer = Trainer(model=tiny_bert(), args=tiny_training_args(tmp_path, max_steps=8, optim="sgd", learning_rate=0.1),
                      train_dataset=TinyClassificationDataset(64), callbacks=[*callbacks, checker])
    trainer.train()

    assert checker.violations == []
    assert pruning.pruner.sparsity() == pytest.approx(0.8, abs=1e-4)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry[f"{penalty}_strength"] == 0.5 and entry[f"{penalty}_penalty"] > 0 for entry in logged)
    assert logged[-1][f"{penalty}_penalty"] == pytest.approx(penalty_value(regularization.params, penalty, 0.5))


# ------------------------------------------------------------------------------------------ quality × σ pruning
def test_each_event_prunes_exactly_the_weights_below_quality_times_kept_sigma():
    model = tiny_bert()
    config = HanConfig(quality=[0.4, 0.4, 0.6], pruning_frequency=1)
    pruner = HanPruner(model, config)
    generator = torch.Generator().manual_seed(0)
    sparsities = []
    for step, quality in enumerate(config.qualities()):
        with torch.no_grad():  # "retraining": every weight moves, pruned ones included, before the next event
            for param in pruner.params.values():
                param.add_(0.01 * torch.randn(param.shape, generator=generator))
        before = {name: mask.clone() for name, mask in pruner.masks.items()}
        weights = {name: param.detach().clone() for name, param in pruner.params.items()}

        assert pruner.update(step) and pruner.iteration == step + 1

        for name, mask in pruner.masks.items():
            sigma = float(weights[name][before[name]].double().std())
            threshold = pruner.thresholds[f"threshold/{name}"]
            assert threshold == pytest.approx(quality * sigma, rel=1e-12)
            assert torch.equal(mask, before[name] & (weights[name].abs() >= threshold)), name
            assert not (mask & ~before[name]).any(), "masks only grow"
            assert (pruner.params[name].detach()[~mask] == 0).all()
        sparsities.append(pruner.sparsity())
    assert 0 < sparsities[0] < sparsities[1] < sparsities[2] < 1
    assert not pruner.update(10), "no event after the last"

    again = HanPruner(tiny_bert(), config)
    again.load_state_dict(pruner.state_dict())
    assert again.iteration == 3 and not again.update(10)
    assert all(torch.equal(again.masks[name], mask) for name, mask in pruner.masks.items())


def test_prune_below_std_leaves_a_layer_with_fewer_than_two_kept_weights():
    weights = {"w": torch.tensor([[0.001, 0.0], [0.0, 0.0]])}
    masks = {"w": torch.tensor([[True, False], [False, False]])}
    assert prune_below_std_(weights, masks, quality=1.0) == {"threshold/w": 0.0}
    assert masks["w"].sum() == 1


def test_event_steps_and_their_defaults():
    assert event_steps(HanConfig(), max_steps=12) == (0, 4, 8)
    assert event_steps(HanConfig(quality=[0.5, 1.0], start_step=3), max_steps=12) == (3, 7)
    assert event_steps(HanConfig(quality=0.5, iterations=4, pruning_frequency=2, start_step=1)) == (1, 3, 5, 7)
    with pytest.raises(ValueError, match="`pruning_frequency`"):
        event_steps(HanConfig())
    with pytest.raises(ValueError, match="max_steps"):
        event_steps(HanConfig(pruning_frequency=6), max_steps=10)
    with pytest.raises(ValueError, match="`start_step`"):
        event_steps(HanConfig(start_step=11), max_steps=12)


# ------------------------------------------------------------------------------------------- dropout adjustment
def expected_dropouts(kind: str, model: nn.Module) -> dict[str, tuple[list[str], str]]:
    """Dropout -> (driving layers, config key of D_o), written out per architecture (the docstring's table)."""
    if kind == "bert":
        rows = {}
        for i in range(model.config.num_hidden_layers):
            layer = f"bert.encoder.layer.{i}"
            attention = f"{layer}.attention.self"
            rows[f"{attention}.dropout"] = ([f"{attention}.query", f"{attention}.key"], "attention_probs_dropout_prob")
            rows[f"{layer}.attention.output.dropout"] = ([f"{layer}.attention.output.dense"], "hidden_dropout_prob")
            rows[f"{layer}.output.dropout"] = ([f"{layer}.output.dense"], "hidden_dropout_prob")
        return rows
    if kind == "gpt2":
        rows = {}
        for i in range(model.config.n_layer):
            block = f"transformer.h.{i}"
            rows[f"{block}.attn.attn_dropout"] = ([f"{block}.attn.c_attn"], "attn_pdrop")
            rows[f"{block}.attn.resid_dropout"] = ([f"{block}.attn.c_proj"], "resid_pdrop")
            rows[f"{block}.mlp.dropout"] = ([f"{block}.mlp.c_proj"], "resid_pdrop")
        return rows
    rows = {}
    for stack, attentions in (("encoder", ["SelfAttention"]), ("decoder", ["SelfAttention", "EncDecAttention"])):
        for i in range(model.config.num_layers):
            block = f"{stack}.block.{i}"
            for j, attention in enumerate(attentions):
                rows[f"{block}.layer.{j}.{attention}.dropout"] = (
                    [f"{block}.layer.{j}.{attention}.q", f"{block}.layer.{j}.{attention}.k"], "dropout_rate")
                rows[f"{block}.layer.{j}.dropout"] = ([f"{block}.layer.{j}.{attention}.o"], "dropout_rate")
            ff = f"{block}.layer.{len(attentions)}"
            rows[f"{ff}.DenseReluDense.dropout"] = ([f"{ff}.DenseReluDense.wi"], "dropout_rate")
            rows[f"{ff}.dropout"] = ([f"{ff}.DenseReluDense.wo"], "dropout_rate")
    return rows


def current_ratio(model: nn.Module, key: str) -> float:
    module_name, _, attribute = key.rpartition(".")
    value = getattr(model.get_submodule(module_name), attribute)
    return value.p if isinstance(value, nn.Dropout) else value


@pytest.mark.parametrize("kind", ["bert", "gpt2", "t5"])
def test_dropout_ratio_is_original_times_sqrt_of_remaining_connections(kind):
    model = TINY_MODELS[kind]()
    generator = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    targets = find_targets(model, PruningConfig())
    masks = {t.name: torch.rand(params[t.name].shape, generator=generator) < 0.2 + 0.7 * i / len(targets)
             for i, t in enumerate(targets)}
    expected = expected_dropouts(kind, model)

    ratios = apply_dropout_adjustment(model, masks)

    assert set(ratios) == set(expected)
    for key, (drivers, config_key) in expected.items():
        kept = sum(int(masks[f"{d}.weight"].sum()) for d in drivers)
        total = sum(masks[f"{d}.weight"].numel() for d in drivers)
        original = getattr(model.config, config_key)
        assert original > 0 and kept < total
        assert ratios[key] == pytest.approx(original * math.sqrt(kept / total), rel=1e-12), key
        assert current_ratio(model, key) == ratios[key], key

    dense = apply_dropout_adjustment(model, {name: torch.ones_like(mask) for name, mask in masks.items()})
    assert all(current_ratio(model, key) == getattr(model.config, expected[key][1]) for key in dense)


def test_dropout_adjustment_rejects_masks_of_another_model():
    with pytest.raises(ValueError, match="unexpected mask"):
        apply_dropout_adjustment(tiny_bert(), {"transformer.h.0.attn.c_attn.weight": torch.ones(2, 2, dtype=bool)})


@pytest.mark.parametrize("kind, warned", [("bart", True), ("llama", False), ("bert", False)])
def test_a_model_whose_dropouts_are_not_adjusted_is_told_so_when_the_pruner_is_built(kind, warned, caplog):
    # BART's dropouts are functional calls on config values: the adjustment left them alone without a word
    model = TINY_MODELS[kind]()  # Llama: no dropout above 0; BERT: adjusted
    with caplog.at_level("WARNING", logger="hf_prune.methods.han"):
        HanPruner(model, HanConfig(quality=0.5, iterations=1), max_steps=10)
    assert ("adjust_dropout: BartForConditionalGeneration has no layer whose dropout hf_prune adjusts" in caplog.text
            and "dropout=0.1" in caplog.text) is warned
    with caplog.at_level("WARNING", logger="hf_prune.methods.han"):
        caplog.clear()
        HanPruner(model, HanConfig(quality=0.5, iterations=1, adjust_dropout=False), max_steps=10)
    assert "adjust_dropout" not in caplog.text


# ---------------------------------------------------------------------------------------- See et al. schedule
def test_see_schedule_halves_the_learning_rate_exactly_every_two_epochs():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = get_see_retraining_schedule(optimizer, num_update_steps_per_epoch=3)
    rates = []
    for _ in range(18):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == [0.1] * 6 + [0.05] * 6 + [0.025] * 6


def test_see_retraining_in_a_trainer_run(tmp_path):
    args = see_retraining_arguments(tiny_training_args(tmp_path, learning_rate=0.01, logging_steps=1, num_train_epochs=9))
    assert (args.learning_rate, args.num_train_epochs, args.max_steps) == (0.005, 4.0, -1)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=TinyClassificationDataset(16))
    trainer.create_optimizer()
    steps_per_epoch = math.ceil(len(trainer.get_train_dataloader()) / args.gradient_accumulation_steps)
    trainer.lr_scheduler = get_see_retraining_schedule(trainer.optimizer, steps_per_epoch)
    trainer.train()
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "loss" in entry]
    assert steps_per_epoch == 2 and rates == pytest.approx([0.005] * 4 + [0.0025] * 4, rel=1e-12)


# ---------------------------------------------------------------------------------------------- Trainer runs
HAN = dict(quality=0.6, iterations=3, pruning_frequency=4)


def han_trainer(output_dir):
    callback = HanPruningCallback(HanConfig(**HAN))
    checker = ZeroChecker(callback)
    trainer = Trainer(model=tiny_bert(), args=tiny_training_args(output_dir, save_strategy="steps", save_steps=6),
                      train_dataset=TinyClassificationDataset(96), callbacks=[callback, checker])
    return trainer, callback, checker


@pytest.mark.slow
def test_trainer_run_iterates_three_times_and_resumes_to_the_same_model(tmp_path):
    full, callback, checker = han_trainer(tmp_path / "out")
    full.train()

    assert checker.violations == []
    sparsity = checker.sparsity_by_step
    assert sparsity[1] == sparsity[3] < sparsity[4] == sparsity[7] < sparsity[8] == sparsity[12] < 1
    assert sparsity[1] > 0, "the first event is at step 0"
    logged = [entry for entry in full.state.log_history if "loss" in entry]
    assert [entry["han_iteration"] for entry in logged] == [1, 2, 2, 3, 3, 3]
    assert all(entry["han_quality"] == 0.6 for entry in logged)
    assert [entry["sparsity"] for entry in logged] == [sparsity[step] for step in (2, 4, 6, 8, 10, 12)]
    model = full.model
    query, key = model.bert.encoder.layer[1].attention.self.query, model.bert.encoder.layer[1].attention.self.key
    kept = int(callback.masks["bert.encoder.layer.1.attention.self.query.weight"].sum()) + \
        int(callback.masks["bert.encoder.layer.1.attention.self.key.weight"].sum())
    expected = 0.1 * math.sqrt(kept / (query.weight.numel() + key.weight.numel()))
    assert expected < 0.1
    assert model.bert.encoder.layer[1].attention.self.dropout.p == pytest.approx(expected, rel=1e-12)

    resumed, resumed_callback, resumed_checker = han_trainer(tmp_path / "out")
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))
    assert resumed_checker.violations == [] and resumed_callback.pruner.iteration == 3
    assert resumed_checker.sparsity_by_step[7] == sparsity[7] and resumed_checker.sparsity_by_step[8] == sparsity[8]
    assert resumed_callback.pruner.dropout == callback.pruner.dropout
    for name, mask in callback.masks.items():
        assert torch.equal(mask, resumed_callback.masks[name]), name
    resumed_params = dict(resumed.model.named_parameters())
    for name, param in full.model.named_parameters():  # equal only if the dropouts were restored as well
        torch.testing.assert_close(param, resumed_params[name])

    PrunedModel.from_trainer(full).save_pretrained(tmp_path / "pruned")
    loaded = PrunedModel.from_pretrained(tmp_path / "pruned")
    assert loaded.pruning_config == HanConfig(**HAN)
    assert apply_dropout_adjustment(loaded.model, loaded.masks) == callback.pruner.dropout


def test_resuming_under_another_max_steps_that_moves_the_events_is_refused(tmp_path):
    # Without pruning_frequency the events are spread over max_steps: resuming a 12-step run's checkpoint in a
    # 24-step run would move its remaining events (4, 8 -> 8, 16) without a word.
    config = dict(quality=0.6, iterations=3)
    first = Trainer(model=tiny_bert(), args=tiny_training_args(tmp_path / "out", save_strategy="steps", save_steps=6),
                    train_dataset=TinyClassificationDataset(96), callbacks=[HanPruningCallback(HanConfig(**config))])
    first.train()
    longer = Trainer(model=tiny_bert(), args=tiny_training_args(tmp_path / "out", max_steps=24),
                     train_dataset=TinyClassificationDataset(96), callbacks=[HanPruningCallback(HanConfig(**config))])
    with pytest.raises(ValueError, match=r"max_steps changed\?\): events: checkpoint \[0, 4, 8\], now \[0, 8, 16\]"):
        longer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))


def test_from_pretrained_without_a_config_holds_the_saved_masks_fixed(tmp_path):
    model = tiny_bert()
    pruner = HanPruner(model, HanConfig(**HAN), max_steps=12)
    pruner.update(0)
    PrunedModel(model, pruner.masks, pruner.config).save_pretrained(tmp_path / "pruned")
    loaded = PrunedModel.from_pretrained(tmp_path / "pruned")
    callback = HanPruningCallback.from_pretrained(tmp_path / "pruned")
    checker = ZeroChecker(callback)
    trainer = Trainer(model=loaded.model, args=tiny_training_args(tmp_path / "out", max_steps=6),
                      train_dataset=TinyClassificationDataset(96), callbacks=[callback, checker])
    trainer.train()
    assert checker.violations == [] and callback.pruner.iteration == 3
    assert all(torch.equal(callback.masks[name], mask) for name, mask in pruner.masks.items())
    assert callback.pruner.dropout == apply_dropout_adjustment(tiny_bert(), pruner.masks)


def test_from_pretrained_holds_the_masks_of_events_that_a_short_run_could_not_place(tmp_path):
    model = tiny_bert()
    config = HanConfig(quality=[0.4, 0.6, 0.8], start_step=10)  # pruning_frequency from max_steps=1000
    pruner = HanPruner(model, config, max_steps=1000)
    pruner.update(1000)
    PrunedModel(model, pruner.masks, pruner.config).save_pretrained(tmp_path / "pruned")
    loaded = PrunedModel.from_pretrained(tmp_path / "pruned")
    callback = HanPruningCallback.from_pretrained(tmp_path / "pruned")
    trainer = Trainer(model=loaded.model, args=tiny_training_args(tmp_path / "out", max_steps=2),
                      train_dataset=TinyClassificationDataset(32), callbacks=[callback])
    trainer.train()
    assert callback.pruner.iteration == 3
    assert all(torch.equal(callback.masks[name], mask) for name, mask in pruner.masks.items())


# ----------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("overrides, field, accepted", [
    ({"quality": 0.0}, "quality", "> 0"),
    ({"quality": float("nan")}, "quality", "> 0"),
    ({"quality": True}, "quality", "> 0"),
    ({"quality": []}, "quality", "non-empty list"),
    ({"quality": [0.5, -1.0]}, "quality", "> 0"),
    ({"iterations": 0}, "iterations", ">= 1"),
    ({"iterations": 2.5}, "iterations", ">= 1"),
    ({"quality": [0.5, 0.6, 0.7], "iterations": 2}, "iterations", "must equal"),
    ({"schedule": "cubic"}, "schedule", "'oneshot'"),
    ({"criterion": "obd"}, "criterion", "'magnitude'"),
    ({"initial_sparsity": 0.2}, "initial_sparsity", "0.0"),
    ({"end_step": 10}, "end_step", "None"),
    ({"adjust_dropout": "yes"}, "adjust_dropout", "True or False"),
    ({"pruning_frequency": 0}, "pruning_frequency", ">= 1"),
    ({"structure": "neurons"}, "structure", "'unstructured'"),
])
def test_bad_han_config_raises_naming_field_value_and_range(overrides, field, accepted):
    with pytest.raises(ValueError, match=f"`{field}`") as error:
        HanConfig(**overrides)
    assert repr(overrides[field]) in str(error.value) or str(overrides[field]) in str(error.value)
    assert accepted in str(error.value)


@pytest.mark.parametrize("make, field", [
    (lambda: RegularizationCallback("l3"), "penalty"),
    (lambda: RegularizationCallback("l1", strength=-1.0), "strength"),
    (lambda: RegularizationCallback("l2", strength=float("inf")), "strength"),
    (lambda: HanPruningCallback(PruningConfig()), "config"),
    (lambda: get_see_retraining_schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 0),
     "num_update_steps_per_epoch"),
    (lambda: get_see_retraining_schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 2, 0),
     "halve_every_epochs"),
    (lambda: get_see_retraining_schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 2, 2, 1.5),
     "last_epoch"),
    (lambda: see_retraining_arguments(TrainingArguments(output_dir="unused", report_to="none"), 1.5),
     "learning_rate_factor"),
    (lambda: see_retraining_arguments(TrainingArguments(output_dir="unused", report_to="none"), 0.5, 0),
     "num_train_epochs"),
])
def test_bad_arguments_raise_naming_the_argument(make, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        make()


def test_config_round_trips_through_the_core_from_dict():
    config = HanConfig(quality=(0.5, 0.75), pruning_frequency=10, start_step=5, adjust_dropout=False,
                       target_modules=["query", "key"])
    loaded = PruningConfig.from_dict(config.to_dict())
    assert type(loaded) is HanConfig and loaded == config and loaded.quality == [0.5, 0.75]
    assert HanPruningCallback(**HanPruningCallback(config).state()["args"]).config == config


def test_an_encoder_decoder_model_takes_each_dropout_from_its_own_part_config():
    from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel, GPT2Config

    torch.manual_seed(0)
    encoder = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=37, hidden_dropout_prob=0.2)
    decoder = GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=4, n_positions=64, add_cross_attention=True,
                         is_decoder=True, resid_pdrop=0.3)
    model = EncoderDecoderModel(config=EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder))
    pruner = HanPruner(model, HanConfig(quality=[1.0], pruning_frequency=1))  # the top config has no dropouts
    pruner.update(0)
    kept = pruner.masks["encoder.encoder.layer.0.output.dense.weight"]
    assert pruner.dropout["encoder.encoder.layer.0.output.dropout"] == pytest.approx(
        0.2 * math.sqrt(int(kept.sum()) / kept.numel()))
    kept = pruner.masks["decoder.transformer.h.0.mlp.c_proj.weight"]
    assert pruner.dropout["decoder.transformer.h.0.mlp.dropout"] == pytest.approx(
        0.3 * math.sqrt(int(kept.sum()) / kept.numel()))


def test_callbacks_read_a_dict_config_as_their_own_and_check_it_before_training():
    assert HanPruningCallback({"quality": [0.5, 0.7]}).config == HanConfig(quality=[0.5, 0.7])
    with pytest.raises(ValueError, match="is a PruningConfig .*not a HanConfig"):
        HanPruningCallback(PruningConfig().to_dict())
    for config in ("bert", 3):
        with pytest.raises(ValueError, match="`config` must be a PruningConfig"):
            RegularizationCallback(config=config)
    assert RegularizationCallback(config={"target_modules": ["query"]}).config == PruningConfig(target_modules=["query"])
    with pytest.raises(ValueError, match="the last of the 2 pruning events is at step 20"):  # as train() would
        HanPruningCallback.check_schedule(HanConfig(quality=[0.5, 0.7], start_step=10, pruning_frequency=10), 12)
