"""`trilora` / `python -m trilora`: train, eval, merge, generate."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent / "demo" / "demo.yaml"


def _train(args) -> int:
    from .trainer.config import config_from_args
    from .trainer.run import train

    if args.config is None and args.model is None and args.data is None:
        print(f"no --model/--data: running the embedded demo ({DEMO_CONFIG.name})")
        args.config = DEMO_CONFIG
    train(config_from_args(args))
    return 0


def _load_for_inference(args):
    from transformers import AutoTokenizer

    from .lora import load_adapter
    from .trainer.loading import load_model

    model_dir = Path(args.model) if args.model else DEMO_CONFIG.parent / "assets"
    model = load_model(model_dir, quantize=args.quantize, backend=args.kernel_backend)
    if args.adapter:
        load_adapter(model, args.adapter, backend=args.kernel_backend)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def _eval(args) -> int:
    import torch

    from .trainer.config import TrainConfig
    from .trainer.data import label_set, load_records
    from .trainer.run import evaluate_split

    model, tokenizer = _load_for_inference(args)
    records, report = load_records(args.data, None if args.format == "auto" else args.format)
    print(report)
    config = TrainConfig(max_length=args.max_length, batch_size=args.batch_size,
                         eval_max_new_tokens=args.max_new_tokens, template=args.template)
    device = next(model.parameters()).device
    autocast = torch.bfloat16 if device.type == "cuda" else None
    result = evaluate_split(model, tokenizer, records, config, device, autocast, label_set(records) or None)
    text = json.dumps(result, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


def _merge(args) -> int:
    from .lora import load_adapter, save_merged
    from .trainer.loading import load_model

    model = load_model(args.model, quantize=None, backend=args.kernel_backend)
    load_adapter(model, args.adapter, backend=args.kernel_backend)
    save_merged(model, args.output, in_place=True)
    if (Path(args.model) / "tokenizer.json").exists() or (Path(args.model) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(args.model).save_pretrained(args.output)
    print(f"merged model written to {args.output}")
    return 0


def _generate(args) -> int:
    from .trainer.evaluate import generate_completions

    model, tokenizer = _load_for_inference(args)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    device = next(model.parameters()).device
    for prompt, completion in zip(prompts, generate_completions(model, tokenizer, ids, args.max_new_tokens, device)):
        print(f"{prompt}{completion}")
    return 0


BENCH_SCRIPTS = {"dequant": "bench_dequantize.py", "lora": "bench_lora_linear.py",
                 "blocks": "bench_block_kernels.py", "train": "bench_train_step.py"}


def _bench_part(name: str) -> str:
    if name not in BENCH_SCRIPTS:
        raise argparse.ArgumentTypeError(f"unknown benchmark {name!r}: one of {', '.join(BENCH_SCRIPTS)}")
    return name


def _bench(args) -> int:
    import subprocess

    folder = Path(__file__).resolve().parents[1] / "bench"
    if not (folder / "common.py").exists():
        raise FileNotFoundError(f"{folder}: the benchmarks live in trilora's source checkout (bench/), "
                                "which this installation does not have")
    status = 0
    for part in args.parts or list(BENCH_SCRIPTS):
        cmd = [sys.executable, str(folder / BENCH_SCRIPTS[part])]
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--out", args.out] if args.out else []
        print("running", " ".join(cmd[1:]), flush=True)
        status |= subprocess.run(cmd).returncode
    return status


def build_parser() -> argparse.ArgumentParser:
    from .trainer.config import add_arguments

    parser = argparse.ArgumentParser(prog="trilora", description="Fast, exact LoRA / QLoRA fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune (with no --model/--data: the embedded CPU demo)",
                       description="Fine-tune a model: full, LoRA or QLoRA. Settings come from "
                                   "--config (YAML) and are overridden by flags.")
    add_arguments(p)
    p.set_defaults(func=_train)

    def backend_arg(p):
        p.add_argument("--kernel-backend", choices=["auto", "triton", "torch"], default="auto",
                       help="LoRA / 4-bit kernels (default: auto, Triton where it runs)")

    def inference_args(p, adapter_required=False):
        p.add_argument("--model", help="base model directory (default: the demo model)")
        p.add_argument("--adapter", required=adapter_required, help="PEFT adapter directory")
        p.add_argument("--quantize", choices=["nf4", "fp4"], default=None, help="load the base in 4 bits")
        backend_arg(p)

    p = sub.add_parser("eval", help="test-set loss, perplexity, exact match or classification metrics")
    inference_args(p)
    p.add_argument("--data", required=True, help="test file (JSONL/CSV)")
    p.add_argument("--format", default="auto", help="record format (default: detected)")
    p.add_argument("--template", help="prompt template, as in training (default: one per format)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--output", help="write the JSON report here too")
    p.set_defaults(func=_eval)

    p = sub.add_parser("merge", help="fold an adapter into its base and save an HF model directory")
    p.add_argument("--model", required=True, help="base model directory")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory")
    p.add_argument("--output", required=True, help="directory for the merged model")
    backend_arg(p)
    p.set_defaults(func=_merge)

    p = sub.add_parser("generate", help="prompts in (--prompt or stdin lines), completions out")
    inference_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=_generate)

    p = sub.add_parser("bench", help="run the benchmark suite (GPU; --smoke checks the harness on CPU)",
                       description="Runs the scripts in the source checkout's bench/ folder and appends "
                                   "their JSON rows to --out (default bench/results/<device>-<date>.json).")
    p.add_argument("parts", nargs="*", default=[], type=_bench_part,
                   help=f"which benchmarks (default all): {', '.join(BENCH_SCRIPTS)}")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the harness, no timings")
    p.add_argument("--out", help="JSON file to append rows to")
    p.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, TypeError) as err:  # OSError: missing / unreadable files
        print(f"trilora {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
