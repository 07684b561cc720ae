"""`TrainConfig`: every setting of a run, from a YAML file overridden by command-line flags.

Each field's `help` is the documentation `trilora train --help` prints; the flag is the
field name with dashes (`max_steps` -> `--max-steps`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..kernels.backend import BACKENDS as KERNEL_BACKENDS
from .data import FORMATS

METHODS = ("full", "lora", "qlora")
DTYPES = ("auto", "bfloat16", "float16", "float32")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train
    model: str | None = _f(None, "local HF model directory or .gguf file; default: the embedded demo model")
    method: str = _f("qlora", "full, lora, or qlora (NF4 base + trilora's LoRA layer)")
    data: list[str] | None = _f(None, "training data files (JSONL/CSV); several = multi-task mix. "
                                      "Default: the embedded demo task", nargs="+")
    mix_weights: list[float] | None = _f(None, "sampling weight per --data file (multi-task)", nargs="+")
    task: str = _f("auto", "generate (a causal LM writes the answer), classify (a sequence-classification "
                           "head), tag (a token-classification head, NER); auto: from the data and the model")
    class_weights: str = _f("none", "classify: none, or balanced (each class weighs equally in the loss, "
                                    "against imbalanced data)")
    data_format: str = _f("auto", "auto, alpaca, prompt_completion, chat, text, classification, or tagging")
    template: str | None = _f(None, "prompt template over the record's fields, e.g. 'Q: {question}\\nA:' "
                                    "(\\n, \\t and \\\\ are read as escapes; default: one per format)",
                              parse="escapes")
    val_data: str | None = _f(None, "validation file (default: split from --data)")
    test_data: str | None = _f(None, "test file (default: split from --data)")
    split: list[float] = _f((0.8, 0.1, 0.1), "train, validation[, test] ratios (summing to 1) when "
                                             "splitting --data", nargs="+")
    replay_data: list[str] | None = _f(None, "data of earlier training stages, replayed into this stage "
                                             "against catastrophic forgetting (see --replay)", nargs="+")
    replay: float = _f(0.0, "fraction of this stage's training examples drawn from --replay-data")
    output_dir: str = _f("trilora-out", "where checkpoints, metrics, adapter and summary go")
    # optimisation
    max_steps: int = _f(0, "optimizer steps (0: run --epochs)")
    epochs: float = _f(1.0, "passes over the training data when --max-steps is 0")
    lr: float = _f(2e-4, "peak learning rate")
    batch_size: int = _f(8, "sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    max_length: int | None = _f(None, "tokens per sequence (longer examples are truncated and counted; "
                                      "default: 512, or --context-length when given)")
    packing: bool = _f(False, "pack several examples per sequence (no cross-attention between them)")
    warmup_steps: int = _f(0, "linear warm-up steps")
    scheduler: str = _f("cosine", "cosine, linear or constant decay after warm-up")
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and norms)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    offload_activations: bool = _f(False, "keep the activations saved for backward in host memory (pinned, "
                                          "copied back in backward): with --gradient-checkpointing the GPU "
                                          "holds no layer's activations between forward and backward")
    context_length: int | None = _f(None, "fine-tune for a context of L tokens: beyond the model's "
                                          "max_position_embeddings RoPE is scaled (--rope-scaling), the "
                                          "scaling is saved with the adapter / model; --max-length defaults "
                                          "to L (default: the model's own context)")
    rope_scaling: str | None = _f(None, "RoPE scaling for --context-length beyond the pretrained length: "
                                        "linear, dynamic, yarn or llama3 (default: linear)")
    # LoRA
    r: int = _f(16, "LoRA rank (alias --lora-r: torchrun mistakes a bare --r for its own options)",
                aliases=("--lora-r",))
    alpha: float = _f(32.0, "LoRA alpha (scaling = alpha / r)")
    dropout: float = _f(0.05, "LoRA dropout")
    target_modules: list[str] = _f(("all-linear",), "module names or regexes to adapt", nargs="+")
    use_rslora: bool = _f(False, "rank-stabilised scaling alpha / sqrt(r)")
    dora: bool = _f(False, "DoRA: LoRA plus a trained magnitude per output row (PEFT's use_dora)")
    quant_type: str = _f("nf4", "4-bit type of the qlora base: nf4 or fp4")
    init_adapter: str | None = _f(None, "start from this PEFT adapter (e.g. an earlier stage's) instead of "
                                        "fresh LoRA weights; its r, alpha and targets are used")
    # evaluation and checkpoints
    eval_every: int = _f(0, "validate every N steps (0: at the end only)")
    save_every: int = _f(0, "checkpoint every N steps (0: only the final adapter)")
    patience: int = _f(0, "stop after N validations without improvement (0: off)")
    eval_max_new_tokens: int = _f(32, "generation length for exact-match evaluation")
    eval_original_base: bool = _f(False, "qlora: also score the adapter on the original 16/32-bit weights "
                                         "(what `trilora merge --base-weights original` deploys; loads the "
                                         "model once more at the end)")
    few_shot: int = _f(0, "also score K-shot prompting before training: each test prompt preceded by K examples "
                          "of the training split (drawn per record by --seed, in the chat template when the "
                          "tokenizer has one), the baseline beside zero-shot and the fine-tune (0: off)")
    log_every: int = _f(1, "write metrics every N steps")
    seed: int = _f(0, "seed of data order, initialisation and dropout")
    resume: bool = _f(False, "continue the unfinished run in --output-dir from its newest complete checkpoint")
    overwrite: bool = _f(False, "replace the results of another run in --output-dir (they are kept otherwise)")
    keep_checkpoints: int = _f(3, "checkpoints kept on disk (the newest; the best weights are kept apart in best/)")
    max_skipped_steps: int = _f(0, "steps whose loss or gradients are NaN/Inf that may be skipped before the "
                                   "run stops with an error (0: stop at the first)")
    dtype: str = _f("auto", "compute dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    kernel_backend: str = _f("auto", "LoRA / 4-bit kernels: auto (Triton where it runs, else PyTorch), "
                                     "triton, or torch")
    fsdp: bool = _f(False, "shard the base, the LoRA factors, their gradients and optimizer state over the "
                           "processes torchrun starts (FSDP2; `torchrun --nproc_per_node=N -m trilora train "
                           "... --fsdp`); without it torchrun runs DDP, a full copy per process")
    fused_blocks: str = _f("auto", "swap trilora's fused RMSNorm / attention / MLP / loss modules into "
                                   "Llama, Mistral, Qwen2 and Gemma models (trilora.patch): auto (on a GPU), "
                                   "on, or off")

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {METHODS}")
        if self.context_length is not None and self.context_length <= 0:
            raise ValueError(f"context_length must be positive, got {self.context_length}")
        if self.rope_scaling is not None:
            from .context import ROPE_TYPES
            if self.rope_scaling not in ROPE_TYPES:
                raise ValueError(f"unknown rope_scaling {self.rope_scaling!r}: one of {', '.join(ROPE_TYPES)}")
            if self.context_length is None:
                raise ValueError("--rope-scaling needs --context-length L, the context to fine-tune for")
        if self.max_length is None:
            self.max_length = self.context_length or 512
        elif self.context_length is not None and self.max_length > self.context_length:
            raise ValueError(f"--max-length {self.max_length} exceeds --context-length {self.context_length}: "
                             "a sequence cannot be longer than the context it is trained for")
        for name in ("batch_size", "grad_accum", "max_length", "r", "log_every", "eval_max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "save_every", "patience", "warmup_steps", "max_skipped_steps",
                     "few_shot"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "alpha"):
            if not getattr(self, name) > 0 or math.isinf(getattr(self, name)):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm"):
            if not getattr(self, name) >= 0 or math.isinf(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        if self.max_steps == 0 and (not self.epochs > 0 or math.isinf(self.epochs)):
            raise ValueError(f"epochs must be a finite positive number when max_steps is 0, got {self.epochs}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.scheduler not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown scheduler {self.scheduler!r}: cosine, linear or constant")
        if not 0 <= self.replay < 1:
            raise ValueError(f"replay must be in [0, 1), got {self.replay}")
        if self.replay > 0 and not self.replay_data:
            raise ValueError("--replay needs --replay-data: the earlier stages' data to replay")
        if self.init_adapter is not None and self.method == "full":
            raise ValueError("--init-adapter starts LoRA / QLoRA from an adapter; method 'full' has none")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be nf4 or fp4, got {self.quant_type!r}")
        if self.data_format != "auto" and self.data_format not in FORMATS:
            raise ValueError(f"unknown data_format {self.data_format!r}: auto or one of {', '.join(FORMATS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}: one of {', '.join(DTYPES)}")
        from .tasks import TASKS
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: one of {', '.join(TASKS)}")
        if self.class_weights not in ("none", "balanced"):
            raise ValueError(f"class_weights must be none or balanced, got {self.class_weights!r}")
        if self.fused_blocks not in ("auto", "on", "off"):
            raise ValueError(f"fused_blocks must be auto, on or off, got {self.fused_blocks!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"unknown kernel_backend {self.kernel_backend!r}: one of {', '.join(KERNEL_BACKENDS)}")
        if isinstance(self.data, str):
            self.data = [self.data]
        if self.mix_weights is not None and (self.data is None or len(self.mix_weights) != len(self.data)):
            raise ValueError(f"--mix-weights needs one weight per --data file: got {len(self.mix_weights)} "
                             f"weights for {0 if self.data is None else len(self.data)} files")
        if self.mix_weights is not None and (any(not w >= 0 or math.isinf(w) for w in self.mix_weights)
                                             or sum(self.mix_weights) <= 0):
            raise ValueError(f"--mix-weights must be finite numbers >= 0, not all 0; got {list(self.mix_weights)}")
        self.split = tuple(float(x) for x in self.split)
        if len(self.split) not in (2, 3) or any(not x >= 0 for x in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise ValueError(f"split must be 2 or 3 non-negative ratios (train, validation[, test]) summing "
                             f"to 1, got {list(self.split)}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = tuple(self.target_modules)
        if self.mix_weights is not None:
            self.mix_weights = [float(w) for w in self.mix_weights]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    # the settings that must match for --resume to continue a run (not its length or logging);
    # grad_accum may change with the number of processes, as long as the global batch
    # (batch_size x grad_accum x processes) stays: `checkpoint.resume_point` checks that
    RESUME_KEYS = ("model", "method", "task", "class_weights", "data", "mix_weights", "data_format", "split", "lr",
                   "batch_size", "max_length", "packing", "r", "alpha", "dropout",
                   "target_modules", "use_rslora", "dora", "quant_type", "seed", "scheduler", "warmup_steps",
                   "template", "weight_decay", "max_grad_norm", "val_data", "test_data",
                   "replay_data", "replay", "init_adapter", "context_length", "rope_scaling")


# names users bring from HF TrainingArguments / PEFT, mapped to ours (for "did you mean")
FAMILIAR_NAMES = {"learning_rate": "lr", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_rank": "r",
                  "rank": "r", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
                  "gradient_accumulation_steps": "grad_accum", "max_seq_length": "max_length",
                  "model_name_or_path": "model", "lr_scheduler_type": "scheduler", "warmup": "warmup_steps",
                  "output": "output_dir", "train_file": "data", "dataset": "data"}


def closest_setting(name: str, known) -> str | None:
    """The setting a mistyped or foreign `name` most likely means, or None."""
    import difflib
    key = name.lstrip("-").replace("-", "_")
    if key in FAMILIAR_NAMES:
        return FAMILIAR_NAMES[key]
    close = difflib.get_close_matches(key, list(known), n=1)
    return close[0] if close else None


def unescape(text: str) -> str:
    r"""`\n`, `\t` and `\\` in a command-line value as newline, tab and backslash: a shell
    passes 'Q: {q}\nA:' with a literal backslash-n, which no user means in a prompt."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def _kind(f) -> tuple[type, bool]:
    """(element type, is a list) of a TrainConfig field, from its annotation string."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    cast = bool if kind == "bool" else float if "float" in kind else int if kind.startswith("int") else str
    return cast, kind.startswith("list")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, plus --config; defaults left None so YAML can fill them."""
    parser.add_argument("--config", type=Path, help="YAML file of settings; flags override it")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        cast, _ = _kind(f)
        if cast is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f.metadata["help"] + " (default: off)")
            continue
        default = f.default if not isinstance(f.default, tuple) else " ".join(map(str, f.default))
        text = f.metadata["help"] if "default:" in f.metadata["help"] else f"{f.metadata['help']} (default: {default})"
        if f.metadata.get("parse") == "escapes":
            cast = unescape
        parser.add_argument(flag, *f.metadata.get("aliases", ()), dest=f.name, type=cast,
                            nargs=f.metadata.get("nargs"), default=None, help=text.replace("%", "%%"))


def _coerce(f, value: Any, where: str) -> Any:
    """A YAML value as the field's type: "3e-4" (a string to YAML 1.1) becomes a float, a
    scalar becomes a one-item list; anything else of the wrong type is a clear error."""
    cast, is_list = _kind(f)
    names = {bool: "true/false", float: "number", int: "integer", str: "string"}

    def one(v):
        ok = (isinstance(v, bool) if cast is bool else
              not isinstance(v, (bool, list, dict)) and (cast is not int or not isinstance(v, float)))
        if ok:
            try:
                return cast(v)
            except (TypeError, ValueError):
                pass
        raise ValueError(f"{where}: {f.name} must be {'a list of ' if is_list else ''}{names[cast]}"
                         f"{'s' if is_list else ''}, got {value!r}")
    if value is None:
        return None
    if is_list:
        return [one(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return one(value)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """YAML (if --config) overridden by the flags given; unknown YAML keys are an error."""
    values: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.is_file():
            raise FileNotFoundError(f"config file not found: {args.config}")
        try:
            loaded = yaml.safe_load(args.config.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ValueError(f"{args.config} is not valid YAML{where}: "
                             f"{getattr(err, 'problem', None) or err}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of settings")
        by_name = {f.name: f for f in fields(TrainConfig)}
        unknown = sorted(set(str(k).replace("-", "_") for k in loaded) - set(by_name))
        if unknown:
            hints = [f"{k} (did you mean {close}?)" if (close := closest_setting(k, by_name)) else k for k in unknown]
            raise ValueError(f"{args.config}: unknown settings {unknown}: {'; '.join(hints)}; "
                             f"known: {', '.join(by_name)}")
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            values[name] = _coerce(by_name[name], value, str(args.config))
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return TrainConfig(**values)
