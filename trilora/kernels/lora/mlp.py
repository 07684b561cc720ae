"""LoRA MLP block: `down(act(gate(x)) * up(x))`, each projection a LoRA linear over a dense or
4-bit base, with the [tokens, intermediate] activations recomputed in backward, not stored.

Why: HF's gated MLP with LoRA keeps, per layer, gate(x), up(x), act(gate(x)) and their
product for backward (4 · M · I values, plus the adapters' intermediates): at Llama-3-8B
shapes (M = 8192 tokens, I = 14336) that is 940 MB per layer in bf16, 30 GB over 32 layers.
This block saves x (M · H, 64 MB per layer there), the adapters' inputs (M · Σr) and the
dropout keep bits (M · (H + I) / 8). The backward recomputes gate and up
(two GEMMs) and the activation, then runs the chain rule:

    forward:   [g | u] = x [Wg; Wu]ᵀ + LoRA   (two fused LoRA GEMMs into one [M, 2I] buffer)
               h = act(g) · u                 (GLU kernel below)
               y = h Wdᵀ + LoRA               (fused LoRA GEMM)
    backward:  recompute [g | u] and h (the adapters' inputs t and the keep bits are kept from
               the forward: tiny); dh, dA_d, dB_d from `projections_backward` on down;
               [dg | du] overwrite [g | u] in place (GLU backward kernel);
               dX = dg Wg + du Wu + LoRA terms in ONE GEMM (`projections_backward`).

Trade-off: +2 GEMMs of M·H·I each per layer in backward, i.e. the MLP's GEMM work grows from
6 to 8 units (+33%: the base weights are frozen, so the backward has 3 dX GEMMs and no dW
GEMMs), for ~14× less saved activation memory in the MLP at the shapes above, so larger
batches or longer sequences fit without full gradient checkpointing. The backward's transient
peak is [M, 2I] + 2·[M, I] for one layer at a time.

Activations: "silu" (SwiGLU: Llama, Mistral, Qwen2) and "gelu_tanh" (GeGLU with the tanh
approximation: Gemma's gelu_pytorch_tanh): the GLU kernels of `../glu.py`, run on the two
halves of the [g | u] buffer.
Dropout: gate and up share one keep-mask over x (`projections.py`), down has its own over h (seed+1).
DoRA projections (dropout 0): their rescale rides in their GEMMs' epilogues (`projections.py`);
the block then also keeps its output when down is DoRA (dm needs it), and when gate or up is
DoRA the backward writes [dg | du] into a new [M, 2I] buffer instead of over [g | u], which their
dm needs.

Reading order: reference → launchers → autograd Function → `lora_mlp`.
"""
from __future__ import annotations

import torch

from ..backend import resolve_backend
from ..glu import ACTIVATIONS, glu_backward, glu_forward, glu_ref
from .checks import check_frozen
from .dropout import lora_dropout_mask, resolve_seed
from .engine import output
from .projections import (TRAINABLES, Projection, Saved, autocast_projections, check_projection,
                          projection_ref, projections_backward, projections_forward, wants_grad)


# ----------------------------------------------------------------------------- reference

def lora_mlp_ref(x: torch.Tensor, gate: Projection, up: Projection, down: Projection, act: str = "silu",
                 dropout_p: float = 0.0, masks: tuple | None = None) -> torch.Tensor:
    """Plain-PyTorch `down(act(gate(x)) * up(x))`; masks = (keep over x, keep over h) or None."""
    mx, mh = masks if masks is not None else (None, None)
    h = glu_ref(projection_ref(x, gate, dropout_p, mx), projection_ref(x, up, dropout_p, mx), act)
    return projection_ref(h, down, dropout_p, mh)


# ----------------------------------------------------------------------------- launchers

def _glu_forward(gu: torch.Tensor, act: str) -> torch.Tensor:
    """h [M, I] = act(g) · u of gu = [g | u] [M, 2I] (`glu.py`), into the engine's output buffer."""
    n = gu.shape[1] // 2
    return glu_forward(gu[:, :n], gu[:, n:], act, out=output((gu.shape[0], n), gu.dtype, gu.device))


def _glu_backward(dh: torch.Tensor, gu: torch.Tensor, act: str, in_place: bool) -> torch.Tensor:
    """[d_gate | d_up] [M, 2I] from dh [M, I] and gu = [g | u]: written over gu when `in_place`."""
    n = dh.shape[1]
    dgu = gu if in_place else output(gu.shape, gu.dtype, gu.device)
    glu_backward(dh, gu[:, :n], gu[:, n:], act, out=(dgu[:, :n], dgu[:, n:]))
    return dgu


def _gate_up(x: torch.Tensor, gate: Projection, up: Projection, p: float, seed: int, save_bits: bool,
             saved: Saved | None = None) -> tuple[torch.Tensor, Saved]:
    """[g | u] [M, 2I] = the gate and up projections of x [M, H], written side by side."""
    n = gate.out_features
    gu = output((x.shape[0], 2 * n), x.dtype, x.device)
    return gu, projections_forward(x, (gate, up), p, seed, (gu[:, :n], gu[:, n:]), save_bits, saved)


# ----------------------------------------------------------------------------- autograd

class LoRAMLPFunction(torch.autograd.Function):
    """Saves x, the adapters' inputs and the keep bits (the adapters, also inputs, and the DoRA
    rescales stay referenced on ctx), and the output when down is DoRA; recomputes gate, up and
    the activation in backward.
    apply(x, (gate, up, down), act, dropout_p, seed, save_bits, *trainables) with trainables =
    each projection's (lora_A, lora_B, bias, magnitude)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, projs, act, dropout_p, seed, save_bits, *trainables):
        gate, up, down = projs
        x2d = x.reshape(-1, x.shape[-1])                     # [M, H]
        y = output((x2d.shape[0], down.out_features), x.dtype, x.device)
        gu, saved_x = _gate_up(x2d, gate, up, dropout_p, seed, save_bits)
        h = _glu_forward(gu, act)                              # [M, I]; [g | u] freed
        del gu
        saved_h = projections_forward(h, (down,), dropout_p, seed + 1, (y,), save_bits)
        ctx.save_for_backward(x2d, saved_x.t, saved_x.bits, saved_h.t, saved_h.bits, y if down.dora else None)
        ctx.projs, ctx.act, ctx.dropout_p, ctx.x_shape = projs, act, dropout_p, x.shape
        ctx.rescales = saved_x.rescales, saved_h.rescales
        return y.view(*x.shape[:-1], y.shape[1])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x2d, t_x, bits_x, t_h, bits_h, y = ctx.saved_tensors
        gate, up, down = ctx.projs
        p, need = ctx.dropout_p, ctx.needs_input_grad
        needs = [need[6 + TRAINABLES * i:6 + TRAINABLES * (i + 1)] for i in range(3)]
        dy = dy.reshape(-1, dy.shape[-1]).to(x2d.dtype)     # [M, H_out]
        rescales_x, rescales_h = ctx.rescales
        # 1. recompute [g | u] (with the forward's t and DoRA rescales) and h
        gu, saved_x = _gate_up(x2d, gate, up, p, 0, False, Saved(t_x, bits_x, rescales_x))  # [M, 2I]
        h = _glu_forward(gu, ctx.act)                          # [M, I]
        # 2. down: dh, and its adapter's gradients
        dh, (down_grads,) = projections_backward([dy], h, (down,), p, Saved(t_h, bits_h, rescales_h), True,
                                                 needs[2:], [y])
        del h
        # 3. [dg | du], over [g | u] unless a DoRA gate/up still needs its output
        n = gate.out_features
        keep_gu = gate.dora or up.dora
        dgu = _glu_backward(dh, gu, ctx.act, in_place=not keep_gu)
        del dh
        # 4. gate and up: dX in one pass, and their adapters' gradients
        dx, (gate_grads, up_grads) = projections_backward([dgu[:, :n], dgu[:, n:]], x2d, (gate, up), p, saved_x,
                                                          need[0], needs[:2],
                                                          [gu[:, :n], gu[:, n:]] if keep_gu else None)
        return (None if dx is None else dx.view(ctx.x_shape), None, None, None, None, None,
                *gate_grads, *up_grads, *down_grads)


# ----------------------------------------------------------------------------- public

def lora_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection, act: str = "silu",
             dropout_p: float = 0.0, backend: str = "auto", seed: int | None = None) -> torch.Tensor:
    """Gated MLP `down(act(gate(x)) · up(x))` of LoRA projections, autograd-aware; saves only x.

    Args:
        x: [..., H], fp32/fp16/bf16, any strides.
        gate, up: `Projection`s [I, H]; down: [H_out, I]; each over a dense base in x's dtype or
            a packed 4-bit base, with optional adapter (lora_A, lora_B, scaling; DoRA with a
            `magnitude`, which needs dropout_p = 0) and bias.
        act: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, tanh approximation).
        dropout_p: dropout on the adapters' inputs, in [0, 1): one mask over x for gate and up,
            one over h for down.
        backend: "auto" (Triton on CUDA or under the interpreter), "triton" or "torch" (the
            reference, which keeps HF's activations for backward).
        seed: dropout seed in [0, 2**62) (masks: `lora_dropout_mask(seed, x.shape, p)` and
            `(seed + 1, h.shape, p)`); None: drawn from torch's default generator.
    Under torch.autocast the float inputs are cast to the autocast dtype first.
    Returns [..., H_out] in x's (compute) dtype. The base weights get no gradient.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    x, (gate, up, down) = autocast_projections(x, (gate, up, down))
    check_projection(x, gate, dropout_p, "gate")
    check_projection(x, up, dropout_p, "up")
    if isinstance(gate, Projection) and isinstance(up, Projection) and gate.out_features != up.out_features:
        raise ValueError(f"gate and up must have one out size, got {gate.out_features} and {up.out_features}")
    check_projection(x.new_empty(0, gate.out_features), down, dropout_p, "down")
    seed = resolve_seed(dropout_p, seed)
    projs = (gate, up, down)
    if resolve_backend(backend, x) == "torch":
        masks = None
        if dropout_p > 0:
            masks = (lora_dropout_mask(seed, x.shape, dropout_p, x.device),
                     lora_dropout_mask(seed + 1, (*x.shape[:-1], gate.out_features), dropout_p, x.device))
        return lora_mlp_ref(x, gate, up, down, act, dropout_p, masks)
    check_frozen(*(p.weight for p in projs))
    trainables = [t for p in projs for t in p.trainables()]
    return LoRAMLPFunction.apply(x, projs, act, float(dropout_p), seed, dropout_p > 0 and wants_grad(x, projs),
                                 *trainables)
