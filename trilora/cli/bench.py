"""`trilora bench`: run the benchmark scripts of the source checkout's bench/ folder, which a
wheel does not ship (the command then says so in one line)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH_SCRIPTS = {"dequant": "bench_dequantize.py", "lora": "bench_lora_linear.py",
                 "blocks": "bench_block_kernels.py", "train": "bench_train_step.py", "fsdp": "bench_fsdp.py",
                 "context": "bench_context.py"}

# <checkout>/bench: this file is <checkout>/trilora/cli/bench.py. A module constant so that a
# test can point it at a folder that does not exist.
BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def bench_part(name: str) -> str:
    """argparse `type` of the benchmark names: an unknown one is a usage error that lists the known."""
    if name not in BENCH_SCRIPTS:
        raise argparse.ArgumentTypeError(f"unknown benchmark {name!r}: one of {', '.join(BENCH_SCRIPTS)}")
    return name


def run_bench(args) -> int:
    import subprocess

    folder = BENCH_DIR
    if not (folder / "common.py").exists():
        raise FileNotFoundError(f"{folder}: the benchmarks live in trilora's source checkout (bench/), "
                                "which this installation does not have: clone the repository, "
                                "`pip install -e .` there and run `trilora bench` (or `python bench/<script>.py`)")
    status = 0
    for part in args.parts or list(BENCH_SCRIPTS):
        cmd = [sys.executable, str(folder / BENCH_SCRIPTS[part])]
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--out", args.out] if args.out else []
        print("running", " ".join(cmd[1:]), flush=True)
        status |= subprocess.run(cmd).returncode
    return status
