"""`trilora merge`: fold an adapter into its base and write an HF model directory or one GGUF
file, after `check_merge_output` has refused an output that would clobber a source."""
from __future__ import annotations

from pathlib import Path

from .loading import load_kwargs, model_dir, task_of, trained_base_config, trained_quantization


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


def run_merge(args) -> int:
    from ..lora import load_adapter, merge_lora, save_merged
    from ..quant import Linear4bit
    from ..trainer.loading import load_model, load_tokenizer
    from ..trainer.outputs import write_dir, write_file
    from ..trainer.tasks import model_class

    output, base = Path(args.output), model_dir(args)
    check_merge_output(output, {"--model": base, "--adapter": Path(args.adapter)}, args.overwrite, args.to)
    trained = trained_quantization(args.adapter)
    quant = trained if args.base_weights == "as-trained" else None
    try:
        tokenizer = load_tokenizer(base)
    except ValueError:
        if args.to == "gguf":
            raise  # a GGUF file carries its tokenizer: it cannot be written without one
        tokenizer = None
    task, head = task_of(base, args.adapter, tokenizer)
    if task != "generate" and args.to == "gguf":
        raise ValueError(f"--to gguf writes causal LMs for llama.cpp; this adapter is a {task} model: merge "
                         "it to an HF directory (--to hf)")
    model = load_model(base, backend=args.kernel_backend, model_class=model_class(task), head=head,
                       config_overrides=trained_base_config(args.adapter), **load_kwargs(quant))
    # the success line says which weights the adapter was folded into, since scores depend on it
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
        from ..gguf_io import write_gguf
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
