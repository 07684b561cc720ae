"""Adapters round-trip with the real `peft` package: same files, same logits, same gradients."""
import json
import os

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from _lora_models import one_thread  # noqa: F401  (autouse fixture)
from _lora_models import (dequantized_twin, input_ids, logits, max_diff, perturb_extras, randomize_lora, tiny,
                          twin)
from trilora.lora import LoraConfig, add_lora, load_adapter, load_adapter_weights, lora_layers, save_adapter
from trilora.quant import Linear4bit, quantize_model

ATOL = 1e-5  # fp32 logits of |x| ~ 1; the two stacks run the same ops in the same order

# (arch, trilora config) pairs exercising every saved-tensor kind
CASES = {
    "llama-all-linear": ("llama", dict(r=4, alpha=8, target_modules="all-linear")),
    "llama-rslora-dropout": ("llama", dict(r=4, alpha=8, dropout=0.1, use_rslora=True,
                                           target_modules=["q_proj", "v_proj", "down_proj"])),
    "qwen2-bias-all": ("qwen2", dict(r=2, alpha=4, target_modules=["q_proj", "o_proj"], bias="all")),
    "qwen2-bias-lora-only": ("qwen2", dict(r=2, alpha=4, target_modules=["q_proj", "o_proj"], bias="lora_only")),
    "gpt2-conv1d": ("gpt2", dict(r=4, alpha=8, target_modules=["c_attn", "c_fc", "c_proj"])),
    "bert-seq-cls": ("bert", dict(r=2, alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
}


def _peft_config(kw: dict) -> PeftLoraConfig:
    return PeftLoraConfig(r=kw["r"], lora_alpha=kw["alpha"], lora_dropout=kw.get("dropout", 0.0),
                          use_rslora=kw.get("use_rslora", False), target_modules=kw["target_modules"],
                          bias=kw.get("bias", "none"), task_type=kw.get("task_type", "CAUSAL_LM"),
                          fan_in_fan_out=kw.get("fan_in_fan_out", False))


def _ours(arch: str, kw: dict):
    """(base twin, adapted model with random adapter + extras, its logits)."""
    base = tiny(arch)
    fresh = twin(base)
    model = add_lora(base, LoraConfig(**kw), backend="torch")
    randomize_lora(model)
    perturb_extras(model)
    return fresh, model, logits(model)


@pytest.mark.parametrize("case", list(CASES))
def test_trilora_adapter_loads_in_peft(case, tmp_path):
    arch, kw = CASES[case]
    fresh, model, ours = _ours(arch, kw)
    save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(fresh, tmp_path).eval()
    theirs = logits(peft_model)
    assert max_diff(ours, theirs) < ATOL
    with peft_model.disable_adapter():  # the adapter really contributes (so the check above can fail)
        assert max_diff(logits(peft_model), ours) > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_trilora(case, tmp_path):
    arch, kw = CASES[case]
    base = tiny(arch)
    fresh = twin(base)
    peft_model = get_peft_model(base, _peft_config(kw)).eval()
    randomize_lora(peft_model)
    perturb_extras(peft_model)
    theirs = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    model = load_adapter(fresh, tmp_path, backend="torch")
    assert len(list(lora_layers(model))) > 0
    assert max_diff(logits(model), theirs) < ATOL
    assert not any(p.requires_grad for p in model.parameters())  # PEFT's default: inference


def test_saved_files_are_peft_files(tmp_path):
    """Same tensor keys, shapes and dtypes as PEFT writes for the same adapter; a config PEFT knows."""
    base = tiny("llama")
    peft_model = get_peft_model(twin(base), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "peft")
    save_adapter(add_lora(base, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])), tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", "adapter_model.safetensors"]

    def tensors(d):
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            return f.metadata(), {k: (tuple(f.get_tensor(k).shape), f.get_tensor(k).dtype) for k in f.keys()}

    meta, ours = tensors(tmp_path / "ours")
    assert meta == {"format": "pt"}
    assert ours == tensors(tmp_path / "peft")[1]
    assert ours["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == ((4, 64), torch.float32)
    assert ours["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] == ((32, 4), torch.float32)
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(cfg) <= set(peft_cfg)  # PEFT would warn about (and drop) unknown keys
    assert sorted(cfg["target_modules"]) == sorted(peft_cfg["target_modules"])  # PEFT's order is a set's
    for key in ("peft_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "use_dora", "task_type",
                "modules_to_save", "fan_in_fan_out", "init_lora_weights",
                "rank_pattern", "alpha_pattern", "layers_to_transform"):
        assert cfg[key] == peft_cfg[key], key


def test_config_fields_for_gpt2_and_seq_cls(tmp_path):
    _, gpt2, _ = _ours(*CASES["gpt2-conv1d"])
    save_adapter(gpt2, tmp_path / "g")
    assert json.loads((tmp_path / "g" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    _, bert, _ = _ours(*CASES["bert-seq-cls"])
    save_adapter(bert, tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier", "score"]
    with safe_open(str(tmp_path / "b" / "adapter_model.safetensors"), "pt") as f:
        trained = f.get_tensor("base_model.model.classifier.weight")
    assert torch.equal(trained, bert.classifier.trained.weight)
    assert not torch.equal(trained, bert.classifier.original_module.weight)


def test_gradients_match_peft():
    """Training steps are the same: loss and every adapter gradient equal PEFT's."""
    kw = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], use_rslora=True)
    base = tiny("llama")
    peft_model = get_peft_model(twin(base), _peft_config(kw))
    model = add_lora(base, LoraConfig(**kw), backend="torch")
    randomize_lora(model)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(model.get_parameter(name.removeprefix("base_model.model.")))
    ids = input_ids()
    losses = []
    for m in (model, peft_model):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    n = 0
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            ours = model.get_parameter(name.removeprefix("base_model.model.")).grad
            assert ours.abs().sum() > 0 and max_diff(ours, p.grad) < 1e-6, name
            n += 1
    assert n == 12


def test_quantized_base_adapter_in_peft_on_dequantized_weights(tmp_path):
    """A QLoRA adapter (Linear4bit base) loads in PEFT over the dequantized dense weights, and
    back into a fresh 4-bit model, with the same logits."""
    model = quantize_model(tiny("llama"), backend="torch")
    fresh_q = twin(model)
    dense = dequantized_twin(model, "llama")
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), backend="torch")
    randomize_lora(model)
    ours = logits(model)
    save_adapter(model, tmp_path)
    assert max_diff(logits(PeftModel.from_pretrained(dense, tmp_path).eval()), ours) < 1e-4
    reloaded = load_adapter(fresh_q, tmp_path, backend="torch")
    assert all(isinstance(layer.base_layer, Linear4bit) for _, layer in lora_layers(reloaded))
    assert max_diff(logits(reloaded), ours) < ATOL


def test_is_trainable_keeps_adapter_trainable(tmp_path):
    _, bert, _ = _ours(*CASES["bert-seq-cls"])
    save_adapter(bert, tmp_path)
    model = load_adapter(tiny("bert"), tmp_path, is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in bert.named_parameters() if p.requires_grad}


def test_load_adapter_weights_into_an_adapted_model(tmp_path):
    """Resuming: a saved adapter (ours, or PEFT's with bias="all" + modules_to_save) copies into
    a model that already carries the same adapter; a different rank is refused before copying."""
    kw = dict(r=2, alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS", bias="all")
    _, trained, ours = _ours("bert", kw)
    save_adapter(trained, tmp_path / "ours")
    resumed = add_lora(tiny("bert"), LoraConfig(**kw), backend="torch")
    assert max_diff(logits(resumed), ours) > 1e-3
    load_adapter_weights(resumed, tmp_path / "ours")
    assert max_diff(logits(resumed), ours) < ATOL

    peft_model = get_peft_model(tiny("bert"), _peft_config(kw)).eval()
    randomize_lora(peft_model)
    perturb_extras(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    load_adapter_weights(resumed, tmp_path / "peft")
    assert max_diff(logits(resumed), logits(peft_model)) < ATOL

    other = add_lora(tiny("bert"), LoraConfig(**dict(kw, r=4)), backend="torch")
    snap = _snapshot(other)
    with pytest.raises(ValueError, match="r=2"):
        load_adapter_weights(other, tmp_path / "ours")
    _assert_untouched(other, snap)


# ----------------------------------------------------------------------------- refusals


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def _assert_untouched(model, snap):
    types, params = _snapshot(model)
    assert types == snap[0]
    assert params.keys() == snap[1].keys()
    assert all(torch.equal(v[0], snap[1][k][0]) and v[1] == snap[1][k][1] for k, v in params.items())


@pytest.fixture
def llama_adapter(tmp_path):
    _, model, _ = _ours("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    return save_adapter(model, tmp_path / "llama")


def _small_llama(hidden=32, layers=2):
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))


@pytest.mark.parametrize("other, match", [
    (_small_llama, r"\[4, 64\].*\[4, 32\]"),               # same names, other widths
    (lambda: tiny("gpt2"), "matches no linear layer"),     # another architecture
    (lambda: _small_llama(hidden=64, layers=1), "modules the model lacks"),  # fewer layers
])
def test_adapter_for_another_base_is_refused_and_model_untouched(llama_adapter, other, match):
    model = other()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, llama_adapter)
    _assert_untouched(model, snap)


def _edit_config(path, **changes):
    cfg_file = os.path.join(path, "adapter_config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("changes, match", [
    (dict(use_dora=True), "DoRA"), (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
    (dict(alpha_pattern={"q_proj": 2}), "alpha_pattern"), (dict(peft_type="IA3"), "peft_type 'IA3'"),
    (dict(init_lora_weights="pissa"), "rewrites the base"), (dict(layers_to_transform=[0]), "layers_to_transform"),
    (dict(r=8), r"\[4, 64\].*\[8, 64\]"),
])
def test_unsupported_or_inconsistent_config_is_refused(llama_adapter, changes, match):
    _edit_config(llama_adapter, **changes)
    model = tiny("llama")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, llama_adapter)
    _assert_untouched(model, snap)


def test_broken_dora_adapters_are_refused(tmp_path):
    """DoRA adapters load (tests/test_lora_dora.py); one without its magnitudes, or magnitudes
    under a config without use_dora, is refused naming the problem."""
    peft_model = get_peft_model(tiny("llama"), PeftLoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    peft_model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    save_file({k: v for k, v in tensors.items() if "magnitude" not in k}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="DoRA adapter lacks the magnitude of"):
        load_adapter(tiny("llama"), tmp_path)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(ValueError, match="is a DoRA magnitude but the config says use_dora=false"):
        load_adapter(tiny("llama"), tmp_path)


def test_bad_directories(llama_adapter, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tiny("llama"), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny("llama"), tmp_path / "empty")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(open(os.path.join(llama_adapter, "adapter_config.json")).read())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(ValueError, match="pickle"):
        load_adapter(tiny("llama"), pickled)
    (pickled / "adapter_config.json").write_text("{not json")
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(1, 1)}, str(pickled / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(tiny("llama"), pickled)


def test_foreign_keys_and_double_load_are_refused(llama_adapter, tmp_path):
    with safe_open(os.path.join(llama_adapter, "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_embedding_A"] = torch.zeros(4, 64)
    os.makedirs(tmp_path / "foreign")
    save_file(tensors, str(tmp_path / "foreign" / "adapter_model.safetensors"))
    with open(tmp_path / "foreign" / "adapter_config.json", "w") as f:
        f.write(open(os.path.join(llama_adapter, "adapter_config.json")).read())
    with pytest.raises(ValueError, match="lora_embedding_A"):
        load_adapter(tiny("llama"), tmp_path / "foreign")
    model = load_adapter(tiny("llama"), llama_adapter)
    with pytest.raises(ValueError, match="already has an adapter named .default."):
        load_adapter(model, llama_adapter)
