"""`add_lora`: wrap the matching linear layers of a model in `LoraLinear`, freeze the rest.

Module selection follows PEFT exactly, so an adapter trained here and one trained with PEFT
cover the same layers:
- target_modules list: a module matches when its dotted name equals an entry or ends with
  "." + entry; a string is a regex that must match the whole name; "all-linear" takes every
  linear layer except the output head (`get_output_embeddings()`, or for SEQ_CLS the
  top-level `score` / `classifier`).
- modules_to_save: a module matches when its name ends with an entry (PEFT's plain suffix
  test, so "classifier" also catches DistilBERT's "pre_classifier"); nothing inside such a
  module gets LoRA.
"""
from __future__ import annotations

import re
import warnings
from typing import Iterator

import torch.nn as nn

from trilora.quant import Linear4bit

from ..kernels.backend import BACKENDS
from ..module_tree import replace_module

from .config import DEFAULT_TARGET_MODULES, HEAD_TASK_TYPES, SEQ_CLS_HEADS, LoraConfig
from .layer import LoraLinear, TrainableCopy, linear_dims

CONFIG_ATTR = "trilora_lora_configs"    # {adapter name: resolved LoraConfig} of an adapted model
ACTIVE_ATTR = "trilora_active_adapter"  # the name of the adapter its layers run
DEFAULT_ADAPTER = "default"             # PEFT's name for the first adapter


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(name, module) of every LoraLinear in `model`."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear))


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """{adapter name: resolved config} of the adapters `model` carries (empty if none)."""
    return getattr(model, CONFIG_ATTR, None) or {}


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter `model`'s layers run (None if not adapted)."""
    return getattr(model, ACTIVE_ATTR, None) if adapter_configs(model) else None


def get_lora_config(model: nn.Module, adapter_name: str | None = None) -> LoraConfig | None:
    """The resolved config `add_lora` / `load_adapter` stored on `model` for `adapter_name`
    (default: the active adapter); None if the model has no such adapter."""
    return adapter_configs(model).get(adapter_name or active_adapter(model))


def _plain_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() without what sits inside a LoraLinear or a TrainableCopy (an adapted
    layer counts as the linear it wraps, its own A/B linears are not candidates)."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if inside and _under(name, inside):
            continue
        yield name, module
        if isinstance(module, (LoraLinear, TrainableCopy)):
            inside.append(name)


def linear_module_names(model: nn.Module) -> list[str]:
    """Dotted names of the layers LoRA can wrap (nn.Linear, Linear4bit, Conv1D, or a
    LoraLinear already wrapping one)."""
    return [n for n, m in _plain_modules(model) if n and linear_dims(m) is not None]


def lora_backend(model: nn.Module) -> str:
    """The kernels backend `model`'s LoRA layers run ("auto" when it has none): what an adapter
    added or merged later uses too."""
    return next((layer.backend for _, layer in lora_layers(model)), "auto")


def set_lora_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set the `lora_linear` backend of every LoraLinear in `model`; returns `model`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for _, layer in lora_layers(model):
        layer.backend = backend
    return model


# ----------------------------------------------------------------------------- matching

def _under(name: str, roots: list[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _modules_to_save_names(model: nn.Module, entries: list[str] | None, strict: bool) -> list[str]:
    """Names of the outermost modules whose name ends with an entry of modules_to_save."""
    if not entries:
        return []
    found: list[str] = []
    hit = set()
    for name, _ in _plain_modules(model):
        matched = [e for e in entries if name and name.endswith(e)]
        if matched and not _under(name, found):
            found.append(name)
            hit.update(matched)
    missing = [e for e in entries if e not in hit and e not in SEQ_CLS_HEADS]
    if strict and missing:
        raise ValueError(f"modules_to_save entries {missing} match no module of {type(model).__name__}")
    return found


def _head_names(model: nn.Module, config: LoraConfig) -> set[str]:
    """The output head(s) "all-linear" leaves alone."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    candidates = [out] if out is not None else (
        [getattr(model, h, None) for h in SEQ_CLS_HEADS] if config.task_type in HEAD_TASK_TYPES else [])
    for head in candidates:
        if isinstance(head, nn.Module):
            roots = [n for n, m in model.named_modules() if m is head]
            # a head may hold several linears (RoBERTa's classifier.dense / .out_proj)
            heads.update(n for n, _ in model.named_modules() if n in roots or _under(n, roots))
            break
    return heads


def _linear_names_hint(model: nn.Module) -> str:
    names = linear_module_names(model)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    example = f" (full names like {names[0]!r})" if names else ""
    return f"the model's linear layers are {leaves}{example}"


def resolve_targets(model: nn.Module, config: LoraConfig, strict: bool = True) -> tuple[list[str], list[str]]:
    """(names of the layers to wrap, names of the modules_to_save modules) for `config`.

    Raises ValueError when nothing matches, when (strict) a listed name matches nothing, or
    when a match is not a linear layer; the message lists the model's linear layer names.
    """
    tm = config.target_modules
    if tm is None:
        raise ValueError("target_modules is None: resolve the model-type default first (add_lora does)")
    save = _modules_to_save_names(model, config.resolved_modules_to_save(), strict)
    if config.all_linear:
        heads = _head_names(model, config)
        match = lambda n, m: linear_dims(m) is not None and n not in heads  # noqa: E731
    elif isinstance(tm, str):
        match = lambda n, m: re.fullmatch(tm, n) is not None  # noqa: E731
    else:
        match = lambda n, m: any(n == t or n.endswith("." + t) for t in tm)  # noqa: E731
    targets, bad = [], []
    for name, module in _plain_modules(model):
        if not name or _under(name, save) or not match(name, module):
            continue
        (targets if linear_dims(module) is not None else bad).append(name)
    if bad:
        raise ValueError(f"target_modules {tm!r} matched modules that are not linear layers: "
                         f"{[f'{n} ({type(model.get_submodule(n)).__name__})' for n in bad[:5]]}; "
                         f"{_linear_names_hint(model)}")
    if not targets:
        raise ValueError(f"target_modules {tm!r} matches no linear layer of {type(model).__name__}; "
                         f"{_linear_names_hint(model)}")
    if strict and isinstance(tm, list):
        unused = [t for t in tm if not any(n == t or n.endswith("." + t) for n in targets)]
        if unused:
            raise ValueError(f"target_modules entries {unused} match no linear layer; {_linear_names_hint(model)}")
    return targets, save


def resolve_config(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """`config` with target_modules filled from the model type's default when None."""
    if config.target_modules is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(f"no default target_modules for model type {model_type!r}: set target_modules; "
                         f"{_linear_names_hint(model)}")
    return config.copy(target_modules=list(DEFAULT_TARGET_MODULES[model_type]))


# ----------------------------------------------------------------------------- injection

def add_lora(model: nn.Module, config: LoraConfig | None = None, *, backend: str = "auto",
             strict: bool = True, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Wrap every matching linear layer of `model` in `LoraLinear`, in place; returns `model`.

    All other parameters are frozen, except the trainable copies of `modules_to_save` and the
    biases `config.bias` selects ("all": every `*.bias`; "lora_only": the adapted layers').
    The resolved config (explicit target list for "all-linear", SEQ_CLS heads added to
    modules_to_save, fan_in_fan_out set when a Conv1D was wrapped) is stored on the model
    (`get_lora_config`) for `save_adapter`.

    On a model that already carries adapters, `adapter_name` must be new: the adapter is
    added beside the others, frozen and inactive (PEFT's `add_adapter`; `set_adapter`
    switches). Several adapters on one model need bias="none" and no modules_to_save.

    Raises ValueError for an adapter name the model already has, for target names that match
    nothing (listing the model's linear layers), and for a 4-bit module in modules_to_save.
    """
    config = resolve_config(model, config or LoraConfig())
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    existing = adapter_configs(model)
    if not existing and any(True for _ in lora_layers(model)):
        raise ValueError("model already has LoRA layers; merge_lora(model) or start from a fresh base model")
    if adapter_name in existing:
        raise ValueError(f"model already has an adapter named {adapter_name!r} (adapters: {sorted(existing)}); "
                         "pass another adapter_name, merge_lora(model), or start from a fresh base model")
    if existing:
        _check_shareable(existing, adapter_name, config)
    targets, save = resolve_targets(model, config, strict)
    for name in save:
        module = model.get_submodule(name)
        if any(isinstance(m, Linear4bit) for m in module.modules()):
            raise ValueError(f"modules_to_save module {name!r} is 4-bit and cannot be trained in full; "
                             "leave it out of quantize_model (skip=...)")
    too_big = _rank_excess(model, targets, config.r)
    if too_big:
        warnings.warn(f"LoRA rank {config.r} exceeds min(in, out) of {len(too_big)} layer(s), e.g. "
                      f"{too_big[0][0]!r}: the extra rank adds parameters but no expressiveness", UserWarning,
                      stacklevel=2)

    if not existing:
        for p in model.parameters():
            p.requires_grad_(False)
    active = active_adapter(model) or adapter_name
    settings = (config.r, config.alpha, config.dropout, config.use_rslora, config.init_lora_weights)
    dora = {"use_dora": config.use_dora}
    disabled = any(m.disabled for _, m in lora_layers(model))  # called inside disable_adapter()
    conv1d = False
    for name in targets:
        layer = model.get_submodule(name)
        if isinstance(layer, LoraLinear):
            layer.add_adapter(adapter_name, *settings, **dora)
        else:
            layer = LoraLinear(layer, *settings, backend=backend, adapter_name=adapter_name, **dora)
            layer.active_adapter, layer.disabled = active, disabled
            replace_module(model, name, layer)
        if existing:  # PEFT: an added adapter stays frozen until set_adapter picks it
            for p in layer.adapter_parameters(adapter_name):
                p.requires_grad_(False)
        conv1d |= layer.fan_in_fan_out
    for name in save:
        replace_module(model, name, TrainableCopy(model.get_submodule(name)))
    _mark_biases(model, config.bias)

    stored = config.copy(
        target_modules=sorted(targets) if config.all_linear else config.target_modules,
        modules_to_save=config.resolved_modules_to_save(),
        fan_in_fan_out=conv1d,
        base_model_name_or_path=config.base_model_name_or_path or getattr(model, "name_or_path", None) or None)
    setattr(model, CONFIG_ATTR, {**existing, adapter_name: stored})
    setattr(model, ACTIVE_ATTR, active)
    from .hf_integration import install
    return install(model)  # saves as an adapter, PEFT's methods (see hf_integration)


def _check_shareable(existing: dict[str, LoraConfig], name: str, config: LoraConfig) -> None:
    """Several adapters share the model's biases and head: only LoRA-only adapters can."""
    for other, cfg in [*existing.items(), (name, config)]:
        if cfg.bias != "none" or cfg.resolved_modules_to_save():
            raise ValueError(f"adapter {other!r} trains biases or modules_to_save (bias={cfg.bias!r}, "
                             f"modules_to_save={cfg.resolved_modules_to_save()}): several adapters on one model "
                             "must be LoRA-only (bias='none', no modules_to_save), since they would share those "
                             "tensors")


def _mark_biases(model: nn.Module, bias: str) -> None:
    if bias == "all":
        frozen_originals = {id(p) for m in model.modules() if isinstance(m, TrainableCopy)
                            for p in m.original_module.parameters()}
        for n, p in model.named_parameters():
            if (n == "bias" or n.endswith(".bias")) and id(p) not in frozen_originals:
                p.requires_grad_(True)
    elif bias == "lora_only":
        for _, layer in lora_layers(model):
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)


# ----------------------------------------------------------------------------- reporting

def _rank_excess(model: nn.Module, targets: list[str], r: int) -> list[tuple[str, int]]:
    """(layer, min(in, out)) of the targeted layers whose min(in, out) is below r, smallest first."""
    dims = [(n, min(linear_dims(model.get_submodule(n))[:2])) for n in targets]
    return sorted([(n, d) for n, d in dims if r > d], key=lambda item: item[1])


def rank_excess(model: nn.Module, config: LoraConfig) -> list[tuple[str, int]]:
    """The layers `config` would adapt whose min(in, out) is below its rank r, as (name,
    min(in, out)), smallest first: the rank there adds parameters but no expressiveness.
    `add_lora` warns about them (PEFT allows them); `trilora train` refuses them. Raises
    ValueError for target names that match nothing, listing the model's linear layers."""
    targets, _ = resolve_targets(model, resolve_config(model, config))
    return _rank_excess(model, targets, config.r)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts its real element count."""
    four_bit = {id(m.weight): m.quant_state.numel for m in model.modules() if isinstance(m, Linear4bit)}
    trainable = total = 0
    for p in model.parameters():
        n = four_bit.get(id(p), p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """'trainable params: 12,288 || all params: 1,245,184 || trainable%: 0.9868' (PEFT's line)."""
    trainable, total = trainable_parameters(model)
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"


__all__ = ["ACTIVE_ATTR", "DEFAULT_ADAPTER", "active_adapter", "adapter_configs", "rank_excess", "add_lora",
           "get_lora_config", "lora_backend", "lora_layers", "linear_module_names", "resolve_targets",
           "resolve_config", "set_lora_backend", "trainable_parameters", "trainable_summary", "CONFIG_ATTR"]
