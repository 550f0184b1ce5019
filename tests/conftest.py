"""Tiny models built from configs (no download) and a tiny dataset, shared by the test modules."""

from __future__ import annotations

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub read it

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BartConfig,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    T5Config,
)


torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

VOCAB = 99


def tiny_bert(num_labels: int = 2) -> torch.nn.Module:
    """BERT of the transformers test suite: vocab 99, hidden 32, 2 layers, 4 heads, intermediate 37."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, num_labels=num_labels)
    return AutoModelForSequenceClassification.from_config(config)


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config)


def tiny_t5() -> torch.nn.Module:
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2,
                      num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return AutoModelForSeq2SeqLM.from_config(config)


def tiny_bart() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                        decoder_ffn_dim=37, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, decoder_start_token_id=2)
    return AutoModelForSeq2SeqLM.from_config(config)


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config)


TINY_MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "t5": tiny_t5, "bart": tiny_bart, "llama": tiny_llama}


class TinyClassificationDataset(torch.utils.data.Dataset):
    """Random token sequences whose label is whether token 5 occurs: learnable, deterministic."""

    def __init__(self, length: int = 64, seq_len: int = 12, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(3, VOCAB, (length, seq_len), generator=generator)
        self.labels = (self.input_ids == 5).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": torch.ones_like(self.input_ids[i]),
                "labels": self.labels[i]}


class TinyLMDataset(torch.utils.data.Dataset):
    """Random token sequences for causal / seq2seq LM training (labels = inputs)."""

    def __init__(self, length: int = 32, seq_len: int = 10, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(3, VOCAB, (length, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": torch.ones_like(self.input_ids[i]),
                "labels": self.input_ids[i].clone()}


@pytest.fixture
def bert() -> torch.nn.Module:
    return tiny_bert()


@pytest.fixture(params=sorted(TINY_MODELS))
def any_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return TINY_MODELS[request.param]()
