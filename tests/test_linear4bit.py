"""Linear4bit: bitsandbytes' state dict, both directions, and quantize_model."""
import pytest
import torch
import torch.nn as nn
from _bnb import bnb, bnb_dequantize
from safetensors.torch import load_file, save_file

from trilora.quant import Linear4bit, dequantize_4bit, quantize_model


def _bnb_linear(linear: nn.Linear, quant_type, double_quant):
    """A bnb Linear4bit holding `linear`'s weights, quantized on CPU."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              quant_type=quant_type, compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                     quant_type=quant_type, compress_statistics=double_quant)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone())
    return layer.to("cpu")  # .to() quantizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False), ("nf4", False)])
@pytest.mark.parametrize("shape", [(67, 33), (128, 64)])
def test_state_dict_equals_bnb(shape, quant_type, double_quant, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(*shape).to(dtype)
    ours = Linear4bit.from_linear(linear, quant_type=quant_type, double_quant=double_quant)
    theirs = _bnb_linear(linear, quant_type, double_quant).state_dict()
    sd = ours.state_dict()
    assert list(sd) == list(theirs)
    for key in sd:
        assert sd[key].dtype == theirs[key].dtype, key
        assert sd[key].shape == theirs[key].shape, key
        if key == "weight.absmax" and double_quant:  # bnb's CPU nested step: +-1 code (docs/formats.md)
            assert (sd[key].int() - theirs[key].int()).abs().max() <= 1
        else:
            assert torch.equal(sd[key], theirs[key]), key


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_loads_a_bnb_state_dict(quant_type):
    torch.manual_seed(1)
    # fp16: under the interpreter a Triton bf16 store truncates (exact on a GPU)
    linear = nn.Linear(45, 31).to(torch.float16)
    theirs = _bnb_linear(linear, quant_type, True)
    ours = Linear4bit(45, 31, quant_type="fp4" if quant_type == "nf4" else "nf4", blocksize=128)
    ours.load_state_dict(theirs.state_dict())
    assert ours.quant_state.quant_type == quant_type and ours.quant_state.blocksize == 64
    assert torch.equal(ours.dequantize(), bnb_dequantize(theirs.weight.data, theirs.weight.quant_state))
    x = torch.randn(3, 7, 45, dtype=torch.float16)
    ref = nn.functional.linear(x, bnb_dequantize(theirs.weight.data, theirs.weight.quant_state), theirs.bias)
    assert torch.equal(ours(x), ref)


def test_bnb_loads_our_state_dict_via_safetensors(tmp_path):
    torch.manual_seed(2)
    ours = Linear4bit.from_linear(nn.Linear(64, 40).to(torch.float16), quant_type="nf4")
    save_file(ours.state_dict(), tmp_path / "layer.safetensors")
    sd = load_file(tmp_path / "layer.safetensors")
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    assert torch.equal(bnb_dequantize(param.data, param.quant_state), ours.dequantize())
    again = Linear4bit(64, 40, dtype=torch.float16)
    again.load_state_dict(sd)
    assert torch.equal(again.dequantize(), ours.dequantize())


def test_loads_a_dense_linear_state_dict():
    linear = nn.Linear(20, 12)
    layer = Linear4bit(20, 12)
    layer.load_state_dict(linear.state_dict())
    assert torch.equal(layer.bias, linear.bias)
    assert torch.equal(layer.dequantize(), Linear4bit.from_linear(linear).dequantize())


@pytest.mark.parametrize("bad, match", [
    (lambda sd: {**sd, "weight": sd["weight"][:-1]}, "another tensor"),
    (lambda sd: {k: v for k, v in sd.items() if "quant_state" not in k}, "quant_state"),
    (lambda sd: {k: v for k, v in sd.items() if not k.startswith("weight.")}, "quant state entries"),
    (lambda sd: {**sd, "weight.quant_state.bitsandbytes__nf4": torch.tensor([1, 2, 255], dtype=torch.uint8)},
     "quant-state JSON"),
])
def test_bad_state_dicts(bad, match):
    sd = Linear4bit(30, 10).state_dict()
    with pytest.raises(RuntimeError, match=match):
        Linear4bit(30, 10).load_state_dict(bad(sd))


def test_wrong_layer_shape():
    sd = Linear4bit(30, 10).state_dict()
    with pytest.raises(RuntimeError, match=r"shape \(10, 30\), this layer is \(10, 40\)"):
        Linear4bit(40, 10).load_state_dict(sd)


def test_forward_gradients_and_frozen_weight():
    torch.manual_seed(3)
    linear = nn.Linear(24, 18)
    layer = Linear4bit.from_linear(linear)
    x = torch.randn(5, 24, requires_grad=True)
    y = layer(x)
    ref = nn.functional.linear(x, dequantize_4bit(layer.weight, layer.quant_state), layer.bias)
    assert torch.equal(y, ref)
    y.square().sum().backward()
    assert x.grad is not None and layer.bias.grad is not None
    assert not layer.weight.requires_grad and layer.weight.grad is None


def test_half_keeps_the_quant_state():
    layer = Linear4bit(16, 8, dtype=torch.float32).half()
    assert layer.weight.dtype == torch.uint8 and layer.bias.dtype == torch.float16
    assert layer.quant_state.absmax.dtype == torch.uint8
    assert layer.quant_state.nested_absmax.dtype == torch.float32
    x = torch.randn(2, 16, dtype=torch.float16)
    assert layer(x).dtype == torch.float16


def test_quantize_model_on_a_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(4)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        dense = model(ids).logits
        quantize_model(model, skip=("lm_head", "down_proj"))
        quant = model(ids).logits
    names = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(names) == 2 * 6  # q k v o gate up per layer
    assert not any(n.endswith(("down_proj", "lm_head")) for n in names)
    assert type(model.lm_head) is nn.Linear
    rel = (quant - dense).norm() / dense.norm()
    assert 1e-4 < rel < 0.2  # changed by 4-bit noise, not broken


@pytest.mark.parametrize("double_quant", [False, True])
def test_absmax_as_a_parameter_keeps_the_format(double_quant):
    """Under FSDP the absmax table is a frozen parameter (so it shards): the state dict keeps
    bitsandbytes' keys and values, the forward is unchanged, the quant state reads the
    parameter as it is now, and a reload replaces it."""
    torch.manual_seed(0)
    layer = Linear4bit(72, 40, double_quant=double_quant, backend="torch")
    x = torch.randn(3, 72)
    before, y = {k: v.clone() for k, v in layer.state_dict().items()}, layer(x)
    absmax = layer.absmax_as_parameter()
    assert not absmax.requires_grad and "absmax" in dict(layer.named_parameters())
    after = layer.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(layer(x), y)
    with torch.no_grad():
        absmax.mul_(0) if not double_quant else absmax.fill_(0)  # the state follows the parameter
    assert not torch.equal(layer(x), y) and layer.quant_state.absmax is absmax
    layer.load_state_dict(before)  # a whole bnb state replaces the parameter
    assert "absmax" not in dict(layer.named_parameters()) and torch.equal(layer(x), y)


def test_empty_skeleton_has_the_shapes_and_allocates_on_to_empty():
    layer = Linear4bit.empty(72, 40, bias=True, quant_type="fp4", blocksize=64, double_quant=True)
    assert layer.weight.is_meta and layer.weight.shape == (72 * 40 // 2, 1) and layer.bias.shape == (40,)
    qs = layer.quant_state
    assert qs.absmax.dtype == torch.uint8 and qs.absmax.shape == (72 * 40 // 64,) and qs.nested_absmax.shape == (1,)
    layer.to_empty(device="cpu")
    assert not any(t.is_meta for t in (layer.weight, layer.bias, *layer.quant_state.tensors()))
