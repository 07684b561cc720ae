"""`TrainConfig`: every setting of a run, from a YAML file overridden by command-line flags.

Each field's `help` is the documentation `trilora train --help` prints; the flag is the
field name with dashes (`max_steps` -> `--max-steps`).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

METHODS = ("full", "lora", "qlora")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train
    model: str | None = _f(None, "local HF model directory; default: the embedded demo model")
    method: str = _f("qlora", "full, lora, or qlora (NF4 base + trilora's LoRA layer)")
    data: list[str] | None = _f(None, "training data files (JSONL/CSV); several = multi-task mix. "
                                      "Default: the embedded demo task", nargs="+")
    mix_weights: list[float] | None = _f(None, "sampling weight per --data file (multi-task)", nargs="+")
    data_format: str = _f("auto", "auto, instruction, prompt_completion, chat, text, or classification")
    val_data: str | None = _f(None, "validation file (default: split from --data)")
    test_data: str | None = _f(None, "test file (default: split from --data)")
    split: list[float] = _f((0.8, 0.1, 0.1), "train/validation/test ratios when splitting --data", nargs=3)
    output_dir: str = _f("trilora-out", "where checkpoints, metrics, adapter and summary go")
    # optimisation
    max_steps: int = _f(0, "optimizer steps (0: run --epochs)")
    epochs: float = _f(1.0, "passes over the training data when --max-steps is 0")
    lr: float = _f(2e-4, "peak learning rate")
    batch_size: int = _f(8, "sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    max_length: int = _f(512, "tokens per sequence (longer examples are truncated and counted)")
    packing: bool = _f(False, "pack several examples per sequence (no cross-attention between them)")
    warmup_steps: int = _f(0, "linear warm-up steps")
    scheduler: str = _f("cosine", "cosine, linear or constant decay after warm-up")
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and norms)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    # LoRA
    r: int = _f(16, "LoRA rank")
    alpha: float = _f(32.0, "LoRA alpha (scaling = alpha / r)")
    dropout: float = _f(0.05, "LoRA dropout")
    target_modules: list[str] = _f(("all-linear",), "module names or regexes to adapt", nargs="+")
    use_rslora: bool = _f(False, "rank-stabilised scaling alpha / sqrt(r)")
    quant_type: str = _f("nf4", "4-bit type of the qlora base: nf4 or fp4")
    # evaluation and checkpoints
    eval_every: int = _f(0, "validate every N steps (0: at the end only)")
    save_every: int = _f(0, "checkpoint every N steps (0: only the final adapter)")
    patience: int = _f(0, "stop after N validations without improvement (0: off)")
    eval_max_new_tokens: int = _f(32, "generation length for exact-match evaluation")
    log_every: int = _f(1, "write metrics every N steps")
    seed: int = _f(0, "seed of data order, initialisation and dropout")
    resume: bool = _f(False, "continue from the newest complete checkpoint in --output-dir")
    dtype: str = _f("auto", "compute dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {METHODS}")
        for name in ("batch_size", "grad_accum", "max_length", "r"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "save_every", "patience", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.scheduler not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown scheduler {self.scheduler!r}: cosine, linear or constant")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be nf4 or fp4, got {self.quant_type!r}")
        if self.mix_weights is not None and (self.data is None or len(self.mix_weights) != len(self.data)):
            raise ValueError("--mix-weights needs one weight per --data file")
        self.split = tuple(self.split)
        self.target_modules = tuple(self.target_modules)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    # the settings that must match for --resume to continue a run (not its length or logging)
    RESUME_KEYS = ("model", "method", "data", "mix_weights", "data_format", "split", "lr",
                   "batch_size", "grad_accum", "max_length", "packing", "r", "alpha", "dropout",
                   "target_modules", "use_rslora", "quant_type", "seed", "scheduler", "warmup_steps")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, plus --config; defaults left None so YAML can fill them."""
    parser.add_argument("--config", type=Path, help="YAML file of settings; flags override it")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if f.default is False:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f.metadata["help"] + " (default: off)")
            continue
        cast = float if "float" in kind else int if kind.startswith("int") else str
        parser.add_argument(flag, type=cast, nargs=f.metadata.get("nargs"), default=None,
                            help=f"{f.metadata['help']} (default: {f.default})")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """YAML (if --config) overridden by the flags given; unknown YAML keys are an error."""
    values: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.exists():
            raise FileNotFoundError(f"config file not found: {args.config}")
        loaded = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of settings")
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(k.replace("-", "_") for k in loaded) - known)
        if unknown:
            raise ValueError(f"{args.config}: unknown settings {unknown}")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return TrainConfig(**values)
