"""The benchmark harness runs in smoke mode on CPU and reports no speed."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"device", "torch", "triton", "op", "mode", "shape", "dtype", "rank", "ours_ms",
            "baseline", "baseline_ms", "ratio", "achieved", "ceiling_pct"}


def test_dequantize_bench_smoke(tmp_path):
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, "bench/bench_dequantize.py", "--smoke", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, env={"PATH": "/usr/bin:/bin",
                                                                   "TRITON_INTERPRET": "0"})
    rows = json.loads(out.read_text())
    assert {r["op"] for r in rows} == {"dequantize_nf4", "dequantize_fp4"}
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["ours_ms"] is None and r["ratio"] is None  # never a speed from a CPU
        assert r["device"].startswith("cpu-smoke")


def test_dequantize_bench_refuses_cpu_timing():
    proc = subprocess.run([sys.executable, "bench/bench_dequantize.py"], cwd=ROOT,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr
