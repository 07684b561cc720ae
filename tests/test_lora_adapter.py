"""LoraConfig, LoraLinear and add_lora: math, initialisation, module selection, freezing."""
import math

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from _lora_models import one_thread  # noqa: F401  (autouse fixture)
from _lora_models import dequantized_twin, input_ids, logits, max_diff, randomize_lora, tiny, twin
from trilora.kernels import HAS_TRITON, interpreter_active
from trilora.lora import (LoraConfig, LoraLinear, TrainableCopy, add_lora, get_lora_config,
                          linear_module_names, lora_layers, set_lora_backend, trainable_parameters,
                          trainable_summary)
from trilora.quant import Linear4bit, dequantize_4bit, quantize_model

# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "rank r"), (dict(r=-2), "rank r"), (dict(r=2.5), "rank r"), (dict(r=True), "rank r"),
    (dict(dropout=-0.1), "dropout"), (dict(dropout=1.0), "dropout"),
    (dict(bias="some"), "bias must be one of"), (dict(task_type="CLS"), "task_type"),
    (dict(init_lora_weights="pissa"), "pissa"), (dict(target_modules=[]), "target_modules"),
    (dict(target_modules=""), "target_modules"), (dict(modules_to_save="classifier"), "modules_to_save"),
    (dict(alpha=float("nan")), "alpha"), (dict(alpha=0), "alpha must be a positive"),
    (dict(alpha=-8), "alpha must be a positive"), (dict(alpha=float("inf")), "alpha"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=3, alpha=0), "alpha must be a positive"), (dict(r=2.0, alpha=4), "rank r"),
])
def test_layer_rejects_what_the_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraLinear(nn.Linear(8, 8), **kwargs)


def test_meta_model_runs_a_shape_only_forward_like_torch_layers():
    """An empty-weights (meta) model with adapters propagates shapes, as PEFT's does."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 5))
    add_lora(model, LoraConfig(r=3, target_modules=["0", "1"]))
    out = model(torch.randn(2, 7, 16, device="meta"))
    assert out.is_meta and out.shape == (2, 7, 5)


def test_config_scaling():
    assert LoraConfig(r=8, alpha=16).scaling == 2.0
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scaling == pytest.approx(8 / 4)
    assert LoraConfig(r=4, target_modules=["v_proj", "q_proj", "q_proj"]).target_modules == ["q_proj", "v_proj"]


# ----------------------------------------------------------------------------- the layer


def _base(kind: str, n_in: int, n_out: int) -> nn.Module:
    torch.manual_seed(5)
    if kind == "linear":
        return nn.Linear(n_in, n_out)
    if kind == "conv1d":
        layer = Conv1D(n_out, n_in)
        nn.init.normal_(layer.bias)
        return layer
    return Linear4bit.from_linear(nn.Linear(n_in, n_out), backend="torch")


def _dense(base: nn.Module) -> torch.Tensor:
    """The base weight as [out, in] fp64."""
    if isinstance(base, Linear4bit):
        return dequantize_4bit(base.weight, base.quant_state, torch.float32, backend="torch").double()
    if isinstance(base, Conv1D):
        return base.weight.detach().double().t()
    return base.weight.detach().double()


@pytest.mark.parametrize("kind", ["linear", "conv1d", "linear4bit"])
def test_layer_forward_and_grads_match_formula(kind):
    """y = x Wᵀ + b + s · x Aᵀ Bᵀ against fp64, for [in, out] (Conv1D) and 4-bit bases; odd sizes."""
    n_in, n_out, r = 13, 7, 3
    base = _base(kind, n_in, n_out)
    layer = LoraLinear(base, r=r, alpha=5, backend="torch")
    randomize_lora(layer)
    x = torch.randn(2, 5, n_in, requires_grad=True)
    y = layer(x)
    W, b = _dense(base), base.bias.detach().double()
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    ref = x.double() @ W.t() + b + (5 / r) * (x.double() @ A.t() @ B.t())
    assert y.shape == (2, 5, n_out) and y.dtype == torch.float32
    assert max_diff(y, ref) < 1e-5
    y.square().sum().backward()
    grads = {n for n, p in layer.named_parameters() if p.grad is not None}
    assert grads == {"lora_A.default.weight", "lora_B.default.weight"}  # the base is frozen
    dy = 2 * ref.detach()
    dB = (5 / r) * dy.reshape(-1, n_out).t() @ (x.double() @ A.t()).reshape(-1, r)
    assert max_diff(layer.lora_B["default"].weight.grad, dB) < 1e-4


def test_init_is_peft_default_and_identity():
    base = nn.Linear(256, 96)
    layer = LoraLinear(base, r=64, alpha=16, backend="torch")
    A = layer.lora_A["default"].weight
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=√5) on [r, in] = U(±1/√in)
    assert A.abs().max() <= bound and A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert layer.lora_A["default"].weight.dtype == torch.float32 and layer.lora_A["default"].bias is None
    x = torch.randn(4, 256)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    gauss = LoraLinear(nn.Linear(256, 96), r=64, alpha=16, init_lora_weights="gaussian")
    assert gauss.lora_A["default"].weight.std().item() == pytest.approx(1 / 64, rel=0.05)
    assert torch.count_nonzero(gauss.lora_B["default"].weight) == 0
    rand = LoraLinear(nn.Linear(256, 96), r=64, alpha=16, init_lora_weights=False)
    assert torch.count_nonzero(rand.lora_B["default"].weight) > 0


def test_dropout_only_on_lora_branch_and_only_in_training():
    base = nn.Linear(32, 16)
    layer = LoraLinear(base, r=4, alpha=4, dropout=0.5, backend="torch")
    x = torch.randn(8, 32)
    with torch.no_grad():
        assert torch.equal(layer.train()(x), base(x))          # B = 0: dropout cannot touch the base path
        randomize_lora(layer)
        no_drop = LoraLinear(base, r=4, alpha=4, backend="torch")
        no_drop.load_state_dict(layer.state_dict())
        eval_out = layer.eval()(x)
        torch.testing.assert_close(eval_out, no_drop(x))       # eval: no dropout
        assert max_diff(layer.train()(x), eval_out) > 1e-3      # training: dropout active


def test_bf16_base_keeps_fp32_adapter():
    base = nn.Linear(32, 16).to(torch.bfloat16)
    layer = LoraLinear(base, r=4, alpha=8, backend="torch")
    randomize_lora(layer)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    y.float().sum().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32 and layer.lora_A["default"].weight.grad.abs().sum() > 0
    ref = x.double() @ base.weight.double().t() + base.bias.double() + 2 * (
        x.double() @ layer.lora_A["default"].weight.double().t() @ layer.lora_B["default"].weight.double().t())
    assert max_diff(y, ref) < 0.1  # bf16 rounding of |y| ~ 1..4


# ----------------------------------------------------------------------------- injection


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "bert"])
def test_all_linear_on_each_architecture(arch):
    model = tiny(arch)
    ref = logits(model)
    task = "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"
    linear = set(linear_module_names(model))
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", task_type=task), backend="torch")
    wrapped = {n for n, _ in lora_layers(model)}
    head = "classifier" if arch == "bert" else "lm_head"
    assert wrapped == linear - {head} and len(wrapped) > 0
    assert torch.equal(logits(model), ref)  # B = 0 at init: the model is unchanged
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.lora_{ab}.default.weight" for n in wrapped for ab in "AB"}
    if arch == "bert":
        expected |= {"classifier.trained.weight", "classifier.trained.bias"}
    assert trainable == expected
    cfg = get_lora_config(model)
    assert cfg.target_modules == sorted(wrapped) and cfg.fan_in_fan_out == (arch == "gpt2")
    randomize_lora(model)
    assert max_diff(logits(model), ref) > 1e-3


def test_target_matching_semantics():
    model = tiny("llama")
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj", "self_attn.v_proj"]), backend="torch")
    assert {n for n, _ in lora_layers(model)} == {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"}
    model = tiny("llama")
    add_lora(model, LoraConfig(r=2, target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj"), backend="torch")
    assert {n for n, _ in lora_layers(model)} == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    model = tiny("llama")
    add_lora(model, LoraConfig(r=2))  # PEFT's default for llama
    assert get_lora_config(model).target_modules == ["q_proj", "v_proj"] and len(list(lora_layers(model))) == 4


@pytest.mark.parametrize("targets, match", [
    (["q_prj"], "q_prj"), (["q"], "matches no linear layer"), ("lm_head2", "matches no linear layer"),
    (["mlp"], "not linear layers"), (["q_proj", "nope"], r"\['nope'\]"),
])
def test_unknown_targets_list_linear_names(targets, match):
    model = tiny("llama")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=match) as err:
        add_lora(model, LoraConfig(r=2, target_modules=targets))
    assert "q_proj" in str(err.value) and "gate_proj" in str(err.value)  # names the model's linear layers
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_phi3_needs_targets_and_wraps_fused_layers():
    model = tiny("phi3")
    with pytest.raises(ValueError, match="no default target_modules.*qkv_proj"):
        add_lora(model, LoraConfig(r=2))
    add_lora(model, LoraConfig(r=2, target_modules=["qkv_proj", "gate_up_proj"]), backend="torch")
    qkv = model.get_submodule("model.layers.0.self_attn.qkv_proj")
    assert qkv.lora_B["default"].weight.shape == (64 + 2 * 2 * 16, 2)
    assert model.get_submodule("model.layers.0.mlp.gate_up_proj").lora_B["default"].weight.shape == (2 * 96, 2)


def test_bias_modes_follow_peft():
    model = add_lora(tiny("qwen2"), LoraConfig(r=2, target_modules=["q_proj", "o_proj"], bias="all"))
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert biases == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1)
                      for p in ("q_proj.base_layer.bias", "k_proj.bias", "v_proj.bias")}
    model = add_lora(tiny("qwen2"), LoraConfig(r=2, target_modules=["q_proj", "o_proj"], bias="lora_only"))
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert biases == {f"model.layers.{i}.self_attn.q_proj.base_layer.bias" for i in (0, 1)}


def test_trainable_parameter_counts():
    model = tiny("llama")
    total = sum(p.numel() for p in model.parameters())
    add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # q: 64 → 64, v: 64 → 32 (2 kv heads of 16); two layers
    expected = 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert trainable_parameters(model) == (expected, total + expected)
    assert f"trainable params: {expected:,} || all params: {total + expected:,}" in trainable_summary(model)
    q = quantize_model(tiny("llama"), backend="torch")  # a 4-bit weight counts its real elements
    add_lora(q, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert trainable_parameters(q) == (expected, total + expected)


def test_rank_above_layer_width_warns_but_works():
    model = tiny("llama")
    with pytest.warns(UserWarning, match="exceeds min"):
        add_lora(model, LoraConfig(r=40, target_modules=["v_proj"]), backend="torch")  # v_proj: 64 → 32
    randomize_lora(model)
    assert torch.isfinite(logits(model)).all()


def test_second_add_lora_is_refused():
    model = add_lora(tiny("llama"), LoraConfig(r=2))
    with pytest.raises(ValueError, match="already has an adapter named .default."):
        add_lora(model, LoraConfig(r=2))


def test_modules_to_save_is_a_trainable_copy():
    model = tiny("bert")
    original = model.classifier.weight.detach().clone()
    add_lora(model, LoraConfig(r=2, task_type="SEQ_CLS"), backend="torch")
    wrapper = model.classifier
    assert isinstance(wrapper, TrainableCopy) and wrapper.weight is wrapper.trained.weight  # attribute forwarding
    assert not wrapper.original_module.weight.requires_grad and wrapper.trained.weight.requires_grad
    assert get_lora_config(model).modules_to_save == ["classifier", "score"]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model.train()(input_ids=input_ids(), labels=torch.tensor([0, 2]))
    out.loss.backward()
    opt.step()
    assert torch.equal(wrapper.original_module.weight, original) and not torch.equal(wrapper.trained.weight, original)
    q = quantize_model(tiny("bert"), backend="torch", skip=())
    with pytest.raises(ValueError, match="4-bit"):
        add_lora(q, LoraConfig(r=2, task_type="SEQ_CLS"))


def test_quantized_base_matches_dequantized_dense_equivalent():
    """QLoRA: adapters over Linear4bit layers == the same adapters over the dequantized weights."""
    model = quantize_model(tiny("llama"), backend="torch")
    dense = dequantized_twin(model, "llama")
    cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear")
    add_lora(model, cfg, backend="torch")
    add_lora(dense, cfg, backend="torch")
    randomize_lora(model)
    randomize_lora(dense)
    assert all(isinstance(layer.base_layer, Linear4bit) for _, layer in lora_layers(model))
    assert max_diff(logits(model), logits(dense)) < 1e-4
    loss = model(input_ids=input_ids(), labels=input_ids()).loss
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


# ----------------------------------------------------------------------------- backends


def test_set_lora_backend():
    model = add_lora(tiny("llama"), LoraConfig(r=2))
    set_lora_backend(model, "torch")
    assert {layer.backend for _, layer in lora_layers(model)} == {"torch"}
    with pytest.raises(ValueError, match="backend"):
        set_lora_backend(model, "cuda")
    with pytest.raises(ValueError, match="backend"):
        add_lora(tiny("llama"), LoraConfig(r=2), backend="fast")


@pytest.mark.skipif(not (HAS_TRITON and (torch.cuda.is_available() or interpreter_active())),
                    reason="needs Triton (CUDA or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("arch, quantized, bias", [("llama", False, "none"), ("llama", True, "none"),
                                                   ("qwen2", False, "all")])
def test_auto_backend_matches_torch_backend(arch, quantized, bias):
    """The default backend (Triton kernels here) gives the reference's loss and gradients
    (adapters, and trainable biases for bias="all")."""
    model = tiny(arch)
    model.model.layers = model.model.layers[:1]
    if quantized:
        quantize_model(model, backend="torch")
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], bias=bias))
    randomize_lora(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels run on CUDA tensors there
    model.to(device)
    ref = twin(model)
    set_lora_backend(ref, "torch")
    assert {layer.backend for _, layer in lora_layers(model)} == {"auto"}
    ids = input_ids(2, 6).to(device)
    outs = []
    for m in (model, ref):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        outs.append((loss.item(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-5)
    for n, g in outs[1][1].items():
        assert max_diff(outs[0][1][n], g) <= 1e-4 * max(1.0, g.abs().max().item()), n


def test_gradient_checkpointing_and_state_dict_round_trip():
    """HF gradient checkpointing still reaches the adapters; an adapted model's state dict
    (what Trainer checkpoints hold) restores into another adapted model."""
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"])
    model = add_lora(tiny("llama"), cfg, backend="torch")
    randomize_lora(model)
    ckpt = twin(model)
    ckpt.gradient_checkpointing_enable()
    ids = input_ids()
    for m in (model, ckpt):
        m.train()(input_ids=ids, labels=ids).loss.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ckpt.named_parameters()):
        if p.requires_grad:
            assert q.grad is not None and max_diff(p.grad, q.grad) < 1e-6, n
    other = add_lora(tiny("llama", seed=1), cfg, backend="torch")
    other.load_state_dict(model.state_dict())
    assert torch.equal(logits(other.eval()), logits(model.eval()))
