"""`load_sharded` (--fsdp's loading) on CPU with gloo, 2 processes: each rank builds the model
on the meta device and fills only its shards, and the result — gathered — is the model
`load_model` + `add_lora` give in one process, byte for byte (packed 4-bit weights, absmax
and the other quant tables, biases, tied embeddings, LoRA factors and DoRA magnitudes drawn
from the same generator state), with the same logits. Peak host memory per rank grows by
about its shards, not by the whole model as a host build does."""
import json

import pytest
import torch
from _trainer_helpers import run_module, subprocess_env, tiny_llama
from safetensors.torch import load_file

from trilora.lora import LoraConfig, add_lora
from trilora.quant import Linear4bit
from trilora.trainer.loading import load_model

WORKER = __file__.replace("test_sharded_loading.py", "_sharded_load_worker.py")


def run_ranks(model_dir, out, mode="sharded", quantize="nf4", dora=False, nproc=2, env=None):
    out.mkdir(parents=True, exist_ok=True)
    run_module(["--standalone", f"--nproc_per_node={nproc}", WORKER, str(model_dir), str(out), mode, quantize,
                "dora" if dora else "lora"], module="torch.distributed.run", timeout=300,
               env={**subprocess_env(), "CUDA_VISIBLE_DEVICES": "", **(env or {})})
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    return load_file(out / "state.safetensors"), load_file(out / "logits.safetensors")["logits"], ranks


def reference(model_dir, quantize, dora):
    """What one process gets: load_model, then add_lora from the same seed."""
    model = load_model(model_dir, quantize=None if quantize == "none" else quantize, device="cpu", backend="torch")
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=3, alpha=6, target_modules="all-linear", use_dora=dora), backend="torch")
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return model, logits


def assert_same_model(state, model):
    names = dict(model.named_parameters())
    for name, p in names.items():
        assert torch.equal(state[name], p.detach()), name
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            qs = m.quant_state
            assert torch.equal(state[f"{name}.absmax"], qs.absmax), name  # sharded as a parameter
            for key in ("code", "nested_absmax", "nested_code", "offset"):
                if getattr(qs, key) is not None:
                    assert torch.equal(state[f"{name}.quant_state.{key}"], getattr(qs, key).reshape(-1)), (name, key)
    extra = set(state) - set(names) - {k for k in state if ".quant_state." in k or k.endswith(".absmax")}
    assert not extra, extra


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    """Tied embeddings, attention biases (quantized layers with a bias), odd sizes."""
    path = tmp_path_factory.mktemp("tied")
    tiny_llama(tied=True, seed=3, hidden_size=72, intermediate_size=136, attention_bias=True,
               num_attention_heads=4, num_key_value_heads=2, head_dim=18).save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("quantize, dora", [("nf4", False), ("fp4", True), ("none", True)],
                         ids=["qlora-nf4", "qdora-fp4", "dora-fp32"])
def test_sharded_load_equals_one_process_load(tied_model_dir, tmp_path, quantize, dora):
    state, logits, ranks = run_ranks(tied_model_dir, tmp_path / "out", quantize=quantize, dora=dora)
    model, want = reference(tied_model_dir, quantize, dora)
    assert_same_model(state, model)
    assert torch.allclose(logits, want, rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied in the reference
    total = ranks[0]["total"]  # each rank half of the bytes, up to one row of each tensor (r = 3 rows of A split 2/1)
    assert sum(r["local"] for r in ranks) == total
    assert all(abs(r["local"] - total / 2) <= r["row_bytes"] for r in ranks)


@pytest.mark.slow
def test_sharded_load_of_a_prequantized_checkpoint(tmp_path):
    """A bitsandbytes-saved 4-bit checkpoint: each layer's format is read from its entries."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dense = tmp_path / "dense"
    tiny_llama(seed=5, hidden_size=64, intermediate_size=96).save_pretrained(dense)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                                bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(dense, quantization_config=config, device_map="cpu").save_pretrained(
        tmp_path / "bnb")
    state, logits, _ = run_ranks(tmp_path / "bnb", tmp_path / "out", quantize="nf4")  # the stored fp4 wins
    model, want = reference(tmp_path / "bnb", "nf4", False)
    assert all(m.quant_type == "fp4" and not m.double_quant for m in model.modules() if isinstance(m, Linear4bit))
    assert_same_model(state, model)
    assert torch.allclose(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_peak_host_memory_per_rank_is_about_its_shards(tmp_path):
    """A bf16 checkpoint of a ~70 MB fp32 model: the anonymous memory of a rank of the
    sharded load grows by its shards plus a few dense weights in flight; a host build holds
    the whole model first. (A fixed malloc mmap threshold hands freed transients back to the
    kernel, so what is measured is what is held.)"""
    path = tmp_path / "model"
    model = tiny_llama(vocab_size=256, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                       num_attention_heads=8, num_key_value_heads=4)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(path)  # read as fp32: every tensor a new copy
    del model
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    _, _, sharded = run_ranks(path, tmp_path / "sharded", quantize="none", env=env)
    _, _, host = run_ranks(path, tmp_path / "host", mode="host", quantize="none", env=env)
    largest = 512 * 1408 * 4  # one MLP weight in fp32: the reader holds one at a time
    for rank in sharded:
        assert rank["growth"] < rank["local"] + 5 * largest, (rank, model_bytes)
    for rank in host:
        assert rank["growth"] > model_bytes, (rank, model_bytes)
