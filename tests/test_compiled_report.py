"""The compiled-code report (`python -m bench.compiled`): every Triton kernel compiles for sm_90
and sm_80 exactly as its launcher specializes it on a GPU, under the current triton and under the
GPU image's (3.6), and the invariants of bench/compiled/checks.py hold (no spills, wgmma main
loops that overlap their MMA, training-regime tiles, every SM busy in the split reductions, the
4-bit unpack's bounded cost). The interpreter never runs Triton's compiler, so this is where a
kernel that only breaks on the real compile path (or under the older triton) shows up.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "bench" / "results" / "compiled"
GPU_IMAGE_TRITON = "3.6.0"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run the kernels")


def _report(tmp_path: Path, triton_path: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench.compiled", "--check", "--out-dir", str(tmp_path)]
    done = subprocess.run(cmd + (["--triton-path", triton_path] if triton_path else []), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (path,) = tmp_path.glob("triton-*.json")
    return json.loads(path.read_text())


def _assert_complete(report: dict) -> None:
    assert set(report["archs"]) == {"90", "80"}
    for arch, run in report["archs"].items():
        assert not run["failures"], (arch, run["failures"])
        kernels = {r["kernel"] for r in run["rows"]}
        assert {"_gemm_kernel", "_lowrank_kernel", "_matmul_tn_kernel", "_dequantize_4bit_kernel",
                "_quantize_blockwise_kernel", "_rms_norm_fwd_kernel", "_cross_entropy_kernel"} <= kernels
        assert ("_gemm_tma_kernel" in kernels) == (arch == "90")
    assert report["violations"] == []
    assert report["derived"]["unpack_vs_dense"], "no 4-bit unpack loop was compared with the dense loop"


@pytest.mark.slow
def test_report_under_the_current_triton(tmp_path):
    _assert_complete(_report(tmp_path))


def _gpu_image_triton() -> str:
    """A directory holding triton 3.6 (the GPU image's), installed there on first use."""
    target = Path(os.environ.get("TRILORA_TRITON36_DIR", Path.home() / ".cache" / "trilora" / f"triton-{GPU_IMAGE_TRITON}"))
    if not (target / "triton" / "__init__.py").exists():
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                               f"triton=={GPU_IMAGE_TRITON}"], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"could not install triton {GPU_IMAGE_TRITON}: {done.stderr[-2000:]}"
    return str(target)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRILORA_SKIP_TRITON36") == "1", reason="TRILORA_SKIP_TRITON36=1")
def test_report_under_the_gpu_image_triton(tmp_path):
    report = _report(tmp_path, _gpu_image_triton())
    assert report["triton"] == GPU_IMAGE_TRITON
    _assert_complete(report)


def test_committed_reports_are_current():
    """bench/results/compiled/ holds a report per triton version, made from today's kernel sources
    (refresh: `python -m bench.compiled` and `... --triton-path <triton 3.6 dir>`)."""
    from bench.compiled.checks import kernels_digest
    reports = {p.stem: json.loads(p.read_text()) for p in REPORTS.glob("triton-*.json")}
    assert {f"triton-{GPU_IMAGE_TRITON}"} <= set(reports) and len(reports) >= 2, sorted(reports)
    digest = kernels_digest()
    for name, report in reports.items():
        assert report["kernels_digest"] == digest, f"{name} was made from other kernel sources: regenerate it"
        assert report["violations"] == [], (name, report["violations"])
        assert (REPORTS / f"{name}.md").exists()
