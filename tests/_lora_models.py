"""Tiny HF models (built from configs, no downloads) and helpers for the LoRA adapter tests."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GemmaConfig, GemmaForCausalLM,
                          GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM)

VOCAB = 128


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one intra-op thread (import this fixture into a test module to use it).

    Matmuls of these tiny models gain nothing from threads, and on a shared 2-core machine
    OpenMP's spin-waiting made the Trainer test 40 s instead of 0.5 s whenever another
    process was busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
_DECODER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB)

BUILDERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_DECODER)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_DECODER)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_DECODER)),  # q/k/v have biases
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**_DECODER, head_dim=16)),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(**_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32,
                                               bos_token_id=0, eos_token_id=0)),
    "bert": lambda: BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=1, num_attention_heads=2,
                                                             vocab_size=VOCAB, num_labels=3)),
}


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A fresh tiny model of `arch` in eval mode; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return BUILDERS[arch]().eval()


def twin(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy with identical weights."""
    return copy.deepcopy(model)


def input_ids(batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def logits(model: torch.nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits


@torch.no_grad()
def randomize_lora(model: torch.nn.Module, seed: int = 3, std: float = 0.2) -> None:
    """Give every adapter (trilora's or PEFT's) a random, non-zero B (and a fresh A), so a test
    comparing logits would fail if the adapter were dropped or mis-mapped."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name or "lora_A" in name:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def dequantized_twin(quantized: torch.nn.Module, arch: str) -> torch.nn.Module:
    """A dense `arch` model holding exactly the dequantized weights of `quantized`'s Linear4bit layers."""
    from trilora.quant import Linear4bit, dequantize_4bit
    dense = tiny(arch)
    shapes = {k: v.shape for k, v in dense.state_dict().items()}
    dense.load_state_dict({k: v for k, v in quantized.state_dict().items() if shapes.get(k) == v.shape},
                          strict=False)  # norms, embeddings, head: the 16-bit tensors
    for name, m in quantized.named_modules():
        if isinstance(m, Linear4bit):
            w = dequantize_4bit(m.weight, m.quant_state, torch.float32, backend="torch")
            dense.get_submodule(name).weight.data.copy_(w)
    return dense


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def perturb_extras(model: torch.nn.Module, seed: int = 4, std: float = 0.2) -> None:
    """Add noise to every trainable non-LoRA tensor (biases under bias="all"/"lora_only", the
    modules_to_save copies), so a test fails if they are not saved or not loaded."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad and "lora_" not in name:
            p.add_(torch.randn(p.shape, generator=g) * std)
