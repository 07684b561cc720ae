"""Evaluation: loss and perplexity, exact match by generation, classification metrics."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch


@torch.no_grad()
def evaluate_loss(model, batches: Iterable[dict], device, autocast_dtype=None) -> dict:
    """Token-weighted mean loss and perplexity over `batches` (dicts with input_ids, labels, ...)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(**batch).logits
        shifted = labels[:, 1:]
        n = int((shifted != -100).sum())
        if n:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                ignore_index=-100, reduction="sum")
            total, tokens = total + loss.item(), tokens + n
    model.train(was_training)
    loss = total / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


@torch.no_grad()
def generate_completions(model, tokenizer, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                         device, batch_size: int = 32) -> list[str]:
    """Greedy completions of tokenized prompts (left-padded batches), decoded without special tokens.

    Prompts come as token ids so that they start exactly as the training sequences did
    (BOS, chat template), whatever the tokenizer adds by default.
    """
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    try:
        for i in range(0, len(prompt_ids), batch_size):
            chunk = [list(p) for p in prompt_ids[i:i + batch_size]]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after stripping whitespace."""
    if not references:
        return float("nan")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def classification_metrics(predictions: Sequence[str], references: Sequence[str],
                           labels: Sequence[str] | None = None) -> dict:
    """Accuracy and macro precision, recall and F1 over `labels` (default: those in references).

    A prediction outside the label set counts as wrong for its true class.
    """
    labels = sorted(set(references)) if labels is None else list(labels)
    preds = [p.strip() for p in predictions]
    refs = [r.strip() for r in references]
    per_class = {}
    for label in labels:
        tp = sum(p == label and r == label for p, r in zip(preds, refs))
        fp = sum(p == label and r != label for p, r in zip(preds, refs))
        fn = sum(p != label and r == label for p, r in zip(preds, refs))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    n = len(refs)
    return {
        "accuracy": sum(p == r for p, r in zip(preds, refs)) / n if n else float("nan"),
        "precision": sum(c["precision"] for c in per_class.values()) / len(labels) if labels else 0.0,
        "recall": sum(c["recall"] for c in per_class.values()) / len(labels) if labels else 0.0,
        "f1": sum(c["f1"] for c in per_class.values()) / len(labels) if labels else 0.0,
        "per_class": per_class,
    }
