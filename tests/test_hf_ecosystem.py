"""Drop-in for HF / TRL / PEFT pipelines (issue 13): checkpoints written by HF's Trainer and
TRL's SFTTrainer are adapters that reload through PEFT and transformers, resume is exact,
PEFT's methods (disable_adapter for reference logits, merge_and_unload, state dicts) behave
as PEFT's on the same model, transformers' adapter methods answer instead of failing."""
import json
import math

import pytest
import torch
from _lora_models import one_thread  # noqa: F401  (autouse fixture)
from _lora_models import VOCAB, logits, max_diff, tiny, twin
from peft import PeftModel
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from trilora.lora import LoraConfig, add_lora
from trilora.quant import quantize_model


class Sequences(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seq: int = 16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (4, seq), generator=g).repeat(n // 4, 1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def base_dir(tmp_path, quantized=False):
    base = tiny("llama")
    folder = tmp_path / "base"
    base.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if quantized:
        quantize_model(model, backend="torch")
    return folder, model


def adapted(model, folder):
    return add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", base_model_name_or_path=str(folder)),
                    backend="torch")


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2, report_to=[],
                use_cpu=True, save_strategy="steps", save_steps=3, disable_tqdm=True, seed=0, logging_steps=1,
                lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.parametrize("quantized", [False, True])
def test_trainer_checkpoints_are_adapters_that_reload_everywhere(tmp_path, quantized):
    folder, model = base_dir(tmp_path, quantized)
    model = adapted(model, folder)
    trainer = Trainer(model=model, args=args(tmp_path / "run"), train_dataset=Sequences())
    trainer.train()
    trainer.save_model(tmp_path / "final")
    for ckpt in (tmp_path / "run" / "checkpoint-6", tmp_path / "final"):
        files = {p.name for p in ckpt.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "config.json" not in files
        # the adapter, not the base: a few KB here (the whole base would be ~100x more)
        assert (ckpt / "model.safetensors").stat().st_size < 0.2 * (folder / "model.safetensors").stat().st_size
    ours = logits(model.eval())
    if quantized:  # PEFT over bitsandbytes' NF4 (the same bytes as ours)
        from transformers import BitsAndBytesConfig
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, device_map="cpu")
    else:
        base = AutoModelForCausalLM.from_pretrained(folder)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "final").eval()
    assert max_diff(logits(peft_model), ours) < (2e-3 if quantized else 1e-5)
    if not quantized:  # transformers' own route: base from adapter_config.json + the adapter
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
        assert max_diff(logits(hf), ours) < 1e-5


def test_resume_from_a_trainer_checkpoint_is_exact(tmp_path):
    folder, model = base_dir(tmp_path)
    full = Trainer(model=adapted(model, folder), args=args(tmp_path / "a"), train_dataset=Sequences())
    full.train()
    _, model2 = base_dir(tmp_path)
    resumed = Trainer(model=adapted(model2, folder), args=args(tmp_path / "a"), train_dataset=Sequences())
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    a = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_trainer_with_the_peft_view_saves_adapters_and_resumes_exactly(tmp_path):
    """Through `as_peft_model`, HF's Trainer takes its PeftModel paths (save the adapter,
    resume with load_adapter); the run is the same as without the view."""
    from trilora.lora import as_peft_model
    folder, model = base_dir(tmp_path)
    plain = Trainer(model=adapted(model, folder), args=args(tmp_path / "plain"), train_dataset=Sequences())
    plain.train()
    _, model = base_dir(tmp_path)
    full = Trainer(model=as_peft_model(adapted(model, folder)), args=args(tmp_path / "a"), train_dataset=Sequences())
    full.train()
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "config.json").exists()
    _, model2 = base_dir(tmp_path)
    resumed = Trainer(model=as_peft_model(adapted(model2, folder)), args=args(tmp_path / "a"),
                      train_dataset=Sequences())
    resumed.train(resume_from_checkpoint=str(ckpt))
    ref = {n: p for n, p in plain.model.named_parameters() if p.requires_grad}
    for trainer in (full, resumed):
        got = {n.removeprefix("base_model.model."): p for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)


def test_peft_surface_matches_peft_on_the_same_model(tmp_path, capsys):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, get_peft_model_state_dict
    base = tiny("llama")
    reference = logits(base)
    model = add_lora(twin(base), LoraConfig(r=4, alpha=8, target_modules="all-linear"), backend="torch")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    adapted_logits = logits(model)
    assert max_diff(adapted_logits, reference) > 1e-3
    with model.disable_adapter():  # DPO's reference model: exactly the base
        assert torch.equal(logits(model), reference)
    assert torch.equal(logits(model), adapted_logits)
    model.disable_adapter_layers()
    assert torch.equal(logits(model), reference)
    model.enable_adapter_layers()

    peft_model = get_peft_model(twin(base), PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert model.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    model.print_trainable_parameters()
    peft_model.print_trainable_parameters()
    ours_line, peft_line = capsys.readouterr().out.strip().splitlines()
    assert ours_line == peft_line
    state = model.get_adapter_state_dict()
    assert sorted(state) == sorted(get_peft_model_state_dict(peft_model))  # the same keys
    fresh = add_lora(twin(base), LoraConfig(r=4, alpha=8, target_modules="all-linear"), backend="torch")
    fresh.set_adapter_state_dict(state)
    assert torch.equal(logits(fresh), adapted_logits)
    with pytest.raises(ValueError, match="adapter state dict keys this model's adapter lacks"):
        fresh.set_adapter_state_dict({"base_model.model.nope.lora_A.weight": torch.zeros(1)})
    merged = model.merge_and_unload()
    assert max_diff(logits(merged), adapted_logits) < 1e-5
    merged.save_pretrained(tmp_path / "merged")  # a plain model again
    assert (tmp_path / "merged" / "config.json").exists()


def test_transformers_adapter_methods_answer_for_trilora_adapters(tmp_path):
    folder, model = base_dir(tmp_path)
    model = adapted(model, folder)
    model.save_pretrained(tmp_path / "ad")
    assert model.active_adapters == ["default"]
    model.set_adapter("default")
    model.load_adapter(tmp_path / "ad", "default")
    with pytest.raises(ValueError, match="no adapter 'other'"):
        model.set_adapter("other")
    with pytest.raises(TypeError, match="adapter config must be"):
        model.add_adapter(object())
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(folder)


# ----------------------------------------------------------------------------- TRL

def _sft(model, out, steps=4):
    from _data_helpers import char_tokenizer
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    data = Dataset.from_list([{"text": f"rotate: word{i} = ord{i}w"} for i in range(32)])
    config = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                       report_to=[], use_cpu=True, save_strategy="steps", save_steps=steps, logging_steps=1,
                       disable_tqdm=True, max_length=32, seed=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=char_tokenizer())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer


@pytest.mark.slow
@pytest.mark.parametrize("quantized", [False, True])
def test_trl_sft_trainer_patched_and_unpatched(tmp_path, quantized):
    """TRL's SFTTrainer trains trilora adapters, with trilora.patch's fused blocks and loss too
    (TRL runs its own fused LM head; the patched loss stands aside), and its checkpoints are
    adapters PEFT loads."""
    pytest.importorskip("trl")
    from trilora.patching import patch
    runs = {}
    for patched in (False, True):
        model = tiny("llama")
        if quantized:
            quantize_model(model, backend="torch")
        model = add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), backend="torch")
        if patched:
            patch(model, backend="torch", warn=False)
        runs[patched], _ = _sft(model, tmp_path / f"run-{patched}")
        ckpt = tmp_path / f"run-{patched}" / "checkpoint-4"
        assert (ckpt / "adapter_config.json").exists() and not (ckpt / "config.json").exists()
    assert len(runs[False]) == 4 and runs[False][-1] < runs[False][0]
    assert runs[True] == pytest.approx(runs[False], abs=2e-3)
    if not quantized:
        reloaded = PeftModel.from_pretrained(tiny("llama"), tmp_path / "run-False" / "checkpoint-4").eval()
        assert max_diff(logits(reloaded), logits(tiny("llama"))) > 1e-3  # the trained adapter is in it
        model = tiny("llama")
        add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), backend="torch")
        model.load_adapter(tmp_path / "run-False" / "checkpoint-4")
        assert max_diff(logits(reloaded), logits(model.eval())) < 1e-5


@pytest.mark.slow
def test_trl_dpo_takes_reference_logits_from_a_frozen_adapter_copy(tmp_path):
    """TRL's DPOTrainer recognises the PEFT view: no second model is loaded; for an adapter
    that is already trained it adds a frozen "ref" copy (through PEFT's parameter names) and
    scores the reference with it, so the first step's loss is exactly ln 2 (policy = reference)."""
    pytest.importorskip("trl")
    from _data_helpers import char_tokenizer
    from _lora_models import randomize_lora
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from trilora.lora import as_peft_model
    model = add_lora(tiny("llama"), LoraConfig(r=4, alpha=8, target_modules="all-linear"), backend="torch")
    randomize_lora(model, std=0.05)  # a trained adapter: the reference is not the base model
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    data = Dataset.from_list([{"prompt": f"q{i}:", "chosen": f" yes{i}", "rejected": f" no{i}"} for i in range(16)])
    config = DPOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                       report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True, save_strategy="no", seed=0,
                       max_length=32)
    trainer = DPOTrainer(model=as_peft_model(model), args=config, train_dataset=data,
                         processing_class=char_tokenizer())
    assert trainer.ref_model is None and list(model.trilora_lora_configs) == ["default", "ref"]
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if ".ref." in name:  # the reference stayed frozen at the adapter's starting values
            assert not p.requires_grad and torch.equal(p, start[name.replace(".ref.", ".default.")])
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if ".default." in n)
    assert model.active_adapter == "default"


def test_a_second_adapter_system_is_refused(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    model = add_lora(tiny("llama"), LoraConfig(r=4, alpha=8, target_modules="all-linear"), backend="torch")
    before = logits(model)
    with pytest.raises(ValueError, match="already carries trilora LoRA adapters: PEFT cannot add its own"):
        get_peft_model(model, PeftLoraConfig(r=4, target_modules="all-linear"))
    assert torch.equal(logits(model), before)  # refused before anything was replaced


# ----------------------------------------------------------------------------- accelerate_peft

def _base(quantized: bool, tmp_path):
    folder = tmp_path / "base"
    if not folder.exists():
        tiny("llama").save_pretrained(folder)
    if not quantized:
        return AutoModelForCausalLM.from_pretrained(folder)
    from transformers import BitsAndBytesConfig
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, device_map="cpu")


def _peft_model(quantized: bool, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    base = _base(quantized, tmp_path)
    torch.manual_seed(1)
    return get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))


def _train_steps(model, steps=5):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    data = Sequences()
    losses = []
    for step in range(steps):
        ids = data.ids[4 * step % 32: 4 * step % 32 + 4]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, params


@pytest.mark.parametrize("quantized", [False, True])
def test_accelerate_peft_trains_to_the_same_losses(tmp_path, quantized, monkeypatch):
    import trilora
    from peft import PeftModel

    from trilora.lora import peft_accelerate
    calls = []
    fused = peft_accelerate.kernels.lora_linear
    monkeypatch.setattr(peft_accelerate.kernels, "lora_linear", lambda *a, **k: calls.append(1) or fused(*a, **k))
    plain = _peft_model(quantized, tmp_path)
    fast = _peft_model(quantized, tmp_path)
    keys = list(fast.state_dict())
    report = trilora.accelerate_peft(fast, backend="torch")
    assert len(report.converted) == 2 * 7 and not report.kept, report
    assert list(fast.state_dict()) == keys  # nothing renamed
    want, _ = _train_steps(plain)
    got, params = _train_steps(fast)
    assert len(calls) == 5 * 14  # every LoRA layer of every step ran trilora's fused op
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert all(p.grad is None for p in params)  # the optimizer stepped the very Parameters PEFT holds
    fast.save_pretrained(tmp_path / "adapter")   # PEFT's own saving, unchanged
    reloaded = PeftModel.from_pretrained(_base(quantized, tmp_path), tmp_path / "adapter").eval()
    assert max_diff(logits(reloaded), logits(fast.eval())) < 1e-4
    with fast.disable_adapter(), reloaded.disable_adapter():  # PEFT's own switch still decides
        assert max_diff(logits(fast), logits(reloaded)) < 1e-4
    assert max_diff(logits(fast), logits(_base(quantized, tmp_path).eval())) > 1e-3
