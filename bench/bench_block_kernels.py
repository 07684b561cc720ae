"""Benchmark: the transformer-block kernels (RMSNorm, RoPE, SwiGLU, fused lm_head + cross-entropy,
and the LoRA MLP / QKV blocks) against the HF modules they replace, on a GPU, at Llama-3-8B-like shapes.

Shapes: 8192 tokens (batch 4 × 2048), hidden 4096, intermediate 14336, 32 query / 8 key-value
heads of dim 128, vocab 128256; bf16. Modes: "fwd" and "fwd+bwd" (gradients by
torch.autograd.grad, so no .grad accumulation is timed). Baseline "hf_module": LlamaRMSNorm /
GemmaRMSNorm, HF's apply_rotary_pos_emb, `ACT2FN["silu"](gate) * up`, and lm_head (F.linear) +
HF's ForCausalLMLoss (fp32 upcast of the logits). ratio = ours_ms / baseline_ms (< 1: ours
faster). achieved: GB/s of the nominal bytes (elementwise ops; ceiling_pct against a
device-to-device copy measured in the same run) or TFLOP/s (cross-entropy; against a bf16
8192³ GEMM measured in the same run). Cross-entropy rows also carry the peak memory of one
fwd+bwd above the inputs (peak_mem_mb, baseline_peak_mem_mb).

LoRA block rows (op "lora_mlp", "lora_qkv"; rank 16, dense bf16 base, and NF4 for the MLP):
baseline "hf_peft" is HF's unfused MLP / q,k,v projections with PEFT-style LoRA layers
(`base(x) + s·B(A(x))`; a 4-bit base dequantized per call, as bitsandbytes does). achieved =
TFLOP/s of the nominal GEMM work (3 and 6 M·H·I GEMMs for the MLP fwd and fwd+bwd: the block's
backward recomputation counts as overhead), ceiling_pct against the bf16 GEMM. saved_mem_mb /
baseline_saved_mem_mb: memory autograd holds between forward and backward (the MLP block keeps
x only). In --smoke mode these rows appear only with --lora-blocks (tests/test_bench_smoke.py
pins the smoke row set).

    python bench/bench_block_kernels.py [--out bench/results/X.json]    # GPU
    python bench/bench_block_kernels.py --smoke [--lora-blocks]          # CPU harness check
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_out, median_ms, ratio, require_cuda, row, write_rows  # noqa: E402

from trilora.kernels.cross_entropy import fused_linear_cross_entropy  # noqa: E402
from trilora.kernels.lora import Projection, lora_mlp, lora_qkv  # noqa: E402
from trilora.kernels.lora.dora_math import base_sq_norm  # noqa: E402
from trilora.kernels.rms_norm import rms_norm  # noqa: E402
from trilora.kernels.rope import apply_rotary_pos_emb  # noqa: E402
from trilora.kernels.glu import swiglu  # noqa: E402

GPU = dict(batch=4, seq=2048, hidden=4096, inter=14336, n_q=32, n_kv=8, head_dim=128, vocab=128256)
SMOKE = dict(batch=2, seq=16, hidden=64, inter=96, n_q=4, n_kv=2, head_dim=16, vocab=250)
DTYPE = torch.bfloat16
LORA_RANK = 16


def _hf():
    from transformers.activations import ACT2FN
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb as hf_rope
    return LlamaRMSNorm, GemmaRMSNorm, hf_rope, ACT2FN["silu"]


def _hf_causal_lm_loss(logits, labels):
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # older transformers: the same math
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], shift_labels=labels)


def _fwd_bwd(fn, inputs, grads=None):
    """fn(*inputs) then autograd.grad w.r.t. the inputs that require grad (fixed output grads)."""
    def run():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        return torch.autograd.grad(outs, wrt, grads if grads is not None else [torch.ones_like(o) for o in outs])
    return run


def _no_grad(fn, inputs):
    def run():
        with torch.no_grad():
            return fn(*inputs)
    return run


def _ceilings(smoke: bool, device: str) -> tuple[float | None, float | None]:
    """(copy GB/s counting bytes read + written, bf16 GEMM TFLOP/s), measured now."""
    if smoke:
        return None, None
    src = torch.empty(2**29, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy = median_ms(lambda: dst.copy_(src), smoke)
    a = torch.randn(8192, 8192, device=device, dtype=DTYPE)
    gemm = median_ms(lambda: a @ a, smoke)
    return 2 * src.numel() / copy / 1e6, 2 * 8192**3 / gemm / 1e9


def _elementwise_rows(smoke, s, device, backend, copy_gbs) -> list[dict]:
    llama_norm, gemma_norm, hf_rope, silu = _hf()
    n, h, i = s["batch"] * s["seq"], s["hidden"], s["inter"]
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device=device, dtype=DTYPE, generator=g)  # noqa: E731
    rows = []

    def add(op, mode, shape, ours_fn, base_fn, nbytes, **extra):
        ours, base = median_ms(ours_fn, smoke), median_ms(base_fn, smoke)
        achieved = None if ours is None else nbytes / ours / 1e6
        rows.append(row(smoke, op=op, mode=mode, shape=list(shape), dtype="bfloat16", rank=None,
                        ours_ms=ours, baseline="hf_module", baseline_ms=base, ratio=ratio(ours, base),
                        achieved=achieved, achieved_unit="GB/s",
                        ceiling_pct=None if achieved is None else 100 * achieved / copy_gbs, **extra))

    # RMSNorm, Llama and Gemma; the weight frozen (LoRA) and trainable
    x = rnd(n, h).requires_grad_()
    dy = rnd(n, h)
    for gemma, module in ((False, llama_norm), (True, gemma_norm)):
        op = "rms_norm_gemma" if gemma else "rms_norm"
        ref = module(h, eps=1e-6).to(device, DTYPE)
        w = ref.weight.detach().clone()
        add(op, "fwd", (n, h), _no_grad(lambda a: rms_norm(a, w, 1e-6, gemma, backend), [x]),
            _no_grad(ref, [x]), 2 * (2 * n * h) + 4 * n)
        for train_w in (False, True):
            w.requires_grad_(train_w)
            ref.weight.requires_grad_(train_w)
            add(op, "fwd+bwd", (n, h),
                _fwd_bwd(lambda a, b: rms_norm(a, b, 1e-6, gemma, backend), [x, w], [dy]),
                _fwd_bwd(lambda a, b: ref(a), [x, ref.weight], [dy]),
                2 * (2 * n * h) + 2 * (3 * n * h) + 8 * n, weight_grad=train_w)

    # RoPE on HF's layout: [B, L, H*D] projections viewed as [B, H, L, D]
    b, L, d = s["batch"], s["seq"], s["head_dim"]
    q = rnd(b, L, s["n_q"] * d).view(b, L, s["n_q"], d).transpose(1, 2).detach().requires_grad_()
    k = rnd(b, L, s["n_kv"] * d).view(b, L, s["n_kv"], d).transpose(1, 2).detach().requires_grad_()
    ang = torch.rand(b, L, d // 2, device=device) * 100
    cos, sin = (torch.cat([f(ang), f(ang)], -1).to(DTYPE) for f in (torch.cos, torch.sin))
    qk_bytes = 2 * (q.numel() + k.numel()) * 2 + 2 * cos.numel() * 2
    shape = (b, s["n_q"], s["n_kv"], L, d)
    add("rope", "fwd", shape, _no_grad(lambda a, c: apply_rotary_pos_emb(a, c, cos, sin, backend), [q, k]),
        _no_grad(lambda a, c: hf_rope(a, c, cos, sin), [q, k]), qk_bytes)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    add("rope", "fwd+bwd", shape,
        _fwd_bwd(lambda a, c: apply_rotary_pos_emb(a, c, cos, sin, backend), [q, k], [dq, dk]),
        _fwd_bwd(lambda a, c: hf_rope(a, c, cos, sin), [q, k], [dq, dk]), 2 * qk_bytes)

    # SwiGLU
    gate, up, dh = rnd(n, i).requires_grad_(), rnd(n, i).requires_grad_(), rnd(n, i)
    add("swiglu", "fwd", (n, i), _no_grad(lambda a, c: swiglu(a, c, backend), [gate, up]),
        _no_grad(lambda a, c: silu(a) * c, [gate, up]), 3 * n * i * 2)
    add("swiglu", "fwd+bwd", (n, i), _fwd_bwd(lambda a, c: swiglu(a, c, backend), [gate, up], [dh]),
        _fwd_bwd(lambda a, c: silu(a) * c, [gate, up], [dh]), 8 * n * i * 2)
    return rows


def _peak_mb(fn, smoke: bool) -> float | None:
    if smoke:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _cross_entropy_rows(smoke, s, device, backend, gemm_tflops) -> list[dict]:
    n, h, v = s["batch"] * s["seq"], s["hidden"], s["vocab"]
    g = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(n, h, device=device, dtype=DTYPE, generator=g).requires_grad_()
    weight = (torch.randn(v, h, device=device, dtype=DTYPE, generator=g) * h**-0.5)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    labels[::7] = -100
    ours_fn = lambda a, w: fused_linear_cross_entropy(a, w, labels, backend=backend)  # noqa: E731
    base_fn = lambda a, w: _hf_causal_lm_loss(F.linear(a, w), labels)  # noqa: E731
    rows = []
    for mode, train_w in (("fwd", False), ("fwd+bwd", False), ("fwd+bwd", True)):
        weight.requires_grad_(train_w)
        if mode == "fwd":
            ours_run, base_run, gemms = _no_grad(ours_fn, [hidden, weight]), _no_grad(base_fn, [hidden, weight]), 1
        else:
            ours_run, base_run = _fwd_bwd(ours_fn, [hidden, weight]), _fwd_bwd(base_fn, [hidden, weight])
            gemms = 3 if train_w else 2
        ours, base = median_ms(ours_run, smoke), median_ms(base_run, smoke)
        achieved = None if ours is None else gemms * 2 * n * v * h / ours / 1e9
        rows.append(row(smoke, op="fused_linear_cross_entropy", mode=mode, shape=[n, h, v], dtype="bfloat16",
                        rank=None, ours_ms=ours, baseline="hf_module", baseline_ms=base, ratio=ratio(ours, base),
                        achieved=achieved, achieved_unit="TFLOP/s",
                        ceiling_pct=None if achieved is None else 100 * achieved / gemm_tflops,
                        weight_grad=train_w, peak_mem_mb=_peak_mb(ours_run, smoke),
                        baseline_peak_mem_mb=_peak_mb(base_run, smoke)))
    return rows


def _saved_mb(fn, smoke: bool) -> float | None:
    """Memory held after fn's forward (its saved tensors and output) until backward."""
    if smoke:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    held = (torch.cuda.memory_allocated() - base) / 2**20
    del out
    return held


class _Linear4bitRef(torch.autograd.Function):
    """bitsandbytes' 4-bit matmul: W dequantized in forward and again in backward, only x saved."""

    @staticmethod
    def forward(ctx, x, packed, quant_state):
        from trilora.quant import dequantize_4bit
        ctx.packed, ctx.quant_state = packed, quant_state
        return F.linear(x, dequantize_4bit(packed, quant_state, x.dtype))

    @staticmethod
    def backward(ctx, dy):
        from trilora.quant import dequantize_4bit
        return dy @ dequantize_4bit(ctx.packed, ctx.quant_state, dy.dtype), None, None


def _peft_linear(x, w, a, b, scaling, quant_state):
    """A PEFT-style LoRA layer: base(x) + s·B(A(x)); a 4-bit base as bitsandbytes runs it."""
    base = F.linear(x, w) if quant_state is None else _Linear4bitRef.apply(x, w, quant_state)
    return base + F.linear(F.linear(x, a), b) * scaling


def _peft_dora_linear(x, w, a, b, scaling, quant_state, magnitude):
    """PEFT's DoRA layer (dropout 0): the LoRA layer's output rescaled by m / ‖W + s·BA‖, the
    norm detached, W dequantized for it as PEFT does over a 4-bit base."""
    from trilora.quant import dequantize_4bit
    dense = w if quant_state is None else dequantize_4bit(w, quant_state, x.dtype)
    norm = (dense.float() + scaling * (b.float() @ a.float())).norm(dim=1).detach()
    return _peft_linear(x, w, a, b, scaling, quant_state) * (magnitude / norm).to(x.dtype)


def _lora_block_rows(smoke, s, device, backend, gemm_tflops) -> list[dict]:
    from trilora.quant import quantize_4bit
    n, h, i, r = s["batch"] * s["seq"], s["hidden"], s["inter"], LORA_RANK
    nq, nkv = s["n_q"] * s["head_dim"], s["n_kv"] * s["head_dim"]
    g = torch.Generator(device=device).manual_seed(2)
    rnd = lambda *shape, scale=1.0: torch.randn(*shape, device=device, dtype=DTYPE, generator=g) * scale  # noqa: E731
    x = rnd(n, h).requires_grad_()
    scaling = 2.0
    rows = []

    def adapters(shapes):  # (A, B) leaves per (out, in)
        return [t for o, k in shapes for t in (rnd(r, k, scale=k**-0.5).requires_grad_(),
                                                rnd(o, r, scale=r**-0.5).requires_grad_())]

    def add(op, shape, quant, ours_fn, base_fn, inputs, dys, gemms_fwd):
        for mode in ("fwd", "fwd+bwd"):
            fwd = mode == "fwd"
            ours_run = _no_grad(ours_fn, inputs) if fwd else _fwd_bwd(ours_fn, inputs, dys)
            base_run = _no_grad(base_fn, inputs) if fwd else _fwd_bwd(base_fn, inputs, dys)
            ours, base = median_ms(ours_run, smoke), median_ms(base_run, smoke)
            flops = (1 if fwd else 2) * gemms_fwd
            achieved = None if ours is None else flops / ours / 1e9
            rows.append(row(smoke, op=op, mode=mode, shape=list(shape), dtype="bfloat16", rank=r, base=quant,
                            ours_ms=ours, baseline="hf_peft", baseline_ms=base, ratio=ratio(ours, base),
                            achieved=achieved, achieved_unit="TFLOP/s",
                            ceiling_pct=None if achieved is None else 100 * achieved / gemm_tflops,
                            saved_mem_mb=None if fwd else _saved_mb(lambda: ours_fn(*inputs), smoke),
                            baseline_saved_mem_mb=None if fwd else _saved_mb(lambda: base_fn(*inputs), smoke)))

    # LoRA MLP: gate, up [I, H], down [H, I]; dense and NF4 bases
    mlp_shapes = ((i, h), (i, h), (h, i))
    dense = [rnd(o, k, scale=k**-0.5) for o, k in mlp_shapes]
    for quant in ("dense", "nf4"):
        bases = [(w, None) for w in dense] if quant == "dense" else \
            [quantize_4bit(w, "nf4", 64, True, backend=backend) for w in dense]

        def ours_mlp(xx, *ab, bases=bases):
            projs = [Projection(w, qs, ab[2 * j], ab[2 * j + 1], scaling) for j, (w, qs) in enumerate(bases)]
            return lora_mlp(xx, *projs, backend=backend)

        def base_mlp(xx, *ab, bases=bases):
            def lin(t, j):
                return _peft_linear(t, bases[j][0], ab[2 * j], ab[2 * j + 1], scaling, bases[j][1])
            return lin(F.silu(lin(xx, 0)) * lin(xx, 1), 2)  # down(act(gate(x)) * up(x))
        add("lora_mlp", (n, h, i), quant, ours_mlp, base_mlp, [x, *adapters(mlp_shapes)], [rnd(n, h)],
            3 * 2 * n * h * i)

    # DoRA MLP over NF4: magnitudes fp32 as the adapter layer keeps them, ‖W‖² cached as patching does
    bases = [quantize_4bit(w, "nf4", 64, True, backend=backend) for w in dense]
    sq = [base_sq_norm(w, qs) for w, qs in bases]
    ab = adapters(mlp_shapes)
    mags = [sq_j.sqrt().requires_grad_() for sq_j in sq]  # DoRA's init: m = ‖W‖

    def ours_dora_mlp(xx, *abm):
        projs = [Projection(w, qs, abm[2 * j], abm[2 * j + 1], scaling, magnitude=abm[6 + j], weight_sq=sq[j])
                 for j, (w, qs) in enumerate(bases)]
        return lora_mlp(xx, *projs, backend=backend)

    def base_dora_mlp(xx, *abm):
        def lin(t, j):
            return _peft_dora_linear(t, bases[j][0], abm[2 * j], abm[2 * j + 1], scaling, bases[j][1], abm[6 + j])
        return lin(F.silu(lin(xx, 0)) * lin(xx, 1), 2)
    add("lora_mlp_dora", (n, h, i), "nf4", ours_dora_mlp, base_dora_mlp, [x, *ab, *mags], [rnd(n, h)],
        3 * 2 * n * h * i)

    # LoRA QKV: q [Hq·D, H], k and v [Hkv·D, H], dense bases
    qkv_shapes = ((nq, h), (nkv, h), (nkv, h))
    qkv_w = [rnd(o, k, scale=k**-0.5) for o, k in qkv_shapes]

    def ours_qkv(xx, *ab):
        return lora_qkv(xx, *[Projection(w, None, ab[2 * j], ab[2 * j + 1], scaling) for j, w in enumerate(qkv_w)],
                        backend=backend)

    def base_qkv(xx, *ab):
        return tuple(_peft_linear(xx, w, ab[2 * j], ab[2 * j + 1], scaling, None) for j, w in enumerate(qkv_w))
    add("lora_qkv", (n, h, nq, nkv), "dense", ours_qkv, base_qkv, [x, *adapters(qkv_shapes)],
        [rnd(n, nq), rnd(n, nkv), rnd(n, nkv)], 2 * n * h * (nq + 2 * nkv))
    return rows


def bench(smoke: bool, lora_blocks: bool | None = None) -> list[dict]:
    require_cuda(smoke)
    device = "cpu" if smoke else "cuda"
    backend = "torch" if smoke else "triton"
    shapes = SMOKE if smoke else GPU
    copy_gbs, gemm_tflops = _ceilings(smoke, device)
    rows = _elementwise_rows(smoke, shapes, device, backend, copy_gbs)
    rows += _cross_entropy_rows(smoke, shapes, device, backend, gemm_tflops)
    if lora_blocks if lora_blocks is not None else not smoke:
        rows += _lora_block_rows(smoke, shapes, device, backend, gemm_tflops)
    for r in rows:
        r["copy_gbs"], r["gemm_tflops"] = copy_gbs, gemm_tflops
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run through the torch paths, no timings")
    parser.add_argument("--out", type=Path, help="JSON file to append rows to")
    parser.add_argument("--lora-blocks", action=argparse.BooleanOptionalAction, default=None,
                        help="the LoRA MLP/QKV block rows (default: on a GPU, off with --smoke)")
    args = parser.parse_args(argv)
    rows = bench(args.smoke, args.lora_blocks)
    for r in rows:
        print({k: r.get(k) for k in ("op", "mode", "shape", "weight_grad", "ours_ms", "baseline_ms", "ratio",
                                     "achieved", "ceiling_pct", "peak_mem_mb", "baseline_peak_mem_mb",
                                     "base", "saved_mem_mb", "baseline_saved_mem_mb") if k in r})
    if args.out or not args.smoke:
        write_rows(rows, args.out or default_out(args.smoke))


if __name__ == "__main__":
    main()
