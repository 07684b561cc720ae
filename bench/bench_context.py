"""Benchmark: peak memory of a QLoRA training step against sequence length, on a GPU.

A Llama-3-8B-shaped `LlamaForCausalLM` (random init, bf16, `--layers` decoder layers, pretrained
length 8192), NF4 base + LoRA r=16 on all linear layers, trilora.patch (fused blocks and the
chunked linear + cross-entropy loss); beyond 8192 tokens RoPE is scaled linearly, as
`trilora train --context-length L` does. For each length and each memory mode
  plain                     every activation kept on the GPU
  checkpointing             --gradient-checkpointing (non-reentrant)
  checkpointing+offload     ... plus --offload-activations (saved tensors in pinned host memory)
one forward + backward step (after one warm-up step) records torch's peak allocated GPU memory
(weights included; "oom" when it does not fit) and the bytes saved for backward that stay on the
GPU and that went to the host (`trilora.trainer.context.SavedActivations`). Rows: op
"context_memory", no timings (this is a memory benchmark).

    python bench/bench_context.py [--layers 4] [--lengths 4096 8192 16384 32768]   # GPU
    python bench/bench_context.py --smoke                                           # CPU harness check
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_out, require_cuda, row, write_rows  # noqa: E402

RANK, ALPHA = 16, 32
MODES = ("plain", "checkpointing", "checkpointing+offload")


def model_config(layers: int, smoke: bool, length: int):
    from transformers import LlamaConfig

    from trilora.trainer.context import rope_overrides
    if smoke:
        config = LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                             vocab_size=256, num_hidden_layers=layers, max_position_embeddings=32)
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                             vocab_size=128256, num_hidden_layers=layers, max_position_embeddings=8192,
                             rope_theta=500000.0, tie_word_embeddings=False)
    for key, value in rope_overrides(config, length, None).items():  # {} up to the pretrained length
        setattr(config, key, value)
    return config


def build(config, mode: str, device, smoke: bool):
    from transformers import LlamaForCausalLM

    from trilora.lora import LoraConfig, add_lora
    from trilora.patching import patch
    from trilora.quant import quantize_model
    torch.manual_seed(0)
    backend = "torch" if smoke else "auto"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    quantize_model(model, backend=backend)
    add_lora(model, LoraConfig(r=RANK, alpha=ALPHA, dropout=0.0, target_modules="all-linear"), backend=backend)
    if not smoke:
        patch(model, backend=backend, warn=False)
    if mode != "plain":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def measure(model, ids, offload: bool, smoke: bool) -> dict:
    """One warm-up step, then one measured forward + backward."""
    from trilora.trainer.context import SavedActivations

    def step():
        hooks = SavedActivations(model, offload=offload)
        with hooks:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return hooks

    step()
    if not smoke:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    hooks = step()
    peak = None if smoke else torch.cuda.max_memory_allocated() / 2**30
    return {"peak_mem_gb": peak, "saved_device_gb": hooks.device_bytes / 2**30, "saved_host_gb": hooks.host_bytes / 2**30}


def bench(smoke: bool, layers: int, lengths: list[int], modes=MODES) -> list[dict]:
    require_cuda(smoke)
    device = "cpu" if smoke else "cuda"
    rows = []
    for length in lengths:
        config = model_config(layers, smoke, length)
        ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
        for mode in modes:
            model = None
            try:
                model = build(config, mode, device, smoke)
                found = measure(model, ids, offload=mode.endswith("offload"), smoke=smoke)
            except torch.OutOfMemoryError:
                found = {"peak_mem_gb": "oom", "saved_device_gb": None, "saved_host_gb": None}
            del model
            gc.collect()
            if not smoke:
                torch.cuda.empty_cache()
            print(length, mode, found, flush=True)
            rope = config.rope_parameters.get("rope_type", "default")
            rows.append(row(smoke, op="context_memory", mode=mode, shape=[1, length, layers], dtype="bfloat16",
                            rank=RANK, ours_ms=None, baseline="plain", baseline_ms=None, ratio=None, achieved=None,
                            ceiling_pct=None, seq=length, rope_scaling=rope, **found))
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run, no GPU figures")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 4 on GPU, 2 smoke)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="sequence lengths (default 4096 8192 16384 32768; smoke 16 32 64)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--out", type=Path, help="JSON file to append rows to")
    args = parser.parse_args(argv)
    layers = args.layers or (2 if args.smoke else 4)
    lengths = args.lengths or ([16, 32, 64] if args.smoke else [4096, 8192, 16384, 32768])
    rows = bench(args.smoke, layers, lengths, args.modes)
    write_rows(rows, args.out or default_out(args.smoke))
    return rows


if __name__ == "__main__":
    main()
