"""The handlers of `trilora train`, `eval`, `generate` and `predict`: each takes the parsed
arguments and returns the exit code (failures raise; `trilora.cli.main` reports them).
`merge` and `bench` have modules of their own."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .loading import DEMO_CONFIG, load_for_inference, model_dir


def train_config(args, doing: str = "running"):
    """The TrainConfig of `train` (and of each `sweep` trial): --config overridden by the flags,
    or the embedded demo's settings when neither --config, --model nor --data is given."""
    from ..trainer.config import config_from_args

    if args.config is None and args.model is None and args.data is None:
        print(f"no --model/--data: {doing} the embedded demo ({DEMO_CONFIG.name})")
        args.config = DEMO_CONFIG
    config = config_from_args(args)
    if config.data is not None and config.model is None:
        raise ValueError("--data needs --model, the base model to fine-tune (the embedded demo model only "
                         "serves the demo task; pass --model trilora/demo/assets to train it anyway)")
    return config


def run_train(args) -> int:
    from ..trainer.run import train

    train(train_config(args))
    return 0


def run_eval(args) -> int:
    import torch

    from ..trainer.config import TrainConfig
    from ..trainer.data import label_set, load_records
    from ..trainer.evaluate import evaluate_split

    few_shot = getattr(args, "few_shot", None)
    _check_few_shot_flags(args, few_shot)  # before anything is loaded
    model, tokenizer, task = load_for_inference(args)
    records, report = load_records(args.data, None if args.format == "auto" else args.format)
    print(report)
    config = TrainConfig(max_length=args.max_length, batch_size=args.batch_size,
                         eval_max_new_tokens=args.max_new_tokens, template=args.template)
    device = next(model.parameters()).device
    autocast = torch.bfloat16 if device.type == "cuda" else None
    labels = (label_set(records) or None) if task == "generate" else None
    if few_shot:
        from ..trainer.fewshot import check_few_shot, evaluate_few_shot
        shots = _shot_pool(args, records)
        check_few_shot(few_shot, records, len(shots), task, f"--shots-data {args.shots_data}")
        result, few_shot_report = evaluate_few_shot(model, tokenizer, records, shots, config, device, few_shot,
                                                    args.seed, labels)
        print(few_shot_report)
    else:
        result = evaluate_split(model, tokenizer, records, config, device, autocast, labels, task)
    text = json.dumps(result, indent=2)
    if args.output:
        from ..trainer.outputs import write_text
        write_text(Path(args.output), text + "\n")  # complete, or the previous report kept
    print(text)
    return 0


def _check_few_shot_flags(args, few_shot: int | None) -> None:
    """--few-shot K needs --shots-data, a file other than the test file; --shots-data needs --few-shot."""
    shots_data = getattr(args, "shots_data", None)
    if few_shot is None:
        if shots_data:
            raise ValueError("--shots-data is read only with --few-shot K (the number of examples in each prompt)")
        return
    if few_shot < 0:
        raise ValueError(f"--few-shot must be >= 0 (the number of examples in each prompt), got {few_shot}")
    if few_shot and not shots_data:
        raise ValueError(f"--few-shot {few_shot} needs --shots-data FILE: the training examples the shots are "
                         "drawn from (never the test file)")
    if few_shot and _same_file(shots_data, args.data):
        raise ValueError(f"--shots-data {shots_data} is the test file --data {args.data}: few-shot examples must "
                         "never come from the test split; give the training data")


def _same_file(a, b) -> bool:
    a, b = Path(a), Path(b)
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _shot_pool(args, test_records) -> list:
    """The records of --shots-data (cleaned as training data is), refused if any equals a test record."""
    from ..trainer.data import load_records
    from ..trainer.fewshot import record_key

    shots, report = load_records(args.shots_data, None if args.format == "auto" else args.format)
    print(report)
    test = {record_key(r): r for r in test_records}
    shared = [(r, test[record_key(r)]) for r in shots if record_key(r) in test]
    if shared:
        shot, same = shared[0]
        raise ValueError(f"--shots-data {args.shots_data} shares {len(shared)} records with the test data "
                         f"{args.data} (first: {shot.where} = {same.where}): few-shot examples must never come "
                         "from the test split")
    return shots


def _inputs(args) -> list[str]:
    return args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]


def run_generate(args) -> int:
    from ..trainer.evaluate import generate_completions

    model, tokenizer, task = load_for_inference(args)
    if task != "generate":
        return _print_predictions(model, tokenizer, task, _inputs(args), args.json)
    prompts = _inputs(args)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--chat: the tokenizer of {model_dir(args)} has no chat template")
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


def run_predict(args) -> int:
    model, tokenizer, task = load_for_inference(args)
    if task == "generate":
        raise ValueError("predict runs classification and tagging models (a SEQ_CLS / TOKEN_CLS adapter, or a "
                         "fine-tuned classifier); this is a causal LM: use trilora generate")
    return _print_predictions(model, tokenizer, task, _inputs(args), args.json)


def _print_predictions(model, tokenizer, task: str, texts: list[str], as_json: bool) -> int:
    """classify: the label and every class's probability; tag: the entities (words split on
    whitespace) and each word's tag."""
    from ..trainer.tasks import predict_texts

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
