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
SMOKE_SHAPES = [(64, 96)]


def _bnb_dequantize():
    try:
        import bitsandbytes.functional as bnbF
    except ImportError:
        return None
    return bnbF


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
            ours = median_ms(lambda: dequantize_4bit(packed, state, backend=backend), smoke)
            # bytes moved: packed codes + absmax codes + nested absmax in, bf16 out
            moved = packed.numel() + state.absmax.numel() + 4 * state.nested_absmax.numel() + 2 * n
            achieved = None if ours is None else moved / ours / 1e6  # GB/s
            src = torch.empty(moved // 2, dtype=torch.uint8, device=device).random_()
            dst = torch.empty_like(src)
            copy = median_ms(lambda: dst.copy_(src), smoke)  # reads + writes `moved` bytes
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
                theirs = median_ms(lambda: bnbF.dequantize_4bit(ref_packed, ref_state), smoke)
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
