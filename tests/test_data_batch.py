"""Packing, padding and resumable batching (trilora.trainer.data_batch)."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from _data_helpers import char_tokenizer
from trilora.trainer import (IGNORE_INDEX, BatchIterator, PackedDataset, ResumableBatchSampler,
                             collate_packed, collate_padded, load_records, pack_examples,
                             TokenizedDataset, tokenize_records)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def dataset(tok):
    """40 examples of 6 .. 45 tokens: 30 prompt/completion ones, and 10 plain-text ones
    without bos, whose first token is trained (the case where packing must mask the label
    at each example's start)."""
    rows = [{"prompt": f"q{i} " + "ab" * (i % 7), "completion": "xyz" * (1 + i % 9)}
            for i in range(30)]
    records, _ = load_records(rows)
    with_prompt, _ = tokenize_records(records, tok, max_length=64)
    records, _ = load_records([{"text": f"doc {i} " + "uv" * i} for i in range(10)])
    plain, _ = tokenize_records(records, tok, max_length=64, add_bos=False)
    assert plain[0]["labels"][0] != IGNORE_INDEX
    return TokenizedDataset(with_prompt.examples + plain.examples)


def tiny_llama(vocab_size: int, attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


# --------------------------------------------------------------------------- packing

def test_pack_examples_fills_bins_without_overflow():
    lengths = [30, 5, 17, 64, 1, 33, 12, 40, 8, 8]
    bins = pack_examples(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) == 4  # sum 218 needs at least 4 rows of 64; best fit reaches it
    assert pack_examples(lengths, 64) == bins
    with pytest.raises(ValueError, match="longer than max_length=32"):
        pack_examples(lengths, 32)


def test_packed_rows_restart_positions_and_mask_boundary_labels(dataset):
    packed = PackedDataset(dataset, max_length=64)
    assert len(packed) < len(dataset) and max(packed.lengths) <= 64
    row, members = packed[0], packed.bins[0]
    starts = [0]
    for i in members[:-1]:
        starts.append(starts[-1] + dataset.lengths[i])
    assert (row["position_ids"] == 0).nonzero().flatten().tolist() == starts
    for start, i in zip(starts, members):
        n = dataset.lengths[i]
        assert torch.equal(row["input_ids"][start:start + n], dataset[i]["input_ids"])
        assert torch.equal(row["position_ids"][start:start + n], torch.arange(n))
        assert row["labels"][start] == IGNORE_INDEX
        assert torch.equal(row["labels"][start + 1:start + n], dataset[i]["labels"][1:])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_alone(tok, dataset, attn):
    model = tiny_llama(len(tok), attn)
    packed = PackedDataset(dataset, max_length=64)
    rows = [packed[i] for i in range(3)]
    batch = collate_packed(rows, tok.pad_token_id)
    L = batch["input_ids"].shape[1]
    assert batch["attention_mask"].shape == (3, 1, L, L)
    assert min(packed.lengths[:3]) < L  # at least one row has a padding tail
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        # HF's loss shifts: the logits at t predict the label at t + 1.
        packed_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1),
                                      batch["labels"][:, 1:].flatten(), reduction="sum")
        alone_loss, compared = 0.0, 0
        for b, members in enumerate(packed.bins[:3]):
            start = 0
            for i in members:
                ids, n = dataset[i]["input_ids"][None], dataset.lengths[i]
                alone = model(input_ids=ids, labels=dataset[i]["labels"][None])
                diff = (logits[b, start:start + n] - alone.logits[0]).abs().max().item()
                assert diff < 1e-5, f"row {b}, example {i}: max |logit diff| = {diff}"
                n_trained = (dataset[i]["labels"][1:] != IGNORE_INDEX).sum()
                alone_loss += alone.loss.item() * n_trained.item()  # HF returns the mean
                start, compared = start + n, compared + 1
        assert compared >= 6
        assert packed_loss.item() == pytest.approx(alone_loss, rel=1e-5)
        # Without the mask the examples do see each other: the test above is not vacuous.
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        assert (leaky - logits).abs().max() > 1e-3


def test_collate_packed_without_mask_for_flash_attention(tok, dataset):
    packed = PackedDataset(dataset, max_length=64)
    batch = collate_packed([packed[0], packed[1]], tok.pad_token_id, attention_mask_dtype=None,
                           pad_to=64)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (2, 64)


# --------------------------------------------------------------------------- padding

def test_collate_padded(tok, dataset):
    examples = [dataset[0], dataset[5], dataset[13]]
    batch = collate_padded(examples, tok.pad_token_id)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for b, n in enumerate(lengths):
        assert torch.equal(batch["input_ids"][b, :n], examples[b]["input_ids"])
        assert (batch["input_ids"][b, n:] == tok.pad_token_id).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
    assert collate_padded(examples, 0, pad_to_multiple_of=16)["input_ids"].shape[1] % 16 == 0


def test_padded_logits_match_alone(tok, dataset):
    model = tiny_llama(len(tok), "sdpa")
    batch = collate_padded([dataset[1], dataset[8]], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for b, i in enumerate([1, 8]):
            alone = model(input_ids=dataset[i]["input_ids"][None]).logits[0]
            assert (logits[b, :dataset.lengths[i]] - alone).abs().max() < 1e-5


def test_group_by_length_reduces_padding(dataset):
    def padding(group):
        sampler = ResumableBatchSampler(dataset.lengths, 4, seed=0, group_by_length=group,
                                        group_size=10)
        batches = sampler.epoch_batches(0)
        assert sorted(i for b in batches for i in b) == list(range(len(dataset)))
        return sum(max(dataset.lengths[i] for i in b) * len(b) - sum(dataset.lengths[i] for i in b)
                   for b in batches)
    assert padding(True) < padding(False) / 2


# --------------------------------------------------------------------------- resume

def batches_as_lists(batches):
    return [{k: v.tolist() for k, v in b.items()} for b in batches]


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_resume_continues_with_identical_batches(tok, dataset, mode):
    make = partial(BatchIterator, dataset, 3, pad_token_id=tok.pad_token_id, mode=mode,
                   max_length=64, seed=11)
    reference = make()
    per_epoch = len(reference)
    expected = batches_as_lists(list(reference) + list(reference))  # two full epochs
    assert expected[:per_epoch] != expected[per_epoch:]  # epochs are shuffled differently

    k = per_epoch - 2  # stop two batches before the end of epoch 0
    first = make()
    consumed = []
    for batch in first:
        consumed.append(batch)
        if len(consumed) == k:
            break
    state = first.state_dict()
    assert state["epoch"] == 0 and state["index"] == k

    resumed = make(seed=999)  # the seed comes from the saved state
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)  # the rest of epoch 0, then epoch 1
    assert batches_as_lists(consumed + rest) == expected
    assert resumed.position == (2, 0)


def test_position_after_a_full_epoch_and_dataloader_use(tok, dataset):
    sampler = ResumableBatchSampler(dataset.lengths, 8, seed=2, group_by_length=True)
    assert len(list(sampler)) == len(sampler) == 5 and sampler.position == (1, 0)
    sampler.load_state_dict({**sampler.state_dict(), "epoch": 0, "index": 0})
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         collate_fn=partial(collate_padded, pad_token_id=0))
    via_loader = batches_as_lists(loader)
    via_iterator = batches_as_lists(BatchIterator(dataset, 8, pad_token_id=0, seed=2))
    assert via_loader == via_iterator


def test_resume_rejects_changed_data(tok, dataset):
    state = ResumableBatchSampler(dataset.lengths, 4).state_dict()
    with pytest.raises(ValueError, match="cannot resume: the saved sampler had num_items=40"):
        ResumableBatchSampler(dataset.lengths[:30], 4).load_state_dict(state)


def test_bad_batch_arguments(dataset):
    with pytest.raises(ValueError, match="mode='pack' needs max_length"):
        BatchIterator(dataset, 2, pad_token_id=0, mode="pack")
    with pytest.raises(ValueError, match="batch mode must be one of"):
        BatchIterator(dataset, 2, pad_token_id=0, mode="bucket")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        ResumableBatchSampler(dataset.lengths, 0)
