"""LoRA dropout (`trilora.kernels.lora.dropout`): one keep-mask rule for the kernels and the
PyTorch replay, bit for bit; four Philox lanes per call; the forward's saved keep bits; seeds.
"""
from __future__ import annotations

import importlib

import torch
from _blocks import FP32_TOL, rel_err
from test_lora_linear import DEV, make_case

from trilora.kernels.backend import HAS_TRITON
from trilora.kernels.lora import lora_dropout_mask, lora_linear, lora_linear_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

engine = importlib.import_module("trilora.kernels.lora.engine")
dropout = importlib.import_module("trilora.kernels.lora.dropout")


def test_dropout_mask_torch_equals_triton():
    for seed in (0, 1, 2**31 - 2, 2**40 + 5):
        assert torch.equal(lora_dropout_mask(seed, (2, 5, 33), 0.3, DEV, backend="torch"),
                           lora_dropout_mask(seed, (2, 5, 33), 0.3, DEV, backend="triton"))


if HAS_TRITON:
    @triton.jit
    def _rand4_at(out_ptr, offs_ptr, seed, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs = tl.load(offs_ptr + i, mask=i < n, other=0)
        r0, r1, r2, r3 = tl.randint4x(seed, offs)
        tl.store(out_ptr + i * 4, tl.uint_to_uniform_float(r0), mask=i < n)
        tl.store(out_ptr + i * 4 + 1, tl.uint_to_uniform_float(r1), mask=i < n)
        tl.store(out_ptr + i * 4 + 2, tl.uint_to_uniform_float(r2), mask=i < n)
        tl.store(out_ptr + i * 4 + 3, tl.uint_to_uniform_float(r3), mask=i < n)


def test_philox_replay_large_offsets():
    """All four Philox lanes, counters past 2**32 (huge M·in) included, replayed exactly."""
    offs = torch.tensor([0, 1, 2**32 - 1, 2**32, 2**32 + 7, 3 * 2**40 + 11, 2**62], dtype=torch.int64, device=DEV)
    out = torch.empty(offs.numel(), 4, dtype=torch.float32, device=DEV)
    _rand4_at[(1,)](out, offs, 77, offs.numel(), BLOCK=8)
    assert torch.equal(out, torch.stack([dropout.uniform_ref(r) for r in dropout.philox4(77, offs)], 1))


def test_keep_bits_are_the_mask(monkeypatch):
    """The forward's saved keep bits are the packed mask of the replayed rule (odd K: a padded byte)."""
    saved = []
    real = engine.lowrank
    monkeypatch.setattr(engine, "lowrank", lambda *a, **kw: saved.append(real(*a, **kw)) or saved[-1])
    linear = importlib.import_module("trilora.kernels.lora.linear")
    monkeypatch.setattr(linear, "lowrank", engine.lowrank)
    case = make_case((37, 67), 45, 7, torch.float32, True, seed=17)
    x = case.x.clone().requires_grad_()
    lora_linear(x, case.weight, case.lora_A, case.lora_B, 1.0, dropout_p=0.3, seed=11, backend="triton")
    bits = saved[0][1]
    assert torch.equal(bits, dropout.pack_bits_ref(lora_dropout_mask(11, x.shape, 0.3, DEV)))
    with torch.no_grad():  # nothing to keep for a backward that will not run
        lora_linear(x, case.weight, case.lora_A, case.lora_B, 1.0, dropout_p=0.3, seed=11, backend="triton")
    assert saved[1][1] is None


def test_dropout_mask_statistics():
    for p in (0.1, 0.5, 0.9):
        # 30k draws (sd <= 0.003); under torch's 32k-element grain, so no thread-pool overhead
        keep = lora_dropout_mask(5, (120, 250), p).float().mean().item()
        assert abs(keep - (1 - p)) < 0.015, (p, keep)
    a, b = lora_dropout_mask(5, (50, 50), 0.5), lora_dropout_mask(6, (50, 50), 0.5)
    assert not torch.equal(a, b)


def test_dropout_seed_semantics():
    case = make_case((37, 67), 45, 7, torch.float32, True, seed=12)
    args = (case.x, case.weight, case.lora_A, case.lora_B, 2.0, case.bias)
    y1 = lora_linear(*args, 0.4, seed=99, backend="triton")
    assert torch.equal(y1, lora_linear(*args, 0.4, seed=99, backend="triton"))       # same seed
    assert not torch.equal(y1, lora_linear(*args, 0.4, seed=100, backend="triton"))  # other seed
    assert rel_err(lora_linear(*args, 0.4, seed=99, backend="torch"), y1.double()) < FP32_TOL  # backends agree
    no_drop = lora_linear_ref(*args).double()
    assert rel_err(lora_linear(*args, 0.0, seed=99, backend="triton"), no_drop) < FP32_TOL   # p = 0
    assert rel_err(lora_linear(*args, 0.4, backend="torch"), no_drop) > 1e-3  # no seed: F.dropout
    torch.manual_seed(0)
    y_a = lora_linear(*args, 0.4, backend="triton")  # seed from torch's generator
    torch.manual_seed(0)
    assert torch.equal(y_a, lora_linear(*args, 0.4, backend="triton"))


def test_keep_threshold_is_the_float_rule():
    """The kernels' integer comparison equals `uniform(draw) >= p` at and around the threshold."""
    for p in (0.0, 1e-7, 0.1, 0.25, 0.5, 0.9, 0.999999):
        t = dropout.keep_threshold(p)
        around = torch.tensor([max(t - 2, 0), max(t - 1, 0), t, min(t + 1, 2**31 - 1)], dtype=torch.int64)
        assert torch.equal(dropout.uniform_ref(around) >= torch.tensor(p, dtype=torch.float32), around >= t), p
