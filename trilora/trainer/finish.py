"""The end of a run, on rank 0: the final weights checked and written, `summary.json`, the plots
and the console report (the test scores before and after, and which weights they belong to; with
--few-shot K, zero-shot, K-shot and fine-tuned side by side).
"""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from ..lora import adapter_base_config, load_adapter
from .evaluate import evaluate_split, format_metrics
from .loading import load_model
from .outputs import write_dir, write_json
from .plots import plot_confusion, plot_losses
from .sharding import bytes_per_rank
from .tasks import model_class
from .config import TrainConfig


def sharded_bytes(model) -> dict:
    """{"world_size", "param_bytes_per_rank": [...], "param_bytes_total"} of a sharded model."""
    local, total = bytes_per_rank(model)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, local)
    return {"world_size": dist.get_world_size(), "param_bytes_per_rank": per_rank, "param_bytes_total": total}


def finish(config, model, trainer, result, out, tokenizer, splits, before, after, metric, higher, classes, task,
            head, labels, device, dtype, autocast_dtype, model_dir, resumed, write, sharded, few_shot=None) -> dict:
    """Rank 0, at the end: check and write the final weights, the summary, plots and the report.

    few_shot: the K-shot baseline's scores (`fewshot.evaluate_few_shot`), or None: then the summary's
    `baselines` is null; else zero-shot (test_before), K-shot and fine-tuned are reported side by side."""
    trainer.check_weights_finite()
    final_dir = out / ("model" if config.method == "full" else "adapter")
    if config.method == "full":
        def write_model(path: Path) -> None:
            model.save_pretrained(path, safe_serialization=True)
            tokenizer.save_pretrained(path)
        write_dir(write_model, final_dir)
    else:
        write_dir(write, final_dir)
    original = None
    if config.method == "qlora" and config.eval_original_base:
        original = _score_on_original_base(config, model_dir, final_dir, tokenizer, splits.test,
                                           device, dtype, autocast_dtype, labels, task, head)
    tokens_per_s = [r["tokens_per_s"] for r in trainer.history if "tokens_per_s" in r]
    summary = {
        "method": config.method, "task": task, "steps": result["steps"], "resumed": resumed,
        "quantized_layers": getattr(model, "quantized_layers", 0),
        "labels": classes or None,
        "stopped_early": result["stopped_early"], "best_step": result["best"]["step"],
        "best_val_loss": None if result["best"]["val_loss"] == float("inf") else result["best"]["val_loss"],
        "primary_metric": metric, "higher_is_better": higher,
        "test_before": _public(before, metric), "test_after": _public(after, metric),
        "test_after_weights": _scored_weights(config),
        "test_after_original_base": None if original is None else _public(original, metric),
        "baselines": None if few_shot is None else {"zero_shot": {"k": 0, **_public(before, metric)},
                                                    "few_shot": few_shot},
        "adapter_dir": str(final_dir) if config.method != "full" else None,
        "model_dir": str(final_dir) if config.method == "full" else None,
        "counts": {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)},
        "mean_tokens_per_s": sum(tokens_per_s) / len(tokens_per_s) if tokens_per_s else None,
        "device": str(device), "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "fsdp": sharded,
        "config": config.to_dict(),
    }
    plot_losses(trainer.history, out / "loss_curve.png")
    if "confusion_matrix" in after:
        plot_confusion(after["confusion_matrix"], after["labels"], out / "confusion_matrix.png")
    write_json(out / "summary.json", summary)  # last: a summary means the run is complete
    which = (f"step {result['best']['step']}, the best validation loss" if result["best"]["step"]
             else f"the last step, {result['steps']}")
    print(f"test {metric}: {summary['test_before'][metric]:.4f} -> {summary['test_after'][metric]:.4f}; "
          f"test loss {before['loss']:.4f} -> {after['loss']:.4f}; {final_dir.name}/ holds the weights of "
          f"{which}; written to {out}")
    if few_shot is not None:
        short = few_shot["prompts_with_fewer_shots"]
        print(f"test {metric} side by side: zero-shot {before[metric]:.4f} | {few_shot['k']}-shot "
              f"{few_shot[metric]:.4f} | fine-tuned {after[metric]:.4f}"
              + (f" ({short} of the {few_shot['generated']} {few_shot['k']}-shot prompts hold fewer shots to fit "
                 "--max-length)" if short else ""))
    if task != "generate":
        print(format_metrics(after))
    if config.method == "qlora":
        print(f"these scores are the adapter's on the {config.quant_type} base it was trained against, "
              "which `trilora merge` deploys by default (into the dequantized base)"
              + ("" if original is None else
                 f"; on the original weights: test {metric} {original[metric]:.4f}, loss {original['loss']:.4f}"
                 " (`trilora merge --base-weights original`)"))
    return summary


def _scored_weights(config: TrainConfig) -> str:
    """Which weights test_after scores: what a user deploys to get that score."""
    if config.method == "qlora":
        return (f"the adapter on the {config.quant_type}-quantized base (as trained); `trilora merge` folds it "
                "into the dequantized base by default, which scores the same up to rounding")
    return "the fine-tuned model" if config.method == "full" else "the adapter on the original weights"


def _score_on_original_base(config, model_dir, adapter_dir, tokenizer, records, device, dtype, autocast_dtype,
                            labels, task="generate", head=None) -> dict:
    """Test scores of the QLoRA adapter on the original 16/32-bit weights."""
    print("evaluating the adapter on the original (unquantized) weights ...", flush=True)
    base = load_model(model_dir, quantize=None, dtype=dtype, device=device, backend=config.kernel_backend,
                      model_class=model_class(task), head=head, seed=config.seed,
                      config_overrides=adapter_base_config(adapter_dir))
    load_adapter(base, adapter_dir, backend=config.kernel_backend)
    try:
        return evaluate_split(base.eval(), tokenizer, records, config, device, autocast_dtype, labels, task)
    finally:
        del base


def _public(result: dict, metric: str) -> dict:
    keep = {"loss", "perplexity", metric, "accuracy", "precision", "recall", "f1", "examples", "generated",
            "weighted_precision", "weighted_recall", "weighted_f1", "per_class", "labels", "confusion_matrix",
            "per_type", "token_accuracy", "entities"}
    return {k: v for k, v in result.items() if k in keep}


__all__ = ["finish", "sharded_bytes"]
