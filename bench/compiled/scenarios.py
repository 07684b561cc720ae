"""The launches the compiled-code report compiles: every kernel through its real launcher.

Shapes are Llama-3-8B's (hidden 4096, intermediate 14336, GQA q/k/v 4096/1024/1024, vocab
128256), bf16 unless a label says otherwise, LoRA rank 16, NF4 with double quantization
(blocksize 64). M = 8192 tokens is the training regime; M = 64 the evaluation/generation
regime (where 4-bit weights are unpacked inside the GEMM's K-loop). Tensors are CPU tensors:
under the stand-in driver nothing is launched, only compiled (torch.empty never touches memory).
The LoRA ops are entered at their autograd Functions, below the public functions' check that
refuses CPU tensors outside the interpreter: the launchers and everything they decide are the
real ones.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch

H, INTER, KV, VOCAB, RANK = 4096, 14336, 1024, 128256, 16
TRAIN_M, SMALL_M = 8192, 64
BF16 = torch.bfloat16


def nf4_state(n_out: int, k_in: int, nested: bool = True, blocksize: int = 64) -> tuple:
    """(packed bytes, a QuantState-like object) of the right shapes and dtypes (values unused)."""
    n = n_out * k_in
    nblocks = -(-n // blocksize)
    state = SimpleNamespace(code=torch.linspace(-1, 1, 16), blocksize=blocksize, shape=(n_out, k_in),
                            absmax=torch.ones(nblocks), nested_absmax=None, nested_code=None, offset=None,
                            nested_blocksize=256)
    if nested:
        state.absmax = torch.zeros(nblocks, dtype=torch.uint8)
        state.nested_absmax = torch.ones(-(-nblocks // 256))
        state.nested_code = torch.linspace(-1, 1, 256)
        state.offset = torch.tensor(0.01)
    return torch.zeros(((n + 1) // 2, 1), dtype=torch.uint8), state


@contextlib.contextmanager
def settings(**values):
    """Temporarily set `trilora.kernels.lora.configs` attributes (USE_TMA, FORCE_TILE, ...)."""
    from trilora.kernels.lora import configs
    saved = {k: getattr(configs, k) for k in values}
    for k, v in values.items():
        setattr(configs, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(configs, k, v)


def _lora_linear(m, k, n, quant, p, dtype=BF16):
    from trilora.kernels.lora.engine import BaseWeight
    from trilora.kernels.lora.linear import LoRALinearFunction
    x = torch.empty(m, k, dtype=dtype, requires_grad=True)
    A = torch.empty(RANK, k, dtype=dtype, requires_grad=True)
    B = torch.empty(n, RANK, dtype=dtype, requires_grad=True)
    w, qs = (torch.empty(n, k, dtype=dtype), None) if quant is None else nf4_state(n, k, nested=quant == "nf4-dq")
    y = LoRALinearFunction.apply(x, BaseWeight.of(w, qs), A, B, None, 2.0, p, 1, p > 0)
    y.backward(torch.empty_like(y))


def _dora_linear(m, k, n, quant):
    """DoRA's fused GEMM: the LoRA GEMM with the rescale m/n and the bias in its epilogue."""
    from trilora.kernels.lora.dora import DoRALinearFunction
    from trilora.kernels.lora.dora_math import Rescale
    from trilora.kernels.lora.engine import BaseWeight
    x = torch.empty(m, k, dtype=BF16, requires_grad=True)
    A = torch.empty(RANK, k, dtype=BF16, requires_grad=True)
    B = torch.empty(n, RANK, dtype=BF16, requires_grad=True)
    mag = torch.ones(n, requires_grad=True)
    w, qs = (torch.empty(n, k, dtype=BF16), None) if quant is None else nf4_state(n, k)
    y = DoRALinearFunction.apply(x, BaseWeight.of(w, qs), A, B, torch.empty(n, dtype=BF16), 2.0, mag,
                                 Rescale(torch.ones(n), torch.ones(n)))
    y.backward(torch.empty_like(y))


@contextlib.contextmanager
def steady_rescales():
    """DoRA's `Rescale.of` compiled as it runs, its values then replaced by ones: no kernel runs
    under the stand-in driver, so the norms would be whatever memory held (and the backward's
    c == 0 branch, which compiles one more GEMM, would come and go between runs)."""
    from trilora.kernels.lora.dora_math import Rescale
    real = Rescale.of

    def of(*args, **kwargs):
        c = real(*args, **kwargs).col_scale
        return Rescale(torch.ones_like(c), torch.ones_like(c))
    Rescale.of = staticmethod(of)
    try:
        yield
    finally:
        Rescale.of = staticmethod(real)


def _block(m, kind, quant, p=0.0, dora=False):
    from trilora.kernels.lora import Projection
    from trilora.kernels.lora.mlp import LoRAMLPFunction
    from trilora.kernels.lora.projections import LoRAProjectionsFunction

    def proj(n_out, k_in):
        w, qs = (torch.empty(n_out, k_in, dtype=BF16), None) if quant is None else nf4_state(n_out, k_in)
        mag = torch.ones(n_out, requires_grad=True) if dora else None
        return Projection(w, qs, torch.empty(RANK, k_in, dtype=BF16, requires_grad=True),
                          torch.empty(n_out, RANK, dtype=BF16, requires_grad=True), 2.0, None, mag,
                          torch.ones(n_out) if dora else None)
    x = torch.empty(m, H, dtype=BF16, requires_grad=True)
    if kind == "qkv":
        projs = (proj(H, H), proj(KV, H), proj(KV, H))
        outs = LoRAProjectionsFunction.apply(x, projs, p, 1, p > 0, *[t for q in projs for t in q.trainables()])
    else:
        projs = (proj(INTER, H), proj(INTER, H), proj(H, INTER))
        outs = (LoRAMLPFunction.apply(x, projs, "silu", p, 1, p > 0, *[t for q in projs for t in q.trainables()]),)
    torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])


def _base_only(m, quant, grad):
    """A base-only projection x Wᵀ (DoRA: W Aᵀ for the row norms with m = r, and (x − x̃) Wᵀ
    under dropout with m = tokens)."""
    from trilora.kernels.lora import Projection
    from trilora.kernels.lora.projections import LoRAProjectionsFunction
    w, qs = (torch.empty(H, H, dtype=BF16), None) if quant is None else nf4_state(H, H)
    x = torch.empty(m, H, dtype=BF16, requires_grad=grad)
    proj = Projection(w, qs)
    (y,) = LoRAProjectionsFunction.apply(x, (proj,), 0.0, 1, False, *proj.trainables())
    if grad:
        y.backward(torch.empty_like(y))


def lora_scenarios():
    """(label, thunk) of the LoRA GEMM family."""
    for quant in (None, "nf4-dq"):
        name = quant or "bf16"
        for n in (H, INTER):
            for p in (0.0, 0.1):
                yield f"lora_linear {name} M={TRAIN_M} {H}->{n} p={p}", lambda n=n, p=p, q=quant: _lora_linear(
                    TRAIN_M, H, n, q, p)
        yield (f"lora_linear {name} M={TRAIN_M} {INTER}->{H} p=0.0",
               lambda q=quant: _lora_linear(TRAIN_M, INTER, H, q, 0.0))
        yield f"lora_linear {name} M={SMALL_M} {H}->{H} p=0.0", lambda q=quant: _lora_linear(SMALL_M, H, H, q, 0.0)
        yield (f"lora_linear {name} M={SMALL_M} {H}->{INTER} p=0.1",
               lambda q=quant: _lora_linear(SMALL_M, H, INTER, q, 0.1))
    yield f"lora_linear nf4 (single quant) M={SMALL_M} {H}->{H}", lambda: _lora_linear(SMALL_M, H, H, "nf4", 0.0)
    yield f"lora_linear fp16 M={TRAIN_M} {H}->{H} p=0.1", lambda: _lora_linear(TRAIN_M, H, H, None, 0.1, torch.float16)
    yield f"lora_linear fp32 M={TRAIN_M} {H}->{H} p=0.0", lambda: _lora_linear(TRAIN_M, H, H, None, 0.0, torch.float32)
    with_pointers = settings(USE_TMA=False)
    yield f"lora_linear bf16 M={TRAIN_M} {H}->{H} p=0.1 tma=off", lambda: _with(with_pointers, _lora_linear,
                                                                                   TRAIN_M, H, H, None, 0.1)
    from trilora.kernels.lora import configs
    # the dense kernel at the in-loop unpack's tile: the denominator of the unpack's cost
    yield f"lora_linear bf16 M={SMALL_M} {H}->{H} tile=unpack tma=off", lambda: _with(
        settings(USE_TMA=False, FORCE_TILE=configs.UNPACK), _lora_linear, SMALL_M, H, H, None, 0.0)
    for quant in (None, "nf4-dq"):
        for m in (TRAIN_M, SMALL_M):
            yield f"lora_qkv {quant or 'bf16'} M={m} p=0.1", lambda m=m, q=quant: _block(m, "qkv", q, 0.1)
    yield f"lora_mlp nf4-dq M={TRAIN_M} p=0.1", lambda: _block(TRAIN_M, "mlp", "nf4-dq", 0.1)
    yield f"lora_mlp nf4-dq M={SMALL_M} p=0.0", lambda: _block(SMALL_M, "mlp", "nf4-dq", 0.0)
    # DoRA in the blocks: the rescale in the epilogue of the in-loop unpack (and the norm's W Aᵀ)
    yield f"lora_mlp dora nf4-dq M={SMALL_M} p=0.0", lambda: _with(steady_rescales(), _block, SMALL_M, "mlp",
                                                                   "nf4-dq", 0.0, True)
    for quant in (None, "nf4-dq"):
        yield (f"dora_linear {quant or 'bf16'} M={TRAIN_M} {H}->{H} (epilogue rescale)",
               lambda q=quant: _dora_linear(TRAIN_M, H, H, q))
    # DoRA beyond lora_linear: the norm's W Aᵀ (M = r, no grad) and, under dropout, (x − x̃) Wᵀ
    yield f"dora norm W A^T nf4-dq M={RANK}", lambda: _base_only(RANK, "nf4-dq", False)
    yield f"dora base (x - x~) W^T nf4-dq M={TRAIN_M}", lambda: _base_only(TRAIN_M, "nf4-dq", True)


def _with(context, fn, *args):
    with context:
        fn(*args)


def quant_scenarios():
    """(label, thunk) of the 4-bit format kernels."""
    from trilora.kernels.dequantize_4bit import dequantize_4bit_triton
    from trilora.kernels.quantize_blockwise import quantize_4bit_triton, quantize_8bit_blockwise_triton
    for nested in (False, True):
        w, qs = nf4_state(INTER, H, nested)
        kw = dict(nested_absmax=qs.nested_absmax, nested_code=qs.nested_code, offset=qs.offset.reshape(1),
                  nested_blocksize=256) if nested else {}
        yield (f"dequantize_4bit {INTER}x{H} nested={nested}",
               lambda w=w, qs=qs, kw=kw: dequantize_4bit_triton(w.reshape(-1), qs.absmax, qs.code, 64,
                                                               INTER * H, BF16, **kw))
    for qt in ("nf4", "fp4"):
        yield f"quantize_4bit {qt} {INTER}x{H}", lambda qt=qt: quantize_4bit_triton(
            torch.empty(INTER * H, dtype=BF16), 64, qt)
    yield "quantize_8bit nested absmax", lambda: quantize_8bit_blockwise_triton(
        torch.empty(INTER * H // 64), 256, torch.tensor([0.01]))


def block_scenarios():
    """(label, thunk) of the transformer-block kernels (norm, RoPE, GLU, cross-entropy)."""
    from importlib import import_module  # trilora.kernels re-exports functions named like these modules
    CE, RN, RP, GLU, MLP = (import_module(f"trilora.kernels.{m}") for m in
                            ("cross_entropy", "rms_norm", "rope", "glu", "lora.mlp"))
    e = lambda *s, dt=BF16: torch.empty(*s, dtype=dt)  # noqa: E731
    m = TRAIN_M
    for act in GLU.ACTIVATIONS:  # the LoRA MLP's [g | u] halves, its backward in place
        yield f"glu fwd {act}", lambda act=act: MLP._glu_forward(e(m, 2 * INTER), act)
        yield f"glu bwd {act}", lambda act=act: MLP._glu_backward(e(m, INTER), e(m, 2 * INTER), act, True)
    # swiglu() on two contiguous tensors (one long row)
    yield "swiglu fwd", lambda: GLU.glu_forward(e(m, INTER), e(m, INTER), "silu")
    yield "swiglu bwd", lambda: GLU.glu_backward(e(m, INTER), e(m, INTER), e(m, INTER), "silu")
    for gemma in (False, True):
        yield f"rms_norm fwd gemma={gemma}", lambda g=gemma: RN.rms_norm_forward(e(m, H), e(H), 1e-6, g)
        yield f"rms_norm bwd gemma={gemma}", lambda g=gemma: RN.rms_norm_backward(
            e(m, H), e(m, H), e(H), torch.empty(m), g, True)
    for bw in (False, True):
        yield f"rope backward={bw}", lambda bw=bw: RP.rope_apply(e(1, 32, 2048, 128), e(1, 8, 2048, 128),
                                                                  e(1, 2048, 128), e(1, 2048, 128), backward=bw)
    labels = torch.zeros(256, dtype=torch.int64)
    for smoothing in (0.0, 0.1):
        for grad in (False, True):
            yield (f"cross_entropy V={VOCAB} smoothing={smoothing} grad={grad}",
                   lambda s=smoothing, g=grad: CE.cross_entropy_rows(
                       logits := e(256, VOCAB), labels, label_smoothing=s, grad=logits if g else None))


def all_scenarios():
    yield from lora_scenarios()
    yield from quant_scenarios()
    yield from block_scenarios()
