"""Bad input to `trilora train`: exit code 2, one line naming the problem, nothing written.

(Corrupt, truncated and foreign checkpoints are in test_trainer_checkpoint.py.)"""
import shutil

import pytest
from _trainer_helpers import DEMO_MODEL, demo_data, fast_args, run_cli, write_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    good = demo_data(d, n=60)
    (d / "malformed.jsonl").write_text('not json\n{"prompt": \n')
    write_jsonl(d / "other_columns.jsonl", [{"question": "a", "answer": "b"}, {"question": "c", "answer": "d"}])
    write_jsonl(d / "empty.jsonl", [{"prompt": "a", "completion": " "}, {"prompt": "", "completion": "b"}])
    no_weights, no_config, pickled = d / "no_weights", d / "no_config", d / "pickled"
    for m in (no_weights, no_config, pickled):
        shutil.copytree(DEMO_MODEL, m)
    (no_weights / "model.safetensors").unlink()
    (no_config / "config.json").unlink()
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    (d / "bogus.yaml").write_text("lr: 1e-3\nlearning_rate: 1e-3\n")
    (d / "broken.yaml").write_text("lr: [1e-3\n")
    (d / "wrong_type.yaml").write_text("r: eight\n")
    return d, good


# (flags changed from a good short run, words the error must contain)
CASES = {
    "missing data file": ({"data": "{d}/nope.jsonl"}, ["data file not found", "nope.jsonl"]),
    "malformed lines": ({"data": "{d}/malformed.jsonl"}, ["malformed.jsonl is malformed", "line 1: invalid JSON"]),
    "unknown columns": ({"data": "{d}/other_columns.jsonl"}, ["cannot detect the record format", "question"]),
    "missing column": ({"data": "{d}/other_columns.jsonl", "data_format": "alpaca"},
                       ["required column 'instruction'", "missing"]),
    "missing template field": ({"template": "Q: {question}\nA:"}, ["template field {question} is missing"]),
    "empty after cleaning": ({"data": "{d}/empty.jsonl"}, ["no usable records left", "dropped 2 empty"]),
    "unknown method": ({"method": "prefix"}, ["unknown method 'prefix'"]),
    "unknown data format": ({"data_format": "sharegpt"}, ["unknown data_format 'sharegpt'"]),
    "max length below the prompt": ({"max_length": 3}, ["sequence length too short for the prompt"]),
    "rank too large": ({"lora_r": 1000}, ["rank too large: r=1000", "min(in, out) = 64", "k_proj"]),
    "unknown target modules": ({"target_modules": ["attn_q"]}, ["attn_q", "q_proj"]),
    "model dir without weights": ({"model": "{d}/no_weights"}, ["no model.safetensors"]),
    "model dir without config": ({"model": "{d}/no_config"}, ["no config.json"]),
    "pickle-only model dir": ({"model": "{d}/pickled"}, ["pytorch_model.bin", "pickle"]),
    "missing model dir": ({"model": "{d}/nowhere"}, ["model directory not found"]),
    "negative lr": ({"lr": -1e-4}, ["lr must be a positive number, got -0.0001"]),
    "zero batch size": ({"batch_size": 0}, ["batch_size must be positive, got 0"]),
    "zero log interval": ({"log_every": 0}, ["log_every must be positive"]),
    "mix weights count": ({"mix_weights": [1, 2]},
                          ["--mix-weights needs one weight per --data file: got 2 weights for 1"]),
    "negative mix weight": ({"data": ["{d}/rotate.jsonl", "{d}/rotate.jsonl"], "mix_weights": [1, -1]},
                            ["--mix-weights must be finite numbers >= 0"]),
    "split not summing to 1": ({"split": [0.8, 0.3, 0.1]}, ["split must be", "summing to 1", "[0.8, 0.3, 0.1]"]),
    "negative split": ({"split": [1.2, -0.1, -0.1]}, ["split must be"]),
    "dropout 1.5": ({"dropout": 1.5}, ["dropout must be in [0, 1), got 1.5"]),
    "unknown scheduler": ({"scheduler": "step"}, ["unknown scheduler 'step'"]),
    "unknown dtype": ({"dtype": "fp8"}, ["unknown dtype 'fp8'"]),
    "unknown kernel backend": ({"kernel_backend": "cuda"}, ["unknown kernel_backend 'cuda'"]),
    "unknown YAML key": ({"config": "{d}/bogus.yaml"}, ["bogus.yaml: unknown settings ['learning_rate']"]),
    "invalid YAML": ({"config": "{d}/broken.yaml"}, ["broken.yaml is not valid YAML"]),
    "wrong YAML type": ({"config": "{d}/wrong_type.yaml"}, ["wrong_type.yaml: r must be integer, got 'eight'"]),
    "missing config file": ({"config": "{d}/nope.yaml"}, ["config file not found", "nope.yaml"]),
    "no test split": ({"split": [0.9, 0.1]}, ["no test records"]),
}


def _fill(value, d):
    if isinstance(value, list):
        return [_fill(v, d) for v in value]
    return value.format(d=d) if isinstance(value, str) and "{d}" in value else value


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_a_clear_error(files, tmp_path, case):
    d, good = files
    change, words = CASES[case]
    out = tmp_path / "out"
    change = {k: _fill(v, d) for k, v in change.items()}
    code, _, err = run_cli(fast_args(out, change.pop("data", good), steps=2, **change))
    assert code == 2, err[-2000:]
    message = err.strip().splitlines()[-1]
    assert message.startswith("trilora train: error: "), err[-2000:]
    for word in words:
        assert word in message, message
    assert not out.exists()  # nothing half-written


def test_bad_flag_value_is_an_argparse_error(tmp_path, files):
    code, _, err = run_cli(fast_args(tmp_path / "out", files[1], max_steps="ten"))
    assert code == 2 and "argument --max-steps: invalid int value: 'ten'" in err


def test_a_partial_failure_leaves_no_summary(files, tmp_path):
    """A run that fails after it started writing (here: a corrupt checkpoint met on resume)
    leaves the files of the earlier run as they were and writes no summary."""
    d, good = files
    out = tmp_path / "out"
    code, _, err = run_cli(fast_args(out, good, steps=4, save_every=2))
    assert code == 0, err[-2000:]
    (out / "summary.json").unlink()
    state = out / "checkpoints" / "step-2" / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 2', '"step": 9'))
    code, _, err = run_cli(fast_args(out, good, steps=4, save_every=2, resume=True))
    assert code == 2 and "step-2: trainer_state.json is corrupt (checksum mismatch)" in err
    assert not (out / "summary.json").exists()
