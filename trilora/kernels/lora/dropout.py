"""LoRA dropout: one keep-mask per input, drawn once in the forward and kept as bits for backward.

Why this shape: the adapter's input x [M, K] is masked in the forward (t = dropout(x) Aᵀ), and
the same mask is needed again in backward for dX's low-rank term and for dA. Regenerating it
there costs a Philox evaluation per element in each kernel (~60 instructions each); keeping it
as bits costs M·K/8 bytes (1/16 of a bf16 x) and one shift per element to read. So the only
Philox evaluation is in the forward's low-rank kernel, and it draws four numbers per call.

The mask, exactly (the PyTorch replay below and every kernel agree bit for bit):
    keep[m, k] = uniform(philox4x32_10(seed, counter = m·⌈K/4⌉ + k//4)[k % 4]) >= p
with `uniform` Triton's int32 → [0, 1) map. Bits: byte [m, k//8], bit k % 8 (uint8 [M, ⌈K/8⌉]).
The kernels draw a byte at a time (two Philox calls give its eight lanes) and compare in
integers: `uniform` is a monotone map of v = x ^ (x >> 31) (x the draw as int32), so
`uniform >= p` is `v >= keep_threshold(p)`, found once on the host; the PyTorch reference keeps
the float rule, so the tests check the threshold too.

Reading order: PyTorch replay (reference) → Triton helpers → `lora_dropout_mask`.
"""
from __future__ import annotations

import functools

import torch

from ..backend import HAS_TRITON, resolve_backend

if HAS_TRITON:
    import triton
    import triton.language as tl

SEED_LIMIT = 2**62  # seeds of a block's second mask are seed + 1: both stay int64


def check_seed(seed) -> None:
    """Raise ValueError unless `seed` is None or an int in [0, SEED_LIMIT)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT):
        raise ValueError(f"seed must be an int in [0, 2**62), got {seed!r}")


def resolve_seed(dropout_p: float, seed: int | None) -> int:
    """The dropout seed of one call: `seed`, or one drawn from torch's default generator when p > 0."""
    check_seed(seed)
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return 0 if seed is None else seed


# ----------------------------------------------------------------------------- reference

_M32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (hi, lo) 32-bit halves of a * b for a uint32 constant and uint32 values held in int64;
    # b is split in 16-bit halves so no product overflows int64.
    low = a * (b & 0xFFFF)
    mid = a * (b >> 16) + (low >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4(seed: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`tl.randint4x(seed, counters)` in plain PyTorch: four uint32 (in int64) per int64 counter."""
    c0, c1 = counters & _M32, (counters >> 32) & _M32
    c2 = c3 = torch.zeros_like(counters)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(0xCD9E8D57, c2)
        hi_a, lo_a = _mulhilo32(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def uniform_ref(bits: torch.Tensor) -> torch.Tensor:
    """Triton's `uint_to_uniform_float` for uint32 values held in int64: fp32 in [0, 1)."""
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)   # bitcast to int32
    signed = torch.where(signed < 0, -signed - 1, signed)      # ~x for negatives, as Triton does
    return signed.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def keep_mask_ref(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """The keep-mask bool [rows, cols] of the module docstring, in PyTorch."""
    k = torch.arange(cols, device=device)
    counters = torch.arange(rows, device=device)[:, None] * ((cols + 3) // 4) + (k // 4)[None, :]
    lanes = philox4(seed, counters)
    pick = torch.stack(lanes, dim=-1).gather(-1, (k % 4).expand(rows, cols).unsqueeze(-1)).squeeze(-1)
    return uniform_ref(pick) >= torch.tensor(p, dtype=torch.float32)


@functools.lru_cache(maxsize=64)
def keep_threshold(p: float) -> int:
    """The least v in [0, 2**31] with uniform(v) >= p (fp32, as the kernels compute it): the
    kernels keep a draw when its v = x ^ (x >> 31) is at least this."""
    p32 = torch.tensor(p, dtype=torch.float32)
    lo, hi = 0, 2**31  # uniform(hi) is treated as 1.0 > any p < 1
    while lo < hi:
        mid = (lo + hi) // 2
        if uniform_ref(torch.tensor(mid, dtype=torch.int64)) >= p32:
            hi = mid
        else:
            lo = mid + 1
    return lo


def pack_bits_ref(keep: torch.Tensor) -> torch.Tensor:
    """bool [M, K] → uint8 [M, ⌈K/8⌉], bit k % 8 of byte k // 8 (the kernels' layout)."""
    m, k = keep.shape
    padded = torch.nn.functional.pad(keep.to(torch.uint8), (0, -k % 8)).view(m, -1, 8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=keep.device)
    return (padded * weights).sum(-1, dtype=torch.uint8)


# ----------------------------------------------------------------------------- Triton helpers

if HAS_TRITON:

    @triton.jit
    def _lane_bits(draws, threshold, first_col, K, BIT: tl.constexpr):
        """Bit BIT of each byte: the draw kept (and its column first_col + BIT inside K)."""
        x = draws.to(tl.int32, bitcast=True)
        keep = ((x ^ (x >> 31)) >= threshold) & (first_col + BIT < K)
        return keep.to(tl.int32) << BIT

    @triton.jit
    def keep_bytes(seed, offs_m, b0, K, threshold, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
        """Packed keep bits uint8 [BLOCK_M, BLOCK_B] of rows `offs_m` (int64), bytes [b0, b0 + BLOCK_B):
        byte b holds columns 8b .. 8b+7, drawn by two Philox calls (counters 2b, 2b+1 of the row)."""
        byte = b0 + tl.arange(0, BLOCK_B)
        counter = offs_m[:, None] * ((K + 3) // 4) + 2 * byte[None, :]
        col = 8 * byte[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, counter)
        r4, r5, r6, r7 = tl.randint4x(seed, counter + 1)
        bits = (_lane_bits(r0, threshold, col, K, 0) | _lane_bits(r1, threshold, col, K, 1)
                | _lane_bits(r2, threshold, col, K, 2) | _lane_bits(r3, threshold, col, K, 3)
                | _lane_bits(r4, threshold, col, K, 4) | _lane_bits(r5, threshold, col, K, 5)
                | _lane_bits(r6, threshold, col, K, 6) | _lane_bits(r7, threshold, col, K, 7))
        return bits.to(tl.uint8)

    @triton.jit
    def expand_bits(packed, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """uint8 [BLOCK_M, BLOCK_C // 8] → bool [BLOCK_M, BLOCK_C]: each byte repeated 8 times
        along the row (joins keep the copies in one thread), then its own bit picked."""
        p = packed.to(tl.int32)
        p = tl.reshape(tl.join(p, p), (BLOCK_M, BLOCK_C // 4))
        p = tl.reshape(tl.join(p, p), (BLOCK_M, BLOCK_C // 2))
        p = tl.reshape(tl.join(p, p), (BLOCK_M, BLOCK_C))
        return ((p >> (tl.arange(0, BLOCK_C) % 8)[None, :]) & 1) != 0

    @triton.jit
    def load_keep_bits(bits_ptr, stride_bits, offs_m, c0, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """Keep-mask tile [BLOCK_M, BLOCK_C] of rows `offs_m`, columns [c0, c0 + BLOCK_C) (c0 % 8 == 0)
        from saved bits; False outside [M, C]."""
        offs_b = c0 // 8 + tl.arange(0, BLOCK_C // 8)
        ok = (offs_m[:, None] < M) & (offs_b[None, :] < (C + 7) // 8)
        packed = tl.load(bits_ptr + offs_m[:, None] * stride_bits + offs_b[None, :], mask=ok, other=0)
        return expand_bits(packed, BLOCK_M, BLOCK_C)

    @triton.jit
    def _keep_bits_kernel(bits_ptr, seed, threshold, M, K, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
        """Writes the packed keep-mask of an [M, K] input (for tests and `lora_dropout_mask`)."""
        offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        b0 = tl.program_id(1) * BLOCK_B
        offs_b = b0 + tl.arange(0, BLOCK_B)
        ok = (offs_m[:, None] < M) & (offs_b[None, :] < (K + 7) // 8)
        tl.store(bits_ptr + offs_m[:, None] * ((K + 7) // 8) + offs_b[None, :],
                 keep_bytes(seed, offs_m, b0, K, threshold, BLOCK_M, BLOCK_B), mask=ok)


def unpack_bits(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [M, ⌈cols/8⌉] → bool [M, cols] (inverse of `pack_bits_ref`)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits[:, :, None] >> shifts) & 1).view(bits.shape[0], -1)[:, :cols].bool()


def lora_dropout_mask(seed: int, shape, p: float, device: torch.device | str = "cpu",
                      backend: str = "torch") -> torch.Tensor:
    """The kernels' dropout keep-mask for an x of `shape` [..., in]: bool, True = keep.

    Leading dims are flattened into rows (see the module docstring for the rule). For tests and
    the reference; the kernels never materialise it. backend "torch" replays Philox in PyTorch,
    "triton" runs the kernels' own helper; they agree bit for bit.
    """
    shape = tuple(shape)
    cols = shape[-1]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    if resolve_backend(backend, torch.empty(0, device=device)) == "triton":
        bits = torch.empty((rows, (cols + 7) // 8), dtype=torch.uint8, device=device)
        if bits.numel():
            _keep_bits_kernel[(triton.cdiv(rows, 32), triton.cdiv(cols, 64))](bits, seed, keep_threshold(p), rows,
                                                                            cols, BLOCK_M=32, BLOCK_B=8)
        return unpack_bits(bits, cols).view(shape)
    return keep_mask_ref(seed, rows, cols, p, device).view(shape)
