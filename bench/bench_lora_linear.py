"""Benchmark: the fused LoRA linear (`trilora.kernels.lora.linear`), dense bf16 and 4-bit NF4, on a GPU.

Llama-3-8B projection shapes (in → out) 4096→4096, 4096→14336, 14336→4096; tokens M ∈ {2048,
8192, 16384}; ranks {16, 64}; "fwd" and "fwd+bwd" (base weight frozen: dX, dA, dB).
Rows (shape = [M, in, out]), each against a baseline of the same shape, timed in the same run:
  op "lora_linear"  (dense bf16 W):  "dense_bf16"      F.linear(x, W) alone: no adapter, the floor
                                     "torch_lora_bf16" the unfused PyTorch LoRA (cuBLAS GEMMs)
  op "qlora_linear" (NF4 W, double quant, blocksize 64):
                                     "dense_bf16"      F.linear(x, W) on a bf16 W
                                     "dequant_cublas"  dequantize_4bit, then the unfused PyTorch
                                                       LoRA (cuBLAS GEMM + addmm) on that buffer
                                     "peft_bnb"        PEFT's LoRA layer over a bitsandbytes
                                                       Linear4bit (HF's standard QLoRA path)
ratio = ours / baseline time (< 1: ours is faster). achieved = our TFLOP/s from model FLOPs
(forward 2MNK + 2Mr(K+N); the backward adds one base GEMM (dX) and twice the adapter term, no dW);
ceiling_pct = achieved / the bf16 dense GEMM rate (8192³ cuBLAS) measured in the same run.

    python bench/bench_lora_linear.py [--out bench/results/X.json]            # GPU, the default paths
    python bench/bench_lora_linear.py --sweep [--out ...]                      # GPU, the tuning table
    python bench/bench_lora_linear.py --smoke [--sweep]                        # CPU harness check

--sweep times the engine's alternatives on the same shapes (op "sweep", one row per
configuration, baseline = dense bf16 F.linear): every tile of `configs` forced in turn, TMA on and
off, and for NF4 the K-loop unpack against the dequantize-once buffer at each M, so that the
heuristics in trilora/kernels/lora/configs.py can be replaced by measured choices.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_out, median_ms, ratio, require_cuda, row, write_rows  # noqa: E402

from trilora.kernels.lora import configs, dora_linear, dora_linear_ref, lora_linear, lora_linear_ref  # noqa: E402
from trilora.kernels.lora.dora import base_sq_norm  # noqa: E402
from trilora.quant import dequantize_4bit, quantize_4bit  # noqa: E402

GPU_GRID = dict(shapes=[(4096, 4096), (4096, 14336), (14336, 4096)], tokens=[2048, 8192, 16384], ranks=[16, 64])
SMOKE_GRID = dict(shapes=[(64, 48)], tokens=[8], ranks=[4])
SWEEP_GRID = dict(shapes=[(4096, 4096), (4096, 14336), (14336, 4096)], tokens=[16, 256, 1024, 8192], ranks=[16])
MODES = ("fwd", "fwd+bwd")
SCALING = 2.0


def model_flops(m: int, k: int, n: int, r: int, mode: str) -> float:
    base, adapter = 2.0 * m * n * k, 2.0 * m * r * (k + n)
    # backward: dX = dY W + (dY B) A, dA = uᵀ x, dB = dYᵀ t: one more base GEMM, two more adapter terms
    return base + adapter if mode == "fwd" else 2 * base + 3 * adapter


def gemm_ceiling_tflops(smoke: bool) -> float | None:
    """bf16 dense GEMM rate of this card, 8192³ through cuBLAS, measured now."""
    if smoke:
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / median_ms(lambda: a @ b, smoke) / 1e9


def runner(fn, grads: list[torch.Tensor], dy: torch.Tensor, mode: str):
    """fn() alone under no_grad ("fwd"), or forward + backward into `grads` ("fwd+bwd")."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn()
    else:
        def step():
            for t in grads:
                t.grad = None
            fn().backward(dy)
    return step


def ops(m: int, k: int, n: int, r: int, smoke: bool):
    """Yield (op, ours, {baseline: fn}, row extras, tensors that get gradients, dY)."""
    device, backend = ("cpu", "torch") if smoke else ("cuda", "triton")
    dt = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dt, generator=g).requires_grad_()
    w = (torch.randn(n, k, device=device, generator=g) / k**0.5).to(dt)
    A = (torch.randn(r, k, device=device, generator=g) / k**0.5).to(dt).requires_grad_()
    B = (torch.randn(n, r, device=device, generator=g) / r**0.5).to(dt).requires_grad_()
    dy = torch.randn(m, n, device=device, dtype=dt, generator=g)
    packed, state = quantize_4bit(w, "nf4", 64, double_quant=True, backend=backend)
    dense = lambda: F.linear(x, w)  # noqa: E731
    unfused_4bit = lambda: lora_linear_ref(x, dequantize_4bit(packed, state, dt, backend=backend),  # noqa: E731
                                           A, B, SCALING)
    yield ("lora_linear", lambda: lora_linear(x, w, A, B, SCALING, backend=backend),
           {"dense_bf16": dense, "torch_lora_bf16": lambda: lora_linear_ref(x, w, A, B, SCALING)},
           {}, [x, A, B], dy)
    baselines = {"dense_bf16": dense, "dequant_cublas": unfused_4bit}
    peft_layer = peft_bnb_layer(w, A, B, device)
    if peft_layer is not None:  # PEFT's LoRA layer over a bitsandbytes 4-bit base
        baselines["peft_bnb"] = lambda: peft_layer(x)
    nf4 = {"quant_type": "nf4", "double_quant": True, "blocksize": 64}
    qlora = lambda: lora_linear(x, packed, A, B, SCALING, quant_state=state, backend=backend)  # noqa: E731
    yield ("qlora_linear", qlora, baselines, nf4, [x, A, B], dy)
    # DoRA over the same NF4 base: targets ≤ 1.15× our QLoRA fwd+bwd, ≥ 1.5× faster than PEFT's DoRA
    mag = (base_sq_norm(packed, state).sqrt() * 1.1).requires_grad_()
    sq = base_sq_norm(packed, state)
    dora_baselines = {"qlora_linear": qlora,
                      "torch_dora_ref": lambda: dora_linear_ref(x, packed, A, B, SCALING, mag, quant_state=state)}
    peft_dora = peft_bnb_layer(w, A, B, device, dora=True)
    if peft_dora is not None:
        dora_baselines["peft_bnb_dora"] = lambda: peft_dora(x)
    yield ("dora_linear", lambda: dora_linear(x, packed, A, B, SCALING, mag, quant_state=state, backend=backend,
                                              weight_sq=sq),
           dora_baselines, nf4, [x, A, B, mag], dy)


def peft_bnb_layer(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, device, dora: bool = False):
    """PEFT's LoRA (DoRA with `dora`) over a bnb NF4 Linear4bit holding `w`, with our A and B;
    None without bnb/peft."""
    try:
        import bitsandbytes as bnb
        import peft
    except ImportError:
        print("peft_bnb baseline skipped: bitsandbytes or peft is not installed")
        return None
    n, k = w.shape
    r = A.shape[0]
    holder = torch.nn.Module()
    holder.proj = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=w.dtype, quant_type="nf4",
                                    compress_statistics=True)
    holder.proj.weight = bnb.nn.Params4bit(w.detach().cpu(), requires_grad=False, quant_type="nf4",
                                           compress_statistics=True)
    holder = holder.to(device)  # quantizes
    model = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=SCALING * r, target_modules=["proj"],
                                                        lora_dropout=0.0, use_dora=dora))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


def bench(smoke: bool) -> list[dict]:
    require_cuda(smoke)
    ceiling = gemm_ceiling_tflops(smoke)
    grid = SMOKE_GRID if smoke else GPU_GRID
    rows = []
    for k, n in grid["shapes"]:
        for m in grid["tokens"]:
            for r in grid["ranks"]:
                for op, ours_fn, baselines, extra, grads, dy in ops(m, k, n, r, smoke):
                    for mode in MODES:
                        ours = median_ms(runner(ours_fn, grads, dy, mode), smoke)
                        achieved = None if ours is None else model_flops(m, k, n, r, mode) / ours / 1e9
                        for name, fn in baselines.items():
                            theirs = median_ms(runner(fn, grads, dy, mode), smoke)
                            rows.append(row(
                                smoke, op=op, mode=mode, shape=[m, k, n], dtype="bfloat16", rank=r,
                                ours_ms=ours, baseline=name, baseline_ms=theirs, ratio=ratio(ours, theirs),
                                achieved=achieved, achieved_unit="TFLOP/s",
                                ceiling_pct=None if achieved is None else 100 * achieved / ceiling,
                                ceiling_tflops=ceiling, **extra))
                if not smoke:
                    torch.cuda.empty_cache()
    return rows


SWEEP_TILES = {"wide": configs.WIDE, "square": configs.SQUARE, "skinny": configs.SKINNY, "narrow": configs.NARROW,
               "unpack": configs.UNPACK, "unpack_narrow": configs.UNPACK_NARROW}


def sweep_settings(op: str):
    """(label, {configs attribute: value}) of every alternative the sweep times for `op`."""
    yield "default", {}
    for name, tile in SWEEP_TILES.items():
        if op == "qlora_linear" or not name.startswith("unpack"):
            yield f"tile={name}", {"FORCE_TILE": tile}
    yield "tma=off", {"USE_TMA": False}
    if op == "qlora_linear":
        yield "nf4=buffer", {"DEQUANT_BUFFER_MIN_M": 0}
        yield "nf4=in_loop", {"DEQUANT_BUFFER_MIN_M": 1 << 40}


def sweep(smoke: bool) -> list[dict]:
    """Each alternative of `sweep_settings` on each shape, against dense bf16 in the same run."""
    require_cuda(smoke)
    grid = SMOKE_GRID if smoke else SWEEP_GRID
    saved = {k: getattr(configs, k) for k in ("FORCE_TILE", "USE_TMA", "DEQUANT_BUFFER_MIN_M")}
    rows = []
    for k, n in grid["shapes"]:
        for m in grid["tokens"]:
            for r in grid["ranks"]:
                for op, ours_fn, baselines, extra, grads, dy in ops(m, k, n, r, smoke):
                    if op == "dora_linear":  # the same GEMMs as qlora_linear, swept there
                        continue
                    dense = {mode: median_ms(runner(baselines["dense_bf16"], grads, dy, mode), smoke) for mode in MODES}
                    for label, settings in sweep_settings(op):
                        for key, value in settings.items():
                            setattr(configs, key, value)
                        try:
                            for mode in MODES:
                                ours = median_ms(runner(ours_fn, grads, dy, mode), smoke)
                                rows.append(row(smoke, op="sweep", kernel=op, setting=label, mode=mode, shape=[m, k, n],
                                                dtype="bfloat16", rank=r, ours_ms=ours, baseline="dense_bf16",
                                                baseline_ms=dense[mode], ratio=ratio(ours, dense[mode]), **extra))
                        except Exception as err:  # noqa: BLE001 - a setting that fails is a row, not the end
                            rows.append(row(smoke, op="sweep", kernel=op, setting=label, shape=[m, k, n],
                                            error=f"{type(err).__name__}: {err}"[:300]))
                        finally:
                            for key, value in saved.items():
                                setattr(configs, key, value)
                if not smoke:
                    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run on the torch path, no timings")
    parser.add_argument("--out", type=Path, help="JSON file to append rows to")
    parser.add_argument("--sweep", action="store_true", help="time the engine's alternatives (tuning rows)")
    args = parser.parse_args(argv)
    rows = sweep(args.smoke) if args.sweep else bench(args.smoke)
    for r in rows:
        print({k: r.get(k) for k in ("op", "setting", "mode", "shape", "rank", "baseline", "ours_ms", "baseline_ms",
                                     "ratio", "ceiling_pct", "error")})
    if args.out or not args.smoke:
        write_rows(rows, args.out or default_out(args.smoke))
    return rows


if __name__ == "__main__":
    main()
