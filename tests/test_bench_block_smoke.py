"""The block-kernel benchmark harness runs in smoke mode on CPU and reports no speed."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"device", "torch", "triton", "op", "mode", "shape", "dtype", "rank", "ours_ms",
            "baseline", "baseline_ms", "ratio", "achieved", "ceiling_pct"}
OPS = {"rms_norm", "rms_norm_gemma", "rope", "swiglu", "fused_linear_cross_entropy"}


def test_block_kernels_bench_smoke(tmp_path):
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, "bench/bench_block_kernels.py", "--smoke", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, env={"PATH": "/usr/bin:/bin",
                                                                   "TRITON_INTERPRET": "0"})
    rows = json.loads(out.read_text())
    assert {r["op"] for r in rows} == OPS
    assert {(r["op"], r["mode"]) for r in rows} == {(op, mode) for op in OPS for mode in ("fwd", "fwd+bwd")}
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["baseline"] == "hf_module" and r["rank"] is None
        assert r["ours_ms"] is None and r["baseline_ms"] is None and r["ratio"] is None  # never a speed from a CPU
        assert r["device"].startswith("cpu-smoke")
        if r["op"] == "fused_linear_cross_entropy":
            assert {"peak_mem_mb", "baseline_peak_mem_mb"} <= set(r)


def test_block_kernels_bench_refuses_cpu_timing():
    proc = subprocess.run([sys.executable, "bench/bench_block_kernels.py"], cwd=ROOT,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr
