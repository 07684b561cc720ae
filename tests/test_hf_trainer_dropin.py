"""Drop-in: a trilora-adapted HF model trains inside `transformers.Trainer`, and PEFT loads the result."""
import torch
from peft import PeftModel
from transformers import Trainer, TrainingArguments

from _lora_models import one_thread  # noqa: F401  (autouse fixture)
from _lora_models import VOCAB, logits, max_diff, tiny, twin
from trilora.lora import LoraConfig, add_lora, lora_layers, save_adapter


class RepeatedSequences(torch.utils.data.Dataset):
    """A few fixed random sequences, repeated: a tiny model can memorise them in a few steps."""

    def __init__(self, n: int = 32, distinct: int = 4, seq: int = 16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (distinct, seq), generator=g).repeat(n // distinct, 1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _eval_loss(model, ids: torch.Tensor) -> float:
    was_training = model.training
    with torch.no_grad():
        loss = model.eval()(input_ids=ids, labels=ids).loss.item()
    model.train(was_training)
    return loss


def test_trainer_fine_tunes_and_peft_loads_the_adapter(tmp_path):
    base = tiny("llama")
    fresh = twin(base)
    model = add_lora(base, LoraConfig(r=8, alpha=16, dropout=0.05, target_modules="all-linear"),
                     backend="torch")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=20,
                             learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, seed=0, lr_scheduler_type="constant")
    data = RepeatedSequences()
    batch = data.ids[:4]
    eval_loss_before = _eval_loss(model, batch)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20
    # frozen HF-initialised embeddings / head (std 0.02) bound how fast logits can move: the
    # loss falls from ln(128) = 4.85 to ~4.2 in 20 steps
    assert sum(losses[-3:]) / 3 < 0.92 * sum(losses[:3]) / 3, losses
    assert _eval_loss(model, batch) < eval_loss_before - 0.3
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if n in lora_before)
    assert len(lora_before) == 2 * len(list(lora_layers(model)))

    model.eval()
    save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    ours = logits(model)
    assert max_diff(logits(peft_model), ours) < 1e-5
    with peft_model.disable_adapter():  # the trained adapter matters, so the check above can fail
        assert max_diff(logits(peft_model), ours) > 1e-3
