"""Weights and optimizer state of a fully fine-tuned model under `--fsdp`, each rank its shards.

Why: an adapter's checkpoint is megabytes, so rank 0 writes it whole (`checkpoint.py`). A fully
fine-tuned model's is the whole model plus twice that in AdamW state: gathered on one rank it
is what sharding exists to avoid. Here every rank writes its own shards with PyTorch's
distributed checkpoint (`torch.distributed.checkpoint`, DCP) in safetensors files — its
`HuggingFaceStorageWriter`: one file per rank, each shard's offsets in the file's header, so
nothing is pickled (DCP's default format pickles its index) — into the checkpoint's temp dir,
which `checkpoint.py` then seals as usual (manifest with checksums, fsync, atomic rename by
rank 0). DCP reshards on load: the run resumes on any number of ranks, sharded or not (one
plain process reads it too).

`best/` of such a run is a DCP directory too (no gather at every better validation loss); the
final `model/` is written whole once, gathered parameter by parameter into rank 0's host
memory (`sharding.full_trainable(rank0_cpu=True)`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .outputs import remove, swap_in
from .sharding import local, reshard_all

SHARDED = "sharded"  # the sharded weights' directory inside a checkpoint
GROUPS = "optimizer_groups.json"  # the optimizer's param groups and non-tensor state (rank 0)


def _states(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None, dict]:
    """(flat {name: tensor} of the model's and the optimizer's tensors — DTensors under FSDP —,
    the optimizer's state dict, its non-tensor entries) as DCP's `get_state_dict` gives them
    (keyed by parameter name; an optimizer without state is initialised first)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    reshard_all(model)
    if optimizer is None:
        model_state, optimizer_state = get_model_state_dict(model), None
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
    flat = {f"model.{k}": v for k, v in model_state.items()}
    scalars = {}
    for name, per_param in (optimizer_state or {}).get("state", {}).items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                flat[f"optimizer.{name}.{key}"] = value
            else:
                scalars[f"{name}/{key}"] = value
    return flat, optimizer_state, scalars


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Every rank writes its shards of the model's (and the optimizer's) tensors into
    `directory` as safetensors files (DCP's `HuggingFaceStorageWriter`: one file per rank,
    the shard offsets in its header); rank 0 adds the param groups as JSON. A collective;
    the directory need not exist."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    flat, optimizer_state, scalars = _states(model, optimizer)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True))
    if optimizer_state is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        groups = {"param_groups": optimizer_state["param_groups"], "scalars": scalars}
        (Path(directory) / GROUPS).write_text(json.dumps(groups, default=_json_value))


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load `save_sharded`'s files into `model` (and `optimizer`), resharded to this run's
    ranks; a plain (unsharded) model in one process works too. A collective under FSDP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict
    flat, optimizer_state, _ = _states(model, optimizer)
    dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(directory)))  # in place, into flat's tensors
    model_state = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    if optimizer is None:
        set_model_state_dict(model, model_state)
        return
    saved = json.loads((Path(directory) / GROUPS).read_text())
    optimizer_state["param_groups"] = saved["param_groups"]
    for key, value in saved["scalars"].items():
        name, entry = key.rsplit("/", 1)
        optimizer_state["state"][name][entry] = value
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def _json_value(value):
    if isinstance(value, tuple):
        return list(value)
    if torch.is_tensor(value):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to {GROUPS}")


def write_sharded_dir(model: nn.Module, path: Path) -> None:
    """`outputs.write_dir` for sharded weights: every rank writes into a temp sibling, then
    rank 0 swaps it in (a kill leaves the previous `path`, or nothing half-written)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    main = not dist.is_initialized() or dist.get_rank() == 0
    if main:
        remove(tmp)
    _barrier()
    save_sharded(tmp, model)
    _barrier()
    if main:
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        swap_in(tmp, path)
    _barrier()


def is_sharded_dir(path: Path) -> bool:
    """Whether `path` holds `save_sharded`'s files."""
    return Path(path).is_dir() and any(Path(path).glob("shard-*.safetensors"))


def all_finite(model: nn.Module) -> list[str]:
    """Names of the trainable parameters holding NaN/Inf on any rank, each rank checking its
    own shards (a collective under FSDP: every rank gets the same answer)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    names = [name for name, _ in trainable]
    bad = torch.tensor([0.0 if torch.isfinite(local(p)).all() else 1.0 for _, p in trainable])
    if dist.is_initialized():
        device = next(model.parameters()).device
        bad = bad.to(device)
        dist.all_reduce(bad)
        bad = bad.cpu()
    return [n for n, b in zip(names, bad.tolist()) if b > 0]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


__all__ = ["SHARDED", "all_finite", "is_sharded_dir", "load_sharded", "save_sharded", "write_sharded_dir"]
