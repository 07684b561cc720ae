"""What the compiled-code report must show, and the ratios it derives.

Invariants (each broken one is a line of `violations`; `python -m bench.compiled --check` and
tests/test_compiled_report.py fail on any):
- every scenario compiles, on every architecture;
- no variant spills (local memory or STL/LDL instructions);
- sm_90: every GEMM of the LoRA family runs its main loop on wgmma, and the loops fed straight
  from memory keep a wgmma group in flight (no `DEPBAR gsb0, 0x0` in the loop). Exempt, and
  listed in the report: loops whose operand is produced in registers each iteration (the 4-bit
  K-loop unpack, x masked by the dropout mask in t and dA), where Triton waits for the MMA
  before it overwrites the shared-memory operand;
- the 4-bit K-loop unpack issues at most UNPACK_MAX_GLOBAL_LOADS global loads per thread per
  iteration (vector loads of packed bytes and one absmax per row; the previous kernel issued 96
  byte loads and 144 4-byte copies per iteration) and costs at most UNPACK_MAX_RATIO × the dense
  loop at the same tile;
- training-regime GEMMs (M = 8192) use tiles of at least 128 × 128, and the skinny reductions
  beside them (t, dA, dB) launch at least one program per SM.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def kernels_digest() -> str:
    """sha256 over trilora/kernels/**/*.py: the report is current when its digest matches."""
    h = hashlib.sha256()
    for path in sorted((ROOT / "trilora" / "kernels").rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


GEMMS = ("_gemm_kernel", "_gemm_tma_kernel", "_lowrank_kernel", "_matmul_tn_kernel")
H100_SMS = 132
UNPACK_MAX_GLOBAL_LOADS = 12
UNPACK_MAX_RATIO = 3.0  # measured 2.4 (forward) at 64×64×64 on triton 3.9; the goal is 2.0


def _tile(row) -> tuple:
    c = row["constexprs"]
    return tuple(c.get(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps")) + (row["num_warps"],)


def _quant(row) -> bool:
    return str(row["constexprs"].get("QUANT")) == "True"


def _fp32(row) -> bool:
    return "fp32" in str(row["constexprs"].get("DOT_DTYPE")) and "bf16" not in row["scenario"]


def register_operand(row) -> bool:
    """An MMA operand built in registers each iteration (so Triton waits for the MMA before it
    rewrites the operand's shared memory): the 4-bit unpack, x masked by dropout in t and dA."""
    c = row["constexprs"]
    return (row["kernel"] == "_gemm_kernel" and _quant(row)
            or row["kernel"] == "_matmul_tn_kernel" and "bits_ptr" not in row["none_args"]
            or row["kernel"] == "_lowrank_kernel" and str(c.get("HAS_DROPOUT")) == "True")


def _global_loads(row) -> int:
    return sum(n for op, n in row.get("loop_memory", {}).items() if op.startswith(("LDG", "UTMALDG")))


def unpack_pairs(rows):
    """(4-bit in-loop row, dense row at the same tile and orientation) pairs on one arch."""
    dense = {(_tile(r), r["constexprs"].get("W_T")): r for r in rows
             if r["kernel"] == "_gemm_kernel" and not _quant(r) and "tile=unpack" in r["scenario"]}
    for r in rows:
        if r["kernel"] == "_gemm_kernel" and _quant(r):
            match = dense.get((_tile(r), r["constexprs"].get("W_T")))
            if match is not None:
                yield r, match


def derived(report) -> dict:
    """Ratios read off the report (sm_90): the unpack's cost against the dense loop."""
    rows = report["archs"].get("90", {}).get("rows", [])
    out = []
    for q, d in unpack_pairs(rows):
        c = q["constexprs"]
        threads = 32 * q["num_warps"]
        weights = int(c["BLOCK_N"]) * int(c["BLOCK_K"]) if str(c.get("W_T")) == "True" else \
            int(c["BLOCK_K"]) * int(c["BLOCK_N"])
        out.append(dict(scenario=q["scenario"], tile=f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}",
                        direction="forward (W transposed)" if str(c.get("W_T")) == "True" else "dX (W)",
                        nested=c.get("NESTED"), unpack_loop_instrs=q["loop_instrs"], dense_loop_instrs=d["loop_instrs"],
                        ratio=round(q["loop_instrs"] / d["loop_instrs"], 2),
                        instrs_per_weight=round((q["loop_instrs"] - d["loop_instrs"]) / (weights / threads), 2)))
    return dict(unpack_vs_dense=out)


def violations(report) -> list[str]:
    bad = []
    for arch, run in report["archs"].items():
        for f in run["failures"]:
            bad.append(f"sm_{arch}: {f['scenario']}: {f['error'][:300]}")
        for r in run["rows"]:
            where = f"sm_{arch} {r['kernel']} [{r['scenario']}]"
            if r.get("local_bytes", 0) or r.get("spill_instrs", 0):
                bad.append(f"{where}: spills ({r.get('local_bytes')} local bytes, {r.get('spill_instrs')} STL/LDL)")
            if r["kernel"] not in GEMMS or _fp32(r):
                continue
            if arch == "90":
                if not r.get("wgmma") or not r.get("loop_mma"):
                    bad.append(f"{where}: main loop not on wgmma")
                elif not r.get("loop_wgmma_pipelined") and not register_operand(r):
                    bad.append(f"{where}: main loop waits for its wgmma (depths {r.get('loop_wgmma_wait_depths')})")
            if _quant(r) and _global_loads(r) > UNPACK_MAX_GLOBAL_LOADS:
                bad.append(f"{where}: {_global_loads(r)} global loads per iteration in the unpack loop")
            if "M=8192" in r["scenario"] and r["kernel"] in ("_gemm_kernel", "_gemm_tma_kernel") and not _quant(r):
                c = r["constexprs"]
                if int(c["BLOCK_M"]) < 128 or int(c["BLOCK_N"]) < 128:
                    bad.append(f"{where}: training-regime tile {c['BLOCK_M']}x{c['BLOCK_N']} < 128x128")
            if "M=8192" in r["scenario"] and r["kernel"] in ("_lowrank_kernel", "_matmul_tn_kernel"):
                programs = 1
                for g in r["grid"] or [1]:
                    programs *= g
                if programs < H100_SMS:
                    bad.append(f"{where}: {programs} programs for {H100_SMS} SMs")
    for d in report.get("derived", {}).get("unpack_vs_dense", []):
        if d["ratio"] > UNPACK_MAX_RATIO:
            bad.append(f"sm_90 unpack [{d['scenario']}] {d['direction']}: {d['ratio']}x the dense loop "
                       f"(limit {UNPACK_MAX_RATIO})")
    return bad
