"""The training loop: loss goes down, gradient accumulation, lr schedules, clipping, early
stopping with the best weights kept, metrics.jsonl and loss_curve.png."""
import json
import math

import pytest
import torch
from _trainer_helpers import DEMO_MODEL, adapter, demo_data, fast_args, max_diff, metrics, run_cli
from transformers import AutoTokenizer

from trilora.lora import lora_layers
from trilora.trainer import loop
from trilora.trainer.config import TrainConfig
from trilora.trainer.data import load_records
from trilora.trainer.data_batch import collate_padded
from trilora.trainer.data_tokenize import tokenize_records
from trilora.trainer.loop import Trainer, lr_lambda
from trilora.trainer.run import build_model, weight_io


class FixedBatches:
    """Given micro-batches in a given order, one epoch per iteration; resumable like BatchIterator."""

    def __init__(self, batches):
        self.batches, self.index = batches, 0

    def __iter__(self):
        while self.index < len(self.batches):
            self.index += 1
            yield self.batches[self.index - 1]
        self.index = 0

    def __len__(self):
        return len(self.batches)

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """48 tokenized demo examples of different lengths."""
    path = demo_data(tmp_path_factory.mktemp("data"), n=48)
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    dataset, _ = tokenize_records(load_records(path)[0], tokenizer, 32)
    assert len(set(dataset.lengths)) > 3
    return [dataset[i] for i in range(len(dataset))]


def _micro_batches(examples, cuts):
    """Consecutive groups of 8 examples, each cut at `cuts` into micro-batches."""
    out = []
    for start in range(0, len(examples), 8):
        group, edges = examples[start:start + 8], [0, *cuts, 8]
        out += [collate_padded(group[a:b], 0) for a, b in zip(edges, edges[1:])]
    return out


def _trainer(tmp_path, batches, **settings):
    torch.manual_seed(0)
    config = TrainConfig(model=str(DEMO_MODEL), output_dir=str(tmp_path), kernel_backend="torch", r=4,
                         alpha=8, dropout=0.0, lr=3e-3, **settings)
    model = build_model(config, DEMO_MODEL, torch.device("cpu"), torch.float32)
    write, read = weight_io(model, config)
    return Trainer(model, config, FixedBatches(batches), None, torch.device("cpu"), write, read), model


def _lora_weights(model):
    return {f"{n}.{p}": getattr(layer, p)["default"].weight.detach().clone()
            for n, layer in lora_layers(model) for p in ("lora_A", "lora_B")}


def test_grad_accumulation_equals_one_big_batch(examples, tmp_path):
    """Batch 8 x accum 1 and the same 8 examples as micro-batches 4 + 4 or 6 + 2 (accum 2) take the
    same steps: the loss is weighted by trained tokens, not averaged per micro-batch.

    Through `BatchIterator` the two settings would not see the same examples per step:
    group-by-length cuts batches of 8 and of 4 from differently sorted groups and shuffles the
    batches, so the equivalence is tested on explicit micro-batches."""
    results = {}
    for name, cuts, accum in [("8x1", [], 1), ("4x2", [4], 2), ("6+2", [6], 2)]:
        trainer, model = _trainer(tmp_path / name, _micro_batches(examples, cuts), grad_accum=accum,
                                  max_steps=4)
        initial, grads = _lora_weights(model), []
        _spy_on_step(trainer, lambda: grads.append(_lora_grads(model)))
        trainer.train()
        results[name] = (grads, _lora_weights(model), [r["loss"] for r in trainer.history])
    ref_grads, ref_weights, ref_losses = results["8x1"]
    assert max_diff(ref_weights, initial) > 1e-3  # it trained
    scale = max(g.abs().max().item() for g in ref_grads[0].values())
    for name in ("4x2", "6+2"):
        grads, weights, losses = results[name]
        assert max_diff(grads[0], ref_grads[0]) < 1e-5 * scale, name  # same first gradient
        assert losses == pytest.approx(ref_losses, rel=1e-5), name
        # Adam turns float noise in near-zero gradients into lr-sized moves: a looser bound
        assert max_diff(weights, ref_weights) < 3e-4, name


def _lora_grads(model):
    return {f"{n}.{p}": getattr(layer, p)["default"].weight.grad.detach().clone()
            for n, layer in lora_layers(model) for p in ("lora_A", "lora_B")}


def _spy_on_step(trainer, before_step):
    trainer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: before_step())


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
def test_warmup_then_decay_in_metrics(examples, tmp_path, scheduler):
    trainer, _ = _trainer(tmp_path, _micro_batches(examples, []), max_steps=10, warmup_steps=3,
                          scheduler=scheduler)
    trainer.train()
    lrs = [r["lr"] for r in metrics(tmp_path)]
    factor = lr_lambda(trainer.config, 10)
    assert lrs == pytest.approx([3e-3 * factor(s) for s in range(10)])
    assert lrs[:3] == pytest.approx([1e-3, 2e-3, 3e-3])  # warm-up reaches the peak on its last step
    assert lrs[3] == pytest.approx(3e-3)
    if scheduler == "cosine":
        assert lrs[6] == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 7)))
    elif scheduler == "linear":
        assert lrs[6] == pytest.approx(3e-3 * (1 - 3 / 7))
    else:
        assert lrs[3:] == pytest.approx([3e-3] * 7)
    assert all(lr > 0 for lr in lrs)  # the last step still learns


@pytest.mark.parametrize("max_norm", [1e-3, 0.0])
def test_gradient_clipping(examples, tmp_path, max_norm):
    trainer, model = _trainer(tmp_path, _micro_batches(examples, []), max_steps=3, max_grad_norm=max_norm)
    norms = []
    _spy_on_step(trainer, lambda: norms.append(torch.linalg.vector_norm(
        torch.cat([g.flatten() for g in _lora_grads(model).values()])).item()))
    trainer.train()
    records = metrics(tmp_path)
    if max_norm:
        assert all(n <= max_norm * (1 + 1e-4) for n in norms)
        assert all(r["grad_norm"] > 10 * max_norm for r in records)  # the norm before clipping
    else:
        assert min(norms) > 0.1 and all("grad_norm" not in r for r in records)


def test_loss_goes_down_and_outputs(tmp_path):
    data = demo_data(tmp_path, n=240)
    out = tmp_path / "out"
    code, stdout, err = run_cli(fast_args(out, data, steps=30, batch_size=16, eval_every=10, lora_r=8, alpha=16))
    assert code == 0, err[-3000:]
    records = metrics(out)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 and "grad_norm" in r for r in train)
    assert [r["step"] for r in val] == [10, 20, 30]
    first, last = (sum(r["loss"] for r in part) / 5 for part in (train[:5], train[-5:]))
    assert last < 0.6 * first
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_after"]["loss"] < summary["test_before"]["loss"]
    png = (out / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt
    assert plt.imread(out / "loss_curve.png").shape[:2] == (400, 600)
    assert "splits: train 192, validation 24, test 24" in stdout
    assert "kept 240 of 240 records" in stdout


def test_early_stopping_keeps_the_best_weights(tmp_path, monkeypatch):
    """Validation losses 5, 4, 4.5, 4.2: with patience 2 the run stops after the 4th validation
    (step 8 of 40); <out>/best and the final adapter hold the step-4 weights."""
    scripted = iter([5.0, 4.0, 4.5, 4.2, 1.0, 1.0])
    monkeypatch.setattr(loop.Trainer, "validate",
                        lambda self: {"loss": (v := next(scripted)), "perplexity": math.exp(v), "tokens": 1})
    data = demo_data(tmp_path, n=120)
    out = tmp_path / "out"
    code, _, err = run_cli(fast_args(out, data, steps=40, eval_every=2, patience=2, save_every=2))
    assert code == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] == 8
    assert summary["best_step"] == 4 and summary["best_val_loss"] == 4.0
    assert [r["val_loss"] for r in metrics(out) if "val_loss" in r] == [5.0, 4.0, 4.5, 4.2]
    best, final = adapter(out / "best"), adapter(out / "adapter")
    assert max_diff(best, final) == 0
    assert max_diff(final, adapter(out / "checkpoints" / "step-4" / "weights")) == 0
    assert max_diff(final, adapter(out / "checkpoints" / "step-6" / "weights")) > 0
    assert not (out / "checkpoints" / "step-8").exists()  # no checkpoint of a stopped run's last step


def test_overwriting_run_replaces_old_metrics(tmp_path):
    data = demo_data(tmp_path, n=80)
    out = tmp_path / "out"
    for steps, overwrite in ((6, None), (3, True)):
        code, _, err = run_cli(fast_args(out, data, steps=steps, overwrite=overwrite))
        assert code == 0, err[-2000:]
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]
