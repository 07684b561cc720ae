"""Read what a compiled Triton kernel will do on the GPU: resources, MMA, memory traffic, main loop.

From the kernel's own artefacts (the cubin Triton built and its PTX), no re-compilation:
- resources: registers, local memory (spills) and stack from `cuobjdump -res-usage` on the cubin,
  spill instructions (STL/LDL) counted in the SASS, shared memory from Triton's metadata;
- tensor cores: wgmma (Hopper, asynchronous) or mma.sync in the PTX, and whether the main loop
  waits for its wgmma with no MMA group left in flight (`WARPGROUP.DEPBAR.LE gsb0, 0x0` in the
  SASS: the next tile's loads and unpacking cannot overlap the MMA);
- memory: global load widths per PTX load instruction (an 8-bit load per element is a gather),
  cp.async copy sizes, TMA (cp.async.bulk.tensor) use;
- the main loop: the innermost SASS loop that issues MMA instructions, its instructions per
  warp per iteration and their mix. Instructions × iterations ÷ (SMs × 4 schedulers × clock)
  is an issue-bound floor on the kernel's time, comparable across variants of one tile.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

MEMORY_OPS = ("LDG", "STG", "LDGSTS", "LDS", "LDSM", "STS", "UTMALDG", "UTMASTG", "LDL", "STL", "ATOMG", "RED")


def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _on_cubin(tool: str, cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([_tool(tool), *flags, f.name], capture_output=True, text=True, check=True)
    return done.stdout


def resources(cubin: bytes) -> dict:
    """Registers, stack and local (spill) bytes per thread of the cubin's kernel."""
    out = _on_cubin("cuobjdump", cubin, "-res-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return dict(regs=int(m.group(1)), stack_bytes=int(m.group(2)), local_bytes=int(m.group(4))) if m else {}


def sass(cubin: bytes) -> list[str]:
    """The kernel's SASS instructions (predicates stripped), with `label:` lines kept in place."""
    lines = []
    for ln in _on_cubin("nvdisasm", cubin, "-c").splitlines():
        if m := re.match(r"\s*(\.L_x_\d+):", ln):
            lines.append(m.group(1) + ":")
        elif m := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", ln):
            lines.append(re.sub(r"^@!?U?P[T\d]+\s+", "", m.group(1)))
    return lines


def loops(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) instruction-list indices of every loop: a label and a later branch back to it.

    A backward branch whose span holds an EXIT is not a loop: it is the return jump of code
    placed after the kernel's end (the retry of an mbarrier wait, for instance)."""
    labels = {ln[:-1]: i for i, ln in enumerate(lines) if ln.endswith(":")}
    found = []
    for i, ln in enumerate(lines):
        m = re.match(r"BRA\s+(?:`\()?(\.L_x_\d+)", ln)
        if m and labels.get(m.group(1), i) < i and not any(x.startswith("EXIT") for x in lines[labels[m.group(1)]:i]):
            found.append((labels[m.group(1)], i))
    return found


def _mix(body: list[str]) -> Counter:
    return Counter(ln.split()[0] for ln in body if not ln.endswith(":"))


def main_loop(lines: list[str]) -> dict:
    """Statistics of the main loop: the innermost loop issuing MMA instructions (the largest,
    when several), or for kernels without MMA the largest innermost loop that loads memory
    (a persistent or K loop); nothing for straight-line kernels."""
    is_mma = lambda op: op.startswith(("HGMMA", "HMMA"))  # noqa: E731
    loads = lambda op: op.startswith(("LDG", "LDGSTS", "UTMALDG"))  # noqa: E731
    spans = [s for s in loops(lines) if any(is_mma(op) for op in _mix(lines[s[0]:s[1] + 1]))]
    mma_loops = len(spans)
    if not spans:
        spans = [s for s in loops(lines) if any(loads(op) for op in _mix(lines[s[0]:s[1] + 1]))]
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    if not inner:
        return dict(mma_loops=0)
    first, last = max(inner, key=lambda s: s[1] - s[0])
    body = lines[first:last + 1]
    mix = _mix(body)
    depths = sorted({int(m.group(1), 16) for ln in body if (m := re.match(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x(\w+)", ln))})
    base = Counter()
    for op, n in mix.items():
        base[op.split(".")[0]] += n
    return dict(
        mma_loops=mma_loops and len(inner),
        loop_instrs=sum(mix.values()),
        loop_mma=base["HGMMA"] + base["HMMA"],
        # wgmma groups still in flight at the loop's waits: a 0 means MMA never overlaps the next
        # iteration's loads and unpacking
        loop_wgmma_wait_depths=depths,
        loop_wgmma_pipelined=base["HGMMA"] > 0 and 0 not in depths,
        loop_memory={op: n for op, n in sorted(mix.items()) if op.split(".")[0] in MEMORY_OPS},
        loop_byte_gathers=sum(n for op, n in mix.items() if op.startswith("LDG") and (".U8" in op or ".S8" in op)),
        loop_mix=dict(base.most_common(12)),
    )


def ptx_memory(ptx: str) -> dict:
    """Counts of global load widths (bits per thread per instruction), cp.async sizes, TMA copies."""
    c = Counter()
    for ln in ptx.splitlines():
        s = re.sub(r"^@!?%p\d+\s+", "", ln.strip())
        if s.startswith("cp.async.bulk.tensor"):
            c["tma"] += 1
        elif s.startswith("cp.async.") and ".shared.global" in s:
            m = re.search(r"\],\s*(0x[0-9a-f]+|\d+)\s*(?:,|;)", s)
            c[f"cp.async {int(m.group(1), 0)}B" if m else "cp.async"] += 1
        elif s.startswith("ld.global"):
            m = re.match(r"ld\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.([bsuf])(\d+)\s", s)
            if m:
                c[f"ld.global {int(m.group(1) or 1) * int(m.group(3))}b"] += 1
    return dict(sorted(c.items()))


def ptx_mma(ptx: str) -> dict:
    lines = [ln.strip() for ln in ptx.splitlines()]
    return dict(wgmma=sum(ln.startswith("wgmma.mma_async") for ln in lines),
                mma_sync=sum(ln.startswith("mma.sync") for ln in lines))


def analyze(kernel) -> dict:
    """Everything above for one CompiledKernel, as a flat JSON-able dict."""
    md, asm = kernel.metadata, kernel.asm
    row = dict(num_warps=md.num_warps, num_stages=md.num_stages, shared_bytes=md.shared)
    row.update(resources(asm["cubin"]))
    lines = sass(asm["cubin"])
    ops = _mix(lines)
    row["spill_instrs"] = sum(n for op, n in ops.items() if op.split(".")[0] in ("STL", "LDL"))
    row["kernel_instrs"] = sum(ops.values())
    row.update(ptx_mma(asm["ptx"]))
    row["ptx_memory"] = ptx_memory(asm["ptx"])
    row.update(main_loop(lines))
    return row
