"""Entity tagging (token classification, NER): word tags onto sub-tokens, and entity metrics.

Data are words with one BIO / IOB2 tag each ("tagging" records of `data`). A tokenizer cuts
a word into sub-tokens; only the first sub-token of each word carries the word's tag id,
the other sub-tokens and the special tokens ([CLS], [SEP], <s>, ...) get IGNORE_INDEX, so
the loss and the predictions count each word once, whatever its length in tokens. A
prediction is read back the same way: the word's tag is the first sub-token's argmax.

Entities are maximal runs "B-X I-X I-X"; an "I-X" that does not continue an X entity (after
"O", or after a Y entity) starts a new one, as conlleval and seqeval's default mode read it,
so IOB1-style data score without being rewritten. A predicted entity counts only if its
type and both ends equal a true entity's: a half-found entity is one false positive and
one false negative. Precision, recall and F1 are micro-averaged over all entities, and
also given per type; token accuracy is the share of words whose tag is right.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .data import Record
from .data_tokenize import IGNORE_INDEX, TokenizationReport, TokenizedDataset

# --------------------------------------------------------------------------- labels

def align_labels(word_ids: Sequence[int | None], word_tag_ids: Sequence[int],
                 ignore_index: int = IGNORE_INDEX) -> list[int]:
    """Per-token labels from per-word tag ids.

    word_ids:     for each token, the index of the word it comes from, None for a special
                  token (a fast tokenizer's `encoding.word_ids()`), length T.
    word_tag_ids: the tag id of each word, length W.
    Returns T label ids: word_tag_ids[w] on the first sub-token of word w, ignore_index on
    its other sub-tokens and on special tokens.
    """
    labels, previous = [], None
    for word in word_ids:
        if word is None or word == previous:
            labels.append(ignore_index)
        elif not 0 <= word < len(word_tag_ids):
            raise ValueError(f"word id {word} is out of range for {len(word_tag_ids)} word tags")
        else:
            labels.append(int(word_tag_ids[word]))
        previous = word
    return labels


def predictions_to_word_tags(token_tag_ids: Sequence[int] | torch.Tensor,
                             word_ids: Sequence[int | None],
                             id2tag: Sequence[str] | Mapping[int, str], *,
                             n_words: int | None = None, missing: str = "O") -> list[str]:
    """Word tags from per-token predicted tag ids (e.g. logits.argmax(-1), int64 [T]).

    Each word takes its first sub-token's prediction, the token that carried its label in
    training. n_words (default: the largest word id + 1) words are returned; a word with no
    token (cut by truncation) gets `missing`, so it still counts as missed in the metrics.
    """
    if len(token_tag_ids) != len(word_ids):
        raise ValueError(f"{len(token_tag_ids)} predictions for {len(word_ids)} tokens")
    present = [w for w in word_ids if w is not None]
    tags = [missing] * (n_words if n_words is not None else max(present, default=-1) + 1)
    previous = None
    for tag_id, word in zip(token_tag_ids, word_ids):
        if word is not None and word != previous and word < len(tags):
            tags[word] = id2tag[int(tag_id)]
        previous = word
    return tags


# --------------------------------------------------------------------------- tokenizing

@dataclass
class TaggingReport(TokenizationReport):
    """`TokenizationReport` plus the words that truncation cut off: (record location, count).

    `truncated` counts examples that lost any token, `words_cut` those that lost whole words
    (their tags are then neither trained nor predicted).
    """

    words_cut: list[tuple[str, int]] = field(default_factory=list)

    def __str__(self) -> str:
        text = super().__str__()
        if self.words_cut:
            lost = sum(n for _, n in self.words_cut)
            text += (f"\n  {lost} words cut off in {len(self.words_cut)} examples (first: "
                     f"{self.words_cut[0][0]}, {self.words_cut[0][1]} words)")
        return text


class TaggingDataset(TokenizedDataset):
    """Item i is {"input_ids": int64 [T], "labels": int64 [T]}, labels a tag id on each word's
    first sub-token and IGNORE_INDEX elsewhere. Example i is records[i]; `word_ids[i]` maps
    its tokens to words (None: special token) and `n_words[i]` is its record's word count,
    what `predictions_to_word_tags` needs to read predictions back as word tags.
    """

    def __init__(self, examples, where, word_ids: Sequence[list[int | None]],
                 n_words: Sequence[int]):
        super().__init__(examples, where)
        self.word_ids = list(word_ids)
        self.n_words = list(n_words)


def tokenize_tagging(records: Sequence[Record], tokenizer, tag2id: Mapping[str, int],
                     max_length: int, *, verbose: bool = False
                     ) -> tuple[TaggingDataset, TaggingReport]:
    """Tokenize tagging records (pre-split words) with their special tokens and aligned labels.

    tokenizer:  a fast HF tokenizer (it must report `word_ids`). A byte-level BPE tokenizer
                (GPT-2, RoBERTa) must be loaded with add_prefix_space=True, or every word
                would be tokenized as if it began the text; that is checked, not assumed.
    tag2id:     tag -> class id, e.g. {t: i for i, t in enumerate(data.tag_set(records))}.
    max_length: tokens per example, special tokens included. A longer example loses its
                last content tokens (always the end: a cut at the start would leave a word's
                tail sub-token as its first) and is counted in `report.truncated`; whole
                words lost are listed in `report.words_cut`.
    Every record gives one example, in order. Raises ValueError for a slow tokenizer, a
    record that is not a tagging record, a tag missing from tag2id, or a max_length that
    leaves no room for a word.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("entity tagging needs a fast tokenizer (one that reports word_ids); "
                         "load it with use_fast=True")
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    if max_length <= specials:
        raise ValueError(f"max_length={max_length} leaves no room for a word after the "
                         f"tokenizer's {specials} special tokens")
    for record in records:
        if record.format != "tagging":
            raise ValueError(f"{record.where}: a {record.format!r} record, not a tagging record")
        unknown = [t for t in record.data["tags"] if t not in tag2id]
        if unknown:
            raise ValueError(f"{record.where}: tag {unknown[0]!r} is not in the tag set "
                             f"({', '.join(tag2id)})")
    _check_pre_split_words(tokenizer)

    # 1. tokenize whole; truncation is done below, from the right, where it is counted
    words = [r.data["tokens"] for r in records]
    encoded = tokenizer(words, is_split_into_words=True, verbose=False) if words else None

    report = TaggingReport(max_length=max_length, total=len(records))
    examples, where, all_word_ids, n_words = [], [], [], []
    for i, record in enumerate(records):
        ids, word_ids = list(encoded["input_ids"][i]), encoded.word_ids(i)
        # 2. keep the leading and trailing special tokens, cut the content between them
        if len(ids) > max_length:
            head = next(k for k, w in enumerate(word_ids) if w is not None)
            tail = next(k for k, w in enumerate(reversed(word_ids)) if w is not None)
            keep = max_length - head - tail
            end = len(ids) - tail
            ids = ids[:head + keep] + ids[end:]
            word_ids = word_ids[:head + keep] + word_ids[end:]
            report.truncated += 1
            lost = len(record.data["tokens"]) - (max(w for w in word_ids if w is not None) + 1)
            if lost:
                report.words_cut.append((record.where, lost))
        # 3. the first sub-token of each word carries its tag
        tag_ids = [tag2id[t] for t in record.data["tags"]]
        examples.append({"input_ids": torch.tensor(ids, dtype=torch.long),
                         "labels": torch.tensor(align_labels(word_ids, tag_ids), dtype=torch.long)})
        where.append(record.where)
        all_word_ids.append(list(word_ids))
        n_words.append(len(record.data["tokens"]))
    report.kept = len(examples)
    if verbose:
        print(report)
    return TaggingDataset(examples, where, all_word_ids, n_words), report


_PREFIX_SPACE_HINT = ("a byte-level BPE tokenizer (GPT-2's, RoBERTa's) must be loaded with "
                      "add_prefix_space=True to tokenize pre-split words: "
                      "AutoTokenizer.from_pretrained(..., add_prefix_space=True)")


def _check_pre_split_words(tokenizer) -> None:
    """Raise if words given one by one tokenize unlike the same words in running text.

    transformers 4 refuses pre-split words for a byte-level BPE tokenizer without
    add_prefix_space; transformers 5 accepts them and tokenizes each word without its
    leading space ("Paris" instead of "ĠParis"), tokens the model seldom saw in pretraining.
    Two words show it.
    """
    try:
        split = tokenizer(["a", "a"], is_split_into_words=True, add_special_tokens=False)
    except (AssertionError, ValueError) as exc:
        if "add_prefix_space" in str(exc):
            raise ValueError(_PREFIX_SPACE_HINT) from exc
        raise
    joined = tokenizer("a a", add_special_tokens=False)
    if list(split["input_ids"]) != list(joined["input_ids"]):
        raise ValueError(f"this tokenizer cuts the words ['a', 'a'] given one by one into "
                         f"{list(split['input_ids'])} but the text 'a a' into "
                         f"{list(joined['input_ids'])}: a model would see its words unlike "
                         f"in running text. {_PREFIX_SPACE_HINT}")


# --------------------------------------------------------------------------- metrics

def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities of one BIO / IOB2 sequence as (type, start, end), end exclusive, in order.

    "B-X" always starts an X entity; "I-X" continues the entity before it if that is an X,
    else starts one (conlleval); "O" is outside. Any other tag raises ValueError.
    """
    spans: list[tuple[str, int, int]] = []
    kind, start = None, 0
    for i, tag in enumerate(tags):
        prefix, dash, name = tag.partition("-")
        if tag != "O" and not (dash and prefix in ("B", "I") and name):
            raise ValueError(f"tag {i} is {tag!r}, not a BIO tag (O, B-TYPE or I-TYPE)")
        if prefix == "I" and name == kind:
            continue
        if kind is not None:
            spans.append((kind, start, i))
        kind, start = (None, i) if tag == "O" else (name, i)
    if kind is not None:
        spans.append((kind, start, len(tags)))
    return spans


def entity_metrics(true: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """Entity-level precision / recall / F1 (exact span and type) and token accuracy.

    true, pred: word tags, one sequence per sentence, each pred as long as its true one.
    Returns {"precision", "recall", "f1": micro over all entities, "per_type": {type:
    {"precision", "recall", "f1", "support"}} for every type in true or pred, sorted,
    "token_accuracy": right tags / words, "entities": true entities, "predicted": predicted
    entities, "correct": exact matches}. A ratio with a zero denominator is 0.0.
    """
    if len(true) != len(pred):
        raise ValueError(f"{len(true)} true sequences but {len(pred)} predicted ones")
    n_true, n_pred, n_correct = Counter(), Counter(), Counter()
    right = words = 0
    for i, (t, p) in enumerate(zip(true, pred)):
        if len(t) != len(p):
            raise ValueError(f"sequence {i}: {len(t)} true tags but {len(p)} predicted ones")
        true_spans, pred_spans = set(entity_spans(t)), set(entity_spans(p))
        n_true.update(kind for kind, _, _ in true_spans)
        n_pred.update(kind for kind, _, _ in pred_spans)
        n_correct.update(kind for kind, _, _ in true_spans & pred_spans)
        right += sum(a == b for a, b in zip(t, p))
        words += len(t)
    per_type = {kind: {**_prf(n_correct[kind], n_pred[kind], n_true[kind]),
                       "support": n_true[kind]}
                for kind in sorted(n_true.keys() | n_pred.keys())}
    total_true, total_pred, total_correct = (sum(c.values()) for c in (n_true, n_pred, n_correct))
    return {**_prf(total_correct, total_pred, total_true), "per_type": per_type,
            "token_accuracy": right / words if words else 0.0, "entities": total_true,
            "predicted": total_pred, "correct": total_correct}


def _prf(correct: int, predicted: int, actual: int) -> dict[str, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
