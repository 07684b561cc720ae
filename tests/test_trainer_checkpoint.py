"""Checkpoints: layout, a run killed with SIGKILL resumes to the same weights, and corrupt,
truncated or foreign checkpoints are refused with an error naming the problem."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from _trainer_helpers import (PAUSING_RUNNER, adapter, demo_data, fast_args, metrics, run_cli, run_module,
                              subprocess_env)
from safetensors.torch import load_file

from trilora.trainer.checkpoint import CheckpointError, latest_checkpoint, verify_checkpoint

# 20 steps with dropout (so the RNG state must be restored too), a checkpoint every 5
STEPS, SAVE_EVERY = 20, 5

def _args(out, data, **kw):
    return fast_args(out, data, steps=STEPS, save_every=SAVE_EVERY, eval_every=5, dropout=0.1, **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp("data"), n=200)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    """An uninterrupted 20-step run in a subprocess (the reference)."""
    out = tmp_path_factory.mktemp("run") / "out"
    run_module(_args(out, data)[:])
    return out


def test_checkpoint_layout(uninterrupted):
    root = uninterrupted / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-10", "step-15", "step-5"]  # none at the end
    step = root / "step-10"
    files = sorted(str(p.relative_to(step)) for p in step.rglob("*") if p.is_file())
    assert files == ["manifest.json", "optimizer.safetensors", "rng.safetensors", "trainer_state.json",
                     "weights/adapter_config.json", "weights/adapter_model.safetensors"]
    manifest = json.loads((step / "manifest.json").read_text())
    assert set(manifest) == set(files) - {"manifest.json"}
    assert all(len(v["sha256"]) == 64 and v["bytes"] > 0 for v in manifest.values())
    state = json.loads((step / "trainer_state.json").read_text())
    assert state["step"] == 10
    assert state["data"]["epoch"] == 0 and state["data"]["index"] == 10  # 10 micro-batches consumed
    assert state["scheduler"]["last_epoch"] == 10
    assert state["config"]["r"] == 4 and state["config"]["lr"] == 3e-3
    assert {"python", "numpy"} <= set(state["rng"])
    assert "torch_cpu" in load_file(step / "rng.safetensors")
    opt = load_file(step / "optimizer.safetensors")
    # by parameter name, "<param>/<state>": the moments of every trainable LoRA factor
    want = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
            for k in adapter(step / "weights")}
    assert {k.rsplit("/", 1)[0] for k in opt if k.endswith("/exp_avg")} == want
    assert {k.rsplit("/", 1)[0] for k in opt if k.endswith("/exp_avg_sq")} == want
    assert adapter(step / "weights").keys() == adapter(uninterrupted / "adapter").keys()
    verify_checkpoint(step)


def test_sigkill_mid_checkpoint_then_resume_matches_uninterrupted(uninterrupted, data, tmp_path):
    out, flag = tmp_path / "out", tmp_path / "paused"
    runner = tmp_path / "runner.py"
    runner.write_text(PAUSING_RUNNER)
    proc = subprocess.Popen([sys.executable, str(runner), str(flag), "15", *map(str, _args(out, data))],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not flag.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the step-15 checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    root = out / "checkpoints"
    assert (root / "step-10").is_dir() and not (root / "step-15").exists()
    assert [p.name for p in root.glob(".tmp-step-15-*")], "the half-written checkpoint is left behind"
    assert latest_checkpoint(out).name == "step-10"  # ... and ignored
    assert not (out / "summary.json").exists()

    run_module(_args(out, data, resume=True))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] and summary["steps"] == STEPS
    want, got = adapter(uninterrupted / "adapter"), adapter(out / "adapter")
    assert all(torch.equal(want[k], got[k]) for k in want), "resumed weights differ"
    # the metrics of the killed run after step 10 were dropped and replayed identically
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(out)]
    assert strip == [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(uninterrupted)]


@pytest.fixture
def copy_of(uninterrupted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    (out / "summary.json").unlink()
    return out


def _refused(out, data, match, **kw):
    before = sorted(str(p) for p in out.rglob("*"))
    code, _, err = run_cli(_args(out, data, resume=True, **kw))
    assert code == 2, err[-2000:]
    assert "trilora train: error:" in err
    for pattern in match:
        assert pattern in err, err[-2000:]
    assert sorted(str(p) for p in out.rglob("*")) == before  # nothing written
    assert not (out / "summary.json").exists()


def test_corrupt_checkpoint_is_refused(copy_of, data):
    path = copy_of / "checkpoints" / "step-15" / "optimizer.safetensors"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="optimizer.safetensors is corrupt"):
        verify_checkpoint(path.parent)
    _refused(copy_of, data, ["step-15", "optimizer.safetensors is corrupt"])


def test_truncated_checkpoint_is_refused(copy_of, data):
    path = copy_of / "checkpoints" / "step-15" / "weights" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    _refused(copy_of, data, ["weights/adapter_model.safetensors is truncated (100 of"])


def test_checkpoint_without_manifest_is_refused(copy_of, data):
    (copy_of / "checkpoints" / "step-15" / "manifest.json").unlink()
    _refused(copy_of, data, ["step-15", "no manifest.json"])


@pytest.mark.parametrize("change, named", [({"lora_r": 8}, "r: 4 -> 8"), ({"lr": 1e-3}, "lr: 0.003 -> 0.001"),
                                           ({"batch_size": 4}, "batch_size: 8 -> 4")])
def test_resume_with_other_settings_is_refused(copy_of, data, change, named):
    _refused(copy_of, data, ["different settings", named], **change)


def test_fresh_run_into_a_dir_with_checkpoints_is_refused(copy_of, data):
    before = sorted(str(p) for p in copy_of.rglob("*"))
    code, _, err = run_cli(_args(copy_of, data))
    assert code == 2 and "holds another run's results (" in err and "checkpoints/" in err and "--resume" in err
    assert sorted(str(p) for p in copy_of.rglob("*")) == before


def test_leftover_temp_dirs_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-30-123").mkdir(parents=True)
    (root / "step-7").mkdir()
    (root / "step-12").mkdir()
    (root / "step-x").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-12"
    assert latest_checkpoint(tmp_path / "nothing") is None


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_of_full_and_lora_runs(data, tmp_path, monkeypatch, method):
    """In one process (same threads, so bitwise): a run that dies right after its step-3
    checkpoint, resumed, ends with the weights of an uninterrupted run."""
    from safetensors.torch import load_file as read

    from trilora.trainer import loop

    kw = dict(steps=6, save_every=3, dropout=0.1, method=method, lr=1e-4 if method == "full" else 3e-3)
    code, _, err = run_cli(fast_args(tmp_path / "ref", data, **kw))
    assert code == 0, err[-2000:]
    original = loop.save_checkpoint

    def save_and_die(*args, **kwargs):
        original(*args, **kwargs)
        raise RuntimeError("killed")

    monkeypatch.setattr(loop, "save_checkpoint", save_and_die)
    out = tmp_path / "out"
    code, _, err = run_cli(fast_args(out, data, **kw))  # dies: one line, exit 1
    assert code == 1 and err.strip().splitlines()[-1] == "trilora train: error: RuntimeError: killed (--debug shows where)"
    monkeypatch.setattr(loop, "save_checkpoint", original)
    code, _, err = run_cli(fast_args(out, data, resume=True, **kw))
    assert code == 0, err[-2000:]
    if method == "full":
        assert (out / "checkpoints" / "step-3" / "weights" / "model.safetensors").exists()
        want, got = read(tmp_path / "ref" / "model" / "model.safetensors"), read(out / "model" / "model.safetensors")
        assert json.loads((out / "summary.json").read_text())["model_dir"] == str(out / "model")
    else:
        want, got = adapter(tmp_path / "ref" / "adapter"), adapter(out / "adapter")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_optimizer_state_by_name_round_trip_and_the_older_index_form():
    """Checkpoints keep the optimizer state by parameter name (any number of ranks can load
    it); an older checkpoint's index-keyed state still reads back as it was."""
    from trilora.trainer.checkpoint import _flatten_optimizer, _unflatten_optimizer
    from trilora.trainer.sharding import load_named_optimizer_state, named_optimizer_state
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 3)).square().sum().backward()
    opt.step()
    tensors, meta = _flatten_optimizer(named_optimizer_state(model, opt))
    assert "0.weight/exp_avg" in tensors and meta["by_name"]
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = _unflatten_optimizer(tensors, meta)
    assert state.pop("by_name")
    load_named_optimizer_state(model, fresh, state)
    for p in model.parameters():
        assert all(torch.equal(opt.state[p][k], fresh.state[p][k]) for k in opt.state[p])
    legacy = {f"{i}.{k}": v for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()}
    old = _unflatten_optimizer(legacy, {"param_groups": opt.state_dict()["param_groups"], "scalars": {}})
    assert not old.pop("by_name") and set(old["state"]) == {0, 1, 2, 3}
    other = torch.nn.Linear(3, 4)
    with pytest.raises(ValueError, match="other parameters than this model trains"):
        load_named_optimizer_state(other, torch.optim.AdamW(other.parameters()), state)
