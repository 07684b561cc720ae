"""Several named adapters on one model: switch, delete, combine (PEFT's multi-adapter API).

`add_lora(model, config, adapter_name="b")` / `load_adapter(model, path, adapter_name="b")`
add an adapter beside the first ("default"); it starts frozen and inactive. The layers run
one adapter at a time, the active one:

    set_adapter(model, "b")            # "b" runs and trains, every other adapter is frozen
    add_weighted_adapter(model, ["a", "b"], [0.7, 0.3], "mix", combination_type="cat")
    delete_adapter(model, "a")

`add_weighted_adapter` computes exactly what PEFT's does for "linear", "cat" and "svd" (the
same new rank, alpha = rank, and A/B values), so the result saves to the same file.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .inject import ACTIVE_ATTR, CONFIG_ATTR, active_adapter, adapter_configs, lora_backend, lora_layers

COMBINATIONS = ("linear", "cat", "svd")


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters `model` carries, in the order they were added."""
    return list(adapter_configs(model))


def _known(model: nn.Module, name: str) -> None:
    if name not in adapter_configs(model):
        raise ValueError(f"model has no adapter {name!r}; its adapters: {adapter_names(model)}")


def set_adapter(model: nn.Module, adapter_name: str, trainable: bool = True) -> nn.Module:
    """Make `adapter_name` the adapter every layer runs; its weights train (unless
    `trainable=False`), every other adapter's are frozen, as PEFT's `set_adapter`. Layers the
    adapter does not target run their base alone. Returns `model`."""
    if not isinstance(adapter_name, str):
        names = list(adapter_name)
        if len(names) != 1:
            raise ValueError(f"trilora layers run one adapter at a time, got {names}: combine them into one "
                             "with add_weighted_adapter(model, names, weights, new_name, combination_type='cat')")
        adapter_name = names[0]
    _known(model, adapter_name)
    for _, layer in lora_layers(model):
        layer.set_active(adapter_name, trainable)
    setattr(model, ACTIVE_ATTR, adapter_name)
    _sync_hf_attrs(model)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove adapter `adapter_name` (not the active one; `merge_lora` removes the last).
    A layer left without adapters stays wrapped and runs its base alone, as PEFT's does (so
    the state-dict keys stay PEFT's). Returns `model`."""
    _known(model, adapter_name)
    if adapter_name == active_adapter(model):
        raise ValueError(f"{adapter_name!r} is the active adapter: set_adapter(model, other) first "
                         f"(adapters: {adapter_names(model)})")
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
    configs = dict(adapter_configs(model))
    del configs[adapter_name]
    setattr(model, CONFIG_ATTR, configs)
    _sync_hf_attrs(model)
    return model


def _sync_hf_attrs(model: nn.Module) -> None:
    """The PEFT-shaped attributes hf_integration gives the model follow the active adapter."""
    if "active_adapters" in model.__dict__:
        model.active_adapters = [active_adapter(model)]
        model.active_adapter = active_adapter(model)


# ----------------------------------------------------------------------------- combination

@torch.no_grad()
def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> nn.Module:
    """Add adapter `adapter_name` combining `adapters` with `weights` (PEFT's method and its
    results, for the combination types that work on LoRA factors):

    - "linear": A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ| Aᵢ, B = Σ √|wᵢsᵢ| Bᵢ (sᵢ the scaling); same rank
      needed; an approximation (cross terms), cheap.
    - "cat": A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁ B₂ …]: exactly Σ wᵢ ΔWᵢ, rank Σ rᵢ.
    - "svd": the best rank-`svd_rank` (default max rᵢ) approximation of Σ wᵢ ΔWᵢ.

    The new adapter has alpha = its rank (scaling 1), targets the union of the layers, and
    starts frozen and inactive (`set_adapter` picks it). Returns `model`.
    """
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ValueError(f"model already has an adapter named {adapter_name!r}")
    for name in adapters:
        _known(model, name)
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"need one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    dora = [a for a in adapters if configs[a].use_dora]
    if dora:
        raise ValueError(f"adapters {dora} are DoRA adapters: a weighted combination of their low-rank factors "
                         "ignores the magnitudes, so it is not offered; merge them one by one instead")
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r} "
                         "(PEFT's ties / dare / magnitude_prune variants are not implemented)")
    combination_type = "linear" if len(adapters) == 1 else combination_type  # as PEFT
    ranks = [configs[a].r for a in adapters]
    if combination_type == "linear" and len(set(ranks)) != 1:
        raise ValueError(f"combination_type 'linear' needs adapters of one rank, got ranks {ranks}: use 'cat' or 'svd'")
    new_rank = {"linear": ranks[0], "cat": sum(ranks), "svd": svd_rank or max(ranks)}[combination_type]
    kinds = {type(configs[a].target_modules) for a in adapters}
    if len(kinds) != 1:
        raise ValueError("cannot combine adapters whose target_modules mix a regex string and a list")
    targets = configs[adapters[0]].target_modules
    if isinstance(targets, str):
        targets = "|".join(f"({configs[a].target_modules})" for a in adapters)
    else:
        targets = sorted(set().union(*(configs[a].target_modules for a in adapters)))

    # PEFT copies adapters[0]'s use_rslora, which would scale the result by √rank: off here
    new_config = configs[adapters[0]].copy(r=new_rank, alpha=new_rank, use_rslora=False, target_modules=targets)
    combined = {}
    for name, layer in lora_layers(model):
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
        if present:
            combined[name] = _combine(layer, present, combination_type, new_rank)
    from .inject import add_lora
    backend = lora_backend(model)
    add_lora(model, new_config, backend=backend, strict=False, adapter_name=adapter_name)
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            A, B = layer.adapter_weights(adapter_name)
            new_A, new_B = combined[name]
            A.copy_(new_A)
            B.copy_(new_B)
    return model


def _combine(layer, present: list[tuple[str, float]], kind: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the combined adapter on one layer, in the adapters' dtype."""
    dtype = layer.adapter_weights(present[0][0])[0].dtype
    if kind == "cat":
        As = [layer.adapter_weights(a)[0] * (w * layer.settings[a].scaling) for a, w in present]
        Bs = [layer.adapter_weights(a)[1] for a, _ in present]
        A, B = torch.cat(As, 0), torch.cat(Bs, 1)
        # a layer only some adapters target gets zero rows/columns up to the full rank
        A = torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])], 0)
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], 1)
        return A.to(dtype), B.to(dtype)
    if kind == "linear":
        A = B = 0
        for a, w in present:
            ws = w * layer.settings[a].scaling
            root = math.sqrt(abs(ws))
            A = A + math.copysign(root, ws) * layer.adapter_weights(a)[0]
            B = B + root * layer.adapter_weights(a)[1]
        return A.to(dtype), B.to(dtype)
    delta = sum(w * layer.delta_weight(a) for a, w in present)          # [out, in] fp32
    U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
    k = min(rank, S.numel())                    # a rank above min(out, in) keeps zero components
    A, B = delta.new_zeros(rank, delta.shape[1]), delta.new_zeros(delta.shape[0], rank)
    A[:k], B[:, :k] = Vh[:k], U[:, :k] * S[:k]
    return A.to(dtype), B.to(dtype)


__all__ = ["COMBINATIONS", "add_weighted_adapter", "adapter_names", "delete_adapter", "set_adapter"]
