"""`--fsdp`: the model sharded over the ranks with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Why FSDP2: it shards each parameter on its own (a DTensor, dim 0 split over the ranks), so the
packed uint8 4-bit weights shard as they are, beside fp32 LoRA factors — no flattening of mixed
dtypes into one buffer, so no bitsandbytes-style `quant_storage` trick. Every decoder layer
(HF's `_no_split_modules` classes) is one FSDP unit, all-gathered just before its forward and
freed after; the root holds the rest (embeddings, norm, head). Each rank keeps 1/N of the base
and of the LoRA factors, gradients and AdamW state.

The trainer's data path is unchanged: every rank draws the step's world × grad_accum
micro-batches and keeps its share, and the loss is weighted by the step's trained tokens times
the world size, which FSDP's averaging reduce-scatter divides back out — so N ranks take the
steps one process takes with the same global batch.

What reads or writes the trainable weights (adapter files, checkpoints, the finite check)
works on full tensors: `full_trainable(model)` all-gathers the trainable parameters on every
rank (small: LoRA factors) and writes any change back into the shards on exit, and
`named_optimizer_state` / `load_named_optimizer_state` keep the optimizer state by parameter
name as full tensors. A checkpoint therefore holds no trace of the world size: a run resumes
on any number of ranks, sharded or not. The quant state's small tables (absmax: 1/32 of the
packed bytes with double quantization) are frozen parameters under FSDP and shard too; the
remaining tables (the 16-entry code, the nested statistics: 1/256 of absmax) are replicated.
"""
from __future__ import annotations

import contextlib
import gc
import os

import torch
import torch.distributed as dist
import torch.nn as nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed
    DTensor = distribute_tensor = None


@contextlib.contextmanager
def process_group(distributed: bool):
    """The default process group of a run under torchrun: made here when `distributed` and
    none exists yet (nccl with CUDA, else gloo), and destroyed when the run ends, as torch asks
    of every process, after a collection frees the model whose DDP / FSDP state holds it. A
    gloo group left to the interpreter's exit can abort a finished process ("terminate called
    without an active exception", exit -6): 9 of 40 bare two-process gloo scripts that left it
    so; `bench_fsdp.py`, which destroyed it while its model still held it, 3 of 26 (15 trainer
    runs under torchrun did not show it)."""
    own = distributed and not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        yield
    finally:
        if own:
            gc.collect()
            dist.destroy_process_group()


def check_can_shard() -> None:
    """Raise ValueError when `--fsdp` cannot run in this process (not under torchrun, no backend)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise ValueError("--fsdp shards the model over the processes torchrun starts: run "
                         "`torchrun --nproc_per_node=N -m trilora train ... --fsdp` (several nodes: torchrun's "
                         "--nnodes / --rdzv-endpoint flags)")
    if not dist.is_available() or DTensor is None:
        raise ValueError("--fsdp needs a torch built with torch.distributed (this one has none)")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP wraps one by one: those of HF's `_no_split_modules` classes (the decoder
    / encoder layers), outermost only. Raises ValueError when the model names none."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if type(module).__name__ in names:
            found.append(module)
            inside.append(name)
    if not found:
        raise ValueError(f"--fsdp wraps each decoder layer, but {type(model).__name__} names no layer class "
                         f"(_no_split_modules = {sorted(names)}) that it contains")
    return found


def shard_model(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """`fully_shard` every decoder layer, then the root, over all ranks; returns the model
    (the same object, now an FSDPModule whose parameters are DTensors). The 4-bit layers'
    absmax tables become frozen parameters first, so they shard with the packed weights.

    A model built in host memory moves to `device` one unit at a time (FSDP moves a unit's
    parameters, then keeps this rank's shard); the quant states' small tables follow. A
    `meta` skeleton is allocated on `device` (`to_empty`: this rank's shards only, contents
    undefined until a loader fills them)."""
    from torch.distributed.fsdp import fully_shard

    from ..quant import Linear4bit

    four_bit = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for module in four_bit:
        module.absmax_as_parameter()
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    if any(p.is_meta for p in model.parameters()):
        ties = _tied(model)
        model.to_empty(device=device or "cpu")
        for (module, leaf), *others in ties:  # to_empty allocates each module's tensors apart
            for other, other_leaf in others:
                other._parameters[other_leaf] = module._parameters[leaf]
    else:
        for module in four_bit:
            module.move_quant_tables(device if device is not None else module.weight.device)
    # FSDP picks its root at the first forward; the fused evaluation loss calls the backbone
    # before any root forward, which would make layer 0 a root: settle the root now
    model._get_fsdp_state()._lazy_init()
    return model


def _tied(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """The (module, name) slots of every parameter held under more than one name (tied
    embeddings)."""
    slots: dict[int, list] = {}
    for module in model.modules():
        for leaf, p in module._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append((module, leaf))
    return [group for group in slots.values() if len(group) > 1]


def reshard_all(model: nn.Module) -> None:
    """Every FSDP unit back to its shards (FSDP leaves the root's parameters gathered after a
    forward without backward, e.g. evaluation), so the registered parameters are the DTensors."""
    for module in model.modules():
        if is_fsdp_module(module):
            module.reshard()


def is_fsdp_module(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def bytes_per_rank(model: nn.Module) -> tuple[int, int]:
    """(bytes of this rank's parameter shards, bytes of all parameters)."""
    reshard_all(model)
    local = total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        local += (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
    return local, total


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (a collective: every rank must call it), else `t`."""
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writes reach the shard), else `t`."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def local_part(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of the whole tensor `value`, laid out as `like` (a DTensor: its
    shard's rows; else all of it), in `like`'s dtype and device. No communication."""
    return local(_shard_like(value, like))


def _shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (the whole tensor, the same on every rank) laid out as `like`: a DTensor with
    its placements (this rank's part, no communication), or `value` itself."""
    if DTensor is not None and isinstance(like, DTensor):
        return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)
    return value.to(like.device)


@contextlib.contextmanager
def full_trainable(model: nn.Module, rank0_cpu: bool = False):
    """Within the block the trainable parameters are whole tensors on every rank (the frozen
    base stays sharded): adapter files can be written and read, weights checked. Changes made
    within are written back into the shards. Every rank must enter (the gather is a
    collective); outside FSDP this does nothing.

    rank0_cpu: for a fully fine-tuned model, whose trainable parameters are the whole model:
    they are gathered one at a time into host memory of rank 0 only (the other ranks keep
    their shards and hold nothing more), for rank 0 to write them. Read-only: changes are not
    written back."""
    if not any(is_fsdp_module(m) for m in model.modules()):
        yield
        return
    reshard_all(model)  # a gathered root parameter is a transient copy: writes to it would be lost
    main = not dist.is_initialized() or dist.get_rank() == 0
    whole: dict[int, nn.Parameter] = {}  # one whole copy per parameter, however often it is tied
    gathered_ids, swapped = set(), []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and isinstance(p, DTensor):
                if id(p) not in gathered_ids:  # the same sequence of collectives on every rank
                    gathered_ids.add(id(p))
                    gathered = p.full_tensor().detach()
                    if main or not rank0_cpu:
                        whole[id(p)] = nn.Parameter(gathered.cpu() if rank0_cpu else gathered.clone(),
                                                    requires_grad=True)
                    del gathered
                if id(p) in whole:
                    module._parameters[name] = whole[id(p)]
                    swapped.append((module, name, p))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, p in swapped:
                if not rank0_cpu:
                    p.to_local().copy_(_shard_like(whole[id(p)].detach(), p).to_local())
                module._parameters[name] = p


@contextlib.contextmanager
def root_unsharded(model: nn.Module):
    """Within the block the root FSDP unit's own parameters (embeddings, final norm, head) are
    whole, so code may call the backbone and read the head directly (the fused evaluation
    loss) instead of the model's forward; the layers still gather themselves. Outside FSDP
    this does nothing."""
    if not is_fsdp_module(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


# ----------------------------------------------------------------------------- optimizer state

def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name, as whole CPU tensors: {"state": {name:
    {key: value}}, "param_groups": [{..., "params": [names]}]}. A collective under FSDP."""
    reshard_all(model)  # the registered parameters are then the ones the optimizer holds
    names = {id(p): n for n, p in model.named_parameters()}
    state, groups = {}, []
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            per = optimizer.state.get(p, {})
            state[names[id(p)]] = {k: (full(v).detach().cpu().clone() if torch.is_tensor(v) else v)
                                   for k, v in sorted(per.items())}
    return {"state": state, "param_groups": groups}


def load_named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load `named_optimizer_state`'s form into `optimizer` of `model`, sharded or not, on any
    number of ranks (each rank keeps its part). Raises ValueError when the saved state and
    the model's optimizer cover different parameters."""
    reshard_all(model)
    params = {n: p for n, p in model.named_parameters()}
    own = [[n for n in g["params"]] for g in saved["param_groups"]]
    name_of = {id(p): n for n, p in params.items()}
    live_names = [[name_of.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups]
    if own != live_names:
        raise ValueError(f"the checkpoint's optimizer covers other parameters than this model trains "
                         f"({sum(map(len, own))} saved, {sum(map(len, live_names))} now)")
    state, index = {}, 0
    for group in live_names:
        for name in group:
            like = params[name]
            entries = {}
            for key, value in saved["state"].get(name, {}).items():
                if torch.is_tensor(value) and value.shape == like.shape:
                    entries[key] = _shard_like(value, like)
                else:
                    entries[key] = value
            if entries:
                state[index] = entries
            index += 1
    groups, index = [], 0
    for group, names in zip(saved["param_groups"], own):
        groups.append({**group, "params": list(range(index, index + len(names)))})
        index += len(names)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


__all__ = ["bytes_per_rank", "check_can_shard", "decoder_layers", "full", "full_trainable", "root_unsharded",
           "is_fsdp_module", "load_named_optimizer_state", "local", "local_part", "named_optimizer_state", "reshard_all", "shard_model"]
