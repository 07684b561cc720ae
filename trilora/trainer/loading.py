"""`load_model`: a local Hugging Face model directory in, optionally 4-bit quantized on the fly.

Peak host memory stays near one tensor above the result: the model skeleton is built on the
`meta` device (no memory), then the safetensors shards are read tensor by tensor, and each
linear weight is quantized the moment it is read — a 16-bit copy of the whole model never
exists. Pre-quantized bitsandbytes 4-bit checkpoints (`quantization_config` in config.json)
load as they are. Only safetensors are read (never pickle); no network; no remote code
unless asked.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import init_empty_weights

from ..files import open_safetensors
from ..gguf_io import is_gguf, load_gguf, load_gguf_tokenizer
from ..module_tree import name_matches, replace_module
from ..quant import Linear4bit

def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise FileNotFoundError(f"{path}: shards listed in the index are missing: {missing}")
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = (f" (found {pickles}: pickle checkpoints are not loaded because they can run code; "
            "convert them to safetensors)") if pickles else ""
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


def check_model_dir(path: str | Path) -> list[Path]:
    """The safetensors shards of model directory `path`; FileNotFoundError / ValueError naming
    what is missing (the directory, config.json, the weights) before anything is loaded.
    A `.gguf` file only has to exist (it has no shards)."""
    path = Path(path)
    if is_gguf(path):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return []
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model directory: no config.json")
    return _shards(path)


def _quant_settings(config, quantize, double_quant, skip):
    """(quant_type or None, double_quant, skip, prequantized) from the arguments and config.json."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return quantize, double_quant, tuple(skip), False
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise ValueError(f"unsupported quantization_config {qc.get('quant_method')!r} "
                         "(trilora reads bitsandbytes 4-bit checkpoints)")
    skip = tuple(qc.get("llm_int8_skip_modules") or ("lm_head",))
    return qc.get("bnb_4bit_quant_type", "nf4"), qc.get("bnb_4bit_use_double_quant", False), skip, True


def _finite(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """`tensor`, unless it is floating point and holds NaN/Inf (ValueError naming it)."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{where} holds NaN/Inf values: refusing to load a broken checkpoint")
    return tensor


def _expect_tensor_shape(model: nn.Module, key: str, value: torch.Tensor, where: str) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    old = module._parameters.get(leaf, module._buffers.get(leaf))
    if old is not None and tuple(old.shape) != tuple(value.shape):
        raise ValueError(f"{where}: tensor {key!r} has shape {list(value.shape)} but the model built from "
                         f"config.json expects {list(old.shape)}: do the checkpoint and its config.json match?")


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    old = module._parameters.get(leaf, module._buffers.get(leaf))
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise KeyError(key)


def _expect_shape(linear: nn.Module, weight: torch.Tensor, where: str) -> None:
    want = (linear.out_features, linear.in_features)
    if tuple(weight.shape) != want:
        raise ValueError(f"{where} has shape {list(weight.shape)} but the model built from config.json expects "
                         f"{list(want)}: do the checkpoint and its config.json match?")


def load_tokenizer(path: str | Path, pre_split_words: bool = False):
    """The tokenizer of a model directory or `.gguf` file; ValueError naming the path.

    pre_split_words: the input comes as words (entity tagging); a byte-level BPE (GPT-2,
    RoBERTa, Llama 3, Qwen2) then needs add_prefix_space=True to give each word its leading
    space, as it has in running text."""
    from transformers import AutoTokenizer

    if is_gguf(path):
        return load_gguf_tokenizer(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if pre_split_words and _byte_level(tokenizer):
            _add_prefix_space(tokenizer)
        return tokenizer
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot load its tokenizer: {err}") from None


def _byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and '"ByteLevel"' in backend.to_str()


def _add_prefix_space(tokenizer) -> None:
    """Switch on add_prefix_space in the byte-level pre-tokenizer(s) of a fast tokenizer, in
    place (from_pretrained's add_prefix_space=True reaches only the tokenizer classes that
    rebuild their pre-tokenizer, not a tokenizer.json's own)."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())

    def visit(part):
        if isinstance(part, dict):
            if part.get("type") == "ByteLevel" and "add_prefix_space" in part:
                part["add_prefix_space"] = True
            for value in part.values():
                visit(value)
        elif isinstance(part, list):
            for value in part:
                visit(value)
    visit(spec.get("pre_tokenizer"))
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
    if hasattr(tokenizer, "add_prefix_space"):
        tokenizer.add_prefix_space = True


# Output heads and the pooler stay in 16/32 bits under QLoRA: small, and a new head trains in full.
DEFAULT_SKIP = ("lm_head", r"(?:.*\.)?(?:classifier|score|pooler)(?:\..*)?")


def load_model(path: str | Path, quantize: str | None = "nf4", dtype: torch.dtype | None = None,
               double_quant: bool = True, blocksize: int = 64, skip=DEFAULT_SKIP,
               device: str | torch.device | None = None, trust_remote_code: bool = False,
               model_class=None, backend: str = "auto", head: dict | None = None,
               seed: int = 0, config_overrides: dict | None = None) -> nn.Module:
    """Load a local HF model directory (config.json + safetensors shards) or a `.gguf` file
    (through transformers' GGUF reader, dequantized to `dtype`, then quantized like any other
    checkpoint if `quantize` says so).

    Args:
        quantize: "nf4", "fp4" or None (keep 16/32-bit). A pre-quantized bitsandbytes 4-bit
            checkpoint loads in its own format whatever this says.
        dtype: dtype of the non-quantized weights; default bf16 on CUDA, fp32 on CPU.
        skip: linear modules left unquantized (full names, last components or regexes).
        device: where the weights go; default CUDA when available.
        trust_remote_code: passed to transformers; off by default.
        model_class: default `AutoModelForCausalLM`; e.g. `AutoModelForSequenceClassification`.
        backend: kernels that quantize on the fly: "auto", "triton" or "torch".
        head: config entries of a task head (num_labels, id2label, label2id, pad_token_id),
            set on config.json's before the model is built.
        seed: seeds the initialisation of weights the checkpoint lacks (see below).
        config_overrides: other config entries set before the model is built (the RoPE
            scaling of `--context-length`, `trainer.context.rope_overrides`); the model keeps
            them in its config and in `model.trilora_base_config` (what `save_adapter` records).
    With a `model_class` other than a causal LM, the checkpoint may be a bare encoder (keys
    without the `bert.` prefix, as sentence-transformers saves them) and may lack the head and
    the pooler: those are initialised as transformers does, seeded, and listed in
    `model.newly_initialised`. Any other missing weight is an error.
    Returns the model in eval mode, with `trilora.quant.Linear4bit` layers where quantized.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    check_model_dir(path)
    if quantize not in (None, "nf4", "fp4"):
        raise ValueError(f"quantize must be 'nf4', 'fp4' or None, got {quantize!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if is_gguf(path):
        if model_class not in (None, AutoModelForCausalLM):
            raise ValueError(f"{path}: a GGUF file holds a causal LM; task heads need an HF model directory")
        if config_overrides:
            raise ValueError(f"{path}: a GGUF file's config cannot be changed (--context-length / RoPE scaling "
                             "need an HF model directory)")
        return _load_gguf_model(path, quantize, dtype, double_quant, blocksize, skip, device, backend)
    model, plan = model_skeleton(path, quantize, dtype, double_quant, blocksize, skip, trust_remote_code,
                                 model_class, head, config_overrides)
    for kind, key, value in read_checkpoint(plan, model, device, backend):
        if kind == "layer":
            replace_module(model, key, value)
        else:
            _set_tensor(model, key, value)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    new = [n for n in missing if plan.with_head and (not n.startswith(plan.prefix + ".") or ".pooler." in n)]
    missing = [n for n in missing if n not in new]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} weights, e.g. {missing[:5]}")
    _initialise(model, new, device, dtype, seed)
    model.newly_initialised = new
    return model.eval()


@dataclass
class CheckpointPlan:
    """What `model_skeleton` learned about a checkpoint: where its tensors are and which
    linear layers become 4-bit (`targets`, by module name), in what format."""
    path: Path
    shards: list[Path]
    dtype: torch.dtype
    quant_type: str | None
    double_quant: bool
    blocksize: int
    targets: set[str]
    prequantized: bool
    with_head: bool
    prefix: str
    names: set[str]  # the skeleton's parameter and buffer names


def model_skeleton(path: str | Path, quantize: str | None = "nf4", dtype: torch.dtype = torch.float32,
                   double_quant: bool = True, blocksize: int = 64, skip=DEFAULT_SKIP,
                   trust_remote_code: bool = False, model_class=None, head: dict | None = None,
                   config_overrides: dict | None = None):
    """(model, plan): the model of an HF model directory built on the `meta` device (no
    memory; buffers such as rotary tables are real), and the `CheckpointPlan` that
    `read_checkpoint` follows to fill it. The layers to quantize are still `nn.Linear`.
    `head` and `config_overrides` entries are set on the config before the model is built."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    shards = check_model_dir(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    for key, value in {**(head or {}), **(config_overrides or {})}.items():
        setattr(config, key, value)
    if config_overrides and hasattr(config, "validate_rope"):
        config.validate_rope()
    quant_type, double_quant, skip, prequantized = _quant_settings(config, quantize, double_quant, skip)
    if prequantized:
        del config.quantization_config  # the 4-bit layers are ours to build
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers real
        model = (model_class or AutoModelForCausalLM).from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # from_config leaves a meta skeleton untied
    model.trilora_base_config = dict(config_overrides or {})  # what an adapter trained on it records
    targets = {name for name, m in model.named_modules()
               if quant_type and type(m) is nn.Linear and not name_matches(name, skip)}
    names = ({n for n, _ in model.named_parameters(remove_duplicate=False)}
             | {n for n, _ in model.named_buffers()})
    with_head = model_class not in (None, AutoModelForCausalLM)
    prefix = getattr(model, "base_model_prefix", "") if with_head else ""
    return model, CheckpointPlan(path, shards, dtype, quant_type, double_quant, blocksize, targets, prequantized,
                                 with_head, prefix, names)


def read_checkpoint(plan: CheckpointPlan, model: nn.Module, device: torch.device, backend: str = "auto"):
    """Read the checkpoint tensor by tensor, yielding ("layer", module name, Linear4bit) for
    each 4-bit layer (quantized the moment its weight is read, or gathered from its
    pre-quantized entries) and ("tensor", key, tensor) for every other tensor of the model,
    on `device`, floating point ones in `plan.dtype`. At most one dense linear weight exists
    at a time. `model` (the skeleton) gives each layer's expected shape and bias. Warns about
    checkpoint tensors that match nothing; ValueError for NaN/Inf, wrong shapes, incomplete
    4-bit entries."""
    dtype, pending, unused = plan.dtype, {}, []  # pending: pre-quantized layers being gathered
    for shard in plan.shards:
        with open_safetensors(shard) as f:
            for stored in f.keys():
                key = _with_prefix(stored, plan.prefix, plan.names)
                owner = _owner(key)
                where = f"{shard.name}: {key}"
                if owner in plan.targets and plan.prequantized:
                    entries = pending.setdefault(owner, {})
                    entries[key[len(owner) + 1:]] = _finite(f.get_tensor(stored), where).to(device)
                elif owner in plan.targets and key == owner + ".weight":  # quantize as it is read
                    weight = _finite(f.get_tensor(stored), where).to(device, dtype)
                    linear = model.get_submodule(owner)
                    _expect_shape(linear, weight, where)
                    yield "layer", owner, Linear4bit.from_dense(weight, getattr(linear, "bias", None), plan.quant_type,
                                                               plan.blocksize, plan.double_quant, backend=backend)
                    del weight  # the dense copy dies here: one linear weight at a time
                elif key in plan.names:
                    tensor = _finite(f.get_tensor(stored), where).to(device)
                    _expect_tensor_shape(model, key, tensor, where)
                    yield "tensor", key, tensor.to(dtype) if tensor.is_floating_point() else tensor
                else:
                    unused.append(key)
        yield from _complete_layers(plan, pending, device, backend, dtype)
    if pending:
        raise ValueError(f"{plan.path}: incomplete 4-bit entries for {sorted(pending)[:5]}")
    if unused:
        warnings.warn(f"{plan.path}: {len(unused)} checkpoint tensors match no parameter, e.g. {unused[:3]}")


def _complete_layers(plan: CheckpointPlan, pending: dict, device, backend, dtype):
    """Yield ("layer", name, Linear4bit) for every pre-quantized layer whose entries are all read."""
    for owner in [o for o, entries in pending.items() if _complete(entries)]:
        entries = pending.pop(owner)
        if "bias" in entries:
            entries["bias"] = entries["bias"].to(dtype)
        layer = Linear4bit.from_state_dict(entries, backend=backend)
        offset = layer.quant_state.offset
        if offset is not None and not torch.isfinite(torch.as_tensor(offset)).all():
            raise ValueError(f"{plan.path}: {owner}: the 4-bit quant state's nested_offset is {float(offset)}: "
                             "refusing to load a broken checkpoint")
        yield "layer", owner, layer


def _with_prefix(key: str, prefix: str, names: set[str]) -> str:
    """A bare encoder's `embeddings.x` is the task model's `bert.embeddings.x` (also for the
    4-bit entries `….weight.absmax` of a layer whose weight is `bert.….weight`)."""
    if not prefix or key in names:
        return key
    candidate = f"{prefix}.{key}"
    return candidate if candidate in names or _owner(candidate) + ".weight" in names else key


def _initialise(model: nn.Module, names: list[str], device, dtype, seed: int) -> None:
    """Give the modules owning `names` (still on meta) real, seeded weights, initialised by the
    model's own `_init_weights` (as `from_pretrained` does for a new head)."""
    owners = sorted({n.rpartition(".")[0] for n in names})
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for owner in owners:
            module = model.get_submodule(owner)
            module.to_empty(device=device, recurse=False)
            module.to(dtype)
            model._init_weights(module)
    finally:
        torch.random.set_rng_state(generator_state)


def _load_gguf_model(path, quantize, dtype, double_quant, blocksize, skip, device, backend) -> nn.Module:
    """A GGUF model: the whole file dequantized once (transformers' reader), checked, then
    quantized layer by layer where asked."""
    from ..quant import quantize_model

    model = load_gguf(path, dtype)
    for name, tensor in model.state_dict().items():
        _finite(tensor, f"{path.name}: {name}")
    model.to(device)
    if quantize:
        quantize_model(model, quantize, blocksize, double_quant, skip=tuple(skip), backend=backend)
    return model.eval()


def _owner(key: str) -> str:
    """The module a checkpoint key belongs to: `a.b.weight.absmax` and `a.b.bias` -> `a.b`."""
    if ".weight." in key:
        return key.split(".weight.", 1)[0]
    return key.rsplit(".", 1)[0]


def _complete(entries: dict[str, torch.Tensor]) -> bool:
    """Whether a pre-quantized layer's entries are all read (bias included when it has one)."""
    blob = next((v for k, v in entries.items() if k.startswith("weight.quant_state.bitsandbytes__")), None)
    if blob is None or not {"weight", "weight.absmax", "weight.quant_map"} <= set(entries):
        return False
    nested = b"nested_offset" in bytes(blob.tolist())
    return not nested or {"weight.nested_absmax", "weight.nested_quant_map"} <= set(entries)
