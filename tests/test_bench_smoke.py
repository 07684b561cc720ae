"""The benchmark harness runs in smoke mode on CPU and reports no speed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
ROW_KEYS = {"device", "torch", "triton", "op", "mode", "shape", "dtype", "rank", "ours_ms",
            "baseline", "baseline_ms", "ratio", "achieved", "ceiling_pct"}
BLOCK_OPS = {"rms_norm", "rms_norm_gemma", "rope", "swiglu", "fused_linear_cross_entropy"}


def smoke_rows(script: str, tmp_path, *flags: str) -> list[dict]:
    """The JSON rows `bench/<script> --smoke` writes (a fresh process, interpreter off)."""
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, f"bench/{script}", "--smoke", *flags, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, f"bench/{script} --smoke exited {done.returncode}:\n{done.stderr[-4000:]}"
    return json.loads(out.read_text())


def test_dequantize_bench_smoke(tmp_path):
    rows = smoke_rows("bench_dequantize.py", tmp_path)
    assert {r["op"] for r in rows} == {"dequantize_nf4", "dequantize_fp4"}
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["ours_ms"] is None and r["ratio"] is None  # never a speed from a CPU
        assert r["device"].startswith("cpu-smoke")


def test_train_step_bench_smoke(tmp_path):
    """All three contenders (trilora QLoRA, PEFT + bitsandbytes, trilora LoRA) build and step."""
    rows = smoke_rows("bench_train_step.py", tmp_path)
    assert {r["contender"] for r in rows} == {"trilora_qlora", "trilora_lora_bf16"}
    for r in rows:
        assert ROW_KEYS <= set(r) and {"tokens_per_s", "peak_mem_gb", "baseline_peak_mem_gb", "mfu"} <= set(r)
        assert r["op"] == "train_step" and r["baseline"] == "peft_bnb"
        assert r["ours_ms"] is None and r["tokens_per_s"] is None


def test_context_bench_smoke(tmp_path):
    """Peak memory against sequence length: rows for every length and mode, no GPU figure from a CPU;
    checkpointing keeps fewer saved bytes, offloading keeps none on the device."""
    rows = smoke_rows("bench_context.py", tmp_path)
    assert {(r["seq"], r["mode"]) for r in rows} == {(n, m) for n in (16, 32, 64)
                                                    for m in ("plain", "checkpointing", "checkpointing+offload")}
    by = {(r["seq"], r["mode"]): r for r in rows}
    for r in rows:
        assert ROW_KEYS <= set(r) and r["op"] == "context_memory"
        assert r["ours_ms"] is None and r["peak_mem_gb"] is None  # never a GPU figure from a CPU
    for n in (16, 32, 64):
        assert by[n, "checkpointing"]["saved_device_gb"] < by[n, "plain"]["saved_device_gb"]
        assert by[n, "checkpointing+offload"]["saved_device_gb"] == 0 < by[n, "checkpointing+offload"]["saved_host_gb"]
    assert by[64, "plain"]["rope_scaling"] == "linear" and by[32, "plain"]["rope_scaling"] == "default"


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


def test_bench_smoke(tmp_path):
    """The GPU benchmark's harness on tiny CPU shapes (torch path): rows complete, no timings."""
    rows = smoke_rows("bench_lora_linear.py", tmp_path)
    for r in rows:
        assert ROW_KEYS <= set(r) and r["ours_ms"] is None and r["ratio"] is None  # never a CPU speed
    assert {(r["op"], r["baseline"]) for r in rows} == {
        ("lora_linear", "dense_bf16"), ("lora_linear", "torch_lora_bf16"),
        ("qlora_linear", "dense_bf16"), ("qlora_linear", "dequant_cublas"), ("qlora_linear", "peft_bnb"),
        ("dora_linear", "qlora_linear"), ("dora_linear", "torch_dora_ref"), ("dora_linear", "peft_bnb_dora")}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}


def test_bench_sweep_smoke(tmp_path):
    """--sweep: one row per alternative (tiles, TMA off, NF4 buffer vs in-loop) and mode, no timings."""
    rows = smoke_rows("bench_lora_linear.py", tmp_path, "--sweep")
    assert all(r["op"] == "sweep" and r["ours_ms"] is None and "error" not in r for r in rows)
    settings = {r["setting"] for r in rows if r["kernel"] == "qlora_linear"}
    assert {"default", "tile=wide", "tile=unpack", "tma=off", "nf4=buffer", "nf4=in_loop"} <= settings
    assert "tile=unpack" not in {r["setting"] for r in rows if r["kernel"] == "lora_linear"}


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the benchmark would run for real")
@pytest.mark.parametrize("script", ["bench_dequantize.py", "bench_lora_linear.py", "bench_block_kernels.py"])
def test_bench_refuses_cpu_timing(script):
    """Without --smoke a benchmark times for real: never on a CPU."""
    done = subprocess.run([sys.executable, f"bench/{script}"], cwd=ROOT,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr


def test_block_kernels_bench_smoke(tmp_path):
    rows = smoke_rows("bench_block_kernels.py", tmp_path)
    assert {r["op"] for r in rows} == BLOCK_OPS
    assert {(r["op"], r["mode"]) for r in rows} == {(op, mode) for op in BLOCK_OPS for mode in ("fwd", "fwd+bwd")}
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["baseline"] == "hf_module" and r["rank"] is None
        assert r["ours_ms"] is None and r["baseline_ms"] is None and r["ratio"] is None  # never a speed from a CPU
        assert r["device"].startswith("cpu-smoke")
        if r["op"] == "fused_linear_cross_entropy":
            assert {"peak_mem_mb", "baseline_peak_mem_mb"} <= set(r)


def test_bench_rows_smoke(tmp_path):
    """bench/bench_block_kernels.py --smoke --lora-blocks: the LoRA block rows, no CPU timings."""
    rows = [r for r in smoke_rows("bench_block_kernels.py", tmp_path, "--lora-blocks") if r["op"].startswith("lora_")]
    assert {(r["op"], r["base"], r["mode"]) for r in rows} == {
        (op, base, mode) for op, base in (("lora_mlp", "dense"), ("lora_mlp", "nf4"), ("lora_mlp_dora", "nf4"),
                                          ("lora_qkv", "dense"))
        for mode in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["baseline"] == "hf_peft" and r["rank"] == 16 and r["device"].startswith("cpu-smoke")
        assert r["ours_ms"] is None and r["baseline_ms"] is None and r["saved_mem_mb"] is None


def test_fsdp_bench_smoke(tmp_path):
    """bench_fsdp.py --smoke: torchrun with 1 and 2 gloo processes; the rows hold each rank's
    parameter bytes (half with 2) and no timings."""
    rows = smoke_rows("bench_fsdp.py", tmp_path)
    assert [r["nproc"] for r in rows] == [1, 2] and all(r["op"] == "fsdp_train_step" for r in rows)
    assert all(r["ours_ms"] is None and r["tokens_per_s"] is None and r["peak_mem_gb"] is None for r in rows)
    one, two = rows
    assert one["param_gb_per_rank"] == pytest.approx(one["param_gb_total"])
    assert two["param_gb_per_rank"] == pytest.approx(one["param_gb_total"] / 2, rel=0.02)
