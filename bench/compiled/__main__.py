"""The compiled-code report: every Triton kernel of trilora, compiled as its launcher specializes
it on a GPU, for sm_90 (H100/H200) and sm_80 (A100), read from the compiled code.

    python -m bench.compiled                         # both archs, writes bench/results/compiled/
    python -m bench.compiled --triton-path DIR       # under another triton (e.g. 3.6, the GPU image's)
    python -m bench.compiled --arch 90 --check --out-dir /tmp/x   # the CI check: invariants only

Writes `triton-<version>.json` (every variant, every figure) and `triton-<version>.md` (the
table and the derived ratios). `--check` exits 1 listing every broken invariant (`checks.py`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .checks import derived, kernels_digest, violations
from .markdown import render

ROOT = Path(__file__).resolve().parents[2]


def run_arch(arch: int, triton_path: str | None, only: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_path, str(ROOT), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "bench.compiled.run", "--arch", str(arch), "--json", str(out)]
        done = subprocess.run(cmd + (["--only", only] if only else []), cwd=ROOT, env=env, capture_output=True,
                              text=True)
        if done.returncode != 0 or not out.exists():
            raise SystemExit(f"compiling for sm_{arch} failed:\n{done.stderr[-4000:]}")
        return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results" / "compiled")
    ap.add_argument("--triton-path", default=None, help="a directory holding another triton package")
    ap.add_argument("--only", default=None, help="regex on scenario labels")
    ap.add_argument("--check", action="store_true", help="exit 1 when an invariant is broken")
    args = ap.parse_args(argv)
    runs = [run_arch(a, args.triton_path, args.only) for a in args.arch]
    report = dict(triton=runs[0]["triton"], torch=runs[0]["torch"], kernels_digest=kernels_digest(),
                  archs={str(r["arch"]): dict(seconds=r["seconds"], rows=r["rows"], failures=r["failures"])
                         for r in runs})
    report["derived"] = derived(report)
    broken = violations(report)
    report["violations"] = broken
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"triton-{report['triton']}"
    for suffix, text in ((".json", json.dumps(report, indent=1) + "\n"), (".md", render(report))):
        tmp = Path(f"{stem}{suffix}.tmp")  # (with_suffix would eat the version's last part)
        tmp.write_text(text)
        tmp.replace(f"{stem}{suffix}")
    print(f"wrote {stem}.json and .md: {sum(len(a['rows']) for a in report['archs'].values())} variants, "
          f"{sum(len(a['failures']) for a in report['archs'].values())} failures, {len(broken)} broken invariants")
    for line in broken:
        print("BROKEN:", line)
    return 1 if args.check and broken else 0


if __name__ == "__main__":
    sys.exit(main())
