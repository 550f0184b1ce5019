"""Encoder-decoders under `Seq2SeqTrainer`: tiny T5 and BART learn to reverse token sequences while pruned."""

import pytest
import torch
from conftest import VOCAB, tiny_bart, tiny_t5
from transformers import MarianConfig, MarianMTModel, Seq2SeqTrainer, Seq2SeqTrainingArguments

from hf_prune import MagnitudePruningCallback, PrunedModel, PruningConfig
from hf_prune.targets import find_targets


def tiny_marian() -> torch.nn.Module:
    torch.manual_seed(0)
    config = MarianConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                          max_position_embeddings=64, pad_token_id=VOCAB - 1, decoder_start_token_id=VOCAB - 1,
                          eos_token_id=0)
    return MarianMTModel(config)


def t5_classes() -> set[str]:
    attention = {f"{stack}.block.*.layer.*.{kind}.{p}" for stack, kind in
                 [("encoder", "SelfAttention"), ("decoder", "SelfAttention"), ("decoder", "EncDecAttention")]
                 for p in "qkvo"}
    feed_forward = {f"{stack}.block.*.layer.*.DenseReluDense.{p}" for stack in ("encoder", "decoder")
                    for p in ("wi", "wo")}
    return attention | feed_forward


def bart_classes() -> set[str]:
    """BART and Marian share the layout."""
    attention = {f"model.{stack}.layers.*.{kind}.{p}_proj" for stack, kind in
                 [("encoder", "self_attn"), ("decoder", "self_attn"), ("decoder", "encoder_attn")]
                 for p in ("q", "k", "v", "out")}
    feed_forward = {f"model.{stack}.layers.*.{fc}" for stack in ("encoder", "decoder") for fc in ("fc1", "fc2")}
    return attention | feed_forward


MODELS = {"t5": (tiny_t5, t5_classes), "bart": (tiny_bart, bart_classes), "marian": (tiny_marian, bart_classes)}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("prune_head", [False, True])
def test_weight_classes_cover_both_stacks_and_cross_attention_not_embeddings(kind, prune_head):
    build, classes = MODELS[kind]
    model = build()
    targets = find_targets(model, PruningConfig(prune_head=prune_head))
    assert {t.weight_class for t in targets} == classes()
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied head
    names = {t.name for t in targets}
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    assert "lm_head.weight" not in names and embeddings and not names & embeddings


class ReverseDataset(torch.utils.data.Dataset):
    """Random token sequences and their reversal, each followed by EOS: a deterministic seq2seq task."""

    def __init__(self, eos_token_id: int, length: int = 48, seq_len: int = 8, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(3, VOCAB - 1, (length, seq_len), generator=generator)
        eos = torch.full((length, 1), eos_token_id)
        self.input_ids = torch.cat([tokens, eos], dim=1)
        self.labels = torch.cat([tokens.flip(1), eos], dim=1)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": torch.ones_like(self.input_ids[i]),
                "labels": self.labels[i]}


@pytest.mark.parametrize("kind", ["t5", "bart"])
@pytest.mark.parametrize("scheme", ["class-blind", "class-uniform"])
def test_seq2seq_trainer_prunes_saves_loads_and_generates(tmp_path, kind, scheme):
    model = MODELS[kind][0]()
    dataset = ReverseDataset(model.config.eos_token_id)
    callback = MagnitudePruningCallback(PruningConfig(initial_sparsity=0.2, final_sparsity=0.6, schedule="cubic",
                                                      start_step=0, end_step=4, pruning_frequency=2, scheme=scheme))
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=8,
                                    learning_rate=5e-3, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                                    disable_tqdm=True, logging_steps=1, predict_with_generate=True,
                                    generation_max_length=12)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]  # the reversal is being learned while the weights are pruned

    params = dict(model.named_parameters())
    by_class: dict[str, list[torch.Tensor]] = {}
    for name, mask in callback.masks.items():
        assert (params[name].detach()[~mask] == 0).all(), name
        by_class.setdefault(callback.pruner.classes[name] if scheme == "class-uniform" else "all", []).append(mask)
    for masks in by_class.values():
        assert sum(int((~m).sum()) for m in masks) == round(0.6 * sum(m.numel() for m in masks))
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    predictions = trainer.predict(ReverseDataset(model.config.eos_token_id, length=4, seed=1)).predictions
    assert predictions.shape[0] == 4

    PrunedModel.from_trainer(trainer).save_pretrained(tmp_path / "pruned")
    loaded = PrunedModel.from_pretrained(tmp_path / "pruned")
    loaded_params = dict(loaded.model.named_parameters())
    assert loaded.masks.keys() == callback.masks.keys()
    for name, mask in callback.masks.items():
        assert torch.equal(loaded.masks[name], mask) and torch.equal(loaded_params[name], params[name]), name
    model.eval()
    inputs = dataset.input_ids[:3]
    generated = loaded.generate(input_ids=inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(generated, model.generate(input_ids=inputs, max_new_tokens=10, do_sample=False))
    assert generated.shape[0] == 3 and generated.shape[1] > 1
