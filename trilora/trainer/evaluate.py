"""Evaluation: loss and perplexity, exact match by generation, classification metrics,
entity metrics, and `evaluate_split` (a split's metrics for the run's task)."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from .data_batch import collate_padded
from .data_tokenize import prompt_ids, tokenize_records
from ..kernels.cross_entropy import IGNORE_INDEX, fused_linear_cross_entropy
from .sharding import root_unsharded
from .tasks import loss_sum, tokenize_classification

MAX_EVAL_GENERATIONS = 200  # generation is slow: the metric uses at most this many test records


class NonFiniteError(ValueError):
    """A NaN/Inf loss, gradient or weight: the run stops instead of writing a broken result."""


@torch.no_grad()
def evaluate_loss(model, batches: Iterable[dict], device, autocast_dtype=None, task: str = "generate") -> dict:
    """Mean loss (per predicted token, labelled token or sequence: see `tasks.loss_units`) and
    perplexity over `batches` (dicts with input_ids, labels, ...)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            with root_unsharded(model):  # under FSDP: embeddings and head whole for the direct calls
                fused = _fused_causal_loss(model, batch, labels) if task == "generate" else None
            part, n = fused if fused is not None else loss_sum(model(**batch).logits, labels, task)
        total, tokens = total + part, tokens + n
    model.train(was_training)
    loss = total / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def _fused_causal_loss(model, batch: dict, labels: torch.Tensor) -> tuple[float, int] | None:
    """(summed loss, predicted tokens) through the backbone and the fused linear cross-entropy,
    so that evaluation never holds the [tokens, vocab] logits (the memory the fused loss exists
    to save); None where the head is not a plain linear map of the hidden states (logit
    soft-capping or scaling, an adapted or missing head): then the model's logits are used."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if config is None or head is None or backbone is None or not isinstance(getattr(head, "weight", None), torch.Tensor) \
            or head.weight.dim() != 2 or any(getattr(config, k, None) for k in
                                              ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    shifted = labels[:, 1:]
    n = int((shifted != IGNORE_INDEX).sum())
    if not n:
        return 0.0, 0
    hidden = backbone(**batch).last_hidden_state[:, :-1]
    weight = head.weight.to(hidden.dtype)
    bias = None if getattr(head, "bias", None) is None else head.bias.to(hidden.dtype)
    # the kernels the model's own layers run (a LoRA / 4-bit layer's backend), else auto
    backend = next((m.backend for m in model.modules() if isinstance(getattr(m, "backend", None), str)), "auto")
    loss = fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, shifted.reshape(-1),
                                      reduction="sum", lm_head_bias=bias, backend=backend)
    return loss.item(), n


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
    """Accuracy; macro and support-weighted precision, recall and F1 over `labels` (default:
    those in references); per-class figures; and the confusion matrix.

    confusion[i][j] counts references of labels[i] predicted as labels[j]; a prediction
    outside the label set counts as wrong for its true class (and in no column).
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
    index = {label: i for i, label in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for p, r in zip(preds, refs):
        if r in index and p in index:
            confusion[index[r]][index[p]] += 1
    support = sum(c["support"] for c in per_class.values())

    def macro(key):
        return sum(c[key] for c in per_class.values()) / len(labels) if labels else 0.0

    def weighted(key):
        return sum(c[key] * c["support"] for c in per_class.values()) / support if support else 0.0
    return {
        "accuracy": sum(p == r for p, r in zip(preds, refs)) / n if n else float("nan"),
        "precision": macro("precision"), "recall": macro("recall"), "f1": macro("f1"),
        "weighted_precision": weighted("precision"), "weighted_recall": weighted("recall"),
        "weighted_f1": weighted("f1"),
        "per_class": per_class, "labels": labels, "confusion_matrix": confusion,
    }


@torch.no_grad()
def _head_outputs(model, batches: Iterable[dict], device, autocast_dtype, read) -> list:
    """read(logits, batch) of every batch, concatenated, in eval mode (the mode restored after)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out += read(model(**inputs).logits, inputs)
    finally:
        model.train(was_training)
    return out


def predict_classes(model, batches: Iterable[dict], device, autocast_dtype=None) -> list[torch.Tensor]:
    """Class probabilities (fp32 [num_labels]) of every sequence in `batches`, in order."""
    return _head_outputs(model, batches, device, autocast_dtype,
                         lambda logits, _: list(logits.float().softmax(-1).cpu()))


def predict_tokens(model, batches: Iterable[dict], device, autocast_dtype=None) -> list[list[int]]:
    """The predicted class id of every real (unpadded) token of every sequence, in order."""
    def read(logits, inputs):
        lengths = inputs["attention_mask"].sum(-1).tolist()
        return [row[:n].tolist() for row, n in zip(logits.argmax(-1).cpu(), lengths)]
    return _head_outputs(model, batches, device, autocast_dtype, read)


def format_metrics(result: dict) -> str:
    """Per-class (classification) or per-type (tagging) precision / recall / F1 / support as a
    table, with the macro / weighted or micro rows and, for classes, the confusion matrix."""
    rows = result.get("per_class") or result.get("per_type") or {}
    width = max([len(str(k)) for k in rows] + [12])
    lines = [f"{'':{width}}  precision  recall     f1  support"]
    lines += [f"{k:{width}}  {v['precision']:9.3f}  {v['recall']:6.3f}  {v['f1']:5.3f}  {v['support']:7d}"
              for k, v in rows.items()]
    if "per_class" in result:
        lines.append(f"{'macro':{width}}  {result['precision']:9.3f}  {result['recall']:6.3f}  {result['f1']:5.3f}")
        lines.append(f"{'weighted':{width}}  {result['weighted_precision']:9.3f}  {result['weighted_recall']:6.3f}  "
                     f"{result['weighted_f1']:5.3f}")
        lines.append(f"accuracy {result['accuracy']:.3f}; confusion matrix (rows: true, columns: predicted):")
        labels = result["labels"]
        cell = max([len(str(x)) for x in labels] + [5])
        lines.append(f"{'':{width}}  " + " ".join(f"{x:>{cell}}" for x in labels))
        lines += [f"{label:{width}}  " + " ".join(f"{n:>{cell}d}" for n in row)
                  for label, row in zip(labels, result["confusion_matrix"])]
    else:
        lines.append(f"{'micro':{width}}  {result['precision']:9.3f}  {result['recall']:6.3f}  {result['f1']:5.3f}  "
                     f"{result.get('entities', 0):7d}")
        lines.append(f"token accuracy {result['token_accuracy']:.3f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a split

def task_dataset(records, tokenizer, config, task: str = "generate", label2id=None):
    """(dataset, report) of `records` for `task` (see trainer.tasks)."""
    if task == "classify":
        return tokenize_classification(records, tokenizer, label2id, config.max_length)
    if task == "tag":
        from .tagging import tokenize_tagging
        return tokenize_tagging(records, tokenizer, label2id, config.max_length)
    return tokenize_records(records, tokenizer, config.max_length, template=config.template)


def loss_batches(records, tokenizer, config, task: str = "generate", label2id=None) -> list[dict]:
    from .data_batch import BatchIterator
    dataset, _ = task_dataset(records, tokenizer, config, task, label2id)
    return list(BatchIterator(dataset, config.batch_size, pad_token_id=pad_id(tokenizer), shuffle=False))


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def primary_metric_name(records, task: str = "generate") -> tuple[str, bool]:
    """(metric, higher_is_better) for the records' format and the task."""
    if task == "tag":
        return "f1", True  # entity-level, micro-averaged
    fmt = records[0].format
    if fmt == "text":
        return "perplexity", False
    return ("accuracy", True) if fmt == "classification" else ("exact_match", True)


def evaluate_split(model, tokenizer, records, config, device, autocast_dtype,
                   labels=None, task: str = "generate") -> dict:
    """Loss, perplexity and the task's metrics of `records`: exact match (generation),
    classification metrics (generated labels, or a head's predictions), entity F1 (tagging)."""
    label2id = dict(model.config.label2id) if task != "generate" else None
    dataset, _ = task_dataset(records, tokenizer, config, task, label2id)
    # in record order (BatchIterator groups by length): predictions line up with their records
    batches = [collate_padded([dataset[j] for j in range(i, min(i + config.batch_size, len(dataset)))],
                              pad_id(tokenizer)) for i in range(0, len(dataset), config.batch_size)]
    result = evaluate_loss(model, batches, device, autocast_dtype, task)
    if not math.isfinite(result["loss"]):
        raise NonFiniteError(f"the evaluation loss is {result['loss']}: the model's weights or outputs hold NaN/Inf")
    if task != "generate":
        id2label = {int(k): v for k, v in model.config.id2label.items()}
        tokenized = set(dataset.where)
        kept = [r for r in records if r.where in tokenized]  # the records the predictions belong to
    if task == "classify":
        probs = predict_classes(model, batches, device, autocast_dtype)
        predictions = [id2label[int(p.argmax())] for p in probs]
        references = [r.data["label"] for r in kept]
        result.update(classification_metrics(predictions, references, [id2label[i] for i in sorted(id2label)]))
        result["examples"] = [{"reference": r, "prediction": p} for r, p in list(zip(references, predictions))[:5]]
        return result
    if task == "tag":
        from .tagging import entity_metrics, predictions_to_word_tags
        token_preds = predict_tokens(model, batches, device, autocast_dtype)
        predicted = [predictions_to_word_tags(ids, word_ids, id2label, n_words=n)
                     for ids, word_ids, n in zip(token_preds, dataset.word_ids, dataset.n_words)]
        truth = [r.data["tags"][:len(p)] for r, p in zip(kept, predicted)]
        result.update(entity_metrics(truth, predicted))
        return result
    metric, _ = primary_metric_name(records)
    if metric == "perplexity":
        return result
    sample = records[:MAX_EVAL_GENERATIONS]
    prompts, references = zip(*(prompt_ids(r, tokenizer, config.template) for r in sample))
    # the length budget holds for generation too: a prompt keeps its last tokens (those next to
    # the answer) so that prompt + answer fit --max-length
    budget = max(1, config.max_length - config.eval_max_new_tokens)
    prompts = [p[-budget:] for p in prompts]
    predictions = generate_completions(model, tokenizer, prompts, config.eval_max_new_tokens, device,
                                       batch_size=max(config.batch_size, 32))
    if metric == "accuracy":
        result.update(classification_metrics(predictions, references, labels))
    else:
        result["exact_match"] = exact_match(predictions, references)
    result["generated"] = len(sample)
    result["examples"] = [{"reference": r, "prediction": p} for r, p in list(zip(references, predictions))[:5]]
    return result
