"""Few-shot prompting, the baseline a fine-tune has to beat: each test prompt is preceded by K
solved training examples ("shots") and the model's greedy completion is scored as usual.

Which shots: a test record gets its own K shots, drawn without replacement from the pool by a
random generator seeded with (seed, the record's content). The choice is therefore
deterministic for a seed, independent of the record's position and of the other test records,
and differs between records (as lm-evaluation-harness draws them): one unlucky fixed set does
not decide the figure. Another seed draws other shots.

Never the test split: shots come from the pool only (the training split in `trilora train`,
`--shots-data` in `trilora eval`), and a pool record equal to any test record (equal fields
once whitespace at the ends of strings is ignored: the cleaning's duplicate rule) is left out
of the pool and counted.

How a prompt looks:
    with a chat template (the tokenizer has one; `chat=` overrides): every shot becomes earlier
        user / assistant turns (a chat record: its turns up to its last answer, system turns
        left out; any other record: its prompt, as the record's template writes it, as the user
        turn and its answer as the assistant's), the test record's own system turn first and its
        turns last, then the template's generation prompt;
    without: "prompt + answer" blocks in the records' template, each followed by a blank line,
        then the test prompt, all after the bos token (as the zero-shot prompt has it).

Length budget: a prompt and the answer must fit max_length, so the prompt has at most
max_length - max_new_tokens tokens. A prompt that does not fit drops its longest shots first
(the fewest shots dropped), and the report counts the prompts left with fewer than K; a test
prompt longer than the budget on its own keeps its last tokens and no shot (as zero-shot
evaluation cuts it).

Few-shot prompting needs a causal LM that writes its answer: records with an answer to write
(prompt/completion, instruction/output, chat, text/label). Classification and tagging heads
and plain-text records (scored by perplexity) have nothing to put in a prompt: `check_few_shot`
refuses them with one clear error.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Sequence

from .data import Record, _stripped
from .data_tokenize import prompt_ids, render_prompt_completion

ANSWER_FORMATS = ("alpaca", "prompt_completion", "chat", "classification")  # records with an answer to write


@dataclass
class FewShotPrompt:
    """One test record's few-shot prompt: its token ids, the reference answer, the shots used."""

    record: Record
    ids: list[int]
    reference: str
    shots: list[Record]


@dataclass
class FewShotReport:
    """What `build_few_shot_prompts` did: K asked, prompts built, how many had to drop shots to fit
    the length budget (and how many shots in all), pool records left out as equal to a test record."""

    k: int
    seed: int
    chat: bool
    budget: int
    pool: int = 0
    prompts: int = 0
    fewer_than_k: int = 0
    shots_dropped: int = 0
    excluded: list[str] = field(default_factory=list)  # where the left-out pool records came from

    def __str__(self) -> str:
        text = (f"few-shot: {self.prompts} prompts with {self.k} shots each (seed {self.seed}, from a pool of "
                f"{self.pool}; {'as chat turns' if self.chat else 'as prompt + answer blocks'}, "
                f"at most {self.budget} prompt tokens)")
        if self.fewer_than_k:
            text += (f"; {self.fewer_than_k} prompts got fewer than {self.k} shots ({self.shots_dropped} shots "
                     f"dropped to fit the length budget)")
        if self.excluded:
            text += f"; {len(self.excluded)} pool records equal to a test record left out (first: {self.excluded[0]})"
        return text

    def to_dict(self) -> dict:
        return {"k": self.k, "seed": self.seed, "chat_template": self.chat, "prompt_budget": self.budget,
                "pool": self.pool, "prompts_with_fewer_shots": self.fewer_than_k,
                "shots_dropped": self.shots_dropped, "pool_excluded": len(self.excluded)}


def record_key(record: Record) -> str:
    """The record's identity for "never the test split": its format and fields, whitespace at the
    ends of strings ignored (what cleaning calls a duplicate)."""
    return json.dumps([record.format, _stripped(record.data)], sort_keys=True, ensure_ascii=False, default=str)


def check_few_shot(k: int, test_records: Sequence[Record], pool_size: int | None = None,
                   task: str = "generate", pool_name: str = "the shot pool") -> None:
    """Raise ValueError (one line) unless K-shot prompting applies: K >= 0, a causal LM that writes
    its answer (`task` "generate"), test records with an answer, and at least K pool records
    (`pool_size`, when known)."""
    if k < 0:
        raise ValueError(f"--few-shot must be >= 0 (the number of examples in each prompt), got {k}")
    if k == 0:
        return
    if task != "generate":
        raise ValueError(f"--few-shot {k}: few-shot prompting needs a causal LM that writes its answer; "
                         f"--task {task} predicts with a head, which reads no examples in its input")
    bad = next((r for r in test_records if r.format not in ANSWER_FORMATS), None)
    if bad is not None:
        raise ValueError(f"--few-shot {k}: {bad.where} is a {bad.format} record with no answer to write "
                         f"(few-shot prompting takes {', '.join(ANSWER_FORMATS)} records)")
    if pool_size is not None and k > pool_size:
        raise ValueError(f"--few-shot {k} is larger than {pool_name} ({pool_size} usable records)")


def build_few_shot_prompts(test_records: Sequence[Record], shot_pool: Sequence[Record], tokenizer, k: int,
                           seed: int, max_length: int, *, max_new_tokens: int = 0, template: str | None = None,
                           chat: bool | None = None, separator: str = "\n\n", held_out: Sequence[Record] = ()
                           ) -> tuple[list[FewShotPrompt], FewShotReport]:
    """K-shot prompts (token ids) of `test_records`, with shots drawn from `shot_pool`.

    test_records:   the records to prompt (their reference answers are what is scored).
    shot_pool:      where the shots come from (training records; never the test split: a pool
                    record equal to a test record is left out and counted in the report; a
                    repeated record counts once).
    k:              shots per prompt (0: the zero-shot prompts, exactly as `prompt_ids` writes them).
    seed:           seeds each test record's draw (with the record's content; see the module docstring).
    max_length, max_new_tokens: a prompt has at most max(1, max_length - max_new_tokens) tokens;
                    shots are dropped, longest first, until it fits.
    template:       the records' prompt template (None: one per format), as in training.
    chat:           shots as earlier chat turns; None: when the tokenizer has a chat template
                    (chat records always need one).
    separator:      what follows each shot's block without a chat template.
    held_out:       more records no shot may equal (the whole test split, when `test_records`
                    is a sample of it).
    Returns ([FewShotPrompt per test record, in order], FewShotReport). Raises ValueError for a
    negative K, records without an answer, or fewer than K usable pool records.
    """
    check_few_shot(k, test_records)
    chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if not chat and any(r.format == "chat" for r in test_records):
        raise ValueError("chat records are prompted in the chat template: their shots are earlier turns (chat=False "
                         "asks for plain prompt + answer blocks)")
    budget = max(1, max_length - max_new_tokens)
    test_keys = {record_key(r) for r in [*test_records, *held_out]}
    pool, excluded, seen = [], [], set()
    for r in shot_pool:
        key = record_key(r)
        if r.format not in ANSWER_FORMATS or key in seen:
            continue  # plain text / tagging records hold no prompt and answer; a mix may repeat a record
        seen.add(key)
        if key in test_keys:
            excluded.append(r.where)
        else:
            pool.append(r)
    report = FewShotReport(k=k, seed=seed, chat=chat, budget=budget, pool=len(pool), excluded=excluded)
    if k:
        check_few_shot(k, test_records, len(pool), pool_name="the shot pool" + (
            f" left after removing {len(excluded)} records equal to test records" if excluded else ""))
    build = _chat_prompt if chat else _plain_prompt
    shot_cost = {}  # a shot's own length in tokens: the longest shots are dropped first

    def cost(i: int) -> int:
        if i not in shot_cost:
            shot_cost[i] = len(_shot_ids(pool[i], tokenizer, template, chat, separator))
        return shot_cost[i]

    prompts = []
    for record in test_records:
        chosen = _draw(len(pool), k, seed, record) if k else []
        while True:
            ids, reference = build(record, [pool[i] for i in chosen], tokenizer, template, separator)
            if len(ids) <= budget or not chosen:
                break
            longest = max(range(len(chosen)), key=lambda j: (cost(chosen[j]), j))
            chosen = chosen[:longest] + chosen[longest + 1:]
        if len(chosen) < k:
            report.fewer_than_k += 1
            report.shots_dropped += k - len(chosen)
        prompts.append(FewShotPrompt(record, ids[-budget:], reference, [pool[i] for i in chosen]))
    report.prompts = len(prompts)
    return prompts, report


def evaluate_few_shot(model, tokenizer, records: Sequence[Record], shot_pool: Sequence[Record], config, device,
                      k: int, seed: int, labels: Sequence[str] | None = None, chat: bool | None = None
                      ) -> tuple[dict, FewShotReport]:
    """The K-shot scores of `records` (a causal LM's greedy answers to K-shot prompts): exact
    match, or the classification metrics of generated labels (`labels`: the classes), over the
    first MAX_EVAL_GENERATIONS records, as zero-shot evaluation scores them.

    config: max_length, eval_max_new_tokens, template and batch_size as in `evaluate_split`.
    Returns (result, report): result holds k, seed, the metric(s), `generated`, the few-shot
    counts (`FewShotReport.to_dict`), the first examples with the locations of their shots, and
    the first prompt as the model read it (`example_prompt`)."""
    from .evaluate import (MAX_EVAL_GENERATIONS, classification_metrics, exact_match, generate_completions,
                           primary_metric_name)

    check_few_shot(k, records)
    sample = list(records[:MAX_EVAL_GENERATIONS])
    prompts, report = build_few_shot_prompts(sample, shot_pool, tokenizer, k, seed, config.max_length,
                                             max_new_tokens=config.eval_max_new_tokens, template=config.template,
                                             chat=chat, held_out=records)
    predictions = generate_completions(model, tokenizer, [p.ids for p in prompts], config.eval_max_new_tokens,
                                       device, batch_size=max(config.batch_size, 32))
    references = [p.reference for p in prompts]
    result = report.to_dict()
    metric, _ = primary_metric_name(records)
    if metric == "accuracy":
        result.update(classification_metrics(predictions, references, labels))
    else:
        result["exact_match"] = exact_match(predictions, references)
    result["generated"] = len(sample)
    result["examples"] = [{"reference": p.reference, "prediction": pred, "shots": [s.where for s in p.shots]}
                          for p, pred in list(zip(prompts, predictions))[:5]]
    result["example_prompt"] = tokenizer.decode(prompts[0].ids) if prompts else None
    return result, report


def _draw(n: int, k: int, seed: int, record: Record) -> list[int]:
    """K distinct pool indices, seeded by (seed, the record's content)."""
    digest = hashlib.sha256(f"{seed}\0{record_key(record)}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).sample(range(n), k)


def _turns(record: Record, template: str | None) -> list[dict]:
    """A record as chat turns ending in its (last) answer: a chat record's turns up to its last
    assistant turn, system turns left out; another record's prompt (in its template) and answer."""
    if record.format == "chat":
        messages = record.data["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return [m for m in messages[:last + 1] if m["role"] != "system"]
    prompt, answer = render_prompt_completion(record, template)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _chat_prompt(record: Record, shots: list[Record], tokenizer, template, separator) -> tuple[list[int], str]:
    """The shots as earlier turns of the test record's conversation; ids as `prompt_ids` cuts them
    (the rendered conversation up to the generation prompt of the last answer)."""
    system = [m for m in record.data["messages"] if m["role"] == "system"][:1] if record.format == "chat" else []
    messages = system + [m for shot in shots for m in _turns(shot, template)] + _turns(record, template)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{record.where}: few-shot chat turns need a tokenizer with a chat_template")
    return prompt_ids(Record(data={"messages": messages}, format="chat", where=record.where), tokenizer)


def _plain_prompt(record: Record, shots: list[Record], tokenizer, template, separator) -> tuple[list[int], str]:
    """bos, then each shot's "prompt + answer" block and separator, then the zero-shot prompt."""
    ids, reference = prompt_ids(record, tokenizer, template)
    bos = 1 if tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id] else 0
    shot_ids = [i for shot in shots for i in _shot_ids(shot, tokenizer, template, False, separator)]
    return ids[:bos] + shot_ids + ids[bos:], reference


def _shot_ids(shot: Record, tokenizer, template, chat: bool, separator: str) -> list[int]:
    """The tokens one shot adds: its block (plain) or its rendered turns (chat, an estimate)."""
    if chat:
        text = tokenizer.apply_chat_template(_turns(shot, template), tokenize=False)
    elif shot.format == "chat":
        raise ValueError(f"{shot.where}: a chat record as a shot needs a tokenizer with a chat_template")
    else:
        text = "".join(render_prompt_completion(shot, template)) + separator
    return tokenizer(text, add_special_tokens=False)["input_ids"]


__all__ = ["ANSWER_FORMATS", "FewShotPrompt", "FewShotReport", "build_few_shot_prompts", "check_few_shot",
           "evaluate_few_shot", "record_key"]
