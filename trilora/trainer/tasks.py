"""What a run trains: text generation (a causal LM), sentence classification, or entity tagging.

    task        model class                          PEFT task type   data format
    generate    AutoModelForCausalLM                 CAUSAL_LM        any but tagging
    classify    AutoModelForSequenceClassification   SEQ_CLS          classification (text, label)
    tag         AutoModelForTokenClassification      TOKEN_CLS        tagging (tokens, tags)

`--task auto` picks from the data and the model: tagging records → tag; classification records
on an encoder (BERT, RoBERTa, …: it cannot generate) → classify; anything else → generate (a
decoder with classification records learns to write the label, and is told that `--task
classify` trains a head instead). The head is new (seeded) and trained in full; it is saved
with the adapter (PEFT's modules_to_save) and stays unquantized under QLoRA.

This module holds what differs between the tasks: the model class, the labels, tokenization,
what a step's loss is averaged over, and the loss itself.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .data import Record
from .data_tokenize import IGNORE_INDEX, TokenizationReport, TokenizedDataset

TASKS = ("auto", "generate", "classify", "tag")
PEFT_TASK_TYPES = {"generate": "CAUSAL_LM", "classify": "SEQ_CLS", "tag": "TOKEN_CLS"}
TASK_OF_PEFT_TYPE = {v: k for k, v in PEFT_TASK_TYPES.items()}
# model types that have no causal-LM head worth generating with (their AutoModelForCausalLM
# entry, where one exists, is an MLM head run as a decoder)
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "distilbert", "electra",
                 "albert", "mpnet", "camembert", "modernbert", "ernie", "xlnet"}


def model_class(task: str):
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoModelForTokenClassification)
    return {"generate": AutoModelForCausalLM, "classify": AutoModelForSequenceClassification,
            "tag": AutoModelForTokenClassification}[task]


def is_encoder(model_config) -> bool:
    archs = getattr(model_config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return False
    return getattr(model_config, "model_type", None) in ENCODER_TYPES


def task_of_model(model_config) -> str | None:
    """The task a saved model (config.json architectures) was fine-tuned for, if it says."""
    for arch in getattr(model_config, "architectures", None) or []:
        if arch.endswith("ForSequenceClassification"):
            return "classify"
        if arch.endswith("ForTokenClassification"):
            return "tag"
    return None


def resolve_task(requested: str, records: Sequence[Record], model_config) -> tuple[str, str | None]:
    """(task, a note for the console or None); ValueError when task, data and model disagree."""
    if requested not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {requested!r}")
    formats = {r.format for r in records}
    encoder = is_encoder(model_config)
    kind = "an encoder" if encoder else "a decoder"
    if requested == "auto":
        if formats == {"tagging"}:
            return "tag", "task: tag (tokens and tags in the data; a token-classification head is trained)"
        if formats == {"classification"} and encoder:
            return "classify", (f"task: classify ({model_config.model_type} is an encoder and the data has labels; "
                                "a sequence-classification head is trained)")
        if formats == {"classification"}:
            return "generate", ("task: generate (the model learns to write the label as text); "
                                "--task classify trains a classification head instead")
        requested = "generate"
    if requested == "classify" and formats != {"classification"}:
        raise ValueError(f"--task classify needs classification records (text, label); the data is {sorted(formats)}")
    if requested == "tag" and formats != {"tagging"}:
        raise ValueError(f"--task tag needs tagging records (tokens, tags); the data is {sorted(formats)}")
    if requested == "generate":
        if "tagging" in formats:
            raise ValueError("tagging records (tokens, tags) train a token-classification head: use --task tag")
        if encoder:
            raise ValueError(f"{model_config.model_type} is {kind}: it cannot generate text; "
                             "use --task classify (text, label data) or --task tag (tokens, tags)")
    return requested, None


def label_list(records: Sequence[Record], task: str) -> list[str]:
    """The classes of a head, in a stable order (sorted; tagging: "O" first)."""
    if task == "classify":
        return sorted({r.data["label"] for r in records})
    if task == "tag":
        tags = {t for r in records for t in r.data["tags"]}
        return (["O"] if "O" in tags else []) + sorted(tags - {"O"})
    return []


def head_config(labels: Sequence[str], tokenizer) -> dict:
    """config.json entries of a head: num_labels, id2label, label2id; pad_token_id so that a
    decoder's classifier finds each sequence's last real token."""
    head = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}}
    pad = None if tokenizer is None else (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if pad is not None:
        head["pad_token_id"] = pad
    return head


def tokenize_classification(records: Sequence[Record], tokenizer, label2id: dict[str, int],
                            max_length: int) -> tuple[TokenizedDataset, TokenizationReport]:
    """Each record's text with the tokenizer's special tokens ([CLS] … [SEP] for BERT, BOS for a
    decoder), cut to max_length; labels is the class id (a 0-d tensor)."""
    report = TokenizationReport(max_length=max_length, total=len(records))
    encoded = tokenizer([r.data["text"] for r in records], add_special_tokens=True)["input_ids"]
    examples, where = [], []
    for record, ids in zip(records, encoded):
        label = record.data["label"]
        if label not in label2id:
            report.dropped.append((record.where, f"label {label!r} is not one of the model's classes"))
            continue
        if len(ids) > max_length:
            ids = ids[:max_length]
            report.truncated += 1
        examples.append({"input_ids": torch.tensor(ids, dtype=torch.long),
                         "labels": torch.tensor(label2id[label], dtype=torch.long)})
        where.append(record.where)
    report.kept = len(examples)
    return TokenizedDataset(examples, where), report


def class_weights(records: Sequence[Record], labels: Sequence[str]) -> torch.Tensor:
    """Balanced class weights n / (k · count): each class contributes equally to the loss
    (a class absent from training gets weight 0 instead of a division by zero)."""
    counts = Counter(r.data["label"] for r in records)
    n, k = sum(counts.values()), len(labels)
    return torch.tensor([n / (k * counts[c]) if counts[c] else 0.0 for c in labels], dtype=torch.float32)


def loss_units(batch: dict, task: str) -> int:
    """What a step's loss is averaged over: predicted tokens (after HF's shift by one for a
    causal LM), labelled tokens (tagging) or sequences (classification)."""
    labels = batch["labels"]
    if task == "classify":
        return labels.shape[0]
    if task == "tag":
        return int((labels != IGNORE_INDEX).sum())
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def batch_loss(model, batch: dict, task: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean loss of `batch`: the model's own for a causal LM; cross-entropy of the head's
    logits (with optional class weights) for classify / tag."""
    if task == "generate":
        return model(**batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    labels = batch["labels"]
    w = None if weights is None else weights.to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), weight=w,
                           ignore_index=IGNORE_INDEX)


@torch.no_grad()
def loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[float, int]:
    """(summed cross-entropy, units) of one evaluation batch."""
    if task == "generate":
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.reshape(-1)
    n = int((labels != IGNORE_INDEX).sum())
    if not n:
        return 0.0, 0
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels,
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss.item(), n


@torch.no_grad()
def predict_texts(model, tokenizer, task: str, texts: Sequence[str], max_length: int = 512) -> list[dict]:
    """classify: {"label", "probabilities": {label: p}}; tag (words split on whitespace):
    {"tags": [per word], "entities": [{"type", "text", "start", "end"}]} (word indices)."""
    device = next(model.parameters()).device
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    was_training = model.training
    model.eval()
    out = []
    try:
        for text in texts:
            if task == "classify":
                enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
                probs = model(**enc.to(device)).logits.float().softmax(-1)[0].cpu()
                out.append({"label": id2label[int(probs.argmax())],
                            "probabilities": {id2label[i]: float(p) for i, p in enumerate(probs)}})
                continue
            from .tagging import entity_spans, predictions_to_word_tags
            words = text.split()
            enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            ids = model(**{k: v.to(device) for k, v in enc.items()}).logits.argmax(-1)[0].tolist()
            tags = predictions_to_word_tags(ids, enc.word_ids(0), id2label)
            out.append({"tags": tags, "entities": [
                {"type": kind, "text": " ".join(words[a:b]), "start": a, "end": b}
                for kind, a, b in entity_spans(tags)]})
    finally:
        model.train(was_training)
    return out


__all__ = ["TASKS", "PEFT_TASK_TYPES", "model_class", "resolve_task", "label_list", "head_config",
           "tokenize_classification", "class_weights", "loss_units", "batch_loss", "loss_sum", "is_encoder",
           "task_of_model", "predict_texts"]
