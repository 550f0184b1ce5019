"""Pruning a peft (LoRA) model while its adapters train: base weights under their plain names, LoRA factors masked
with them, so that `merge_and_unload()` gives the model that was trained; what cannot be masked is refused."""

import os

import pytest
import torch
from conftest import TINY_MODELS, TinyClassificationDataset, TinyLMDataset
from peft import LoraConfig, get_peft_model
from testing_utils import tiny_training_args, train_until_first_checkpoint
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer

from hf_prune import MagnitudePruningCallback, PrunedModel, Pruner, PruningConfig, RPPCallback, RPPConfig
from hf_prune.constants import MASKS_NAME


#: LoRA target modules of each tiny model: its feed-forward projections and one attention projection.
LORA_TARGETS = {"bert": ["intermediate.dense", "output.dense", "query"], "gpt2": ["c_fc", "mlp.c_proj", "c_attn"],
                "llama": ["gate_proj", "up_proj", "down_proj", "q_proj"]}
STRUCTURES = {"bert": "neurons", "gpt2": "neurons", "llama": ("neurons", "heads")}
AUTO = {"bert": AutoModelForSequenceClassification, "gpt2": AutoModelForCausalLM, "llama": AutoModelForCausalLM}


def lora_model(kind: str, **options):
    """The tiny model `kind` with LoRA adapters (rank 2, random `B` so that their update is not zero)."""
    task = {"task_type": "SEQ_CLS"} if kind == "bert" else {}
    config = LoraConfig(r=2, init_lora_weights=False, fan_in_fan_out=kind == "gpt2",
                        **{"target_modules": LORA_TARGETS[kind], **task, **options})
    return get_peft_model(TINY_MODELS[kind](), config)


def structured_config(kind: str, **overrides) -> PruningConfig:
    return PruningConfig(**{"structure": STRUCTURES[kind], "scheme": "class-uniform", "schedule": "iterative",
                            "initial_sparsity": 0.25, "final_sparsity": 0.5, "start_step": 1, "end_step": 5,
                            "pruning_frequency": 2, **overrides})


def lora_trainer(kind: str, output_dir, config: PruningConfig, model=None, **args) -> Trainer:
    dataset = TinyClassificationDataset(48) if kind == "bert" else TinyLMDataset(48)
    return Trainer(model=model if model is not None else lora_model(kind),
                   args=tiny_training_args(output_dir, max_steps=6, **args), train_dataset=dataset,
                   callbacks=[(RPPCallback if isinstance(config, RPPConfig) else MagnitudePruningCallback)(config)])


def pruner_of(trainer: Trainer) -> Pruner:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, MagnitudePruningCallback)).pruner


def inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(1))}


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
@pytest.mark.parametrize("kind", sorted(LORA_TARGETS))
def test_lora_training_with_structured_pruning_merges_to_the_model_that_was_trained(tmp_path, kind, criterion):
    trainer = lora_trainer(kind, tmp_path / "run", structured_config(kind, criterion=criterion, fisher_steps=1))
    trainer.train()
    pruner = pruner_of(trainer)
    plain = Pruner(TINY_MODELS[kind](), structured_config(kind))
    assert pruner.masks.keys() == plain.masks.keys()  # the base weights, under their names without adapters
    assert pruner.sparsity() == pytest.approx(0.5, abs=0.03)
    assert pruner.factors and all(not p.detach()[~pruner.factor_masks[n]].any()
                                  for n, p in pruner.factor_params.items())
    assert any(not m.all() for m in pruner.factor_masks.values())
    lora = trainer.model.eval()
    with torch.no_grad():
        trained = lora(**inputs()).logits
    merged = PrunedModel.from_trainer(trainer).merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged.model.eval()(**inputs()).logits, trained, atol=1e-5)
    assert merged.sparsity_report().overall == pytest.approx(pruner.sparsity())
    merged.shrink().save_pretrained(tmp_path / "small")
    small = AUTO[kind].from_pretrained(tmp_path / "small").eval()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in merged.model.parameters())
    with torch.no_grad():
        assert torch.allclose(small(**inputs()).logits, trained, atol=1e-5)


def test_lora_pruning_resumes_to_the_same_masks_and_adapters(tmp_path):
    config = structured_config("bert")
    full = lora_trainer("bert", tmp_path / "full", config)
    full.train()
    checkpoint = train_until_first_checkpoint(lora_trainer("bert", tmp_path / "resumed", config, save_steps=3,
                                                           save_strategy="steps"))
    resumed = lora_trainer("bert", tmp_path / "resumed", config, save_steps=3, save_strategy="steps")
    resumed.train(resume_from_checkpoint=checkpoint)
    full_pruner, resumed_pruner = map(pruner_of, (full, resumed))
    assert all(torch.equal(resumed_pruner.masks[n], m) for n, m in full_pruner.masks.items())
    assert all(torch.equal(resumed_pruner.factor_masks[n], m) for n, m in full_pruner.factor_masks.items())


def test_lora_pruning_resumes_from_the_checkpoints_masks(tmp_path):
    # The base weights are frozen, so recomputing the masks at the resume would give the checkpoint's: prune one
    # more neuron in the checkpoint's masks file, the one magnitude would keep longest, and it must stay pruned.
    from hf_prune.serialization import load_masks, read_masks_metadata, save_masks

    config = structured_config("bert")
    checkpoint = train_until_first_checkpoint(lora_trainer("bert", tmp_path, config, save_steps=3,
                                                           save_strategy="steps"))
    path = os.path.join(checkpoint, MASKS_NAME)
    saved, metadata = load_masks(path), read_masks_metadata(path)
    up, down = "bert.encoder.layer.0.intermediate.dense.weight", "bert.encoder.layer.0.output.dense.weight"
    base = dict(TINY_MODELS["bert"]().named_parameters())
    norms = base[up].detach().square().sum(1) + base[down].detach().square().sum(0)
    neuron = int(torch.where(saved[up].all(1), norms, -1.0).argmax())  # the strongest neuron still kept
    saved[up][neuron], saved[down][:, neuron] = False, False
    save_masks(saved, path, metadata)
    resumed = lora_trainer("bert", tmp_path, config, save_steps=3, save_strategy="steps")
    resumed.train(resume_from_checkpoint=checkpoint)
    masks = pruner_of(resumed).masks
    assert not masks[up][neuron].any() and not masks[down][:, neuron].any()


@pytest.mark.parametrize("config, options, message", [
    (PruningConfig(final_sparsity=0.5, end_step=4), {},
     r'8 pruned layers carry peft adapters.*exclude_modules=r"bert\\\.encoder\\\.layer\\\.\\d\+\\\.attention'),
    (PruningConfig(final_sparsity=0.5, end_step=4), {"layers_to_transform": [0]},  # the roles would match layer 1
     r"4 pruned layers carry peft adapters.*exclude_modules=\['bert\.encoder\.layer\.0\.attention\.output\.dense', 'bert"),
    (PruningConfig(final_sparsity=0.5, end_step=4, criterion="obd", fisher_steps=1, start_step=1,
                   exclude_modules=["intermediate.dense", "output.dense", "query"]), {}, "frozen"),
    (RPPConfig(final_sparsity=0.5, end_step=4, exclude_modules=["intermediate.dense", "output.dense", "query"]), {},
     "RPP's proximal step .* 4 targeted weights are frozen"),
    (PruningConfig(final_sparsity=0.5, end_step=4), {"target_modules": "all-linear"},  # no exclusion leaves any
     "12 pruned layers carry peft adapters.* Every pruned layer carries one: adapt fewer layers, merge the adapters "
     "first, or prune whole neurons"),
    (structured_config("bert"), {"use_dora": True}, "DoRA adapter"),
    (PruningConfig(final_sparsity=0.5, end_step=4, prune_head=True,
                   exclude_modules=["intermediate.dense", "output.dense", "query"]), {}, "modules_to_save"),
    (structured_config("bert"), {"modules_to_save": ["layer.0.intermediate.dense"]}, "modules_to_save"),
])
def test_what_cannot_be_masked_under_lora_is_refused_before_any_step(tmp_path, config, options, message):
    model = lora_model("bert", **options)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    trainer = lora_trainer("bert", tmp_path, config, model=model)
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


@pytest.mark.parametrize("config", [
    structured_config("bert", exclude_modules=["layer.0.intermediate.dense"]),
    PruningConfig(final_sparsity=0.5, end_step=4, target_modules=["key", "value"],
                  exclude_modules=["layer.0.intermediate.dense"]),
])
def test_a_modules_to_save_copy_left_out_by_its_plain_name_trains(tmp_path, config):
    model = lora_model("bert", modules_to_save=["layer.0.intermediate.dense"])
    trainer = lora_trainer("bert", tmp_path, config, model=model)
    trainer.train()
    assert trainer.state.global_step == 6
    masks = pruner_of(trainer).masks
    assert masks and not any("layer.0.intermediate" in n or "original_module" in n for n in masks)


@pytest.mark.parametrize("config, message", [
    (structured_config("bert"), r"bert\.encoder\.layer\.0\.intermediate\.dense carries a ia3 adapter"),
    (PruningConfig(final_sparsity=0.5, end_step=4), r"6 pruned layers carry peft adapters \(ia3\)"),
])
def test_other_peft_methods_are_named_in_the_refusal(config, message):
    from peft import IA3Config

    model = get_peft_model(TINY_MODELS["bert"](), IA3Config(task_type="SEQ_CLS",
                                                            target_modules=["intermediate.dense", "output.dense"],
                                                            feedforward_modules=["output.dense"]))
    with pytest.raises(ValueError, match=message):
        Pruner(model, config)


def test_unstructured_pruning_of_the_layers_without_adapters_trains_and_merges(tmp_path):
    config = PruningConfig(final_sparsity=0.5, end_step=4, target_modules=["key", "value"])
    trainer = lora_trainer("bert", tmp_path, config)
    trainer.train()
    masks = pruner_of(trainer).masks
    assert sorted({n.split(".", 4)[-1] for n in masks}) == ["attention.self.key.weight",
                                                           "attention.self.value.weight"]
    with torch.no_grad():
        trained = trainer.model.eval()(**inputs()).logits
    merged = PrunedModel.from_trainer(trainer).merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged.model.eval()(**inputs()).logits, trained, atol=1e-6)
    assert merged.sparsity_report().overall == pytest.approx(0.5, abs=1e-3)


def test_reports_regularization_and_compiled_models_use_the_plain_names(tmp_path):
    from hf_prune import RegularizationCallback, sparsity_report

    lora = lora_model("bert")
    names = [layer.name for layer in sparsity_report(lora).layers]
    assert names == [layer.name for layer in sparsity_report(TINY_MODELS["bert"]()).layers]
    compiled = Pruner(torch.compile(lora), structured_config("bert"))
    assert compiled.masks.keys() == Pruner(lora_model("bert"), structured_config("bert")).masks.keys()
    regularization = RegularizationCallback(config=PruningConfig(exclude_modules=["intermediate.dense", "query"]))
    Trainer(model=lora, args=tiny_training_args(tmp_path, max_steps=2), train_dataset=TinyClassificationDataset(16),
            callbacks=[regularization]).train()
    assert regularization.params and not any("base_layer" in n for n in regularization.params)


def test_adapters_injected_into_a_transformers_model_train_merge_and_refuse_to_save_unmerged(tmp_path):
    from peft import inject_adapter_in_model  # what transformers' model.add_adapter does: no PeftModel wrapper

    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=LORA_TARGETS["llama"], init_lora_weights=False),
                                    TINY_MODELS["llama"]())
    model._hf_peft_config_loaded = True  # as add_adapter marks it (it needs a newer peft than installed here)
    trainer = lora_trainer("llama", tmp_path / "run", structured_config("llama"), model=model)
    trainer.train()
    pruned = PrunedModel.from_trainer(trainer)
    with pytest.raises(ValueError, match="carries peft adapters: merge them first"):
        pruned.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="without peft adapters.*merge them first"):
        pruned.shrink()
    with torch.no_grad():
        trained = model.eval()(**inputs()).logits
    merged = pruned.merge_and_unload()
    assert not hasattr(merged.model, "peft_config") and not merged.model._hf_peft_config_loaded
    merged.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs()).logits, trained, atol=1e-5)
    merged.to_sparse_inference(kernel="sparse")  # a merged model is a plain one again
    with pytest.raises(ValueError, match="has no peft adapters to merge"):
        PrunedModel(TINY_MODELS["llama"](), {}).merge_and_unload()


def test_save_pretrained_of_a_peft_model_says_to_merge_first(tmp_path):
    trainer = lora_trainer("bert", tmp_path / "run", structured_config("bert"))
    trainer.train()
    with pytest.raises(ValueError, match="merge_and_unload"):
        PrunedModel.from_trainer(trainer).save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    assert trainer.model.config.architectures != ["PeftModelForSequenceClassification"]


@pytest.mark.parametrize("criterion", ["magnitude", "obd"])
def test_lora_over_a_saved_structured_model_keeps_its_masks_and_merges_to_the_trained_model(tmp_path, criterion):
    config = structured_config("bert", criterion=criterion, fisher_steps=1)
    first = Trainer(model=TINY_MODELS["bert"](), args=tiny_training_args(tmp_path / "prune", max_steps=6),
                    train_dataset=TinyClassificationDataset(48), callbacks=[MagnitudePruningCallback(config)])
    first.train()
    PrunedModel.from_trainer(first).save_pretrained(tmp_path / "pruned")
    saved = PrunedModel.from_pretrained(tmp_path / "pruned")
    lora = get_peft_model(saved.model, LoraConfig(r=2, target_modules=LORA_TARGETS["bert"], task_type="SEQ_CLS",
                                                  init_lora_weights=False))
    trainer = Trainer(model=lora, args=tiny_training_args(tmp_path / "lora", max_steps=4),
                      train_dataset=TinyClassificationDataset(48),
                      callbacks=[MagnitudePruningCallback.from_pretrained(tmp_path / "pruned")])
    trainer.train()
    assert all(torch.equal(pruner_of(trainer).masks[n], m) for n, m in saved.masks.items())
    with torch.no_grad():
        trained = lora.eval()(**inputs()).logits
    merged = PrunedModel(lora, saved.masks, saved.pruning_config).merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged.model.eval()(**inputs()).logits, trained, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_obs_over_lora_prunes_the_base_weights_and_merges_to_a_model_with_those_zeros(kind):
    """SparseGPT on a model with adapters: the base weights are solved on the inputs the adapted model gives them;
    `PrunedModel(...).merge_and_unload()` then keeps the pruned positions exactly zero."""
    import copy

    from hf_prune.methods.obs import obs_prune

    model = lora_model(kind)
    plain = copy.deepcopy(model).unload()  # the same base weights, without adapters
    loader = [inputs(), inputs()]
    masks = obs_prune(model, loader, sparsity=0.5, block_size=16, show_progress=False)
    base = {name: p for name, p in model.get_base_model().named_parameters()}
    assert set(masks) == set(Pruner(TINY_MODELS[kind](), PruningConfig(schedule="oneshot")).masks)
    for name, mask in masks.items():
        weight = base[name] if name in base else base[name.replace(".weight", ".base_layer.weight")]
        assert mask.numel() - int(mask.sum()) == mask.numel() // 2 and not weight[~mask].any(), name
    first = obs_prune(plain, loader, sparsity=0.5, block_size=16, show_progress=False)
    qkv = [name for name in masks if ".0.attention.self." in name or ".h.0.attn.c_attn" in name]
    assert qkv and all(torch.equal(masks[name], first[name]) for name in qkv)  # same inputs: the embeddings'
    solved = {name: p.detach().clone() for name, p in base.items()}
    params = dict(PrunedModel(model, masks).merge_and_unload().model.named_parameters())
    assert all(not params[name][~mask].any() for name, mask in masks.items())
    adapted = [name for name in masks if name.replace(".weight", ".base_layer.weight") in solved]
    assert adapted and all(not torch.equal(params[name], solved[name.replace(".weight", ".base_layer.weight")])
                           for name in adapted)  # the update was merged where the weights are kept


def test_a_save_removes_an_adapter_left_in_the_folder_and_a_folder_with_one_loads(tmp_path):
    # transformers loads an adapter_config.json it finds beside the weights on top of them.
    model = TINY_MODELS["bert"]()
    pruner = Pruner(model, PruningConfig(final_sparsity=0.8, schedule="oneshot"))
    pruner.prune_to(0.8)
    pruned = PrunedModel(model, pruner.masks, pruner.config)
    lora_model("bert").save_pretrained(tmp_path)  # an earlier save of adapters into the same folder
    pruned.save_pretrained(tmp_path)
    assert not {"adapter_config.json", "adapter_model.safetensors"} & set(os.listdir(tmp_path))
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert not any("lora" in name for name, _ in plain.named_parameters())
    assert all(torch.equal(plain.state_dict()[name], tensor) for name, tensor in model.state_dict().items())
    lora_model("bert").save_pretrained(tmp_path)  # adapters saved after: loaded on top, by transformers' rules
    loaded = PrunedModel.from_pretrained(tmp_path)
    assert any("lora" in name for name, _ in loaded.model.named_parameters())
    assert loaded.masks.keys() == pruner.masks.keys()
