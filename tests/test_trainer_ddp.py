"""DDP on CPU (gloo): 2 processes x grad_accum 2 train the same adapter as 1 process x 4.

Each step draws world * grad_accum micro-batches on every rank and rank r keeps those with
index % world == r; the loss is weighted by the step's trained tokens times world, which
DDP's gradient averaging divides back out, so both runs take identical optimizer steps."""
import json

import pytest
from _trainer_helpers import adapter, demo_data, fast_args, max_diff, metrics, run_module, subprocess_env


@pytest.mark.slow
def test_two_processes_equal_one_with_twice_the_accumulation(tmp_path):
    data = demo_data(tmp_path, n=200)
    # --lora-r: torchrun's own parser takes a bare --r for one of its options
    common = dict(steps=6, save_every=3, eval_every=3, eval_max_new_tokens=4)
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    # --standalone: a free port for the rendezvous; no GPU: this is the gloo test
    run_module(["--standalone", "--nproc_per_node=2", "-m", "trilora", *fast_args(ddp, data, grad_accum=2, **common)],
               module="torch.distributed.run", timeout=300, env={**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""})
    run_module(fast_args(single, data, grad_accum=4, **common))

    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert json.loads((single / "summary.json").read_text())["world_size"] == 1
    # the ranks' partial sums add the 4 micro-batch gradients in another order than 1 process
    # does; Adam turns that float noise in near-zero gradients into small moves (lr 3e-3)
    assert max_diff(adapter(ddp / "adapter"), adapter(single / "adapter")) < 1e-4
    for a, b in zip(metrics(ddp), metrics(single), strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for key in ("loss", "val_loss", "lr"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a, b)
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step-3"]  # rank 0 alone wrote it
