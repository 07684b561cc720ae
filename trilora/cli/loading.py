"""What eval, generate, predict and merge load: the base model (--model, or the embedded demo),
its 4-bit format (as the adapter was trained, unless --quantize says otherwise), the task and
head the adapter or checkpoint records, and the adapter on top."""
from __future__ import annotations

import sys
from pathlib import Path

# trilora/demo/demo.yaml: this file sits one level below the trilora package
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "demo" / "demo.yaml"


def model_dir(args) -> Path:
    """--model, or the demo model (said on stderr, so a missing --model is never silent)."""
    if args.model:
        return Path(args.model)
    print(f"no --model: using the embedded demo model ({DEMO_CONFIG.parent / 'assets'})", file=sys.stderr)
    return DEMO_CONFIG.parent / "assets"


def trained_quantization(adapter) -> dict | None:
    """The 4-bit format the adapter at `adapter` was trained against (None: a 16/32-bit base)."""
    from ..lora import adapter_base_quantization

    return adapter_base_quantization(adapter) if adapter else None


def trained_base_config(adapter) -> dict:
    """The config entries (RoPE scaling of `--context-length`) the adapter's base was trained
    with: applied to the base it is loaded on, or its positions would silently mean other things."""
    from ..lora import adapter_base_config

    found = adapter_base_config(adapter) if adapter else {}
    if found:
        print(f"the adapter was trained with the base's config changed ({', '.join(sorted(found))}): applied",
              file=sys.stderr)
    return found


def task_of(model_dir: Path, adapter, tokenizer) -> tuple[str, dict | None]:
    """(task, head config) of what is loaded: an adapter's PEFT task type and recorded classes,
    or a saved model's architecture (a fine-tuned classifier's config.json has its labels)."""
    from ..gguf_io import is_gguf
    from ..trainer.tasks import TASK_OF_PEFT_TYPE, head_config, task_of_model

    if adapter:
        from ..lora import adapter_labels, read_adapter
        config, _ = read_adapter(adapter)
        task = TASK_OF_PEFT_TYPE.get(config.task_type, "generate")
        labels = adapter_labels(adapter)
        if task != "generate" and not labels:
            raise ValueError(f"{adapter}: a {config.task_type} adapter without its classes (saved by PEFT?): "
                             "trilora needs them to rebuild the head")
        return task, head_config(labels, tokenizer) if task != "generate" else None
    if is_gguf(model_dir):
        return "generate", None
    from transformers import AutoConfig
    return task_of_model(AutoConfig.from_pretrained(model_dir)) or "generate", None


def load_kwargs(quant: dict | None) -> dict:
    """`load_model`'s quantization arguments for a recorded 4-bit format (None: unquantized)."""
    if quant is None:
        return {"quantize": None}
    return {"quantize": quant["quant_type"],
            **{k: quant[k] for k in ("blocksize", "double_quant") if k in quant}}


def load_for_inference(args):
    """The base as the adapter was trained on it (its 4-bit format, recorded in the adapter),
    unless --quantize says otherwise; the adapter on top; the task's model class. Returns
    (model, tokenizer, task)."""
    from ..lora import load_adapter
    from ..trainer.loading import load_model, load_tokenizer
    from ..trainer.tasks import model_class

    base = model_dir(args)
    tokenizer = load_tokenizer(base)
    task, head = task_of(base, args.adapter, tokenizer)
    if task == "tag":
        tokenizer = load_tokenizer(base, pre_split_words=True)
    trained = trained_quantization(args.adapter)
    if args.quantize is None and trained is not None:
        print(f"--quantize not given: the base is quantized to {trained['quant_type']} (blocksize "
              f"{trained['blocksize']}), as the adapter was trained; --quantize none uses the original weights",
              file=sys.stderr)
        quant = trained
    elif args.quantize in (None, "none"):
        quant = None
    else:
        quant = {"quant_type": args.quantize, **({k: trained[k] for k in ("blocksize", "double_quant")}
                                                 if trained and trained["quant_type"] == args.quantize else {})}
    model = load_model(base, backend=args.kernel_backend, model_class=model_class(task), head=head,
                       config_overrides=trained_base_config(args.adapter), **load_kwargs(quant))
    if args.adapter:
        load_adapter(model, args.adapter, backend=args.kernel_backend)
    return model.eval(), tokenizer, task
