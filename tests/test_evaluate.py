"""Evaluation (`trilora.trainer.evaluate`): classification metrics by hand, and the causal LM's
evaluation loss through the fused linear cross-entropy."""
import pytest
import torch

from trilora.trainer.evaluate import classification_metrics


def test_classification_metrics_by_hand():
    refs = ["a", "a", "b", "b", "c"]
    preds = [" a", "b", "b", "b\n", "x"]  # "x" is no label: wrong for its true class c
    m = classification_metrics(preds, refs)
    # a: P 1, R 1/2, F1 2/3;  b: P 2/3, R 1, F1 4/5;  c: P 0, R 0, F1 0
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx((1 + 2 / 3) / 3)
    assert m["recall"] == pytest.approx((1 / 2 + 1) / 3)
    assert m["f1"] == pytest.approx((2 / 3 + 4 / 5) / 3)
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    with_unseen = classification_metrics(preds, refs, labels=["a", "b", "c", "d"])
    assert with_unseen["precision"] == pytest.approx((1 + 2 / 3) / 4)
    assert classification_metrics(["a"], ["a"])["f1"] == 1.0


def test_evaluation_loss_never_holds_the_logits(monkeypatch):
    """A causal LM's evaluation loss goes through the fused linear cross-entropy (no [tokens,
    vocab] logits) and equals the loss from the model's own logits."""
    from _trainer_helpers import tiny_llama

    from trilora.trainer import evaluate as ev
    model = tiny_llama()
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100
    batches = [{"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}]
    fused = ev.evaluate_loss(model, batches, torch.device("cpu"))
    lm_head_calls = []
    model.lm_head.register_forward_hook(lambda *a: lm_head_calls.append(1))
    assert ev.evaluate_loss(model, batches, torch.device("cpu"))["loss"] == fused["loss"] and not lm_head_calls
    with torch.no_grad():
        want = model(input_ids=ids, labels=labels).loss.item()
    assert fused["loss"] == pytest.approx(want, rel=1e-5) and fused["tokens"] == int((labels[:, 1:] != -100).sum())
