"""`patch(model)`: swap trilora's fused blocks into an HF Llama, Mistral, Qwen2 or Gemma model.

By module replacement only (no framework function is monkey-patched):
- RMSNorm modules → `trilora.kernels.RMSNorm` (Gemma's (1 + w) variant for Gemma), sharing
  the weight Parameter;
- MLP modules (gate/up/down as nn.Linear, Linear4bit or LoraLinear) → `TriloraMLP` (the LoRA
  MLP block: SwiGLU, or GeGLU-tanh for Gemma);
- attention modules → `TriloraAttention` (q/k/v as one `lora_qkv` block, the RoPE kernel; HF's
  cache and attention functions; transformers 5 attention API);
- CausalLM lm_head + loss → `FusedLMHead` and two forward hooks (see `patching/loss.py`): in
  training with labels, the fused linear cross-entropy, and `output.logits` is None.

Whatever patch cannot handle keeps its HF module and is reported (the returned `PatchReport`,
and a RuntimeWarning listing the skipped modules): never a silent slow path. Not handled:
other model families, trainable base weights (full fine-tuning), projections that are not
nn.Linear / trilora Linear4bit / LoraLinear over them (e.g. bitsandbytes layers), adapters of
one block with different dropout p or 4-bit compute dtypes, activations other than silu and
gelu-tanh, an lm_head that is adapted or a trained copy, a custom loss_function.

Patch after `add_lora` / `load_adapter` / quantization: patch decides which modules it can
handle when it runs, the patched modules read their projections at every call. Hooks on the
projections themselves (`q_proj`, `gate_proj`, ...) no longer fire: the blocks do not call them.
"""
from __future__ import annotations

import inspect
import logging
import warnings
from dataclasses import dataclass, field

import torch.nn as nn

from trilora.kernels.backend import BACKENDS
from trilora.kernels.rms_norm import RMSNorm
from trilora.lora import LoraLinear, TrainableCopy
from trilora.module_tree import replace_module
from trilora.quant import Linear4bit

from .loss import FusedLMHead, install_fused_loss
from .blocks import (TriloraAttention, TriloraMLP, block_dropout, hf_instance, move_hooks,
                            unsupported_projection)

logger = logging.getLogger(__name__)
KINDS = ("rms_norm", "mlp", "attention", "lm_head_loss")
# activation module class name → the block's activation
ACTIVATIONS = {"SiLUActivation": "silu", "SiLU": "silu", "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
               "PytorchGELUTanh": "gelu_tanh"}


@dataclass
class PatchReport:
    """What `patch` did. patched: kind → module names; skipped: (name, kind, reason)."""
    patched: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return len(self.patched[kind])

    def __str__(self) -> str:
        lines = ["trilora.patch: " + ", ".join(f"{k} {len(v)}" for k, v in self.patched.items()) + " patched"]
        lines += [f"  skipped {kind} {name or '<model>'}: {why}" for name, kind, why in self.skipped]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Family:
    norm: type
    mlp: type
    attention: type
    causal_lm: type
    eager: object                  # the family's eager_attention_forward
    gemma: bool = False            # (1 + w) RMSNorm
    sliding_window_from: str | None = None


def _families() -> dict[str, _Family]:
    from transformers.models.gemma import modeling_gemma as gemma
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.mistral import modeling_mistral as mistral
    from transformers.models.qwen2 import modeling_qwen2 as qwen2
    return {
        "llama": _Family(llama.LlamaRMSNorm, llama.LlamaMLP, llama.LlamaAttention, llama.LlamaForCausalLM,
                         llama.eager_attention_forward),
        "mistral": _Family(mistral.MistralRMSNorm, mistral.MistralMLP, mistral.MistralAttention,
                           mistral.MistralForCausalLM, mistral.eager_attention_forward, sliding_window_from="config"),
        "qwen2": _Family(qwen2.Qwen2RMSNorm, qwen2.Qwen2MLP, qwen2.Qwen2Attention, qwen2.Qwen2ForCausalLM,
                         qwen2.eager_attention_forward, sliding_window_from="module"),
        "gemma": _Family(gemma.GemmaRMSNorm, gemma.GemmaMLP, gemma.GemmaAttention, gemma.GemmaForCausalLM,
                         gemma.eager_attention_forward, gemma=True),
    }


def _kind_of_unknown(module: nn.Module) -> str | None:
    """The kind an unsupported module would be, from its class name (for the report)."""
    name = type(module).__name__
    if isinstance(module, (RMSNorm, TriloraMLP, TriloraAttention)):
        return None  # patched before
    if name.endswith("RMSNorm"):
        return "rms_norm"
    if name.endswith("LayerNorm"):
        return "layer_norm"  # trilora fuses RMSNorm only: reported as what it is
    if name.endswith("MLP"):
        return "mlp"
    if name.endswith(("Attention", "SdpaAttention", "FlashAttention2")):
        return "attention"
    return None


# ----------------------------------------------------------------------------- per kind

def _norm(module: nn.Module, fam: _Family, backend: str):
    eps = module.eps if fam.gemma else module.variance_epsilon
    new = RMSNorm(module.weight.shape[0], eps, gemma=fam.gemma, backend=backend, device="meta")
    new.weight = module.weight
    return new.train(module.training), None


def _projections_reason(modules) -> str | None:
    for name, m in modules:
        why = unsupported_projection(m)
        if why:
            return f"{name}: {why}"
    if block_dropout([m for _, m in modules]) is None:
        return "its LoRA adapters have different dropout p (one block shares one dropout mask)"
    bases = [m.base_layer if isinstance(m, LoraLinear) else m for _, m in modules]
    if len({b.compute_dtype for b in bases if isinstance(b, Linear4bit)}) > 1:
        return "its 4-bit bases have different compute dtypes (one block computes in one dtype)"
    return None


def _mlp(module: nn.Module, fam: _Family, backend: str):
    act = ACTIVATIONS.get(type(module.act_fn).__name__)
    if act is None:
        return None, f"activation {type(module.act_fn).__name__} has no GLU kernel (silu, gelu tanh only)"
    why = _projections_reason([(n, getattr(module, n)) for n in ("gate_proj", "up_proj", "down_proj")])
    return (None, why) if why else (TriloraMLP(module, act, backend), None)


def _attention(module: nn.Module, fam: _Family, backend: str):
    if "cache" not in inspect.signature(type(module).forward).parameters:
        import transformers
        return None, (f"transformers {transformers.__version__}'s attention API (no `cache` argument) is not "
                      "the one TriloraAttention re-implements (transformers 5.24)")
    why = _projections_reason([(n, getattr(module, n)) for n in ("q_proj", "k_proj", "v_proj")])
    if why:
        return None, why
    if getattr(module, "head_dim", 2) % 2:
        return None, f"odd head_dim {module.head_dim} (RoPE's rotate_half needs an even one)"
    return hf_instance(TriloraAttention, type(module))(module, fam.eager, fam.sliding_window_from, backend), None


def _loss_reason(model: nn.Module) -> str | None:
    head = model.lm_head
    if isinstance(head, (LoraLinear, TrainableCopy)) or type(head) is not nn.Linear:
        return f"lm_head is {type(head).__name__} (the fused loss takes a plain nn.Linear head)"
    if "_loss_function" in vars(model):
        return "the model has a custom loss_function"
    if getattr(model, "loss_type", "ForCausalLM") not in ("ForCausalLM", None):
        return f"loss_type {model.loss_type!r} is not ForCausalLM"
    if getattr(model.config, "final_logit_softcapping", None) is not None:
        return "final_logit_softcapping is not in the fused cross-entropy"
    return None


# ----------------------------------------------------------------------------- patch

def patch(model: nn.Module, backend: str = "auto", *, rms_norm: bool = True, mlp: bool = True,
          attention: bool = True, loss: bool = True, warn: bool = True) -> PatchReport:
    """Swap trilora's fused modules into `model` in place and report what was (not) swapped.

    Args:
        model: an HF Llama/Mistral/Qwen2/Gemma model (CausalLM or the bare decoder), plain,
            4-bit (`trilora.quant`) and/or with LoRA adapters (`trilora.lora`). Other families
            and modules are left alone and reported as skipped.
        backend: the patched modules' backend: "auto" (Triton on CUDA or under the
            interpreter), "triton" or "torch" (their plain-PyTorch references).
        rms_norm, mlp, attention, loss: which kinds to patch.
        warn: emit a RuntimeWarning listing the skipped modules (the report holds them anyway).
    Returns a `PatchReport` (patched names by kind, skipped ones with reasons).

    Base weights of patched projections must be frozen (LoRA/QLoRA training): a trainable
    projection keeps its HF module. In training with labels, a patched CausalLM returns the
    loss and `logits=None` (the fused cross-entropy never materialises the logits).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    families = _families()
    by_class = {}
    for fam in families.values():
        for kind, cls in (("rms_norm", fam.norm), ("mlp", fam.mlp), ("attention", fam.attention)):
            by_class[cls] = (kind, fam)
    enabled = {"rms_norm": rms_norm, "mlp": mlp, "attention": attention}
    builders = {"rms_norm": _norm, "mlp": _mlp, "attention": _attention}
    report = PatchReport()

    replacements = []
    for name, module in model.named_modules():
        hit = by_class.get(type(module))
        if hit is None:
            kind = _kind_of_unknown(module)
            if kind == "layer_norm":  # trilora fuses RMSNorm only; a LayerNorm is not one
                report.skipped.append((name, kind, f"{type(module).__name__} (trilora fuses RMSNorm, not LayerNorm)"))
            elif kind and enabled[kind]:
                report.skipped.append((name, kind, f"unsupported class {type(module).__name__}"))
            continue
        kind, fam = hit
        if not enabled[kind]:
            continue
        if not name:
            report.skipped.append((name, kind, "the model itself: patch the module that holds it"))
            continue
        new, why = builders[kind](module, fam, backend)
        if new is None:
            report.skipped.append((name, kind, why))
        else:
            replacements.append((name, kind, new))
    for name, kind, new in replacements:  # after the walk: named_modules must not see a changing tree
        move_hooks(model.get_submodule(name), new)
        replace_module(model, name, new)
        report.patched[kind].append(name)

    if loss:
        causal_lms = tuple(f.causal_lm for f in families.values())
        if isinstance(model, causal_lms):
            if isinstance(model.lm_head, FusedLMHead):
                pass  # patched before
            elif (why := _loss_reason(model)) is not None:
                report.skipped.append(("lm_head", "lm_head_loss", why))
            else:
                install_fused_loss(model, backend)
                report.patched["lm_head_loss"].append("lm_head")
        elif hasattr(model, "lm_head"):
            report.skipped.append(("lm_head", "lm_head_loss", f"unsupported model class {type(model).__name__}"))

    logger.info("%s", report)
    if warn and report.skipped:
        warnings.warn(f"{report}\nskipped modules keep their HF implementation (slower, more memory)",
                      RuntimeWarning, stacklevel=2)
    return report


__all__ = ["PatchReport", "patch"]
