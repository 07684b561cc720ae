"""A user's work is never lost or silently replaced: output-directory ownership, the run lock,
atomic final artefacts, checkpoint rotation, torn metrics, graceful SIGTERM/SIGINT, NaN/Inf
guards, safe merges, and one-line errors (--debug for the traceback)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from _trainer_helpers import DEMO_MODEL, demo_data, fast_args, metrics, run_cli, subprocess_env, write_jsonl
from safetensors.torch import load_file, save_file

from trilora.trainer.checkpoint import verify_checkpoint
from trilora.trainer.outputs import RunLock


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp("data"), n=120)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """A finished 3-step run."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    code, _, err = run_cli(fast_args(out, data, steps=3))
    assert code == 0, err[-2000:]
    return out


def _snapshot(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _error(code, err):
    assert code == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith("trilora "), err[-2000:]
    assert "Traceback" not in err
    return lines[-1]


# ----------------------------------------------------------------------------- ownership

def test_a_finished_run_is_not_replaced(finished, data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = _snapshot(out)
    message = _error(*run_cli(fast_args(out, data, steps=3))[::2])
    assert "holds another run's results" in message and "summary.json" in message and "adapter/" in message
    assert "--resume" in message and "--overwrite" in message
    message = _error(*run_cli(fast_args(out, data, steps=3, resume=True))[::2])
    assert "finished run" in message and "nothing to resume" in message
    assert _snapshot(out) == before  # not a byte changed, no lock file left


def test_overwrite_replaces_it(finished, data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("the user's own file")
    code, _, err = run_cli(fast_args(out, data, steps=2, overwrite=True))
    assert code == 0, err[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2]  # the old records are gone
    assert (out / "notes.txt").read_text() == "the user's own file"  # only run artefacts are replaced


def test_resume_with_nothing_to_resume(data, tmp_path):
    out = tmp_path / "new"
    message = _error(*run_cli(fast_args(out, data, resume=True))[::2])
    assert "nothing to resume" in message
    assert not out.exists()  # a directory this run created and left empty is removed
    message = _error(*run_cli(fast_args(out, data, resume=True, overwrite=True))[::2])
    assert "contradict" in message


def test_a_second_run_is_locked_out(data, tmp_path):
    out = tmp_path / "out"
    with RunLock(out):
        message = _error(*run_cli(fast_args(out, data, steps=2))[::2])
        assert f"another trilora run (pid {os.getpid()})" in message
    assert not (out / ".trilora.lock").exists()
    # a holder that died: its lock file is left behind but holds no lock
    (out / ".trilora.lock").write_text("999999")
    code, _, err = run_cli(fast_args(out, data, steps=2))
    assert code == 0, err[-2000:]


def test_stale_temporaries_are_removed_and_checkpoints_rotated(data, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints" / ".tmp-step-3-4242").mkdir(parents=True)
    (out / ".tmp-adapter").mkdir()
    (out / ".old-best").mkdir()
    code, _, err = run_cli(fast_args(out, data, steps=9, save_every=2, keep_checkpoints=2))
    assert code == 0, err[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-6", "step-8"]
    assert not [p for p in out.rglob(".tmp-*")] and not [p for p in out.rglob(".old-*")]


def _unfinished(data, out, steps=6, **kw):
    """A run whose last moments were lost: checkpoints at 2 and 4, no adapter, no summary."""
    code, _, err = run_cli(fast_args(out, data, steps=steps, save_every=2, **kw))
    assert code == 0, err[-2000:]
    (out / "summary.json").unlink()
    shutil.rmtree(out / "adapter")


def test_a_torn_metrics_line_is_dropped_on_resume(data, tmp_path):
    out = tmp_path / "out"
    _unfinished(data, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # the disk filled up mid-record
    code, _, err = run_cli(fast_args(out, data, steps=6, save_every=2, resume=True))
    assert code == 0, err[-2000:]
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # a broken line before the last is not guessed at: the file and line are named
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = "garbage"
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (out / "summary.json").unlink()
    message = _error(*run_cli(fast_args(out, data, steps=6, save_every=2, resume=True))[::2])
    assert "metrics.jsonl, line 2" in message


def test_resume_on_other_data_is_refused(data, tmp_path):
    mine, out = tmp_path / data.name, tmp_path / "out"
    shutil.copy(data, mine)
    _unfinished(mine, out)
    rows = [json.loads(line) for line in mine.read_text().splitlines()]
    rows[3] = dict(rows[3], completion=rows[3]["completion"] + "x")  # same file and count, one example changed
    write_jsonl(mine, rows)
    message = _error(*run_cli(fast_args(out, mine, steps=6, save_every=2, resume=True))[::2])
    assert "training examples differ" in message


# ----------------------------------------------------------------------------- stopping

@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_after_the_step_with_a_checkpoint(data, tmp_path, signum, code):
    out = tmp_path / "out"
    args = fast_args(out, data, steps=100000, log_every=1)
    proc = subprocess.Popen([sys.executable, "-m", "trilora", *map(str, args)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the run never reached step 3"
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-3000:]
    assert f"stopped by {signal.Signals(signum).name} after step" in err and "--resume" in err
    assert "Traceback" not in err
    step = int(err.split("after step ")[1].split(";")[0])
    checkpoint = out / "checkpoints" / f"step-{step}"
    verify_checkpoint(checkpoint)
    assert not (out / "summary.json").exists()
    # the stopped run continues where it stopped
    code, _, err = run_cli(fast_args(out, data, steps=step + 2, log_every=1, resume=True))
    assert code == 0, err[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 2


# ----------------------------------------------------------------------------- NaN / Inf

def test_a_diverged_run_fails_and_writes_no_result(data, tmp_path):
    out = tmp_path / "out"
    message = _error(*run_cli(fast_args(out, data, steps=6, lr=1e30, max_grad_norm=0))[::2])
    assert "step" in message and ("nan" in message.lower() or "inf" in message.lower())
    assert not (out / "summary.json").exists() and not (out / "adapter").exists()
    message = _error(*run_cli(fast_args(tmp_path / "wd", data, weight_decay=float("inf")))[::2])
    assert "weight_decay must be a finite number" in message
    message = _error(*run_cli(fast_args(tmp_path / "ep", data, steps=0, epochs=float("inf")))[::2])
    assert "epochs must be a finite positive number" in message


def _copy_model(tmp_path, name="model"):
    model = tmp_path / name
    shutil.copytree(DEMO_MODEL, model)
    return model


def test_non_finite_or_mismatched_checkpoints_are_refused(data, tmp_path):
    model = _copy_model(tmp_path)
    tensors = load_file(model / "model.safetensors")
    key = next(k for k in tensors if k.endswith("mlp.up_proj.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    message = _error(*run_cli(["eval", "--model", model, "--data", data, "--kernel-backend", "torch"])[::2])
    assert key in message and "NaN/Inf" in message
    # a config that disagrees with the tensors (intermediate_size)
    model = _copy_model(tmp_path, "model2")
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] += 8
    (model / "config.json").write_text(json.dumps(config))
    message = _error(*run_cli(["eval", "--model", model, "--data", data, "--kernel-backend", "torch",
                               "--quantize", "nf4"])[::2])
    assert "mlp" in message and "expects" in message and "config.json" in message


def test_a_non_finite_adapter_is_refused(finished, data, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(finished / "adapter", adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("inf"))
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    message = _error(*run_cli(["eval", "--model", DEMO_MODEL, "--adapter", adapter, "--data", data,
                               "--kernel-backend", "torch"])[::2])
    assert key in message and "NaN/Inf" in message


def test_evaluation_bounds_prompts_by_max_length(tmp_path):
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "rotate: " + "ab" * 15000 + " =", "completion": " x"},
                                                 {"prompt": "rotate: abc =", "completion": " bca"}])
    code, out, err = run_cli(["eval", "--model", DEMO_MODEL, "--data", data, "--max-length", "64",
                              "--max-new-tokens", "4", "--kernel-backend", "torch"])
    assert code == 0, err[-2000:]
    assert json.loads(out[out.index("{"):])["generated"] == 2


# ----------------------------------------------------------------------------- merge

def test_merge_never_overwrites_its_inputs(finished, tmp_path):
    model = _copy_model(tmp_path)
    adapter = finished / "adapter"
    before = _snapshot(model)
    for output, words in ((model, "is the --model"), (model / "sub", "sits inside the --model"),
                          (tmp_path, "contains the --model"), (adapter / "merged", "sits inside the --adapter")):
        message = _error(*run_cli(["merge", "--model", model, "--adapter", adapter, "--output", output,
                                   "--kernel-backend", "torch"])[::2])
        assert words in message, message
    assert _snapshot(model) == before
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    message = _error(*run_cli(["merge", "--model", model, "--adapter", adapter, "--output", taken,
                               "--kernel-backend", "torch"])[::2])
    assert "not empty" in message and (taken / "keep.txt").exists()
    (tmp_path / "afile").write_text("x")
    assert "is a file" in _error(*run_cli(["merge", "--model", model, "--adapter", adapter, "--output",
                                           tmp_path / "afile", "--kernel-backend", "torch"])[::2])
    code, _, err = run_cli(["merge", "--model", model, "--adapter", adapter, "--output", taken, "--overwrite",
                            "--kernel-backend", "torch"])
    assert code == 0, err[-2000:]
    assert (taken / "model.safetensors").exists() and not (taken / "keep.txt").exists()
    assert not [p for p in tmp_path.glob(".tmp-*")]


# ----------------------------------------------------------------------------- errors

def test_debug_shows_the_traceback(tmp_path):
    args = ["eval", "--model", tmp_path / "nowhere", "--data", tmp_path / "none.jsonl"]
    plain = subprocess.run([sys.executable, "-m", "trilora", *map(str, args)], env=subprocess_env(),
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("trilora eval: error:")
    debug = subprocess.run([sys.executable, "-m", "trilora", *map(str, args), "--debug"], env=subprocess_env(),
                           capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.parametrize("damage", ["truncated", "huge header"])
def test_a_damaged_safetensors_file_is_named(data, tmp_path, damage):
    import struct
    model = _copy_model(tmp_path)
    path = model / "model.safetensors"
    blob = bytearray(path.read_bytes())
    blob = blob[:len(blob) // 2] if damage == "truncated" else struct.pack("<Q", 2**40) + blob[8:]
    path.write_bytes(bytes(blob))
    message = _error(*run_cli(["eval", "--model", model, "--data", data, "--kernel-backend", "torch"])[::2])
    assert str(path) in message and "not a readable safetensors file" in message


def test_a_full_disk_fails_cleanly(data, tmp_path, monkeypatch):
    """The final adapter write fails (ENOSPC): one line, exit 2, and no summary claiming success;
    the temporary it left is cleared by the next run."""
    from trilora.trainer import run

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(run, "save_adapter", no_space)
    out = tmp_path / "out"
    message = _error(*run_cli(fast_args(out, data, steps=2))[::2])
    assert "No space left on device" in message
    assert not (out / "summary.json").exists() and not (out / "adapter").exists()
    monkeypatch.undo()
    code, _, err = run_cli(fast_args(out, data, steps=2, overwrite=True))
    assert code == 0, err[-2000:]
    assert not list(out.glob(".tmp-*"))


def test_a_malformed_manifest_is_named(data, tmp_path):
    out = tmp_path / "out"
    _unfinished(data, out)
    (out / "checkpoints" / "step-4" / "manifest.json").write_text("[1, 2]")
    message = _error(*run_cli(fast_args(out, data, steps=6, save_every=2, resume=True))[::2])
    assert "manifest.json is malformed" in message


def test_cli_friction(data, tmp_path, capsys):
    """Typos get the command's own error and the closest flag; no abbreviations; --data alone
    does not silently train the demo model; YAML typos get a suggestion; help shows each default once."""
    from trilora.cli import build_parser
    code, _, err = run_cli(["train", "--lrr", "1"])
    assert code == 2 and "trilora train: error: unrecognized arguments: --lrr (did you mean --lr?)" in err
    assert "usage:" not in err
    code, _, err = run_cli(["train", "--max-step", "3", "--data", data, "--model", DEMO_MODEL])
    assert code == 2 and "did you mean --max-steps?" in err
    message = _error(*run_cli(["train", "--data", data, "--output-dir", tmp_path / "o"])[::2])
    assert "--data needs --model" in message and not (tmp_path / "o").exists()
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-4\n")
    message = _error(*run_cli(["train", "--config", tmp_path / "c.yaml", "--model", DEMO_MODEL])[::2])
    assert "learning_rate (did you mean lr?)" in message
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: one per format)" in text and "default: one per format) (default: None)" not in text


def test_console_reports_validation_and_the_weights_kept(data, tmp_path):
    code, out, err = run_cli(fast_args(tmp_path / "out", data, steps=4, eval_every=2))
    assert code == 0, err[-2000:]
    assert "before training ..." in out and "after training ..." in out
    assert "step 2: validation loss" in out + err and "step 4: validation loss" in out + err
    assert "adapter/ holds the weights of step" in out and "the best validation loss" in out
