"""Batch tokenized examples two ways, with a sampler that resumes exactly.

Padding ("pad"): examples of similar length are grouped into a batch (group-by-length) and
right-padded; `attention_mask` [B, T] marks real tokens, labels are -100 on padding.

Packing ("pack"): several examples are concatenated into one row of at most max_length
tokens, with no example attending to another. The row carries `position_ids` that restart
at 0 for every example (what HF's flash-attention path reads to find the boundaries) and,
for the default sdpa / eager attention, an explicit block-diagonal causal mask
[B, 1, L, L] holding 0.0 where attention is allowed and -inf where not. Measured with
transformers 5.24's LlamaForCausalLM: a float mask gives each packed example exactly its
stand-alone logits under both sdpa and eager, while a bool mask is right under sdpa only
(eager adds it to the scores as 0 / 1), so the float form is the one built here. Each
example's first label is set to -100 so the previous example's last token is not trained
to predict it; alone, that label is never used either (the loss shifts labels by one).

`ResumableBatchSampler` shuffles per epoch from (seed, epoch) alone and exposes its
position (epoch, index), so a trainer that saves `state_dict()` in its checkpoint and
loads it into a fresh sampler continues with the identical batches.
"""
from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence

import torch

from .data_tokenize import IGNORE_INDEX, TokenizedDataset

BATCH_MODES = ("pad", "pack")


# --------------------------------------------------------------------------- packing

def pack_examples(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices into bins of total length <= max_length (best-fit decreasing).

    Deterministic: ties in length are broken by index. Bins come out in creation order,
    each listing its examples longest first.
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than max_length={max_length} "
                         f"(first: example {too_long[0]}); tokenize with the same max_length")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin number) of bins with room
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = lengths[index]
        slot = bisect.bisect_left(free, (need, -1))  # the fullest bin the example fits in
        if slot < len(free):
            space, number = free.pop(slot)
        else:
            space, number = max_length, len(bins)
            bins.append([])
        bins[number].append(index)
        if space - need > 0:
            bisect.insort(free, (space - need, number))
    return bins


class PackedDataset(torch.utils.data.Dataset):
    """Packed rows of a TokenizedDataset.

    Item i is {"input_ids", "labels", "position_ids"}: int64 [T_i], T_i <= max_length, the
    concatenation of the examples in `bins[i]`, position_ids restarting at 0 for each.
    """

    def __init__(self, dataset: TokenizedDataset, max_length: int):
        self.max_length = max_length
        self.bins = pack_examples(dataset.lengths, max_length)
        self.rows = [_pack_row([dataset[i] for i in members]) for members in self.bins]
        self.lengths = [len(row["input_ids"]) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def _pack_row(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    labels = []
    for example in examples:
        example_labels = example["labels"].clone()
        example_labels[0] = IGNORE_INDEX  # never predicted from the previous example's tokens
        labels.append(example_labels)
    return {"input_ids": torch.cat([e["input_ids"] for e in examples]),
            "labels": torch.cat(labels),
            "position_ids": torch.cat([torch.arange(len(e["input_ids"])) for e in examples])}


def packed_attention_mask(position_ids: torch.Tensor,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, L, L] from packed position_ids [B, L].

    A new example starts wherever position_ids is 0. Entry [b, 0, q, k] is 0.0 where query q
    may attend to key k (same example, k <= q) and -inf elsewhere. Every row allows at
    least its diagonal, so softmax never sees an all -inf row. Memory: B * L * L elements.
    """
    segment = torch.cumsum(position_ids == 0, dim=1)  # (B, L) example number per token
    same_example = segment[:, :, None] == segment[:, None, :]  # (B, L, L)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    mask = torch.zeros(same_example.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~(same_example & causal), float("-inf"))[:, None]


# --------------------------------------------------------------------------- collate

def collate_packed(rows: Sequence[dict[str, torch.Tensor]], pad_token_id: int, *,
                   attention_mask_dtype: torch.dtype | None = torch.float32,
                   pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Stack packed rows into a batch, right-padding to the longest row (or pad_to).

    Returns input_ids, labels, position_ids: int64 [B, L], and attention_mask: [B, 1, L, L]
    of attention_mask_dtype from `packed_attention_mask`. Pass attention_mask_dtype=None
    for flash-attention models, which find example boundaries from position_ids alone.
    The padding tail is its own "example" (positions from 0, labels -100).
    """
    length = max([len(r["input_ids"]) for r in rows] + [pad_to or 0])
    batch = {"input_ids": torch.full((len(rows), length), pad_token_id, dtype=torch.long),
             "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long),
             "position_ids": torch.zeros((len(rows), length), dtype=torch.long)}
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][b, :n] = row["input_ids"]
        batch["labels"][b, :n] = row["labels"]
        batch["position_ids"][b, :n] = row["position_ids"]
        batch["position_ids"][b, n:] = torch.arange(length - n)
    if attention_mask_dtype is not None:
        batch["attention_mask"] = packed_attention_mask(batch["position_ids"],
                                                        attention_mask_dtype)
    return batch


def collate_padded(examples: Sequence[dict[str, torch.Tensor]], pad_token_id: int, *,
                   pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one (rounded up to pad_to_multiple_of).

    Returns input_ids, labels, attention_mask: int64 [B, T]; attention_mask is 1 on real
    tokens and 0 on padding, labels are -100 on padding. Examples whose labels are one class
    id each (sequence classification) give labels [B].
    """
    length = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    per_sequence = examples[0]["labels"].dim() == 0
    batch = {"input_ids": torch.full((len(examples), length), pad_token_id, dtype=torch.long),
             "labels": (torch.stack([e["labels"] for e in examples]) if per_sequence else
                        torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)),
             "attention_mask": torch.zeros((len(examples), length), dtype=torch.long)}
    for b, example in enumerate(examples):
        n = len(example["input_ids"])
        batch["input_ids"][b, :n] = example["input_ids"]
        if not per_sequence:
            batch["labels"][b, :n] = example["labels"]
        batch["attention_mask"][b, :n] = 1
    return batch


# --------------------------------------------------------------------------- sampling

class ResumableBatchSampler:
    """Yields lists of dataset indices, one epoch per iteration, resumable mid-epoch.

    lengths:         per-item lengths (only used with group_by_length).
    shuffle:         a fresh order each epoch, drawn from (seed, epoch) alone.
    group_by_length: batch items of similar length: shuffle, cut into groups of
                     batch_size * group_size, sort each group by length, cut into batches,
                     shuffle the batches. Less padding while batches stay random.
    position:        (epoch, index): the next batch to yield is batch `index` of `epoch`.
                     It advances as each batch is yielded, so after consuming k batches
                     `state_dict()` records exactly k.
    Usable as a DataLoader `batch_sampler`, but with num_workers > 0 the DataLoader draws
    batches ahead of the training step and the saved position runs ahead with it; iterate
    a `BatchIterator` instead when exact resume matters.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, group_by_length: bool = False,
                 drop_last: bool = False, group_size: int = 50):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.shuffle, self.group_by_length = shuffle, group_by_length
        self.drop_last, self.group_size = drop_last, group_size
        self.epoch, self.index = 0, 0

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.index

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of `epoch`, in order; a pure function of (seed, epoch)."""
        rng = random.Random(f"{self.seed}/{epoch}")  # str seeds hash deterministically
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            group = self.batch_size * self.group_size
            order = [i for start in range(0, len(order), group)
                     for i in sorted(order[start:start + group], key=lambda i: -self.lengths[i])]
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.group_by_length and self.shuffle:
            rng.shuffle(batches)  # else every epoch would run long batches first
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        epoch, batches = self.epoch, self.epoch_batches(self.epoch)
        while self.epoch == epoch and self.index < len(batches):
            batch = batches[self.index]
            self.index += 1  # advance before yielding: state_dict() now counts this batch
            if self.index == len(batches):
                self.epoch, self.index = epoch + 1, 0
            yield batch
        if self.epoch == epoch:  # resumed at or past the end of an epoch
            self.epoch, self.index = epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "num_items": len(self.lengths), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position; the seed is taken from the state."""
        for key in ("num_items", "batch_size"):
            mine = len(self.lengths) if key == "num_items" else self.batch_size
            if state[key] != mine:
                raise ValueError(f"cannot resume: the saved sampler had {key}={state[key]}, "
                                 f"this one has {mine}; the data or batch size changed")
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]


class BatchIterator:
    """Collated batches of a TokenizedDataset, padded or packed, with resumable position.

    mode="pad":  group-by-length batches from `collate_padded`.
    mode="pack": the dataset is packed once into rows of <= max_length tokens
                 (`PackedDataset`); batches of rows from `collate_packed`.
    One `for batch in iterator` runs the rest of the current epoch. `state_dict()` /
    `load_state_dict()` save and restore the position (see ResumableBatchSampler).
    """

    def __init__(self, dataset: TokenizedDataset, batch_size: int, *, pad_token_id: int,
                 mode: str = "pad", max_length: int | None = None, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False,
                 attention_mask_dtype: torch.dtype | None = torch.float32):
        if mode not in BATCH_MODES:
            raise ValueError(f"batch mode must be one of {BATCH_MODES}, got {mode!r}")
        if mode == "pack" and max_length is None:
            raise ValueError("mode='pack' needs max_length, the length of a packed row")
        self.mode, self.pad_token_id = mode, pad_token_id
        self.attention_mask_dtype = attention_mask_dtype
        self.dataset = PackedDataset(dataset, max_length) if mode == "pack" else dataset
        self.sampler = ResumableBatchSampler(self.dataset.lengths, batch_size, seed=seed,
                                             shuffle=shuffle, drop_last=drop_last,
                                             group_by_length=mode == "pad")

    def collate(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if self.mode == "pack":
            return collate_packed(items, self.pad_token_id,
                                  attention_mask_dtype=self.attention_mask_dtype)
        return collate_padded(items, self.pad_token_id)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for indices in self.sampler:
            yield self.collate([self.dataset[i] for i in indices])

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def position(self) -> tuple[int, int]:
        return self.sampler.position

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
