"""A longer context window: RoPE scaling set on the model's config before it is built, and
activations saved for backward offloaded to host memory.

`--context-length L` fine-tunes a RoPE model beyond the `max_position_embeddings` it was
pretrained with. `rope_overrides` turns L and `--rope-scaling` into config entries
(`rope_parameters`, `max_position_embeddings`) that `load_model` / `load_sharded` set on
config.json's before the model is built; the model keeps them in its config, so a merged or
fully fine-tuned model's config.json carries them and plain transformers reloads it with the
same positions, and `save_adapter` records them in the adapter (`trilora.base_config`) so
that `eval`, `generate` and `merge` apply them to a fresh base.

Rope types (transformers' own implementations, `modeling_rope_utils`):
  linear   position interpolation: every frequency divided by factor = L / original; the
           default, the one every RoPE family takes, and the one fine-tuning adapts to fastest.
  dynamic  NTK-aware: the base grows with the batch's longest position beyond the original
           length (positions within it are untouched); max_position_embeddings stays the
           original, as transformers' formula needs.
  yarn     NTK-by-parts interpolation with attention temperature (beta_fast 32, beta_slow 1).
  llama3   Llama 3.1's: low frequencies divided by factor, high ones kept, smooth in between
           (low_freq_factor 1, high_freq_factor 4).
A family "allows" scaling when its rotary embedding dispatches through transformers'
`ROPE_INIT_FUNCTIONS` (Llama, Mistral, Qwen2/3, Gemma, Phi-3, ...); a model without RoPE (GPT-2,
BERT) or whose config already scales RoPE is refused in one line.

`SavedActivations` (`--offload-activations`): a saved-tensor hook around the forward pass that
copies every activation saved for backward to host memory (pinned on CUDA) and back when
backward needs it. With `--gradient-checkpointing` (non-reentrant) what is saved is mostly the
checkpointed layers' inputs, so the device keeps no per-layer activation at all. It also
counts the bytes saved, which makes a deterministic memory measure on any device.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import weakref

import torch
import torch.nn as nn

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
DEFAULT_ROPE_TYPE = "linear"


def original_length(model_config) -> int | None:
    """The context a model was pretrained with: max_position_embeddings (None when absent)."""
    value = getattr(model_config, "max_position_embeddings", None)
    return int(value) if value else None


def _family_allows_scaling(model_config) -> bool:
    """Whether the model's rotary embedding takes transformers' scaled rope types."""
    model_type = getattr(model_config, "model_type", None)
    if not model_type or not getattr(model_config, "rope_parameters", None):
        return False
    try:
        module = importlib.import_module(f"transformers.models.{model_type.replace('-', '_')}.modeling_{model_type.replace('-', '_')}")
    except ImportError:
        return False
    return hasattr(module, "ROPE_INIT_FUNCTIONS")


def rope_overrides(model_config, context_length: int | None, rope_scaling: str | None,
                   where: str = "the model") -> dict:
    """The config entries that give `model_config` a context of `context_length` tokens with
    rope type `rope_scaling` (None: "linear" when scaling is needed); {} when the model's own
    context suffices. ValueError (one line, naming the flag) for what cannot be done."""
    if context_length is None:
        if rope_scaling is not None:
            raise ValueError("--rope-scaling needs --context-length L, the context to fine-tune for")
        return {}
    if rope_scaling is not None and rope_scaling not in ROPE_TYPES:
        raise ValueError(f"--rope-scaling {rope_scaling!r}: one of {', '.join(ROPE_TYPES)}")
    original = original_length(model_config)
    if original is None:
        raise ValueError(f"--context-length: {where} has no max_position_embeddings in its config, so its "
                         "context cannot be extended")
    if context_length <= original:
        if rope_scaling is not None:
            raise ValueError(f"--rope-scaling {rope_scaling}: --context-length {context_length} is within the "
                             f"{original} positions {where} was pretrained with, so there is nothing to scale; "
                             "drop --rope-scaling (or give a longer --context-length)")
        return {}
    kind = rope_scaling or DEFAULT_ROPE_TYPE
    if not _family_allows_scaling(model_config):
        raise ValueError(f"--context-length {context_length} needs RoPE scaling beyond the {original} positions of "
                         f"{where}, but its family ({getattr(model_config, 'model_type', '?')}) has no scalable "
                         f"RoPE (--rope-scaling {kind} is not supported there): use --context-length {original} "
                         "or less")
    params = copy.deepcopy(model_config.rope_parameters)
    nested = [k for k in params if isinstance(params[k], dict)]
    if nested:  # per-layer-type rope (Gemma 3): the global-attention layers carry the long context
        if "full_attention" not in params:
            raise ValueError(f"--context-length: {where} has per-layer RoPE settings {sorted(nested)} without "
                             "full_attention: not supported")
        target = params["full_attention"]
    else:
        target = params
    current = target.get("rope_type", "default")
    if current != "default":
        raise ValueError(f"--context-length {context_length}: {where} already scales RoPE ({current}, factor "
                         f"{target.get('factor')}) up to {original} positions: extending it further is not "
                         f"supported; use --context-length {original} or less")
    factor = context_length / original
    factor = int(factor) if factor == int(factor) else factor
    target.update(rope_type=kind, factor=float(factor))
    if kind in ("yarn", "llama3"):
        target["original_max_position_embeddings"] = original
    if kind == "llama3":
        target.update(low_freq_factor=1.0, high_freq_factor=4.0)
    # dynamic NTK scales from max_position_embeddings on: it must stay the pretrained length
    return {"rope_parameters": params,
            "max_position_embeddings": original if kind == "dynamic" else context_length}


def model_context(model_config, overrides: dict) -> int | None:
    """The positions a model configured with `overrides` handles: the scaled length (a
    dynamic NTK model: original x factor), else max_position_embeddings."""
    params = overrides.get("rope_parameters")
    if params:
        target = params.get("full_attention", params)
        if target.get("rope_type") == "dynamic":
            return round(overrides["max_position_embeddings"] * target["factor"])
        return overrides["max_position_embeddings"]
    return original_length(model_config)


def check_lengths(longest: int, context: int | None, max_length: int, where: str) -> None:
    """ValueError naming --max-length / --context-length when a training sequence would hold
    positions beyond the model's context (`longest`: the longest tokenized example; packed
    rows restart positions at each example, so packing does not lengthen it)."""
    if context is None or longest <= context:
        return
    raise ValueError(f"--max-length {max_length} lets training examples of up to {longest} tokens through, beyond "
                     f"the {context} positions of {where} (max_position_embeddings): give --context-length "
                     f"{max_length} to fine-tune with RoPE scaling, or --max-length {context} or less")


class SavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Around a forward pass: every tensor autograd saves for backward passes through here,
    except the model's own parameters and buffers (saved by reference, never copied).

    offload=True copies each one to host memory (pinned when it lives on CUDA, copied
    asynchronously) and back to its device when backward unpacks it: the device then keeps no
    activation between forward and backward. On a CPU the copy is another host tensor (the
    same code path, the same numbers).

    Counters (bytes): `device_bytes`, the distinct storages saved and kept where they were
    made; `host_bytes`, the copies made in host memory (one per distinct view). After the forward pass their sum is the activation memory that
    backward holds on to; with non-reentrant activation checkpointing that is each layer's
    input plus what lies outside the layers (a layer's recomputed activations, one layer at a
    time during backward, come on top)."""

    def __init__(self, model: nn.Module | None = None, offload: bool = False):
        self.offload = offload
        self.device_bytes = 0
        self.host_bytes = 0
        self._seen: dict[tuple, weakref.ref] = {}  # storage -> the live tensor that owns it
        self._copies: dict[tuple, tuple] = {}  # an offloaded view -> (its owner, its host copy)
        self._weights = set()
        for t in () if model is None else (*model.parameters(), *model.buffers()):
            t = getattr(t, "_local_tensor", t)  # a DTensor (FSDP) shard
            with contextlib.suppress(RuntimeError, NotImplementedError):
                if not t.is_meta:
                    self._weights.add(t.untyped_storage().data_ptr())
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        if tensor.is_meta or tensor.numel() == 0:
            return tensor
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without plain storage: kept as it is
            return tensor
        if storage.data_ptr() in self._weights:
            return tensor
        owner = tensor._base if tensor._base is not None else tensor  # a view's storage lives with its base
        if not self.offload:
            key = (storage.data_ptr(), str(tensor.device))
            earlier = self._seen.get(key)
            if earlier is None or earlier() is None:  # a storage counts once while it lives
                self._seen[key] = weakref.ref(owner)
                self.device_bytes += storage.nbytes()
            return tensor
        # the same view saved again (a layer input that q, k and v projections all save) shares one copy
        key = (storage.data_ptr(), str(tensor.device), tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride(), tensor.dtype)
        earlier = self._copies.get(key)
        if earlier is not None and earlier[0]() is not None:
            return earlier[1]
        pin = tensor.device.type == "cuda"
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin)
        host.copy_(tensor, non_blocking=pin)
        self.host_bytes += host.nbytes
        packed = (tensor.device, host)
        self._copies[key] = (weakref.ref(owner), packed)
        return packed

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=host.is_pinned())

    @property
    def total_bytes(self) -> int:
        return self.device_bytes + self.host_bytes


def activation_context(model: nn.Module, offload: bool):
    """`SavedActivations(model, offload=True)` when offloading, else a no-op context."""
    return SavedActivations(model, offload=True) if offload else contextlib.nullcontext()




def context_settings(config, model_dir) -> tuple[dict, int | None]:
    """(config overrides, context in tokens) of a run: `rope_overrides` for the model in
    `model_dir` under `config.context_length` / `config.rope_scaling`. A GGUF file takes no
    overrides (its context is not checked); an `--init-adapter` must have been trained with the
    same ones."""
    from transformers import AutoConfig

    from ..gguf_io import is_gguf
    if is_gguf(model_dir):
        if config.context_length is not None:
            raise ValueError(f"--context-length: {model_dir} is a GGUF file, whose config cannot be changed; "
                             "give an HF model directory")
        return {}, None
    model_config = AutoConfig.from_pretrained(model_dir)
    overrides = rope_overrides(model_config, config.context_length, config.rope_scaling, str(model_dir))
    if getattr(config, "init_adapter", None):
        from ..lora import adapter_base_config
        earlier = adapter_base_config(config.init_adapter)
        if earlier != overrides:
            def said(o):
                return (f"context {model_context(model_config, o)} with RoPE {_rope_of(o)}" if o else
                        "the model's own context")
            raise ValueError(f"--init-adapter {config.init_adapter} was trained with {said(earlier)}, this run asks "
                             f"for {said(overrides)}: give the same --context-length / --rope-scaling")
    return overrides, model_context(model_config, overrides)


def _rope_of(overrides: dict) -> str:
    params = overrides["rope_parameters"]
    target = params.get("full_attention", params)
    return f"{target['rope_type']} x{target['factor']:g}"


def describe(overrides: dict, context: int | None) -> str:
    """One console line about the context a run trains for."""
    if not overrides:
        return f"context: {context} positions (the model's own)"
    params = overrides["rope_parameters"]
    original = round(context / params.get("full_attention", params)["factor"])
    return (f"context: {context} tokens, RoPE scaled ({_rope_of(overrides)}) beyond the {original} positions the "
            "model was pretrained with; the scaling is saved with the adapter / model")


__all__ = ["ROPE_TYPES", "DEFAULT_ROPE_TYPE", "rope_overrides", "model_context", "check_lengths", "context_settings",
           "describe", "original_length", "SavedActivations", "activation_context"]
