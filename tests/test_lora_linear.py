"""Fused LoRA linear (`trilora.kernels.lora.linear`) against a float64 reference.

Forward and every gradient (dX, dA, dB, dbias), dense and 4-bit (NF4/FP4, double quant on and
off) bases, both backends, and every path of the GEMM engine (4-bit unpacked in the K-loop or
dequantized into a buffer, pointer or TMA kernels, small and large tiles, split reductions);
Triton runs through the interpreter on CPU (tests/conftest.py).
Error metric (tests/_blocks.py's rel_err): ‖out − ref‖ / ‖ref‖ against float64 from the same
(rounded) inputs; fp32 must be ≤ FP32_TOL (1e-5), fp16 ≤ 2 × torch's own fp16 error + FP16_ATOL.
"""
from __future__ import annotations

import importlib
import math
from types import SimpleNamespace

import pytest
import torch
from _blocks import FP16_ATOL, FP32_TOL, rel_err

from trilora.kernels.lora import lora_dropout_mask, lora_linear, lora_linear_ref
from trilora.quant import dequantize_4bit, quantize_4bit


engine = importlib.import_module("trilora.kernels.lora.engine")
kernel_backend = importlib.import_module("trilora.kernels.backend")
configs = importlib.import_module("trilora.kernels.lora.configs")
dropout = importlib.import_module("trilora.kernels.lora.dropout")
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
GRADS = ("y", "dx", "dA", "dB", "dbias")


# ----------------------------------------------------------------------------- cases

def make_case(shape=(37, 67), n=45, r=7, dtype=torch.float32, bias=True, quant=None,
              layout="contiguous", seed=0, device=DEV):
    """Random inputs in `dtype`; quant = (quant_type, double_quant, blocksize) or None."""
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    if layout == "transposed":    # 2-D x as a transposed view: strides (1, M)
        x = torch.randn(shape[::-1], generator=g).t()
    elif layout == "strided":     # every other column of a wider tensor: reshape stays a view
        x = torch.randn(*shape[:-1], 2 * k, generator=g)[..., ::2]
    elif layout == "permuted":    # 3-D with swapped leading dims: reshape has to copy
        x = torch.randn(shape[1], shape[0], *shape[2:], generator=g).transpose(0, 1)
    else:
        x = torch.randn(shape, generator=g)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    case = SimpleNamespace(
        x=x.to(device, dtype), scaling=1.7, quant_state=None,
        lora_A=(torch.randn(r, k, generator=g) / math.sqrt(k)).to(device, dtype),
        lora_B=(torch.randn(n, r, generator=g) / math.sqrt(r)).to(device, dtype),
        bias=(torch.randn(n, generator=g)).to(device, dtype) if bias else None,
        dy=torch.randn(*shape[:-1], n, generator=g).to(device, dtype))
    if quant is None:
        case.weight = w.to(device, dtype)
        case.w_ref = case.weight.double()            # the reference sees the rounded inputs
        case.w_torch = case.weight
    else:
        quant_type, double_quant, blocksize = quant
        case.weight, case.quant_state = quantize_4bit(w.to(device), quant_type, blocksize,
                                                      double_quant, backend="torch")
        case.w_ref = dequantize_4bit(case.weight, case.quant_state, torch.float32, backend="torch").double()
        case.w_torch = dequantize_4bit(case.weight, case.quant_state, dtype, backend="torch")
    return case


def run(case, p=0.0, seed=1234, backend="triton", dtype=None, weight=None):
    """(y, dx, dA, dB, dbias) from lora_linear, or from the reference in `dtype` (float64 ...)."""
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    x = cast(case.x).detach().requires_grad_()
    A, B = cast(case.lora_A).detach().requires_grad_(), cast(case.lora_B).detach().requires_grad_()
    bias = None if case.bias is None else cast(case.bias).detach().requires_grad_()
    if dtype is None:
        y = lora_linear(x, case.weight, A, B, case.scaling, bias, p, case.quant_state, backend=backend, seed=seed)
    else:  # the reference, dense weight given, the kernels' mask
        mask = lora_dropout_mask(seed, x.shape, p, x.device) if p > 0 else None
        y = lora_linear_ref(x, weight, A, B, case.scaling, bias, p, None, mask)
    inputs = [x, A, B] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(y, inputs, cast(case.dy))
    return dict(zip(GRADS, [y.detach(), *grads] + [None] * (5 - len(inputs) - 1)))


def check(case, p=0.0, backend="triton", seed=1234):
    """Compare every output with float64; return the errors (and torch's own for fp16)."""
    ours = run(case, p, seed, backend)
    ref = run(case, p, seed, dtype=torch.float64, weight=case.w_ref)
    dtype = case.x.dtype
    errs = {k: rel_err(ours[k], ref[k]) for k in GRADS if ref[k] is not None}
    for k in GRADS:
        if ref[k] is not None:
            assert ours[k].dtype == dtype, (k, ours[k].dtype)
    if dtype == torch.float32:
        assert max(errs.values()) <= FP32_TOL, errs
    else:
        base = run(case, p, seed, dtype=dtype, weight=case.w_torch)
        torch_errs = {k: rel_err(base[k], ref[k]) for k in errs}
        bad = {k: (errs[k], torch_errs[k]) for k in errs if errs[k] > 2 * torch_errs[k] + FP16_ATOL}
        assert not bad, f"ours vs torch-{dtype} errors: {bad}"
    return errs


# ----------------------------------------------------------------------------- correctness

DENSE_CASES = [  # (x shape, out, rank, dropout p, bias)
    ((37, 67), 45, 7, 0.0, True),
    ((37, 67), 45, 1, 0.25, False),
    ((2, 5, 33), 20, 16, 0.1, True),
    ((70, 40), 66, 16, 0.0, False),
    ((1, 17), 3, 7, 0.5, True),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape,n,r,p,bias", DENSE_CASES)
def test_dense_fp32(backend, shape, n, r, p, bias):
    check(make_case(shape, n, r, torch.float32, bias), p, backend)


@pytest.mark.parametrize("shape,n,r,p,bias", [DENSE_CASES[0], DENSE_CASES[1], DENSE_CASES[2]])
def test_dense_fp16(shape, n, r, p, bias):
    check(make_case(shape, n, r, torch.float16, bias), p)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_4bit(quant_type, double_quant, dtype):
    # blocksize 32 with in=67: quantization blocks straddle rows; out*in is odd (padded byte)
    case = make_case((37, 67), 45, 7, dtype, bias=dtype == torch.float32,
                     quant=(quant_type, double_quant, 32), seed=3)
    check(case, p=0.2 if double_quant else 0.0)


def test_4bit_torch_backend_and_3d():
    case = make_case((2, 5, 33), 20, 16, torch.float32, True, quant=("nf4", True, 64), seed=4)
    check(case, 0.1, backend="torch")
    check(case, 0.1, backend="triton")


@pytest.mark.parametrize("layout,shape", [("transposed", (37, 67)), ("strided", (2, 5, 33)),
                                          ("permuted", (2, 5, 33))])
def test_noncontiguous_x(layout, shape):
    case = make_case(shape, 30, 7, torch.float32, True, layout=layout, seed=5)
    assert not case.x.is_contiguous()
    check(case, 0.3)


@pytest.mark.parametrize("r", [64, 128])
def test_large_ranks(r):
    check(make_case((19, 33), 20, r, torch.float32, True, seed=6), 0.1)


def poison(*args, **kwargs):
    """torch.empty's stand-in: NaN for floats, 0x5A for integer buffers (the keep bits)."""
    dtype = kwargs.get("dtype") or torch.get_default_dtype()
    return torch.full(*args, float("nan") if dtype.is_floating_point else 0x5A, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,blocksize,quant_type,in_loop", [
    (67, 32, "fp4", False),   # blocks straddle rows, odd element count: the dequantize buffer
    (64, 32, "fp4", True),    # K-loop unpack, two blocks per 64-wide tile
    (128, 128, "nf4", True),  # K-loop unpack, a block wider than the tile
])
def test_4bit_tiles_equal_dequantize_4bit(dtype, k, blocksize, quant_type, in_loop, monkeypatch):
    """x = I and B = 0 make y = Wᵀ and (with dY = I) dX = W exactly: the kernels' dequantized
    tiles must be dequantize_4bit's numbers bit for bit, on the path the shape takes."""
    n = 45
    calls = []
    real = engine.BaseWeight.dequantized
    monkeypatch.setattr(engine.BaseWeight, "dequantized",  # the engine's buffer (Triton), not the torch reference
                        lambda self, dt, backend="triton": calls.append(backend == "triton") or real(self, dt, backend))
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(7)).to(DEV)
    packed, state = quantize_4bit(w, quant_type, blocksize, double_quant=True, backend="torch")
    expect = dequantize_4bit(packed, state, dtype, backend="torch")
    x = torch.eye(k, dtype=dtype, device=DEV)
    A = torch.randn(3, k, dtype=dtype, device=DEV)
    B = torch.zeros(n, 3, dtype=dtype, device=DEV)
    y = lora_linear(x, packed, A, B, 2.0, quant_state=state, backend="triton")
    assert torch.equal(y.t(), expect)
    xx = torch.zeros(n, k, dtype=dtype, device=DEV).requires_grad_()
    (dx,) = torch.autograd.grad(lora_linear(xx, packed, A, B, 2.0, quant_state=state, backend="triton"),
                                xx, torch.eye(n, dtype=dtype, device=DEV))
    assert torch.equal(dx, expect)
    assert any(calls) != in_loop  # the buffer was used exactly where the in-loop unpack cannot run


@pytest.mark.parametrize("quant", [None, ("nf4", True, 64)])
def test_launchers_write_every_element(monkeypatch, quant):
    """Launcher outputs are poisoned: any element a kernel forgets to write fails."""
    monkeypatch.setattr(kernel_backend, "_empty", poison)  # every kernel output is allocated through it
    check(make_case((37, 64), 45, 7, torch.float32, True, quant=quant, seed=8), 0.25)


PATHS = {  # name → configs attributes to set; every path must give the reference's numbers
    "buffer": dict(DEQUANT_BUFFER_MIN_M=0),
    "tma": dict(arch_of=lambda device: 90),
    "wide tiles": dict(FORCE_TILE=configs.WIDE),
    "square tiles, tma": dict(FORCE_TILE=configs.SQUARE, arch_of=lambda device: 90),
    "wide in-loop unpack": dict(FORCE_TILE=configs.WIDE),
    "split reductions": dict(INTERPRETER_SMS=64, MIN_SPLIT_ROWS=16),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("quant", [None, ("nf4", True, 64), ("fp4", False, 32)])
def test_engine_paths(path, quant, monkeypatch):
    for name, value in PATHS[path].items():
        monkeypatch.setattr(configs, name, value)
    monkeypatch.setattr(kernel_backend, "_empty", poison)  # every kernel output is allocated through it
    check(make_case((2, 45, 128), 72, 5, torch.float32, True, quant=quant, seed=9), 0.2)


def test_engine_paths_fp16_tma(monkeypatch):
    monkeypatch.setattr(configs, "arch_of", lambda device: 90)
    check(make_case((45, 64), 40, 16, torch.float16, True, seed=15), 0.1)


def test_split_reductions_are_deterministic(monkeypatch):
    """Split-M / split-K partials are summed in a fixed order: two runs are bitwise equal."""
    monkeypatch.setattr(configs, "INTERPRETER_SMS", 64)
    monkeypatch.setattr(configs, "MIN_SPLIT_ROWS", 16)
    case = make_case((90, 96), 40, 6, torch.float32, True, seed=16)
    first, second = run(case, 0.3), run(case, 0.3)
    assert all(torch.equal(first[k], second[k]) for k in GRADS)


def test_empty_batch():
    case = make_case((0, 33), 20, 7, torch.float32, True)
    out = run(case, 0.1)
    assert out["y"].shape == (0, 20) and out["dx"].shape == (0, 33)
    assert out["dA"].abs().sum() == 0 and out["dB"].abs().sum() == 0 and out["dbias"].abs().sum() == 0


def test_only_adapter_gradients():
    """x and bias frozen: only dA, dB are computed; the base weight never gets a gradient."""
    case = make_case((37, 67), 45, 7, torch.float32, True, seed=10)
    A, B = case.lora_A.clone().requires_grad_(), case.lora_B.clone().requires_grad_()
    y = lora_linear(case.x, case.weight, A, B, case.scaling, case.bias, 0.1, backend="triton", seed=3)
    y.backward(case.dy)
    ref = run(case, 0.1, seed=3, dtype=torch.float64, weight=case.w_ref)
    assert rel_err(A.grad, ref["dA"]) < FP32_TOL and rel_err(B.grad, ref["dB"]) < FP32_TOL
    assert case.weight.grad is None


def test_expanded_grad_and_no_grad():
    """y.sum().backward() hands the backward a stride-0 dY; under no_grad nothing is saved."""
    case = make_case((2, 5, 33), 20, 7, torch.float32, True, seed=14)
    x = case.x.clone().requires_grad_()
    lora_linear(x, case.weight, case.lora_A, case.lora_B, 1.0, case.bias, backend="triton").sum().backward()
    expect = case.weight.sum(0) + (case.lora_B.sum(0) @ case.lora_A)
    assert rel_err(x.grad, expect.double().expand(2, 5, 33)) < FP32_TOL
    with torch.no_grad():
        y = lora_linear(x, case.weight, case.lora_A, case.lora_B, 1.0, backend="triton")
    assert y.grad_fn is None


def test_autocast_bf16():
    """Under autocast the fp32 inputs are cast to bf16; gradients reach the fp32 parameters."""
    case = make_case((37, 67), 45, 7, torch.float32, True, seed=11)
    A, B = case.lora_A.clone().requires_grad_(), case.lora_B.clone().requires_grad_()
    x = case.x.clone().requires_grad_()
    with torch.autocast(DEV, dtype=torch.bfloat16):
        y = lora_linear(x, case.weight, A, B, 1.5, case.bias, 0.0, backend="triton")
    assert y.dtype == torch.bfloat16
    y.float().backward(case.dy)
    assert x.grad.dtype == A.grad.dtype == torch.float32
    bf = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    ref = run(SimpleNamespace(x=bf(x), lora_A=bf(A), lora_B=bf(B), bias=bf(case.bias), dy=case.dy.double(),
                              scaling=1.5), dtype=torch.float64, weight=bf(case.weight))
    for name, got in (("y", y), ("dx", x.grad), ("dA", A.grad), ("dB", B.grad)):
        assert rel_err(got, ref[name]) < 2e-2, name


# ----------------------------------------------------------------------------- bad inputs

def _bad(**change):
    case = make_case((4, 8), 6, 2, torch.float32, True, device="cpu")
    kw = dict(x=case.x, weight=case.weight, lora_A=case.lora_A, lora_B=case.lora_B, scaling=1.0,
              bias=case.bias, dropout_p=0.0, quant_state=None)
    kw.update(change)
    return kw


def _qstate(**change):
    packed, state = quantize_4bit(torch.randn(6, 8), "nf4", 32, double_quant=False, backend="torch")
    for key, value in change.items():
        setattr(state, key, value)
    return packed, state


BAD_INPUTS = [
    (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), ValueError, "rank must be >= 1"),
    (dict(lora_A=torch.randn(2, 9)), ValueError, r"lora_A is \[2, 9\]"),
    (dict(lora_B=torch.randn(6, 3)), ValueError, "lora_A's rank is 2"),
    (dict(lora_B=torch.randn(5, 2)), ValueError, "base weight has 6 outputs"),
    (dict(bias=torch.randn(5)), ValueError, r"bias must be \[6\]"),
    (dict(weight=torch.randn(6, 9)), ValueError, "input features"),
    (dict(weight=torch.randn(6, 8, dtype=torch.float16)), TypeError, "weight dtype"),
    (dict(lora_A=torch.randn(2, 8, dtype=torch.float64)), TypeError, "lora_A dtype"),
    (dict(lora_B=torch.randn(6, 2, dtype=torch.float16)), TypeError, "lora_B dtype"),
    (dict(x=torch.randint(0, 3, (4, 8))), TypeError, "x must be float32"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(weight=torch.zeros(24, 1, dtype=torch.uint8)), TypeError, "no quant_state"),
    (dict(quant_state=_qstate()[1]), TypeError, "must be the packed uint8"),
    (dict(weight=torch.zeros(5, 1, dtype=torch.uint8), quant_state=_qstate()[1]), ValueError, "needs 24"),
    (dict(weight=_qstate()[0], quant_state=_qstate(shape=torch.Size([8, 6]))[1]), ValueError, "input features"),
    (dict(weight=_qstate()[0], quant_state=_qstate(absmax=torch.ones(5))[1]), ValueError, "absmax has 5"),
    (dict(scaling="2"), TypeError, "scaling"),
]


@pytest.mark.parametrize("change,err,match", BAD_INPUTS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs(change, err, match, backend):
    with pytest.raises(err, match=match):
        lora_linear(**_bad(**change), backend=backend)


def test_bad_device_and_seed_and_frozen_base():
    meta = torch.empty(6, 2, device="meta")
    with pytest.raises(ValueError, match="one device"):
        lora_linear(**_bad(lora_B=meta), backend="torch")
    with pytest.raises(ValueError, match="seed"):
        lora_linear(**_bad(dropout_p=0.1), seed=-1)
    frozen = {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in _bad().items()}
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(**dict(frozen, weight=torch.randn(6, 8, device=DEV, requires_grad=True)), backend="triton")


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="bf16 kernels are only exact on a GPU")
@pytest.mark.parametrize("quant", [None, ("nf4", True, 64), ("fp4", False, 128)])
def test_bf16_gpu(quant):
    case = make_case((2, 100, 256), 384, 16, torch.bfloat16, True, quant=quant, seed=13)
    check(case, 0.1)  # 2 × torch-bf16's error vs fp64 + FP16_ATOL
