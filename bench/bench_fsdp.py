"""Benchmark: QLoRA training under FSDP2 (`--fsdp`) on 1 vs N GPUs of one machine.

The model of `bench_train_step.py` (Llama-3-8B-shaped, random init, `--layers` decoder layers,
NF4 base + trilora's LoRA r=16 on all linear layers, trilora.patch, gradient checkpointing),
sharded with `trilora.trainer.sharding.shard_model` as `trilora train --fsdp` shards it. Each
world size runs in its own `torchrun` (one process per GPU); every rank trains `--batch-size`
sequences per step, so the global batch grows with N (weak scaling).
Rows: op "fsdp_train_step", one per world size, baseline "nproc=1": tokens_per_s (all ranks),
peak_mem_gb (the largest rank's peak allocated memory, weights included), param_gb_per_rank
(this rank's shards of every parameter), scaling = tokens/s ÷ (N × tokens/s of one GPU).

    python bench/bench_fsdp.py --nproc 1 2 4 8 [--layers 8] [--out bench/results/X.json]   # GPUs
    python bench/bench_fsdp.py --smoke                                                    # CPU harness check
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_out, require_cuda, row, write_rows  # noqa: E402


def worker(args) -> None:
    """One rank under torchrun: build, shard, train `--steps` steps, rank 0 writes its facts.
    The group (gloo for --smoke, whose ranks see no GPU; else nccl) is the trainer's
    `process_group`, destroyed once `_measure`'s model is garbage."""
    import torch.distributed as dist

    from trilora.trainer.sharding import process_group
    with process_group(True):
        _measure(args, dist)


def _measure(args, dist) -> None:
    """This rank's model built, sharded and trained; rank 0 writes the facts."""
    from bench_train_step import build, model_config
    from trilora.trainer.sharding import bytes_per_rank, shard_model

    smoke = args.smoke
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cpu" if smoke else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if not smoke:
        torch.cuda.set_device(device)
    config = model_config(args.layers, smoke)
    model, notes = build("trilora_qlora", config, device, smoke)
    shard_model(model, device)
    local_bytes, total_bytes = bytes_per_rank(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq), generator=g).to(device)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = peak = None
    if smoke:
        step()
    else:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1000 / args.steps
        peak = torch.cuda.max_memory_allocated() / 2**30
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps({
            "nproc": world, "ms": ms, "peak_mem_gb": None if smoke else max(peaks),
            "param_gb_per_rank": local_bytes / 2**30, "param_gb_total": total_bytes / 2**30,
            "tokens_per_step": world * args.batch_size * args.seq, "patched": notes.get("patched")}))


def bench(smoke: bool, nprocs: list[int], layers: int, seq: int, batch_size: int, steps: int) -> list[dict]:
    require_cuda(smoke)
    if not smoke and max(nprocs) > torch.cuda.device_count():
        raise SystemExit(f"--nproc {max(nprocs)} needs that many GPUs; this machine has {torch.cuda.device_count()}")
    results = {}
    for n in nprocs:
        with tempfile.TemporaryDirectory() as tmp:
            facts = Path(tmp) / "rank0.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   __file__, "--worker-out", str(facts), "--layers", str(layers), "--seq", str(seq),
                   "--batch-size", str(batch_size), "--steps", str(steps)] + (["--smoke"] if smoke else [])
            env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if smoke else {})}
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"torchrun with {n} processes failed:\n{done.stderr[-8000:]}")
            results[n] = json.loads(facts.read_text())
    base = results.get(1)
    rows = []
    for n, facts in results.items():
        tps = None if facts["ms"] is None else facts["tokens_per_step"] / facts["ms"] * 1000
        base_tps = None if base is None or base["ms"] is None else base["tokens_per_step"] / base["ms"] * 1000
        rows.append(row(smoke, op="fsdp_train_step", mode="fwd+bwd", nproc=n, shape=[batch_size, seq, layers],
                        dtype="bfloat16", rank=16, ours_ms=facts["ms"], baseline="nproc=1",
                        baseline_ms=None if base is None else base["ms"], ratio=None,
                        tokens_per_s=tps, scaling=None if tps is None or base_tps is None else tps / (n * base_tps),
                        peak_mem_gb=facts["peak_mem_gb"], param_gb_per_rank=facts["param_gb_per_rank"],
                        param_gb_total=facts["param_gb_total"], achieved=None, ceiling_pct=None,
                        patched=facts["patched"], gradient_checkpointing=True))
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run with gloo (1 and 2 processes), no timings")
    parser.add_argument("--nproc", type=int, nargs="+", default=None, help="world sizes (default: 1 and all GPUs)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 8 on GPU, 2 smoke)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 2048, 16 smoke)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per rank and step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, help="JSON file to append rows to")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)  # set when torchrun starts this file's ranks
    args = parser.parse_args(argv)
    args.layers = args.layers or (2 if args.smoke else 8)
    args.seq = args.seq or (16 if args.smoke else 2048)
    if args.worker_out:
        worker(args)
        return []
    nprocs = args.nproc or ([1, 2] if args.smoke else sorted({1, max(1, torch.cuda.device_count())}))
    rows = bench(args.smoke, nprocs, args.layers, args.seq, args.batch_size, args.steps)
    for r in rows:
        print({k: r[k] for k in ("nproc", "tokens_per_s", "scaling", "peak_mem_gb", "param_gb_per_rank")})
    if args.out or not args.smoke:
        write_rows(rows, args.out or default_out(args.smoke))
    return rows


if __name__ == "__main__":
    main()
