import copy
import os
import shutil

import pytest
import torch
import transformers
from conftest import TinyClassificationDataset, tiny_bert
from safetensors.torch import load_file
from testing_utils import (
    RecordingHubApi,
    ZeroChecker,
    magnitude_trainer,
    make_pruned_weights_large,
    record_newest_checkpoint_at_rotation,
    tiny_training_args,
    train_until_first_checkpoint,
)
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer_utils import default_compute_objective

import hf_prune.callbacks
from hf_prune import MagnitudePruningCallback, PrunedModel, PruningArguments, PruningConfig, SparsitySchedule
from hf_prune.callbacks import checkpoint_folder
from hf_prune.constants import MASKS_NAME
from hf_prune.methods.han import HanConfig, HanPruningCallback
from hf_prune.methods.regularization import RegularizationCallback
from hf_prune.methods.rpp import RPPCallback, RPPConfig
from hf_prune.serialization import load_masks, read_masks_metadata, save_masks


class DriftingSGD(torch.optim.SGD):
    """Moves every weight, whatever its gradient (as a buggy optimizer or a weight-averaging scheme would)."""

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for param in group["params"]:
                param.add_(1e-3)


CUBIC = dict(initial_sparsity=0.1, final_sparsity=0.8, schedule="cubic", start_step=0, end_step=8,
             pruning_frequency=2)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="adamw-weight-decay-clipping"),
        pytest.param({"gradient_accumulation_steps": 2}, id="gradient-accumulation"),
        pytest.param({"bf16": True}, id="bf16-autocast"),
        pytest.param({"optim": "sgd", "learning_rate": 0.1}, id="sgd"),
        pytest.param({"optim": "adafactor"}, id="adafactor"),
    ],
)
def test_pruned_weights_are_exactly_zero_after_every_step(tmp_path, overrides):
    trainer, callback, checker = magnitude_trainer(tmp_path, PruningConfig(**CUBIC), **overrides)
    trainer.train()
    assert checker.violations == []
    schedule = SparsitySchedule.from_config(callback.config, max_steps=12)
    for step, sparsity in checker.sparsity_by_step.items():  # steps are optimizer steps
        assert sparsity == pytest.approx(schedule(step), abs=1e-4), step
    assert callback.pruner.sparsity() == pytest.approx(0.8, abs=1e-4)
    assert all(mask.dtype == torch.bool for mask in callback.masks.values())


def test_weights_are_remasked_after_an_optimizer_that_moves_them(tmp_path):
    trainer, callback, checker = magnitude_trainer(tmp_path, PruningConfig(**CUBIC), optimizer_cls=DriftingSGD)
    trainer.train()
    assert checker.violations == [] and callback.pruner.sparsity() == pytest.approx(0.8, abs=1e-4)


@pytest.mark.slow
def test_torch_compile(tmp_path):
    pytest.importorskip("torch._inductor")
    trainer, callback, checker = magnitude_trainer(tmp_path, PruningConfig(**CUBIC), max_steps=10,
                                                   torch_compile=True, torch_compile_backend="aot_eager")
    trainer.train()
    assert checker.violations == [] and callback.pruner.sparsity() == pytest.approx(0.8, abs=1e-4)


def test_sparsity_is_logged_overall_and_per_class(tmp_path):
    trainer, callback, _ = magnitude_trainer(tmp_path, PruningConfig(**CUBIC))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("sparsity" in entry for entry in logged)
    assert logged[-1]["sparsity"] == pytest.approx(0.8, abs=1e-4)
    classes = {key for key in logged[-1] if key.startswith("sparsity/")}
    assert classes == {f"sparsity/{c}" for c in callback.pruner.classes.values()}


def test_evaluate_returns_its_metrics_unchanged(tmp_path):
    # evaluate() and train() hand their callbacks the dict they return; a hyperparameter search sums it into its
    # objective (`default_compute_objective`), so the sparsity must go to the log history only.
    trainer, callback, _ = magnitude_trainer(tmp_path, PruningConfig(**CUBIC))
    regularization = RegularizationCallback("l2", strength=1e-4)
    trainer.add_callback(regularization)
    summary = trainer.train().metrics
    metrics = trainer.evaluate(TinyClassificationDataset(8))
    assert not [key for key in {*metrics, *summary} if key.startswith(("sparsity", "l2_"))]
    assert default_compute_objective(dict(metrics)) == metrics["eval_loss"]
    evaluated = trainer.state.log_history[-1]
    assert evaluated["eval_loss"] == metrics["eval_loss"] and evaluated["sparsity"] == callback.pruner.sparsity()
    assert "l2_penalty" in evaluated and "sparsity" in trainer.state.log_history[-2]  # train()'s summary


def test_the_model_trains_as_an_ordinary_model_once_train_ends(tmp_path):
    # The masks stay with the callback, the gradient hooks go: a later Trainer without the callback, or a loop of
    # the user's, would otherwise keep every pruned weight at 0 without saying so.
    trainer, callback, _ = magnitude_trainer(tmp_path, PruningConfig(**CUBIC), checker=False)
    trainer.train()
    model, masks = trainer.model, callback.masks
    batch = TinyClassificationDataset(8)[:8]
    model.train()
    model(**batch).loss.backward()
    params = dict(model.named_parameters())
    assert all(params[name].grad[~mask].abs().sum() > 0 for name, mask in masks.items())
    assert callback.pruner.sparsity() == pytest.approx(0.8, abs=1e-4)  # the masks themselves are unchanged


def test_every_checkpoint_is_sparse_and_carries_its_masks(tmp_path):
    trainer, callback, _ = magnitude_trainer(tmp_path, PruningConfig(**CUBIC), save_strategy="steps", save_steps=3)
    trainer.train()
    for step in (3, 6, 9, 12):
        folder = tmp_path / "out" / f"checkpoint-{step}"
        masks = load_masks(folder / MASKS_NAME)
        weights = load_file(str(folder / "model.safetensors"))
        for name, mask in masks.items():
            assert (weights[name][~mask] == 0).all()
        expected = SparsitySchedule.from_config(callback.config, max_steps=12)(step)
        pruned = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        assert pruned == pytest.approx(expected, abs=1e-4)


def test_checkpoints_pushed_to_the_hub_carry_their_masks(tmp_path, monkeypatch):
    """The Trainer uploads a checkpoint before on_save: the masks must be in it already, so it resumes."""
    hub = RecordingHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    trainer, _, _ = magnitude_trainer(tmp_path, PruningConfig(**CUBIC), save_strategy="steps", save_steps=4,
                                      push_to_hub=True, hub_model_id="user/pruned", hub_strategy="all_checkpoints")
    trainer.train()
    checkpoints = [(path, files) for path, files in hub.uploads if path.startswith("checkpoint-")]
    assert [path for path, _ in checkpoints] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    assert all(MASKS_NAME in files and "trainer_state.json" in files for _, files in checkpoints)
    for step in (4, 8, 12):
        folder = tmp_path / "out" / f"checkpoint-{step}"
        assert read_masks_metadata(folder / MASKS_NAME)["global_step"] == step  # on_save's rewrite: same step


def test_a_leftover_in_output_dir_is_not_pushed_with_the_model(tmp_path, monkeypatch):
    hub = RecordingHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    trainer, _, _ = magnitude_trainer(tmp_path, PruningConfig(**CUBIC), save_strategy="steps", save_steps=4,
                                      push_to_hub=True, hub_model_id="user/pruned")
    (tmp_path / "out").mkdir(parents=True, exist_ok=True)
    (tmp_path / "out" / ".tmp-killed").mkdir()  # a save killed in output_dir
    (tmp_path / "out" / ".tmp-killed" / "model.safetensors").write_bytes(b"half written")
    trainer.train()
    trainer.push_to_hub()
    roots = [files for path, files in hub.uploads if path == "."]
    assert roots and not any(name.startswith(".tmp-") for files in roots for name in files)


def test_a_checkpoint_holds_its_masks_before_save_total_limit_deletes_the_older_ones(tmp_path, monkeypatch):
    # the Trainer deletes the older checkpoints before on_save: killed in between, the run must still resume
    seen = record_newest_checkpoint_at_rotation(monkeypatch, MASKS_NAME)
    written = []
    monkeypatch.setattr(hf_prune.callbacks, "save_masks", lambda masks, path, *args, **kwargs: (
        written.append(os.path.basename(os.path.dirname(path))), save_masks(masks, path, *args, **kwargs)))
    trainer, callback, _ = magnitude_trainer(tmp_path, PruningConfig(**CUBIC), save_strategy="steps", save_steps=4,
                                             save_total_limit=1)
    trainer.train()
    assert seen == [("checkpoint-4", True), ("checkpoint-8", True), ("checkpoint-12", True)]
    assert written == ["checkpoint-4", "checkpoint-8", "checkpoint-12"], "each checkpoint's masks written once"
    metadata = read_masks_metadata(tmp_path / "out" / "checkpoint-12" / MASKS_NAME)
    assert metadata["global_step"] == 12 and metadata["masks_id"].endswith("-12")


def test_a_hyperparameter_search_trial_saves_its_masks_in_its_own_run_folder(tmp_path):
    args = tiny_training_args(tmp_path)
    state = TrainerState(global_step=4, trial_params={"learning_rate": 1e-3})
    for trial, age in (("run-0", 100), ("run-1", 0)):  # run-1 is the trial being trained
        (tmp_path / trial / "checkpoint-4").mkdir(parents=True)
        (tmp_path / trial / "checkpoint-4" / "trainer_state.json").write_text("{}")
        os.utime(tmp_path / trial / "checkpoint-4" / "trainer_state.json", (1e9 - age, 1e9 - age))
    assert checkpoint_folder(args, state) == str(tmp_path / "run-1" / "checkpoint-4")
    state.trial_name = "named-trial"  # TrainingArguments' hp_name gives the run folder's name
    assert checkpoint_folder(args, state) == str(tmp_path / "named-trial" / "checkpoint-4")
    assert checkpoint_folder(args, TrainerState(global_step=4)) == str(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-4" / MASKS_NAME).exists()


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_masks(tmp_path, caplog):
    full, full_callback, _ = magnitude_trainer(tmp_path / "a", PruningConfig(**CUBIC), save_strategy="steps",
                                               save_steps=4)
    full.train()

    first, _, _ = magnitude_trainer(tmp_path / "b", PruningConfig(**CUBIC), save_strategy="steps", save_steps=4)
    checkpoint = train_until_first_checkpoint(first)
    assert first.state.global_step == 4 and checkpoint == str(tmp_path / "b" / "out" / "checkpoint-4")
    resumed, resumed_callback, checker = magnitude_trainer(tmp_path / "b", PruningConfig(**CUBIC),
                                                           save_strategy="steps", save_steps=4)
    caplog.clear()  # the first run stopped at its checkpoint, before its schedule ended: it said so
    with caplog.at_level("WARNING", logger="hf_prune"):
        resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == 12 and checker.violations == []
    assert not [r for r in caplog.records if r.name.startswith("hf_prune")], "a resume under the same config is quiet"
    for name, mask in full_callback.masks.items():
        assert torch.equal(mask, resumed_callback.masks[name]), name
    full_params, resumed_params = dict(full.model.named_parameters()), dict(resumed.model.named_parameters())
    for name in full_callback.masks:
        torch.testing.assert_close(full_params[name], resumed_params[name])


def test_resume_restores_the_checkpoints_masks_rather_than_recomputing_them(tmp_path):
    # A resumed magnitude run would re-prune the checkpoint's zeros even without its masks: make the pruned
    # positions large, so that only the saved masks say they are pruned.
    first, _, _ = magnitude_trainer(tmp_path, PruningConfig(**CUBIC), save_strategy="steps", save_steps=4)
    checkpoint = train_until_first_checkpoint(first)
    saved = make_pruned_weights_large(checkpoint)
    resumed, callback, checker = magnitude_trainer(tmp_path, PruningConfig(**CUBIC), save_strategy="steps",
                                                   save_steps=4)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert checker.violations == []
    assert all(not (callback.masks[name] & ~mask).any() for name, mask in saved.items())  # pruned stays pruned


def test_resume_without_masks_is_a_clear_error(tmp_path):
    first, _, _ = magnitude_trainer(tmp_path, PruningConfig(**CUBIC), save_strategy="steps", save_steps=4)
    checkpoint = train_until_first_checkpoint(first)
    assert checkpoint == str(tmp_path / "out" / "checkpoint-4")
    os.remove(os.path.join(checkpoint, MASKS_NAME))
    again, _, _ = magnitude_trainer(tmp_path, PruningConfig(**CUBIC))
    with pytest.raises(FileNotFoundError, match=MASKS_NAME):
        again.train(resume_from_checkpoint=checkpoint)


def test_schedule_that_cannot_finish_fails_before_training(tmp_path):
    trainer, _, checker = magnitude_trainer(tmp_path, PruningConfig(**{**CUBIC, "end_step": 50}))
    before = {n: p.clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match="cannot finish inside max_steps"):
        trainer.train()
    assert checker.sparsity_by_step == {}
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_default_end_step_comes_from_max_steps(tmp_path):
    trainer, callback, checker = magnitude_trainer(tmp_path, PruningConfig(final_sparsity=0.5, schedule="iterative"),
                                                   max_steps=12)
    trainer.train()
    assert callback.pruner.schedule.end == 9 and checker.sparsity_by_step[9] == pytest.approx(0.5, abs=1e-4)


def test_callback_state_restores_its_config():
    callback = MagnitudePruningCallback(PruningConfig(**CUBIC))
    state = callback.state()
    restored = MagnitudePruningCallback(**state["args"])
    assert restored.config == callback.config


# -------------------------------------------------------------- resuming under another config (issue 16, item 4)
def resumable_trainer(tmp_path, callback):
    """The tiny BERT trained 12 steps with `callback` (and a `ZeroChecker`), a checkpoint every 4 steps."""
    checker = ZeroChecker(callback)
    trainer = Trainer(model=tiny_bert(), args=tiny_training_args(tmp_path / "out", save_strategy="steps",
                                                                 save_steps=4),
                      train_dataset=TinyClassificationDataset(96), callbacks=[callback, checker])
    return trainer, checker


TO_70 = {**CUBIC, "final_sparsity": 0.7}  # cubic from 0.1 at step 0 to 0.7 at step 8, events every 2 steps


def test_checkpoint_masks_record_the_config_they_were_pruned_under(tmp_path):
    config = PruningConfig(**TO_70)
    checkpoint = train_until_first_checkpoint(resumable_trainer(tmp_path, MagnitudePruningCallback(config))[0])
    metadata = read_masks_metadata(os.path.join(checkpoint, MASKS_NAME))
    assert PruningConfig.from_dict(metadata["pruning_config"]) == config
    assert metadata["global_step"] == 4


@pytest.mark.parametrize("changes, named", [
    ({"final_sparsity": 0.3}, ["final_sparsity: checkpoint 0.7, now 0.3"]),
    ({"final_sparsity": 0.3, "scheme": "class-uniform"},
     ["final_sparsity: checkpoint 0.7, now 0.3", "scheme: checkpoint 'class-blind', now 'class-uniform'"]),
    ({"target_modules": ["query", "key"]}, ["target_modules: checkpoint None, now ['query', 'key']"]),
])
def test_resume_under_a_config_that_prunes_differently_is_an_error(tmp_path, changes, named):
    first, _ = resumable_trainer(tmp_path, MagnitudePruningCallback(PruningConfig(**TO_70)))
    checkpoint = train_until_first_checkpoint(first)
    resumed, checker = resumable_trainer(tmp_path, MagnitudePruningCallback(PruningConfig(**{**TO_70, **changes})))
    with pytest.raises(ValueError, match="was pruned under another config") as error:
        resumed.train(resume_from_checkpoint=checkpoint)
    message = str(error.value)
    assert os.path.join(checkpoint, MASKS_NAME) in message and "override_checkpoint_config=True" in message
    for field in named:
        assert field in message
    assert message.count(": checkpoint ") == len(named), "only the changed fields are named"
    assert checker.sparsity_by_step == {}, "no step was taken"


def test_a_checkpoint_spelling_the_structure_as_a_list_resumes_under_its_string(tmp_path):
    first, _ = resumable_trainer(tmp_path, MagnitudePruningCallback(PruningConfig(**TO_70)))
    checkpoint = train_until_first_checkpoint(first)
    path = os.path.join(checkpoint, MASKS_NAME)  # as written before a structure had one spelling
    metadata = read_masks_metadata(path)
    metadata["pruning_config"]["structure"] = ["unstructured"]
    save_masks(load_masks(path), path, metadata)
    resumed, checker = resumable_trainer(tmp_path, MagnitudePruningCallback(PruningConfig(**TO_70)))
    resumed.train(resume_from_checkpoint=checkpoint)
    assert checker.violations == []


@pytest.mark.slow
def test_resume_with_a_new_base_model_name_is_not_a_change(tmp_path):
    first, _ = resumable_trainer(tmp_path, MagnitudePruningCallback(PruningConfig(**TO_70)))
    checkpoint = train_until_first_checkpoint(first)
    config = PruningConfig(**TO_70, base_model_name_or_path="elsewhere/bert")
    resumed, checker = resumable_trainer(tmp_path, MagnitudePruningCallback(config))
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == 12 and checker.violations == []
    assert checker.sparsity_by_step[12] == pytest.approx(0.7, abs=1e-4)


AT_CHECKPOINT = 0.7 + (0.1 - 0.7) * (1 - 4 / 8) ** 3  # 0.625, TO_70's sparsity at the checkpoint of step 4


@pytest.mark.slow
@pytest.mark.parametrize("final_sparsity, at_resume, expected", [
    # Masks never shrink: the checkpoint's 0.625 is kept through a schedule to 0.3, which never asks for more
    # (0.275 at step 4); a schedule to 0.9 asks for 0.8 at step 4, pruned at once, and ends at 0.9.
    (0.3, AT_CHECKPOINT, AT_CHECKPOINT),
    (0.9, 0.9 + (0.1 - 0.9) * (1 - 4 / 8) ** 3, 0.9),
])
def test_override_checkpoint_config_resumes_from_the_masks_under_the_new_config(tmp_path, caplog, final_sparsity,
                                                                                 at_resume, expected):
    first, _ = resumable_trainer(tmp_path, MagnitudePruningCallback(PruningConfig(**TO_70)))
    checkpoint = train_until_first_checkpoint(first)
    saved = load_masks(os.path.join(checkpoint, MASKS_NAME))
    config = PruningConfig(**{**TO_70, "final_sparsity": final_sparsity})
    callback = MagnitudePruningCallback(config, override_checkpoint_config=True)
    resumed, checker = resumable_trainer(tmp_path, callback)
    with caplog.at_level("WARNING", logger="hf_prune.callbacks"):
        resumed.train(resume_from_checkpoint=checkpoint)

    assert f"final_sparsity: checkpoint 0.7, now {final_sparsity}" in caplog.text
    assert "override_checkpoint_config=True" in caplog.text
    assert ("never shrink" in caplog.text) == (final_sparsity < AT_CHECKPOINT)
    assert resumed.state.global_step == 12 and checker.violations == []
    assert callback.config == config
    assert checker.sparsity_by_step[5] == pytest.approx(at_resume, abs=1e-4)
    assert callback.pruner.sparsity() == pytest.approx(expected, abs=1e-4)
    for name, mask in callback.masks.items():
        assert not (mask & ~saved[name]).any(), "no weight pruned in the checkpoint comes back"
    final = read_masks_metadata(os.path.join(tmp_path, "out", "checkpoint-12", MASKS_NAME))["pruning_config"]
    assert final["final_sparsity"] == final_sparsity, "later checkpoints record the config now in force"


@pytest.mark.slow
@pytest.mark.parametrize("make, changed", [
    (lambda value, **kw: RPPCallback(RPPConfig(final_sparsity=0.7, end_step=8, penalty=value), **kw), "penalty"),
    (lambda value, **kw: HanPruningCallback(HanConfig(quality=value * 60, iterations=2, pruning_frequency=4), **kw),
     "quality"),
], ids=["rpp", "han"])
def test_method_callbacks_check_the_checkpoint_config_too(tmp_path, make, changed):
    first, _ = resumable_trainer(tmp_path, make(0.01))
    checkpoint = train_until_first_checkpoint(first)
    refused, _ = resumable_trainer(tmp_path, make(0.02))
    with pytest.raises(ValueError, match=f"{changed}: checkpoint "):
        refused.train(resume_from_checkpoint=checkpoint)
    callback = make(0.02, override_checkpoint_config=True)
    resumed, checker = resumable_trainer(tmp_path, callback)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == 12 and checker.violations == [] and callback.pruner.sparsity() > 0


# ---------------------------------------------------------------- which checkpoint's masks, and the run's end
def test_resuming_a_checkpoint_outside_output_dir_never_takes_the_masks_of_another_run(tmp_path):
    other, _, _ = magnitude_trainer(tmp_path / "b", PruningConfig(**CUBIC), save_strategy="steps", save_steps=4)
    train_until_first_checkpoint(other)  # output_dir b now holds checkpoint-4 of another run
    first, _, _ = magnitude_trainer(tmp_path / "a", PruningConfig(**CUBIC), save_strategy="steps", save_steps=4)
    checkpoint = train_until_first_checkpoint(first)
    resumed, _, _ = magnitude_trainer(tmp_path / "b", PruningConfig(**CUBIC), save_strategy="steps", save_steps=4)
    with pytest.raises(ValueError, match="another checkpoint than the one being resumed.*resume_from_checkpoint"):
        resumed.train(resume_from_checkpoint=checkpoint)  # before the first step
    saved = make_pruned_weights_large(checkpoint)  # only its masks say what is pruned
    pointed, callback, checker = magnitude_trainer(tmp_path / "b", PruningConfig(**CUBIC), save_strategy="steps",
                                                   save_steps=4, resume_from_checkpoint=checkpoint)
    pointed.train(resume_from_checkpoint=checkpoint)  # TrainingArguments.resume_from_checkpoint names the folder
    assert pointed.state.global_step == 12 and checker.violations == []
    assert all(not (callback.masks[name] & ~mask).any() for name, mask in saved.items())  # the pointed one's masks


def test_a_checkpoint_holding_an_earlier_checkpoints_masks_is_refused_naming_both_steps(tmp_path):
    trainer, _, _ = magnitude_trainer(tmp_path, PruningConfig(**CUBIC), save_strategy="steps", save_steps=4)
    trainer.train()
    out = tmp_path / "out"
    shutil.copy(out / "checkpoint-4" / MASKS_NAME, out / "checkpoint-8" / MASKS_NAME)  # the same run's, copied over
    resumed, _, _ = magnitude_trainer(tmp_path, PruningConfig(**CUBIC), resume_from_checkpoint=str(out / "checkpoint-8"))
    with pytest.raises(ValueError, match=r"its trainer_state.json, of step 8, .* of step 4\)\. The checkpoint's files "
                                         "come from different saves"):
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-8"))
    assert resumed.state.global_step == 8  # refused before any step


def test_a_trainer_checkpoint_loads_as_a_pruned_model_and_its_masks_start_a_new_run(tmp_path):
    config = PruningConfig(**CUBIC)
    trainer, _, _ = magnitude_trainer(tmp_path, config, save_strategy="steps", save_steps=4)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-8"  # no pruning_config.json: the masks file records the config
    saved = load_masks(checkpoint / MASKS_NAME)
    loaded = PrunedModel.from_pretrained(checkpoint)
    assert loaded.pruning_config == config and saved.keys() == loaded.masks.keys()
    assert all(torch.equal(saved[name], mask) for name, mask in loaded.masks.items())
    weights = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(weights[name], p) for name, p in loaded.model.state_dict().items() if name in weights)
    callback = MagnitudePruningCallback.from_pretrained(checkpoint)
    assert callback.config.schedule == "oneshot" and callback.config.target_modules == config.target_modules
    assert callback.config.final_sparsity == read_masks_metadata(checkpoint / MASKS_NAME)["target_sparsity"] == 0.8


class BestAtFirstEvaluation(TrainerCallback):
    """Adds `eval_earliness` (higher for earlier evaluations), so the first checkpoint is the best one."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_earliness"] = -state.global_step


def test_load_best_model_at_end_loads_the_best_checkpoints_masks_with_its_weights(tmp_path, caplog):
    callback = MagnitudePruningCallback(PruningConfig(**CUBIC))
    args = tiny_training_args(tmp_path / "out", save_strategy="steps", save_steps=4, eval_strategy="steps",
                              eval_steps=4, load_best_model_at_end=True, metric_for_best_model="earliness",
                              greater_is_better=True)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=TinyClassificationDataset(96),
                      eval_dataset=TinyClassificationDataset(16, seed=1),
                      callbacks=[callback, BestAtFirstEvaluation()])
    with caplog.at_level("WARNING", logger="hf_prune.callbacks"):
        trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best == str(tmp_path / "out" / "checkpoint-4")
    saved = load_masks(os.path.join(best, MASKS_NAME))
    assert all(torch.equal(callback.masks[name], mask) for name, mask in saved.items())
    params = dict(trainer.model.named_parameters())
    assert all((params[name][mask] != 0).all() for name, mask in saved.items())  # the best weights, not re-zeroed
    assert callback.pruner.target_sparsity == pytest.approx(SparsitySchedule.from_config(PruningConfig(**CUBIC))(4))
    assert "below the schedule's final_sparsity 0.8" in caplog.text and "best checkpoint" in caplog.text


def test_a_run_stopped_before_the_schedule_ends_warns(tmp_path, caplog):
    trainer, _, _ = magnitude_trainer(tmp_path, PruningConfig(**CUBIC), save_strategy="steps", save_steps=4)
    with caplog.at_level("WARNING", logger="hf_prune.callbacks"):
        train_until_first_checkpoint(trainer)  # stops at step 4, as early stopping would
    assert "Training ended at step 4" in caplog.text and "did not finish" in caplog.text
    finished, _, _ = magnitude_trainer(tmp_path / "full", PruningConfig(**CUBIC))
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_prune.callbacks"):
        finished.train()
    assert "did not finish" not in caplog.text


def test_each_train_removes_its_pruners_input_hooks(tmp_path):
    wanda = dict(CUBIC, start_step=2, criterion="wanda", fisher_steps=1)
    trainer, callback, _ = magnitude_trainer(tmp_path, PruningConfig(**wanda), checker=False)
    layer = trainer.model.bert.encoder.layer[0].attention.self.query
    hooks_during_training = []
    trainer.add_callback(type("CountHooks", (TrainerCallback,), {"on_step_end": lambda self, *args, **kwargs: (
        hooks_during_training.append(len(layer._forward_pre_hooks)))})())
    trainer.train()
    first = callback.pruner
    trainer.train()
    assert callback.pruner is not first and first.criterion.squared_inputs == {}
    assert set(hooks_during_training) == {1} and len(layer._forward_pre_hooks) == 0


class ClippedGradients(TrainerCallback):
    """Placed before the pruning callback: the gradients as the Trainer clipped them, before any other callback."""

    def __init__(self, pruning: MagnitudePruningCallback) -> None:
        self.pruning = pruning
        self.pruned_nonzero: list[int] = []
        self.norms: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.pruning.masks:
            return
        params = dict(model.named_parameters())
        self.pruned_nonzero.append(sum(int((params[n].grad[~m] != 0).sum()) for n, m in self.pruning.masks.items()))
        self.norms.append(float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params.values()
                                                                   if p.grad is not None]))))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_gradient_clipping_sees_only_the_kept_weights_gradients(tmp_path, accumulation):
    callback = MagnitudePruningCallback(PruningConfig(**CUBIC))
    clipped = ClippedGradients(callback)
    args = tiny_training_args(tmp_path / "out", max_grad_norm=0.05, gradient_accumulation_steps=accumulation)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=TinyClassificationDataset(96),
                      callbacks=[clipped, callback])
    trainer.train()
    assert len(clipped.pruned_nonzero) == 12 and set(clipped.pruned_nonzero) == {0}
    # clipped by the norm of what the optimizer gets: every step's total norm is max_grad_norm (the raw norms are
    # far above it), not less, as it would be if the pruned weights' gradients had counted in the norm
    assert clipped.norms == pytest.approx([0.05] * 12, rel=1e-3)


def test_resume_with_another_max_steps_that_moves_the_default_end_step_is_a_config_change(tmp_path):
    config = dict(initial_sparsity=0.1, final_sparsity=0.8, schedule="cubic", pruning_frequency=2)  # end: 0.75 · max
    first, _, _ = magnitude_trainer(tmp_path, PruningConfig(**config), save_strategy="steps", save_steps=4)
    checkpoint = train_until_first_checkpoint(first)
    longer, _, _ = magnitude_trainer(tmp_path, PruningConfig(**config), max_steps=16)
    with pytest.raises(ValueError, match="max_steps changed.*end: checkpoint 9, now 12"):
        longer.train(resume_from_checkpoint=checkpoint)
    callback = MagnitudePruningCallback(PruningConfig(**config), override_checkpoint_config=True)
    trainer = Trainer(model=tiny_bert(), args=tiny_training_args(tmp_path / "out", max_steps=16),
                      train_dataset=TinyClassificationDataset(96), callbacks=[callback])
    trainer.train(resume_from_checkpoint=checkpoint)
    assert callback.pruner.target_sparsity == pytest.approx(0.8)


@pytest.mark.parametrize("passed, hint", [
    (PruningConfig(final_sparsity=0.5), "`MagnitudePruningCallback(config)`"),
    (RPPConfig(final_sparsity=0.5, end_step=4), "`RPPCallback(config)`"),
    (HanConfig(quality=0.5, iterations=1), "`HanPruningCallback(config)`"),
    (PruningArguments(final_sparsity=0.5), "`pruning_args.to_callback()`"),
], ids=["PruningConfig", "RPPConfig", "HanConfig", "PruningArguments"])
def test_a_config_passed_as_a_callback_names_the_callback_to_pass(tmp_path, passed, hint):
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(AttributeError) as raised:
        Trainer(model=model, args=tiny_training_args(tmp_path), train_dataset=TinyClassificationDataset(32),
                callbacks=[passed])
    assert str(raised.value) == (f"A {type(passed).__name__} was passed where the Trainer expects a callback (it "
                                 f"asked for `on_init_end`): pass {hint} in `callbacks=[...]`, not the "
                                 f"{type(passed).__name__} itself.")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # any other missing name keeps Python's own message, and the config still behaves as a dataclass
    with pytest.raises(AttributeError, match=f"^'{type(passed).__name__}' object has no attribute 'missing'$"):
        passed.missing
    assert not hasattr(passed, "on_train_begin")
    assert copy.deepcopy(passed) == passed


def test_two_pruning_callbacks_in_one_trainer_are_refused_before_anything_runs(tmp_path):
    first = MagnitudePruningCallback(PruningConfig(final_sparsity=0.5, schedule="oneshot", target_modules=["query"]))
    second = HanPruningCallback(HanConfig(quality=0.5, iterations=1))
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="Two pruning callbacks in one Trainer \\(MagnitudePruningCallback and "
                                         "HanPruningCallback\\)"):
        Trainer(model=model, args=tiny_training_args(tmp_path), train_dataset=TinyClassificationDataset(32),
                callbacks=[first, second])
    trainer = Trainer(model=model, args=tiny_training_args(tmp_path), train_dataset=TinyClassificationDataset(32),
                      callbacks=[first])
    trainer.add_callback(second)  # after the Trainer was built: refused when training begins
    with pytest.raises(ValueError, match="Two pruning callbacks in one Trainer \\(MagnitudePruningCallback and "
                                         "HanPruningCallback\\)"):
        trainer.train()
    assert trainer.state.global_step == 0
    # before the first one's step-0 prune (its query weights were pruned, then the second refused)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
