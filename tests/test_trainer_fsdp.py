"""FSDP2 (`--fsdp`) on CPU with gloo: 2 processes train the adapter 1 process trains with the
same global batch (QLoRA on NF4 and LoRA on fp32), each rank holds half of the parameter
bytes, and a run stopped after a checkpoint resumes on 2 processes, on 1 sharded process and
on 1 plain process to the same adapter. Errors: --fsdp outside torchrun."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from _trainer_helpers import (PAUSING_RUNNER, adapter, demo_data, fast_args, max_diff, metrics, run_cli, run_module,
                              subprocess_env)

STEPS, SAVE_EVERY = 20, 10


def torchrun(nproc: int, args: list, timeout: float = 600):
    # --standalone: a free port for the rendezvous; no GPU: this is the gloo test
    return run_module(["--standalone", f"--nproc_per_node={nproc}", "-m", "trilora", *args],
                      module="torch.distributed.run", timeout=timeout,
                      env={**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""})


def _args(out, data, method, **kw):
    # --lora-r: torchrun's own parser takes a bare --r for one of its options
    return fast_args(out, data, **{**dict(steps=STEPS, save_every=SAVE_EVERY, eval_every=SAVE_EVERY,
                                          eval_max_new_tokens=4, method=method), **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp("data"), n=200)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """{method: (the 2-process FSDP run, the 1-process run)}, each 20 steps of global batch 32."""
    root = tmp_path_factory.mktemp("fsdp")
    done = {}
    for method in ("qlora", "lora"):
        sharded, single = root / f"{method}-fsdp", root / f"{method}-single"
        torchrun(2, _args(sharded, data, method, grad_accum=2, fsdp=True))
        run_module(_args(single, data, method, grad_accum=4))
        done[method] = sharded, single
    return done


def _same_run(a, b, tol=1e-5):
    assert max_diff(adapter(a / "adapter"), adapter(b / "adapter")) < tol
    ma, mb = metrics(a), metrics(b)
    assert len(ma) == len(mb) and [r["step"] for r in ma] == [r["step"] for r in mb]
    for x, y in zip(ma, mb):
        for key in ("loss", "val_loss"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-5), (x, y)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_two_sharded_processes_equal_one(runs, method):
    sharded, single = runs[method]
    _same_run(sharded, single)
    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    fsdp = summary["fsdp"]
    per_rank, total = fsdp["param_bytes_per_rank"], fsdp["param_bytes_total"]
    assert len(per_rank) == 2 and sum(per_rank) == total
    # dim-0 shards: each rank holds half, up to one row of the odd-sized tensors
    assert all(abs(b - total / 2) < 0.01 * total for b in per_rank)
    assert json.loads((single / "summary.json").read_text())["fsdp"] is None
    assert sorted(p.name for p in (sharded / "checkpoints").iterdir()) == [f"step-{SAVE_EVERY}"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc, flags", [(2, dict(grad_accum=2, fsdp=True)), (1, dict(grad_accum=4, fsdp=True)),
                                          (1, dict(grad_accum=4))], ids=["2-sharded", "1-sharded", "1-plain"])
def test_resume_on_another_number_of_processes(runs, data, tmp_path, nproc, flags):
    """The state a kill right after the step-10 checkpoint leaves (no adapter/, no summary,
    metrics past step 10) resumes to the uninterrupted run's adapter: the checkpoint holds
    whole tensors keyed by name, so any number of ranks, sharded or not, continues it."""
    sharded, _ = runs["qlora"]
    out = tmp_path / "out"
    shutil.copytree(sharded, out)
    shutil.rmtree(out / "adapter")
    (out / "summary.json").unlink()
    args = _args(out, data, "qlora", resume=True, **flags)
    if flags.get("fsdp"):
        torchrun(nproc, args)
    else:
        run_module(args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] and summary["steps"] == STEPS and summary["world_size"] == nproc
    _same_run(out, sharded)


@pytest.mark.slow
def test_sigkill_of_a_rank_mid_checkpoint_then_resume(runs, data, tmp_path):
    sharded, _ = runs["qlora"]
    out, flag, runner = tmp_path / "out", tmp_path / "paused", tmp_path / "runner.py"
    runner.write_text(PAUSING_RUNNER)
    args = _args(out, data, "qlora", grad_accum=2, fsdp=True, save_every=5)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(runner), str(flag), "15", *map(str, args)],
                            env={**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not flag.exists() or not flag.read_text():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the step-15 checkpoint"
            time.sleep(0.1)
        os.kill(int(flag.read_text()), signal.SIGKILL)  # rank 0, mid-write
        proc.wait(timeout=120)  # torchrun notices and stops the other rank
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    root = out / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-10", "step-5"] and list(root.glob(".tmp-step-15-*"))
    torchrun(2, _args(out, data, "qlora", grad_accum=2, fsdp=True, save_every=5, resume=True))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] and summary["steps"] == STEPS
    _same_run(out, sharded)


def test_resume_refuses_another_global_batch(runs, data, tmp_path):
    sharded, _ = runs["qlora"]
    out = tmp_path / "out"
    shutil.copytree(sharded, out)
    (out / "summary.json").unlink()
    code, _, err = run_cli(_args(out, data, "qlora", resume=True, grad_accum=2))
    assert code == 2 and "micro-batches per step (grad_accum x processes): 2 x 2 -> 2 x 1, keep 4 with " \
                          "--grad-accum 4" in err, err[-2000:]


def test_fsdp_needs_torchrun(data, tmp_path):
    code, _, err = run_cli(_args(tmp_path / "out", data, "qlora", fsdp=True))
    assert code == 2 and "--fsdp shards the model over the processes torchrun starts" in err, err[-2000:]
    assert not (tmp_path / "out").exists()


def test_the_run_ends_the_process_group_it_made(data, tmp_path, monkeypatch):
    """A gloo group left to the interpreter's exit can abort a finished run (exit -6): train()
    destroys the group it made, in one process as torchrun would set it up."""
    import socket

    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        monkeypatch.setenv(key, str(value))
    assert not dist.is_initialized()
    code, _, err = run_cli(_args(tmp_path / "out", data, "lora", steps=2, save_every=0, eval_every=2, fsdp=True))
    assert code == 0, err[-2000:]
    assert (tmp_path / "out" / "adapter").is_dir() and not dist.is_initialized()


@pytest.mark.slow
def test_fused_blocks_and_activation_checkpointing_under_fsdp(data, tmp_path):
    """trilora.patch's fused modules and activation checkpointing inside FSDP units train as
    they do in one process."""
    extra = dict(steps=6, save_every=0, eval_every=3, fused_blocks="on", gradient_checkpointing=True)
    sharded, single = tmp_path / "fsdp", tmp_path / "single"
    result = torchrun(2, fast_args(sharded, data, grad_accum=2, fsdp=True, eval_max_new_tokens=4, **extra))
    assert "lm_head_loss 1 patched" in result.stdout
    run_module(fast_args(single, data, grad_accum=4, eval_max_new_tokens=4, **extra))
    _same_run(sharded, single)


@pytest.mark.slow
def test_dora_under_fsdp(data, tmp_path):
    """DoRA adapters (their magnitudes sharded too) train under FSDP as in one process."""
    extra = dict(steps=6, save_every=0, eval_every=3, dora=True, eval_max_new_tokens=4)
    sharded, single = tmp_path / "fsdp", tmp_path / "single"
    torchrun(2, fast_args(sharded, data, grad_accum=2, fsdp=True, **extra))
    run_module(fast_args(single, data, grad_accum=4, **extra))
    assert any(k.endswith("lora_magnitude_vector") for k in adapter(sharded / "adapter"))
    _same_run(sharded, single)


def _model_diff(a, b) -> float:
    from safetensors.torch import load_file
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert sorted(wa) == sorted(wb)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.mark.slow
def test_full_fine_tuning_under_fsdp_writes_sharded_checkpoints(data, tmp_path):
    """--method full: every weight trains sharded (embeddings and head included) as in one
    process; checkpoints and best/ hold each rank's shards (torch.distributed.checkpoint), not
    a gathered model; the run resumes from them on 2 sharded processes and on 1 plain one."""
    extra = dict(method="full", steps=8, save_every=4, eval_every=4, lr=3e-4, eval_max_new_tokens=4)
    sharded, single = tmp_path / "fsdp", tmp_path / "single"
    torchrun(2, fast_args(sharded, data, grad_accum=1, fsdp=True, **extra))
    run_module(fast_args(single, data, grad_accum=2, **extra))
    assert _model_diff(sharded, single) < 1e-5
    for x, y in zip(metrics(sharded), metrics(single)):
        for key in ("loss", "val_loss"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-5), (x, y)
    step = sharded / "checkpoints" / "step-4"
    assert sorted(p.name for p in step.iterdir()) == ["manifest.json", "rng.safetensors", "sharded",
                                                       "trainer_state.json"]
    shards = sorted(p.name for p in (step / "sharded").iterdir())
    assert shards == ["optimizer_groups.json", "shard-00001-model-00001-of-00001.safetensors",
                      "shard-00002-model-00001-of-00001.safetensors"]  # one safetensors file per rank
    manifest = json.loads((step / "manifest.json").read_text())
    assert {f"sharded/{name}" for name in shards} <= set(manifest)  # checksummed like any checkpoint file
    assert len(list((sharded / "best").glob("shard-*.safetensors"))) == 2  # best/: shards too
    for nproc, flags in ((2, dict(grad_accum=1, fsdp=True)), (1, dict(grad_accum=2))):
        out = tmp_path / f"resume-{nproc}"
        shutil.copytree(sharded, out)  # as a kill after the step-4 checkpoint leaves it, plus later records
        shutil.rmtree(out / "model")
        (out / "summary.json").unlink()
        args = fast_args(out, data, resume=True, **flags, **extra)
        torchrun(nproc, args) if flags.get("fsdp") else run_module(args)
        assert json.loads((out / "summary.json").read_text())["resumed"]
        assert _model_diff(out, sharded) < 1e-6
