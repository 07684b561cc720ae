"""Supervised tasks with real heads through the CLI (issue 12): sentence classification on a
bare encoder checkpoint and on a decoder, with PEFT interop, eval / predict / merge; the
task choice and its errors; class weights."""
import json

import pytest
import torch
from _task_helpers import ENTITIES, SENTIMENT, bare_encoder, tiny_decoder
from _trainer_helpers import fast_args, run_cli

from trilora.trainer import load_records
from trilora.trainer.evaluate import classification_metrics
from trilora.trainer.tasks import class_weights, resolve_task


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return bare_encoder(tmp_path_factory.mktemp("enc") / "bare-bert")


@pytest.fixture(scope="module")
def classified(encoder, tmp_path_factory):
    """One LoRA run of a sequence-classification head on the bare encoder (task detected)."""
    out = tmp_path_factory.mktemp("cls") / "run"
    code, stdout, err = run_cli(fast_args(out, SENTIMENT, steps=60, model=encoder, method="lora", lora_r=8,
                                          alpha=16, lr=5e-3, batch_size=16, max_length=24, eval_every=20))
    assert code == 0, err[-3000:]
    return out, stdout


def assert_peft_agrees(encoder, adapter_dir, model_class, texts, num_labels):
    """PEFT over HF's model and trilora over `load_model` give the same logits for `texts`."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from trilora.lora import adapter_labels, load_adapter
    from trilora.trainer import load_model
    from trilora.trainer.tasks import head_config
    tok = AutoTokenizer.from_pretrained(encoder)
    base = model_class.from_pretrained(encoder, num_labels=num_labels)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ours = load_adapter(load_model(encoder, quantize=None, model_class=model_class,
                                   head=head_config(adapter_labels(adapter_dir), tok)), adapter_dir,
                        backend="torch").eval()
    batch = ids_of(tok, texts)
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).logits, ours(**batch).logits, atol=1e-5)


def ids_of(tokenizer, texts):
    return tokenizer(texts, padding=True, return_tensors="pt")


@pytest.mark.slow
def test_bare_encoder_classifier_trains_by_one_command(classified):
    out, stdout = classified
    assert "task: classify (bert is an encoder" in stdout
    assert "newly initialised (seed 0), trained in full: classifier.weight, classifier.bias" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "classify" and summary["labels"] == ["negative", "neutral", "positive"]
    before, after = summary["test_before"], summary["test_after"]
    assert after["f1"] > before["f1"] + 0.3 and after["accuracy"] >= 0.8
    matrix = after["confusion_matrix"]
    assert sum(map(sum, matrix)) == summary["counts"]["test"]
    assert sum(matrix[i][i] for i in range(3)) / sum(map(sum, matrix)) == pytest.approx(after["accuracy"])
    assert {"weighted_f1", "per_class"} <= after.keys()
    assert (out / "confusion_matrix.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.parametrize("pooler", [True, False])
def test_classifier_adapter_loads_in_peft_with_equal_logits(classified, encoder, tmp_path, pooler):
    """Also from a checkpoint without a pooler: the new pooler trains in full and is saved
    with the adapter (modules_to_save), else the adapter would fit only this run's init."""
    from transformers import AutoModelForSequenceClassification

    from trilora.lora import read_adapter

    out, _ = classified
    if not pooler:
        encoder, out = bare_encoder(tmp_path / "no-pooler", pooler=False), tmp_path / "run"
        code, stdout, err = run_cli(fast_args(out, SENTIMENT, steps=3, model=encoder, method="lora",
                                              batch_size=16, max_length=24))
        assert code == 0, err[-2000:]
        assert "trained in full: bert.pooler.dense.weight" in stdout
        config, tensors = read_adapter(out / "adapter")
        assert "bert.pooler.dense" in config.modules_to_save and "bert.pooler.dense.weight" in tensors
    assert_peft_agrees(encoder, out / "adapter", AutoModelForSequenceClassification,
                       ["the movie was great", "what a dull trip"], num_labels=3)


@pytest.mark.slow
def test_eval_predict_and_merge_on_a_classification_run(classified, encoder, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _ = classified
    report = tmp_path / "r.json"
    code, _, err = run_cli(["eval", "--model", encoder, "--adapter", out / "adapter", "--data", SENTIMENT,
                            "--output", report, "--kernel-backend", "torch", "--max-length", "24"])
    assert code == 0, err[-2000:]
    result = json.loads(report.read_text())
    assert result["labels"] == ["negative", "neutral", "positive"] and result["accuracy"] > 0.8
    code, stdout, err = run_cli(["predict", "--model", encoder, "--adapter", out / "adapter", "--kernel-backend",
                                 "torch", "--text", "the film was wonderful", "--text", "a terrible meal", "--json"])
    assert code == 0, err[-2000:]
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["label"] for r in rows] == ["positive", "negative"]
    assert all(sum(r["probabilities"].values()) == pytest.approx(1.0) for r in rows)
    code, stdout2, _ = run_cli(["generate", "--model", encoder, "--adapter", out / "adapter", "--kernel-backend",
                                "torch", "--prompt", "the film was wonderful", "--json"])
    assert code == 0 and json.loads(stdout2)["label"] == "positive"  # generate acts as predict
    merged = tmp_path / "merged"
    code, _, err = run_cli(["merge", "--model", encoder, "--adapter", out / "adapter", "--output", merged,
                            "--kernel-backend", "torch"])
    assert code == 0, err[-2000:]
    hf = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert hf.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    tok = AutoTokenizer.from_pretrained(merged)
    batch = ids_of(tok, ["the film was wonderful", "a terrible meal"])
    from trilora.lora import adapter_labels, load_adapter
    from trilora.trainer.loading import load_model
    from trilora.trainer.tasks import head_config
    ours = load_adapter(load_model(encoder, quantize=None, model_class=AutoModelForSequenceClassification,
                                   head=head_config(adapter_labels(out / "adapter"), tok)),
                        out / "adapter", backend="torch").eval()
    with torch.no_grad():
        assert hf(**batch).logits.argmax(-1).tolist() == [2, 0]
        assert torch.allclose(hf(**batch).logits, ours(**batch).logits, atol=1e-5)


@pytest.mark.slow
def test_decoder_classifier_with_qlora_keeps_the_score_head_dense(tmp_path):
    decoder = tiny_decoder(tmp_path / "dec")
    out = tmp_path / "run"
    code, stdout, err = run_cli(fast_args(out, SENTIMENT, steps=30, model=decoder, task="classify", lr=5e-3,
                                          batch_size=16, max_length=24, class_weights="balanced"))
    assert code == 0, err[-3000:]
    assert "class weights: negative" in stdout and "newly initialised (seed 0), trained in full: score.weight" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "classify" and summary["quantized_layers"] == 2 * 7
    from trilora.lora import read_adapter
    config, tensors = read_adapter(out / "adapter")
    assert config.task_type == "SEQ_CLS" and "score.weight" in tensors  # the head is saved with the adapter
    assert tensors["score.weight"].dtype == torch.float32


def test_task_choice_and_its_errors(tmp_path):
    from transformers import BertConfig, LlamaConfig
    cls, _ = load_records([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    gen, _ = load_records([{"prompt": "a", "completion": "b"}])
    enc, dec = BertConfig(), LlamaConfig(architectures=["LlamaForCausalLM"])
    assert resolve_task("auto", cls, enc)[0] == "classify"
    task, note = resolve_task("auto", cls, dec)
    assert task == "generate" and "--task classify trains a classification head" in note
    assert resolve_task("classify", cls, dec) == ("classify", None)
    with pytest.raises(ValueError, match="bert is an encoder: it cannot generate text"):
        resolve_task("auto", gen, enc)
    with pytest.raises(ValueError, match="--task classify needs classification records"):
        resolve_task("classify", gen, dec)


def test_balanced_class_weights_and_weighted_metrics():
    records, _ = load_records([{"text": f"t{i}", "label": "a" if i < 6 else "b"} for i in range(8)])
    w = class_weights(records, ["a", "b", "c"])
    assert w.tolist() == pytest.approx([8 / (3 * 6), 8 / (3 * 2), 0.0])
    m = classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    # a: P 1/2 R 1 F1 2/3 (support 1); b: P 1 R 2/3 F1 4/5 (support 3)
    assert m["weighted_f1"] == pytest.approx((2 / 3 * 1 + 4 / 5 * 3) / 4)
    assert m["confusion_matrix"] == [[1, 0], [1, 2]]


# ----------------------------------------------------------------------------- entity tagging

@pytest.fixture(scope="module")
def tagged(encoder, tmp_path_factory):
    """One LoRA run of a token-classification head on the bare encoder (task detected from the
    CoNLL file)."""
    out = tmp_path_factory.mktemp("tag") / "run"
    code, stdout, err = run_cli(fast_args(out, ENTITIES, steps=150, model=encoder, method="lora", lora_r=8,
                                          alpha=16, lr=5e-3, batch_size=16, max_length=32, eval_every=50))
    assert code == 0, err[-3000:]
    return out, stdout


@pytest.mark.slow
def test_entity_tagging_trains_through_the_cli(tagged):
    out, stdout = tagged
    assert "task: tag (tokens and tags in the data" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "tag" and summary["labels"][0] == "O" and summary["primary_metric"] == "f1"
    before, after = summary["test_before"], summary["test_after"]
    assert after["f1"] > before["f1"] + 0.4 and after["token_accuracy"] > 0.8
    assert set(after["per_type"]) == {"LOC", "ORG", "PER"}


@pytest.mark.slow
def test_tagging_adapter_in_peft_eval_and_predict(tagged, encoder, tmp_path):
    from transformers import AutoModelForTokenClassification

    from trilora.lora import adapter_labels, read_adapter

    out, _ = tagged
    config, tensors = read_adapter(out / "adapter")
    assert config.task_type == "TOKEN_CLS" and "classifier.weight" in tensors
    labels = adapter_labels(out / "adapter")
    assert_peft_agrees(encoder, out / "adapter", AutoModelForTokenClassification,
                       ["john smith visited oslo", "acme corp opened an office in lima"], num_labels=len(labels))

    report = tmp_path / "r.json"
    code, _, err = run_cli(["eval", "--model", encoder, "--adapter", out / "adapter", "--data", ENTITIES,
                            "--output", report, "--kernel-backend", "torch", "--max-length", "32"])
    assert code == 0, err[-2000:]
    assert json.loads(report.read_text())["f1"] > 0.6
    code, stdout, err = run_cli(["predict", "--model", encoder, "--adapter", out / "adapter", "--kernel-backend",
                                 "torch", "--text", "maria garcia visited tokyo", "--json"])
    assert code == 0, err[-2000:]
    found = json.loads(stdout)
    assert len(found["tags"]) == 4 and {e["type"] for e in found["entities"]} <= {"PER", "LOC", "ORG"}


@pytest.mark.slow
def test_decoder_token_classification_with_a_byte_level_tokenizer(tmp_path):
    """A byte-level BPE gets add_prefix_space=True for pre-split words; Llama's token head trains."""
    decoder = tiny_decoder(tmp_path / "dec")
    out = tmp_path / "run"
    code, stdout, err = run_cli(fast_args(out, ENTITIES, steps=20, model=decoder, task="tag", lr=5e-3,
                                          batch_size=16, max_length=40))
    assert code == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "tag" and summary["test_after"]["f1"] > summary["test_before"]["f1"]


def test_qlora_on_a_model_without_linear_layers_says_so(tmp_path):
    """GPT-2 keeps its projections in Conv1D: nothing is quantized, and the run says it."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    decoder = tiny_decoder(tmp_path / "dec")
    tok = AutoTokenizer.from_pretrained(decoder)
    folder = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i} =", "completion": f" a{i}"}) + "\n" for i in range(20)))
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="--method qlora quantized no layer"):
        code, _, err = run_cli(fast_args(out, data, steps=2, model=folder, max_length=16, eval_max_new_tokens=2))
    assert code == 0, err[-2000:]
    assert json.loads((out / "summary.json").read_text())["quantized_layers"] == 0


@pytest.mark.slow
def test_full_fine_tuning_of_a_classifier_saves_a_plain_transformers_model(encoder, tmp_path):
    from transformers import AutoModelForSequenceClassification
    out = tmp_path / "run"
    code, _, err = run_cli(fast_args(out, SENTIMENT, steps=5, model=encoder, method="full", lr=1e-3,
                                     batch_size=16, max_length=24))
    assert code == 0, err[-2000:]
    hf = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert hf.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    report = tmp_path / "r.json"
    code, _, err = run_cli(["eval", "--model", out / "model", "--data", SENTIMENT, "--output", report,
                            "--kernel-backend", "torch", "--max-length", "24"])
    assert code == 0, err[-2000:]
    assert json.loads(report.read_text())["labels"] == ["negative", "neutral", "positive"]


@pytest.mark.parametrize("task_type", ["SEQ_CLS", "TOKEN_CLS"])
def test_peft_trained_head_adapters_load_in_trilora_with_equal_logits(encoder, tmp_path, task_type):
    """The other way round: an adapter PEFT trained and saved (head in modules_to_save)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    from trilora.lora import load_adapter
    from trilora.trainer.loading import load_model
    cls = AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForTokenClassification
    torch.manual_seed(0)
    peft_model = get_peft_model(cls.from_pretrained(encoder, num_labels=4),
                                PeftLoraConfig(r=3, lora_alpha=6, target_modules=["query", "value"],
                                               task_type=task_type))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # a trained-looking adapter and head
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(load_model(encoder, quantize=None, model_class=cls, head={"num_labels": 4}),
                        tmp_path / "adapter", backend="torch").eval()
    batch = ids_of(AutoTokenizer.from_pretrained(encoder), ["the movie was great", "what a dull trip"])
    with torch.no_grad():
        assert torch.allclose(peft_model.eval()(**batch).logits, ours(**batch).logits, atol=1e-5)


def test_patch_reports_layer_norm_as_what_it_is(encoder):
    from transformers import AutoModelForSequenceClassification

    from trilora.patching import patch
    model = AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=2)
    report = patch(model, backend="torch", warn=False)
    kinds = {kind for _, kind, _ in report.skipped}
    assert "rms_norm" not in kinds and "layer_norm" in kinds and report.count("rms_norm") == 0
    assert "trilora fuses RMSNorm, not LayerNorm" in str(report)
