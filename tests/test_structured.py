"""Structured pruning: whole neurons and heads (`PruningConfig.structure`), `PrunedModel.shrink`, and bad input."""

import dataclasses

import pytest
import torch
from conftest import (
    TINY_MODELS,
    TinyClassificationDataset,
    TinyLMDataset,
    tiny_bart,
    tiny_bert,
    tiny_llama,
    tiny_t5,
)
from testing_utils import ZeroChecker, tiny_training_args, train_until_first_checkpoint
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    DiffLlamaConfig,
    DiffLlamaForCausalLM,
    DistilBertConfig,
    Glm4Config,
    GlmConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Olmo2Config,
    Phi3Config,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
)

from hf_prune import (
    MagnitudePruningCallback,
    PrunedModel,
    Pruner,
    PruningConfig,
    RegularizationCallback,
    drop_layers,
    sparsity_report,
)
from hf_prune.structured.selection import group_view
from hf_prune.structured.units import find_units


AUTO = {"bert": AutoModelForSequenceClassification, "gpt2": AutoModelForCausalLM, "llama": AutoModelForCausalLM,
        "t5": AutoModelForSeq2SeqLM, "bart": AutoModelForSeq2SeqLM}
#: (kind, number of units, groups per unit) of each tiny model: neurons are its intermediate size, heads its
#: (key/value) heads.
UNITS = {"bert": {"neurons": (2, 37), "heads": (2, 4)}, "gpt2": {"neurons": (2, 128), "heads": (2, 4)},
         "llama": {"neurons": (2, 37), "heads": (2, 2)}, "t5": {"neurons": (4, 37), "heads": (6, 4)},
         "bart": {"neurons": (4, 37), "heads": (6, 4)}}
#: Structures whose shrunk model a standard config expresses.
SHRINKABLE = {"bert": "neurons", "gpt2": "neurons", "t5": "neurons", "bart": "neurons", "llama": ["neurons", "heads"]}


def inputs_for(kind: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "decoder_input_ids": ids[:, :5]} if kind in ("t5", "bart") else {"input_ids": ids}


def batch_for(kind: str) -> dict[str, torch.Tensor]:
    """One training batch (labels included) of the tiny model `kind`."""
    ids = inputs_for(kind)["input_ids"]
    labels = {"bert": torch.tensor([0, 1]), "t5": ids[:, :5].clone(), "bart": ids[:, :5].clone()}.get(kind, ids)
    return {"input_ids": ids, "labels": labels}


def assert_whole_groups(pruner: Pruner) -> None:
    """Every group of every unit is kept or pruned in all its member entries, biases included."""
    for unit in pruner.units:
        states = [group_view(pruner.masks[m.name], m, unit.num_groups) for m in unit.members]
        kept = states[0].all(1)
        for member, state in zip(unit.members, states):
            assert torch.equal(state.all(1), kept) and torch.equal(state.any(1), kept), member.name
            if member.bias is not None:
                bias = pruner.bias_params[member.bias].detach()
                positions = group_view(bias, member.__class__(member.name, member.module_name, 0, member.offset,
                                                              member.width), unit.num_groups)
                assert (positions[~kept] == 0).all(), member.bias


def tiny_fused_ffn(config_class: type) -> torch.nn.Module:
    """A tiny decoder whose gate and up projections are one Linear (`gate_up_proj`, gate half first), with heads of
    8 (Phi3Config has no `head_dim` field: its model code derives 32 / 4)."""
    torch.manual_seed(0)
    head_dim = {} if config_class is Phi3Config else {"head_dim": 8}
    return AutoModelForCausalLM.from_config(config_class(
        vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, **head_dim))


def tiny_phi3() -> torch.nn.Module:
    return tiny_fused_ffn(Phi3Config)


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_units_are_found_for_every_architecture(kind):
    units = find_units(TINY_MODELS[kind](), ("neurons", "heads"))
    for structure, (count, groups) in UNITS[kind].items():
        found = [u for u in units if u.kind == structure]
        assert len(found) == count and {u.num_groups for u in found} == {groups}, structure


@pytest.mark.parametrize("scheme", ["class-uniform", "class-blind"])
@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_prune_to_removes_whole_groups_exactly(kind, criterion, scheme):
    model = TINY_MODELS[kind]().eval()
    structure = ["neurons", "heads"]
    pruner = Pruner(model, PruningConfig(structure=structure, scheme=scheme, schedule="oneshot", final_sparsity=0.5,
                                         criterion=criterion))
    if criterion == "wanda":
        pruner.estimate_fisher(model, [batch_for(kind)])
    pruner.prune_to(0.5)
    assert_whole_groups(pruner)
    for structure_kind in structure:
        units = [u for u in pruner.units if u.kind == structure_kind]
        pruned = [int((~group_view(pruner.masks[u.members[0].name], u.members[0], u.num_groups).any(1)).sum())
                  for u in units]
        total = sum(u.num_groups for u in units)
        if scheme == "class-uniform":
            assert pruned == [round(0.5 * u.num_groups) for u in units], structure_kind
        else:  # exact to one group over the whole model
            assert abs(sum(pruned) - 0.5 * total) <= 0.5, structure_kind
    params = dict(model.named_parameters())
    assert all((params[n].detach()[~m] == 0).all() for n, m in pruner.masks.items())


def test_magnitude_ranks_neurons_by_their_l2_norm():
    model = tiny_bert()
    pruner = Pruner(model, PruningConfig(structure="neurons", scheme="class-uniform", schedule="oneshot",
                                         final_sparsity=0.25))
    unit = pruner.units[0]
    up, down = unit.members
    params = dict(model.named_parameters())
    norms = params[up.name].detach().square().sum(1) + params[down.name].detach().square().sum(0)
    expected = set(torch.sort(norms, stable=True).indices[:round(0.25 * unit.num_groups)].tolist())
    every = {u.members[0].name: params[u.members[0].name].detach().square().sum(1)
             + params[u.members[1].name].detach().square().sum(0) for u in pruner.units}
    pruner.prune_to(0.25)
    pruned = set((~pruner.masks[up.name].any(1)).nonzero().view(-1).tolist())
    assert pruned == expected
    # the logged threshold is the highest L2 norm pruned, over every layer's feed-forward block
    highest = max(float(norms[~pruner.masks[name].any(1)].max()) for name, norms in every.items())
    assert pruner.thresholds["threshold/neurons"] == pytest.approx(highest ** 0.5, rel=1e-5)
    pruner.prune_to(0.25)  # nothing new to prune: the threshold stays
    assert pruner.thresholds["threshold/neurons"] == pytest.approx(highest ** 0.5, rel=1e-5)


@pytest.mark.parametrize("model, dataset, structure", [
    (tiny_bert, TinyClassificationDataset, "neurons"), (tiny_bert, TinyClassificationDataset, "heads"),
    (tiny_bert, TinyClassificationDataset, ["neurons", "heads"]),
    (tiny_phi3, TinyLMDataset, ["neurons", "heads"]),  # fused gate_up_proj, qkv_proj
], ids=["bert-neurons", "bert-heads", "bert-both", "phi3-both"])
def test_trainer_keeps_structured_masks_exactly_zero_and_resumes_to_the_same_masks(tmp_path, model, dataset,
                                                                                   structure):
    config = PruningConfig(structure=structure, scheme="class-uniform", schedule="iterative", initial_sparsity=0.25,
                           final_sparsity=0.5, start_step=1, end_step=7, pruning_frequency=3, criterion="obd",
                           fisher_steps=1)

    def trainer(output: str, callbacks):
        return Trainer(model=model(), args=tiny_training_args(tmp_path / output, max_steps=10, save_steps=4,
                                                              save_strategy="steps"),
                       train_dataset=dataset(96), callbacks=callbacks)

    full = MagnitudePruningCallback(config)
    checker = ZeroChecker(full)
    trainer("full", [full, checker]).train()
    assert not checker.violations and checker.sparsity_by_step[10] == pytest.approx(full.pruner.sparsity())
    assert_whole_groups(full.pruner)
    assert full.pruner.target_sparsity == 0.5

    first = MagnitudePruningCallback(config)
    checkpoint = train_until_first_checkpoint(trainer("resumed", [first]))
    resumed = MagnitudePruningCallback(config)
    trainer("resumed", [resumed]).train(resume_from_checkpoint=checkpoint)
    assert all(torch.equal(resumed.masks[n], m) for n, m in full.masks.items())


def test_seq2seq_trainer_prunes_t5_neurons(tmp_path):
    callback = MagnitudePruningCallback(PruningConfig(structure="neurons", scheme="class-uniform", schedule="oneshot",
                                                      final_sparsity=0.5, start_step=2))
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
                                    learning_rate=5e-3, report_to="none", use_cpu=True, save_strategy="no",
                                    disable_tqdm=True)
    model = tiny_t5()
    Seq2SeqTrainer(model=model, args=args, train_dataset=TinyLMDataset(32), callbacks=[callback]).train()
    assert_whole_groups(callback.pruner)
    small = PrunedModel(model, callback.masks, callback.config).shrink()
    assert small.config.d_ff == 37 - round(0.5 * 37)


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_shrink_round_trips_through_plain_from_pretrained_with_equal_outputs(tmp_path, kind):
    model = TINY_MODELS[kind]().eval()
    config = PruningConfig(structure=SHRINKABLE[kind], scheme="class-uniform", schedule="oneshot",
                           final_sparsity=0.5)
    pruner = Pruner(model, config)
    pruner.prune_to(0.5)
    small = PrunedModel(model, pruner.masks, config).shrink().eval()
    small.save_pretrained(tmp_path)
    loaded = AUTO[kind].from_pretrained(tmp_path).eval()
    for name, tensor in small.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        expected = model(**inputs_for(kind), output_hidden_states=True)
        actual = loaded(**inputs_for(kind), output_hidden_states=True)
    assert (expected.logits - actual.logits).abs().max() <= 1e-4
    hidden = "decoder_hidden_states" if kind in ("t5", "bart") else "hidden_states"
    for want, got in zip(getattr(expected, hidden), getattr(actual, hidden)):
        assert (want - got).abs().max() <= 1e-4


def test_shrink_of_llama_heads_keeps_grouped_query_attention_standard(tmp_path):
    model = tiny_llama().eval()
    config = PruningConfig(structure="heads", scheme="class-uniform", schedule="oneshot", final_sparsity=0.5)
    pruner = Pruner(model, config)
    pruner.prune_to(0.5)
    small = PrunedModel(model, pruner.masks, config).shrink()
    assert (small.config.num_key_value_heads, small.config.num_attention_heads, small.config.head_dim) == (1, 2, 8)
    small.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_attention_heads == 2
    assert loaded.state_dict().keys() == small.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in small.state_dict().items())
    ids = inputs_for("llama")["input_ids"]
    with torch.no_grad():
        assert (model(ids).logits - loaded(ids).logits).abs().max() <= 1e-4


def test_distilbert_neurons_shrink_and_blocks_drop_to_standard_models(tmp_path, caplog):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(DistilBertConfig(
        vocab_size=99, dim=32, hidden_dim=37, n_layers=3, n_heads=4, max_position_embeddings=64)).eval()
    config = PruningConfig(structure="neurons", scheme="class-uniform", schedule="oneshot", final_sparsity=0.5)
    pruner = Pruner(model, config)
    assert len(pruner.units) == 3 and all(u.members[0].name.endswith("ffn.lin1.weight") for u in pruner.units)
    pruner.prune_to(0.5)
    with caplog.at_level("WARNING", logger="hf_prune.pruner"):  # DistilBertConfig derives the head size
        assert len(Pruner(model, PruningConfig(structure="heads", schedule="oneshot", final_sparsity=0.5)).units) == 3
    assert "shrink() cannot remove pruned heads" in caplog.text
    ids = inputs_for("bert")["input_ids"]
    for small, width, blocks in ((PrunedModel(model, pruner.masks, config).shrink(), 37 - round(0.5 * 37), 3),
                                 (drop_layers(model, [1]), 37, 2)):
        small.save_pretrained(tmp_path / str(blocks))
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / str(blocks)).eval()
        assert (loaded.config.hidden_dim, loaded.config.n_layers) == (width, blocks)
        assert all(torch.equal(loaded.state_dict()[n], t) for n, t in small.state_dict().items())
        if blocks == 3:
            with torch.no_grad():
                assert (model(ids).logits - loaded(ids).logits).abs().max() <= 1e-5


def test_shrink_keeps_dtypes_and_what_lives_beside_the_weights(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)  # rotary buffer stays fp32
    model.model.embed_tokens.weight.requires_grad_(False)
    model.activation_checkpointing_enable()
    model.generation_config.num_beams = 3
    model.train().model.layers[0].eval()  # one block in eval mode, the rest training
    config = PruningConfig(structure="neurons", scheme="class-uniform", schedule="oneshot", final_sparsity=0.5)
    pruner = Pruner(model, config)
    pruner.prune_to(0.5)
    rng = torch.random.get_rng_state()
    small = PrunedModel(model, pruner.masks, config).shrink()
    assert torch.equal(torch.random.get_rng_state(), rng)  # built on the meta device: nothing drawn at random
    assert small.model.rotary_emb.inv_freq.dtype == torch.float32
    assert {p.dtype for p in small.parameters()} == {torch.bfloat16}
    assert not small.model.embed_tokens.weight.requires_grad and small.lm_head.weight.requires_grad
    assert all(block.gradient_checkpointing for block in small.model.layers)
    assert [m.training for m in small.modules()] == [m.training for m in model.modules()]
    assert small.generation_config.num_beams == 3
    with torch.no_grad():
        ids = inputs_for("llama")["input_ids"]
        assert (model.eval()(ids).logits - small.eval()(ids).logits).abs().max() <= 1e-2  # bf16


@pytest.mark.parametrize("config, message", [
    (dict(structure="heads"), "derives the head size"),  # BERT: head size = hidden / heads
    (dict(structure="neurons", scheme="class-blind"), "scheme='class-uniform'"),
    (dict(structure="unstructured"), "structure"),
    (dict(structure="neurons", exclude_modules=["layer.1.intermediate.dense"]),
     r"1 blocks left out of pruning \(`exclude_modules`\), such as bert\.encoder\.layer\.1"),
])
def test_shrink_that_cannot_be_expressed_is_a_value_error_and_changes_nothing(config, message):
    model = tiny_bert()
    pruning = PruningConfig(**{"scheme": "class-uniform", "schedule": "oneshot", "final_sparsity": 0.5, **config})
    pruner = Pruner(model, pruning)
    pruner.prune_to(0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if pruning.scheme == "class-blind":  # make the layers' widths differ
        unit = pruner.units[0]
        pruner.masks[unit.members[0].name][:3] = False
        pruner.masks[unit.members[1].name][:, :3] = False
        pruner.apply_()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        PrunedModel(model, pruner.masks, pruning).shrink()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("structure, scheme, sparsity, message", [
    ("heads", "class-uniform", 0.8, r"`final_sparsity` 0.8 .* leaves less than one of the 2 \(key/value\) heads of "
                                    r"every block.*at most 1/2 \(0.5\)"),
    # below the last group: the rounding reached 0.5 at 0.6 (and 36/37 at 0.98), and the message said "at most"
    ("heads", "class-uniform", 0.6, r"`final_sparsity` 0.6 .* leaves less than one of the 2 \(key/value\) heads"),
    ("neurons", "class-uniform", 0.98, r"`final_sparsity` 0.98 .* leaves less than one of the 37 neurons of every "
                                       r"block.*at most 36/37 \(0.973\)"),
    ("heads", "class-blind", 0.9, r"`final_sparsity` 0.9 with scheme='class-blind' prunes all \(key/value\) heads of "
                                  r"the model.*at most 0.875"),
    ("neurons", "class-blind", 0.998, r"0.998 with scheme='class-blind' prunes all neurons of the model .*at most "
                                      r"0.9966"),
])
def test_a_target_that_prunes_every_neuron_or_head_is_refused_before_training(structure, scheme, sparsity, message):
    model = tiny_llama() if structure == "heads" else tiny_t5()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        Pruner(model, PruningConfig(structure=structure, scheme=scheme, schedule="oneshot", final_sparsity=sparsity))
    pruner = Pruner(model, PruningConfig(structure=structure, scheme=scheme, schedule="oneshot", final_sparsity=0.5))
    with pytest.raises(ValueError, match=message.replace("`final_sparsity`", "`sparsity`")):
        pruner.prune_to(sparsity)
    assert all(bool(mask.all()) for mask in pruner.masks.values())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_shrink_after_sparse_inference_says_to_restore_the_dense_layers():
    model = tiny_llama()
    pruning = PruningConfig(structure="neurons", scheme="class-uniform", schedule="oneshot", final_sparsity=0.5)
    pruner = Pruner(model, pruning)
    pruner.prune_to(0.5)
    pruned = PrunedModel(model, pruner.masks, pruning)
    pruned.to_sparse_inference(kernel="sparse")
    with pytest.raises(ValueError, match="converted by to_sparse_inference.*restore_dense_layers"):
        pruned.shrink()


def test_shrink_with_every_head_pruned_is_a_value_error():
    model = tiny_llama()
    pruning = PruningConfig(structure="heads", scheme="class-uniform", schedule="oneshot", final_sparsity=0.5)
    pruner = Pruner(model, pruning)
    for unit in pruner.units:  # every key/value group of every layer
        for member in unit.members:
            pruner.masks[member.name].fill_(False)
    pruner.apply_()
    with pytest.raises(ValueError, match="Every attention head of every layer is pruned"):
        PrunedModel(model, pruner.masks, pruning).shrink()


def test_shrink_with_every_neuron_pruned_is_a_value_error():
    model = tiny_t5()  # T5 cannot even initialise a feed-forward block of width 0
    pruning = PruningConfig(structure="neurons", scheme="class-uniform", schedule="oneshot", final_sparsity=0.5)
    pruner = Pruner(model, pruning)
    for unit in pruner.units:
        for member in unit.members:
            pruner.masks[member.name].fill_(False)
    pruner.apply_()
    with pytest.raises(ValueError, match=r"Every feed-forward neuron of every layer is pruned \(d_ff=0\)"):
        PrunedModel(model, pruner.masks, pruning).shrink()


def test_shrink_to_heads_the_config_refuses_is_a_value_error_not_a_model_that_cannot_be_saved():
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4))
    pruning = PruningConfig(structure="heads", scheme="class-uniform", schedule="oneshot", final_sparsity=0.25)
    pruner = Pruner(model, pruning)
    pruner.prune_to(0.25)  # 3 heads of 8 left: hidden_size 32 is not a multiple of 3
    with pytest.raises(ValueError, match=r"num_key_value_heads=3\) is refused by LlamaConfig: .*not a multiple"):
        PrunedModel(model, pruner.masks, pruning).shrink()


@pytest.mark.parametrize("config_class", [Phi3Config, GlmConfig, Glm4Config])
def test_fused_projections_prune_and_shrink_group_by_group(tmp_path, config_class):
    model = tiny_fused_ffn(config_class).eval()
    pruning = PruningConfig(structure=["neurons", "heads"], scheme="class-uniform", schedule="oneshot",
                            final_sparsity=0.5)
    pruner = Pruner(model, pruning)
    pruner.prune_to(0.5)
    assert_whole_groups(pruner)
    neurons = [u for u in pruner.units if u.kind == "neurons"]
    assert len(neurons) == 2 and {u.num_groups for u in neurons} == {37}
    fused = neurons[0].members[0].name
    assert fused.endswith("mlp.gate_up_proj.weight")
    mask = pruner.masks[fused]
    assert torch.equal(mask[:37], mask[37:])  # neuron g: row g of the gate half and row 37 + g of the up half
    kept = mask[:37].any(1)
    assert int((~kept).sum()) == round(0.5 * 37)
    weight = model.get_parameter(fused).detach().clone()
    qkv = "model.layers.0.self_attn.qkv_proj.weight"  # Phi-3: 4 query heads, then 2 key, then 2 value heads of 8
    if config_class is Phi3Config:
        kv_kept = pruner.masks[qkv][32::8].any(1)[:2]
        assert int(kv_kept.sum()) == 1 and torch.equal(pruner.masks[qkv][48::8].any(1), kv_kept)
        slices = [model.get_parameter(qkv).detach()[start:start + 2 * width].view(2, width, 32)[kv_kept]
                  for start, width in ((0, 16), (32, 8), (48, 8))]
    small = PrunedModel(model, pruner.masks, pruning).shrink().eval()
    small.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.intermediate_size == 37 - round(0.5 * 37)
    assert (loaded.config.num_attention_heads, loaded.config.num_key_value_heads, loaded.config.head_dim) == (2, 1, 8)
    assert torch.equal(loaded.get_parameter(fused), torch.cat([weight[:37][kept], weight[37:][kept]]))
    if config_class is Phi3Config:  # the kept query heads, then the kept key head, then the kept value head
        assert torch.equal(loaded.get_parameter(qkv), torch.cat([part.reshape(-1, 32) for part in slices]))
    for name, tensor in small.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        expected = model(**inputs_for("llama"), output_hidden_states=True)
        actual = loaded(**inputs_for("llama"), output_hidden_states=True)
    assert (expected.logits - actual.logits).abs().max() <= 1e-4
    for want, got in zip(expected.hidden_states, actual.hidden_states):
        assert (want - got).abs().max() <= 1e-4


def tiny_diffllama():
    return DiffLlamaForCausalLM(DiffLlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8))


def tiny_olmo2():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(Olmo2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2))


@pytest.mark.parametrize("model, warned", [(tiny_bert, True), (tiny_t5, True), (tiny_llama, False),
                                           (tiny_phi3, False),
                                           (tiny_diffllama, True), (tiny_olmo2, True)])
def test_head_pruning_that_shrink_cannot_remove_is_told_when_the_pruner_is_built(model, warned, caplog):
    with caplog.at_level("WARNING", logger="hf_prune.pruner"):
        Pruner(model(), PruningConfig(structure="heads", scheme="class-uniform", schedule="oneshot", final_sparsity=0.5))
    assert ("shrink() cannot remove pruned heads" in caplog.text) is warned


@pytest.mark.parametrize("scheme, warned", [("class-blind", True), ("class-uniform", False)])
def test_a_scheme_that_gives_layers_different_widths_is_told_before_training(scheme, warned, caplog):
    # shrink() refuses such a model only after training: the warning comes when the pruner is built
    with caplog.at_level("WARNING", logger="hf_prune.pruner"):
        Pruner(tiny_llama(), PruningConfig(structure="neurons", scheme=scheme, schedule="oneshot", final_sparsity=0.5))
    assert ("shrink() will refuse the model. Use scheme='class-uniform'" in caplog.text) is warned


@pytest.mark.parametrize("model, exclude, warned", [
    (tiny_bert, ["layer.1.intermediate.dense"], True),  # layer 1 keeps intermediate_size beside a pruned layer 0
    (tiny_t5, r".*decoder.*", True),  # T5's decoder shares d_ff with the encoder
    (tiny_bart, r".*decoder.*", False),  # BART's decoder has its own decoder_ffn_dim
])
def test_blocks_left_out_at_full_width_are_told_before_training(model, exclude, warned, caplog):
    pruning = PruningConfig(structure="neurons", scheme="class-uniform", schedule="oneshot", final_sparsity=0.5,
                            exclude_modules=exclude)
    with caplog.at_level("WARNING", logger="hf_prune.pruner"):
        pruner = Pruner(model(), pruning)
    assert ("blocks left out of pruning (`exclude_modules`)" in caplog.text) is warned
    pruner.prune_to(0.5)
    if warned:  # the warning says what shrink() does at the end
        with pytest.raises(ValueError, match=r"blocks left out of pruning \(`exclude_modules`\)"):
            PrunedModel(pruner.module, pruner.masks, pruning).shrink()
    else:
        small = PrunedModel(pruner.module, pruner.masks, pruning).shrink()
        assert (small.config.encoder_ffn_dim, small.config.decoder_ffn_dim) == (19, 37)  # 37 - round(0.5 x 37)


def test_shrink_refuses_the_heads_of_a_model_that_pairs_them_by_position():
    model = tiny_diffllama()
    pruning = PruningConfig(structure="heads", scheme="class-uniform", schedule="oneshot", final_sparsity=0.5)
    pruner = Pruner(model, pruning)
    pruner.prune_to(0.5)
    with pytest.raises(ValueError, match="DiffLlamaConfig pairs its attention heads by position"):
        PrunedModel(model, pruner.masks, pruning).shrink()


def test_shrink_refuses_the_heads_of_a_model_with_a_norm_across_them():
    model = tiny_olmo2()  # q_norm / k_norm: an RMSNorm over the whole query / key, all heads together
    pruning = PruningConfig(structure="heads", scheme="class-uniform", schedule="oneshot", final_sparsity=0.5)
    pruner = Pruner(model, pruning)
    pruner.prune_to(0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"Olmo2Config has model\.layers\.0\.self_attn\.q_norm\.weight \(32,\), sized "
                                         r"by all the heads of its layer .* shrink\(\) cannot remove pruned heads"):
        PrunedModel(model, pruner.masks, pruning).shrink()  # it failed on the new model's shapes, saying nothing
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("sparsity, warned", [(0.25, True), (0.5, False)])
def test_a_class_uniform_target_between_whole_heads_is_told_what_it_reaches(sparsity, warned, caplog):
    with caplog.at_level("WARNING", logger="hf_prune.pruner"):  # 2 key/value heads a block: 0.25 rounds to none
        pruner = Pruner(tiny_llama(), PruningConfig(structure="heads", scheme="class-uniform", schedule="oneshot",
                                                    final_sparsity=sparsity))
    message = ("`final_sparsity` 0.25 with scheme='class-uniform' prunes 0.0000 of the heads' weights: every block "
               "loses round(0.25 x n) of its n = 2 groups")
    assert (message in caplog.text) is warned
    pruner.prune_to(sparsity)
    assert pruner.sparsity() == pytest.approx(0.0 if warned else 0.5)


def test_partly_pruned_groups_cannot_shrink():
    model = tiny_bert()
    config = PruningConfig(structure="neurons", scheme="class-uniform", schedule="oneshot", final_sparsity=0.5)
    pruner = Pruner(model, config)
    pruner.prune_to(0.5)
    masks = {n: m.clone() for n, m in pruner.masks.items()}
    name = pruner.units[0].members[0].name
    masks[name][masks[name].any(1).nonzero()[0], 0] = False  # one entry of a kept neuron
    with pytest.raises(ValueError, match="not whole ones"):
        PrunedModel(model, masks, config).shrink()


class NoAttention(torch.nn.Module):
    """Linear layers inside indexed blocks, but no attention: no heads to find."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(4, 4)) for _ in range(2)])


@pytest.mark.parametrize("model, config, message", [
    (NoAttention, dict(structure="heads"), "no attention heads found"),
    (NoAttention, dict(structure="neurons"), "no feed-forward blocks found"),
    (tiny_bert, dict(structure="heads", scheme="class-distribution"), "`scheme` must be one of 'class-blind', 'class-uniform' with `structure` 'heads'"),
    (tiny_bert, dict(structure="neurons", target_modules=["query"]), "`target_modules` must be None"),
    (tiny_bert, dict(structure="layers"), "`structure` must be one of"),
    (tiny_bert, dict(structure=["neurons", "neurons"]), "`structure` must be one of"),
    (tiny_bert, dict(structure="neurons", exclude_modules=["nomatch"]), "matches no module"),
    # with both kinds, excluding every attention block left the heads unpruned, silently
    (tiny_llama, dict(structure=["neurons", "heads"], scheme="class-uniform", exclude_modules=["k_proj"]),
     r"`exclude_modules` \['k_proj'\] leaves no 'heads' block of LlamaForCausalLM to prune"),
    (tiny_bert, dict(structure="neurons", prune_head=True), "`prune_head` must be False with `structure` 'neurons'"),
])
def test_bad_structures_raise_before_any_training_step(model, config, message):
    instance = model()
    before = {n: p.detach().clone() for n, p in instance.named_parameters()}
    with pytest.raises(ValueError, match=message):
        Pruner(instance, PruningConfig(**{"schedule": "oneshot", **config}))
    assert all(torch.equal(before[n], p) for n, p in instance.named_parameters())


def test_a_saved_structured_model_reloads_with_its_config_and_shrinks_alike(tmp_path):
    model = tiny_bert().eval()
    config = PruningConfig(structure="neurons", scheme="class-uniform", schedule="oneshot", final_sparsity=0.5)
    pruner = Pruner(model, config)
    pruner.prune_to(0.5)
    PrunedModel(model, pruner.masks, config).save_pretrained(tmp_path / "pruned")
    loaded = PrunedModel.from_pretrained(tmp_path / "pruned")
    assert loaded.pruning_config.structure == "neurons"
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert "whole feed-forward neurons pruned" in card and "PrunedModel.shrink()" in card
    assert "biases are not pruned" not in card
    before, after = PrunedModel(model, pruner.masks, config).shrink(), loaded.shrink()
    assert after.config.intermediate_size == before.config.intermediate_size == 37 - round(0.5 * 37)
    assert all(torch.equal(after.state_dict()[n], t) for n, t in before.state_dict().items())


def test_a_structured_config_selects_the_same_weights_everywhere(tmp_path):
    # The report, the regulariser and masks_from_zeros take the weights a structured pruner masks (the members of
    # its neurons), not the unstructured targets of the same config (which add the attention weights).
    model = tiny_bert().eval()
    config = PruningConfig(structure="neurons", scheme="class-uniform", schedule="oneshot", final_sparsity=0.5)
    pruner = Pruner(model, config)
    pruner.prune_to(0.5)
    report = sparsity_report(model, config=config)
    assert [row.name for row in report.layers] == list(pruner.masks)
    assert report.overall == pytest.approx(pruner.sparsity())
    regularization = RegularizationCallback("l1", config=config)
    regularization.on_train_begin(None, None, None, model=model)
    assert list(regularization.params) == list(pruner.masks)
    model.save_pretrained(tmp_path / "plain")
    loaded = PrunedModel.from_pretrained(tmp_path / "plain", masks_from_zeros=True, pruning_config=config)
    assert loaded.masks.keys() == pruner.masks.keys()
    assert all(torch.equal(loaded.masks[name], mask) for name, mask in pruner.masks.items())


@pytest.mark.parametrize("wrapped_with", [dict(structure=["neurons", "heads"]),
                                          dict(structure="neurons", exclude_modules=None)])
def test_shrink_of_masks_made_under_another_config_is_a_value_error(wrapped_with):
    model = tiny_llama()
    made_with = PruningConfig(structure="neurons", scheme="class-uniform", schedule="oneshot", final_sparsity=0.5,
                              exclude_modules=["layers.0.mlp.up_proj"])
    pruner = Pruner(model, made_with)
    pruner.prune_to(0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruned = PrunedModel(model, pruner.masks, dataclasses.replace(made_with, **wrapped_with))
    with pytest.raises(ValueError, match=r"no mask for \d+ weights of the units to shrink, such as model\.layers\.0\."):
        pruned.shrink()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
