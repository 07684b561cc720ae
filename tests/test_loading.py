"""`load_model`: dense, NF4 on the fly, sharded, pre-quantized bitsandbytes, tied embeddings,
one dense weight alive at a time, and clear errors for directories it must refuse."""
import json
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
from _bnb import bnb_dequantize
from _trainer_helpers import logits_of, tiny_llama

from trilora.quant import Linear4bit, dequantize_4bit, quantize_4bit
from trilora.trainer import loading
from trilora.trainer.loading import load_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama saved as one safetensors file, and the model itself."""
    model = tiny_llama()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    return path, model


def test_dense_load_gives_the_saved_logits_exactly(saved):
    path, model = saved
    loaded = load_model(path, quantize=None, device="cpu")
    assert not loaded.training
    assert torch.equal(logits_of(loaded), logits_of(model))
    for (name, p), (_, q) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(p, q), name


def test_nf4_on_the_fly_quantizes_every_linear_but_the_head(saved):
    path, model = saved
    loaded = load_model(path, quantize="nf4", device="cpu", backend="torch")
    linear_names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    four_bit = {n for n, m in loaded.named_modules() if isinstance(m, Linear4bit)}
    assert four_bit == linear_names - {"lm_head"}
    assert type(loaded.lm_head) is nn.Linear
    layer = loaded.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.quant_state.quant_type == "nf4" and layer.quant_state.nested
    dense = model.get_submodule("model.layers.0.mlp.down_proj").weight.detach()
    packed, state = quantize_4bit(dense, "nf4", 64, True, backend="torch")
    assert torch.equal(layer.weight, packed)
    assert torch.equal(dequantize_4bit(layer.weight, layer.quant_state, backend="torch"),
                       dequantize_4bit(packed, state, backend="torch"))
    # the 4-bit model still predicts like the dense one
    a, b = logits_of(loaded).softmax(-1), logits_of(model).softmax(-1)
    assert (a - b).abs().max() < 0.05


def test_sharded_checkpoint_loads_identically(saved, tmp_path):
    _, model = saved
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 3
    dense = load_model(tmp_path, quantize=None, device="cpu")
    assert torch.equal(logits_of(dense), logits_of(model))
    one_file = load_model(saved[0], quantize="nf4", device="cpu", backend="torch")
    sharded = load_model(tmp_path, quantize="nf4", device="cpu", backend="torch")
    assert torch.equal(logits_of(sharded), logits_of(one_file))


def test_tied_embeddings_stay_tied(tmp_path):
    model = tiny_llama(tied=True)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, quantize="nf4", device="cpu", backend="torch")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    dense = load_model(tmp_path, quantize=None, device="cpu")
    assert torch.equal(logits_of(dense), logits_of(model))


def test_at_most_one_dense_linear_weight_alive(saved, monkeypatch):
    """Peak memory: each linear weight is quantized as it is read and its dense copy freed
    before the next is read, so no full-size dense copy of the model ever exists."""
    path, model = saved
    seen, alive_at_call = [], []
    original = Linear4bit.from_dense

    def spy(weight, *args, **kwargs):
        alive_at_call.append(sum(ref() is not None for ref in seen))
        seen.append(weakref.ref(weight))
        return original(weight, *args, **kwargs)

    monkeypatch.setattr(loading.Linear4bit, "from_dense", spy)
    load_model(path, quantize="nf4", device="cpu", backend="torch")
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules()) - 1  # not lm_head
    assert len(seen) == n_linear
    assert alive_at_call == [0] * n_linear  # no earlier dense weight survives its quantization
    assert all(ref() is None for ref in seen)


def test_real_bitsandbytes_checkpoint_loads_bit_for_bit(saved, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path, _ = saved
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb_model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
        bnb_model.save_pretrained(tmp_path / "bnb")
    assert "quantization_config" in json.loads((tmp_path / "bnb" / "config.json").read_text())
    ours = load_model(tmp_path / "bnb", quantize=None, device="cpu")  # pre-quantized wins
    checked = 0
    for name, module in bnb_model.named_modules():
        if type(module).__name__ != "Linear4bit":
            continue
        mine = ours.get_submodule(name)
        assert isinstance(mine, Linear4bit), name
        theirs = bnb_dequantize(module.weight.data, module.weight.quant_state)
        assert torch.equal(dequantize_4bit(mine.weight, mine.quant_state, backend="torch"), theirs), name
        checked += 1
    assert checked == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert type(ours.lm_head) is nn.Linear
    assert torch.equal(ours.lm_head.weight, bnb_model.lm_head.weight)


def test_no_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_model(tmp_path / "nope")


def test_config_without_weights(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved[0] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(tmp_path)


def test_pickle_checkpoint_is_refused(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved[0] / "config.json").read_text())
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*pickle"):
        load_model(tmp_path)


def test_missing_shard_and_missing_weights(saved, tmp_path):
    _, model = saved
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match="shards listed in the index are missing"):
        load_model(tmp_path, quantize=None)
    # an index that omits a shard: the weights in it are reported missing
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shards[1].name}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="the checkpoint lacks .* weights"):
        load_model(tmp_path, quantize=None)


def test_remote_code_is_off_by_default(tmp_path):
    """A config that needs custom code is refused, and its code never runs."""
    marker = tmp_path / "ran"
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                           "AutoModelForCausalLM": "evil.EvilModel"}}))
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(tmp_path)
    assert not marker.exists()


def test_bad_quantize_argument(saved):
    with pytest.raises(ValueError, match="quantize must be"):
        load_model(saved[0], quantize="int8")
