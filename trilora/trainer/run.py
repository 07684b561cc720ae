"""`train(config)`: data -> model (full / LoRA / QLoRA) -> training -> test-set evaluation -> summary.

The whole path a practitioner walks, in order; each step is a function of its own module.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..lora import SEQ_CLS_HEADS, LoraConfig, add_lora, load_adapter, load_adapter_weights, rank_excess, save_adapter
from .checkpoint import latest_checkpoint
from .context import check_lengths, context_settings, describe
from .config import TrainConfig
from .data import label_set
from .data_batch import BatchIterator
from .data_mix import Splits, load_splits, mix, stages
from .tasks import (PEFT_TASK_TYPES, class_weights, head_config, label_list, model_class, resolve_task)
from .evaluate import (evaluate_split, loss_batches, pad_id,
                       primary_metric_name, task_dataset)
from .finish import finish, sharded_bytes
from .fewshot import check_few_shot, evaluate_few_shot
from .sharded_checkpoint import is_sharded_dir, load_sharded as load_sharded_weights
from .sharded_loading import load_sharded
from .sharding import check_can_shard, full_trainable, process_group, shard_model
from .loading import check_model_dir, load_model, load_tokenizer
from .checkpoint import resume_point
from .loop import Trainer
from .outputs import RunLock, claim

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device_and_dtype(config: TrainConfig):
    if dist.is_initialized():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
            else torch.device("cpu")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif config.dtype in names:
        dtype = names[config.dtype]
    else:
        raise ValueError(f"unknown dtype {config.dtype!r}: auto, bfloat16, float16 or float32")
    return device, dtype


# ----------------------------------------------------------------------------- data

def prepare_records(config: TrainConfig) -> Splits:
    """(train, validation, test) records; cleaning reports and counts are printed."""
    fmt = None if config.data_format == "auto" else config.data_format
    if config.data is None:
        from ..demo.task import demo_dataset

        sources = [demo_dataset()]  # deterministic in every process (a resumed run, each DDP rank)
    else:
        sources = config.data
    if len(sources) == 1:
        splits, reports = load_splits(sources[0], config.val_data, config.test_data,
                                      ratios=config.split, seed=config.seed, format=fmt)
    else:  # multi-task: split each dataset alone, mix the training parts by weight
        if config.val_data or config.test_data:
            raise ValueError("--val-data/--test-data take one dataset; with several --data files "
                             "each is split by --split")
        parts, reports = {}, {}
        for source in sources:
            parts[str(source)], r = load_splits(source, ratios=config.split, seed=config.seed, format=fmt)
            reports[str(source)] = r["train"]
        weights = dict(zip(parts, config.mix_weights or [1.0] * len(parts)))
        train = mix({k: s.train for k, s in parts.items()}, weights, seed=config.seed)
        splits = Splits(train, [r for s in parts.values() for r in s.validation],
                        [r for s in parts.values() for r in s.test])
    if config.replay_data and config.replay > 0:  # a later stage: earlier stages' data replayed
        earlier = []
        for source in config.replay_data:
            s, r = load_splits(source, ratios=config.split, seed=config.seed, format=fmt)
            earlier, reports[f"replay {source}"] = earlier + s.train, r["train"]
        train = stages([earlier, splits.train], replay=config.replay, seed=config.seed)[1]
        if is_main():
            print(f"replay: {len(train) - len(splits.train)} of {len(train)} training examples "
                  f"from earlier stages ({', '.join(config.replay_data)})")
        splits = Splits(train, splits.validation, splits.test)
    if is_main():
        for report in reports.values():
            print(report)
        print(splits)
    return splits


def data_fingerprint(records) -> str:
    """SHA-256 of the training examples (their fields, in order): a resumed run must train on the same data."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.format, r.data], sort_keys=True, default=str).encode())
    return h.hexdigest()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


# ----------------------------------------------------------------------------- model

def build_model(config: TrainConfig, model_dir: Path, device, dtype, task: str = "generate", head: dict | None = None,
                config_overrides: dict | None = None):
    """The model to train: full (every weight), LoRA on a 16/32-bit base, or QLoRA on NF4/FP4;
    a causal LM, or a classification / tagging model with a new head (`head`: its config).

    With --fsdp the model comes sharded over the ranks. A causal LM is built on the meta
    device, adapted and sharded there, then each rank reads only its shards from the
    checkpoint (`sharded_loading.load_sharded`): no rank ever holds the whole model. A model
    that needs new weights initialised (a task head), an adapter to continue or a GGUF file
    is built in host memory first, then sharded (`sharding.shard_model`), and says so."""
    quantize = config.quant_type if config.method == "qlora" else None
    overrides = config_overrides  # --context-length: RoPE scaling set before the build (`context_settings`)
    if overrides is None:
        overrides, _ = context_settings(config, model_dir)
    adapt = functools.partial(_adapt, config, model_dir=model_dir, task=task, device=device)
    host_reason = _host_build_reason(config, model_dir, task) if config.fsdp else None
    if config.fsdp and host_reason is None:
        model = load_sharded(model_dir, adapt, device, quantize=quantize, dtype=dtype, backend=config.kernel_backend,
                             model_class=model_class(task), head=head, config_overrides=overrides)
        _note_quantized(model, quantize, model_dir)
        return model
    if host_reason and is_main():
        print(f"--fsdp: {host_reason}, so the model is built whole in host memory before it is sharded")
    load_device = torch.device("cpu") if config.fsdp else device
    model = load_model(model_dir, quantize=quantize, dtype=dtype, device=load_device, backend=config.kernel_backend,
                       model_class=model_class(task), head=head, seed=config.seed, config_overrides=overrides)
    if is_main() and getattr(model, "newly_initialised", None):
        print(f"newly initialised (seed {config.seed}), trained in full: {', '.join(model.newly_initialised)}")
    _note_quantized(model, quantize, model_dir)
    adapt(model)
    if config.fsdp:
        shard_model(model, device)  # each rank keeps 1/N of every parameter, on its device, from here on
    return model


def _host_build_reason(config: TrainConfig, model_dir: Path, task: str) -> str | None:
    """Why --fsdp cannot build this model on the meta device, or None when it can."""
    from ..gguf_io import is_gguf
    if is_gguf(model_dir):
        return "a GGUF file is read whole"
    if task != "generate":
        return f"--task {task} initialises a new head"
    if config.init_adapter is not None:
        return "--init-adapter continues an adapter read from files"
    return None


def _note_quantized(model, quantize, model_dir) -> None:
    if not quantize:
        return
    from ..quant import Linear4bit
    n = sum(isinstance(m, Linear4bit) for m in model.modules())
    model.quantized_layers = n
    if n == 0:
        warnings.warn(f"--method qlora quantized no layer of {model_dir} (only nn.Linear layers are; "
                      f"{type(model).__name__} has none): this run is plain LoRA on a 16/32-bit base",
                      RuntimeWarning, stacklevel=3)


def _adapt(config: TrainConfig, model, model_dir: Path, task: str, device) -> None:
    """Make `model` (loaded, or a meta skeleton) the one to train: every weight trainable, an
    adapter continued or a new one added; fused blocks, activation checkpointing. Reads no
    weight, except to continue an adapter."""
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif config.init_adapter is not None:  # continue an earlier stage's adapter
        load_adapter(model, config.init_adapter, backend=config.kernel_backend, is_trainable=True)
    else:
        # a newly initialised module other than the head (a bare encoder's pooler) is random: it
        # must train in full and travel with the adapter, or the adapter only fits this init
        new = sorted({n.rpartition(".")[0] for n in getattr(model, "newly_initialised", [])
                      if n.split(".")[0] not in SEQ_CLS_HEADS})
        lora = LoraConfig(r=config.r, alpha=config.alpha, dropout=config.dropout,
                          target_modules=_targets(config.target_modules), use_rslora=config.use_rslora,
                          use_dora=config.dora,
                          base_model_name_or_path=str(model_dir), task_type=PEFT_TASK_TYPES[task],
                          modules_to_save=new or None)
        _check_rank(model, lora)
        add_lora(model, lora, backend=config.kernel_backend)
    if config.fused_blocks == "on" or (config.fused_blocks == "auto" and device.type == "cuda"):
        from ..patching import patch
        report = patch(model, backend=config.kernel_backend, warn=False)
        if is_main():
            print(report)  # once: it lists what was skipped too
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def _targets(target_modules):
    targets = list(target_modules)
    return targets[0] if targets == ["all-linear"] else targets


def _check_rank(model, lora: LoraConfig) -> None:
    """The trainer refuses what add_lora only warns about (the rule is `rank_excess`): a rank
    above min(in, out) of an adapted layer adds parameters but no expressiveness, almost
    surely a mistake on the command line (unknown target names raise here too)."""
    excess = rank_excess(model, lora)
    if excess:
        name, dim = excess[0]
        raise ValueError(f"rank too large: r={lora.r} exceeds min(in, out) = {dim} of the adapted "
                         f"layer {name!r}; use --r {dim} or less")


def weight_io(model, config: TrainConfig):
    """(write(dir), read(dir)) of the trainable weights: a PEFT adapter, or the full model."""
    if config.method == "full":
        from safetensors.torch import load_model as load_into, save_model

        def write(path: Path) -> None:  # save_model / load_model handle tied (shared) tensors
            path.mkdir(parents=True, exist_ok=True)
            save_model(model, str(path / "model.safetensors"))

        def read(path: Path) -> None:
            load_into(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
        return write, read

    def write(path: Path) -> None:
        save_adapter(model, path)

    def read(path: Path) -> None:
        load_adapter_weights(model, path)
    return write, read


# ----------------------------------------------------------------------------- evaluation

# ----------------------------------------------------------------------------- the run

def train(config: TrainConfig) -> dict:
    """Run the whole fine-tune; returns (and writes to <output-dir>/summary.json) the summary."""
    if config.fsdp:
        check_can_shard()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or config.fsdp
    out = Path(config.output_dir)
    with process_group(distributed), _owned(out, config):
        return _train(config, out)


@contextlib.contextmanager
def _owned(out: Path, config: TrainConfig):
    """The output directory, locked for this run (rank 0) and checked before anything is loaded:
    another run's results are refused unless --resume/--overwrite says what to do. A directory
    this run created and left empty (it failed early) is removed again."""
    created = not out.exists()
    lock = RunLock(out).acquire() if is_main() else None
    try:
        if is_main():
            claim(out, config.resume, config.overwrite, latest_checkpoint(out) is not None)
        if config.resume:
            resume_point(out, config)  # a corrupt checkpoint or other settings: CheckpointError now
        yield
    finally:
        if lock is not None:
            lock.release()
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()


def _train(config: TrainConfig, out: Path) -> dict:

    seed_everything(config.seed)
    device, dtype = resolve_device_and_dtype(config)
    autocast_dtype = dtype if device.type == "cuda" and dtype != torch.float32 else None
    model_dir = Path(config.model) if config.model else DEMO_DIR / "assets"
    check_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir)

    splits = prepare_records(config)
    if not splits.test:
        raise ValueError("no test records: give --test-data or a --split with a test share")
    task, note = resolve_task(config.task, splits.train + splits.test, _model_config(model_dir))
    if note and is_main():
        print(note)
    check_few_shot(config.few_shot, splits.test, len(splits.train), task, "the training split")  # before loading
    if task == "tag":  # words come pre-split: a byte-level BPE needs its prefix space
        tokenizer = load_tokenizer(model_dir, pre_split_words=True)
    classes = label_list(splits.train + splits.validation + splits.test, task)
    head = head_config(classes, tokenizer) if task != "generate" else None
    label2id = head["label2id"] if head else None
    if task != "generate" and config.packing:
        raise ValueError(f"--packing joins sequences for a causal LM; --task {task} trains on one sequence a row")
    train_set, report = task_dataset(splits.train, tokenizer, config, task, label2id)
    if is_main():
        print(report)
    overrides, context = context_settings(config, model_dir)
    check_lengths(max(train_set.lengths, default=0), context, config.max_length, str(model_dir))
    if is_main() and (config.context_length is not None or overrides):
        print(describe(overrides, context))
    train_batches = BatchIterator(train_set, config.batch_size, pad_token_id=pad_id(tokenizer),
                                  mode="pack" if config.packing else "pad", max_length=config.max_length,
                                  seed=config.seed)
    val_batches = (loss_batches(splits.validation, tokenizer, config, task, label2id)
                   if splits.validation else None)

    model = build_model(config, model_dir, device, dtype, task, head, overrides)  # with --fsdp: sharded
    if is_main():
        from ..lora import trainable_summary
        print(trainable_summary(model) if config.method != "full" else
              f"full fine-tuning: {sum(p.numel() for p in model.parameters()):,} parameters")
    labels = (label_set(splits.train + splits.test) or None) if task == "generate" else None
    metric, higher = primary_metric_name(splits.test, task)
    weights = None
    if config.class_weights == "balanced":
        if task != "classify":
            raise ValueError("--class-weights balanced weighs the classes of --task classify")
        weights = class_weights(splits.train, classes)
        if is_main():
            print("class weights: " + ", ".join(f"{c} {w:.3g}" for c, w in zip(classes, weights.tolist())))
    if is_main():
        print(f"evaluating the test split ({len(splits.test)} records) before training ...", flush=True)
    before = evaluate_split(model, tokenizer, splits.test, config, device, autocast_dtype, labels, task)
    few_shot = None
    if config.few_shot:  # the K-shot baseline, its shots from the training split only
        if is_main():
            print(f"evaluating {config.few_shot}-shot prompting on the test split (shots from the training "
                  "split) ...", flush=True)
        few_shot, shots = evaluate_few_shot(model, tokenizer, splits.test, splits.train, config, device,
                                            config.few_shot, config.seed, labels)
        if is_main():
            print(shots)

    write, read = weight_io(model, config)
    trainer_model = model
    if dist.is_initialized() and not config.fsdp:
        trainer_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    trainer = Trainer(trainer_model, config, train_batches, val_batches, device, write, read, autocast_dtype,
                      data_fingerprint=data_fingerprint(splits.train), task=task, class_weights=weights)
    resumed = trainer.resume() if config.resume else False
    result = trainer.train()
    sharded_full = config.fsdp and config.method == "full"  # best/ and checkpoints hold shards (DCP)
    if result["best"]["step"] and (out / "best").exists():  # the deliverable is the best validated weights
        if is_sharded_dir(out / "best"):  # written shard by shard, maybe by another number of ranks
            load_sharded_weights(out / "best", model)
        else:
            with full_trainable(model):
                read(out / "best")
    if is_main():
        print(f"evaluating the test split ({len(splits.test)} records) after training ...", flush=True)
    after = evaluate_split(model, tokenizer, splits.test, config, device, autocast_dtype, labels, task)

    summary = None
    sharded = sharded_bytes(model) if config.fsdp else None  # every rank: a gather
    # under FSDP: the adapter whole on every rank, to check and write; a fully fine-tuned
    # model gathered parameter by parameter into rank 0's host memory only
    with full_trainable(model, rank0_cpu=sharded_full):
        if is_main():
            summary = finish(config, model, trainer, result, out, tokenizer, splits, before, after, metric, higher,
                              classes, task, head, labels, device, dtype, autocast_dtype, model_dir, resumed, write,
                              sharded, few_shot=few_shot)
    if dist.is_initialized():
        dist.barrier()
    return summary


def _model_config(model_dir: Path):
    """config.json of a model directory (a GGUF file: its causal LM's config)."""
    from transformers import AutoConfig

    from ..gguf_io import is_gguf
    if is_gguf(model_dir):
        from types import SimpleNamespace
        return SimpleNamespace(model_type="gguf", architectures=["GGUFForCausalLM"])
    return AutoConfig.from_pretrained(model_dir)
