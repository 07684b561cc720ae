"""Tile shapes of the LoRA GEMM family and the regime switches, in one place for GPU tuning.

Nothing here is measured yet (no GPU run has timed these kernels); each choice says what it
rests on, and `bench/bench_lora_linear.py --sweep` times the alternatives on a GPU so that a
measured table can replace the heuristics. Reasoning from the compiled code
(`python -m bench.compiled`, report under bench/results/compiled/):

- Training regime (M = tokens in the thousands): 128×256×64 tiles, 8 warps, 3 stages
  (147 KB of shared memory, fits sm_90 and sm_80). Per 4096×4096 GEMM at M = 8192 they move
  ~3.2 GB from L2 against ~8.6 GB for 64×64×32 tiles. 128×128×64 / 4 stages when the wide
  tiles would leave SMs idle (fewer tiles than SMs).
- Small M (evaluation, generation): 64-row tiles, narrower N so that the grid still covers
  the SMs.
- 4-bit bases: below `DEQUANT_BUFFER_MIN_M` rows the packed W is unpacked inside the K-loop
  (the GEMM reads 0.5 B per weight); from it on, W is dequantized once per call into a
  transient buffer (one pass, 2.5 B per weight) and the dense kernel runs. The compiled in-loop
  unpack costs ~5 SASS instructions per weight per 64-row tile of M (compiled-code report, sm_90;
  H100: 132 SMs × 4 × 32 lanes × ~1.75 GHz ≈ 3.0e13 lane-instructions/s, i.e. ~1.7e-13 s per
  weight per tile), the dequant pass 2.5 B / 3.35 TB/s ≈ 7.5e-13 s per weight: break-even at
  ~4-5 row tiles, so 256 rows, below which the unpack also hides under the memory-bound small-M
  GEMM (and the buffer's transient copy of W is not worth its memory).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import backend

DEQUANT_BUFFER_MIN_M = 256
# Dense operands on sm_90+: TMA descriptors and a persistent grid (the pointer kernel otherwise).
USE_TMA = True
SMEM_BYTES = {90: 227 * 1024, 100: 227 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024}
INTERPRETER_SMS = 4  # programs the interpreter's split heuristics assume (it runs them one by one)
MIN_SPLIT_ROWS = 256  # a split reduction gives each program at least this many rows (or K columns)


@dataclass(frozen=True)
class Tile:
    """One GEMM launch shape: output tile BLOCK_M × BLOCK_N, K step BLOCK_K."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8

    def smem_bytes(self, elem_bytes: int) -> int:
        """The pipeline's operand buffers plus an output tile (the TMA kernel stores through one)."""
        return (self.num_stages * (self.block_m + self.block_n) * self.block_k + self.block_m * self.block_n) * elem_bytes

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m,
                    num_warps=self.num_warps, num_stages=self.num_stages)


WIDE = Tile(128, 256, 64, 8, 3)
SQUARE = Tile(128, 128, 64, 8, 4)
SKINNY = Tile(64, 64, 64, 4, 4)
NARROW = Tile(64, 32, 64, 4, 4)
# fp32 operands without tensor cores (float32_matmul_precision "highest"): FMA loops.
EXACT_FP32 = Tile(64, 64, 16, 8, 2)
# In-loop 4-bit: the unpacked W tile goes through registers, so smaller tiles (see module docstring).
UNPACK = Tile(64, 64, 64, 4, 3)
UNPACK_NARROW = Tile(64, 32, 64, 4, 3)
# Set by tests and by the GPU sweep to force one shape for every GEMM launch.
FORCE_TILE: Tile | None = None


def arch_of(device: torch.device) -> int:
    """`backend.arch_of` (a function here so that tests can pretend to be an H100: TMA paths)."""
    return backend.arch_of(device)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda" or arch_of(device):
        return backend.num_sms(device)
    return INTERPRETER_SMS


def _fits(tile: Tile, elem_bytes: int, arch: int) -> bool:
    return tile.smem_bytes(elem_bytes) <= SMEM_BYTES.get(arch, 99 * 1024)


def _halve_k(tile: Tile) -> Tile:
    return Tile(tile.block_m, tile.block_n, tile.block_k // 2, tile.num_warps, tile.num_stages, tile.group_m)


def gemm_tile(m: int, n: int, elem_bytes: int, device: torch.device, unpack_4bit: bool = False,
              tensor_cores: bool = True, segments: int = 1) -> Tile:
    """The tile of an [m, n] output GEMM over `segments` K-loops (K does not change the choice yet)."""
    if FORCE_TILE is not None:
        return FORCE_TILE
    if not tensor_cores:
        return EXACT_FP32
    arch, sms = arch_of(device), num_sms(device)
    tiles = lambda t: -(-m // t.block_m) * -(-n // t.block_n)  # noqa: E731
    if unpack_4bit:
        candidates = [UNPACK, UNPACK_NARROW]
    elif m <= 64:
        candidates = [SKINNY, NARROW]
    elif segments > 1:  # 128×256 with 2-3 K-loops: triton 3.6 waits for every wgmma (221 registers)
        candidates = [SQUARE, SKINNY]
    else:
        candidates = [WIDE, SQUARE, SKINNY]
    fitting = []
    for tile in candidates:
        while not _fits(tile, elem_bytes, arch) and tile.block_k > 32:
            tile = _halve_k(tile)
        if _fits(tile, elem_bytes, arch):
            fitting.append(tile)
    for tile in fitting:
        if tiles(tile) >= 0.9 * sms:  # about one full wave or more
            return tile
    return fitting[-1]  # the smallest: the most tiles there are


def split_count(tiles: int, rows: int, device: torch.device) -> int:
    """Splits of a reduction so that ~2 programs per SM have work, each over >= MIN_SPLIT_ROWS rows."""
    want = -(-2 * num_sms(device) // max(tiles, 1))
    return max(1, min(want, rows // MIN_SPLIT_ROWS))
