"""Several named adapters on one model (trilora/lora/adapters.py), each behaviour checked
against PEFT's on the same base with the same adapter weights: switching, trainability,
weighted combinations ("linear", "cat", "svd"), deletion, saving and loading, and the
`peft.PeftModel` view (`as_peft_model`)."""
import peft
import pytest
import torch
from _lora_models import one_thread  # noqa: F401  (autouse fixture)
from _lora_models import input_ids, logits, max_diff, randomize_lora, tiny, twin

from trilora.lora import (LoraConfig, LoraLinear, add_lora, add_weighted_adapter, adapter_names, as_peft_model,
                          delete_adapter, load_adapter, lora_layers, set_adapter)

FIRST = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
SECOND = dict(r=3, alpha=9, target_modules=["k_proj", "v_proj", "down_proj"])
THIRD = dict(r=4, alpha=4, target_modules=["q_proj", "o_proj"], use_rslora=True)


def _peft_cfg(kw):
    return peft.LoraConfig(r=kw["r"], lora_alpha=kw["alpha"], target_modules=kw["target_modules"],
                           use_rslora=kw.get("use_rslora", False))


def pair():
    """(trilora model, PEFT model) over identical bases, adapters "default", "two", "three"
    with identical random weights (PEFT's parameter names are ours with its prefix)."""
    base = tiny("llama")
    ours = add_lora(twin(base), LoraConfig(**FIRST), backend="torch")
    add_lora(ours, LoraConfig(**SECOND), backend="torch", adapter_name="two")
    add_lora(ours, LoraConfig(**THIRD), backend="torch", adapter_name="three")
    randomize_lora(ours, seed=5)
    theirs = peft.get_peft_model(twin(base), _peft_cfg(FIRST))
    theirs.add_adapter("two", _peft_cfg(SECOND))
    theirs.add_adapter("three", _peft_cfg(THIRD))
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(mine[name.removeprefix("base_model.model.")])
    return ours, theirs


def trainable(model, prefix=""):
    return {n.removeprefix(prefix) for n, p in model.named_parameters() if p.requires_grad}


def test_switching_adapters_matches_peft():
    ours, theirs = pair()
    base = logits(tiny("llama"))
    assert adapter_names(ours) == ["default", "two", "three"]
    assert set(ours.state_dict()) == {k.removeprefix("base_model.model.") for k in theirs.state_dict()}
    for name in ("default", "two", "three", "default"):
        set_adapter(ours, name)
        theirs.set_adapter(name)
        got = logits(ours)
        assert max_diff(got, logits(theirs)) < 1e-5 and max_diff(got, base) > 1e-2
        assert trainable(ours) == trainable(theirs, "base_model.model.")  # only the active one trains
        assert all(n.split(".lora_")[1].split(".")[1] == name for n in trainable(ours))
        assert ours.active_adapter == name and ours.active_adapters == [name]
    with ours.disable_adapter(), theirs.disable_adapter():
        assert max_diff(logits(ours), base) == 0 and max_diff(logits(theirs), base) == 0


def test_added_adapter_is_frozen_and_inactive_and_names_are_checked():
    model = add_lora(tiny("llama"), LoraConfig(**FIRST), backend="torch")
    randomize_lora(model)
    before = logits(model)
    add_lora(model, LoraConfig(**SECOND), backend="torch", adapter_name="two")
    assert max_diff(logits(model), before) == 0          # "default" still runs, alone
    assert all(".default." in n for n in trainable(model))
    for bad, err in (("default", "already has an adapter named 'default'"), ("a.b", "without '.'")):
        with pytest.raises(ValueError, match=err):
            add_lora(model, LoraConfig(**SECOND), adapter_name=bad)
    with pytest.raises(ValueError, match="no adapter 'nope'; its adapters: \\['default', 'two'\\]"):
        set_adapter(model, "nope")
    with pytest.raises(ValueError, match="one adapter at a time"):
        set_adapter(model, ["default", "two"])
    with pytest.raises(ValueError, match="LoRA-only"):
        add_lora(model, LoraConfig(r=2, target_modules=["q_proj"], bias="all"), adapter_name="b")


@pytest.mark.parametrize("kind,adapters,weights", [
    ("linear", ["default", "three"], [0.7, -0.4]),
    ("cat", ["default", "two", "three"], [1.0, 0.5, -2.0]),
    ("svd", ["default", "two"], [0.6, 1.3]),
    ("linear", ["two"], [2.0]),
])
def test_weighted_adapter_matches_peft(kind, adapters, weights):
    ours, theirs = pair()
    add_weighted_adapter(ours, adapters, weights, "mix", combination_type=kind)
    theirs.add_weighted_adapter(adapters, weights, "mix", combination_type=kind)
    mine = dict(ours.named_parameters())
    compared = 0
    for name, p in theirs.named_parameters():
        if ".mix." in name:
            assert max_diff(mine[name.removeprefix("base_model.model.")], p) < 1e-5, name
            compared += 1
    assert compared == sum(1 for n in mine if ".mix." in n) > 0
    assert not any(".mix." in n for n in trainable(ours))  # a new adapter starts frozen, as PEFT's
    set_adapter(ours, "mix")
    theirs.set_adapter("mix")
    assert max_diff(logits(ours), logits(theirs)) < 1e-5
    if kind == "cat":  # exact: the sum of the weighted deltas, layer by layer
        for _, layer in lora_layers(ours):
            want = sum(w * layer.delta_weight(a) for a, w in zip(adapters, weights) if a in layer.lora_A)
            assert max_diff(layer.delta_weight("mix"), want) < 1e-5


def test_weighted_adapter_errors():
    ours, _ = pair()
    with pytest.raises(ValueError, match="one rank"):
        add_weighted_adapter(ours, ["default", "two"], [1, 1], "m", combination_type="linear")
    with pytest.raises(ValueError, match="ties / dare"):
        add_weighted_adapter(ours, ["default", "two"], [1, 1], "m", combination_type="ties")
    with pytest.raises(ValueError, match="one weight per adapter"):
        add_weighted_adapter(ours, ["default", "two"], [1], "m", combination_type="cat")
    with pytest.raises(ValueError, match="finite"):
        add_weighted_adapter(ours, ["default", "two"], [1, float("nan")], "m", combination_type="cat")
    add_lora(ours, LoraConfig(r=2, alpha=4, target_modules=["q_proj"], use_dora=True), adapter_name="d")
    with pytest.raises(ValueError, match=r"\['d'\] are DoRA adapters"):
        add_weighted_adapter(ours, ["default", "d"], [1, 1], "m", combination_type="cat")
    assert adapter_names(ours) == ["default", "two", "three", "d"]  # nothing half-added


def test_delete_adapter():
    ours, theirs = pair()
    with pytest.raises(ValueError, match="is the active adapter"):
        delete_adapter(ours, "default")
    delete_adapter(ours, "two")
    theirs.delete_adapter("two")
    assert adapter_names(ours) == ["default", "three"]
    assert set(ours.state_dict()) == {k.removeprefix("base_model.model.") for k in theirs.state_dict()}
    down = ours.model.layers[0].mlp.down_proj  # its only adapter went away: the base runs alone
    assert isinstance(down, LoraLinear) and down.adapter_names == [] and not down.runs_adapter
    set_adapter(ours, "three")
    theirs.set_adapter("three")
    assert max_diff(logits(ours), logits(theirs)) < 1e-5


def test_merge_and_unload_folds_the_active_adapter_only():
    ours, theirs = pair()
    set_adapter(ours, "two")
    theirs.set_adapter("two")
    want = logits(ours)
    merged, peft_merged = ours.merge_and_unload(), theirs.merge_and_unload()
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert max_diff(logits(merged), want) < 1e-5 and max_diff(logits(peft_merged), want) < 1e-5


def test_save_load_every_adapter_in_peft_layout(tmp_path):
    ours, theirs = pair()
    ours.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "adapter_model.safetensors").is_file()       # "default" at the root
    assert (tmp_path / "ours" / "two" / "adapter_model.safetensors").is_file()  # others in <name>/
    # PEFT reads our layout back, adapter by adapter
    peft_loaded = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path / "ours")
    peft_loaded.load_adapter(tmp_path / "ours" / "two", "two")
    loaded = load_adapter(tiny("llama"), tmp_path / "ours", backend="torch")
    load_adapter(loaded, tmp_path / "ours" / "two", backend="torch", adapter_name="two")
    for name in ("default", "two"):
        set_adapter(ours, name)
        peft_loaded.set_adapter(name)
        set_adapter(loaded, name)
        want = logits(ours)
        assert max_diff(logits(peft_loaded), want) < 1e-5 and max_diff(logits(loaded), want) < 1e-5
    # and we read PEFT's
    theirs.save_pretrained(tmp_path / "theirs")
    fresh = load_adapter(tiny("llama"), tmp_path / "theirs", backend="torch")
    fresh.load_adapter(tmp_path / "theirs" / "three", "three")
    fresh.set_adapter("three")
    theirs.set_adapter("three")
    assert max_diff(logits(fresh), logits(theirs)) < 1e-5


def test_peft_model_view_is_recognised_and_shares_everything():
    from accelerate.utils import is_peft_model
    ours, theirs = pair()
    view = as_peft_model(ours)
    assert isinstance(view, peft.PeftModel) and is_peft_model(view) and view.get_base_model() is ours
    assert set(view.state_dict()) == set(theirs.state_dict())  # PEFT's own keys
    assert {n for n, _ in view.named_parameters()} == {n for n, _ in theirs.named_parameters()}
    assert all(a is b for a, b in zip(view.parameters(), ours.parameters()))
    cfg = view.peft_config["two"]
    assert isinstance(cfg, peft.LoraConfig) and cfg.r == 3 and cfg.lora_alpha == 9 and not cfg.inference_mode
    ids = input_ids()
    assert torch.equal(view(input_ids=ids).logits, ours(input_ids=ids).logits)
    view.set_adapter("two")
    assert view.active_adapter == "two" == ours.active_adapter and view.active_adapters == ["two"]
    # TRL's DPO: a frozen "ref" copy of the adapter, made through PEFT's names
    view.add_adapter("ref", view.peft_config["two"])
    for name, p in view.named_parameters():
        if ".two." in name:
            view.get_parameter(name.replace(".two.", ".ref.")).data.copy_(p.data)
    want = logits(ours)
    view.set_adapter("ref")
    assert max_diff(logits(view), want) == 0
    with view.disable_adapter():
        assert max_diff(logits(view), logits(tiny("llama"))) == 0
    with pytest.raises(ValueError, match="needs a model with trilora adapters"):
        as_peft_model(tiny("llama"))


def test_patched_blocks_follow_the_active_and_the_disabled_adapter():
    """trilora.patch's fused attention/MLP read each projection's active adapter at every call:
    switching adapters and disable_adapter() give the unpatched model's logits."""
    from trilora.patching import patch
    ours, _ = pair()
    plain = twin(ours)
    patch(ours, backend="torch", warn=False)
    ids = input_ids()
    for name in ("two", "three", "default"):
        set_adapter(ours, name)
        set_adapter(plain, name)
        assert max_diff(logits(ours, ids), logits(plain, ids)) < 1e-5
    with ours.disable_adapter():
        assert max_diff(logits(ours, ids), logits(tiny("llama"), ids)) < 1e-5
