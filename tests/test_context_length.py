"""--context-length: RoPE scaling set before the model is built, saved with the adapter and the
merged / fully fine-tuned model, applied by eval / merge; --offload-activations; activation
memory against sequence length (CPU: bytes saved for backward, a deterministic measure).

The demo model was pretrained with 128 positions; everything here runs it at up to 256."""
from __future__ import annotations

import json
import random
import string

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

from trilora.lora import LoraConfig, adapter_base_config, add_lora, load_adapter
from trilora.trainer.context import SavedActivations, context_settings, rope_overrides
from trilora.trainer.config import TrainConfig
from trilora.trainer.loading import load_model

from _trainer_helpers import DEMO_MODEL, demo_data, fast_args, metrics, run_cli, write_jsonl

LONG = 256  # 2x the demo model's max_position_embeddings


def retrieval_records(n: int, seed: int, length: int = 240) -> list[dict]:
    """A key (one letter) hidden among digits within the first quarter of a ~length-token
    prompt; the answer is the key. Needs the far context: nothing near the end tells it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        filler = [rng.choice(string.digits) for _ in range(length - 2)]
        key = rng.choice(string.ascii_lowercase)
        filler[rng.randrange(4, length // 4)] = key
        rows.append({"prompt": "".join(filler) + " ?", "completion": " " + key})
    return rows


def long_ids(length: int = 250) -> torch.Tensor:
    return torch.randint(3, 50, (2, length), generator=torch.Generator().manual_seed(0))


def overrides(kind: str | None = "linear", length: int = LONG) -> dict:
    return rope_overrides(AutoConfig.from_pretrained(DEMO_MODEL), length, kind)


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_rope_config_round_trip(kind, tmp_path):
    """Each rope type Llama takes: the model keeps the scaling in its config, save_pretrained
    writes it, plain transformers reloads it with equal logits beyond the original length."""
    o = overrides(kind)
    model = load_model(DEMO_MODEL, quantize=None, device="cpu", config_overrides=o)
    assert model.config.rope_parameters["rope_type"] == kind and model.config.rope_parameters["factor"] == 2.0
    assert model.trilora_base_config == o
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_parameters"] == o["rope_parameters"]
    assert saved["max_position_embeddings"] == (128 if kind == "dynamic" else LONG)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    plain = load_model(DEMO_MODEL, quantize=None, device="cpu")
    with torch.no_grad():
        ours, theirs, unscaled = (m(long_ids()).logits for m in (model, reloaded, plain))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert (ours - unscaled).abs().max() > 1e-3  # the scaling does change the model


def test_rope_errors():
    config = AutoConfig.from_pretrained(DEMO_MODEL)
    assert rope_overrides(config, None, None) == {} and rope_overrides(config, 100, None) == {}
    assert overrides(None)["rope_parameters"]["rope_type"] == "linear"  # the default
    with pytest.raises(ValueError, match="--rope-scaling 'ntk': one of linear, dynamic, yarn, llama3"):
        rope_overrides(config, LONG, "ntk")
    with pytest.raises(ValueError, match="--rope-scaling linear: --context-length 128 is within the 128 positions"):
        rope_overrides(config, 128, "linear")
    with pytest.raises(ValueError, match="family \\(gpt2\\) has no scalable RoPE"):
        rope_overrides(GPT2Config(n_positions=64), 128, None)
    scaled = AutoConfig.from_pretrained(DEMO_MODEL)
    scaled.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="already scales RoPE"):
        rope_overrides(scaled, 512, None)
    with pytest.raises(ValueError, match="--max-length 300 exceeds --context-length 256"):
        TrainConfig(context_length=LONG, max_length=300)
    with pytest.raises(ValueError, match="--rope-scaling needs --context-length"):
        TrainConfig(rope_scaling="yarn")
    assert TrainConfig(context_length=LONG).max_length == LONG and TrainConfig().max_length == 512
    assert {"context_length", "rope_scaling"} <= set(TrainConfig.RESUME_KEYS)
    assert context_settings(TrainConfig(context_length=LONG, rope_scaling="yarn"), DEMO_MODEL)[1] == LONG


def test_cli_errors_name_the_flag(tmp_path):
    data = demo_data(tmp_path, n=40)
    long_data = write_jsonl(tmp_path / "long.jsonl", retrieval_records(40, 3, length=200))
    cases = [
        (dict(context_length=LONG, rope_scaling="ntk"), data, "rope_scaling"),
        (dict(context_length=128, rope_scaling="linear", max_length=None), data, "--rope-scaling linear"),
        (dict(context_length=LONG, max_length=300), data, "--max-length 300 exceeds --context-length"),
        # examples longer than the model's 128 positions, no scaling asked for: refused, not extrapolated
        (dict(max_length=LONG), long_data, "--max-length 256 lets training examples of up to"),
    ]
    for flags, source, message in cases:
        code, out, err = run_cli(fast_args(tmp_path / "out", source, steps=1, **flags))
        assert code != 0 and message in err, (flags, err)
        assert len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- a run at 2x length

@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """LoRA on the demo model at 2x its length (linear RoPE scaling) on key retrieval."""
    tmp = tmp_path_factory.mktemp("long")
    train = write_jsonl(tmp / "train.jsonl", retrieval_records(400, 1))
    test = write_jsonl(tmp / "test.jsonl", retrieval_records(40, 2))
    out = tmp / "run"
    code, stdout, err = run_cli(fast_args(out, train, steps=80, method="lora", context_length=LONG,
                                          rope_scaling="linear", max_length=None, lora_r=8, alpha=16,
                                          eval_max_new_tokens=2, test_data=test, split=[0.9, 0.1]))
    assert code == 0, err
    assert "context: 256 tokens, RoPE scaled (linear x2)" in stdout
    return out, test


def _eval(args: list) -> dict:
    code, out, err = run_cli(["eval", "--kernel-backend", "torch", "--max-new-tokens", "2", *args])
    assert code == 0, err
    return json.loads(out[out.index("{"):])


@pytest.mark.slow
def test_fine_tuned_at_2x_beats_the_unscaled_base(long_run):
    out, test = long_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["max_length"] == LONG  # --max-length defaults to --context-length
    base = _eval(["--model", DEMO_MODEL, "--data", test])  # the base as it is: no scaling, no tuning
    tuned = _eval(["--model", DEMO_MODEL, "--adapter", out / "adapter", "--data", test])
    assert tuned["exact_match"] == pytest.approx(summary["test_after"]["exact_match"])  # eval applied the scaling
    assert tuned["exact_match"] >= 0.6 and tuned["exact_match"] > base["exact_match"] + 0.5, (base, tuned)
    assert tuned["loss"] < base["loss"]


def test_adapter_records_and_merge_applies_the_scaling(long_run, tmp_path):
    out, _ = long_run
    assert adapter_base_config(out / "adapter") == overrides("linear")
    assert "rope" not in (out / "adapter" / "adapter_config.json").read_text()  # PEFT's config untouched
    merged = tmp_path / "merged"
    code, _, err = run_cli(["merge", "--model", DEMO_MODEL, "--adapter", out / "adapter", "--output", merged,
                            "--kernel-backend", "torch"])
    assert code == 0, err
    config = json.loads((merged / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["max_position_embeddings"] == LONG
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    ours = load_model(DEMO_MODEL, quantize=None, device="cpu", config_overrides=adapter_base_config(out / "adapter"))
    load_adapter(ours, out / "adapter", backend="torch")
    unscaled = load_model(DEMO_MODEL, quantize=None, device="cpu")
    load_adapter(unscaled, out / "adapter", backend="torch")
    with torch.no_grad():
        a, b, c = (m.eval()(long_ids()).logits for m in (ours, plain, unscaled))
    # fp32 over a long sequence: W + s·BA merged rounds apart from the two products (1.1e-4 on an
    # AVX512 CPU); the unscaled base below is 1e-2 away
    torch.testing.assert_close(b, a, rtol=0, atol=5e-4)
    assert (c - a).abs().max() > 1e-2  # the adapter on an unscaled base would be another model


def test_full_fine_tune_saves_the_scaling(tmp_path):
    data = demo_data(tmp_path, n=40)
    out = tmp_path / "full"
    code, _, err = run_cli(fast_args(out, data, steps=2, method="full", context_length=LONG, rope_scaling="yarn",
                                     max_length=64))
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.rope_parameters["rope_type"] == "yarn"
    assert model.config.rope_parameters["original_max_position_embeddings"] == 128


# ----------------------------------------------------------------------------- memory

def _lora_model(checkpointing: bool):
    torch.manual_seed(0)
    model = load_model(DEMO_MODEL, quantize=None, device="cpu", config_overrides=overrides("linear"))
    add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear"), backend="torch")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def _step(model, length: int, offload: bool):
    """(saved-activation counters, loss, gradients) of one forward + backward at `length`."""
    ids = torch.randint(3, 50, (2, length), generator=torch.Generator().manual_seed(length))
    hooks = SavedActivations(model, offload=offload)
    with hooks:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return hooks, loss.item(), grads


def test_activation_memory_against_length():
    """Bytes saved for backward, one LoRA step at 64 / 128 / 256 tokens (batch 2): linear in the
    length; checkpointing keeps ~1/10 of them; offloading keeps none on the device; losses and
    gradients identical in every mode."""
    table = {}
    for checkpointing in (False, True):
        model = _lora_model(checkpointing)
        for length in (64, 128, LONG):
            kept, loss, grads = _step(model, length, offload=False)
            moved, loss_off, grads_off = _step(model, length, offload=True)
            assert loss_off == loss and grads_off.keys() == grads.keys()
            assert all(torch.equal(grads[k], grads_off[k]) for k in grads)
            assert moved.device_bytes == 0 and moved.host_bytes >= kept.device_bytes > 0
            table[checkpointing, length] = (kept.device_bytes, loss, grads)
    print("\nbytes saved for backward (demo model, LoRA r=8, batch 2):")
    for (checkpointing, length), (saved, _, _) in sorted(table.items()):
        print(f"  checkpointing={checkpointing!s:5} length={length:4}: {saved / 2**20:6.2f} MiB")
    for checkpointing in (False, True):
        b64, b128, b256 = (table[checkpointing, n][0] for n in (64, 128, LONG))
        assert 1.9 < b128 / b64 < 2.1 and 1.9 < b256 / b128 < 2.1  # linear: no L x L tensor kept
    for length in (64, 128, LONG):
        full, ckpt = table[False, length], table[True, length]
        assert ckpt[0] < full[0] / 5
        assert ckpt[1] == pytest.approx(full[1], abs=1e-6)
        assert all(torch.allclose(full[2][k], ckpt[2][k], atol=1e-5) for k in full[2])


def test_offload_flag_in_training_gives_the_same_losses(tmp_path):
    data = demo_data(tmp_path, n=40)
    losses = []
    for name, flags in (("plain", {}), ("offload", {"offload_activations": True})):
        out = tmp_path / name
        code, _, err = run_cli(fast_args(out, data, steps=3, gradient_checkpointing=True, **flags))
        assert code == 0, err
        losses.append([r["loss"] for r in metrics(out) if "loss" in r and "step" in r])
    assert losses[0] == losses[1] and len(losses[0]) == 3
