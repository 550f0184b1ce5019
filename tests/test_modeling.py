import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import pytest
import torch
import transformers
from conftest import TINY_MODELS, TinyClassificationDataset, tiny_bert
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from hf_prune import (
    HanConfig,
    HanPruningCallback,
    MagnitudePruningCallback,
    PrunedModel,
    Pruner,
    PruningConfig,
    RPPCallback,
    RPPConfig,
)
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


@pytest.mark.parametrize("compression", [None, "sparse", "deep"])
def test_every_format_loads_the_generation_config_and_config_keyword_arguments(tmp_path, compression):
    original = pruned("gpt2")
    original.model.generation_config.num_beams, original.model.generation_config.max_new_tokens = 3, 7
    original.save_pretrained(tmp_path, compression=compression)
    loaded = PrunedModel.from_pretrained(tmp_path, output_hidden_states=True)
    assert (loaded.model.generation_config.num_beams, loaded.model.generation_config.max_new_tokens) == (3, 7)
    assert loaded.model.config.output_hidden_states is True
    assert loaded.masks.keys() == original.masks.keys()


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


@pytest.mark.parametrize("saved_config", [PruningConfig(final_sparsity=0.6, schedule="oneshot"),
                                          RPPConfig(final_sparsity=0.6), HanConfig(quality=0.5)],
                         ids=["PruningConfig", "RPPConfig", "HanConfig"])
@pytest.mark.parametrize("callback_class", [MagnitudePruningCallback, RPPCallback, HanPruningCallback])
def test_every_pruning_callback_holds_the_masks_of_a_save_by_another_method(tmp_path, saved_config, callback_class):
    model = tiny_bert()
    pruner = Pruner(model, saved_config)
    pruner.prune_to(0.6)
    PrunedModel(model, pruner.masks, saved_config).save_pretrained(tmp_path / "saved")
    loaded = PrunedModel.from_pretrained(tmp_path / "saved")
    callback = callback_class.from_pretrained(tmp_path / "saved")  # raised TypeError / ValueError across methods
    assert type(callback.config) is callback_class.config_class
    assert callback.config.target_modules == saved_config.target_modules
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    Trainer(model=loaded.model, args=args, train_dataset=TinyClassificationDataset(24), callbacks=[callback]).train()
    params = dict(loaded.model.named_parameters())
    for name, mask in loaded.masks.items():
        assert torch.equal(callback.masks[name], mask) and (params[name][~mask] == 0).all()


def test_model_card_has_sparsity_tables_and_tags(tmp_path):
    pruned("bert", 0.75).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "hf_prune" in card and "- pruned" in card and "75.00%" in card
    assert "bert.encoder.layer.0.attention.self.query.weight" in card
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["achieved_sparsity"] == pytest.approx(0.75, abs=1e-4) and config["hf_prune_version"]


@pytest.mark.parametrize("compression", [None, "sparse", "deep"])
def test_model_card_says_which_loader_reads_the_save(tmp_path, compression):
    pruned("bert", 0.75).save_pretrained(tmp_path, compression=compression)
    card = ModelCard.load(tmp_path / "README.md")
    if compression is None:
        assert card.data.library_name == "transformers" and "Loads with plain transformers" in card.text
        AutoModelForSequenceClassification.from_pretrained(tmp_path)  # as the card says
    else:  # plain transformers finds no weights file in a compressed folder: the card must not promise it
        assert card.data.library_name is None and "plain transformers cannot read" in card.text
        assert "Loads with plain transformers" not in card.text
        with pytest.raises(OSError):
            AutoModelForSequenceClassification.from_pretrained(tmp_path)
        PrunedModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("local", [True, False])
def test_model_card_names_a_hub_base_model_but_not_a_local_folder(tmp_path, local):
    model = pruned("bert", 0.5)
    base = str(tmp_path / "base") if local else "google-bert/bert-base-uncased"
    (tmp_path / "base").mkdir()
    model.model.config._name_or_path = base
    model.save_pretrained(tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == (None if local else base)  # the Hub refuses a path as `base_model`
    assert json.loads((tmp_path / "out" / CONFIG_NAME).read_text())["base_model_name_or_path"] == base


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
    for kwargs in ({}, {"pruning_config": PruningConfig()}):  # the error says how to load it
        with pytest.raises(FileNotFoundError, match=r"No pruning_.* loads with PrunedModel\.from_pretrained\(\.\.\., "
                                                    r"masks_from_zeros=True\).* such as one saved from shrink\(\).* "
                                                    r"AutoModel\*\.from_pretrained"):
            PrunedModel.from_pretrained(tmp_path, **kwargs)
    with pytest.raises(FileNotFoundError, match=r"neither a PrunedModel\.save_pretrained folder nor a Trainer "
                                                r"checkpoint.*MagnitudePruningCallback\(PruningConfig\(\.\.\.\)\)"):
        MagnitudePruningCallback.from_pretrained(tmp_path)
    loaded = PrunedModel.from_pretrained(tmp_path, masks_from_zeros=True)
    assert all(torch.equal(loaded.masks[n], m) for n, m in original.masks.items())


def test_a_folder_with_masks_but_no_pruning_config_says_to_pass_one(tmp_path):
    original = pruned("bert", 0.6)
    original.save_pretrained(tmp_path)
    os.remove(tmp_path / CONFIG_NAME)
    with pytest.raises(FileNotFoundError, match=f"No {CONFIG_NAME} .* It has {MASKS_NAME}: pass pruning_config="):
        PrunedModel.from_pretrained(tmp_path)
    assert_same(original, PrunedModel.from_pretrained(tmp_path, pruning_config=original.pruning_config))


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
            mock.patch("huggingface_hub.HfApi.list_repo_files", return_value=[]), \
            mock.patch("huggingface_hub.HfApi.upload_folder", upload_folder):
        assert model.push_to_hub("user/tiny-bert-90", private=True) == "commit-info"
    create.assert_called_once_with("user/tiny-bert-90", private=True, exist_ok=True)
    assert uploaded["repo_id"] == "user/tiny-bert-90"
    assert uploaded["files"] == sorted(["README.md", "config.json", "model.safetensors", MASKS_NAME, CONFIG_NAME])


def test_push_to_hub_sends_the_commit_description_and_adds_the_tags_to_the_card():
    cards = {}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        cards.update(card=ModelCard.load(os.path.join(folder_path, "README.md")), kwargs=kwargs)

    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="user/m")), \
            mock.patch("huggingface_hub.HfApi.list_repo_files", return_value=[]), \
            mock.patch("huggingface_hub.HfApi.upload_folder", upload_folder):
        pruned("bert").push_to_hub("user/m", commit_description="80% on SST-2", tags=["sst2", "pruned"])
    assert cards["kwargs"]["commit_description"] == "80% on SST-2"
    assert cards["card"].data.tags == ["hf_prune", "pruned", "sparse", "sparsity-90", "sst2"]
    assert "Sparsity by layer" in cards["card"].text


def test_from_pretrained_with_a_repo_id_reads_the_hub_cache(tmp_path):
    original = pruned("bert", 0.9)
    original.save_pretrained(tmp_path / "saved")
    snapshot = tmp_path / "cache" / "models--user--tiny-bert-90" / "snapshots" / ("a" * 40)
    shutil.copytree(tmp_path / "saved", snapshot)
    refs = tmp_path / "cache" / "models--user--tiny-bert-90" / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    loaded = PrunedModel.from_pretrained("user/tiny-bert-90", cache_dir=str(tmp_path / "cache"),
                                         local_files_only=True)
    assert loaded.sparsity_report().overall == pytest.approx(0.9, abs=1e-4)
    assert_same(original, loaded)


def test_a_repo_whose_cache_lacks_a_recorded_file_says_so_offline(tmp_path):
    pruned("bert", 0.9).save_pretrained(tmp_path / "saved")
    snapshot = tmp_path / "cache" / "models--user--tiny-bert-90" / "snapshots" / ("a" * 40)
    shutil.copytree(tmp_path / "saved", snapshot)
    (snapshot / MASKS_NAME).unlink()  # a download interrupted before the masks
    (tmp_path / "cache" / "models--user--tiny-bert-90" / "refs").mkdir()
    (tmp_path / "cache" / "models--user--tiny-bert-90" / "refs" / "main").write_text("a" * 40)
    with pytest.raises(FileNotFoundError, match=f"as a Hub repo id {MASKS_NAME} cannot be fetched: the Hub is "
                                                "unreachable .offline.. and the cache does not have it"):
        PrunedModel.from_pretrained("user/tiny-bert-90", cache_dir=str(tmp_path / "cache"), local_files_only=True)


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


def assert_deep_round_trip(original: PrunedModel, loaded: PrunedModel, bits: int = 4) -> None:
    """`loaded` is `original` saved with compression="deep": the same masks, each targeted weight its clustered
    values (in the model's dtype), every other tensor as it was."""
    from hf_prune import dequantize, quantize_weights

    model = getattr(original.model, "_orig_mod", original.model)
    params = dict(model.named_parameters())
    expected = {n: dequantize(q) for n, q in quantize_weights({n: params[n] for n in original.masks}, original.masks,
                                                             bits=bits).items()}
    assert loaded.masks.keys() == original.masks.keys()
    assert all(torch.equal(loaded.masks[n], m) for n, m in original.masks.items())
    loaded_params = dict(loaded.model.named_parameters())
    for name, weight in expected.items():
        assert torch.equal(loaded_params[name], weight.to(loaded_params[name].dtype)), name
        assert loaded_params[name].unique().numel() <= 2 ** bits + 1  # the shared values and the zeros
    for name, tensor in model.state_dict().items():  # everything else is stored as it is
        if name not in expected:
            assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_deep_compression_round_trip(tmp_path):
    model = pruned("bert", 0.9)
    model.save_pretrained(tmp_path, compression="deep", bits=4)
    assert "deep_compressed_weights.safetensors" in os.listdir(tmp_path)
    assert_deep_round_trip(model, PrunedModel.from_pretrained(tmp_path), bits=4)


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


def weights_files(folder) -> set[str]:
    from hf_prune.folders import WEIGHT_FORMATS

    return {name for name in os.listdir(folder)
            if name in WEIGHT_FORMATS or (name.startswith("model-") and name.endswith(".safetensors"))}


WRITTEN = {None: {"model.safetensors"}, "sharded": {"model.safetensors.index.json"},
           "sparse": {COMPRESSED_WEIGHTS_NAME}, "deep": {"deep_compressed_weights.safetensors"}}


def save(model: PrunedModel, folder, fmt) -> None:
    if fmt == "sharded":
        model.save_pretrained(folder, max_shard_size="30KB")
    else:
        model.save_pretrained(folder, compression=fmt)


@pytest.mark.parametrize("first, second", [("sparse", None), ("deep", None), (None, "sparse"), (None, "deep"),
                                           ("deep", "sparse"), ("sharded", None), (None, "sharded"),
                                           ("sharded", "deep")])
def test_a_save_removes_the_weights_of_the_formats_it_does_not_write(tmp_path, first, second):
    old, new = pruned("bert", 0.5), pruned("bert", 0.9)
    with torch.no_grad():
        for param in new.model.parameters():
            param.add_(1.0)
    new.apply_masks_()
    save(old, tmp_path, first)
    save(new, tmp_path, second)
    expected = WRITTEN[second] | ({n for n in os.listdir(tmp_path) if n.startswith("model-")} if second == "sharded"
                                  else set())
    assert weights_files(tmp_path) == expected
    save(new, tmp_path / "reference", second)
    assert_same(PrunedModel.from_pretrained(tmp_path / "reference"), PrunedModel.from_pretrained(tmp_path))
    if second in (None, "sharded"):  # plain transformers reads the new weights too
        plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).state_dict()
        assert all(torch.equal(plain[n], t) for n, t in new.model.state_dict().items())


def test_a_folder_with_two_weight_formats_is_an_error_naming_both(tmp_path):
    pruned("bert").save_pretrained(tmp_path / "dense")
    pruned("bert").save_pretrained(tmp_path / "sparse", compression="sparse")
    shutil.copy(tmp_path / "sparse" / COMPRESSED_WEIGHTS_NAME, tmp_path / "dense")
    with pytest.raises(ValueError, match=f"2 formats: model.safetensors \\(dense\\), {COMPRESSED_WEIGHTS_NAME}"):
        PrunedModel.from_pretrained(tmp_path / "dense")


@pytest.mark.parametrize("copied", ["model.safetensors", "config.json", MASKS_NAME])
def test_a_file_of_another_save_is_an_error_naming_it(tmp_path, copied):
    pruned("bert", 0.5).save_pretrained(tmp_path / "a")
    other = pruned("bert", 0.9)
    other.model.config.id2label = {0: "no", 1: "yes"}
    other.save_pretrained(tmp_path / "b")
    shutil.copy(tmp_path / "b" / copied, tmp_path / "a")
    with pytest.raises(ValueError, match=f"{copied} does not belong to the save that .*{CONFIG_NAME} records"):
        PrunedModel.from_pretrained(tmp_path / "a")
    os.remove(tmp_path / "a" / copied)
    with pytest.raises(ValueError, match=f"has no {copied}, which .*{CONFIG_NAME} records as part of its save"):
        PrunedModel.from_pretrained(tmp_path / "a")


def test_file_records_and_leftover_temporaries(tmp_path):
    model = pruned("gpt2")
    model.save_pretrained(tmp_path, compression="deep")
    records = json.loads((tmp_path / CONFIG_NAME).read_text())["files"]
    assert set(records) == {"config.json", "generation_config.json", "deep_compressed_weights.safetensors",
                            MASKS_NAME}
    for name, record in records.items():
        assert record["size"] == os.path.getsize(tmp_path / name) and len(record["sha256"]) == 64
    (tmp_path / ".tmp-model.safetensors-1234").write_bytes(b"partial")  # what a killed save leaves
    (tmp_path / ".tmp-staging").mkdir()
    PrunedModel.from_pretrained(tmp_path)  # ignored on load
    model.save_pretrained(tmp_path)  # removed by the next save
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]
    assert "generation_config.json" in os.listdir(tmp_path)


def test_a_save_leaves_the_staging_folder_of_a_running_save_alone(tmp_path):
    import fcntl

    model = pruned("bert")
    running, abandoned = tmp_path / ".tmp-running", tmp_path / ".tmp-abandoned"
    running.mkdir()
    (running / "model.safetensors").write_bytes(b"being written")
    abandoned.mkdir()
    fd = os.open(running, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the other process's save holds its staging folder
        model.save_pretrained(tmp_path)
        assert (running / "model.safetensors").read_bytes() == b"being written" and not abandoned.exists()
    finally:
        os.close(fd)
    PrunedModel.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # once that save has ended (or died: the kernel drops its lock), it goes
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


KILL_DRIVER = r'''
import json, os, random, signal, sys, time
import tqdm
import torch
import transformers
import transformers
from transformers import BertConfig, BertForSequenceClassification
from hf_prune import PrunedModel, Pruner, PruningConfig

# forked children must not inherit a lock held by another thread: no tqdm monitor thread, no progress bars
tqdm.tqdm.monitor_interval = 0
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(1)

folder, random_kills = sys.argv[1], int(sys.argv[2])
random.seed(0)


def variant(seed, sparsity, labels):
    torch.manual_seed(seed)  # smaller than the tiny BERT of conftest: Huffman decoding steps through each stream
    model = BertForSequenceClassification(BertConfig(
        vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
        max_position_embeddings=32, id2label=dict(enumerate(labels))))
    config = PruningConfig(final_sparsity=sparsity, schedule="oneshot")
    pruner = Pruner(model, config)
    pruner.update(0)
    return PrunedModel(model, pruner.masks, config)


a, b = variant(1, 0.5, ["a0", "a1"]), variant(2, 0.8, ["b0", "b1"])
SAVES = [(a, None), (b, "sparse"), (a, "deep"), (b, None), (a, "sparse"), (b, "deep")]


def save(i, target=folder):
    model, compression = SAVES[i % len(SAVES)]
    model.save_pretrained(target, compression=compression)


def snapshot(pruned):
    return ({n: m.clone() for n, m in pruned.masks.items()},
            {n: t.clone() for n, t in pruned.model.state_dict().items()}, dict(pruned.model.config.id2label))


def same(x, y):
    return all(x[k].keys() == y[k].keys() and all(torch.equal(x[k][n], y[k][n]) for n in x[k]) for k in (0, 1)) \
        and x[2] == y[2]


references = []
for i in range(len(SAVES)):
    save(i, f"{folder}-reference{i}")
    references.append(snapshot(PrunedModel.from_pretrained(f"{folder}-reference{i}")))
start = time.time()
save(len(SAVES) - 1)
save_seconds = time.time() - start


def child(write_fd, first, kill_at_op):
    # saves SAVES[first], SAVES[first + 1], ... announcing each; with kill_at_op, one save, killed after that op
    if kill_at_op:
        count = [0]
        for op in ("replace", "remove", "rename"):
            def patched(*args, _original=getattr(os, op), **kwargs):
                result = _original(*args, **kwargs)
                count[0] += 1
                if count[0] == kill_at_op:  # just after it: the file system as it is when that op is done
                    os.kill(os.getpid(), signal.SIGKILL)
                return result

            setattr(os, op, patched)
    i = first
    while True:
        os.write(write_fd, f"{i}\n".encode())
        save(i)
        if kill_at_op:
            os._exit(0)
        i += 1


# random moments of endless saves cycling through the formats, then every rename/remove of one save of each
# format change (dense -> sparse -> deep -> dense)
plan = [(0, None)] * random_kills + [(first, op) for first in (1, 2, 3) for op in range(1, 100)]
outcomes, completed = [], set()
for first, op in plan:
    if first in completed:
        continue
    save(first - 1)  # the folder holds the save before `first`, complete
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            child(write_fd, first, op)
        finally:
            os._exit(3)
    os.close(write_fd)
    deadline = time.time() + (random.uniform(0.0, 2.5 * save_seconds) if op is None else 120)
    status = None
    while status is None and time.time() < deadline:
        done, code = os.waitpid(pid, os.WNOHANG)
        status = code if done else time.sleep(0.002)
    hung = op is not None and status is None
    if status is None:
        os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
    announced = os.read(read_fd, 1 << 16).decode().split()
    os.close(read_fd)
    if op is not None and os.WIFEXITED(status):
        completed.add(first)  # the save ended before its op number `op`: each of its ops has had its kill
    started = int(announced[-1]) if announced else first
    old, new = (started - 1) % len(SAVES), started % len(SAVES)
    leftovers = any(name.startswith(".tmp-") for name in os.listdir(folder))
    try:
        loaded = snapshot(PrunedModel.from_pretrained(folder))
    except ValueError as err:
        outcome = "error"
        message = str(err)
    except Exception as err:
        outcome, message = "UNEXPECTED", f"{type(err).__name__}: {err}"
    else:
        matches = [i for i, reference in enumerate(references) if same(loaded, reference)]
        outcome = "old" if old in matches else "new" if new in matches else "MIX"
        message = f"matches saves {matches}; old {old}, new {new}"
    if hung:
        outcome = "HUNG"
    outcomes.append({"first": first, "op": op, "killed": os.WIFSIGNALED(status), "saves_started": len(announced),
                     "outcome": outcome, "message": message[:300], "leftovers": leftovers})
save(0)
print(json.dumps({"save_seconds": save_seconds, "outcomes": outcomes,
                  "final_leftovers": [n for n in os.listdir(folder) if n.startswith(".tmp-")]}))
'''


def test_a_save_killed_at_any_moment_leaves_the_old_save_the_new_one_or_a_clear_error(tmp_path):
    script = tmp_path / "kill_driver.py"
    script.write_text(KILL_DRIVER)
    import hf_prune

    source = os.path.dirname(os.path.dirname(hf_prune.__file__))  # the hf_prune under test, not another install
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "folder"), "30"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    outcomes = result["outcomes"]
    bad = [o for o in outcomes if o["outcome"] not in ("old", "new", "error")]
    assert not bad, bad
    random_kills = [o for o in outcomes if o["op"] is None]
    op_kills = [o for o in outcomes if o["op"] is not None and o["killed"]]
    assert len(random_kills) == 30 and all(o["killed"] for o in random_kills)
    assert {o["first"] for o in op_kills} == {1, 2, 3} and len(op_kills) >= 3 * 8
    assert {"old", "new", "error"} <= {o["outcome"] for o in op_kills}
    errors = [o["message"] for o in outcomes if o["outcome"] == "error"]
    reasons = ("does not belong to the save that", "records as part of its save", "holds the weights in 2 formats",
               "is not part of the save that")
    assert all(any(reason in message for reason in reasons) for message in errors), errors
    assert any(o["leftovers"] for o in outcomes)  # loads ignored what the killed saves left...
    assert result["final_leftovers"] == []  # ...and the next save removed it
    print(json.dumps({"kills": len(outcomes), "by outcome": {k: sum(o["outcome"] == k for o in outcomes)
                                                              for k in ("old", "new", "error")}}))


def test_a_dense_folder_naming_another_head_is_refused(tmp_path):
    pruned("bert").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not load as BertForMaskedLM.*weights the folder lacks.*cls.predictions"
                                         ".*saved tensors the model has no place for.*classifier.weight"):
        PrunedModel.from_pretrained(tmp_path, model_class=transformers.BertForMaskedLM)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ValueError, match="config.json does not belong to the save"):
        PrunedModel.from_pretrained(tmp_path)
    forget_file_records(tmp_path)  # a folder of an older hf_prune: the head check alone refuses it
    with pytest.raises(ValueError, match="does not load as BertForMaskedLM \\(config.json's architectures: "
                                         "\\['BertForMaskedLM'\\]\\).*cls.predictions.transform.dense.weight"):
        PrunedModel.from_pretrained(tmp_path)


def test_a_deep_folder_stores_the_positions_once_in_the_gap_coded_masks_file(tmp_path):
    from hf_prune.constants import DEEP_COMPRESSED_WEIGHTS_NAME, GAP_MASK_FORMAT

    torch.manual_seed(0)  # masks large enough for Huffman-coded gaps to beat 1 bit per weight at 90%
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=99, hidden_size=128, num_hidden_layers=1, num_attention_heads=4, intermediate_size=256))
    pruner = Pruner(bert, PruningConfig(final_sparsity=0.9, schedule="oneshot"))
    pruner.update(0)
    model = PrunedModel(bert, pruner.masks, pruner.config)
    model.save_pretrained(tmp_path / "deep", compression="deep")
    model.save_pretrained(tmp_path / "dense")
    with safe_open(str(tmp_path / "deep" / MASKS_NAME), "pt") as f:
        assert f.metadata()["format"] == GAP_MASK_FORMAT
    with safe_open(str(tmp_path / "deep" / DEEP_COMPRESSED_WEIGHTS_NAME), "pt") as f:
        header = f.metadata()
    assert header["format"] == "hf_prune.deep.v2" and header["positions"] == "masks"
    assert all(len(entry["sections"]) == 2 for entry in json.loads(header["layers"]).values())  # no gap stream
    assert os.path.getsize(tmp_path / "deep" / MASKS_NAME) < 0.7 * os.path.getsize(tmp_path / "dense" / MASKS_NAME)
    loaded = PrunedModel.from_pretrained(tmp_path / "deep")
    assert all(torch.equal(loaded.masks[n], m) for n, m in model.masks.items())
    callback = MagnitudePruningCallback.from_pretrained(tmp_path / "deep")  # every reader of the masks file
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", use_cpu=True)
    callback.on_train_begin(args, TrainerState(), TrainerControl(), model=loaded.model)
    assert callback.masks.keys() == model.masks.keys()
    assert all(torch.equal(callback.masks[n], m) for n, m in model.masks.items())


def test_a_deep_folder_of_format_v1_still_loads(tmp_path):
    """hf_prune.deep.v1: gap streams in the deep file, a bit-packed masks file beside it."""
    from safetensors.torch import load_file as load

    from hf_prune.compression import deep_format
    from hf_prune.constants import DEEP_COMPRESSED_WEIGHTS_NAME
    from hf_prune.serialization import save_masks

    model = pruned("bert", 0.9)
    model.save_pretrained(tmp_path, compression="deep")
    expected = PrunedModel.from_pretrained(tmp_path)
    forget_file_records(tmp_path)
    path = str(tmp_path / DEEP_COMPRESSED_WEIGHTS_NAME)
    quantized, others, metadata = deep_format.read_deep_compressed(path, model.masks)
    deep_format.save_deep_compressed(path, quantized, others, metadata)  # with its gap streams
    header = {**safetensors_metadata(path), "format": "hf_prune.deep.v1"}
    header.pop("positions")
    header["header_sha256"] = deep_format._header_digest(header)
    save_file(load(path), path, header)
    save_masks(model.masks, tmp_path / MASKS_NAME, {"achieved_sparsity": 0.9})
    assert_same(expected, PrunedModel.from_pretrained(tmp_path))


def safetensors_metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def test_push_to_hub_deletes_the_other_formats_at_the_root_in_the_same_commit():
    calls = {}

    def upload_folder(self, *, repo_id, folder_path, delete_patterns, **kwargs):
        calls.update(files=set(os.listdir(folder_path)), delete=delete_patterns)

    stale = ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
             "model.fp16.safetensors", COMPRESSED_WEIGHTS_NAME, "pytorch_model.bin", "generation_config.json",
             "adapter_config.json", "adapter_model.safetensors"]
    kept = ["config.json", MASKS_NAME, CONFIG_NAME, "README.md", "tokenizer.json", ".gitattributes",
            "deep_compressed_weights.safetensors",  # uploaded again
            "model-int8/model.safetensors", "v2/pytorch_model.bin"]  # other saves, in subfolders
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="user/m")), \
            mock.patch("huggingface_hub.HfApi.list_repo_files", return_value=stale + kept), \
            mock.patch("huggingface_hub.HfApi.upload_folder", upload_folder):
        pruned("bert").push_to_hub("user/m", compression="deep")
    assert sorted(calls["delete"]) == sorted(stale)  # exact names: a pattern would reach into the subfolders
    assert "deep_compressed_weights.safetensors" in calls["files"]


def test_push_to_hub_refuses_a_pull_request_to_a_branch_before_creating_anything():
    from hf_prune import modeling

    api = mock.Mock()
    with mock.patch.object(modeling, "HfApi", return_value=api):
        with pytest.raises(ValueError, match="`create_pr=True` opens a pull request against main"):
            pruned("bert").push_to_hub("user/m", revision="sparse-80", create_pr=True)
    assert api.mock_calls == []


def test_push_to_hub_on_a_process_that_is_not_the_main_one_does_nothing():
    # Its save writes nothing: an upload of the empty folder would commit only the deletions of the repo's weights.
    from hf_prune import modeling

    api = mock.Mock()
    with mock.patch.object(modeling, "HfApi", return_value=api):
        assert pruned("bert").push_to_hub("user/m", is_main_process=False) is None
    assert api.mock_calls == []


def test_push_to_hub_to_a_new_branch_creates_it_first():
    from hf_prune import modeling

    api = mock.Mock()
    api.create_repo.return_value = mock.Mock(repo_id="user/m")
    api.list_repo_files.return_value = []
    with mock.patch.object(modeling, "HfApi", return_value=api):
        pruned("bert").push_to_hub("user/m", revision="sparse-80")
    assert api.create_branch.call_args == mock.call("user/m", branch="sparse-80", exist_ok=True)
    assert api.upload_folder.call_args.kwargs["revision"] == "sparse-80"


@pytest.mark.parametrize("compression, kwargs, message", [
    (None, {"push_to_hub": True}, "`push_to_hub=True` is not a save_pretrained option"),
    ("sparse", {"max_shard_size": "1MB"}, "`max_shard_size` would be ignored"),
    ("deep", {"safe_serialization": True}, "`safe_serialization` would be ignored"),
])
def test_save_options_that_would_be_ignored_or_misdirected_raise_before_writing(tmp_path, compression, kwargs,
                                                                                 message):
    with pytest.raises(ValueError, match=message):
        pruned("bert").save_pretrained(tmp_path / "out", compression=compression, **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("files", ["all", {"../config.json": {"sha256": "0" * 64, "size": 1}},
                                   {"config.json": {"sha256": "0" * 64, "size": -1}}, {"config.json": "x"}])
def test_a_malformed_record_of_the_files_is_a_value_error(tmp_path, files):
    pruned("bert").save_pretrained(tmp_path)
    record = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**record, "files": files}))
    with pytest.raises(ValueError, match=f"{CONFIG_NAME} is corrupt: `files` must map file names to"):
        PrunedModel.from_pretrained(tmp_path)


def test_callback_from_pretrained_refuses_masks_of_another_save_than_the_recorded_one(tmp_path):
    from hf_prune.serialization import save_masks

    pruned("bert", 0.5).save_pretrained(tmp_path)
    other = pruned("bert", 0.9)  # a save killed after its masks were renamed in, before its pruning_config.json
    save_masks(other.masks, str(tmp_path / MASKS_NAME), {"achieved_sparsity": 0.9})
    with pytest.raises(ValueError, match=f"{MASKS_NAME} does not belong to the save that .*{CONFIG_NAME} records"):
        MagnitudePruningCallback.from_pretrained(tmp_path)


@pytest.mark.parametrize("encoding", ["bitmask", "gaps"])
def test_callback_checks_saved_masks_against_the_model_before_decoding(tmp_path, monkeypatch, encoding):
    from hf_prune import serialization
    from hf_prune.serialization import save_masks

    model = pruned("bert", 0.9)
    model.save_pretrained(tmp_path)
    name = next(iter(model.masks))
    wrong = {**model.masks, name: torch.rand(512, 4096) > 0.9}  # a shape the model does not have
    save_masks(wrong, str(tmp_path / MASKS_NAME), {"achieved_sparsity": 0.9}, encoding=encoding)
    forget_file_records(tmp_path)  # else refused at once, as a file of another save
    callback = MagnitudePruningCallback.from_pretrained(tmp_path)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a mask was decoded before the shapes were checked")

    monkeypatch.setattr(serialization, "unpack_mask", no_decoding)
    monkeypatch.setattr(serialization, "_decode_gap_masks", no_decoding)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=rf"{MASKS_NAME}.*{name}"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=TINY_MODELS["bert"]())


@pytest.mark.parametrize("compression", [None, "sparse"])
def test_a_masks_file_that_does_not_fit_fails_before_the_model_is_loaded(tmp_path, monkeypatch, compression):
    from hf_prune import modeling
    from hf_prune.serialization import save_masks

    model = pruned("bert", 0.9)
    model.save_pretrained(tmp_path, compression=compression)
    forget_file_records(tmp_path)
    name = next(iter(model.masks))
    save_masks({**model.masks, name: torch.rand(512, 4096) > 0.9}, str(tmp_path / MASKS_NAME),
               {"achieved_sparsity": 0.9})

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the masks were checked")

    monkeypatch.setattr(modeling, "load_dense", no_loading)
    with pytest.raises(ValueError, match=rf"{MASKS_NAME}.*{name}"):
        PrunedModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("compression", [None, "sparse"])
def test_a_save_that_lands_while_the_folder_loads_is_a_value_error(tmp_path, monkeypatch, compression):
    from hf_prune import modeling

    pruned("bert", 0.5).save_pretrained(tmp_path, compression=compression)
    other = pruned("bert", 0.9)  # another run's save into the same folder, between the masks and the weights read
    load_dense = modeling.load_dense

    def racing_save(*args, **kwargs):
        other.save_pretrained(tmp_path, compression=compression)
        return load_dense(*args, **kwargs)

    monkeypatch.setattr(modeling, "load_dense", racing_save)
    with pytest.raises(ValueError, match="changed while the folder was being loaded .* Load it again"):
        PrunedModel.from_pretrained(tmp_path)
    monkeypatch.setattr(modeling, "load_dense", load_dense)
    assert_same(other, PrunedModel.from_pretrained(tmp_path))


def test_a_compressed_folder_holds_one_name_of_a_tied_group_and_fails_without_it(tmp_path):
    original = pruned("gpt2")
    original.save_pretrained(tmp_path, compression="sparse")
    path = str(tmp_path / COMPRESSED_WEIGHTS_NAME)
    stored = load_file(path)
    assert "transformer.wte.weight" in stored and "lm_head.weight" not in stored  # tied: saved once
    loaded = PrunedModel.from_pretrained(tmp_path)
    assert_same(original, loaded)
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.transformer.wte.weight.data_ptr()
    forget_file_records(tmp_path)
    save_file({n: t for n, t in stored.items() if n != "transformer.wte.weight"}, path,
              metadata=safetensors_metadata(path))
    with pytest.raises(ValueError, match=r"weights the folder lacks .*'transformer\.wte\.weight'"):
        PrunedModel.from_pretrained(tmp_path)  # nothing of the group left: it would stay random


def test_a_compressed_folder_loads_with_from_pretrained_options(tmp_path):
    original = pruned("t5")
    original.save_pretrained(tmp_path, compression="sparse")
    loaded = PrunedModel.from_pretrained(tmp_path, dtype="float16", attn_implementation="eager")
    dtypes = {n: p.dtype for n, p in loaded.model.named_parameters()}
    assert dtypes["encoder.block.0.layer.0.SelfAttention.q.weight"] == torch.float16
    assert dtypes["encoder.block.0.layer.1.DenseReluDense.wo.weight"] == torch.float32  # T5 keeps wo in fp32
    assert loaded.model.config._attn_implementation == "eager"
    params = dict(original.model.named_parameters())
    for name, mask in loaded.masks.items():
        assert torch.equal(mask, original.masks[name])
        assert torch.equal(dict(loaded.model.named_parameters())[name], params[name].to(dtypes[name])), name


@pytest.mark.parametrize("compression", [None, "sparse"])
def test_subfolder_loads_the_save_inside_it_not_the_one_beside(tmp_path, compression):
    pruned("bert", 0.2).save_pretrained(tmp_path, compression=compression)  # another save in the root
    inner = pruned("bert", 0.8)
    inner.save_pretrained(tmp_path / "sub", compression=compression)
    loaded = PrunedModel.from_pretrained(tmp_path, subfolder="sub")
    assert loaded.sparsity_report().overall == pytest.approx(0.8, abs=1e-3)
    assert_same(inner, loaded)


@pytest.mark.parametrize("compression", [None, "sparse", "deep"])
def test_a_bf16_model_reloads_as_bf16(tmp_path, compression):
    original = pruned("bert")
    original.model.to(torch.bfloat16)
    original.save_pretrained(tmp_path, compression=compression)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = PrunedModel.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    if compression == "deep":  # the kept weights' shared values
        assert_deep_round_trip(original, loaded)
    else:
        assert_same(original, loaded)


def test_masks_follow_the_weights_to_another_device_and_dtype():
    model = tiny_bert()
    pruner = Pruner(model, PruningConfig(schedule="oneshot", final_sparsity=0.5))
    pruner.prune_to(0.5)
    pruned = PrunedModel(model, pruner.masks)
    assert pruned.half() is pruned and {m.dtype for m in pruned.masks.values()} == {torch.bool}
    pruned.to("meta")  # the device a CPU-only machine can move to
    assert {m.device.type for m in pruned.masks.values()} == {"meta"}
    assert {p.device.type for p in pruned.model.parameters()} == {"meta"}


def test_wraps_a_compiled_model_under_its_own_parameter_names():
    model = tiny_bert()
    pruner = Pruner(model, PruningConfig(schedule="oneshot", final_sparsity=0.5))
    pruner.prune_to(0.5)
    masks = {name: mask.clone() for name, mask in pruner.masks.items()}
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(1.0)  # pruned positions are no longer zero
    PrunedModel(torch.compile(model), masks)  # parameters named `_orig_mod.<name>`
    weights = dict(model.named_parameters())
    assert all(torch.equal(weights[name] != 0, mask) for name, mask in masks.items())


@pytest.mark.parametrize("compression", [None, "sparse", "deep"])
def test_a_compiled_model_saves_as_the_model_it_compiled(tmp_path, compression):
    original = pruned("bert")
    PrunedModel(torch.compile(original.model), original.masks, original.pruning_config).save_pretrained(
        tmp_path, compression=compression)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    assert (tmp_path / "README.md").read_text().count("# Pruned BertForSequenceClassification") == 1
    loaded = PrunedModel.from_pretrained(tmp_path)
    if compression == "deep":  # the kept weights' shared values
        assert_deep_round_trip(original, loaded)
    else:
        assert_same(original, loaded)


def test_masks_from_zeros_refuses_targeted_weights_the_folder_lacks_and_allows_a_new_head(tmp_path):
    from safetensors.torch import load_file, save_file

    original = pruned("bert", 0.6)
    original.model.save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    config.num_labels = 5  # a new head: initialised afresh, not a target
    loaded = PrunedModel.from_pretrained(tmp_path, masks_from_zeros=True, config=config, ignore_mismatched_sizes=True)
    assert all(torch.equal(loaded.masks[n], m) for n, m in original.masks.items())
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["bert.encoder.layer.1.intermediate.dense.weight"]  # its random init would read as "nothing pruned"
    save_file(weights, str(tmp_path / "model.safetensors"), {"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks .*'bert\.encoder\.layer\.1\.intermediate\.dense\.weight'"):
        PrunedModel.from_pretrained(tmp_path, masks_from_zeros=True)
    (tmp_path / "model.safetensors").write_bytes(b"\x10" + bytes(7) + b'{"not a header')
    with pytest.raises(ValueError, match="a weights file cannot be read"):
        PrunedModel.from_pretrained(tmp_path, masks_from_zeros=True)


def test_an_attribute_of_the_wrapped_model_is_not_forwarded_and_the_error_says_where_it_is():
    wrapped = pruned("bert")
    with pytest.raises(AttributeError, match=r"no attribute 'bert'; it is the wrapped model's: use pruned\.model\.bert"):
        wrapped.bert
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'$"):
        wrapped.nonexistent
    assert wrapped.config is wrapped.model.config and not hasattr(wrapped, "num_parameters")


def test_a_variant_of_an_earlier_save_is_removed_and_one_copied_in_is_refused(tmp_path):
    old, new = pruned("bert", 0.5), pruned("bert", 0.9)
    old.save_pretrained(tmp_path / "old", variant="fp16")
    assert_same(old, PrunedModel.from_pretrained(tmp_path / "old", variant="fp16"))
    shutil.copytree(tmp_path / "old", tmp_path / "out")
    new.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "model.fp16.safetensors").exists()
    shutil.copy(tmp_path / "old" / "model.fp16.safetensors", tmp_path / "out")
    for kwargs in ({}, {"variant": "fp16"}):
        with pytest.raises(ValueError, match="model.fp16.safetensors is not part of the save that .* records"):
            PrunedModel.from_pretrained(tmp_path / "out", **kwargs)


@pytest.mark.parametrize("compression", [None, "sparse", "deep"])
def test_a_config_object_is_used_as_transformers_uses_it(tmp_path, compression):
    original = pruned("bert")
    original.save_pretrained(tmp_path, compression=compression)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    config.output_hidden_states = True
    loaded = PrunedModel.from_pretrained(tmp_path, config=config)
    assert loaded.model.config.output_hidden_states and config is not loaded.model.config
    assert loaded.masks.keys() == original.masks.keys()
    outputs = loaded(input_ids=torch.tensor([[1, 2, 3]]))
    assert len(outputs.hidden_states) == original.model.config.num_hidden_layers + 1


def test_output_loading_info_is_refused(tmp_path):
    pruned("bert").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`output_loading_info` is not an option"):
        PrunedModel.from_pretrained(tmp_path, output_loading_info=True)


CUSTOM_CONFIG = '''
from transformers import PretrainedConfig


class TinyRemoteConfig(PretrainedConfig):
    model_type = "tiny-remote"

    def __init__(self, hidden=8, **kwargs):
        self.hidden = hidden
        super().__init__(**kwargs)
'''
CUSTOM_MODEL = '''
import torch
from transformers import PreTrainedModel
from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteModel(PreTrainedModel):
    config_class = TinyRemoteConfig

    def __init__(self, config):
        super().__init__(config)
        self.dense = torch.nn.Linear(config.hidden, config.hidden)
        self.post_init()

    def forward(self, x):
        return self.dense(x)
'''


@pytest.mark.parametrize("compression", [None, "sparse"])
def test_a_custom_code_model_loads_with_trust_remote_code(tmp_path, compression):
    code = tmp_path / "code"
    code.mkdir()
    (code / "configuration_tiny_remote.py").write_text(CUSTOM_CONFIG)
    (code / "modeling_tiny_remote.py").write_text(CUSTOM_MODEL)
    (code / "config.json").write_text(json.dumps({"model_type": "tiny-remote", "hidden": 8, "auto_map": {
        "AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
        "AutoModel": "modeling_tiny_remote.TinyRemoteModel"}}))
    model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(code, trust_remote_code=True),
                                               trust_remote_code=True)
    with torch.no_grad():
        model.dense.weight[:4] = 0
    original = PrunedModel(model, {"dense.weight": model.dense.weight != 0})
    original.save_pretrained(tmp_path / "out", compression=compression)
    loaded = PrunedModel.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert type(loaded.model).__name__ == "TinyRemoteModel"
    assert_same(original, loaded)


@pytest.mark.parametrize("compression", ["sparse", "deep"])
def test_a_compressed_folder_refuses_masks_of_another_save_even_without_the_files_record(tmp_path, compression):
    first = pruned("bert", 0.7)
    first.save_pretrained(tmp_path / "a", compression=compression)
    model = TINY_MODELS["bert"]()  # the second save: every layer keeps as many weights, at other positions
    PrunedModel(model, {name: mask.roll(1, dims=-1) for name, mask in first.masks.items()},
                first.pruning_config).save_pretrained(tmp_path / "b", compression=compression)
    record = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    del record["files"]  # an older save, or one whose record the user deleted
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(record))
    shutil.copy(tmp_path / "b" / MASKS_NAME, tmp_path / "a" / MASKS_NAME)
    with pytest.raises(ValueError, match="differs from the checksum the file records .*the folder mixes two saves"):
        PrunedModel.from_pretrained(tmp_path / "a")
