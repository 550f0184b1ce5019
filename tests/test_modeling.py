import json
import os
import shutil
from unittest import mock

import pytest
import torch
from conftest import TINY_MODELS, TinyClassificationDataset, tiny_bert
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from hf_prune import MagnitudePruningCallback, PrunedModel, Pruner, PruningConfig
from hf_prune.constants import COMPRESSED_WEIGHTS_NAME, CONFIG_NAME, MASKS_NAME


AUTO_CLASSES = {"bert": AutoModelForSequenceClassification, "gpt2": AutoModelForCausalLM,
                "t5": AutoModelForSeq2SeqLM}


def pruned(kind: str = "bert", sparsity: float = 0.9) -> PrunedModel:
    model = TINY_MODELS[kind]()
    config = PruningConfig(final_sparsity=sparsity, schedule="oneshot")
    pruner = Pruner(model, config)
    pruner.update(0)
    return PrunedModel(model, pruner.masks, config)


def assert_same(a: PrunedModel, b: PrunedModel) -> None:
    assert a.masks.keys() == b.masks.keys()
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    b_state = b.model.state_dict()
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, b_state[name]), name


@pytest.mark.parametrize("kind", sorted(AUTO_CLASSES))
@pytest.mark.parametrize("compressed", [False, True], ids=["dense", "compressed"])
def test_round_trip_keeps_masks_and_weights(tmp_path, kind, compressed):
    original = pruned(kind)
    original.save_pretrained(tmp_path, compression="sparse" if compressed else None)
    files = set(os.listdir(tmp_path)) - {"generation_config.json"}
    weights = COMPRESSED_WEIGHTS_NAME if compressed else "model.safetensors"
    assert files == {"config.json", weights, MASKS_NAME, CONFIG_NAME, "README.md"}
    loaded = PrunedModel.from_pretrained(tmp_path)
    assert type(loaded.model) is type(original.model)
    assert_same(original, loaded)
    assert loaded.sparsity_report().overall == pytest.approx(0.9, abs=1e-4)


def test_compressed_checkpoint_stores_only_kept_values(tmp_path):
    model = pruned("bert")
    model.save_pretrained(tmp_path / "dense")
    model.save_pretrained(tmp_path / "sparse", compression="sparse")
    stored = load_file(str(tmp_path / "sparse" / COMPRESSED_WEIGHTS_NAME))
    for name, mask in model.masks.items():
        assert stored[f"{name}.values"].numel() == int(mask.sum()) and name not in stored
    assert os.path.getsize(tmp_path / "sparse" / COMPRESSED_WEIGHTS_NAME) < \
        os.path.getsize(tmp_path / "dense" / "model.safetensors")


@pytest.mark.parametrize("kind", sorted(AUTO_CLASSES))
def test_plain_transformers_loads_the_folder(tmp_path, kind):
    original = pruned(kind)
    original.save_pretrained(tmp_path)
    plain = AUTO_CLASSES[kind].from_pretrained(tmp_path)
    state = plain.state_dict()
    for name, tensor in original.model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    params = dict(plain.named_parameters())
    assert all((params[n][~m] == 0).all() for n, m in original.masks.items())


def test_behaves_like_the_wrapped_model():
    model = pruned("gpt2").eval()
    inputs = torch.tensor([[3, 4, 5, 6]])
    assert model.config is model.model.config and model.get_base_model() is model.model
    assert not hasattr(model, "num_parameters"), "no implicit forwarding: other attributes are pruned.model's"
    torch.testing.assert_close(model(input_ids=inputs).logits, model.model(input_ids=inputs).logits)
    out = model.generate(inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_model_card_has_sparsity_tables_and_tags(tmp_path):
    pruned("bert", 0.75).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "hf_prune" in card and "- pruned" in card and "75.00%" in card
    assert "bert.encoder.layer.0.attention.self.query.weight" in card
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["achieved_sparsity"] == pytest.approx(0.75, abs=1e-4) and config["hf_prune_version"]


def test_trainer_continues_from_a_saved_model_and_keeps_its_sparsity(tmp_path):
    pruned("bert", 0.7).save_pretrained(tmp_path / "saved")
    loaded = PrunedModel.from_pretrained(tmp_path / "saved")
    callback = MagnitudePruningCallback.from_pretrained(tmp_path / "saved")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=loaded.model, args=args, train_dataset=TinyClassificationDataset(48),
                      callbacks=[callback])
    before = {n: p.clone() for n, p in loaded.model.named_parameters()}
    trainer.train()
    params = dict(loaded.model.named_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in params.items())  # it trained
    for name, mask in loaded.masks.items():
        assert torch.equal(callback.masks[name], mask)
        assert (params[name][~mask] == 0).all()
    again = PrunedModel.from_trainer(trainer)
    again.save_pretrained(tmp_path / "again")
    assert PrunedModel.from_pretrained(tmp_path / "again").sparsity_report().overall == pytest.approx(0.7, abs=1e-4)


def test_callback_can_prune_a_saved_model_further(tmp_path):
    pruned("bert", 0.5).save_pretrained(tmp_path / "saved")
    config = PruningConfig(final_sparsity=0.8, schedule="oneshot", start_step=2)
    callback = MagnitudePruningCallback.from_pretrained(tmp_path / "saved", config=config)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    trainer = Trainer(model=model, args=args, train_dataset=TinyClassificationDataset(32), callbacks=[callback])
    first = load_file(str(tmp_path / "saved" / "model.safetensors"))
    trainer.train()
    assert callback.pruner.sparsity() == pytest.approx(0.8, abs=1e-4)
    for name, mask in callback.masks.items():  # everything pruned before is still pruned
        assert (~mask)[first[name] == 0].all()


def test_masks_from_zeros(tmp_path):
    original = pruned("bert", 0.6)
    original.model.save_pretrained(tmp_path)  # plain transformers save: no hf_prune files
    loaded = PrunedModel.from_pretrained(tmp_path, masks_from_zeros=True)
    assert all(torch.equal(loaded.masks[n], m) for n, m in original.masks.items())


def test_peft_lora_merge_keeps_pruned_positions_at_zero(tmp_path):
    peft = pytest.importorskip("peft")
    base = pruned("bert", 0.8)
    lora = peft.get_peft_model(base.model, peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                           task_type="SEQ_CLS", init_lora_weights=False))
    wrapped = PrunedModel(lora, base.masks, base.pruning_config)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    Trainer(model=lora, args=args, train_dataset=TinyClassificationDataset(24)).train()
    merged = wrapped.merge_and_unload()
    params = dict(merged.model.named_parameters())
    assert not any("lora" in n for n in params)
    for name, mask in base.masks.items():
        assert (params[name][~mask] == 0).all(), name
    assert merged.sparsity_report().overall == pytest.approx(0.8, abs=1e-4)


def test_push_to_hub_uploads_the_saved_folder():
    model = pruned("bert")
    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded.update(repo_id=repo_id, files=sorted(os.listdir(folder_path)), kwargs=kwargs)
        return "commit-info"

    repo = mock.Mock(repo_id="user/tiny-bert-90")
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=repo) as create, \
            mock.patch("huggingface_hub.HfApi.upload_folder", upload_folder):
        assert model.push_to_hub("user/tiny-bert-90", private=True) == "commit-info"
    create.assert_called_once_with("user/tiny-bert-90", private=True, exist_ok=True)
    assert uploaded["repo_id"] == "user/tiny-bert-90"
    assert uploaded["files"] == sorted(["README.md", "config.json", "model.safetensors", MASKS_NAME, CONFIG_NAME])


def test_from_pretrained_with_a_repo_id_reads_the_hub_cache(tmp_path):
    pruned("bert", 0.9).save_pretrained(tmp_path / "saved")
    snapshot = tmp_path / "cache" / "models--user--tiny-bert-90" / "snapshots" / ("a" * 40)
    shutil.copytree(tmp_path / "saved", snapshot)
    refs = tmp_path / "cache" / "models--user--tiny-bert-90" / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    loaded = PrunedModel.from_pretrained("user/tiny-bert-90", cache_dir=str(tmp_path / "cache"),
                                         local_files_only=True)
    assert loaded.sparsity_report().overall == pytest.approx(0.9, abs=1e-4)


def test_corrupt_mismatched_and_missing_masks_are_clear_errors(tmp_path):
    pruned("bert").save_pretrained(tmp_path)
    forget_file_records(tmp_path)  # the checks of each file's content, not of the save's record of its files
    masks_file = tmp_path / MASKS_NAME
    good = masks_file.read_bytes()

    masks_file.write_bytes(good[:-10])
    with pytest.raises(ValueError, match="not a readable hf_prune masks file"):
        PrunedModel.from_pretrained(tmp_path)

    other = pruned("gpt2")
    from hf_prune.serialization import save_masks

    save_masks(other.masks, masks_file)
    with pytest.raises(ValueError, match="transformer.h.0.attn.c_attn.weight"):
        PrunedModel.from_pretrained(tmp_path)

    masks_file.write_bytes(good)
    weights = load_file(str(tmp_path / "model.safetensors"))
    name = "bert.encoder.layer.0.attention.self.query.weight"
    weights[name] = torch.ones_like(weights[name])
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"non-zero in the loaded model: \\['{name}'\\]"):
        PrunedModel.from_pretrained(tmp_path)
    repaired = PrunedModel.from_pretrained(tmp_path, reapply_masks=True)
    assert (dict(repaired.model.named_parameters())[name][~repaired.masks[name]] == 0).all()

    os.remove(masks_file)
    with pytest.raises(FileNotFoundError, match=MASKS_NAME):
        PrunedModel.from_pretrained(tmp_path)


def test_corrupt_compressed_checkpoint_is_a_clear_error(tmp_path):
    pruned("bert").save_pretrained(tmp_path, compression="sparse")
    forget_file_records(tmp_path)
    path = tmp_path / COMPRESSED_WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ValueError, match="not a readable compressed checkpoint"):
        PrunedModel.from_pretrained(tmp_path)


def test_from_trainer_needs_a_pruning_callback(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = Trainer(model=tiny_bert(), args=args)
    with pytest.raises(ValueError, match="exactly one pruning callback"):
        PrunedModel.from_trainer(trainer)


def test_deep_compression_round_trip(tmp_path):
    from hf_prune import dequantize, quantize_weights

    model = pruned("bert", 0.9)
    params = dict(model.model.named_parameters())
    expected = {n: dequantize(q) for n, q in quantize_weights({n: params[n] for n in model.masks}, model.masks,
                                                             bits=4).items()}
    model.save_pretrained(tmp_path, compression="deep", bits=4)
    assert "deep_compressed_weights.safetensors" in os.listdir(tmp_path)
    loaded = PrunedModel.from_pretrained(tmp_path)
    loaded_params = dict(loaded.model.named_parameters())
    for name, weight in expected.items():
        assert torch.equal(loaded_params[name], weight)
        assert loaded_params[name].unique().numel() <= 2 ** 4 + 1  # 16 shared values and the zeros
    for name, tensor in model.model.state_dict().items():  # everything else is stored as it is
        if name not in expected:
            assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert torch.equal(loaded.masks[next(iter(expected))], model.masks[next(iter(expected))])


@pytest.mark.parametrize("kwargs, field", [({"compression": "zip"}, "compression"),
                                           ({"compression": "deep", "bits": 9}, "bits")])
def test_bad_save_arguments_fail_before_writing(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        pruned("bert").save_pretrained(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_sharded_checkpoint_round_trip(tmp_path):
    original = pruned("bert", 0.8)
    original.save_pretrained(tmp_path, max_shard_size="30KB")
    shards = [name for name in os.listdir(tmp_path) if name.startswith("model-") and name.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in os.listdir(tmp_path)
    assert_same(original, PrunedModel.from_pretrained(tmp_path))


def test_compressed_is_a_deprecated_alias_of_compression_sparse(tmp_path):
    with pytest.warns(FutureWarning, match="compression='sparse'"):
        pruned("bert").save_pretrained(tmp_path, compressed=True)
    assert (tmp_path / COMPRESSED_WEIGHTS_NAME).is_file() and not (tmp_path / "model.safetensors").exists()


# ------------------------------------------------------------------ one save per folder (issue 16, items 1-3, 13)
def forget_file_records(folder) -> None:
    """Drops the record of the save's files from `pruning_config.json`, as a save by an older hf_prune has none."""
    path = os.path.join(folder, CONFIG_NAME)
    record = json.loads(open(path).read())
    record.pop("files")
    with open(path, "w") as f:
        json.dump(record, f)
