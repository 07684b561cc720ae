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
    config = config_from_args(args)
    if config.data is not None and config.model is None:
        raise ValueError("--data needs --model, the base model to fine-tune (the embedded demo model only "
                         "serves the demo task; pass --model trilora/demo/assets to train it anyway)")
    train(config)
    return 0


def _model_dir(args) -> Path:
    """--model, or the demo model (said on stderr, so a missing --model is never silent)."""
    if args.model:
        return Path(args.model)
    print(f"no --model: using the embedded demo model ({DEMO_CONFIG.parent / 'assets'})", file=sys.stderr)
    return DEMO_CONFIG.parent / "assets"


def _load_for_inference(args):
    from transformers import AutoTokenizer

    from .lora import load_adapter
    from .trainer.loading import load_model

    model_dir = _model_dir(args)
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
        from .trainer.outputs import write_text
        write_text(Path(args.output), text + "\n")  # complete, or the previous report kept
    print(text)
    return 0


def check_merge_output(output: Path, sources: dict[str, Path], overwrite: bool) -> None:
    """Refuse an output that is, contains or sits inside a source, a file, or (without
    --overwrite) a directory with something in it."""
    out = output.resolve()
    for flag, source in sources.items():
        src = Path(source).resolve()
        if out == src or src in out.parents or out in src.parents:
            relation = "is" if out == src else "sits inside" if src in out.parents else "contains"
            raise ValueError(f"--output {output} {relation} the {flag} {source}: choose a directory of its own")
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"--output {output} is not empty: pass --overwrite to replace it")


def _merge(args) -> int:
    from .lora import load_adapter, save_merged
    from .trainer.loading import load_model
    from .trainer.outputs import write_dir

    output, model_dir = Path(args.output), _model_dir(args)
    check_merge_output(output, {"--model": model_dir, "--adapter": Path(args.adapter)}, args.overwrite)
    model = load_model(model_dir, quantize=None, backend=args.kernel_backend)
    load_adapter(model, args.adapter, backend=args.kernel_backend)
    tokenizer = None
    if (model_dir / "tokenizer.json").exists() or (model_dir / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def write(path: Path) -> None:
        save_merged(model, path, in_place=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    write_dir(write, output)  # a temporary sibling renamed into place: complete or absent
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


class _Parser(argparse.ArgumentParser):
    """Errors as one line plus where the help is, not the whole usage (train has 50 flags)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists every option)\n")


def build_parser() -> argparse.ArgumentParser:
    from .trainer.config import add_arguments

    common = _Parser(add_help=False, allow_abbrev=False)
    common.add_argument("--debug", action="store_true", help="on an error, show the traceback too")
    parser = _Parser(prog="trilora", description="Fast, exact LoRA / QLoRA fine-tuning", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = {}

    def command(name: str, **kw) -> argparse.ArgumentParser:
        # --debug on every command; no abbreviations (--max-step is not silently --max-steps)
        parser.commands[name] = sub.add_parser(name, parents=[common], allow_abbrev=False, **kw)
        return parser.commands[name]

    p = command("train", help="fine-tune (with no --model/--data: the embedded CPU demo)",
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

    p = command("eval", help="test-set loss, perplexity, exact match or classification metrics")
    inference_args(p)
    p.add_argument("--data", required=True, help="test file (JSONL/CSV)")
    p.add_argument("--format", default="auto", help="record format (default: detected)")
    p.add_argument("--template", help="prompt template, as in training (default: one per format)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--output", help="write the JSON report here too")
    p.set_defaults(func=_eval)

    p = command("merge", help="fold an adapter into its base and save an HF model directory")
    p.add_argument("--model", help="base model directory (default: the demo model)")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory")
    p.add_argument("--output", required=True, help="directory for the merged model (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    backend_arg(p)
    p.set_defaults(func=_merge)

    p = command("generate", help="prompts in (--prompt or stdin lines), completions out")
    inference_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=_generate)

    p = command("bench", help="run the benchmark suite (GPU; --smoke checks the harness on CPU)",
                       description="Runs the scripts in the source checkout's bench/ folder and appends "
                                   "their JSON rows to --out (default bench/results/<device>-<date>.json).")
    p.add_argument("parts", nargs="*", default=[], type=_bench_part,
                   help=f"which benchmarks (default all): {', '.join(BENCH_SCRIPTS)}")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the harness, no timings")
    p.add_argument("--out", help="JSON file to append rows to")
    p.set_defaults(func=_bench)
    return parser


def _parse(argv) -> argparse.Namespace:
    """Arguments; an unknown flag is reported by its command (its usage, not the top level's)
    with the closest known flag."""
    from .trainer.config import closest_setting

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser.commands[args.command]
        flags = {s[2:].replace("-", "_"): s for a in command._actions for s in a.option_strings if s.startswith("--")}
        hints = []
        for word in (u for u in unknown if u.startswith("-")):
            close = closest_setting(word.split("=")[0], flags)
            hints.append(f"{word} (did you mean {flags.get(close, '--' + str(close).replace('_', '-'))}?)"
                         if close else word)
        command.error(f"unrecognized arguments: {' '.join(hints or unknown)}")
    return args


def main(argv=None) -> int:
    """Every failure is one line naming the problem (and a non-zero exit); --debug adds the traceback."""
    args = _parse(argv)
    from .trainer.loop import TrainingStopped

    try:
        return args.func(args)
    except TrainingStopped as stop:
        print(f"trilora {args.command}: {stop}", file=sys.stderr)
        return 128 + stop.signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"trilora {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, TypeError) as err:  # bad input; OSError: missing / unreadable files
        if args.debug:
            raise
        print(f"trilora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - anything else is still one line unless --debug
        if args.debug:
            raise
        print(f"trilora {args.command}: error: {type(err).__name__}: {err} (--debug shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
