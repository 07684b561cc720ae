"""The modules `trilora.patch` swaps into HF decoders: LoRA MLP and attention blocks.

Each keeps the HF module's projections as children under the same names (`gate_proj`,
`q_proj`, ...: nn.Linear, trilora Linear4bit or LoraLinear), so state dicts, adapter
save/load, `merge_lora` and `set_lora_backend` see the model as before. The projections are
read at every call (base weight, adapter, scaling, dropout when the layer trains, merged or
not), so later changes to them take effect. Only the math of the forward changes:

- `TriloraMLP`: `down(act(gate(x)) * up(x))` as one `lora_mlp` block (activations recomputed
  in backward).
- `TriloraAttention`: HF's attention forward for Llama/Mistral/Qwen2/Gemma re-implemented
  around `lora_qkv` (q, k, v of one input, one dX) and the RoPE kernel; the KV cache update
  and the attention itself are HF's (`cache.update`, `ALL_ATTENTION_FUNCTIONS`: eager, sdpa,
  flash), so masks, GQA, sliding windows and generation behave as in HF.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from trilora.kernels.lora import lora_mlp
from trilora.kernels.lora import Projection, lora_qkv
from trilora.kernels.rope import apply_rotary_pos_emb
from trilora.lora import LoraLinear
from trilora.quant import Linear4bit

# HF attention attributes the attention functions (eager/sdpa/flash) and HF code read
_ATTENTION_ATTRS = ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "attention_dropout",
                    "is_causal", "layer_type", "sliding_window")


# ----------------------------------------------------------------------------- projections

def unsupported_projection(module: nn.Module) -> str | None:
    """Why `module` cannot be a block projection, or None when it can."""
    if isinstance(module, LoraLinear):
        if module.fan_in_fan_out:
            return "LoRA over a Conv1D base"
        if any(s.use_dora and s.dropout > 0 for s in module.settings.values()):
            return "a DoRA adapter with dropout (the fused blocks take DoRA without dropout)"
        base = module.base_layer
    else:
        base = module
    if type(base) is not nn.Linear and not isinstance(base, Linear4bit):  # e.g. bitsandbytes' Linear4bit
        cls = type(base)
        return (f"{cls.__module__}.{cls.__name__} projection (the blocks take torch's nn.Linear, "
                "trilora.quant.Linear4bit, or trilora's LoraLinear over them)")
    if base.weight.requires_grad:
        return "trainable base weight (the kernels keep base weights frozen)"
    return None


def block_dropout(modules) -> float | None:
    """The one LoRA dropout p of `modules` (0.0 without adapters); None when they differ."""
    ps = {m.dropout for m in modules if isinstance(m, LoraLinear) and m.active_adapter in m.lora_A}
    return (ps.pop() if ps else 0.0) if len(ps) <= 1 else None


def _compute_dtype(modules, x: torch.Tensor) -> torch.dtype:
    # as LoraLinear/Linear4bit: a 4-bit base computes in its compute_dtype, else in x's dtype
    for m in modules:
        base = m.base_layer if isinstance(m, LoraLinear) else m
        if isinstance(base, Linear4bit) and base.compute_dtype is not None:
            return base.compute_dtype
    return x.dtype


def projections_of(modules, x: torch.Tensor) -> tuple[torch.Tensor, list[Projection], float]:
    """(x in the compute dtype, a `Projection` per module, the block's dropout p now)."""
    dtype = _compute_dtype(modules, x)
    projs, ps = [], set()
    for m in modules:
        lora = m if isinstance(m, LoraLinear) and m.runs_adapter else None  # not merged / disabled / absent
        base = m.base_layer if isinstance(m, LoraLinear) else m
        if isinstance(base, Linear4bit):
            weight, qs = base.weight, base.quant_state
        else:
            weight, qs = base.weight.to(dtype), None
        bias = None if base.bias is None else base.bias.to(dtype)
        if lora is None:
            projs.append(Projection(weight, qs, bias=bias))
            continue
        ps.add(lora.dropout if lora.training else 0.0)
        A, B = lora.adapter_weights()
        magnitude = weight_sq = None
        if lora.use_dora:
            magnitude = lora.lora_magnitude_vector[lora.active_adapter].weight
            weight_sq = lora.base_sq_norm(x.device)  # cached by the layer: the frozen part of the norm
        projs.append(Projection(weight, qs, A.to(dtype), B.to(dtype), lora.scaling, bias, magnitude, weight_sq))
    if len(ps) > 1:
        raise ValueError(f"the adapters of one block must share one active dropout p, got {sorted(ps)} "
                         "(are some of them in eval mode?)")
    return x.to(dtype), projs, (ps.pop() if ps else 0.0)


def hf_instance(cls: type, hf_cls: type) -> type:
    """`cls` made a subclass of the HF class it replaces as well (its own methods first), so
    HF's isinstance checks keep matching: e.g. the output recorders behind
    `output_attentions=True` find attention modules by class."""
    name = f"Trilora{hf_cls.__name__}"
    if name not in _HF_SUBCLASSES:
        _HF_SUBCLASSES[name] = type(name, (cls, hf_cls), {"__module__": __name__, "__qualname__": name})
    return _HF_SUBCLASSES[name]


_HF_SUBCLASSES: dict[str, type] = {}  # made on first use, one per HF class


def __getattr__(name: str):
    """Module attributes for the classes `hf_instance` made, so pickle finds them by name."""
    try:
        return _HF_SUBCLASSES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Hand `old`'s forward (pre-)hooks to its replacement `new` (HF installs some, e.g. the
    output recorders, on the first forward; user hooks should survive a patch too)."""
    for name in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        if getattr(old, name, None):
            setattr(new, name, getattr(old, name))


# ----------------------------------------------------------------------------- MLP

class TriloraMLP(nn.Module):
    """Drop-in for LlamaMLP / MistralMLP / Qwen2MLP (act "silu") and GemmaMLP ("gelu_tanh").

    The block already recomputes its [tokens, intermediate] activations in backward; under
    activation checkpointing of whole decoder layers, gate and up then run three times per
    step (forward, checkpoint replay, block recompute).
    """

    def __init__(self, mlp: nn.Module, act: str, backend: str = "auto"):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn  # kept for code that reads it; the block computes `act` itself
        for name in ("config", "hidden_size", "intermediate_size"):
            if hasattr(mlp, name):
                setattr(self, name, getattr(mlp, name))
        self.act, self.backend = act, backend
        self.train(mlp.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden] → [..., hidden] in x's dtype."""
        xc, projs, p = projections_of((self.gate_proj, self.up_proj, self.down_proj), x)
        return lora_mlp(xc, *projs, act=self.act, dropout_p=p, backend=self.backend).to(x.dtype)

    def extra_repr(self) -> str:
        return f"act={self.act!r}, backend={self.backend!r}"


# ----------------------------------------------------------------------------- attention

class TriloraAttention(nn.Module):
    """Drop-in for LlamaAttention / MistralAttention / Qwen2Attention / GemmaAttention (transformers 5).

    `eager` is the family's `eager_attention_forward` (used when config._attn_implementation is
    "eager"); `sliding_window_from` says where the family's forward reads the window it passes
    to the attention function: "config" (Mistral), "module" (Qwen2) or None (Llama, Gemma).
    """

    def __init__(self, attn: nn.Module, eager, sliding_window_from: str | None, backend: str = "auto"):
        nn.Module.__init__(self)  # not super(): in `hf_instance` subclasses the next class is HF's
        for name in _ATTENTION_ATTRS:
            if hasattr(attn, name):
                setattr(self, name, getattr(attn, name))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self._eager, self._sliding_window_from, self.backend = eager, sliding_window_from, backend
        self.train(attn.training)

    def forward(self, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, cache=None, **kwargs):
        """HF's attention forward: hidden [B, T, hidden] → (output [B, T, hidden], attention weights or None)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        # 1. q, k, v from one block, [B, T, H·D] → [B, H, T, D]
        x, projs, p = projections_of((self.q_proj, self.k_proj, self.v_proj), hidden_states)
        q, k, v = (t.to(hidden_states.dtype).view(hidden_shape).transpose(1, 2)
                   for t in lora_qkv(x, *projs, dropout_p=p, backend=self.backend))

        # 2. rotary embedding (cos/sin are HF's: every rope scaling is computed there)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin, backend=self.backend)

        # 3. HF's cache and attention function
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager)
        if self._sliding_window_from == "config":
            kwargs["sliding_window"] = getattr(self.config, "sliding_window", None)
        elif self._sliding_window_from == "module":
            kwargs["sliding_window"] = self.sliding_window
        out, weights = attention(self, q, k, v, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **kwargs)

        # 4. output projection (a LoraLinear runs the fused lora_linear kernel)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights

    def extra_repr(self) -> str:
        return f"layer_idx={getattr(self, 'layer_idx', None)}, backend={self.backend!r}"
