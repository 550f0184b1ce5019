import os

import pytest
import torch
from conftest import TinyClassificationDataset, tiny_bert
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_prune import MagnitudePruningCallback, PruningConfig, SparsitySchedule
from hf_prune.constants import MASKS_NAME
from hf_prune.serialization import load_masks


class ZeroChecker(TrainerCallback):
    """Placed after the pruning callback: records, after every optimizer step and every step end, whether all
    pruned weights are exactly zero, and the sparsity at each step."""

    def __init__(self, pruning: MagnitudePruningCallback) -> None:
        self.pruning = pruning
        self.violations: list[tuple[str, int]] = []
        self.sparsity_by_step: dict[int, float] = {}

    def _check(self, event: str, state, model) -> None:
        params = dict(model.named_parameters())
        for name, mask in self.pruning.masks.items():
            if (params[name].detach()[~mask] != 0).any():
                self.violations.append((event, state.global_step))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = dict(model.named_parameters())
        for name, mask in self.pruning.masks.items():
            if params[name].grad is not None and (params[name].grad[~mask] != 0).any():
                self.violations.append(("gradient", state.global_step))

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._check("optimizer_step", state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._check("step_end", state, model)
        self.sparsity_by_step[state.global_step] = self.pruning.pruner.sparsity()


class Interrupt(TrainerCallback):
    """Stops training right after the first checkpoint, as a crash would."""

    def on_save(self, args, state, control, **kwargs):
        control.should_training_stop = True


class DriftingSGD(torch.optim.SGD):
    """Moves every weight, whatever its gradient (as a buggy optimizer or a weight-averaging scheme would)."""

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for param in group["params"]:
                param.add_(1e-3)


def train(tmp_path, config, max_steps=12, checker=True, optimizer_cls=None, **overrides):
    callback = MagnitudePruningCallback(config)
    callbacks = [callback] + ([ZeroChecker(callback)] if checker else [])
    args = dict(output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=8,
                learning_rate=5e-3, weight_decay=0.1, max_grad_norm=1.0, logging_steps=2, save_strategy="no",
                report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
    args.update(overrides)
    model = tiny_bert()
    optimizers = (optimizer_cls(model.parameters(), lr=0.1), None) if optimizer_cls else (None, None)
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=TinyClassificationDataset(96),
                      callbacks=callbacks, optimizers=optimizers)
    return trainer, callback, callbacks[-1]


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
    trainer, callback, checker = train(tmp_path, PruningConfig(**CUBIC), **overrides)
    trainer.train()
    assert checker.violations == []
    schedule = SparsitySchedule.from_config(callback.config, max_steps=12)
    for step, sparsity in checker.sparsity_by_step.items():  # steps are optimizer steps
        assert sparsity == pytest.approx(schedule(step), abs=1e-4), step
    assert callback.pruner.sparsity() == pytest.approx(0.8, abs=1e-4)
    assert all(mask.dtype == torch.bool for mask in callback.masks.values())


def test_weights_are_remasked_after_an_optimizer_that_moves_them(tmp_path):
    trainer, callback, checker = train(tmp_path, PruningConfig(**CUBIC), optimizer_cls=DriftingSGD)
    trainer.train()
    assert checker.violations == [] and callback.pruner.sparsity() == pytest.approx(0.8, abs=1e-4)


def test_torch_compile(tmp_path):
    pytest.importorskip("torch._inductor")
    trainer, callback, checker = train(tmp_path, PruningConfig(**CUBIC), max_steps=10, torch_compile=True,
                                       torch_compile_backend="aot_eager")
    trainer.train()
    assert checker.violations == [] and callback.pruner.sparsity() == pytest.approx(0.8, abs=1e-4)


def test_sparsity_is_logged_overall_and_per_class(tmp_path):
    trainer, callback, _ = train(tmp_path, PruningConfig(**CUBIC))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("sparsity" in entry for entry in logged)
    assert logged[-1]["sparsity"] == pytest.approx(0.8, abs=1e-4)
    classes = {key for key in logged[-1] if key.startswith("sparsity/")}
    assert classes == {f"sparsity/{c}" for c in callback.pruner.classes.values()}


def test_every_checkpoint_is_sparse_and_carries_its_masks(tmp_path):
    trainer, callback, _ = train(tmp_path, PruningConfig(**CUBIC), save_strategy="steps", save_steps=3)
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


def test_resumed_run_ends_with_the_same_masks(tmp_path):
    full, full_callback, _ = train(tmp_path / "a", PruningConfig(**CUBIC), save_strategy="steps", save_steps=4)
    full.train()

    first, _, _ = train(tmp_path / "b", PruningConfig(**CUBIC), save_strategy="steps", save_steps=4)
    first.add_callback(Interrupt())
    first.train()
    assert first.state.global_step == 4
    resumed, resumed_callback, checker = train(tmp_path / "b", PruningConfig(**CUBIC), save_strategy="steps",
                                               save_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-4"))
    assert resumed.state.global_step == 12 and checker.violations == []
    for name, mask in full_callback.masks.items():
        assert torch.equal(mask, resumed_callback.masks[name]), name
    full_params, resumed_params = dict(full.model.named_parameters()), dict(resumed.model.named_parameters())
    for name in full_callback.masks:
        torch.testing.assert_close(full_params[name], resumed_params[name])


def test_resume_without_masks_is_a_clear_error(tmp_path):
    first, _, _ = train(tmp_path, PruningConfig(**CUBIC), save_strategy="steps", save_steps=4)
    first.add_callback(Interrupt())
    first.train()
    os.remove(tmp_path / "out" / "checkpoint-4" / MASKS_NAME)
    again, _, _ = train(tmp_path, PruningConfig(**CUBIC))
    with pytest.raises(FileNotFoundError, match=MASKS_NAME):
        again.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))


def test_schedule_that_cannot_finish_fails_before_training(tmp_path):
    trainer, _, checker = train(tmp_path, PruningConfig(**{**CUBIC, "end_step": 50}))
    before = {n: p.clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match="cannot finish inside max_steps"):
        trainer.train()
    assert checker.sparsity_by_step == {}
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_default_end_step_comes_from_max_steps(tmp_path):
    trainer, callback, checker = train(tmp_path, PruningConfig(final_sparsity=0.5, schedule="iterative"),
                                       max_steps=12)
    trainer.train()
    assert callback.pruner.schedule.end == 9 and checker.sparsity_by_step[9] == pytest.approx(0.5, abs=1e-4)


def test_callback_state_restores_its_config():
    callback = MagnitudePruningCallback(PruningConfig(**CUBIC))
    state = callback.state()
    restored = MagnitudePruningCallback(**state["args"])
    assert restored.config == callback.config
