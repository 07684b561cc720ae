"""Turn cleaned records into token ids with the prompt masked out of the loss.

Each record becomes a list of text segments, each either in the loss or not:

    alpaca / prompt_completion / classification:
        [prompt template filled from the record]  -> not trained (labels -100)
        [output / completion / label] + eos        -> trained
    text:  [the text] + eos                        -> all trained
    chat:  the tokenizer's chat template, cut at turn boundaries. chat_masking="last"
           trains only the final assistant turn (prompt = every earlier turn, the
           generation prompt included); "all" trains every assistant turn and masks only
           the system / user / tool turns and the template's role headers.

Segments are tokenized separately and concatenated, so the mask boundary falls exactly
between prompt and completion tokens even where a BPE merge could span them in the joined
text. The model still learns to stop: eos is appended to the completion (for chat, unless
the template already ends the turn with the eos token).
"""
from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..kernels.cross_entropy import IGNORE_INDEX  # the label value no loss counts
from .data import Record


DEFAULT_TEMPLATES = {
    "alpaca": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    # Used instead of "alpaca" for a record with an empty input, unless a template is given.
    "alpaca_no_input": "### Instruction:\n{instruction}\n\n### Response:\n",
    "prompt_completion": "{prompt}",
    "classification": "### Text:\n{text}\n\n### Label:\n",
}
_COMPLETION_FIELD = {"alpaca": "output", "prompt_completion": "completion",
                     "classification": "label"}
CHAT_MASKING = ("last", "all")


@dataclass
class TokenizationReport:
    """Counts from `tokenize_records`; `dropped` holds (record location, reason) pairs."""

    max_length: int
    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        text = (f"tokenized {self.total} records at max_length={self.max_length}: kept "
                f"{self.kept}, truncated {self.truncated}, dropped {len(self.dropped)}")
        if self.dropped:
            text += "\n" + "\n".join(f"  {where}: {why}" for where, why in self.dropped)
        return text


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenized examples; item i is {"input_ids": int64 [T], "labels": int64 [T]}.

    labels equal input_ids on trained tokens and IGNORE_INDEX elsewhere (not shifted: HF
    causal-LM heads shift inside their loss). `lengths[i]` is T of item i and `where[i]`
    the source location of its record.
    """

    def __init__(self, examples: Sequence[dict[str, torch.Tensor]], where: Sequence[str] = ()):
        self.examples = list(examples)
        self.lengths = [len(e["input_ids"]) for e in self.examples]
        self.where = list(where) or [f"example {i}" for i in range(len(self.examples))]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.examples[index]


def render_prompt_completion(record: Record, template: str | None = None) -> tuple[str, str]:
    """(prompt, completion) text of a non-chat record; "text" records have an empty prompt.

    template: a str.format string over the record's fields (extra columns included), e.g.
    "Q: {question}\\nA: "; None uses DEFAULT_TEMPLATES. A field the record lacks raises a
    ValueError naming the field and the record's location.
    """
    if record.format == "chat":
        raise ValueError(f"{record.where}: chat records are rendered by the chat template")
    if record.format == "text":
        return "", record.data["text"]
    if template is None:
        key = record.format
        if key == "alpaca" and not record.data["input"]:
            key = "alpaca_no_input"
        template = DEFAULT_TEMPLATES[key]
    return _fill(template, record), record.data[_COMPLETION_FIELD[record.format]]


def prompt_ids(record: Record, tokenizer, template: str | None = None,
               add_bos: bool = True) -> tuple[list[int], str]:
    """(prompt token ids, reference completion) of a record, for generation.

    The ids are exactly the tokens `tokenize_records` puts before the trained completion (the
    same segments, tokenized the same way), so a model is evaluated on the prompt it was
    trained on. For chat, the prompt is every turn before the last assistant turn plus the
    generation prompt, and the reference that turn's content.
    """
    if record.format == "chat":
        segments = _chat_segments(record, tokenizer, "last")[:-1]
        reference = [m for m in record.data["messages"] if m["role"] == "assistant"][-1]["content"]
        bos = []
    else:
        prompt, reference = render_prompt_completion(record, template)
        segments = [(prompt, False)] if prompt else []
        bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    texts = [text for text, _ in segments]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return bos + [i for piece in encoded for i in piece], reference


def tokenize_records(records: Sequence[Record], tokenizer, max_length: int, *,
                     template: str | None = None, chat_masking: str = "last",
                     add_bos: bool = True, verbose: bool = False
                     ) -> tuple[TokenizedDataset, TokenizationReport]:
    """Tokenize records into a TokenizedDataset, truncating to max_length tokens.

    tokenizer:    a HF tokenizer (fast or slow) with an eos token; chat records also need
                  its chat_template.
    template:     prompt template for alpaca / prompt_completion / classification records.
    chat_masking: "last" or "all" (see the module docstring).
    add_bos:      prepend the tokenizer's bos token (if it has one) to non-chat records;
                  chat templates write their own.
    Too-long examples are cut from the right and counted as truncated; one whose prompt
    alone fills max_length, leaving no trained token, is dropped with the reason. If that
    drops every example: ValueError "sequence length too short for the prompt".
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if chat_masking not in CHAT_MASKING:
        raise ValueError(f"chat_masking must be one of {CHAT_MASKING}, got {chat_masking!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token")

    # 1. render every record into (text, trained) segments
    all_segments = [_segments(r, tokenizer, template, chat_masking) for r in records]
    # 2. tokenize all segment texts in one batched call (fast tokenizers parallelize it)
    texts = [text for segments in all_segments for text, _ in segments]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])

    report = TokenizationReport(max_length=max_length, total=len(records))
    examples, where = [], []
    for record, segments in zip(records, all_segments):
        # 3. concatenate segments; a segment's labels are its ids or IGNORE_INDEX
        ids: list[int] = []
        labels: list[int] = []
        if add_bos and record.format != "chat" and tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
            labels.append(IGNORE_INDEX)
        for _, trained in segments:
            piece = list(next(encoded))
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        if _needs_eos(record, segments, tokenizer):
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)

        # 4. truncate; an example whose prompt fills max_length has nothing left to learn
        prompt_tokens = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX),
                             len(labels))
        if prompt_tokens >= max_length:
            report.dropped.append((record.where, f"prompt is {prompt_tokens} tokens, filling "
                                                 f"max_length={max_length}"))
            continue
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            report.truncated += 1
        examples.append({"input_ids": torch.tensor(ids, dtype=torch.long),
                         "labels": torch.tensor(labels, dtype=torch.long)})
        where.append(record.where)

    report.kept = len(examples)
    if verbose:
        print(report)
    if records and not examples:
        raise ValueError(f"sequence length too short for the prompt: max_length={max_length} "
                         f"leaves no completion token in any of the {len(records)} examples; "
                         "raise max_length or shorten the prompt template")
    return TokenizedDataset(examples, where), report


def _fill(template: str, record: Record) -> str:
    """str.format of template with the record's fields; a missing field is a clear error."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"bad prompt template {template!r}: {exc}") from exc
    for name in names:
        base = name.split(".")[0].split("[")[0]
        if not base:
            raise ValueError(f"prompt template fields must be named, e.g. {{instruction}}: "
                             f"{template!r}")
        if base not in record.data:
            raise ValueError(f"prompt template field {{{base}}} is missing in record "
                             f"{record.where} (its fields: {', '.join(sorted(record.data))})")
    try:
        return template.format_map(record.data)
    except (IndexError, KeyError, AttributeError, TypeError, ValueError) as exc:
        # `{prompt[999]}`, `{label.x}`, `{prompt:d}`: the field exists but the template's
        # index, attribute or format spec does not apply to this record's value
        why = str(exc) or type(exc).__name__
        raise ValueError(f"prompt template {template!r} does not apply to record "
                         f"{record.where}: {type(exc).__name__}: {why}") from None


def _segments(record: Record, tokenizer, template: str | None,
              chat_masking: str) -> list[tuple[str, bool]]:
    if record.format != "chat":
        prompt, completion = render_prompt_completion(record, template)
        return ([(prompt, False)] if prompt else []) + [(completion, True)]
    return _chat_segments(record, tokenizer, chat_masking)


def _chat_segments(record: Record, tokenizer, chat_masking: str) -> list[tuple[str, bool]]:
    """Cut the rendered conversation at every assistant turn's start and end.

    Works for any template that renders a conversation's prefix as a prefix of the full
    text ("prefix-stable"), which holds for the Llama / Qwen2 / Mistral templates. A
    template that rewrites earlier turns (e.g. drops old reasoning) raises.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{record.where}: chat records need a tokenizer with a chat_template")
    messages = record.data["messages"]

    def render(turns, generation_prompt):
        return tokenizer.apply_chat_template(turns, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    segments, done = [], ""
    for i in range(last + 1):
        if messages[i]["role"] != "assistant":
            continue
        before = render(messages[:i], True)  # ... + the assistant header
        after = render(messages[: i + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise ValueError(f"{record.where}: the chat template is not prefix-stable (the "
                             "rendering of the first turns is not a prefix of the rendering "
                             "of more turns), so the assistant turns cannot be masked apart")
        segments.append((before[len(done):], False))
        segments.append((after[len(before):], chat_masking == "all" or i == last))
        done = after
    return [(text, trained) for text, trained in segments if text]


def _needs_eos(record: Record, segments: list[tuple[str, bool]], tokenizer) -> bool:
    if record.format != "chat":
        return True
    return not segments[-1][0].rstrip().endswith(tokenizer.eos_token)
