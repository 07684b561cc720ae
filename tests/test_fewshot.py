"""Few-shot prompting as the baseline (`trilora.trainer.fewshot`, `trilora eval --few-shot K
--shots-data FILE`, `trilora train --few-shot K`): shots never from the test split, drawn by
seed, within the length budget, as chat turns where the tokenizer has a chat template."""
import json
import shutil

import pytest
from _data_helpers import char_tokenizer
from _trainer_helpers import DEMO_MODEL, demo_data, fast_args, run_cli, write_jsonl

from trilora.demo.task import demo_dataset, random_words, task_records
from trilora.trainer import load_records, load_splits, prompt_ids
from trilora.trainer.fewshot import build_few_shot_prompts, check_few_shot
from trilora.trainer.loading import load_tokenizer

# Only characters of the demo model's vocabulary (as in test_chat_and_prompts.py)
DEMO_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n"
                      "{% endfor %}{% if add_generation_prompt %}assistant:\n{% endif %}")


@pytest.fixture(scope="module")
def demo_tokenizer():
    return load_tokenizer(DEMO_MODEL)


@pytest.fixture(scope="module")
def split():
    """(test, train) records of the demo task, loaded from two lists."""
    rows = demo_dataset(80, 11)
    test, _ = load_records(rows[:10])
    train, _ = load_records(rows[10:])
    return test, train


def _shots(prompts):
    return [[s.where for s in p.shots] for p in prompts]


def test_shots_never_come_from_the_test_split(split, demo_tokenizer):
    test, train = split
    # the pool also holds copies of three test records (whitespace at the ends differs): never shots
    leaked, _ = load_records([{**r.data, "prompt": " " + r.data["prompt"]} for r in test[:3]])
    pool = train + leaked
    prompts, report = build_few_shot_prompts(test, pool, demo_tokenizer, 4, seed=0, max_length=400)
    assert report.pool == len(train) and len(report.excluded) == 3 and report.fewer_than_k == 0
    test_data = [r.data for r in test]
    for p in prompts:
        assert len(p.shots) == 4 and len({s.where for s in p.shots}) == 4
        assert all(s in train and s.data not in test_data for s in p.shots)
    # a sample of the test split: the rest of it is held out of the pool too
    _, report = build_few_shot_prompts(test[:2], train + test, demo_tokenizer, 2, 0, 400, held_out=test)
    assert report.pool == len(train) and len(report.excluded) == len(test)


def test_shots_are_drawn_by_seed_per_record(split, demo_tokenizer):
    test, train = split
    first = _shots(build_few_shot_prompts(test, train, demo_tokenizer, 3, seed=1, max_length=400)[0])
    again = _shots(build_few_shot_prompts(test, train, demo_tokenizer, 3, seed=1, max_length=400)[0])
    other = _shots(build_few_shot_prompts(test, train, demo_tokenizer, 3, seed=2, max_length=400)[0])
    assert first == again and first != other
    assert len({tuple(s) for s in first}) > 1  # each record draws its own shots
    # a record's shots depend on the record, not on its position or on the other test records
    alone = _shots(build_few_shot_prompts(test[5:6], train, demo_tokenizer, 3, seed=1, max_length=400)[0])
    assert alone == first[5:6]


def test_plain_prompt_is_the_shots_in_the_records_template_then_the_zero_shot_prompt(split, demo_tokenizer):
    test, train = split
    prompts, report = build_few_shot_prompts(test, train, demo_tokenizer, 2, 0, 400)
    assert not report.chat
    tok = demo_tokenizer
    for p, record in zip(prompts, test):
        zero, reference = prompt_ids(record, tok)
        blocks = "".join(s.data["prompt"] + s.data["completion"] + "\n\n" for s in p.shots)
        assert tok.decode(p.ids) == tok.decode(zero[:1]) + blocks + record.data["prompt"]
        assert p.ids[-(len(zero) - 1):] == zero[1:] and p.reference == reference
    # K = 0 is the zero-shot prompt, token for token
    zero_shot, _ = build_few_shot_prompts(test, train, tok, 0, 0, 400)
    assert [p.ids for p in zero_shot] == [prompt_ids(r, tok)[0] for r in test]


def test_length_budget_drops_the_fewest_shots(demo_tokenizer):
    tok = demo_tokenizer
    test, _ = load_records([{"prompt": "copy: abc =", "completion": " abc"}])
    pool, _ = load_records([{"prompt": "copy: ab =", "completion": " ab"},
                            {"prompt": "copy: " + "q" * 40 + " =", "completion": " " + "q" * 40},
                            {"prompt": "copy: cd =", "completion": " cd"}])
    zero = len(prompt_ids(test[0], tok)[0])
    short = len(tok("copy: ab = ab\n\n", add_special_tokens=False)["input_ids"])
    max_new = 8
    # room for the two short shots, not for the long one: only the long one goes
    prompts, report = build_few_shot_prompts(test, pool, tok, 3, 0, zero + 2 * short + max_new,
                                             max_new_tokens=max_new)
    assert sorted(s.data["prompt"] for s in prompts[0].shots) == ["copy: ab =", "copy: cd ="]
    assert len(prompts[0].ids) == zero + 2 * short
    assert (report.fewer_than_k, report.shots_dropped) == (1, 1)
    # the budget holds for every prompt, whatever it costs in shots
    rows = demo_dataset(60, 3)
    test, _ = load_records(rows[:20])
    train, _ = load_records(rows[20:])
    for max_length in (30, 45, 60, 150):
        prompts, report = build_few_shot_prompts(test, train, tok, 4, 0, max_length, max_new_tokens=10)
        assert all(len(p.ids) <= max_length - 10 for p in prompts)
        assert report.fewer_than_k == sum(len(p.shots) < 4 for p in prompts)
        assert report.shots_dropped == sum(4 - len(p.shots) for p in prompts)
    assert report.fewer_than_k == 0  # 140 tokens fit every 4-shot prompt
    prompts, report = build_few_shot_prompts(test, train, tok, 4, 0, 30, max_new_tokens=10)
    assert report.fewer_than_k == 20 and all(not p.shots for p in prompts)
    assert "20 prompts got fewer than 4 shots" in str(report)


def test_chat_template_makes_the_shots_earlier_turns():
    tok = char_tokenizer()
    test, _ = load_records([{"messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "2+2?"},
                                          {"role": "assistant", "content": "4"}]}])
    pool, _ = load_records([{"messages": [{"role": "system", "content": "other system"},
                                          {"role": "user", "content": "1+1?"},
                                          {"role": "assistant", "content": "2"}]},
                            {"messages": [{"role": "user", "content": "3+3?"},
                                          {"role": "assistant", "content": "6"}]}])
    prompts, report = build_few_shot_prompts(test, pool, tok, 2, 0, 512)
    assert report.chat and prompts[0].reference == "4"
    first, second = ([m for m in s.data["messages"] if m["role"] != "system"] for s in prompts[0].shots)
    want = tok.apply_chat_template([{"role": "system", "content": "be brief"}, *first, *second,
                                    {"role": "user", "content": "2+2?"}],
                                   tokenize=False, add_generation_prompt=True)
    text = tok.decode(prompts[0].ids)
    assert text == want and "other system" not in text
    assert text.index("<|assistant|>" + first[1]["content"]) < text.index("<|user|>2+2?")
    assert text.endswith("<|user|>2+2?<|end|>\n<|assistant|>")
    # prompt/completion records in a chat template: user turn = the prompt, assistant turn = the answer
    plain_test, _ = load_records([{"prompt": "rotate: abc =", "completion": " bca"}])
    plain_pool, _ = load_records([{"prompt": "rotate: xy =", "completion": " yx"}])
    prompts, _ = build_few_shot_prompts(plain_test, plain_pool, tok, 1, 0, 512)
    assert tok.decode(prompts[0].ids) == tok.apply_chat_template(
        [{"role": "user", "content": "rotate: xy ="}, {"role": "assistant", "content": " yx"},
         {"role": "user", "content": "rotate: abc ="}], tokenize=False, add_generation_prompt=True)
    # ... unless asked for plain blocks
    prompts, report = build_few_shot_prompts(plain_test, plain_pool, tok, 1, 0, 512, chat=False)
    assert not report.chat and tok.decode(prompts[0].ids) == "<s>rotate: xy = yx\n\nrotate: abc ="


def test_bad_requests_are_one_clear_error(split, demo_tokenizer):
    test, train = split
    with pytest.raises(ValueError, match="--few-shot must be >= 0"):
        build_few_shot_prompts(test, train, demo_tokenizer, -1, 0, 400)
    with pytest.raises(ValueError, match="--few-shot 71 is larger than the shot pool"):
        build_few_shot_prompts(test, train, demo_tokenizer, 71, 0, 400)
    with pytest.raises(ValueError, match="--task classify predicts with a head"):
        check_few_shot(2, test, 70, task="classify")
    text, _ = load_records([{"text": "just text"}])
    with pytest.raises(ValueError, match="text record with no answer to write"):
        build_few_shot_prompts(text, train, demo_tokenizer, 1, 0, 400)


# ----------------------------------------------------------------------------- the commands

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """train.jsonl (80) and test.jsonl (12) of the demo's `copy` task, which the base model knows."""
    tmp = tmp_path_factory.mktemp("fewshot")
    rows = task_records("copy", random_words(92, 21))
    return write_jsonl(tmp / "train.jsonl", rows[:80]), write_jsonl(tmp / "test.jsonl", rows[80:])


def _eval(test, *flags):
    return run_cli(["eval", "--model", DEMO_MODEL, "--data", test, "--kernel-backend", "torch",
                    "--max-new-tokens", "8", "--max-length", "96", *flags])


def test_eval_few_shot_end_to_end(files, tmp_path):
    train, test = files
    report = tmp_path / "report.json"
    code, out, err = _eval(test, "--few-shot", "2", "--shots-data", train, "--seed", "3", "--output", report)
    assert code == 0, err[-2000:]
    result = json.loads(report.read_text())
    assert result["k"] == 2 and result["seed"] == 3 and result["generated"] == 12
    assert 0 <= result["exact_match"] <= 1 and result["prompts_with_fewer_shots"] == 0
    assert all(len(e["shots"]) == 2 and all(w.startswith(str(train)) for w in e["shots"])
               for e in result["examples"])
    assert result["example_prompt"].count(" =") == 3 and "few-shot: 12 prompts with 2 shots each" in out
    # in the chat template of a model that has one
    chat_model = tmp_path / "chat-model"
    shutil.copytree(DEMO_MODEL, chat_model)
    config = json.loads((chat_model / "tokenizer_config.json").read_text())
    (chat_model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": DEMO_CHAT_TEMPLATE}))
    code, out, err = run_cli(["eval", "--model", chat_model, "--data", test, "--kernel-backend", "torch",
                              "--max-new-tokens", "8", "--max-length", "128", "--few-shot", "2",
                              "--shots-data", train])
    assert code == 0, err[-2000:]
    result = json.loads(out[out.index("{"):])
    assert result["chat_template"] and result["example_prompt"].count("user:\n") == 3


@pytest.mark.parametrize("flags, message", [
    (["--few-shot", "2"], "--few-shot 2 needs --shots-data FILE"),
    (["--few-shot", "-1", "--shots-data", "TRAIN"], "--few-shot must be >= 0"),
    (["--shots-data", "TRAIN"], "--shots-data is read only with --few-shot K"),
    (["--few-shot", "2", "--shots-data", "TEST"], "is the test file"),
    (["--few-shot", "2", "--shots-data", "OVERLAP"], "shares 1 records with the test data"),
    (["--few-shot", "81", "--shots-data", "TRAIN"], "--few-shot 81 is larger than --shots-data"),
])
def test_eval_few_shot_errors(files, tmp_path, flags, message):
    train, test = files
    overlap = write_jsonl(tmp_path / "overlap.jsonl", [json.loads(line) for line in
                                                       (train.read_text().splitlines()[:5]
                                                        + test.read_text().splitlines()[:1])])
    paths = {"TRAIN": train, "TEST": test, "OVERLAP": overlap}
    code, _, err = _eval(test, *[paths.get(f, f) for f in flags])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_train_reports_zero_shot_few_shot_and_fine_tuned(tmp_path):
    data = demo_data(tmp_path, n=100, name="train.jsonl")
    test = demo_data(tmp_path, n=12, name="test.jsonl", seed=77)
    out = tmp_path / "run"
    code, stdout, err = run_cli(fast_args(out, data, steps=2, max_length=80, few_shot=2, test_data=test,
                                          split=[0.9, 0.1]))
    assert code == 0, err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    zero, few = summary["baselines"]["zero_shot"], summary["baselines"]["few_shot"]
    assert zero["k"] == 0 and zero["exact_match"] == summary["test_before"]["exact_match"]
    assert few["k"] == 2 and few["generated"] == summary["counts"]["test"] == 12 and 0 <= few["exact_match"] <= 1
    assert summary["test_after"]["exact_match"] is not None and summary["config"]["few_shot"] == 2
    # the shots come from the training split (train.jsonl, not its validation part), never from test.jsonl
    splits, _ = load_splits(data, None, test, ratios=(0.9, 0.1), seed=0)
    train_split = {r.where for r in splits.train}
    assert len(train_split) == 90 and not train_split & {r.where for r in splits.validation}
    assert all(len(e["shots"]) == 2 and set(e["shots"]) <= train_split for e in few["examples"])
    line = next(x for x in stdout.splitlines() if "side by side" in x)
    assert "zero-shot" in line and "2-shot" in line and "fine-tuned" in line
    # without --few-shot: no baselines
    code, _, err = run_cli(fast_args(tmp_path / "plain", data, steps=1))
    assert code == 0, err[-2000:]
    assert json.loads((tmp_path / "plain" / "summary.json").read_text())["baselines"] is None


def test_train_few_shot_errors_come_before_the_model_loads(tmp_path):
    data = demo_data(tmp_path, n=100)
    code, _, err = run_cli(fast_args(tmp_path / "a", data, few_shot=81))
    assert code == 2 and "--few-shot 81 is larger than the training split (80 usable records)" in err
    code, _, err = run_cli(fast_args(tmp_path / "b", data, few_shot=-1))
    assert code == 2 and "few_shot must be >= 0" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
