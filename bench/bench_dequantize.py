"""Benchmark: NF4/FP4 dequantize (one launch, double-quant absmax inside) on a GPU.

Against, in the same run: the device's copy bandwidth (bytes read + written by a
device-to-device copy of the same output size) and bitsandbytes' CUDA dequantize.
Rows: op "dequantize_nf4"/"dequantize_fp4"; baseline "copy_bandwidth" (ratio = ours / copy
time of the same bytes, ceiling_pct = achieved / copy GB/s) and "bitsandbytes" (ratio =
ours / theirs time).

    python bench/bench_dequantize.py [--out bench/results/X.json]    # GPU
    python bench/bench_dequantize.py --smoke                          # CPU harness check
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_out, median_ms, ratio, require_cuda, row, write_rows  # noqa: E402

from trilora.quant import dequantize_4bit, quantize_4bit  # noqa: E402

GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
L2_BYTES = 50 * 2**20
SMOKE_SHAPES = [(64, 96)]


def _bnb_dequantize():
    try:
        import bitsandbytes.functional as bnbF
    except ImportError:
        return None
    return bnbF


def _rotating(fn, copies: int):
    """A no-argument callable that runs fn(0), fn(1), ... fn(copies-1), fn(0), ... in turn."""
    state = {"i": 0}

    def call():
        fn(state["i"])
        state["i"] = (state["i"] + 1) % copies
    return call


def bench(smoke: bool) -> list[dict]:
    require_cuda(smoke)
    device = "cpu" if smoke else "cuda"
    backend = "torch" if smoke else "triton"
    bnbF = None if smoke else _bnb_dequantize()
    rows = []
    for quant_type in ("nf4", "fp4"):
        for shape in SMOKE_SHAPES if smoke else GPU_SHAPES:
            n = shape[0] * shape[1]
            w = torch.randn(shape, device=device, dtype=torch.bfloat16)
            packed, state = quantize_4bit(w, quant_type, 64, double_quant=True, backend=backend)
            # bytes moved: packed codes + absmax codes + nested absmax in, bf16 out
            moved = packed.numel() + state.absmax.numel() + 4 * state.nested_absmax.numel() + 2 * n
            # rotate through copies whose total exceeds the 50 MB L2, so no call finds its
            # inputs in cache (both for ours and for the copy baseline)
            copies = 1 if smoke else max(2, -(-L2_BYTES * 4 // moved))
            inputs = [(packed.clone(), state) for _ in range(copies)]
            ours = median_ms(_rotating(lambda i: dequantize_4bit(*inputs[i], backend=backend), copies), smoke)
            achieved = None if ours is None else moved / ours / 1e6  # GB/s
            srcs = [torch.empty(moved // 2, dtype=torch.uint8, device=device).random_() for _ in range(copies)]
            dst = torch.empty_like(srcs[0])
            copy = median_ms(_rotating(lambda i: dst.copy_(srcs[i]), copies), smoke)  # reads + writes `moved` bytes
            copy_gbs = None if copy is None else moved / copy / 1e6
            common = dict(op=f"dequantize_{quant_type}", mode="fwd", shape=list(shape),
                          dtype="bfloat16", rank=None, ours_ms=ours, achieved=achieved,
                          achieved_unit="GB/s", double_quant=True, blocksize=64)
            rows.append(row(smoke, **common, baseline="copy_bandwidth", baseline_ms=copy,
                            ratio=ratio(ours, copy),
                            ceiling_pct=None if copy_gbs is None else 100 * achieved / copy_gbs))
            if bnbF is not None:
                ref_packed, ref_state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                           compress_statistics=True)
                theirs_in = [ref_packed.clone() for _ in range(copies)]
                theirs = median_ms(_rotating(lambda i: bnbF.dequantize_4bit(theirs_in[i], ref_state), copies), smoke)
                rows.append(row(smoke, **common, baseline="bitsandbytes", baseline_ms=theirs,
                                ratio=ratio(ours, theirs), ceiling_pct=None))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run, no timings")
    parser.add_argument("--out", type=Path, help="JSON file to append rows to")
    args = parser.parse_args(argv)
    rows = bench(args.smoke)
    for r in rows:
        print({k: r[k] for k in ("op", "shape", "baseline", "ours_ms", "baseline_ms", "ratio", "ceiling_pct")})
    if args.out or not args.smoke:
        write_rows(rows, args.out or default_out(args.smoke))


if __name__ == "__main__":
    main()
