"""Chat data end to end with a real chat template, prompts kept byte for byte, --template
escapes, generate's chat mode and output, TRILORA_DEBUG (issue 11's defects)."""
import json
import shutil

import pytest
from _data_helpers import char_tokenizer
from _trainer_helpers import DEMO_MODEL, fast_args, run_cli, write_jsonl

from trilora.demo.task import demo_dataset
from trilora.trainer import IGNORE_INDEX, load_records, prompt_ids, tokenize_records
from trilora.trainer.config import unescape

# Only characters of the demo model's vocabulary; the generation prompt ends in a newline, as
# ChatML's "<|im_start|>assistant\n" does.
DEMO_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n"
                      "{% endfor %}{% if add_generation_prompt %}assistant:\n{% endif %}")


@pytest.fixture
def chat_model(tmp_path):
    """The demo model directory with a chat template in its tokenizer files."""
    model = tmp_path / "chat-model"
    shutil.copytree(DEMO_MODEL, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = DEMO_CHAT_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


def chat_rows(path, n=60):
    rows = [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["completion"].strip()}]}
            for r in demo_dataset(n, 7)]
    return write_jsonl(path, rows)


def test_chat_data_trains_and_evaluates_with_a_real_chat_template(tmp_path, chat_model):
    """transformers 5 returns a BatchEncoding (a Mapping, not a dict) from a tokenizing
    apply_chat_template; evaluation once took its keys as token ids and crashed."""
    data = chat_rows(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    code, stdout, err = run_cli(fast_args(out, data, steps=2, model=chat_model, max_length=48))
    assert code == 0, err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["primary_metric"] == "exact_match" and summary["test_after"]["generated"] > 0
    report = tmp_path / "eval.json"
    code, _, err = run_cli(["eval", "--model", chat_model, "--adapter", out / "adapter", "--data", data,
                            "--kernel-backend", "torch", "--max-new-tokens", "4", "--output", report])
    assert code == 0, err[-2000:]
    assert json.loads(report.read_text())["generated"] == 60


def test_prompt_ids_are_the_tokens_training_masks():
    """Evaluation generates from exactly the prompt training saw: the masked prefix."""
    tok = char_tokenizer()
    chat, _ = load_records([{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi "},
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "done\n"}]}])
    plain, _ = load_records([{"prompt": "Q: x\n", "completion": " y"}])
    for record in chat + plain:
        data, _ = tokenize_records([record], tok, 256, chat_masking="last")
        labels = data[0]["labels"].tolist()
        first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        ids, reference = prompt_ids(record, tok)
        assert ids == data[0]["input_ids"][:first_trained].tolist()
        assert reference == ("done\n" if record.format == "chat" else " y")


def test_prompts_and_completions_are_kept_byte_for_byte(tmp_path):
    rows = [{"prompt": "<|user|>hi<|end|>\n<|assistant|>\n", "completion": " there \n"},
            {"instruction": "  indented\n", "input": "\tx", "output": "y"}]
    pc, _ = load_records([rows[0]])
    alpaca, _ = load_records([rows[1]])
    assert pc[0].data == rows[0] and alpaca[0].data == rows[1]
    chat, _ = load_records([{"messages": [{"role": "user", "content": " a \n"},
                                          {"role": "assistant", "content": "b\n"}]}])
    assert [m["content"] for m in chat[0].data["messages"]] == [" a \n", "b\n"]
    # the prompt's trailing newline reaches the tokens
    ids, _ = prompt_ids(pc[0], char_tokenizer())
    assert char_tokenizer().decode(ids).endswith("<|assistant|>\n")
    # cleaning still drops: whitespace-only is empty, near-duplicates are duplicates
    _, report = load_records([{"prompt": "p", "completion": "c"}, {"prompt": "p ", "completion": "c\n"},
                              {"prompt": " \n", "completion": "c"}])
    assert report.duplicate_at == [1] and report.empty_at == [2]


def test_template_flag_reads_escapes():
    assert unescape(r"Q: {question}\nA:\t") == "Q: {question}\nA:\t"
    assert unescape(r"a\\nb") == "a\\nb"  # an escaped backslash stays a backslash
    from trilora.cli import build_parser
    from trilora.trainer.config import config_from_args
    args = build_parser().parse_args(["train", "--template", r"Q: {prompt}\nA:"])
    assert config_from_args(args).template == "Q: {prompt}\nA:"
    args = build_parser().parse_args(["eval", "--data", "x.jsonl", "--template", r"{prompt}\n"])
    assert args.template == "{prompt}\n"


def test_generate_chat_mode_and_separated_output(chat_model):
    code, stdout, err = run_cli(["generate", "--model", chat_model, "--kernel-backend", "torch",
                                 "--max-new-tokens", "3", "--prompt", "rotate: ab =", "--json"])
    assert code == 0, err
    plain = json.loads(stdout)
    assert plain["prompt"] == "rotate: ab =" and len(plain["completion"]) <= 3
    code, stdout, err = run_cli(["generate", "--model", chat_model, "--kernel-backend", "torch",
                                 "--max-new-tokens", "3", "--prompt", "rotate: ab =", "--chat"])
    assert code == 0, err
    assert stdout.startswith("### prompt\nrotate: ab =\n### completion\n")
    code, _, err = run_cli(["generate", "--model", DEMO_MODEL, "--kernel-backend", "torch",
                            "--prompt", "x", "--chat"])
    assert code == 2 and "has no chat template" in err


def test_trilora_debug_environment_variable_shows_the_traceback(tmp_path, monkeypatch):
    args = ["eval", "--data", tmp_path / "missing.jsonl", "--kernel-backend", "torch"]
    code, _, err = run_cli(args)
    assert code == 2 and "Traceback" not in err and "data file not found" in err
    monkeypatch.setenv("TRILORA_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        run_cli(args)
