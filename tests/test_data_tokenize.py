"""Prompt masking, chat masking, templates and truncation (trilora.trainer.data_tokenize)."""
import pytest

from _data_helpers import char_tokenizer
from trilora.trainer import (IGNORE_INDEX, load_records, render_prompt_completion,
                             tokenize_records)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def split_by_mask(tok, example):
    """(decoded untrained tokens, decoded trained tokens), checking labels == ids where trained."""
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    assert len(ids) == len(labels)
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert trained == [label for label in labels if label != IGNORE_INDEX]
    untrained = [i for i, label in zip(ids, labels) if label == IGNORE_INDEX]
    return tok.decode(untrained), tok.decode(trained)


def test_alpaca_prompt_is_masked_exactly(tok):
    records, _ = load_records([{"instruction": "Add", "input": "1 2", "output": "3"},
                               {"instruction": "Greet", "output": "hello there"}])
    data, report = tokenize_records(records, tok, max_length=128)
    assert (report.kept, report.truncated, report.dropped) == (2, 0, [])
    prompt, completion = split_by_mask(tok, data[0])
    assert prompt == "<s>### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n"
    assert completion == "3</s>"
    # The masked tokens are exactly the prompt's tokens (bos + template), all at the front.
    ids, labels = data[0]["input_ids"].tolist(), data[0]["labels"].tolist()
    n_prompt = 1 + len(tok(prompt.removeprefix("<s>"), add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    prompt, completion = split_by_mask(tok, data[1])  # empty input: the no-input template
    assert prompt == "<s>### Instruction:\nGreet\n\n### Response:\n"
    assert completion == "hello there</s>"
    assert data.lengths == [len(data[0]["input_ids"]), len(data[1]["input_ids"])]


def test_custom_template_with_extra_column(tok):
    records, _ = load_records([{"prompt": "2+2", "completion": "4", "lang": "en"}])
    data, _ = tokenize_records(records, tok, 64, template="[{lang}] Q: {prompt}\nA: ",
                               add_bos=False)
    assert split_by_mask(tok, data[0]) == ("[en] Q: 2+2\nA: ", "4</s>")


def test_classification_is_text_to_label(tok):
    records, _ = load_records([{"text": "great film", "label": "pos"}])
    assert render_prompt_completion(records[0]) == ("### Text:\ngreat film\n\n### Label:\n",
                                                    "pos")
    data, _ = tokenize_records(records, tok, 64)
    assert split_by_mask(tok, data[0])[1] == "pos</s>"


def test_plain_text_trains_every_token(tok):
    records, _ = load_records([{"text": "all of it"}])
    data, _ = tokenize_records(records, tok, 64)
    assert split_by_mask(tok, data[0]) == ("<s>", "all of it</s>")  # bos is never predicted


CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"},
                {"role": "assistant", "content": "ok"}]


def test_chat_last_turn_masking(tok):
    records, _ = load_records([{"messages": CONVERSATION}])
    data, _ = tokenize_records(records, tok, 256, chat_masking="last")
    prompt, completion = split_by_mask(tok, data[0])
    assert completion == "ok<|end|>\n</s>"
    assert tok.decode(data[0]["input_ids"]) == \
        tok.apply_chat_template(CONVERSATION, tokenize=False) + "</s>"
    assert prompt == tok.apply_chat_template(CONVERSATION[:4], tokenize=False,
                                             add_generation_prompt=True)


def test_chat_all_assistant_turns_masking(tok):
    records, _ = load_records([{"messages": CONVERSATION}])
    data, _ = tokenize_records(records, tok, 256, chat_masking="all")
    _, completion = split_by_mask(tok, data[0])
    assert completion == "yo<|end|>\nok<|end|>\n</s>"
    labels = data[0]["labels"].tolist()
    trained_runs = sum(1 for a, b in zip([IGNORE_INDEX] + labels, labels)
                       if a == IGNORE_INDEX and b != IGNORE_INDEX)
    assert trained_runs == 2  # two separate assistant spans, the user turn between masked


def test_chat_template_that_ends_turns_with_eos_gets_no_second_eos():
    tok = char_tokenizer("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    records, _ = load_records([{"messages": CONVERSATION[1:3]}])
    data, _ = tokenize_records(records, tok, 64)
    assert split_by_mask(tok, data[0]) == ("<|user|>hi</s><|assistant|>", "yo</s>")


def test_truncation_and_prompt_too_long_are_reported(tok):
    records, _ = load_records([
        {"prompt": "short", "completion": "a fairly long completion"},      # truncated
        {"prompt": "x" * 40, "completion": "unreachable"},                  # dropped
        {"prompt": "p", "completion": "c"},                                 # untouched
    ])
    data, report = tokenize_records(records, tok, max_length=16)
    assert (report.total, report.kept, report.truncated) == (3, 2, 1)
    assert report.dropped == [("records[1]", "prompt is 41 tokens, filling max_length=16")]
    assert data.lengths == [16, 4] and data.where == ["records[0]", "records[2]"]
    assert split_by_mask(tok, data[0]) == ("<s>short", "a fairly l")  # cut from the right
    assert "truncated 1, dropped 1" in str(report) and "records[1]: prompt is 41" in str(report)


# --------------------------------------------------------------------------- bad input

def test_sequence_too_short_for_every_prompt(tok):
    records, _ = load_records([{"instruction": "a long instruction", "output": "x"}] +
                              [{"instruction": "another one", "output": "y"}])
    with pytest.raises(ValueError, match="sequence length too short for the prompt: "
                                         "max_length=8"):
        tokenize_records(records, tok, max_length=8)


def test_missing_template_field_names_field_and_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b", "context": "c"}\n'
                    '{"instruction": "a2", "output": "b2"}\n')
    records, _ = load_records(path)
    with pytest.raises(ValueError, match=r"prompt template field \{context\} is missing in "
                                         r"record .*d\.jsonl:2 \(its fields: input, "
                                         r"instruction, output\)"):
        tokenize_records(records, tok, 64, template="{context}\n{instruction}\n")


def test_positional_template_field_is_rejected(tok):
    records, _ = load_records([{"prompt": "p", "completion": "c"}])
    with pytest.raises(ValueError, match="prompt template fields must be named"):
        tokenize_records(records, tok, 64, template="Q: {}")


def test_chat_needs_a_template_and_a_prefix_stable_one():
    records, _ = load_records([{"messages": CONVERSATION}])
    with pytest.raises(ValueError, match="chat records need a tokenizer with a chat_template"):
        tokenize_records(records, char_tokenizer(chat_template=None), 256)
    # The generation prompt adds a newline that the rendered assistant turn lacks.
    unstable = char_tokenizer("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                              "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
                              "{% endif %}")
    with pytest.raises(ValueError, match="not prefix-stable"):
        tokenize_records(records, unstable, 256)


def test_bad_tokenize_arguments(tok):
    records, _ = load_records([{"text": "t"}])
    with pytest.raises(ValueError, match="chat_masking must be one of"):
        tokenize_records(records, tok, 64, chat_masking="user")
    with pytest.raises(ValueError, match="max_length must be positive"):
        tokenize_records(records, tok, 0)


@pytest.mark.parametrize("template, error", [
    ("{prompt[999]}", "IndexError"),       # indexes past the field's text
    ("{prompt.upper.x}", "AttributeError"),
    ("{prompt:d}", "ValueError"),          # a format spec the value does not take
])
def test_template_that_does_not_apply_to_a_record_names_template_and_record(tmp_path, tok, template, error):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n')
    records, _ = load_records(path)
    with pytest.raises(ValueError, match=rf"prompt template .* does not apply to record "
                                         rf".*t\.jsonl:1: {error}"):
        tokenize_records(records, tok, 64, template=template)
