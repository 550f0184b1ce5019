"""OBS / SparseGPT pruning: the closed-form OBS step, exact sparsity and N:M masks, the callback, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_MODELS, TinyClassificationDataset, TinyLMDataset, tiny_bert, tiny_gpt2
from testing_utils import assert_refused_before_training, tiny_training_args
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments
from transformers.pytorch_utils import Conv1D

from hf_prune import PrunedModel, Pruner, PruningConfig
from hf_prune.methods.obs import OBSPruningCallback, nm_mask, obs_prune, obs_update_


#: Excludes BERT's FFN output layer, whose 37 inputs (tiny config) no N:M pattern with M=4 divides.
BERT_FFN_OUTPUT = r".*\.layer\.\d+\.output\.dense"


def correlated_inputs(samples: int, features: int, seed: int = 0) -> torch.Tensor:
    """(samples, features) float64 inputs with strongly correlated features of very different scales."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator, dtype=torch.float64)
    scales = torch.logspace(0, -2, features, dtype=torch.float64)
    return torch.randn(samples, features, generator=generator, dtype=torch.float64) @ (scales[:, None] * mixing)


def single_linear(weight: torch.Tensor) -> nn.Sequential:
    """A float64 `nn.Linear` without bias holding `weight`, named `"0"` so it is a default target."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float64)
    layer.weight.data.copy_(weight)
    return nn.Sequential(layer)


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, inputs: torch.Tensor) -> float:
    """||W·X − Ŵ·X||² with inputs as rows: X = inputs.T."""
    return float(((weight - pruned) @ inputs.T).square().sum())


def test_obs_update_is_the_closed_form_and_the_constrained_optimum():
    inputs = correlated_inputs(64, 8)
    hessian = 2 * inputs.T @ inputs
    hinv = torch.linalg.inv(hessian)
    weight = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    row, q = 1, 3
    pruned = torch.zeros(3, dtype=torch.bool)
    pruned[row] = True

    updated = weight.clone()
    coefficient = obs_update_(updated, hinv[q], q, pruned)

    expected = weight[row] - weight[row, q] / hinv[q, q] * hinv[:, q]
    torch.testing.assert_close(updated[row], expected, rtol=1e-10, atol=1e-12)
    assert updated[row, q] == 0.0
    torch.testing.assert_close(updated[[0, 2]], weight[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(coefficient, torch.tensor([0.0, weight[row, q] / hinv[q, q], 0.0],
                                                         dtype=torch.float64))
    # The saliency is the exact increase of the layer-wise squared error (the loss is quadratic) ...
    saliency = float(weight[row, q] ** 2 / (2 * hinv[q, q]))
    assert reconstruction_error(weight, updated, inputs) == pytest.approx(saliency, rel=1e-9)
    # ... and the update is the best reconstruction of the row with w_q = 0 (least squares over the other inputs).
    others = [c for c in range(8) if c != q]
    best = torch.linalg.lstsq(inputs[:, others], inputs @ weight[row]).solution
    torch.testing.assert_close(updated[row, others], best, rtol=1e-8, atol=1e-10)
    naive = weight.clone()
    naive[row, q] = 0.0
    assert reconstruction_error(weight, naive, inputs) > saliency


def test_obs_prune_of_one_weight_matches_closed_form_and_saliency():
    inputs = correlated_inputs(128, 8, seed=2)
    weight = torch.tensor([[1e-3, 0.9, -1.1, 0.7, -0.8, 1.2, -0.6, 1.0]], dtype=torch.float64)
    model = single_linear(weight)

    masks = obs_prune(model, list(inputs.split(32)), sparsity=1 / 8, dampening=0.0, show_progress=False)

    expected_mask = torch.ones(1, 8, dtype=torch.bool)
    expected_mask[0, 0] = False
    assert torch.equal(masks["0.weight"], expected_mask)
    hinv = torch.linalg.inv(2 * inputs.T @ inputs)
    expected = weight - weight[0, 0] / hinv[0, 0] * hinv[:, 0]
    torch.testing.assert_close(model[0].weight.detach(), expected, rtol=1e-9, atol=1e-12)
    saliency = float(weight[0, 0] ** 2 / (2 * hinv[0, 0]))
    assert reconstruction_error(weight, model[0].weight.detach(), inputs) == pytest.approx(saliency, rel=1e-6)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_obs_beats_magnitude_on_correlated_inputs(pattern):
    inputs = correlated_inputs(512, 64, seed=3)
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model = single_linear(weight)

    masks = obs_prune(model, list(inputs.split(128)), sparsity=0.5, pattern=pattern, block_size=16,
                      show_progress=False)

    if pattern is None:
        magnitude = torch.zeros(16 * 64, dtype=torch.bool)
        magnitude[weight.abs().view(-1).topk(16 * 32).indices] = True
        magnitude = magnitude.view(16, 64)
    else:
        magnitude = nm_mask(weight.abs(), 2, 4)
    obs_error = reconstruction_error(weight, model[0].weight.detach(), inputs)
    assert obs_error < reconstruction_error(weight, weight * magnitude, inputs)
    assert obs_error < reconstruction_error(weight, weight * masks["0.weight"], inputs)  # the update helps


def bert_loader() -> DataLoader:
    return DataLoader(TinyClassificationDataset(length=16), batch_size=8)


def lm_loader() -> DataLoader:
    return DataLoader(TinyLMDataset(length=16), batch_size=8)


MODELS = {"bert": (tiny_bert, bert_loader), "gpt2": (tiny_gpt2, lm_loader)}


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_unstructured_hits_exact_sparsity_in_every_layer(name):
    model = TINY_MODELS[name]()
    loader = bert_loader if name == "bert" else lm_loader
    model.train()

    masks = obs_prune(model, loader(), sparsity=np.float32(0.6), block_size=16, show_progress=False)  # numpy too

    params = dict(model.named_parameters())
    assert set(masks) == set(Pruner(model, PruningConfig(schedule="oneshot")).masks)
    for param_name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == params[param_name].shape
        assert mask.numel() - int(mask.sum()) == round(0.6 * mask.numel()), param_name
        assert not params[param_name][~mask].any()
    assert model.training
    pruner = Pruner(model, PruningConfig(schedule="oneshot"))
    pruner.load_masks(masks)
    assert pruner.sparsity() == pytest.approx(0.6, abs=1e-3)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_two_four_keeps_two_of_every_four_inputs(name):
    build, loader = MODELS[name]
    model = build()
    config = PruningConfig(exclude_modules=BERT_FFN_OUTPUT if name == "bert" else None)

    masks = obs_prune(model, loader(), sparsity=None, pattern="2:4", config=config, block_size=16,
                      show_progress=False)

    modules = dict(model.named_modules())
    assert {type(modules[n.removesuffix(".weight")]) for n in masks} == {Conv1D if name == "gpt2" else nn.Linear}
    for param_name, mask in masks.items():
        by_input = mask.T if isinstance(modules[param_name.removesuffix(".weight")], Conv1D) else mask
        assert (by_input.reshape(by_input.shape[0], -1, 4).sum(dim=-1) == 2).all(), param_name
    pruned = PrunedModel(model, masks, config)
    batch = next(iter(loader()))
    assert torch.isfinite(pruned(**batch).logits).all()


class CountingLoader(list):
    """A list of batches that counts how often it is iterated."""

    passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


def obs_trainer(output_dir, loader: CountingLoader) -> tuple[Trainer, OBSPruningCallback]:
    callback = OBSPruningCallback(PruningConfig(schedule="oneshot", final_sparsity=0.5, start_step=2), loader)
    args = TrainingArguments(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=8,
                             logging_steps=1, save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True)
    return Trainer(model=tiny_bert(), args=args, train_dataset=TinyClassificationDataset(length=32),
                   callbacks=[callback]), callback


def test_callback_prunes_once_with_obs_in_trainer_and_resumes_without_recalibrating(tmp_path):
    loader = CountingLoader(bert_loader())
    trainer, callback = obs_trainer(tmp_path, loader)

    trainer.train()

    assert loader.passes == 2  # one calibration pass per Transformer block, at the single pruning event
    params = dict(trainer.model.named_parameters())
    for name, mask in callback.masks.items():
        assert mask.numel() - int(mask.sum()) == round(0.5 * mask.numel())
        assert not params[name][~mask].any()
    sparsities = [entry["sparsity"] for entry in trainer.state.log_history if "loss" in entry]
    assert sparsities == [0.0, pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5)]

    resumed_loader = CountingLoader(bert_loader())
    resumed, resumed_callback = obs_trainer(tmp_path, resumed_loader)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))

    assert resumed_loader.passes == 0
    assert all(torch.equal(resumed_callback.masks[name], mask) for name, mask in callback.masks.items())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sparsity": 0.7, "pattern": "2:4"}, "cannot be expressed by pattern '2:4'"),
    ({"sparsity": None, "pattern": "2-4"}, "`pattern` must be None or 'N:M'"),
    ({"sparsity": None, "pattern": "4:2"}, "`pattern` must be None or 'N:M'"),
    ({"sparsity": None, "pattern": "0:4"}, "`pattern` must be None or 'N:M'"),
    ({"sparsity": None, "pattern": "2:4:8"}, "`pattern` must be None or 'N:M'"),
    ({"sparsity": None, "pattern": 2}, "`pattern` must be None or 'N:M'"),
    ({"sparsity": None}, "`sparsity` must be a number in [0, 1)"),
    ({"sparsity": 1.0}, "`sparsity` must be a number in [0, 1)"),
    ({"sparsity": True}, "`sparsity` must be a number in [0, 1)"),
    ({"sparsity": 0.5, "calibration_dataloader": None}, "`calibration_dataloader` is None"),
    ({"sparsity": 0.5, "calibration_dataloader": []}, "received no input"),
    ({"sparsity": 0.5, "calibration_dataloader": DataLoader(TinyClassificationDataset(length=0))},
     "received no input"),
    ({"sparsity": 0.5, "calibration_dataloader": [{"pixel_values": torch.zeros(2, 3)}]}, "does not accept"),
    ({"sparsity": 0.5, "calibration_dataloader": [["not", "a", "batch"]]}, "must yield dicts"),
    ({"sparsity": 0.5, "block_size": 0}, "`block_size` must be an integer >= 1"),
    ({"sparsity": None, "pattern": "2:4", "block_size": 6}, "`block_size` must be a multiple of M=4"),
    ({"sparsity": 0.5, "dampening": -0.1}, "`dampening` must be a finite number >= 0"),
    ({"sparsity": None, "pattern": "2:4"}, "bert.encoder.layer.0.output.dense (37 inputs)"),
    ({"sparsity": 0.5, "config": PruningConfig(structure="neurons")}, "`structure` must be 'unstructured'"),
])
def test_bad_inputs_raise_before_touching_the_model(kwargs, message):
    model = tiny_bert()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    kwargs = {"calibration_dataloader": bert_loader(), "show_progress": False, **kwargs}

    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        obs_prune(model, **kwargs)

    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


class FirstPassOnly:
    """Calibration data that runs dry after one pass: the second block gets nothing."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches if self.passes == 1 else [])


def test_one_shot_generator_and_singular_hessian_raise():
    model = tiny_bert()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="one-shot iterator"):
        obs_prune(model, (batch for batch in bert_loader()), sparsity=0.5, show_progress=False)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    with pytest.raises(ValueError, match="received no input") as error:
        obs_prune(model, FirstPassOnly(list(bert_loader())), sparsity=0.5, show_progress=False)
    assert "already pruned and updated 6 of 12 layers in place (bert.encoder.layer.0." in str(error.value.__notes__)
    few_tokens = [correlated_inputs(4, 8)]
    with pytest.raises(ValueError, match="not positive definite.*dampening"):
        obs_prune(single_linear(torch.ones(2, 8, dtype=torch.float64)), few_tokens, 0.5, dampening=0.0,
                  show_progress=False)


@pytest.mark.parametrize(("config", "pattern", "loader", "message"), [
    (PruningConfig(schedule="cubic", end_step=10), None, [], "`schedule` must be 'oneshot'"),
    (PruningConfig(schedule="oneshot", final_sparsity=0.7), "2:4", [], "cannot be expressed by pattern"),
    (PruningConfig(schedule="oneshot"), None, None, "`calibration_dataloader` is None"),
    (PruningConfig(schedule="oneshot", structure="neurons", scheme="class-uniform"), None, [],
     "`structure` must be 'unstructured' for OBSPruningCallback"),
    (PruningConfig(schedule="oneshot", criterion="obd"), None, [], "`criterion` must be 'magnitude' for OBSPruningCallback"),
])
def test_callback_rejects_bad_arguments(config, pattern, loader, message):
    with pytest.raises(ValueError, match=message):
        OBSPruningCallback(config, loader, pattern=pattern)


def test_a_pattern_the_layers_cannot_take_is_refused_before_the_first_step(tmp_path):
    # tiny BERT's output.dense has 37 inputs, which 2:4 does not divide; the event is at step 3
    callback = OBSPruningCallback(PruningConfig(schedule="oneshot", final_sparsity=0.5, start_step=3), bert_loader(),
                                  pattern="2:4")
    trainer = Trainer(model=tiny_bert(), args=tiny_training_args(tmp_path),
                      train_dataset=TinyClassificationDataset(32), callbacks=[callback])
    assert_refused_before_training(trainer, r"needs a number of inputs divisible by 4.*output\.dense \(37 inputs\)")


def test_obs_callback_from_pretrained_points_to_the_magnitude_callback(tmp_path):
    with pytest.raises(ValueError, match=r"MagnitudePruningCallback\.from_pretrained"):
        OBSPruningCallback.from_pretrained(tmp_path)


def test_nm_mask_gives_ties_to_the_lower_column():
    # topk's order: [1, 1, 1, 1] kept columns 2 and 3, [3, 0, 0, 0] columns 0 and 2
    assert nm_mask(torch.tensor([[1.0, 1, 1, 1], [3, 0, 0, 0], [0, 2, 2, 2]]), 2, 4).int().tolist() == [
        [1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0]]
    tied = nm_mask(torch.ones(64, 64), 2, 4).reshape(64, 16, 4)
    assert bool(tied[..., :2].all()) and not bool(tied[..., 2:].any())


@pytest.mark.parametrize("config, pattern, message", [
    (dict(schedule="oneshot", start_step=5, final_sparsity=0.3), "2:4",
     "`sparsity` 0.3 cannot be expressed by pattern '2:4'"),
    (dict(schedule="cubic", final_sparsity=0.5, end_step=4), None, "`schedule` must be 'oneshot' for OBSPruner"),
])
def test_obs_pruner_refuses_what_its_pruning_event_would_when_it_is_built(config, pattern, message):
    from hf_prune.methods.obs import OBSPruner

    model = tiny_bert()  # a custom loop's OBSPruner: it failed at the pruning event, mid-run
    with pytest.raises(ValueError, match=message):
        OBSPruner(model, PruningConfig(**config), [], pattern=pattern)
