"""merge_lora / unmerge_lora / save_merged: same logits, plain HF modules, reloadable files."""
import os

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from _lora_models import one_thread  # noqa: F401  (autouse fixture)
from _lora_models import logits, max_diff, perturb_extras, randomize_lora, tiny, twin
from trilora.lora import (CONFIG_ATTR, LoraConfig, LoraLinear, TrainableCopy, add_lora, lora_layers,
                          merge_lora, save_merged, unmerge_lora)
from trilora.quant import Linear4bit, quantize_model

CASES = {
    "llama": ("llama", dict(r=4, alpha=8, target_modules="all-linear")),
    "qwen2-bias": ("qwen2", dict(r=4, alpha=8, target_modules=["q_proj", "k_proj", "down_proj"], bias="all")),
    "gpt2-conv1d": ("gpt2", dict(r=4, alpha=8, target_modules="all-linear", use_rslora=True)),
    "bert-seq-cls": ("bert", dict(r=2, alpha=4, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")),
}


def _adapted(arch, kw, quantized=False):
    model = tiny(arch)
    if quantized:
        quantize_model(model, backend="torch")
    add_lora(model, LoraConfig(**kw), backend="torch")
    randomize_lora(model)
    perturb_extras(model)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_merge_gives_plain_model_with_same_logits(case):
    arch, kw = CASES[case]
    model = _adapted(arch, kw)
    before = logits(model)
    plain_keys = set(tiny(arch).state_dict())
    names = [n for n, _ in lora_layers(model)]
    merged = merge_lora(model)
    assert merged is model and not hasattr(model, CONFIG_ATTR)
    assert not any(isinstance(m, (LoraLinear, TrainableCopy)) for m in model.modules())
    expected = Conv1D if arch == "gpt2" else nn.Linear
    assert all(type(model.get_submodule(n)) is expected for n in names)
    assert set(model.state_dict()) == plain_keys  # the HF model's own keys again
    assert max_diff(logits(model), before) < 1e-5


def test_merged_weight_is_w_plus_scaled_ba():
    model = _adapted("gpt2", CASES["gpt2-conv1d"][1])
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    w = layer.base_layer.weight.detach().double().clone()           # Conv1D: [in, out]
    delta = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double() * (8 / 2)  # rsLoRA: alpha/√r
    merge_lora(model)
    assert max_diff(model.get_submodule("transformer.h.0.attn.c_attn").weight, w + delta.t()) < 1e-6


def test_merge_4bit_base_is_dense_in_quant_dtype_or_requantized():
    kw = dict(r=4, alpha=8, target_modules="all-linear")
    model = _adapted("llama", kw, quantized=True)
    randomize_lora(model, std=0.05)  # an update of the base weights' size, as after training
    before = logits(model)
    requant = twin(model)
    lora_q = requant.get_submodule("model.layers.0.self_attn.q_proj")
    merge_lora(model)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float32  # the quant state's dtype
    assert max_diff(logits(model), before) < 1e-4

    merge_lora(requant, requantize=True)
    q4 = requant.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q4, Linear4bit) and q4.quant_type == lora_q.base_layer.quant_type
    assert torch.equal(q4.weight, Linear4bit.from_linear(q_proj, backend="torch").weight)  # = quantize(W + ΔW)
    # re-quantization costs what quantizing the base cost (~10 % relative on these logits)
    rel = ((logits(requant) - before).norm() / before.norm()).item()
    assert 0 < rel < 0.3


def test_merge_4bit_keeps_bf16_quant_dtype():
    model = nn.Sequential(nn.Linear(32, 16)).to(torch.bfloat16)
    quantize_model(model, skip=(), backend="torch")
    add_lora(model, LoraConfig(r=2, target_modules=["0"], task_type=None), backend="torch")
    randomize_lora(model)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        before = model(x)
        merge_lora(model)
        assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.bfloat16
        assert max_diff(model(x), before) <= 0.02 * before.abs().max().item()  # bf16 rounding


def test_merge_in_place_and_unmerge_round_trip():
    model = _adapted("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    w0 = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model)}
    before = logits(model)
    merge_lora(model, unload=False)
    assert all(layer.merged for _, layer in lora_layers(model))
    assert max_diff(logits(model), before) < 1e-5
    with torch.no_grad():  # merged: the forward no longer reads the adapter
        saved = {n: layer.lora_B["default"].weight.clone() for n, layer in lora_layers(model)}
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.zero_()
    assert max_diff(logits(model), before) < 1e-5
    with torch.no_grad():
        for n, layer in lora_layers(model):
            layer.lora_B["default"].weight.copy_(saved[n])
    unmerge_lora(model)
    assert all(max_diff(layer.base_layer.weight, w0[n]) < 1e-6 for n, layer in lora_layers(model))
    assert not any(layer.merged for _, layer in lora_layers(model))
    assert max_diff(logits(model), before) < 1e-5


def test_merge_and_unmerge_refusals():
    q = _adapted("llama", dict(r=2, target_modules=["q_proj"]), quantized=True)
    with pytest.raises(ValueError, match="4-bit"):
        merge_lora(q, unload=False)
    with pytest.raises(ValueError, match="4-bit"):
        unmerge_lora(q)
    dense = _adapted("llama", dict(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="requantize"):
        merge_lora(dense, requantize=True, unload=False)
    merge_lora(dense)
    with pytest.raises(ValueError, match="no LoRA layers"):
        unmerge_lora(dense)
    with pytest.raises(ValueError, match="no trilora adapters"):
        merge_lora(tiny("llama"))


@pytest.mark.parametrize("arch, quantized", [("llama", False), ("gpt2", False), ("llama", True)])
def test_save_merged_reloads_with_auto_model(arch, quantized, tmp_path):
    model = _adapted(arch, dict(r=4, alpha=8, target_modules="all-linear"), quantized=quantized)
    before = logits(model)
    save_merged(model, tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors") and os.path.isfile(tmp_path / "config.json")
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora_" in k or "base_layer" in k or "absmax" in k for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_diff(logits(reloaded), before) < (1e-4 if quantized else 1e-5)
    assert len(list(lora_layers(model))) > 0 and max_diff(logits(model), before) == 0  # copy merged, not model


def test_save_merged_of_an_already_merged_model(tmp_path):
    """merge_lora then save_merged(in_place=True) (the CLI's order) saves the merged model as is."""
    model = _adapted("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    before = logits(model)
    merge_lora(model)
    save_merged(model, tmp_path, in_place=True)
    assert max_diff(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), before) < 1e-5
