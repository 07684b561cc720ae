"""Save and load adapters in PEFT's directory format (safetensors only, never pickle).

    <dir>/adapter_config.json        PEFT's LoraConfig fields (`LoraConfig.to_peft_dict`)
    <dir>/adapter_model.safetensors  metadata {"format": "pt"[, "trilora.base_quantization": JSON]};
                                     keys (prefix base_model.model.):
        <module>.lora_A.weight [r, in], <module>.lora_B.weight [out, r]   (fp32, as trained)
        <module>.lora_magnitude_vector [out]                              (DoRA adapters)
        <module>.base_layer.bias, <other>.bias                            (bias "all"/"lora_only")
        <saved module>.<param>                                            (modules_to_save)

`trilora.labels` (SEQ_CLS / TOKEN_CLS adapters) lists the head's classes in id order, so that
the head can be rebuilt on a fresh base (PEFT keeps them in the base's config instead).
`trilora.base_quantization` records the 4-bit format of the base the adapter was trained on
({"quant_type", "blocksize", "double_quant"}): the adapter learned against those dequantized
weights, so `trilora merge` and `trilora eval` rebuild them by default. PEFT ignores it.
`trilora.base_config` records the config entries the base was changed by before training
(the RoPE scaling and `max_position_embeddings` of `--context-length`): the adapter learned
positions through them, so `eval`, `generate` and `merge` apply them to the base it loads on.

A trilora-adapted model's state-dict keys are PEFT's in-memory keys without the
`base_model.model.` prefix (`<module>.lora_A.<adapter>.weight`); a file key is that key with
the prefix added and the adapter name removed, as in PEFT's files. `load_adapter` checks the whole file
against the model before it changes anything.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..files import open_safetensors
from .config import HEAD_TASK_TYPES, LoraConfig
from .inject import (DEFAULT_ADAPTER, active_adapter, adapter_configs, add_lora, get_lora_config, lora_layers,
                     resolve_config, resolve_targets)
from .layer import TrainableCopy, linear_dims

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
BASE_QUANTIZATION_KEY = "trilora.base_quantization"
LABELS_KEY = "trilora.labels"
BASE_CONFIG_KEY = "trilora.base_config"


def _adapter_tensors(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The live tensors of adapter `adapter_name` (default: the active one) of an adapted
    model, keyed as in the file without the prefix."""
    config = get_lora_config(model, adapter_name)
    if config is None:
        if adapter_configs(model):
            raise ValueError(f"model has no adapter {adapter_name!r}; its adapters: {sorted(adapter_configs(model))}")
        raise ValueError("model has no trilora adapter (call add_lora or load_adapter first)")
    name_of = adapter_name or active_adapter(model)
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        if name_of not in layer.lora_A:
            continue
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = layer.adapter_weights(name_of)
        if name_of in layer.lora_magnitude_vector:  # DoRA: PEFT's key has no ".weight"
            out[f"{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[name_of].weight
        if config.bias == "lora_only" and layer.base_layer.bias is not None:
            out[f"{name}.base_layer.bias"] = layer.base_layer.bias
    copies = [(n, m) for n, m in model.named_modules() if isinstance(m, TrainableCopy)]
    if config.bias == "all":
        inside = tuple(n + "." for n, _ in copies)
        out.update({n: p for n, p in model.named_parameters()
                    if (n == "bias" or n.endswith(".bias")) and not n.startswith(inside)})
    for name, wrapper in copies:
        out.update({f"{name}.{k}": v for k, v in wrapper.trained.state_dict(keep_vars=True).items()})
    return out


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors `save_adapter` writes (CPU copies), keyed as in PEFT's file (with the
    prefix), of adapter `adapter_name` (default: the active one)."""
    # clone: safetensors refuses tensors that share storage (tied weights)
    return {PREFIX + k: v.detach().to("cpu").contiguous().clone()
            for k, v in _adapter_tensors(model, adapter_name).items()}


def base_quantization(model: nn.Module) -> dict | None:
    """{"quant_type", "blocksize", "double_quant"} of the 4-bit bases under `model`'s adapters,
    or None for a 16/32-bit base. Raises ValueError when the 4-bit bases disagree."""
    from ..quant import Linear4bit

    found = {(m.quant_type, m.blocksize, m.double_quant) for _, layer in lora_layers(model)
             if isinstance(m := layer.base_layer, Linear4bit)}
    if len(found) > 1:
        raise ValueError(f"the adapted 4-bit layers use different quantization settings {sorted(found)}")
    if not found:
        return None
    quant_type, blocksize, double_quant = found.pop()
    return {"quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant}


def _adapter_files(path: str | os.PathLike) -> tuple[str, str]:
    """(config file, weights file) of an adapter directory; FileNotFoundError for a missing
    directory / config / weights file, ValueError for a pickle-only adapter."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter directory {path!r} does not exist")
    config_file, weights_file = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path!r} has no {CONFIG_NAME}: not a PEFT adapter directory")
    if not os.path.isfile(weights_file):
        if os.path.isfile(os.path.join(path, PICKLE_NAME)):
            raise ValueError(f"{path!r} holds {PICKLE_NAME}, a pickle file: trilora refuses to unpickle "
                             "(it can run arbitrary code); re-save the adapter as safetensors, e.g. with "
                             "PeftModel.save_pretrained(dir, safe_serialization=True)")
        raise FileNotFoundError(f"{path!r} has no {WEIGHTS_NAME}")
    return config_file, weights_file


def _metadata(path: str | os.PathLike, key: str) -> str | None:
    """One entry of an adapter weights file's safetensors header (trilora's notes beside PEFT's)."""
    with open_safetensors(_adapter_files(path)[1]) as f:
        return (f.metadata() or {}).get(key)


def adapter_base_quantization(path: str | os.PathLike) -> dict | None:
    """The base quantization an adapter directory records (see the module docstring), or None
    (a 16/32-bit base, or an adapter written by PEFT or an older trilora)."""
    text = _metadata(path, BASE_QUANTIZATION_KEY)
    if text is None:
        return None
    try:
        found = json.loads(text)
        quant = {"quant_type": str(found["quant_type"]), "blocksize": int(found["blocksize"]),
                 "double_quant": bool(found["double_quant"])}
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"{path}: {WEIGHTS_NAME} metadata {BASE_QUANTIZATION_KEY} is malformed: {text!r}") from None
    return quant


def adapter_base_config(path: str | os.PathLike) -> dict:
    """The config entries an adapter directory says its base was changed by before training
    (e.g. {"rope_parameters": {...}, "max_position_embeddings": 4096}); {} when none."""
    text = _metadata(path, BASE_CONFIG_KEY)
    if text is None:
        return {}
    try:
        found = json.loads(text)
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise ValueError(f"{path}: {WEIGHTS_NAME} metadata {BASE_CONFIG_KEY} is malformed: {text[:80]!r}")
    return found


def adapter_labels(path: str | os.PathLike) -> list[str] | None:
    """The classes a SEQ_CLS / TOKEN_CLS adapter directory records, in id order, or None."""
    text = _metadata(path, LABELS_KEY)
    if text is None:
        return None
    try:
        labels = json.loads(text)
    except ValueError:
        labels = None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"{path}: {WEIGHTS_NAME} metadata {LABELS_KEY} is malformed: {text[:80]!r}")
    return labels


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> str:
    """Write `model`'s adapter `adapter_name` (default: the active one) to directory `path`
    in PEFT's format; returns the path.

    `peft.PeftModel.from_pretrained(base_model, path)` loads it (same logits as trilora).
    The 4-bit format of the base, if any, goes into the weights file's metadata.
    """
    tensors = adapter_state_dict(model, adapter_name)
    config = get_lora_config(model, adapter_name)
    metadata = {"format": "pt"}
    if (quant := base_quantization(model)) is not None:
        metadata[BASE_QUANTIZATION_KEY] = json.dumps(quant)
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if config.task_type in HEAD_TASK_TYPES and id2label:
        metadata[LABELS_KEY] = json.dumps([id2label[i] for i in sorted(id2label, key=int)])
    if base_config := getattr(model, "trilora_base_config", None):
        metadata[BASE_CONFIG_KEY] = json.dumps(base_config, sort_keys=True)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config.to_peft_dict(), f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata=metadata)
    return path


def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(config, tensors with the prefix stripped) of an adapter directory, on CPU.

    Raises FileNotFoundError for a missing directory / config / weights file, and ValueError
    for a pickle-only adapter (adapter_model.bin), a malformed config or another method.
    """
    config_file, weights_file = _adapter_files(path)
    try:
        with open(config_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    config = LoraConfig.from_peft_dict(data)
    tensors = {}
    with open_safetensors(weights_file) as f:
        for key in f.keys():
            if not key.startswith(PREFIX):
                raise ValueError(f"{weights_file} key {key!r} lacks PEFT's {PREFIX!r} prefix: not a PEFT LoRA "
                                 "adapter for a whole model")
            tensor = f.get_tensor(key)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"{weights_file}: {key} holds NaN/Inf values: refusing to load a broken adapter")
            tensors[key[len(PREFIX):]] = tensor
    return config, tensors


def _plan(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Check every tensor of the adapter against the un-adapted `model`; returns
    {file key: key in the adapted model} for the tensors to copy. Raises ValueError."""
    targets, save = resolve_targets(model, config, strict=False)
    lora: dict[str, dict[str, torch.Tensor]] = {}
    plan: dict[str, str] = {}
    magnitudes: set[str] = set()
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, tensor in tensors.items():
        for part in ("lora_A", "lora_B"):
            if key.endswith(f".{part}.weight"):
                lora.setdefault(key[: -len(f".{part}.weight")], {})[part] = tensor
                plan[key] = key
                break
        else:
            if key.endswith(".lora_magnitude_vector"):
                name = key[: -len(".lora_magnitude_vector")]
                if not config.use_dora:
                    raise ValueError(f"adapter key {key!r} is a DoRA magnitude but the config says use_dora=false")
                if name not in targets:
                    raise ValueError(f"adapter has a DoRA magnitude for {name!r}, which the config does not target")
                n_out = linear_dims(model.get_submodule(name))[1]
                if tuple(tensor.shape) != (n_out,):
                    raise ValueError(f"{name}: DoRA magnitude {list(tensor.shape)}, this model needs [{n_out}]: "
                                     "an adapter for another base model?")
                magnitudes.add(name)
                plan[key] = key
                continue
            owner = next((n for n in save if key.startswith(n + ".")), None)
            if owner is not None:
                rest = key[len(owner) + 1:]
                if rest.startswith(("original_module.", "modules_to_save.")):
                    continue  # PEFT's bias="all" also writes the wrapper's internals: same values
                expected = model.get_submodule(owner).state_dict().get(rest)
                plan[key] = f"{owner}.trained.{rest}"
            elif config.bias != "none" and key.endswith("bias"):
                # a wrapped layer's bias is <layer>.base_layer.bias (PEFT's key, and ours once adapted)
                plain = key[: -len(".base_layer.bias")] + ".bias" if key.endswith(".base_layer.bias") else key
                expected = params.get(plain)
                layer = plain[: -len(".bias")]
                plan[key] = f"{layer}.base_layer.bias" if layer in targets else plain
            else:
                raise ValueError(f"adapter key {key!r} is not a LoRA weight, a bias (bias={config.bias!r}) or "
                                 f"a modules_to_save tensor: an adapter for another model or method?")
            if expected is None or tuple(expected.shape) != tuple(tensor.shape):
                have = "missing" if expected is None else list(expected.shape)
                raise ValueError(f"adapter tensor {key!r} {list(tensor.shape)} does not fit this model ({have}): "
                                 "an adapter for another base model?")
    extra, missing = sorted(set(lora) - set(targets)), sorted(set(targets) - set(lora))
    if extra or missing:
        raise ValueError(f"adapter does not fit this model: weights for modules the model lacks or the config "
                         f"does not target: {extra[:4]}; targeted modules without weights: {missing[:4]}")
    for name, pair in lora.items():
        n_in, n_out, _ = linear_dims(model.get_submodule(name))
        a, b = pair.get("lora_A"), pair.get("lora_B")
        if a is None or b is None:
            raise ValueError(f"adapter has only one of lora_A / lora_B for {name!r}")
        if tuple(a.shape) != (config.r, n_in) or tuple(b.shape) != (n_out, config.r):
            raise ValueError(f"{name}: adapter has lora_A {list(a.shape)}, lora_B {list(b.shape)}; this model needs "
                             f"[{config.r}, {n_in}] and [{n_out}, {config.r}] (r={config.r}): an adapter for "
                             "another base model?")
    for name in save:
        if not any(k.startswith(name + ".") for k in tensors):
            raise ValueError(f"adapter lacks the weights of modules_to_save module {name!r}")
    if config.use_dora and magnitudes != set(targets):
        raise ValueError(f"DoRA adapter lacks the magnitude of {sorted(set(targets) - magnitudes)[:4]}")
    return plan


def load_adapter(model: nn.Module, path: str | os.PathLike, *, backend: str = "auto",
                 is_trainable: bool = False, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Inject the adapter saved at `path` (by trilora or PEFT) into `model`, in place.

    Everything is validated before the model is touched: a config for a LoRA variant trilora
    does not implement, or an adapter for another base (module names or shapes differ), raises
    ValueError and leaves `model` as it was. `is_trainable=False` (PEFT's default) freezes the
    adapter too; True leaves it (and modules_to_save, biases) trainable. On a model that
    already carries adapters it is added as `adapter_name` (a new name), frozen and inactive
    until `set_adapter` (PEFT's `load_adapter`). Returns `model`.
    """
    existing = adapter_configs(model)
    if not existing and any(True for _ in lora_layers(model)):
        raise ValueError("model already has LoRA layers; load the adapter into a fresh base model")
    if adapter_name in existing:
        raise ValueError(f"model already has an adapter named {adapter_name!r}: pass another adapter_name "
                         f"(adapters: {sorted(existing)}), or load_adapter_weights to overwrite its values")
    config, tensors = read_adapter(path)
    config = resolve_config(model, config)
    plan = _plan(model, config, tensors)
    add_lora(model, config, backend=backend, strict=False, adapter_name=adapter_name)
    targets = {**dict(model.named_parameters(remove_duplicate=False)),
               **dict(model.named_buffers(remove_duplicate=False))}
    with torch.no_grad():
        for file_key, model_key in plan.items():
            targets[_live_key(model_key, adapter_name)].copy_(tensors[file_key])
    if not is_trainable:
        frozen = model.parameters() if not existing else (
            p for _, layer in lora_layers(model) if adapter_name in layer.lora_A
            for p in layer.adapter_parameters(adapter_name))
        for p in frozen:
            p.requires_grad_(False)
    return model


def _live_key(key: str, adapter_name: str) -> str:
    """A file key's state-dict key in the adapted model: `x.lora_A.weight` → `x.lora_A.<adapter>.weight`."""
    for part in (".lora_A.weight", ".lora_B.weight"):
        if key.endswith(part):
            return key[: -len(".weight")] + f".{adapter_name}.weight"
    if key.endswith(".lora_magnitude_vector"):
        return f"{key}.{adapter_name}.weight"
    return key


def load_adapter_weights(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
    """Copy the tensors of the adapter at `path` into the adapter `adapter_name` (default: the
    active one) `model` already has (e.g. to resume training from a checkpoint), in place;
    returns `model`.

    The file must hold exactly the tensors `save_adapter(model)` would write, same shapes;
    otherwise ValueError, before anything is copied. The file's config is not applied (r,
    alpha, targets stay as the model has them) but its rank must match.
    """
    config, tensors = read_adapter(path)
    live = _adapter_tensors(model, adapter_name)
    own = get_lora_config(model, adapter_name)
    if (config.r, config.bias, config.use_dora) != (own.r, own.bias, own.use_dora):
        raise ValueError(f"adapter at {os.fspath(path)!r} has r={config.r}, bias={config.bias!r}, "
                         f"use_dora={config.use_dora}; the model's adapter has r={own.r}, bias={own.bias!r}, "
                         f"use_dora={own.use_dora}")
    # PEFT's bias="all" files also carry its modules_to_save wrapper internals: same values, skip
    internals = tuple(f"{n}.{part}." for n, m in model.named_modules() if isinstance(m, TrainableCopy)
                      for part in ("original_module", "modules_to_save"))
    tensors = {k: v for k, v in tensors.items() if not (internals and k.startswith(internals))}
    extra, missing = sorted(set(tensors) - set(live)), sorted(set(live) - set(tensors))
    if extra or missing:
        raise ValueError(f"adapter at {os.fspath(path)!r} does not fit this model's adapter: unexpected "
                         f"{extra[:4]}, missing {missing[:4]}")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(live[key].shape):
            raise ValueError(f"adapter tensor {key!r} is {list(tensor.shape)}, the model's is {list(live[key].shape)}")
    with torch.no_grad():
        for key, tensor in tensors.items():
            live[key].copy_(tensor)
    return model


__all__ = ["save_adapter", "load_adapter", "load_adapter_weights", "read_adapter", "adapter_state_dict"]
