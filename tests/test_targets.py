import pytest
import torch
from conftest import TINY_MODELS, tiny_bert, tiny_gpt2
from transformers import AutoModelForCausalLM, MixtralConfig

from hf_prune import Pruner, PruningConfig
from hf_prune.targets import clean_name, find_targets, unprunable_block_weights, weight_class


EXPECTED_ROLES = {
    "bert": {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "t5": {"SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o", "EncDecAttention.q",
           "EncDecAttention.k", "EncDecAttention.v", "EncDecAttention.o", "DenseReluDense.wi", "DenseReluDense.wo"},
    "bart": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "encoder_attn.q_proj",
             "encoder_attn.k_proj", "encoder_attn.v_proj", "encoder_attn.out_proj", "fc1", "fc2"},
    "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"},
}
EXPECTED_COUNT = {"bert": 12, "gpt2": 8, "t5": 2 * 6 + 2 * 10, "bart": 2 * 6 + 2 * 10, "llama": 14}


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_default_targets_are_the_block_linears_only(kind):
    model = TINY_MODELS[kind]()
    targets = find_targets(model, PruningConfig())
    names = {t.name for t in targets}
    roles = {t.weight_class.split("*.")[-1] for t in targets}
    assert roles == EXPECTED_ROLES[kind]
    embedding_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = dict(model.named_parameters())
    for name in names:
        assert name.endswith(".weight") and params[name].dim() == 2
        assert params[name].data_ptr() not in embedding_ptrs
        assert "embed" not in name and "norm" not in name and "lm_head" not in name
    # every role in each of the 2 layers (T5/BART: encoder without cross-attention, decoder with it)
    assert len(names) == EXPECTED_COUNT[kind]


def test_weight_class_removes_layer_indices():
    assert weight_class("bert.encoder.layer.3.attention.self.query") == "bert.encoder.layer.*.attention.self.query"
    assert weight_class("encoder.block.1.layer.0.SelfAttention.q") == "encoder.block.*.layer.*.SelfAttention.q"
    assert weight_class("bert.encoder.layer.3.attention.self.query", "tensor") == \
        "bert.encoder.layer.3.attention.self.query"


def test_head_is_configurable():
    model = tiny_bert()
    default = {t.module_name for t in find_targets(model, PruningConfig())}
    with_head = {t.module_name for t in find_targets(model, PruningConfig(prune_head=True))}
    assert with_head - default == {"bert.pooler.dense", "classifier"}


def test_tied_lm_head_is_never_a_target():
    model = tiny_gpt2()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    names = {t.name for t in find_targets(model, PruningConfig(prune_head=True))}
    assert "lm_head.weight" not in names


def test_target_and_exclude_modules_follow_peft_matching():
    model = tiny_bert()
    suffixes = find_targets(model, PruningConfig(target_modules=["query", "value"]))
    assert [t.module_name.split(".")[-1] for t in suffixes] == ["query", "value"] * 2
    regex = find_targets(model, PruningConfig(target_modules=r".*layer\.1\..*dense"))
    assert {t.module_name for t in regex} == {"bert.encoder.layer.1.attention.output.dense",
                                              "bert.encoder.layer.1.intermediate.dense",
                                              "bert.encoder.layer.1.output.dense"}
    excluded = find_targets(model, PruningConfig(exclude_modules=["intermediate.dense", "output.dense"]))
    assert {t.module_name.split("layer.")[1][2:] for t in excluded} == {"attention.self.query",
                                                                       "attention.self.key",
                                                                       "attention.self.value"}


@pytest.mark.parametrize(
    "kwargs, field",
    [({"target_modules": ["no_such_layer"]}, "target_modules"),
     ({"target_modules": r"embeddings\..*"}, "target_modules"),
     ({"exclude_modules": "nothing"}, "exclude_modules")],
)
def test_patterns_that_match_nothing_are_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        find_targets(tiny_bert(), PruningConfig(**kwargs))


@pytest.mark.parametrize("field, entries, message", [
    ("target_modules", ["query", "qeury"], r"`target_modules` entry 'qeury' \(of \['query', 'qeury'\]\) matches no"),
    ("exclude_modules", ["output.dense", "typo"], r"`exclude_modules` entry 'typo' \(of \['output.dense', 'typo'\]\)"),
    ("target_modules", ["query", "classifier"], r"entry 'classifier' .* outside them: set prune_head=True"),
])
def test_every_entry_of_a_list_must_match(field, entries, message):
    # a misspelt entry would leave its modules dense, or prune those it was meant to keep
    with pytest.raises(ValueError, match=message):
        find_targets(tiny_bert(), PruningConfig(**{field: entries}))


@pytest.mark.parametrize("structure, member", [("neurons", "intermediate.dense"), ("heads", "attention.self.query")])
def test_every_exclusion_entry_must_match_with_a_structure_too(structure, member):
    from hf_prune.structured.units import units_for

    config = PruningConfig(structure=structure, exclude_modules=[f"layer.0.{member}", f"layr.1.{member}"])
    with pytest.raises(ValueError, match=f"`exclude_modules` entry 'layr.1.{member}' .* matches no module of the"):
        units_for(tiny_bert(), config)


def test_model_without_blocks_is_an_error():
    model = torch.nn.Sequential()
    model.add_module("fc", torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="No weights"):
        find_targets(model, PruningConfig())


@pytest.mark.parametrize("structure", ["unstructured", "neurons"])
def test_quantized_weights_are_refused_by_name_unless_left_out(structure):
    from hf_prune import Pruner

    model = tiny_bert()
    layer = model.bert.encoder.layer[1].intermediate.dense
    layer.weight = torch.nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.uint8), requires_grad=False)
    config = {"structure": structure, "scheme": "class-uniform", "end_step": 4}
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.1\.intermediate\.dense stores its weight as "
                                         r"torch\.uint8 \(1 targeted modules"):
        Pruner(model, PruningConfig(**config))
    pruner = Pruner(model, PruningConfig(**config, exclude_modules=["1.intermediate.dense"]))
    assert pruner.masks and not any("layer.1.intermediate" in n for n in pruner.masks)


@pytest.mark.parametrize("config_cls, roles", [
    ("RobertaConfig", EXPECTED_ROLES["bert"]),
    ("DistilBertConfig", {"attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1",
                          "ffn.lin2"}),
])
def test_roberta_and_distilbert_targets(config_cls, roles):
    import transformers

    kwargs = {"vocab_size": 99, "max_position_embeddings": 64}
    if config_cls == "DistilBertConfig":
        kwargs.update(dim=32, n_layers=2, n_heads=4, hidden_dim=37)
    else:
        kwargs.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    model = transformers.AutoModelForSequenceClassification.from_config(getattr(transformers, config_cls)(**kwargs))
    targets = find_targets(model, PruningConfig())
    assert {t.weight_class.split("*.")[-1] for t in targets} == roles and len(targets) == 2 * len(roles)


@pytest.mark.parametrize("wrapped, plain", [
    ("bert.encoder.layer.0._fsdp_wrapped_module.attention.self.query.weight",
     "bert.encoder.layer.0.attention.self.query.weight"),
    ("_fsdp_wrapped_module.bert.pooler.dense", "bert.pooler.dense"),
    ("_orig_mod.h.1._checkpoint_wrapped_module.mlp.c_fc", "h.1.mlp.c_fc"),
    ("bert.encoder.layer.0.my_fsdp_wrapped_module_x", "bert.encoder.layer.0.my_fsdp_wrapped_module_x"),
])
def test_clean_name_drops_wrapper_levels_only(wrapped, plain):
    assert clean_name(wrapped) == plain


def test_a_tied_head_may_be_named_in_exclude_modules_and_target_modules_says_it_is_tied():
    # GPT-2's lm_head is tied to the input embeddings: never pruned, so excluding it is harmless (a config shared
    # with untied models), and targeting it alone says why nothing matches.
    model = tiny_gpt2()
    assert find_targets(model, PruningConfig(exclude_modules=["lm_head"])) == find_targets(model, PruningConfig())
    with pytest.raises(ValueError, match=r"matches no prunable Linear/Conv1D module .*\(lm_head: tied to an embedding"):
        find_targets(model, PruningConfig(target_modules=["lm_head"]))


def test_a_weight_shared_by_two_layers_is_one_target():
    model = tiny_bert()
    layers = model.bert.encoder.layer
    layers[1].attention.self.query.weight = layers[0].attention.self.query.weight
    names = [t.name for t in find_targets(model, PruningConfig())]
    assert "bert.encoder.layer.0.attention.self.query.weight" in names
    assert "bert.encoder.layer.1.attention.self.query.weight" not in names
    Pruner(model, PruningConfig(schedule="oneshot", final_sparsity=0.5)).prune_to(0.5)  # no FSDP1 error
    assert torch.equal(layers[0].attention.self.query.weight, layers[1].attention.self.query.weight)


def test_matrices_no_linear_layer_holds_are_named_in_a_warning(caplog):
    # transformers v5 fuses MoE experts into 3-D parameters: the default targets cannot cover them
    config = MixtralConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(config)
    assert set(unprunable_block_weights(model)) == {f"model.layers.{i}.mlp.{name}" for i in range(2) for name in
                                                    ("gate.weight", "experts.gate_up_proj", "experts.down_proj")}
    with caplog.at_level("WARNING", logger="hf_prune"):
        Pruner(model, PruningConfig(schedule="oneshot", final_sparsity=0.5))
    assert "6 weight matrices inside the blocks are not nn.Linear / Conv1D layers and are not pruned, such as " \
           "model.layers.0.mlp.experts.gate_up_proj" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_prune"):
        Pruner(tiny_bert(), PruningConfig(schedule="oneshot", final_sparsity=0.5))
    assert "not pruned" not in caplog.text


def test_prune_head_decides_for_target_modules_too():
    # target_modules picks among the block layers, and the layers outside the blocks only with prune_head
    model = tiny_bert()
    inside = {t.name for t in find_targets(model, PruningConfig(target_modules=["dense"]))}
    assert "bert.pooler.dense.weight" not in inside and "bert.encoder.layer.0.output.dense.weight" in inside
    with_head = {t.name for t in find_targets(model, PruningConfig(target_modules=["dense"], prune_head=True))}
    assert with_head == inside | {"bert.pooler.dense.weight"}
    with pytest.raises(ValueError, match=r"inside the Transformer blocks \(it matches \['classifier'\], outside them: "
                                         r"set prune_head=True"):
        find_targets(model, PruningConfig(target_modules=["classifier"]))
    assert [t.name for t in find_targets(model, PruningConfig(target_modules=["classifier"], prune_head=True))] == \
        ["classifier.weight"]
