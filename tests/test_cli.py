"""The command line: the embedded demo end to end, eval / merge / generate with its adapter,
eval of a classification file, YAML settings overridden by flags, --help, multi-task mixing."""
import json
import math
import time
from dataclasses import fields

import pytest
import torch
from _trainer_helpers import (DEMO_MODEL, demo_data, fast_args, logits_of, run_cli, run_module,
                              write_jsonl)

from trilora.cli import build_parser
from trilora.lora import load_adapter, read_adapter
from trilora.trainer import run as trainer_run
from trilora.trainer.config import TrainConfig, config_from_args
from trilora.trainer.evaluate import classification_metrics
from trilora.trainer.loading import load_model


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`python -m trilora train --output-dir DIR`: the embedded demo, timed."""
    out = tmp_path_factory.mktemp("demo") / "out"
    start = time.perf_counter()
    result = run_module(["train", "--output-dir", out], timeout=300)
    return out, time.perf_counter() - start, result.stdout


@pytest.mark.slow
def test_embedded_demo_learns_the_task(demo):
    out, seconds, stdout = demo
    assert seconds < 180, f"the demo took {seconds:.0f} s"
    assert "running the embedded demo" in stdout and "splits: train 960, validation 120, test 120" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "qlora" and summary["primary_metric"] == "exact_match"
    assert summary["higher_is_better"] is True and summary["steps"] > 0
    before, after = summary["test_before"], summary["test_after"]
    assert {"loss", "exact_match"} <= before.keys() and {"loss", "exact_match"} <= after.keys()
    assert after["exact_match"] >= before["exact_match"] + 0.5
    assert after["loss"] < before["loss"]
    # which weights the score belongs to, and the score on the original weights beside it
    assert "nf4-quantized base" in summary["test_after_weights"]
    original = summary["test_after_original_base"]
    assert {"loss", "exact_match"} <= original.keys() and original["loss"] != after["loss"]
    assert "on the original weights: test exact_match" in stdout
    config, tensors = read_adapter(summary["adapter_dir"])
    assert config.r == 16 and len(tensors) == 2 * 4 * 7  # lora_A and lora_B of 7 linears x 4 layers
    assert (out / "loss_curve.png").exists() and (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_demo_adapter_loads_in_peft(demo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = demo[0] / "adapter"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_MODEL), adapter_dir).eval()
    ours = load_adapter(load_model(DEMO_MODEL, quantize=None), adapter_dir, backend="torch").eval()
    ids = torch.randint(3, 51, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logits_of(peft_model, ids), logits_of(ours, ids), atol=1e-5)


@pytest.mark.slow
def test_eval_command(demo, tmp_path):
    data = demo_data(tmp_path, n=30, seed=555)
    report = tmp_path / "r.json"
    code, stdout, err = run_cli(["eval", "--adapter", demo[0] / "adapter", "--quantize", "nf4", "--data", data,
                                 "--output", report, "--kernel-backend", "torch", "--max-new-tokens", "10"])
    assert code == 0, err[-2000:]
    result = json.loads(report.read_text())
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["generated"] == 30 and result["exact_match"] > 0.8
    assert "kept 30 of 30 records" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("base_weights", ["as-trained", "original"])
def test_merge_command(demo, tmp_path, base_weights):
    """The default folds the QLoRA adapter into the dequantized NF4 base it was trained
    against (so the merged model scores as the run's test_after); `original` into the
    original weights; the final line says which."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trilora.lora import adapter_base_quantization

    adapter_dir = demo[0] / "adapter"
    assert adapter_base_quantization(adapter_dir) == {"quant_type": "nf4", "blocksize": 64, "double_quant": True}
    merged = tmp_path / "merged"
    code, stdout, err = run_cli(["merge", "--model", DEMO_MODEL, "--adapter", adapter_dir, "--output", merged,
                                 "--kernel-backend", "torch", "--base-weights", base_weights])
    assert code == 0, err[-2000:]
    hf = AutoModelForCausalLM.from_pretrained(merged).eval()
    quantize = "nf4" if base_weights == "as-trained" else None
    ours = load_adapter(load_model(DEMO_MODEL, quantize=quantize, backend="torch"), adapter_dir, backend="torch").eval()
    other = load_adapter(load_model(DEMO_MODEL, quantize="nf4" if quantize is None else None, backend="torch"),
                         adapter_dir, backend="torch").eval()
    ids = torch.randint(3, 51, (2, 12), generator=torch.Generator().manual_seed(1))
    got = logits_of(hf, ids)
    assert torch.allclose(got, logits_of(ours, ids), atol=1e-4)
    assert not torch.allclose(got, logits_of(other, ids), atol=1e-3)  # the two choices differ
    assert ("dequantized nf4 base" in stdout) == (base_weights == "as-trained")
    assert AutoTokenizer.from_pretrained(merged)("ab")["input_ids"]


@pytest.mark.slow
def test_eval_defaults_to_the_base_the_adapter_was_trained_on(demo, tmp_path):
    data = demo_data(tmp_path, n=12, seed=556)
    scores = {}
    for quantize in (None, "nf4", "none"):
        report = tmp_path / f"{quantize}.json"
        args = ["eval", "--adapter", demo[0] / "adapter", "--data", data, "--output", report,
                "--kernel-backend", "torch", "--max-new-tokens", "8"]
        code, _, err = run_cli(args + (["--quantize", quantize] if quantize else []))
        assert code == 0, err[-2000:]
        assert ("as the adapter was trained" in err) == (quantize is None)
        scores[quantize] = json.loads(report.read_text())["loss"]
    assert scores[None] == scores["nf4"] != scores["none"]


@pytest.mark.slow
def test_generate_command(demo):
    code, stdout, err = run_cli(["generate", "--adapter", demo[0] / "adapter", "--quantize", "nf4",
                                 "--kernel-backend", "torch", "--max-new-tokens", "10",
                                 "--prompt", "rotate: hello =", "--prompt", "rotate: planet ="])
    assert code == 0, err[-2000:]
    # each prompt, then its completion on its own line (the completion keeps its leading space)
    assert stdout.startswith("### prompt\nrotate: hello =\n### completion\n elloh\n\n"
                             "### prompt\nrotate: planet =\n### completion\n")


def test_eval_of_a_classification_file(tmp_path, monkeypatch):
    rows = [{"text": f"review {i}", "label": label} for i, label in enumerate(["pos", "neg", "pos", "neu"])]
    data = write_jsonl(tmp_path / "cls.jsonl", rows)
    predictions = ["pos", "pos", "neg", "neu"]  # generation is replaced: the metrics must follow these
    from trilora.trainer import evaluate as trainer_evaluate
    monkeypatch.setattr(trainer_evaluate, "generate_completions", lambda *a, **k: list(predictions))
    report = tmp_path / "r.json"
    code, _, err = run_cli(["eval", "--data", data, "--output", report, "--kernel-backend", "torch"])
    assert code == 0, err[-2000:]
    result = json.loads(report.read_text())
    want = classification_metrics(predictions, [r["label"] for r in rows], ["neg", "neu", "pos"])
    assert result["accuracy"] == pytest.approx(0.5) and want["accuracy"] == pytest.approx(0.5)
    # neg: P 0 R 0; neu: P 1 R 1; pos: P 1/2 R 1/2
    assert result["precision"] == pytest.approx((0 + 1 + 0.5) / 3) == want["precision"]
    assert result["recall"] == pytest.approx((0 + 1 + 0.5) / 3)
    assert result["f1"] == pytest.approx(want["f1"])
    assert math.isfinite(result["loss"]) and result["generated"] == 4


def _config(argv):
    return config_from_args(build_parser().parse_args(["train", *map(str, argv)]))


def test_yaml_is_overridden_by_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3e-4\nr: 8\nmax-steps: 50\ntarget_modules: q_proj\npacking: true\nsplit: [0.9, 0.1]\n")
    config = _config(["--config", path, "--r", "4", "--no-packing", "--data", "a.jsonl", "b.jsonl"])
    assert config.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string: converted
    assert config.r == 4 and config.max_steps == 50 and config.packing is False
    assert config.target_modules == ("q_proj",) and config.split == (0.9, 0.1)
    assert config.data == ["a.jsonl", "b.jsonl"]
    assert _config(["--lora-r", "2"]).r == 2
    assert _config([]) == TrainConfig()


def test_help_documents_every_setting(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert " ".join(f.metadata["help"].split()[:3]) in text, f.name
    assert "--config" in text and "--lora-r" in text


def test_multi_task_mixing(tmp_path, capsys):
    rotate = demo_data(tmp_path, n=100, name="rotate.jsonl")
    copy = demo_data(tmp_path, n=100, name="copy.jsonl", task="copy", seed=9)
    config = TrainConfig(data=[str(rotate), str(copy)], mix_weights=[3, 1], seed=0)
    splits = trainer_run.prepare_records(config)
    printed = capsys.readouterr().out
    assert f"{rotate} (prompt_completion): kept 100 of 100" in printed
    assert f"{copy} (prompt_completion): kept 100 of 100" in printed
    assert "splits: train 160, validation 20, test 20" in printed
    share = sum(r.data["prompt"].startswith("rotate") for r in splits.train) / len(splits.train)
    assert 0.65 < share < 0.85  # 3 : 1
    assert {r.data["prompt"].split(":")[0] for r in splits.test} == {"rotate", "copy"}

    out = tmp_path / "out"
    code, stdout, err = run_cli(fast_args(out, [rotate, copy], steps=3, mix_weights=[3, 1]))
    assert code == 0, err[-2000:]
    assert "splits: train 160, validation 20, test 20" in stdout and "kept 100 of 100" in stdout
    assert json.loads((out / "summary.json").read_text())["counts"] == {"train": 160, "validation": 20, "test": 20}


def test_demo_data_is_the_same_in_every_process():
    """A resumed demo run and every DDP rank must split the same records, whatever the
    process's string-hash seed (the demo's word list is built through a set)."""
    import subprocess
    import sys

    from _trainer_helpers import subprocess_env

    code = ("import hashlib, json; from trilora.trainer.run import prepare_records; "
            "from trilora.trainer.config import TrainConfig; s = prepare_records(TrainConfig()); "
            "print(hashlib.sha256(json.dumps([[r.data for r in p] for p in s]).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], env={**subprocess_env(), "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, check=True).stdout.split()[-1]
               for seed in ("1", "2")}
    assert len(digests) == 1


def test_bench_without_the_checkout_bench_folder_says_so_in_one_line(tmp_path, monkeypatch):
    """`trilora bench` from a wheel (no bench/ beside the package): one error line, exit 2."""
    from trilora.cli import bench

    assert bench.BENCH_DIR == DEMO_MODEL.parents[2] / "bench"  # the checkout's, from trilora/cli/
    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path / "bench")
    code, stdout, err = run_cli(["bench", "--smoke"])
    assert code == 2 and stdout == ""
    assert err == (f"trilora bench: error: {tmp_path / 'bench'}: the benchmarks live in trilora's source "
                   "checkout (bench/), which this installation does not have: clone the repository, "
                   "`pip install -e .` there and run `trilora bench` (or `python bench/<script>.py`)\n")
