"""GGUF in and out: the file format llama.cpp, Ollama and LM Studio serve.

In:  `load_gguf(path)` reads a `.gguf` through transformers' GGUF loader (weights dequantized
     to the requested dtype, config and tokenizer rebuilt from the file's metadata), and
     rebuilds the model from its config so that it behaves like any other HF model
     (transformers marks a GGUF-loaded model and refuses to `save_pretrained` it).
Out: `write_gguf(model, tokenizer, path, gguf_type)` writes an HF causal LM with its tokenizer
     as one GGUF file with the `gguf` package's writer: llama.cpp's tensor names
     (`gguf.get_tensor_name_map`), its metadata keys, and the two layout changes its Llama
     and Gemma runtimes expect (q/k rows of each head interleaved for Llama-style RoPE;
     Gemma's RMSNorm weights stored as 1 + w).

Architectures: Llama, Mistral, Qwen2 and Gemma 2/3 (`ARCHITECTURES`). Tokenizers: byte-level
BPE (GPT-2, Llama 3, Qwen2) and sentencepiece-style BPE (Llama 2, Mistral, Gemma). Anything
else is refused by name rather than written into a file that would misbehave when served.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

GGUF_TYPES = ("f16", "bf16", "q8_0", "f32")


@dataclass(frozen=True)
class _Arch:
    gguf_name: str             # general.architecture
    permute_qk: bool = False   # llama.cpp's Llama graph wants each head's q/k rows interleaved
    norm_offset: float = 0.0   # Gemma: RMSNorm scales by (1 + w); llama.cpp stores 1 + w
    key_length: bool = False   # write attention.key_length / value_length (head_dim)
    sliding_window: bool = False


ARCHITECTURES = {
    "llama": _Arch("llama", permute_qk=True),
    # llama.cpp runs Mistral as "llama" (same graph; a sliding window, where a config sets
    # one, is not part of that graph): it reads back as a LlamaForCausalLM
    "mistral": _Arch("llama", permute_qk=True),
    "qwen2": _Arch("qwen2"),
    "gemma2": _Arch("gemma2", norm_offset=1.0, key_length=True, sliding_window=True),
    "gemma3": _Arch("gemma3", norm_offset=1.0, key_length=True, sliding_window=True),
    "gemma3_text": _Arch("gemma3", norm_offset=1.0, key_length=True, sliding_window=True),
}


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF support needs the `gguf` package: pip install gguf") from None
    return gguf


# ----------------------------------------------------------------------------- reading

def is_gguf(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(".gguf")


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of a `.gguf` file, its weights dequantized to `dtype`, in eval mode.

    The model is a fresh `AutoModelForCausalLM.from_config` with the file's weights moved
    into it, so saving, merging and adapters work as for a model read from safetensors.
    """
    _require_gguf()
    from transformers import AutoModelForCausalLM

    path = _existing(path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, KeyError, OSError, NotImplementedError) as err:
        raise ValueError(f"{path}: transformers cannot read this GGUF file: {err}") from None
    config = loaded.config
    # the GGUF origin rides on the config (and makes save_pretrained refuse): rebuild clean
    for attr in ("gguf_file", "_gguf_file"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{path}: the GGUF file lacks {len(missing)} weights, e.g. {missing[:3]}")
    for name, buffer in list(model.named_buffers()):  # rotary tables are computed, not stored
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            module.register_buffer(attr, loaded.get_buffer(name).clone(),
                                   persistent=attr not in module._non_persistent_buffers_set)
    return model.eval()


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer a `.gguf` file describes (vocabulary, merges, special tokens, chat template)."""
    _require_gguf()
    from transformers import AutoTokenizer

    path = _existing(path)
    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(f"{path}: transformers cannot build the tokenizer of this GGUF file: {err}") from None


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path


# ----------------------------------------------------------------------------- writing

def write_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, gguf_type: str = "f16") -> str:
    """Write `model` (an HF causal LM of `ARCHITECTURES`, adapters merged) and `tokenizer`
    (a fast tokenizer) to the GGUF file `path`; returns the path.

    gguf_type: "f16", "bf16", "q8_0" (2-D weights; norms and biases stay f32) or "f32".
    Raises ValueError naming what cannot be written (architecture, tokenizer kind, settings
    such as rope scaling that the metadata would drop).
    """
    gguf = _require_gguf()
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type must be one of {GGUF_TYPES}, got {gguf_type!r}")
    config = model.config
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ValueError(f"cannot write a {config.model_type!r} model as GGUF; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    writer = gguf.GGUFWriter(os.fspath(path), arch.gguf_name)
    _write_config(writer, gguf, config, arch)
    _write_tokenizer(writer, gguf, tokenizer, config)
    _write_tensors(writer, gguf, model, config, arch, gguf_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _write_config(writer, gguf, config, arch: _Arch) -> None:
    writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    # Gemma 3 keeps one set per attention type: global layers' base, and the sliding ones'
    full, local = rope.get("full_attention", rope), rope.get("sliding_attention")
    theta = full.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if local is not None and local.get("rope_theta") is not None:
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    for params in filter(None, (full, local)):
        if params.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"rope scaling {params.get('rope_type')!r} is not written to GGUF by trilora yet; "
                             "the served model would use plain RoPE")
    if arch.key_length:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch.sliding_window and getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


# ----------------------------------------------------------------------------- tensors

def _write_tensors(writer, gguf, model, config, arch: _Arch, gguf_type: str) -> None:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_name.upper()], config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    written = 0
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r} of a {config.model_type} model")
        data = tensor.detach().to("cpu", torch.float32)
        if arch.permute_qk and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
            data = _interleave_rope_rows(data, heads, head_dim)
        if arch.norm_offset and name.endswith("norm.weight"):
            data = data + arch.norm_offset
        if not torch.isfinite(data).all():
            raise ValueError(f"tensor {hf_name} holds NaN/Inf values: refusing to write a broken model")
        _add_tensor(writer, gguf, name, data, gguf_type if data.dim() >= 2 else "f32")
        written += 1
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[gguf_type]))
    if not written:
        raise ValueError("the model has no tensors to write")


def _interleave_rope_rows(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """HF keeps each head's rotary pairs as (first half, second half); llama.cpp's Llama graph
    rotates adjacent pairs. Reorder the rows of each head from [x0..x(d/2-1), y0..] to
    [x0, y0, x1, y1, ...] (transformers' GGUF reader undoes exactly this)."""
    rest = w.shape[1:]
    return w.reshape(heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


def _add_tensor(writer, gguf, name: str, data: torch.Tensor, kind: str) -> None:
    quant = gguf.GGMLQuantizationType
    if kind == "q8_0" and data.shape[-1] % 32:
        kind = "f16"  # Q8_0 blocks are 32 values along a row
    if kind == "f32":
        writer.add_tensor(name, data.numpy())
    elif kind == "f16":
        writer.add_tensor(name, data.to(torch.float16).numpy())
    elif kind == "bf16":
        raw = data.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=quant.BF16)
    else:
        raw = gguf.quants.quantize(data.numpy(), quant.Q8_0)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=quant.Q8_0)


# ----------------------------------------------------------------------------- tokenizer

def _write_tokenizer(writer, gguf, tokenizer, config) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("writing GGUF needs a fast tokenizer (tokenizer.json)")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    kind = _tokenizer_kind(spec)
    vocab = dict(model.get("vocab", {}))
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for token_id, token in added.items():
        vocab.setdefault(token["content"], token_id)
    size = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, token_id in vocab.items():
        tokens[token_id] = token
        types[token_id] = gguf.TokenType.NORMAL
    for token_id, token in added.items():
        types[token_id] = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED
    if model.get("unk_token") in vocab:
        types[vocab[model["unk_token"]]] = gguf.TokenType.UNKNOWN
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec))
    else:
        for token_id, token in enumerate(tokens):
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types[token_id] = gguf.TokenType.BYTE
        # sentencepiece ranks merges by score: a token made by an earlier merge scores higher
        rank = {"".join(m.split(" ")): -float(i) for i, m in enumerate(merges)}
        writer.add_token_scores([rank.get(t, 0.0) for t in tokens])
        writer.add_add_space_prefix(_adds_space_prefix(spec))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    if merges:
        writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, attr, None)
        if token_id is not None:
            add(token_id)
    if tokenizer.bos_token_id is not None:
        ids = tokenizer("a")["input_ids"]
        writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def _components(part: dict | None) -> list[dict]:
    if not part:
        return []
    return [c for sub in part.get("pretokenizers", part.get("normalizers", part.get("decoders", [])))
            for c in _components(sub)] if part.get("type") == "Sequence" else [part]


def _tokenizer_kind(spec: dict) -> str:
    """"gpt2" (byte-level BPE) or "llama" (sentencepiece-style BPE), else a ValueError."""
    model = spec.get("model", {})
    parts = (_components(spec.get("pre_tokenizer")) + _components(spec.get("decoder"))
             + _components(spec.get("normalizer")))
    types = {p.get("type") for p in parts}
    if model.get("type") == "BPE" and "ByteLevel" in types:
        return "gpt2"
    if model.get("type") == "BPE" and (model.get("byte_fallback") or "Metaspace" in types
                                       or any("\u2581" in json.dumps(p) for p in parts)):
        return "llama"
    raise ValueError(f"cannot write a {model.get('type')} tokenizer (components {sorted(filter(None, types))}) "
                     "to GGUF: byte-level BPE and sentencepiece-style BPE are supported")


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the split regex of a byte-level tokenizer (tokenizer.ggml.pre)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    splits = [p for p in _components(spec.get("pre_tokenizer")) if p.get("type") == "Split"]
    if not splits:
        return "gpt-2"  # ByteLevel's own regex is GPT-2's
    pattern = splits[0].get("pattern", {}).get("Regex")
    for name in ("llama-bpe", "qwen2", "gpt-4o", "tekken"):
        if GGUF_PRE_TOKENIZER_SPLITS.get(name) == pattern:
            return name
    warnings.warn("the tokenizer's split regex is not one llama.cpp names; written as 'default', "
                  "so llama.cpp may split text differently from transformers", RuntimeWarning, stacklevel=3)
    return "default"


def _adds_space_prefix(spec: dict) -> bool:
    for part in _components(spec.get("pre_tokenizer")) + _components(spec.get("normalizer")):
        if part.get("type") == "Metaspace":
            return part.get("prepend_scheme", "always") != "never"
        if part.get("type") == "Prepend":
            return True
    return False


__all__ = ["ARCHITECTURES", "GGUF_TYPES", "is_gguf", "load_gguf", "load_gguf_tokenizer", "write_gguf"]
