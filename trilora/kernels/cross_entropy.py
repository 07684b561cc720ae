"""Cross-entropy, and lm_head linear + cross-entropy fused so the [tokens, vocab] logits never exist.

Why: with a 128K vocabulary, the logits of 8K tokens are 2 GB in bf16, HF upcasts them to fp32
(4 GB more) and autograd keeps a softmax-sized buffer for backward. Here
`fused_linear_cross_entropy` walks the tokens in chunks: for each chunk it computes the
chunk's logits with a torch GEMM, one Triton program per row computes logsumexp, the loss and
the logits' gradient (softmax − target) *in place* over the logits, and two more GEMMs turn
that into the chunk's dHidden rows and add its share of dW (and db). Only one chunk of logits
lives at a time; the gradients are computed in the forward and the backward only scales them
by the incoming gradient (the idea of Liger-Kernel's FLCE; this is a separate implementation).

Math, per non-ignored row with logits z, target y, smoothing ε and V classes (torch's
`F.cross_entropy` with `label_smoothing`, HF's loss: fp32 logsumexp):

    loss = lse(z) − (1−ε)·z_y − ε·mean(z)
    dz_j = softmax(z)_j − (1−ε)·[j = y] − ε/V

"mean" divides by the number of non-ignored rows; with none, the loss is 0 and every
gradient is zero (torch returns NaN there). The kernel writes the unscaled dz (O(1) values,
no fp16 underflow) and the 1/n_valid scale is folded into the GEMMs' alpha. Counting n_valid
and checking the label range costs one host sync per call.

Reading order: reference → kernel → launchers → autograd Functions → public functions → module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import FLOAT_DTYPES, HAS_TRITON, autocast_dtype, check_same_device, resolve_backend

IGNORE_INDEX = -100  # the label no loss counts (torch's cross_entropy default, HF's padding label)

if HAS_TRITON:
    import triton
    import triton.language as tl

REDUCTIONS = ("mean", "sum")
BLOCK_V_MAX = 8192  # vocab columns per loop step of one row's program. Untuned default.
DW_MIN_CHUNK = 1024  # smallest default chunk when dW is computed (see default_chunk_size)


# ----------------------------------------------------------------------------- reference

def cross_entropy_ref(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                      label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """HF's loss math: `F.cross_entropy(logits.float(), labels, ...)`, but an all-ignored
    batch gives 0 instead of NaN under "mean". logits [N, V], labels [N] int.

    Computes in fp32, or in float64 for float64 logits (the tests' exact reference).
    """
    wide = torch.promote_types(logits.dtype, torch.float32)
    total = F.cross_entropy(logits.to(wide), labels.long(), ignore_index=ignore_index,
                            label_smoothing=label_smoothing, reduction="sum")
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)


def fused_linear_cross_entropy_ref(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0,
                                   reduction: str = "mean", lm_head_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: full logits `hidden @ Wᵀ + b` in hidden's dtype, then `cross_entropy_ref`."""
    logits = F.linear(hidden, lm_head_weight, lm_head_bias)
    return cross_entropy_ref(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index,
                             label_smoothing, reduction)


# ----------------------------------------------------------------------------- kernel

if HAS_TRITON:

    @triton.jit
    def _cross_entropy_kernel(
        # pointers
        logits_ptr,   # [n_rows, n_cols], unit column stride
        grad_ptr,     # [n_rows, n_cols] dz out (WRITE_GRAD); may be logits_ptr itself (in place)
        labels_ptr,   # int32/int64 [n_rows]
        loss_ptr,     # fp32 [n_rows] out: the row's loss, 0 for ignored rows
        # sizes, strides, scalars
        n_cols, stride_logits, stride_grad,
        ignore_index, smoothing, grad_scale,
        # meta-parameters
        HAS_SMOOTHING: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        # 1. one program per row
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        z_row = logits_ptr + row * stride_logits

        # 2. online logsumexp over vocab blocks (and Σz for smoothing); ignored rows skip it
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        z_sum = tl.zeros((), tl.float32)
        for off in range(0, tl.where(valid, n_cols, 0), BLOCK_V):
            cols = off + tl.arange(0, BLOCK_V)
            z = tl.load(z_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                z_sum += tl.sum(tl.where(cols < n_cols, z, 0.0), axis=0)
        lse = tl.where(valid, m, 0.0) + tl.log(tl.where(valid, s, 1.0))

        # 3. loss = lse − (1−ε)·z_y − ε·mean(z)
        z_y = tl.load(z_row + label, mask=valid, other=0.0).to(tl.float32)
        loss = lse - (1.0 - smoothing) * z_y
        if HAS_SMOOTHING:
            loss -= smoothing * z_sum / n_cols
        tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))

        # 4. dz = softmax − (1−ε)·onehot − ε/V, scaled; zeros for an ignored row
        if WRITE_GRAD:
            g_row = grad_ptr + row * stride_grad
            for off in range(0, n_cols, BLOCK_V):
                cols = off + tl.arange(0, BLOCK_V)
                mask = cols < n_cols
                z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(z - lse) - tl.where(cols == label, 1.0 - smoothing, 0.0)
                if HAS_SMOOTHING:
                    g -= smoothing / n_cols
                g = tl.where(valid, g * grad_scale, 0.0)
                tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                       label_smoothing: float = 0.0, grad: torch.Tensor | None = None,
                       grad_scale: float = 1.0, loss: torch.Tensor | None = None,
                       block_v: int | None = None) -> torch.Tensor:
    """Triton: per-row loss, fp32 [N], of logits [N, V] (unit column stride) and labels [N].

    With `grad` ([N, V], may be `logits` itself for in place), also writes
    `grad_scale · dz` there. `loss` (fp32 [N]) receives the losses when given. Labels are
    assumed checked (in [0, V) or ignore_index).
    """
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device) if loss is None else loss
    if n_rows == 0:
        return loss
    block_v = block_v or min(BLOCK_V_MAX, triton.next_power_of_2(n_cols))
    num_warps = 4 if block_v <= 1024 else 8 if block_v <= 4096 else 16
    _cross_entropy_kernel[(n_rows,)](
        logits, grad if grad is not None else logits, labels, loss,
        n_cols, logits.stride(0), grad.stride(0) if grad is not None else 0,
        int(ignore_index), float(label_smoothing), float(grad_scale),
        HAS_SMOOTHING=label_smoothing > 0, WRITE_GRAD=grad is not None, BLOCK_V=block_v,
        num_warps=num_warps)
    return loss


def _count_valid(labels: torch.Tensor, ignore_index: int, vocab: int) -> int:
    """Number of non-ignored labels; raises for labels outside [0, V). One host sync."""
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    n_valid, n_bad = torch.stack([valid.sum(), bad.sum()]).tolist()
    if n_bad:
        first = labels[bad][0].item()
        raise ValueError(f"{n_bad} labels are outside [0, {vocab}) and not ignore_index={ignore_index} "
                         f"(e.g. {first})")
    return n_valid


def default_chunk_size(n_tokens: int, hidden_size: int, vocab: int, weight_grad: bool = False) -> int:
    """Tokens per chunk: a chunk's logits about the size of the hidden states (a power of two).

    With a trainable lm_head at least DW_MIN_CHUNK: every chunk reads and rewrites all of dW
    [V, H] (addmm_ in dW's dtype, one rounding per chunk), so fewer, larger chunks cost less
    traffic and fewer bf16 roundings of the running sum (error grows like √chunks).
    """
    chunk = triton.next_power_of_2(max(1, -(-n_tokens // max(1, -(-vocab // hidden_size)))))
    if weight_grad:
        chunk = max(chunk, DW_MIN_CHUNK)
    return max(1, min(chunk, triton.next_power_of_2(max(n_tokens, 1))))


def fused_linear_cross_entropy_forward(hidden, weight, labels, bias, ignore_index, label_smoothing,
                                       reduction, chunk_size, need_dh, need_dw, need_db):
    """Triton + torch GEMMs. hidden [N, H], weight [V, H], labels [N], bias [V] or None →
    (loss fp32 scalar, dHidden [N, H] | None, dW [V, H] | None, db [V] | None), gradients for
    a loss gradient of 1. Inputs are assumed checked; chunks of `chunk_size` tokens."""
    (n, hsz), vocab = hidden.shape, weight.shape[0]
    n_valid = _count_valid(labels, ignore_index, vocab)
    scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    write_grad = need_dh or need_dw or need_db
    loss_rows = torch.empty(n, dtype=torch.float32, device=hidden.device)
    dh = torch.empty((n, hsz), dtype=hidden.dtype, device=hidden.device) if need_dh else None
    dw = torch.zeros((vocab, hsz), dtype=weight.dtype, device=weight.device) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_db else None
    chunk_size = chunk_size or default_chunk_size(n, hsz, vocab, need_dw)
    wt = weight.t()                                                            # [H, V]
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h = hidden[start:end]                                                  # [c, H]
        logits = h @ wt if bias is None else torch.addmm(bias, h, wt)          # [c, V]
        # loss rows, and dz written over the logits (unscaled: scale goes into the GEMMs)
        cross_entropy_rows(logits, labels[start:end], ignore_index, label_smoothing,
                           grad=logits if write_grad else None, loss=loss_rows[start:end])
        if need_dh:   # dH = s · dz W                                             [c, H]
            dh[start:end].addmm_(logits, weight, beta=0.0, alpha=scale)
        if need_dw:   # dW += s · dzᵀ h  (accumulated in the GEMM epilogue, one rounding per chunk)
            dw.addmm_(logits.t(), h, alpha=scale)
        if need_db:
            db.add_(logits.sum(0, dtype=torch.float32), alpha=scale)
    loss = loss_rows.sum() * scale
    return loss, dh, dw, None if db is None else db.to(bias.dtype)


# ----------------------------------------------------------------------------- autograd

class CrossEntropyFunction(torch.autograd.Function):
    """Loss from logits; dz is written in the forward (into a new buffer) and scaled in backward."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, label_smoothing, reduction, need_grad):
        n_valid = _count_valid(labels, ignore_index, logits.shape[1])
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        grad = torch.empty_like(logits) if need_grad else None
        loss_rows = cross_entropy_rows(logits, labels, ignore_index, label_smoothing, grad, scale)
        ctx.save_for_backward(grad)
        return loss_rows.sum() * scale

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Gradients are computed in the forward; backward scales them by the loss's gradient
    in place (so a second backward through the same graph is refused)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, label_smoothing, reduction, chunk_size, needs):
        loss, dh, dw, db = fused_linear_cross_entropy_forward(
            hidden, weight, labels, bias, ignore_index, label_smoothing, reduction, chunk_size, *needs)
        ctx.save_for_backward(dh, dw, db)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("fused_linear_cross_entropy scales its stored gradients in place: "
                               "it supports one backward per forward (no retain_graph reuse)")
        ctx.used = True
        grads = [g if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.saved_tensors]
        return grads[0], grads[1], None, grads[2], None, None, None, None, None


# ----------------------------------------------------------------------------- public functions

def _check_labels(labels, n_rows: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64/int32 tensor, got "
                        f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.numel() != n_rows:
        raise ValueError(f"labels has {labels.numel()} entries for {n_rows} rows (tokens)")


def _check_options(label_smoothing: float, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS} (gradients are precomputed, so "
                         f"'none' is not supported), got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  label_smoothing: float = 0.0, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Cross-entropy of logits [..., V] (fp32/fp16/bf16) against labels [...] (int64/int32).

    Same math as `F.cross_entropy(logits.float(), labels, ...)` (HF's loss), except that an
    all-ignored batch gives 0 (and zero gradients) under "mean". reduction: "mean" (over
    non-ignored rows) or "sum". Returns an fp32 scalar. The Triton path computes the logits'
    gradient during the forward (one extra [N, V] buffer, like torch's saved softmax).
    """
    if not isinstance(logits, torch.Tensor) or logits.dtype not in FLOAT_DTYPES or logits.dim() == 0:
        raise TypeError("logits must be a float32/float16/bfloat16 tensor [..., V]")
    logits2d = logits.reshape(-1, logits.shape[-1])                            # [N, V]
    _check_labels(labels, logits2d.shape[0])
    _check_options(label_smoothing, reduction)
    check_same_device(logits=logits, labels=labels)
    labels = labels.reshape(-1).contiguous()  # the kernel reads labels[row] at unit stride
    if resolve_backend(backend, logits, labels) == "torch":
        return cross_entropy_ref(logits2d, labels, ignore_index, label_smoothing, reduction)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    loss = CrossEntropyFunction.apply(logits2d, labels, int(ignore_index), float(label_smoothing),
                                      reduction, need_grad)
    return loss


def fused_linear_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0,
                               reduction: str = "mean", lm_head_bias: torch.Tensor | None = None,
                               chunk_size: int | None = None, backend: str = "auto") -> torch.Tensor:
    """`cross_entropy(hidden @ lm_head_weightᵀ + lm_head_bias, labels)` without the full logits.

    Args:
        hidden: [..., H] fp32/fp16/bf16 (the last hidden states, already aligned with labels:
            shift them yourself for causal LM).
        lm_head_weight: [V, H] in hidden's dtype; gets a gradient only when it requires one.
        labels: [...] int64/int32 in [0, V) or `ignore_index`.
        lm_head_bias: [V] or None.
        reduction: "mean" (over non-ignored tokens; 0 when there are none) or "sum".
        chunk_size: tokens per chunk (default: a chunk's logits ≈ the hidden states' size, at
            least 1024 tokens when lm_head_weight needs a gradient; see `default_chunk_size`).
        backend: "auto", "triton" or "torch" (the reference, which materialises the logits).
    Under torch.autocast, the float inputs are cast to the autocast dtype first (like lm_head).
    Returns an fp32 scalar.
    """
    for name, t in (("hidden", hidden), ("lm_head_weight", lm_head_weight)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float32/float16/bfloat16 tensor")
    device_type = hidden.device.type
    dtype = autocast_dtype(device_type)
    if dtype is not None:
        hidden, lm_head_weight = hidden.to(dtype), lm_head_weight.to(dtype)
        lm_head_bias = None if lm_head_bias is None else lm_head_bias.to(dtype)
    if lm_head_weight.dim() != 2 or hidden.dim() == 0 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight must be [V, H] with H = hidden.shape[-1]; got hidden "
                         f"{list(hidden.shape)}, lm_head_weight {list(lm_head_weight.shape)}")
    if hidden.dtype != lm_head_weight.dtype or (lm_head_bias is not None and lm_head_bias.dtype != hidden.dtype):
        raise TypeError(f"hidden, lm_head_weight (and lm_head_bias) must share one dtype, got "
                        f"{hidden.dtype}, {lm_head_weight.dtype}"
                        + ("" if lm_head_bias is None else f", {lm_head_bias.dtype}"))
    if lm_head_bias is not None and tuple(lm_head_bias.shape) != (lm_head_weight.shape[0],):
        raise ValueError(f"lm_head_bias must be [V] = [{lm_head_weight.shape[0]}], got {list(lm_head_bias.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    hidden2d = hidden.reshape(-1, hidden.shape[-1])                            # [N, H]
    _check_labels(labels, hidden2d.shape[0])
    _check_options(label_smoothing, reduction)
    check_same_device(hidden=hidden, lm_head_weight=lm_head_weight, labels=labels, lm_head_bias=lm_head_bias)
    labels = labels.reshape(-1).contiguous()  # the kernel reads labels[row] at unit stride
    if resolve_backend(backend, hidden, lm_head_weight, labels) == "torch":
        return fused_linear_cross_entropy_ref(hidden2d, lm_head_weight, labels, ignore_index,
                                              label_smoothing, reduction, lm_head_bias)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and lm_head_weight.requires_grad,
             grad_on and lm_head_bias is not None and lm_head_bias.requires_grad)
    with torch.autocast(device_type, enabled=False):
        return FusedLinearCrossEntropyFunction.apply(
            hidden2d, lm_head_weight, labels, lm_head_bias, int(ignore_index), float(label_smoothing),
            reduction, chunk_size, needs)


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """Module form of `fused_linear_cross_entropy`: `loss = module(hidden, lm_head_weight, labels, bias)`."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0, reduction: str = "mean",
                 chunk_size: int | None = None, backend: str = "auto"):
        super().__init__()
        _check_options(label_smoothing, reduction)
        self.ignore_index, self.label_smoothing, self.reduction = ignore_index, label_smoothing, reduction
        self.chunk_size, self.backend = chunk_size, backend

    def forward(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                lm_head_bias: torch.Tensor | None = None) -> torch.Tensor:
        return fused_linear_cross_entropy(hidden, lm_head_weight, labels, self.ignore_index,
                                          self.label_smoothing, self.reduction, lm_head_bias,
                                          self.chunk_size, self.backend)
