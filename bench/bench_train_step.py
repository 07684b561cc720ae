"""Benchmark: end-to-end QLoRA training steps, trilora vs PEFT + bitsandbytes, on a GPU.

A Llama-3-8B-shaped `LlamaForCausalLM` (random init, bf16; `--layers` decoder layers, the
same for every contender), sequence 2048, gradient checkpointing, LoRA r=16 on all linear
layers, AdamW. Contenders, built one after another on the same GPU:
  trilora_qlora      NF4 base (trilora.quant) + trilora's fused LoRA layers (+ trilora.patch)
  peft_bnb           HF's standard QLoRA: bitsandbytes Linear4bit + PEFT LoRA
  trilora_lora_bf16  trilora's fused LoRA layers over the bf16 base
Rows: op "train_step", baseline "peft_bnb"; tokens_per_s, peak_mem_gb (torch's peak
allocated memory during the steps, weights included), baseline_peak_mem_gb, and
mfu = 6·N·tokens/s / the bf16 dense GEMM rate measured in the same run (N = the dense
model's parameter count).

    python bench/bench_train_step.py [--layers 8] [--out bench/results/X.json]   # GPU
    python bench/bench_train_step.py --smoke                                    # CPU harness check
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_out, ratio, require_cuda, row, write_rows  # noqa: E402

RANK, ALPHA = 16, 32
CONTENDERS = ("trilora_qlora", "peft_bnb", "trilora_lora_bf16")


def model_config(layers: int, smoke: bool):
    from transformers import LlamaConfig
    if smoke:
        return LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                           vocab_size=256, num_hidden_layers=layers, max_position_embeddings=64)
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256, num_hidden_layers=layers, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False)


def _bnb_quantize(model: nn.Module, device) -> None:
    import bitsandbytes as bnb
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and not name.endswith("lm_head"):
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
            layer.weight = bnb.nn.Params4bit(module.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
            layer = layer.to(device)  # quantizes
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)


def build(contender: str, config, device, smoke: bool):
    """The model of `contender`, ready to train; returns (model, notes)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    backend = "torch" if smoke else "auto"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    notes = {}
    if contender == "peft_bnb":
        import peft
        _bnb_quantize(model, device)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                           target_modules="all-linear"))
    else:
        from trilora.lora import LoraConfig, add_lora
        from trilora.quant import quantize_model
        if contender == "trilora_qlora":
            quantize_model(model, backend="torch" if smoke else "auto")
        add_lora(model, LoraConfig(r=RANK, alpha=ALPHA, target_modules="all-linear"), backend=backend)
        try:
            from trilora.patching import patch
        except ImportError:
            notes["patched"] = False
        else:
            report = patch(model, backend=backend)
            notes["patched"] = True
            notes["patch_report"] = str(report)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model, notes


def time_steps(model, batch, steps: int, warmup: int, smoke: bool):
    """(ms per step, peak GB) of forward + backward + AdamW steps; (None, None) in smoke mode."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if smoke:
        step()
        return None, None
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1000 / steps
    return ms, torch.cuda.max_memory_allocated() / 2**30


def gemm_tflops(smoke: bool) -> float | None:
    if smoke:
        return None
    from triton.testing import do_bench
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / do_bench(lambda: a @ b, return_mode="median") / 1e9


def bench(smoke: bool, layers: int, seq: int, batch_size: int, steps: int, contenders=CONTENDERS) -> list[dict]:
    require_cuda(smoke)
    device = "cpu" if smoke else "cuda"
    config = model_config(layers, smoke)
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        n_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids}
    peak_tflops = gemm_tflops(smoke)
    results = {}
    for contender in contenders:
        try:
            model, notes = build(contender, config, device, smoke)
        except ImportError as err:  # bitsandbytes / peft missing on the GPU image
            print(f"skipping {contender}: {err}")
            continue
        ms, peak = time_steps(model, batch, steps, warmup=2, smoke=smoke)
        results[contender] = (ms, peak, notes)
        del model
        gc.collect()
        if not smoke:
            torch.cuda.empty_cache()
        print(contender, ms, peak)
    base_ms, base_peak, _ = results.get("peft_bnb", (None, None, None))
    rows = []
    tokens = batch_size * seq
    for contender, (ms, peak, notes) in results.items():
        if contender == "peft_bnb":
            continue
        tps = None if ms is None else tokens / ms * 1000
        achieved = None if tps is None else 6 * n_params * tps / 1e12
        rows.append(row(smoke, op="train_step", mode="fwd+bwd", contender=contender,
                        shape=[batch_size, seq, layers], dtype="bfloat16", rank=RANK, ours_ms=ms,
                        baseline="peft_bnb", baseline_ms=base_ms, ratio=ratio(ms, base_ms),
                        tokens_per_s=tps, baseline_tokens_per_s=None if base_ms is None else tokens / base_ms * 1000,
                        peak_mem_gb=peak, baseline_peak_mem_gb=base_peak,
                        mem_ratio=None if peak is None or base_peak is None else peak / base_peak,
                        achieved=achieved, achieved_unit="TFLOP/s (6N per token)",
                        mfu=None if achieved is None else achieved / peak_tflops,
                        ceiling_pct=None if achieved is None else 100 * achieved / peak_tflops,
                        params=n_params, gradient_checkpointing=True, **notes))
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run, no timings")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 8 on GPU, 2 smoke)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 2048, 16 smoke)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--out", type=Path, help="JSON file to append rows to")
    args = parser.parse_args(argv)
    layers = args.layers or (2 if args.smoke else 8)
    seq = args.seq or (16 if args.smoke else 2048)
    rows = bench(args.smoke, layers, seq, args.batch_size, args.steps, args.contenders)
    for r in rows:
        print({k: r[k] for k in ("contender", "ours_ms", "baseline_ms", "ratio", "tokens_per_s",
                                 "peak_mem_gb", "baseline_peak_mem_gb", "mfu")})
    if args.out or not args.smoke:
        write_rows(rows, args.out or default_out(args.smoke))
    return rows


if __name__ == "__main__":
    main()
