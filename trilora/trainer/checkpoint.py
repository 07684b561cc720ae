"""Checkpoints that survive SIGKILL: written to a temp dir, then renamed into place.

`<output-dir>/checkpoints/step-N/` holds the trainable weights, the optimizer and scheduler
state, the RNG states and the data position — enough that a resumed run ends with the same
weights as an uninterrupted one. Everything is safetensors or JSON (no pickle), and
`manifest.json`, written last, records each file's size and SHA-256 so a corrupt or
truncated checkpoint is refused with a clear error instead of half-loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .config import TrainConfig
from .outputs import fsync_dir

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, truncated, or from another run."""


# ----------------------------------------------------------------------------- state <-> files

def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """`sharding.named_optimizer_state`'s form as safetensors tensors ("<param name>/<key>")
    and JSON (the scalars and the param groups)."""
    tensors, scalars = {}, {}
    for name, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars, "by_name": True}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The optimizer state of a checkpoint: by parameter name ("by_name" in meta), or the
    index-keyed `optimizer.state_dict()` older checkpoints hold."""
    by_name = meta.get("by_name", False)
    state: dict = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        owner, name = key.rsplit("/", 1) if by_name else key.split(".", 1)
        state.setdefault(owner if by_name else int(owner), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"], "by_name": by_name}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """All RNG states: torch (CPU, CUDA) as tensors, python and numpy as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- save / load

def save_checkpoint(output_dir: Path, step: int, write_weights, optimizer_state: dict, scheduler,
                    trainer_state: dict) -> Path:
    """Write `checkpoints/step-<step>/` atomically and return its path.

    `write_weights(dir)` writes the trainable weights (a PEFT adapter, or the full model);
    `optimizer_state` is the optimizer's state by parameter name, whole tensors
    (`sharding.named_optimizer_state`), so the checkpoint fits any number of ranks.
    """
    root, tmp, final = checkpoint_paths(output_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_weights(tmp / "weights")
    return seal_checkpoint(tmp, final, optimizer_state, scheduler, trainer_state)


def checkpoint_paths(output_dir: Path, step: int, shared: bool = False) -> tuple[Path, Path, Path]:
    """(checkpoints root, temp dir, final dir) of step `step`'s checkpoint. The temp dir is
    this process's own, or (`shared`) one name every rank agrees on, for sharded writes."""
    root = Path(output_dir) / "checkpoints"
    suffix = "shared" if shared else str(os.getpid())
    return root, root / f".tmp-step-{step}-{suffix}", root / f"step-{step}"


def seal_checkpoint(tmp: Path, final: Path, optimizer_state: dict | None, scheduler, trainer_state: dict) -> Path:
    """Complete the checkpoint in `tmp` (its weights written): the optimizer state (None: it
    is in the weights' sharded files), scheduler, RNG and trainer state, then the manifest
    of every file with its checksum, fsync, and the atomic rename to `final`."""
    step = int(final.name.split("-", 1)[1])
    opt_meta = None
    if optimizer_state is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, tmp / "rng.safetensors")
    state = {**trainer_state, "step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
             "rng": rng_meta}
    (tmp / "trainer_state.json").write_text(json.dumps(state))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for p in [*files, tmp / MANIFEST]:  # on disk before the rename makes it visible
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)  # the rename itself on disk too
    return final


def checkpoints(output_dir: Path) -> list[Path]:
    """The `step-N` checkpoints, oldest first (temp dirs of interrupted writes are ignored)."""
    root = Path(output_dir) / "checkpoints"
    steps = [(int(p.name.split("-", 1)[1]), p) for p in root.glob("step-*")
             if p.is_dir() and p.name.split("-", 1)[1].isdigit()] if root.exists() else []
    return [p for _, p in sorted(steps)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest `step-N` checkpoint, or None."""
    found = checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (the best weights live apart, in best/)."""
    for path in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path)


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless every file of the manifest is present and intact."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{path}: no {MANIFEST}: the checkpoint is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path} is corrupt: {err}") from None
    if not isinstance(manifest, dict) or not all(
            isinstance(f, dict) and isinstance(f.get("bytes"), int) and isinstance(f.get("sha256"), str)
            for f in manifest.values()):
        raise CheckpointError(f"{manifest_path} is malformed: expected {{file: {{bytes, sha256}}}}")
    for name, facts in manifest.items():
        file = Path(path) / name
        if not file.exists():
            raise CheckpointError(f"{path}: {name} is missing")
        if file.stat().st_size != facts["bytes"]:
            raise CheckpointError(f"{path}: {name} is truncated ({file.stat().st_size} of {facts['bytes']} bytes)")
        if _sha256(file) != facts["sha256"]:
            raise CheckpointError(f"{path}: {name} is corrupt (checksum mismatch)")


def load_checkpoint(path: Path, load_optimizer_state, scheduler) -> dict:
    """Verify `path`, restore optimizer (through `load_optimizer_state(state)`, given
    `_unflatten_optimizer`'s form), scheduler and RNG states; return the trainer state.

    The weights (`path / "weights"`, or the sharded weights and optimizer state of
    `sharded_checkpoint` in `path / "sharded"`) are the caller's to load.
    """
    verify_checkpoint(path)
    state = json.loads((Path(path) / "trainer_state.json").read_text())
    optimizer_meta = state.pop("optimizer")
    if optimizer_meta is not None:  # else it sits with the sharded weights (`sharded_checkpoint`)
        load_optimizer_state(_unflatten_optimizer(load_file(Path(path) / "optimizer.safetensors"), optimizer_meta))
    scheduler.load_state_dict(state.pop("scheduler"))
    set_rng_state(load_file(Path(path) / "rng.safetensors"), state.pop("rng"))
    return state


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a torn last line (a write cut short) is dropped, a broken
    line before the last is an error naming the file and line."""
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropped its last line, cut short by an interrupted write")
                break
            raise CheckpointError(f"{path}, line {i + 1}: not a JSON record ({err}); fix or remove the line") from None
    return records


def resume_point(output_dir: Path, config: TrainConfig) -> Path | None:
    """The newest checkpoint in `output_dir`, verified intact and made with `config`'s settings
    (those in `TrainConfig.RESUME_KEYS`); None when there is none. Raises CheckpointError."""
    path = latest_checkpoint(output_dir)
    if path is None:
        return None
    verify_checkpoint(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        saved = state["config"]
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{path / 'trainer_state.json'} is not a trilora trainer state: {err}") from None
    now = config.to_dict()
    changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in TrainConfig.RESUME_KEYS if saved.get(k) != now.get(k)]
    # the global batch may be split over another number of processes (a resume on more or fewer GPUs)
    world = dist.get_world_size() if dist.is_initialized() else 1
    saved_world, saved_accum = state.get("world_size", 1), saved.get("grad_accum", now["grad_accum"])
    per_step = saved_accum * saved_world
    if now["grad_accum"] * world != per_step:
        fix = (f"--grad-accum {per_step // world}" if per_step % world == 0 else
               f"a number of processes that divides {per_step}")
        changed.append(f"micro-batches per step (grad_accum x processes): {saved_accum} x {saved_world} -> "
                       f"{now['grad_accum']} x {world}, keep {per_step} with {fix}")
    if changed:
        raise CheckpointError(f"cannot resume from {path}: it was made with different settings "
                              f"({'; '.join(changed)}); use the same settings, or another --output-dir")
    return path
