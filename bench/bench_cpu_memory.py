"""CPU side by side: peak memory and step time of trilora against HF + PEFT (+ bitsandbytes).

Why this exists: on a CPU the cost that matters is host memory, and it is easy to lose to
the default stack in the adapter layer alone (saved activations, dequantized weights kept
alive until backward). This script trains the same model on the same data with the same
optimizer under each stack and reports what the process really held. Unlike the GPU
benchmarks (`common.py`), it times on the CPU: the CPU is what it is about.

  peft_fp32      HF `from_pretrained` (fp32) + PEFT LoRA
  trilora_fp32   `trilora.load_model(quantize=None)` + `add_lora`, torch backend
  peft_bnb_nf4   HF `from_pretrained` with `BitsAndBytesConfig` (NF4, double quant, fp32
                 compute) + PEFT LoRA: bitsandbytes' standard QLoRA
  trilora_nf4    `trilora.load_model(quantize="nf4")` + `add_lora`, torch backend

Model: a Llama built from a `LlamaConfig` (default SmolLM2-135M's shape), random init with a
fixed seed, written once with `save_pretrained` (safetensors) to `--model-dir`, and read from
there by every stack (no downloads). LoRA r=16, alpha=32, dropout 0, all linear layers but
the head; AdamW(lr=1e-4) on the trainable parameters; batch × sequence of random token ids
(the same for all); the loss is HF's (labels = input ids); gradient checkpointing off.

Each stack runs in a fresh subprocess, so no allocator state carries over. Memory is the
kernel's own peak RSS (`VmHWM` in /proc/self/status), reset through /proc/self/clear_refs
after loading, so `train_peak` covers the training steps only (weights + optimizer state +
activations + gradients) and `load_peak` the loading; `peak` is their max (= ru_maxrss).
Step time is the median over `--steps` timed steps after one warm-up step; with `--repeats N`
the stacks run N times round robin and the table shows medians (every run is in the JSON).

    python bench/bench_cpu_memory.py [--steps 3] [--repeats 3] [--layers 30] [--out rows.json]
    python bench/bench_cpu_memory.py --only trilora_nf4 peft_bnb_nf4
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

STACKS = ("peft_fp32", "trilora_fp32", "peft_bnb_nf4", "trilora_nf4")
RANK, ALPHA, LR, SEED = 16, 32, 1e-4, 0


# ----------------------------------------------------------------------------- machine / memory

def machine() -> dict:
    """CPU model, cores, RAM and library versions: printed beside every table."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    import peft
    import transformers
    try:
        import bitsandbytes
        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram, 1), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bnb,
            "threads": torch.get_num_threads()}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ----------------------------------------------------------------------------- the model

def model_config(args):
    from transformers import LlamaConfig
    heads = args.hidden // 64
    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=heads,
                       num_key_value_heads=max(1, heads // 3), vocab_size=args.vocab,
                       max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)


def shape_of(args) -> str:
    heads = args.hidden // 64
    return (f"Llama, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
            f"{heads} heads / {max(1, heads // 3)} kv, vocab {args.vocab}, tied embeddings")


def build_model_dir(args) -> Path:
    """Write the random-init model once (fp32 safetensors); reuse it when already there."""
    path = Path(args.model_dir)
    stamp = path / "bench_shape.txt"
    if stamp.exists() and stamp.read_text() == shape_of(args):
        return path
    from transformers import LlamaForCausalLM
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(model_config(args))
    model.save_pretrained(path, safe_serialization=True)
    stamp.write_text(shape_of(args))
    del model
    return path


# ----------------------------------------------------------------------------- one stack

def load(stack: str, path: Path):
    """The model of `stack` with LoRA on every linear layer but the head, in train mode."""
    if stack.startswith("trilora"):
        from trilora.lora import LoraConfig, add_lora
        from trilora.trainer.loading import load_model
        model = load_model(path, quantize="nf4" if stack.endswith("nf4") else None, dtype=torch.float32,
                           device="cpu", backend="torch")
        model = add_lora(model, LoraConfig(r=RANK, alpha=ALPHA, target_modules="all-linear"), backend="torch")
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        quant = None
        if stack.endswith("nf4"):
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=quant,
                                                     device_map="cpu" if quant else None)
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules="all-linear"))
    return model.train()


def worker(stack: str, args) -> dict:
    """Load, then train `args.steps + 1` steps; returns one result row."""
    torch.manual_seed(SEED)
    rss0 = _status_mib("VmRSS")
    t0 = time.perf_counter()
    model = load(stack, Path(args.model_dir))
    load_s = time.perf_counter() - t0
    load_peak = _status_mib("VmHWM")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    reset_peak()
    rss_before = _status_mib("VmRSS")
    times, losses = [], []
    for _ in range(args.steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(round(loss.item(), 6))
        del loss
    train_peak = _status_mib("VmHWM")
    return {"stack": stack, "load_s": round(load_s, 2), "rss_start_mib": round(rss0),
            "load_peak_mib": round(load_peak), "rss_after_load_mib": round(rss_before),
            "train_peak_mib": round(train_peak), "peak_mib": round(max(load_peak, train_peak)),
            "step_s": round(statistics.median(times[1:]), 3), "step_times": [round(t, 2) for t in times],
            "losses": losses,
            "trainable": sum(p.numel() for p in params),
            "attn": getattr(model.config, "_attn_implementation", None)}


# ----------------------------------------------------------------------------- driver

def run_stack(stack: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", stack, "--model-dir", str(args.model_dir)]
    for k in ("steps", "batch", "seq", "layers", "hidden", "intermediate", "vocab", "threads"):
        cmd += [f"--{k}", str(getattr(args, k))]
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the torch reference path, not the interpreter
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"{stack} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    """One row per stack: medians over the repeats (every repeat's figures kept beside them)."""
    row = dict(runs[-1])
    for key in ("load_s", "load_peak_mib", "train_peak_mib", "peak_mib", "step_s"):
        values = [r[key] for r in runs]
        row[key] = statistics.median(values)
        row[key + "_all"] = values
    return row


BASELINE = {"trilora_fp32": "peft_fp32", "trilora_nf4": "peft_bnb_nf4"}


def table(rows: list[dict]) -> str:
    """Markdown table; trilora's rows also give peak and step time relative to their baseline."""
    by = {r["stack"]: r for r in rows}
    head = ("| stack | peak RSS MiB, training | peak RSS MiB, loading | step s | load s | first loss "
            "| peak / step vs HF |\n|---|---:|---:|---:|---:|---:|---:|")
    lines = []
    for r in rows:
        base = by.get(BASELINE.get(r["stack"]))
        rel = (f"{r['train_peak_mib'] / base['train_peak_mib']:.3f}x / {r['step_s'] / base['step_s']:.2f}x"
               if base else "")
        lines.append(f"| {r['stack']} | {r['train_peak_mib']:,.0f} | {r['load_peak_mib']:,.0f} | {r['step_s']:.2f} "
                     f"| {r['load_s']:.2f} | {r['losses'][0]:.4f} | {rel} |")
    return "\n".join([head, *lines])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=STACKS, default=list(STACKS))
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=1, help="fresh processes per stack (medians reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "trilora-bench-llama"))
    ap.add_argument("--out", help="write the rows (with the machine) as JSON here")
    ap.add_argument("--worker", choices=STACKS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    build_model_dir(args)
    info = {**machine(), "model": shape_of(args), "batch": args.batch, "seq": args.seq, "r": RANK,
            "alpha": ALPHA, "steps": args.steps}
    print(json.dumps(info))
    runs: dict[str, list[dict]] = {s: [] for s in args.only}
    for _ in range(args.repeats):  # round robin, so a noisy neighbour hits every stack alike
        for stack in args.only:
            runs[stack].append(run_stack(stack, args))
            print(json.dumps(runs[stack][-1]), flush=True)
    rows = [{**summarize(runs[s]), **info} for s in args.only]
    print(f"\n{info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, torch {info['torch']}, "
          f"transformers {info['transformers']}, peft {info['peft']}, bitsandbytes {info['bitsandbytes']}")
    print(f"{info['model']}; batch {args.batch} x seq {args.seq}; r {RANK}, alpha {ALPHA}; AdamW; "
          f"median of {args.steps} steps, "
          f"median of {args.repeats} process(es) per stack\n")
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
