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


def test_train_step_bench_smoke(tmp_path):
    """All three contenders (trilora QLoRA, PEFT + bitsandbytes, trilora LoRA) build and step."""
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, "bench/bench_train_step.py", "--smoke", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, env={"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "0"})
    rows = json.loads(out.read_text())
    assert {r["contender"] for r in rows} == {"trilora_qlora", "trilora_lora_bf16"}
    for r in rows:
        assert ROW_KEYS <= set(r) and {"tokens_per_s", "peak_mem_gb", "baseline_peak_mem_gb", "mfu"} <= set(r)
        assert r["op"] == "train_step" and r["baseline"] == "peft_bnb"
        assert r["ours_ms"] is None and r["tokens_per_s"] is None


def test_report_renders_rows_and_pending(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import report
    assert "GPU run pending" in report.markdown([])
    row = {"device": "NVIDIA H100", "torch": "2.11", "triton": "3.6", "op": "qlora_linear", "mode": "fwd",
           "shape": [2048, 4096, 4096], "rank": 16, "ours_ms": 0.5, "baseline": "dense_bf16",
           "baseline_ms": 0.45, "ratio": 0.5 / 0.45, "achieved": 600.0, "ceiling_pct": 75.0}
    md = report.markdown([row])
    assert "NVIDIA H100" in md and "2048×4096×4096" in md and "1.11" in md
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{report.START}\nold\n{report.END}\nb\n")
    report.update_readme(readme, md)
    text = readme.read_text()
    assert "old" not in text and "NVIDIA H100" in text and text.startswith("a\n") and text.endswith("b\n")
    assert [p.name for p in report.plots([row], tmp_path)] == ["speedup_vs_m.png"]


def test_trilora_bench_cli_runs_the_scripts(tmp_path, monkeypatch):
    from trilora.cli import main
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "rows.json"
    assert main(["bench", "dequant", "--smoke", "--out", str(out)]) == 0
    assert {r["op"] for r in json.loads(out.read_text())} == {"dequantize_nf4", "dequantize_fp4"}
