"""Cross-entropy and the chunked lm_head + cross-entropy against HF's loss and a float64 reference.

HF's loss is `F.cross_entropy(lm_head(hidden).float(), labels, ...)` (ForCausalLMLoss upcasts).
Loss, dHidden, dW, db; vocab sizes that are not multiples of the chunk or the block; ignored
rows, label smoothing, mean/sum, an all-ignored batch. Triton through the interpreter on CPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _blocks import FP32_TOL, check, leaves, rel_err
from transformers.loss.loss_utils import ForCausalLMLoss

from trilora.kernels.cross_entropy import (FusedLinearCrossEntropyLoss, cross_entropy, cross_entropy_ref,
                                           cross_entropy_rows, default_chunk_size, fused_linear_cross_entropy,
                                           fused_linear_cross_entropy_ref)

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
IGNORE = -100


def hf_loss(hidden, weight, labels, label_smoothing=0.0, reduction="mean", bias=None):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ignore_index=IGNORE,
                           label_smoothing=label_smoothing, reduction=reduction)


def _case(n, h, v, dtype, seed, bias=False, ignore_every=5, device=DEV):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 2 / h**0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.5).to(device, dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::ignore_every] = IGNORE
    return hidden, weight, b, labels.to(device)


def _run(fn, hidden, weight, bias, labels, dtype=None, grad_scale=1.0):
    """(loss, dHidden, dW, db) of fn on fresh leaves."""
    hidden, weight = leaves(hidden, weight, dtype=dtype)
    bias = None if bias is None else leaves(bias, dtype=dtype)[0]
    loss = fn(hidden, weight, labels, bias)
    (loss * grad_scale).backward()
    return loss, hidden.grad, weight.grad, None if bias is None else bias.grad


CASES = {  # n tokens, hidden, vocab, chunk, smoothing, bias, reduction
    "V1000-chunk16-mean": (37, 48, 1000, 16, 0.0, False, "mean"),
    "V1000-smooth-bias": (37, 48, 1000, 16, 0.1, True, "mean"),
    "V97-default-chunk-sum": (29, 40, 97, None, 0.05, True, "sum"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_linear_matches_hf_and_fp64(case, dtype):
    n, h, v, chunk, eps, bias, reduction = CASES[case]
    hidden, weight, b, labels = _case(n, h, v, dtype, seed=v + n, bias=bias)

    def ours(hd, w, lab, bs):
        return fused_linear_cross_entropy(hd, w, lab, IGNORE, eps, reduction, bs, chunk, backend="triton")

    out = _run(ours, hidden, weight, b, labels)
    hf = _run(lambda hd, w, lab, bs: hf_loss(hd, w, lab, eps, reduction, bs), hidden, weight, b, labels)
    ref = _run(lambda hd, w, lab, bs: fused_linear_cross_entropy_ref(hd, w, lab, IGNORE, eps, reduction, bs),
               hidden, weight, b, labels, dtype=torch.float64)
    assert out[0].dtype == torch.float32 and out[0].shape == ()
    for name, o, r, hh in zip(("loss", "dhidden", "dW", "db"), out, ref, hf):
        if r is None:
            continue
        assert o.dtype == hh.dtype, name
        if name == "loss":  # fp32 loss from low-precision logits: judged by the inputs' dtype
            o, r, hh = o[None], r[None], hh[None]
        check(o, r, hh, name, dtype=dtype)
        if dtype == torch.float32:
            assert rel_err(o, hh) <= FP32_TOL, name


@pytest.mark.parametrize("v,block_v", [(1000, 256), (97, 32)])
def test_rows_kernel_multi_block_and_poisoned(v, block_v):
    """The vocab loop with a partial last block; every loss and gradient written, nothing more."""
    g = torch.Generator().manual_seed(v)
    n = 11
    logits = torch.randn(n, v, generator=g) * 4
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[2, 7]] = IGNORE
    grad_buf = torch.full((n + 1, v + 5), float("nan"))
    loss_buf = torch.full((n + 1,), float("nan"))
    cross_entropy_rows(logits, labels, IGNORE, 0.1, grad=grad_buf[:n, :v], grad_scale=0.5,
                       loss=loss_buf[:n], block_v=block_v)
    assert torch.isnan(grad_buf[n]).all() and torch.isnan(grad_buf[:, v:]).all() and torch.isnan(loss_buf[n])
    lg64 = logits.double().requires_grad_()
    ref_rows = F.cross_entropy(lg64, labels, ignore_index=IGNORE, label_smoothing=0.1, reduction="none")
    (ref_rows.sum() * 0.5).backward()
    assert rel_err(loss_buf[:n], ref_rows) <= FP32_TOL
    assert rel_err(grad_buf[:n, :v], lg64.grad) <= FP32_TOL
    assert torch.equal(grad_buf[[2, 7], :v], torch.zeros(2, v)) and torch.equal(loss_buf[[2, 7]], torch.zeros(2))


def test_in_place_gradient_over_logits():
    """grad may alias the logits (how the fused op uses it)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 300, generator=g)
    labels = torch.tensor([3, IGNORE, 299, 0, 150])
    lg64 = logits.double().requires_grad_()
    F.cross_entropy(lg64, labels, ignore_index=IGNORE, reduction="sum").backward()
    loss = cross_entropy_rows(logits, labels, IGNORE, grad=logits, block_v=128)
    assert rel_err(logits, lg64.grad) <= FP32_TOL and loss[1] == 0


def test_matches_hf_causal_lm_loss():
    """HF's ForCausalLMLoss (shift inside) = ours on hidden [B, L, H] with the shifted labels."""
    hidden, weight, _, _ = _case(2 * 9, 32, 150, torch.float32, seed=3)
    hidden = hidden.detach().view(2, 9, 32).requires_grad_()
    labels = torch.randint(0, 150, (2, 9))
    labels[0, :3] = IGNORE                                    # a masked prompt
    theirs = ForCausalLMLoss(F.linear(hidden, weight), labels, vocab_size=150)
    shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
    ours = fused_linear_cross_entropy(hidden, weight, shifted, chunk_size=5, backend="triton")
    assert rel_err(ours[None], theirs[None]) <= FP32_TOL
    (dh_theirs,) = torch.autograd.grad(theirs, hidden)
    (dh_ours,) = torch.autograd.grad(ours, hidden)
    assert rel_err(dh_ours, dh_theirs) <= FP32_TOL


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_ignored_gives_zero_not_nan(backend):
    hidden, weight, b, labels = _case(6, 16, 97, torch.float32, seed=2, bias=True)
    labels = torch.full_like(labels, IGNORE)
    loss, dh, dw, db = _run(lambda *a: fused_linear_cross_entropy(*a[:3], lm_head_bias=a[3], backend=backend),
                            hidden, weight, b, labels)
    assert loss.item() == 0.0
    for grad in (dh, dw, db):
        assert torch.equal(grad, torch.zeros_like(grad))
    logits = torch.randn(6, 97, requires_grad=True)
    loss = cross_entropy(logits, labels, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_int32_labels_and_empty_batch(backend):
    hidden, weight, _, labels = _case(7, 16, 50, torch.float32, seed=8)
    loss = fused_linear_cross_entropy(hidden, weight, labels.int(), backend=backend)
    assert rel_err(loss[None], hf_loss(hidden, weight, labels)[None]) <= FP32_TOL
    strided = torch.stack([labels, torch.zeros_like(labels)], 1)[:, 0]     # stride 2
    loss = fused_linear_cross_entropy(hidden, weight, strided, backend=backend)
    assert rel_err(loss[None], hf_loss(hidden, weight, labels)[None]) <= FP32_TOL
    empty = torch.zeros(0, 16, requires_grad=True)
    loss = fused_linear_cross_entropy(empty, weight, labels[:0], backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 16) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_frozen_weight_hidden_and_no_grad():
    """Gradients only for what requires them; under no_grad only the loss is computed."""
    hidden, weight, _, labels = _case(21, 24, 130, torch.float32, seed=4)
    ref = hf_loss(hidden, weight, labels)
    (ref_dh,) = torch.autograd.grad(ref, hidden)
    h, w = hidden.detach().requires_grad_(), weight.detach()          # frozen lm_head
    fused_linear_cross_entropy(h, w, labels, chunk_size=8, backend="triton").backward()
    assert w.grad is None and rel_err(h.grad, ref_dh) <= FP32_TOL
    h, w = hidden.detach(), weight.detach().requires_grad_()          # frozen hidden
    fused_linear_cross_entropy(h, w, labels, chunk_size=8, backend="triton").backward()
    assert h.grad is None and w.grad is not None
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=8, backend="triton")
    assert loss.grad_fn is None and rel_err(loss[None], ref[None]) <= FP32_TOL


def test_grad_output_scaling_and_single_backward():
    hidden, weight, b, labels = _case(13, 16, 60, torch.float32, seed=5, bias=True)
    ours = _run(lambda *a: FusedLinearCrossEntropyLoss(chunk_size=4, backend="triton")(*a),
                hidden, weight, b, labels, grad_scale=3.0)
    theirs = _run(lambda *a: hf_loss(*a[:3], bias=a[3]), hidden, weight, b, labels, grad_scale=3.0)
    for o, t in zip(ours, theirs):
        assert rel_err(o, t) <= FP32_TOL
    loss = fused_linear_cross_entropy(hidden, weight, labels, backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_autocast_casts_like_lm_head():
    """Under autocast (fp16 here; bf16 on a GPU) fp32 hidden/weight are cast like nn.Linear's are."""
    hidden, weight, _, labels = _case(9, 16, 70, torch.float32, seed=7)
    with torch.autocast(hidden.device.type, dtype=torch.float16):
        ours = _run(lambda *a: fused_linear_cross_entropy(*a[:3], backend="triton"), hidden, weight, None, labels)
        theirs = _run(lambda *a: hf_loss(*a[:3]), hidden, weight, None, labels)
    ref = _run(lambda *a: fused_linear_cross_entropy_ref(*a[:3]), hidden.half(), weight.half(), None, labels,
               dtype=torch.float64)
    for name, o, r, t in zip(("loss", "dhidden", "dW"), ours, ref, theirs):
        assert o.dtype == t.dtype == torch.float32, name  # grads flow back into the fp32 leaves
        check(o.reshape(-1), r.reshape(-1), t.reshape(-1), name, dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("eps,reduction", [(0.0, "mean"), (0.2, "sum")])
def test_cross_entropy_from_logits(eps, reduction, dtype):
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(3, 7, 123, generator=g) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 123, (3, 7), generator=g)
    labels[1] = IGNORE
    dl = []
    for fn, dt in ((lambda lg: cross_entropy(lg, labels, IGNORE, eps, reduction, backend="triton"), None),
                   (lambda lg: F.cross_entropy(lg.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                               label_smoothing=eps, reduction=reduction), None),
                   (lambda lg: cross_entropy_ref(lg.flatten(0, 1), labels.flatten(), IGNORE, eps, reduction),
                    torch.float64)):
        (lg,) = leaves(logits, dtype=dt)
        loss = fn(lg)
        loss.backward()
        dl.append((loss[None], lg.grad))
    (ours, ours_g), (hf, hf_g), (ref, ref_g) = dl
    check(ours, ref, hf, "loss", dtype=dtype)
    check(ours_g, ref_g, hf_g, "dlogits")


def test_default_chunk_size():
    """Llama-3-8B: 8192 tokens, hidden 4096, vocab 128256 → 256-token chunks (logits ≈ hidden's
    size); 1024 when dW is computed; never more than the (power-of-two-rounded) token count."""
    assert default_chunk_size(8192, 4096, 128256) == 256
    assert default_chunk_size(8192, 4096, 128256, weight_grad=True) == 1024
    assert default_chunk_size(37, 48, 1000) == 2 and default_chunk_size(37, 48, 1000, True) == 64
    assert default_chunk_size(0, 8, 10) == 1


def test_bad_inputs():
    hidden, weight, _, labels = _case(4, 8, 10, torch.float32, seed=0)
    fl = fused_linear_cross_entropy
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        fl(hidden, weight, torch.tensor([0, 10, 1, IGNORE]), backend="triton")
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        fl(hidden, weight, torch.tensor([0, -1, 1, 2]), backend="triton")
    with pytest.raises(TypeError, match="labels must be an int64/int32"):
        fl(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="labels has 3 entries for 4 rows"):
        fl(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match=r"lm_head_weight must be \[V, H\]"):
        fl(hidden, weight[:, :7], labels)
    with pytest.raises(TypeError, match="share one dtype"):
        fl(hidden, weight.half(), labels)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        fl(hidden.double(), weight.double(), labels)
    with pytest.raises(ValueError, match=r"lm_head_bias must be \[V\]"):
        fl(hidden, weight, labels, lm_head_bias=torch.zeros(9))
    with pytest.raises(ValueError, match="reduction"):
        fl(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="label_smoothing"):
        fl(hidden, weight, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        fl(hidden, weight, labels, chunk_size=0)
    with pytest.raises(TypeError, match="logits must be"):
        cross_entropy(torch.randn(4, 10).long(), labels)
    with pytest.raises(ValueError, match="labels has 5 entries"):
        cross_entropy(torch.randn(4, 10), torch.zeros(5, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("n,h,v", [(1024, 512, 32000), (37, 48, 1000)])
def test_gpu_bf16(n, h, v):
    hidden, weight, _, labels = _case(n, h, v, torch.bfloat16, seed=0, device="cuda")

    def ours(hd, w, lab, bs):
        return fused_linear_cross_entropy(hd, w, lab, label_smoothing=0.1, backend="triton")

    out = _run(ours, hidden, weight, None, labels)
    hf = _run(lambda hd, w, lab, bs: hf_loss(hd, w, lab, 0.1), hidden, weight, None, labels)
    ref = _run(lambda hd, w, lab, bs: fused_linear_cross_entropy_ref(hd, w, lab, label_smoothing=0.1),
               hidden, weight, None, labels, dtype=torch.float64)
    for name, o, r, hh in zip(("loss", "dhidden", "dW"), out, ref, hf):
        if name == "loss":
            o, r, hh = o[None], r[None], hh[None]
        check(o, r, hh, name, dtype=torch.bfloat16)
