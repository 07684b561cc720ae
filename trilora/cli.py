"""`trilora` / `python -m trilora`: train, eval, merge, generate."""
from __future__ import annotations

import argparse
import json
import os
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


def _trained_quantization(adapter) -> dict | None:
    """The 4-bit format the adapter at `adapter` was trained against (None: a 16/32-bit base)."""
    from .lora import adapter_base_quantization

    return adapter_base_quantization(adapter) if adapter else None


def _task_of(model_dir: Path, adapter, tokenizer) -> tuple[str, dict | None]:
    """(task, head config) of what is loaded: an adapter's PEFT task type and recorded classes,
    or a saved model's architecture (a fine-tuned classifier's config.json has its labels)."""
    from .gguf_io import is_gguf
    from .trainer.tasks import TASK_OF_PEFT_TYPE, head_config, task_of_model

    if adapter:
        from .lora import adapter_labels, read_adapter
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


def _load_for_inference(args):
    """The base as the adapter was trained on it (its 4-bit format, recorded in the adapter),
    unless --quantize says otherwise; the adapter on top; the task's model class. Returns
    (model, tokenizer, task)."""
    from .lora import load_adapter
    from .trainer.loading import load_model, load_tokenizer
    from .trainer.tasks import model_class

    model_dir = _model_dir(args)
    tokenizer = load_tokenizer(model_dir)
    task, head = _task_of(model_dir, args.adapter, tokenizer)
    if task == "tag":
        tokenizer = load_tokenizer(model_dir, pre_split_words=True)
    trained = _trained_quantization(args.adapter)
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
    model = load_model(model_dir, backend=args.kernel_backend, model_class=model_class(task), head=head,
                       **_load_kwargs(quant))
    if args.adapter:
        load_adapter(model, args.adapter, backend=args.kernel_backend)
    return model.eval(), tokenizer, task


def _load_kwargs(quant: dict | None) -> dict:
    if quant is None:
        return {"quantize": None}
    return {"quantize": quant["quant_type"],
            **{k: quant[k] for k in ("blocksize", "double_quant") if k in quant}}


def _eval(args) -> int:
    import torch

    from .trainer.config import TrainConfig
    from .trainer.data import label_set, load_records
    from .trainer.evaluate import evaluate_split

    model, tokenizer, task = _load_for_inference(args)
    records, report = load_records(args.data, None if args.format == "auto" else args.format)
    print(report)
    config = TrainConfig(max_length=args.max_length, batch_size=args.batch_size,
                         eval_max_new_tokens=args.max_new_tokens, template=args.template)
    device = next(model.parameters()).device
    autocast = torch.bfloat16 if device.type == "cuda" else None
    labels = (label_set(records) or None) if task == "generate" else None
    result = evaluate_split(model, tokenizer, records, config, device, autocast, labels, task)
    text = json.dumps(result, indent=2)
    if args.output:
        from .trainer.outputs import write_text
        write_text(Path(args.output), text + "\n")  # complete, or the previous report kept
    print(text)
    return 0


def check_merge_output(output: Path, sources: dict[str, Path], overwrite: bool, to: str = "hf") -> None:
    """Refuse an output that is, contains or sits inside a source; for --to hf a file or (without
    --overwrite) a directory with something in it; for --to gguf a directory, a name without
    .gguf, or (without --overwrite) an existing file."""
    out = output.resolve()
    for flag, source in sources.items():
        src = Path(source).resolve()
        if out == src or src in out.parents or out in src.parents:
            relation = "is" if out == src else "sits inside" if src in out.parents else "contains"
            raise ValueError(f"--output {output} {relation} the {flag} {source}: choose a path of its own")
    if to == "gguf":
        if output.suffix.lower() != ".gguf":
            raise ValueError(f"--output {output}: with --to gguf the output is one file named *.gguf")
        if output.is_dir():
            raise ValueError(f"--output {output} is a directory, not a .gguf file")
        if output.exists() and not overwrite:
            raise ValueError(f"--output {output} exists: pass --overwrite to replace it")
        return
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"--output {output} is not empty: pass --overwrite to replace it")


def _merge(args) -> int:
    from .lora import load_adapter, merge_lora, save_merged
    from .quant import Linear4bit
    from .trainer.loading import load_model, load_tokenizer
    from .trainer.outputs import write_dir, write_file

    from .trainer.tasks import model_class

    output, model_dir = Path(args.output), _model_dir(args)
    check_merge_output(output, {"--model": model_dir, "--adapter": Path(args.adapter)}, args.overwrite, args.to)
    trained = _trained_quantization(args.adapter)
    quant = trained if args.base_weights == "as-trained" else None
    try:
        tokenizer = load_tokenizer(model_dir)
    except ValueError:
        if args.to == "gguf":
            raise  # a GGUF file carries its tokenizer: it cannot be written without one
        tokenizer = None
    task, head = _task_of(model_dir, args.adapter, tokenizer)
    if task != "generate" and args.to == "gguf":
        raise ValueError(f"--to gguf writes causal LMs for llama.cpp; this adapter is a {task} model: merge "
                         "it to an HF directory (--to hf)")
    model = load_model(model_dir, backend=args.kernel_backend, model_class=model_class(task), head=head,
                       **_load_kwargs(quant))
    if quant is None and any(isinstance(m, Linear4bit) for m in model.modules()):
        what = "the dequantized weights of the 4-bit checkpoint (it has no others)"
    elif quant is not None:
        what = (f"the dequantized {quant['quant_type']} base (blocksize {quant['blocksize']}): the weights the "
                "adapter was trained against, so the merged model scores as the run's test_after")
    elif trained is not None:
        what = (f"the original weights (the adapter was trained against the {trained['quant_type']} base: "
                "scores may differ from the run's test_after; check with trilora eval --model OUTPUT)")
    else:
        what = "the original weights (the adapter was trained on them)"
    load_adapter(model, args.adapter, backend=args.kernel_backend)
    if args.to == "gguf":
        from .gguf_io import write_gguf
        merge_lora(model)
        write_file(lambda path: write_gguf(model, tokenizer, path, args.gguf_type), output)
        what += f"; written as GGUF ({args.gguf_type})"
    else:
        def write(path: Path) -> None:
            save_merged(model, path, in_place=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(path)
        write_dir(write, output)  # a temporary sibling renamed into place: complete or absent
    print(f"merged model written to {args.output}: the adapter folded into {what}")
    return 0


def _inputs(args) -> list[str]:
    return args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]


def _generate(args) -> int:
    from .trainer.evaluate import generate_completions

    model, tokenizer, task = _load_for_inference(args)
    if task != "generate":
        return _print_predictions(model, tokenizer, task, _inputs(args), args.json)
    prompts = _inputs(args)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--chat: the tokenizer of {_model_dir(args)} has no chat template")
        # the template writes its own bos; a prompt is one user turn
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        bos = []
    else:
        texts = prompts
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = [bos + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    device = next(model.parameters()).device
    completions = generate_completions(model, tokenizer, ids, args.max_new_tokens, device)
    for prompt, completion in zip(prompts, completions):
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))
        else:  # the completion on its own lines, so that it can be told from the prompt
            print(f"### prompt\n{prompt}\n### completion\n{completion}\n")
    return 0


def _predict(args) -> int:
    model, tokenizer, task = _load_for_inference(args)
    if task == "generate":
        raise ValueError("predict runs classification and tagging models (a SEQ_CLS / TOKEN_CLS adapter, or a "
                         "fine-tuned classifier); this is a causal LM: use trilora generate")
    return _print_predictions(model, tokenizer, task, _inputs(args), args.json)


def _print_predictions(model, tokenizer, task: str, texts: list[str], as_json: bool) -> int:
    """classify: the label and every class's probability; tag: the entities (words split on
    whitespace) and each word's tag."""
    from .trainer.tasks import predict_texts

    for text, found in zip(texts, predict_texts(model, tokenizer, task, texts)):
        if as_json:
            print(json.dumps({"text": text, **found}, ensure_ascii=False))
        elif task == "classify":
            probs = ", ".join(f"{label} {p:.3f}" for label, p in found["probabilities"].items())
            print(f"{found['label']}\t{text}\t({probs})")
        else:
            entities = "; ".join(f"{e['type']}: {e['text']}" for e in found["entities"]) or "no entities"
            print(f"{text}\t-> {entities}")
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
    from .trainer.config import add_arguments, unescape

    common = _Parser(add_help=False, allow_abbrev=False)
    common.add_argument("--debug", action="store_true",
                        help="on an error, show the traceback too (or set TRILORA_DEBUG=1)")
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
        from .kernels.backend import BACKENDS
        p.add_argument("--kernel-backend", choices=BACKENDS, default="auto",
                       help="LoRA / 4-bit kernels (default: auto, Triton where it runs)")

    def inference_args(p, adapter_required=False):
        p.add_argument("--model", help="base model directory or .gguf file (default: the demo model)")
        p.add_argument("--adapter", required=adapter_required, help="PEFT adapter directory")
        p.add_argument("--quantize", choices=["nf4", "fp4", "none"], default=None,
                       help="the base's weights: 4-bit or none (default: as the adapter was trained, "
                            "recorded in the adapter; none without an adapter)")
        backend_arg(p)

    p = command("eval", help="test-set loss, perplexity, exact match or classification metrics")
    inference_args(p)
    p.add_argument("--data", required=True, help="test file (JSONL/CSV)")
    p.add_argument("--data-format", "--format", dest="format", default="auto",
                   help="record format, as in training (default: detected)")
    p.add_argument("--template", type=unescape,
                   help="prompt template, as in training (\\n, \\t read as escapes; default: one per format)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--output", help="write the JSON report here too")
    p.set_defaults(func=_eval)

    p = command("merge", help="fold an adapter into its base and save an HF model directory")
    p.add_argument("--model", help="base model directory or .gguf file (default: the demo model)")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory")
    p.add_argument("--output", required=True, help="directory for the merged model (new or empty), "
                                                    "or a .gguf file with --to gguf")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--to", choices=["hf", "gguf"], default="hf",
                   help="an HF model directory, or one GGUF file for llama.cpp / Ollama (default: hf)")
    p.add_argument("--gguf-type", choices=["f16", "bf16", "q8_0", "f32"], default="f16",
                   help="GGUF weight type for --to gguf (norms and biases stay f32; default: f16)")
    p.add_argument("--base-weights", choices=["as-trained", "original"], default="as-trained",
                   help="fold into the weights the adapter was trained against (a QLoRA adapter: the "
                        "dequantized 4-bit base) or into the original 16/32-bit weights (default: as-trained)")
    backend_arg(p)
    p.set_defaults(func=_merge)

    p = command("generate", help="prompts in (--prompt or stdin lines), completions out")
    inference_args(p)
    p.add_argument("--prompt", action="append", type=unescape,
                   help="a prompt (repeatable; \\n and \\t read as escapes)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn in the tokenizer's chat template")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt: {prompt, completion}")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=_generate)

    p = command("predict", help="classification / tagging models: label and probabilities, or entities, per input")
    inference_args(p)
    p.add_argument("--prompt", "--text", dest="prompt", action="append", type=unescape,
                   help="an input text (repeatable; default: one per stdin line)")
    p.add_argument("--json", action="store_true", help="one JSON object per input")
    p.set_defaults(func=_predict)

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
    args.debug = args.debug or os.environ.get("TRILORA_DEBUG", "") not in ("", "0")
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
