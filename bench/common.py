"""Shared by the benchmark scripts: device facts, timing by the project's method, JSON rows.

Timing: median of `triton.testing.do_bench` after warm-up, on random
data. Nothing is ever timed on a CPU or under the interpreter: `--smoke` runs the harness on
tiny CPU shapes and records `null` timings, so a test can keep the harness from rotting.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch


def device_name(smoke: bool) -> str:
    if smoke:
        return f"cpu-smoke ({platform.processor() or platform.machine()})"
    return torch.cuda.get_device_name()


def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version}


def require_cuda(smoke: bool) -> None:
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU; use --smoke on a CPU to check the "
                         "harness only (it reports no timings)")
    if not smoke and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 is set: never time kernels under the interpreter")


def median_ms(fn, smoke: bool) -> float | None:
    """Median milliseconds of `fn()` on the GPU; None in smoke mode (runs fn once)."""
    if smoke:
        fn()
        return None
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def ratio(ours: float | None, baseline: float | None) -> float | None:
    return None if ours is None or baseline is None else ours / baseline


def row(smoke: bool, **fields) -> dict:
    return {"device": device_name(smoke), **versions(), **fields}


def default_out(smoke: bool) -> Path:
    name = "cpu-smoke" if smoke else torch.cuda.get_device_name().replace(" ", "_")
    return Path("bench/results") / f"{name}-{datetime.date.today().isoformat()}.json"


def write_rows(rows: list[dict], path: Path) -> None:
    """Append `rows` to the JSON list at `path` (created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(existing + rows, indent=1) + "\n")
