"""Train the tiny base model that ships in trilora/demo/assets (run once; the result is committed).

    python scripts/train_demo_base.py [--steps 3000] [--out trilora/demo/assets]

A character-level Llama (~0.6 M parameters) learns "copy" and "reverse" on random words,
with plain PyTorch on a CPU in a few minutes. Deterministic by seed.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from trilora.demo.task import CHARS, SPECIAL_TOKENS, random_words, task_records

# words of the base tasks are drawn from another seed than the demo's, so the fine-tuning
# test split holds words the base model never saw
BASE_SEED = 99


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def build_model(vocab_size: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def batches(tokenizer, records, batch_size, rng):
    while True:
        batch = rng.sample(records, batch_size)
        texts = [r["prompt"] + r["completion"] for r in batch]
        enc = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
        width = max(map(len, enc))
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        for i, (e, r) in enumerate(zip(enc, batch)):
            ids[i, :len(e)] = torch.tensor(e)
            start = len(tokenizer(r["prompt"])["input_ids"])
            labels[i, start:len(e)] = torch.tensor(e[start:])
        yield ids, labels, (ids != tokenizer.pad_token_id).long()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=Path("trilora/demo/assets"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer))
    words = random_words(4000, BASE_SEED)
    records = task_records("copy", words) + task_records("reverse", words)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps, pct_start=0.05)
    data = batches(tokenizer, records, 64, rng)
    for step in range(args.steps):
        ids, labels, mask = next(data)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print("saved to", args.out)


if __name__ == "__main__":
    main()
