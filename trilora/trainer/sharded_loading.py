"""`load_sharded`: `--fsdp`'s loading, where each rank materialises only its own shards.

Why: `load_model` streams a checkpoint tensor by tensor, but into one whole model; under
FSDP every rank would first hold the whole (4-bit) model in host memory — 35 GB per rank for
a 70B model — only to keep 1/N of it. Here the model is built on the `meta` device (no
memory), adapted there (LoRA, fused blocks, activation checkpointing), sharded there
(`fully_shard`, with the 4-bit absmax tables as parameters so they shard too), and only then
allocated: `to_empty` gives each rank memory for its shards alone. The checkpoint is then
read tensor by tensor (`loading.read_checkpoint`: one dense weight at a time, quantized as it
is read) and each rank copies its part of every tensor into its shards. Peak memory per rank:
its shards plus one layer's dense weight.

The adapter is initialised afterwards exactly as `add_lora` would have on a loaded model: the
random generators are put back to where they stood when LoRA was added on the skeleton, and
every adapter is reset in the same order on whole tensors (`full_trainable`), so a sharded run
starts from the same weights as a one-process run. A DoRA magnitude starts as ‖W‖ per row
(B is zero at init), computed from each base weight while it is read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..files import open_safetensors
from ..kernels.lora.dora import dora_weight_norm
from ..lora import LoraLinear
from ..lora.inject import adapter_configs
from ..module_tree import replace_module
from ..quant import Linear4bit
from ..quant.state import QuantState
from .loading import DEFAULT_SKIP, CheckpointPlan, _owner, _with_prefix, model_skeleton, read_checkpoint
from .sharding import full_trainable, local, local_part, shard_model


def load_sharded(path: str | Path, adapt: Callable[[nn.Module], None], device: torch.device,
                 quantize: str | None = "nf4", dtype: torch.dtype = torch.float32, double_quant: bool = True,
                 blocksize: int = 64, skip=DEFAULT_SKIP, trust_remote_code: bool = False, model_class=None,
                 head: dict | None = None, backend: str = "auto",
                 config_overrides: dict | None = None) -> nn.Module:
    """The model of HF model directory `path`, adapted by `adapt(model)` (called on the meta
    skeleton: add LoRA, patch, enable checkpointing — nothing that reads weights), sharded
    over the ranks (`sharding.shard_model`) and filled from the checkpoint, each rank writing
    only its shards on `device`. Every rank must call it (FSDP's setup is collective).
    Returns the model in eval mode, as `load_model` does.

    Raises ValueError when the checkpoint lacks a weight (a new task head needs
    `load_model`'s initialisation), when a 4-bit layer's stored format differs from the
    skeleton's, or for an adapter initialised with B ≠ 0 (init_lora_weights=False)."""
    model, plan = model_skeleton(path, quantize, dtype, double_quant, blocksize, skip, trust_remote_code,
                                 model_class, head, config_overrides)
    _quantized_skeleton(model, plan)
    skeleton = _Skeleton(model)
    generators = _generator_states(device)  # where add_lora would draw the adapter from
    model.eval()
    adapt(model)
    _check_initialisable(model)
    skeleton.bind(model)
    shard_model(model, device)
    skeleton.restore_buffers(device)  # to_empty left them undefined
    magnitudes = _fill(model, plan, skeleton, device, backend)
    _initialise_adapters(model, generators, magnitudes)
    return model


# ----------------------------------------------------------------------------- the skeleton

def _quantized_skeleton(model: nn.Module, plan: CheckpointPlan) -> None:
    """Replace each layer `plan` quantizes by an empty (`meta`) `Linear4bit` of its format:
    the arguments' format when quantizing as it reads, the stored one for a pre-quantized
    checkpoint (read from each layer's small quant-state entry)."""
    stored = _stored_formats(plan) if plan.prequantized else {}
    for name in sorted(plan.targets):
        linear = model.get_submodule(name)
        quant_type, blocksize, nested, dtype = stored.get(name, (plan.quant_type, plan.blocksize,
                                                                 plan.double_quant, plan.dtype))
        replace_module(model, name, Linear4bit.empty(linear.in_features, linear.out_features, linear.bias is not None,
                                                     quant_type, blocksize, nested, dtype))


def _stored_formats(plan: CheckpointPlan) -> dict[str, tuple]:
    """{layer: (quant_type, blocksize, double_quant, dtype)} of a pre-quantized checkpoint."""
    blobs, nested = {}, set()
    for shard in plan.shards:
        with open_safetensors(shard) as f:
            for stored in f.keys():
                key = _with_prefix(stored, plan.prefix, plan.names)
                owner = _owner(key)
                if owner not in plan.targets:
                    continue
                if key.endswith(".weight.nested_absmax"):
                    nested.add(owner)
                elif ".weight.quant_state.bitsandbytes__" in key:
                    blobs[owner] = f.get_tensor(stored)
    formats = {}
    for owner, blob in blobs.items():
        meta = QuantState.metadata(blob, where=f"{plan.path}: {owner}.weight")
        formats[owner] = (meta["quant_type"], meta["blocksize"], owner in nested, meta["dtype"])
    return formats


class _Skeleton:
    """Where each checkpoint tensor goes. Taken on the bare skeleton: its modules by name (for
    shapes) and its tensors by key (tied ones under every name); `bind` then finds, after
    LoRA and `trilora.patch` rebuilt parts of the tree, the module that holds each tensor now
    (by identity: both keep the Parameter objects), before FSDP swaps them for shards."""

    def __init__(self, model: nn.Module):
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.tensors = {f"{name}.{leaf}" if name else leaf: t for name, module in self.modules.items()
                        for leaf, t in [*module._parameters.items(), *module._buffers.items()] if t is not None}
        self.buffers = {key: t.clone() for key, t in self.tensors.items() if not isinstance(t, nn.Parameter)
                        and not t.is_meta}
        self.slots: dict[str, tuple[nn.Module, str]] = {}

    def bind(self, model: nn.Module) -> None:
        """Find each tensor's (module, attribute) in the adapted `model`; call before sharding."""
        holders = {}
        for module in model.modules():
            for leaf, t in [*module._parameters.items(), *module._buffers.items()]:
                if t is not None:
                    holders.setdefault(id(t), (module, leaf))
        self.slots = {key: holders[id(t)] for key, t in self.tensors.items() if id(t) in holders}

    def get_submodule(self, name: str):
        """What `read_checkpoint` asks of a module: shapes (and a 4-bit layer's bias: None,
        its bias comes as a tensor of its own)."""
        module = self.modules[name]
        return _Shapes(module) if isinstance(module, Linear4bit) else module

    def restore_buffers(self, device) -> None:
        for key, value in self.buffers.items():
            if key in self.slots:
                module, leaf = self.slots[key]
                module._buffers[leaf] = value.to(device)

    def parameter_names(self) -> dict[int, str]:
        """{id(parameter): its first name} of the parameters the slots hold now."""
        names = {}
        for key, (module, leaf) in self.slots.items():
            if module._parameters.get(leaf) is not None:
                names.setdefault(id(module._parameters[leaf]), key)
        return names


class _Shapes:
    """A skeleton 4-bit layer as the reader sees it: its shapes, and no bias to carry over."""

    def __init__(self, module: Linear4bit):
        self.in_features, self.out_features, self.bias = module.in_features, module.out_features, None
        self._parameters, self._buffers = module._parameters, module._buffers


# ----------------------------------------------------------------------------- filling

def _fill(model: nn.Module, plan: CheckpointPlan, skeleton: _Skeleton, device, backend) -> dict:
    """Copy this rank's part of every checkpoint tensor into the shards; returns the DoRA
    magnitudes {(id(lora layer), adapter): m} computed from the base weights on the way.
    ValueError naming the weights the checkpoint lacks."""
    wrappers = {id(m.base_layer): m for m in model.modules() if isinstance(m, LoraLinear)}
    names = skeleton.parameter_names()
    written, magnitudes = set(), {}
    for kind, key, value in read_checkpoint(plan, skeleton, device, backend):
        if kind == "layer":
            module = skeleton.slots[key + ".weight"][0]
            _write_layer(module, value, key, with_bias=plan.prequantized)
            written.update(names[id(p)] for p in (module.weight, module.bias) if p is not None
                           and (plan.prequantized or p is module.weight))
            dense = (lambda layer=value: layer.dequantize(torch.float32))
        else:
            if key not in skeleton.slots:
                raise ValueError(f"{plan.path}: {key}: the adapted model no longer holds this tensor")
            module, leaf = skeleton.slots[key]
            if leaf in module._parameters:
                param = module._parameters[leaf]
                with torch.no_grad():
                    local(param).copy_(local_part(value, param))
                written.add(names[id(param)])
            else:
                module._buffers[leaf] = value
            dense = (lambda t=value: t.float()) if leaf == "weight" else None
        if dense is not None and id(module) in wrappers:
            magnitudes.update(_initial_magnitudes(wrappers[id(module)], dense()))
    missing = sorted(set(names.values()) - written)
    if missing:
        raise ValueError(f"{plan.path}: the checkpoint lacks {len(missing)} weights, e.g. {missing[:5]}")
    return magnitudes


def _write_layer(module: Linear4bit, layer: Linear4bit, name: str, with_bias: bool) -> None:
    """Copy this rank's part of the whole 4-bit `layer` into the (sharded) skeleton `module`:
    packed weight, absmax table (a parameter under FSDP), bias when it came with the layer."""
    state, want = layer.quant_state, module.quant_state
    if (state.quant_type, state.blocksize, state.nested, tuple(state.shape), state.dtype) != (
            want.quant_type, want.blocksize, want.nested, tuple(want.shape), want.dtype):
        raise ValueError(f"{name}: the checkpoint's 4-bit format ({state.quant_type}, blocksize {state.blocksize}, "
                         f"double quant {state.nested}, {state.dtype}) differs from the one the model was built "
                         f"with ({want.quant_type}, {want.blocksize}, {want.nested}, {want.dtype})")
    absmax = getattr(module, "absmax", None)
    with torch.no_grad():
        local(module.weight).copy_(local_part(layer.weight, module.weight))
        if with_bias and layer.bias is not None:
            local(module.bias).copy_(local_part(layer.bias, module.bias))
        if absmax is not None:
            local(absmax).copy_(local_part(state.absmax, absmax))
    module.quant_state = state.map(lambda t: absmax if t is state.absmax and absmax is not None else t)


def _initial_magnitudes(layer: LoraLinear, base_weight: torch.Tensor) -> dict:
    """{(id(layer), adapter): m} for the DoRA adapters of `layer`: ‖W + s·BA‖ with B = 0 at
    init, i.e. ‖W‖ per row, computed as `add_adapter` computes it (same function, same W)."""
    weight = base_weight.t() if layer.fan_in_fan_out else base_weight
    out = {}
    for name, settings in layer.settings.items():
        if settings.use_dora:
            zero_a = weight.new_zeros(settings.r, layer.in_features)
            zero_b = weight.new_zeros(layer.out_features, settings.r)
            out[(id(layer), name)] = dora_weight_norm(weight, zero_a, zero_b, settings.scaling)
    return out


# ----------------------------------------------------------------------------- the adapter

def _generator_states(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.random.get_rng_state(), cuda


def _check_initialisable(model: nn.Module) -> None:
    for name, config in adapter_configs(model).items():
        if config.init_lora_weights is False:
            raise ValueError(f"adapter {name!r}: init_lora_weights=False (B random at init) is not supported "
                             "by the sharded load; use True or 'gaussian'")


def _initialise_adapters(model: nn.Module, generators: tuple, magnitudes: dict) -> None:
    """Initialise every adapter as `add_lora` would have on a loaded model: from the same
    generator state, in the same order, the same draws (`initial_adapter_weights`), on whole
    tensors written back into the shards."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    if not layers:
        return
    configs = adapter_configs(model)
    cpu, cuda = generators
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, layers[0].lora_A[next(iter(layers[0].lora_A))].weight.device)
    with full_trainable(model), torch.no_grad():
        for layer in layers:
            for name in layer.settings:
                A, B = layer.initial_adapter_weights(name, configs[name].init_lora_weights)
                layer.lora_A[name].weight.copy_(A)
                layer.lora_B[name].weight.copy_(B)
                if layer.settings[name].use_dora:
                    layer.lora_magnitude_vector[name].weight.copy_(magnitudes[(id(layer), name)])


__all__ = ["load_sharded"]
