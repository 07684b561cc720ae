"""The `trilora` flags: one argparse sub-parser per command, and `parse_args`, which reports a
mistyped flag by its command with the closest known flag.

Heavy imports (torch, transformers) stay inside the handlers, so `trilora --help` and a flag
error answer at once.
"""
from __future__ import annotations

import argparse

from .bench import BENCH_SCRIPTS, bench_part, run_bench
from .commands import run_eval, run_generate, run_predict, run_train
from .merge import run_merge
from .sweep import run_sweep


SWEEP_DESCRIPTION = """\
Hyperparameter search: each trial is a `trilora train` run in SWEEP_DIR/trial-NNN/, with the
settings below (as for train: --config YAML overridden by flags) and the searched ones on top.

  trilora sweep --config run.yaml --grid lr=1e-4,2e-4,5e-4 --grid r=8,16
  trilora sweep --config run.yaml --trials 20 --space lr=1e-5:1e-3:log --space 'r=8|16|32' --prune

KEY is a setting of `trilora train --help` (lr, r, alpha, dropout, batch_size, ...); a list
setting's value is its items separated by spaces (--grid "target_modules=q_proj v_proj,all-linear").
Run the same command again to continue a sweep: finished trials are kept, a killed one runs again
(from its checkpoint with --save-every N). SWEEP_DIR/best.yaml is the best trial's whole config:
trilora train --config SWEEP_DIR/best.yaml. Needs Optuna: pip install 'trilora[sweep]'.
Trials run one after another in this process (not yet one per GPU)."""


class _Parser(argparse.ArgumentParser):
    """Errors as one line plus where the help is, not the whole usage (train has 50 flags)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists every option)\n")


def build_parser() -> argparse.ArgumentParser:
    from ..trainer.config import add_arguments, unescape

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
    add_arguments(p)  # train's flags are the TrainConfig fields, defined beside them
    p.set_defaults(func=run_train)

    p = command("sweep", help="hyperparameter search: train trials over a grid or ranges (Optuna)",
                conflict_handler="resolve", formatter_class=argparse.RawDescriptionHelpFormatter,
                description=SWEEP_DESCRIPTION)
    add_arguments(p)  # the settings every trial shares, as for train; then what the sweep varies
    for action in p._actions:  # set by the sweep for each trial (refused when given)
        if action.dest in ("resume", "overwrite", "fsdp"):
            action.help = argparse.SUPPRESS
    sweep = p.add_argument_group("the search")
    sweep.add_argument("--output-dir", default="trilora-sweep", metavar="SWEEP_DIR",
                       help="the sweep's directory: trial-NNN/ per trial, study.db, trials.csv, sweep.json, "
                            "sweep.png, best.yaml (default: trilora-sweep)")
    sweep.add_argument("--grid", action="append", metavar="KEY=V1,V2,...",
                       help="try each value of a setting (repeatable; the grid is every combination)")
    sweep.add_argument("--space", action="append", metavar="KEY=RANGE",
                       help="a range to draw from with --trials N (repeatable): LOW:HIGH uniform, "
                            "LOW:HIGH:log log-uniform, 'A|B|C' one of the values (quoted for the shell); "
                            "--grid values are drawn from too")
    sweep.add_argument("--trials", type=int,
                       help="trials to run in all (default with --grid alone: every combination)")
    sweep.add_argument("--sampler", choices=["grid", "random", "tpe"],
                       help="Optuna's sampler (default: grid with --grid alone, tpe with --space)")
    sweep.add_argument("--sampler-seed", type=int, default=0, help="seed of the sampler (default: 0)")
    sweep.add_argument("--metric", default="val_loss",
                       help="what the best trial is chosen by: val_loss (the run's best validation loss; "
                            "default), or a test-split score of summary.json: test_loss, test_exact_match, "
                            "test_accuracy, test_f1, ... (a choice made on the test split flatters its score)")
    sweep.add_argument("--prune", action="store_true",
                       help="stop a trial at a validation (--eval-every N) where its loss is worse than the "
                            "median of the completed trials' at that step (Optuna's MedianPruner)")
    sweep.add_argument("--prune-startup-trials", type=int, default=3,
                       help="completed trials before any is pruned (default: 3)")
    p.set_defaults(func=run_sweep)

    def backend_arg(p):
        from ..kernels.backend import BACKENDS
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
    p.add_argument("--few-shot", type=int, metavar="K",
                   help="score K-shot prompting: each test prompt preceded by K examples of --shots-data, "
                        "drawn per record by --seed, in the chat template when the tokenizer has one")
    p.add_argument("--shots-data", help="with --few-shot: the file the examples come from (training data; never "
                                        "the test file, nor a record of it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot examples' choice (default: 0)")
    p.set_defaults(func=run_eval)

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
    p.set_defaults(func=run_merge)

    p = command("generate", help="prompts in (--prompt or stdin lines), completions out")
    inference_args(p)
    p.add_argument("--prompt", action="append", type=unescape,
                   help="a prompt (repeatable; \\n and \\t read as escapes)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn in the tokenizer's chat template")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt: {prompt, completion}")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=run_generate)

    p = command("predict", help="classification / tagging models: label and probabilities, or entities, per input")
    inference_args(p)
    p.add_argument("--prompt", "--text", dest="prompt", action="append", type=unescape,
                   help="an input text (repeatable; default: one per stdin line)")
    p.add_argument("--json", action="store_true", help="one JSON object per input")
    p.set_defaults(func=run_predict)

    p = command("bench", help="run the benchmark suite (GPU; --smoke checks the harness on CPU)",
                       description="Runs the scripts in the source checkout's bench/ folder and appends "
                                   "their JSON rows to --out (default bench/results/<device>-<date>.json).")
    p.add_argument("parts", nargs="*", default=[], type=bench_part,
                   help=f"which benchmarks (default all): {', '.join(BENCH_SCRIPTS)}")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the harness, no timings")
    p.add_argument("--out", help="JSON file to append rows to")
    p.set_defaults(func=run_bench)
    return parser


def parse_args(argv) -> argparse.Namespace:
    """Arguments; an unknown flag is reported by its command (its usage, not the top level's)
    with the closest known flag."""
    from ..trainer.config import closest_setting

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
