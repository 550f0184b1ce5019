"""Whole-block removal: `drop_layers` (a standard model with fewer blocks) and `block_influence` (which to drop)."""

import copy

import pytest
import torch
from conftest import TINY_MODELS, tiny_gpt2, tiny_t5
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    DiffLlamaConfig,
    DiffLlamaForCausalLM,
    DynamicCache,
    EncoderDecoderCache,
    ModernBertConfig,
    ModernBertForMaskedLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from hf_prune import PrunedModel, Pruner, PruningConfig, block_influence, drop_layers
from hf_prune.structured.layers import find_stacks


AUTO = {"bert": AutoModelForSequenceClassification, "gpt2": AutoModelForCausalLM, "llama": AutoModelForCausalLM,
        "t5": AutoModelForSeq2SeqLM, "bart": AutoModelForSeq2SeqLM}
#: The stacks of each tiny model with the config key of their length.
STACKS = {"bert": {"bert.encoder.layer": "num_hidden_layers"}, "gpt2": {"transformer.h": "n_layer"},
          "llama": {"model.layers": "num_hidden_layers"},
          "t5": {"encoder.block": "num_layers", "decoder.block": "num_decoder_layers"},
          "bart": {"model.encoder.layers": "encoder_layers", "model.decoder.layers": "decoder_layers"}}


def three_blocks(kind: str) -> nn.Module:
    """The tiny model `kind` with three blocks in every stack."""
    config = TINY_MODELS[kind]().config
    for key in STACKS[kind].values():
        setattr(config, key, 3)
    torch.manual_seed(0)
    return type(TINY_MODELS[kind]())(config).eval()


def inputs_for(kind: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    if kind in ("t5", "bart"):
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :5].clone()}
    return {"input_ids": ids, "attention_mask": mask}


def skipping_blocks(model: nn.Module, kept: dict[str, list[int]]) -> nn.Module:
    """A copy of `model` that runs only the `kept` blocks of each stack: what `drop_layers` must compute."""
    reference = copy.deepcopy(model)
    for name, indices in kept.items():
        parent, _, attr = name.rpartition(".")
        blocks = reference.get_submodule(name)
        setattr(reference.get_submodule(parent) if parent else reference, attr,
                nn.ModuleList([blocks[i] for i in indices]))
        setattr(reference.config, find_stacks(model)[name], len(indices))
    return reference


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_drop_layers_round_trips_through_plain_from_pretrained_with_the_blocks_skipped(tmp_path, kind):
    model = three_blocks(kind)
    assert find_stacks(model) == STACKS[kind]
    small = drop_layers(model, {name: [1] for name in STACKS[kind]}).eval()
    for name, key in STACKS[kind].items():
        assert getattr(small.config, key) == 2 and len(small.get_submodule(name)) == 2
    small.save_pretrained(tmp_path)
    loaded = AUTO[kind].from_pretrained(tmp_path).eval()
    assert loaded.state_dict().keys() == small.state_dict().keys()
    for name, tensor in small.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())
    reference = skipping_blocks(model, {name: [0, 2] for name in STACKS[kind]})
    with torch.no_grad():
        expected = reference(**inputs_for(kind), output_hidden_states=True, use_cache=False)
        actual = loaded(**inputs_for(kind), output_hidden_states=True, use_cache=False)
    assert (expected.logits - actual.logits).abs().max() <= 1e-5
    hidden = "decoder_hidden_states" if kind in ("t5", "bart") else "hidden_states"
    assert len(getattr(actual, hidden)) == 3
    for want, got in zip(getattr(expected, hidden), getattr(actual, hidden)):
        assert (want - got).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_with_the_cache_after_drop_layers_matches_generate_without(kind):
    small = drop_layers(three_blocks(kind), [0, 2]).eval()
    ids = inputs_for(kind)["input_ids"][:1]
    with_cache = small.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
    without = small.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_generate_with_the_cache_after_uneven_drops_in_an_encoder_decoder(kind, caplog):
    encoder, decoder = STACKS[kind]
    with caplog.at_level("WARNING", logger="hf_prune.structured.layers"):
        small = drop_layers(three_blocks(kind), {encoder: [0, 2], decoder: [1]}).eval()
    ids = inputs_for(kind)["input_ids"][:1]
    settings = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
    without = small.generate(ids, use_cache=False, **settings)
    if kind == "t5":  # transformers sizes T5's cache from the encoder's block count
        assert "EncoderDecoderCache(DynamicCache(), DynamicCache())" in caplog.text
        cache = {"cache": EncoderDecoderCache(DynamicCache(), DynamicCache())}
    else:
        assert not caplog.text
        cache = {"use_cache": True}
    assert torch.equal(small.generate(ids, **cache, **settings), without)


def test_drop_layers_keeps_dtypes_and_what_lives_beside_the_weights(tmp_path):
    three_blocks("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()  # rotary buffer stays fp32
    model.model.embed_tokens.weight.requires_grad_(False)
    model.activation_checkpointing_enable()
    model.generation_config.num_beams = 3
    rng = torch.random.get_rng_state()
    small = drop_layers(model, [1])
    assert torch.equal(torch.random.get_rng_state(), rng)  # built on the meta device: nothing drawn at random
    tensors = {**dict(small.named_buffers()), **small.state_dict()}
    originals = {**dict(model.named_buffers()), **model.state_dict()}
    assert tensors["model.rotary_emb.inv_freq"].dtype == torch.float32
    for name, tensor in tensors.items():
        source = name.replace("layers.1.", "layers.2.")
        assert tensor.dtype == originals[source].dtype and torch.equal(tensor, originals[source]), name
    assert not small.model.embed_tokens.weight.requires_grad and small.lm_head.weight.requires_grad
    assert all(block.gradient_checkpointing for block in small.model.layers)
    assert small.generation_config.num_beams == 3
    reference = skipping_blocks(model, {"model.layers": [0, 2]}).eval()
    ids = inputs_for("llama")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reference(ids, use_cache=False).logits, small.eval()(ids, use_cache=False).logits)


def test_drop_layers_renumbers_per_layer_config_lists():
    torch.manual_seed(0)
    smol = SmolLM3ForCausalLM(SmolLM3Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, no_rope_layer_interval=4, max_position_embeddings=64, pad_token_id=0)).eval()
    moe = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, mlp_only_layers=[1], max_position_embeddings=64)).eval()
    assert smol.config.no_rope_layers == [1, 1, 1, 0]  # one entry per block: the kept ones stay
    assert drop_layers(smol, [0]).config.no_rope_layers == [1, 1, 0]
    assert drop_layers(moe, [0]).config.mlp_only_layers == [0]  # block indices: renumbered
    assert drop_layers(moe, [1]).config.mlp_only_layers == []
    every = copy.deepcopy(moe.config)
    every.mlp_only_layers = [0, 1, 2]  # every block by index (Llama 4's default moe_layers): renumbered, not cut
    assert drop_layers(Qwen2MoeForCausalLM(every), [0]).config.mlp_only_layers == [0, 1]
    ids = inputs_for("llama")["input_ids"]
    for model, kept in ((smol, [1, 2, 3]), (moe, [1, 2])):
        reference = skipping_blocks(model, {"model.layers": kept})
        small = drop_layers(model, [i for i in range(len(model.model.layers)) if i not in kept]).eval()
        with torch.no_grad():
            assert torch.equal(reference(ids, use_cache=False).logits, small(ids, use_cache=False).logits)


def test_t5_without_its_first_block_keeps_the_shared_position_bias():
    model = three_blocks("t5")
    small = drop_layers(model, {"encoder.block": [0], "decoder.block": [0, 1]}).eval()
    bias = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    for stack in ("encoder", "decoder"):
        assert torch.equal(small.state_dict()[f"{stack}.{bias}"], model.state_dict()[f"{stack}.{bias}"])
    reference = skipping_blocks(model, {"encoder.block": [1, 2], "decoder.block": [2]})
    for stack in (reference.encoder, reference.decoder):  # what the first block holds moves to the new first one
        original = getattr(model, "encoder" if stack is reference.encoder else "decoder").block[0].layer[0]
        stack.block[0].layer[0].SelfAttention.relative_attention_bias = original.SelfAttention.relative_attention_bias
        stack.block[0].layer[0].SelfAttention.has_relative_attention_bias = True
    with torch.no_grad():
        expected, actual = (m(**inputs_for("t5"), use_cache=False).logits for m in (reference, small))
    assert (expected - actual).abs().max() <= 1e-5


@pytest.mark.parametrize("model, layers, message", [
    (lambda: three_blocks("bert"), [3], r"in \[0, 2\]"),
    (lambda: three_blocks("bert"), [1, 1], "distinct"),
    (lambda: three_blocks("bert"), [True], "distinct"),
    (lambda: three_blocks("bert"), [0, 1, 2], "keep at least one"),
    (lambda: three_blocks("bert"), [], "no block to remove"),
    (lambda: three_blocks("bert"), 1, "must be a list of block indices"),
    (lambda: three_blocks("t5"), {"encoder.block": [], "decoder.block": []}, "no block to remove"),
    (lambda: ModernBertForMaskedLM(ModernBertConfig(  # its first block has no attention norm
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)),
     [0], "not all alike"),
    (lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, mlp_only_layers=[1, 7])),
     [0], "mlp_only_layers"),
    (lambda: three_blocks("bert"), {"bert.encoder": [0]}, "not a block stack"),
    (lambda: three_blocks("t5"), [0], "dict of block indices per stack"),
    (lambda: nn.Sequential(nn.Linear(4, 4)), [0], "No stack of Transformer blocks"),
    (lambda: type(tiny_gpt2())(tiny_gpt2().config.__class__(**{**tiny_gpt2().config.to_dict(),
                                                               "scale_attn_by_inverse_layer_idx": True})),
     [0], "scale_attn_by_inverse_layer_idx"),
    (lambda: DiffLlamaForCausalLM(DiffLlamaConfig(  # each block's lambda_init is set from its index when built
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8)),
     [0], r"values set from their position \(model.layers.0.self_attn.lambda_init = 0.2\d* \(the original block's: "
          r"0.35"),
])
def test_bad_drop_layers_is_a_value_error_naming_the_field_and_changes_nothing(model, layers, message):
    model = model()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        drop_layers(model, layers)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_drop_layers_and_shrink_of_a_wrapped_model_say_to_unwrap_it():
    model = three_blocks("bert")
    with torch.device("meta"):
        offloaded = type(model)(model.config)
    with pytest.raises(ValueError, match="hold no data"):
        drop_layers(offloaded, [1])
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["query", "value"], r=2))
    with pytest.raises(ValueError, match="merge_and_unload"):
        drop_layers(lora, [1])
    config = PruningConfig(structure="neurons", scheme="class-uniform", schedule="oneshot", final_sparsity=0.5)
    pruner = Pruner(lora, config)
    pruner.prune_to(0.5)
    with pytest.raises(ValueError, match="merge_and_unload"):
        PrunedModel(lora, pruner.masks, config).shrink()


def test_block_influence_is_one_minus_the_mean_cosine_over_the_tokens_that_are_not_padding():
    model = three_blocks("bert").train()
    batch = inputs_for("bert")
    scores = block_influence(model, [batch, batch])
    assert model.training and not any(block._forward_hooks for block in model.bert.encoder.layer)
    model.eval()
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    keep = batch["attention_mask"].bool()
    expected = [1 - float(nn.functional.cosine_similarity(x, y, dim=-1)[keep].mean())
                for x, y in zip(hidden[:-1], hidden[1:])]
    assert scores.keys() == {"bert.encoder.layer"}
    assert scores["bert.encoder.layer"] == pytest.approx(expected, abs=1e-6)


def test_block_influence_of_a_decoder_leaves_out_the_padded_labels():
    model = three_blocks("t5")
    ids = inputs_for("t5")["input_ids"]
    labels = torch.randint(3, 99, (2, 6), generator=torch.Generator().manual_seed(2))
    padded = labels.clone()
    padded[1, 3:] = -100  # as DataCollatorForSeq2Seq pads them
    alone = [block_influence(model, [{"input_ids": ids[i:i + 1], "labels": labels[i:i + 1, :n]}])["decoder.block"]
             for i, n in ((0, 6), (1, 3))]
    both = block_influence(model, [{"input_ids": ids, "labels": padded}])["decoder.block"]
    weighted = [(6 * a + 3 * b) / 9 for a, b in zip(*alone)]  # 1 - mean cosine over the 9 real label positions
    assert both == pytest.approx(weighted, abs=1e-5)
    # DataCollatorForSeq2Seq(model=...) also passes the decoder inputs shifted from the labels
    shifted = model.prepare_decoder_input_ids_from_labels(labels=padded)
    collated = block_influence(model, [{"input_ids": ids, "labels": padded, "decoder_input_ids": shifted}])
    assert collated["decoder.block"] == pytest.approx(weighted, abs=1e-5)


def test_block_influence_scores_both_stacks_of_an_encoder_decoder_and_refuses_batches_that_reach_none():
    model = tiny_t5()
    scores = block_influence(model, [inputs_for("t5")])
    assert {name: len(values) for name, values in scores.items()} == {"encoder.block": 2, "decoder.block": 2}
    assert all(0 <= value <= 2 for values in scores.values() for value in values)
    with pytest.raises(ValueError, match="received no input"):
        block_influence(model, [])
    with pytest.raises(ValueError, match="dicts of keyword arguments"):
        block_influence(model, [[1, 2, 3]])


def test_drop_layers_of_umt5_keeps_each_blocks_own_position_bias():
    # UMT5 has a relative position bias in every block (T5 only in the first): the kept blocks keep theirs.
    config = AutoConfig.for_model("umt5", vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=3,
                                  num_decoder_layers=3, num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                  eos_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    small = drop_layers(model, {"encoder.block": [0], "decoder.block": [1]}).eval()
    for stack, kept in (("encoder.block", [1, 2]), ("decoder.block", [0, 2])):
        for new, old in enumerate(kept):
            bias = "layer.0.SelfAttention.relative_attention_bias.weight"
            assert torch.equal(small.get_parameter(f"{stack}.{new}.{bias}"), model.get_parameter(f"{stack}.{old}.{bias}"))
    reference = skipping_blocks(model, {"encoder.block": [1, 2], "decoder.block": [0, 2]})
    with torch.no_grad():
        expected = reference(**inputs_for("t5"), use_cache=False).logits
        assert (expected - small(**inputs_for("t5"), use_cache=False).logits).abs().max() <= 1e-5
