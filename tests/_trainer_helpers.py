"""Shared pieces of the trainer tests: demo data files, tiny model directories, CLI runners.

Training runs use the embedded demo model (a 4-layer character-level Llama, 0.6 M params) and
the PyTorch kernels (`--kernel-backend torch`): conftest sets TRITON_INTERPRET=1, under which
"auto" would train through Triton's (very slow) interpreter. Subprocesses get an environment
without TRITON_INTERPRET and with one thread, so two runs of one command compute bit-identical
numbers and do not fight over the 2 shared cores.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from trilora.cli import main
from trilora.demo.task import demo_dataset, random_words, task_records
from trilora.lora import read_adapter

DEMO_MODEL = Path(__file__).resolve().parents[1] / "trilora" / "demo" / "assets"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def demo_data(tmp_path: Path, n: int = 200, name: str = "rotate.jsonl", task: str = "rotate",
              seed: int = 1234) -> Path:
    """n records of a demo task ("rotate: abc = bca") as JSONL."""
    rows = demo_dataset(n, seed) if task == "rotate" else task_records(task, random_words(n, seed))
    return write_jsonl(tmp_path / name, rows)


def fast_args(out: Path, data: Path, steps: int = 10, **overrides) -> list[str]:
    """`trilora train` flags for a short run on the demo model (override with key=value)."""
    flags = {"model": DEMO_MODEL, "data": data, "output_dir": out, "max_steps": steps, "batch_size": 8,
             "max_length": 32, "eval_max_new_tokens": 8, "kernel_backend": "torch", "lora_r": 4,
             "alpha": 8, "dropout": 0.0, "lr": 3e-3, "warmup_steps": 0}
    flags.update(overrides)
    args = ["train"]
    for key, value in flags.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """`trilora <args>` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse errors
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    return env


def run_module(args: list, timeout: float = 240, module: str = "trilora", env: dict | None = None
               ) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in a fresh process; fails the test on a non-zero exit."""
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env or subprocess_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def adapter(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the PEFT adapter at `path`."""
    return read_adapter(path)[1]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tiny_llama(tied: bool = False, seed: int = 0, **config):
    """A fresh tiny LlamaForCausalLM (vocab 64, hidden 32, 2 layers), fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               tie_word_embeddings=tied)
    cfg.update(config)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def logits_of(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    if ids is None:
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


# Runs `trilora` but stops dead inside the step-`pause_step` checkpoint write, after the
# weights went into the temp dir and before the manifest, and writes its pid to a file: the
# test then SIGKILLs it there. A real kill lands anywhere; this one lands at the worst place,
# deterministically. Usage: python runner.py <pid file> <pause step> <trilora args...>
# (under torchrun only rank 0 writes checkpoints, so only it pauses).
PAUSING_RUNNER = """
import os, pathlib, sys, time
import trilora.trainer.loop as loop
signal_file, pause_step = pathlib.Path(sys.argv[1]), int(sys.argv[2])
original = loop.save_checkpoint

def save_checkpoint(out, step, write_weights, *args, **kwargs):
    def write_then_hang(path):
        write_weights(path)
        signal_file.write_text(str(os.getpid()))
        time.sleep(600)
    return original(out, step, write_then_hang if step == pause_step else write_weights, *args, **kwargs)

loop.save_checkpoint = save_checkpoint
from trilora.cli import main
sys.exit(main(sys.argv[3:]))
"""
