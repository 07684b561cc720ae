"""Splitting, multi-dataset mixing and staged replay of fine-tuning records (trilora.trainer.data_mix)."""
from collections import Counter

import pytest
from _data_helpers import write_jsonl

from trilora.trainer import load_splits, mix, split, stages
from trilora.trainer.data_mix import iter_mixture


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("ratios, message", [((0.8, 0.1, 0.2), "must sum to 1"),
                                             ((1.2, -0.1, -0.1), "must be non-negative"),
                                             ((1.0,), "must be \\(train, validation")])
def test_bad_split_ratios(ratios, message):
    with pytest.raises(ValueError, match=message):
        split(list(range(10)), ratios)


@pytest.mark.parametrize("weights, message", [({"a": 1.0}, "must name exactly the datasets"),
                                              ({"a": 1.0, "b": -1.0}, "must be a finite number"),
                                              ({"a": 0.0, "b": 0.0}, "at least one")])
def test_bad_mixing_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        mix({"a": [1], "b": [2]}, weights, n=3)


# --------------------------------------------------------------------------- splits

def test_split_is_deterministic_disjoint_and_complete():
    items = list(range(103))
    first = split(items, (0.8, 0.1, 0.1), seed=7)
    assert split(items, (0.8, 0.1, 0.1), seed=7) == first
    assert split(items, (0.8, 0.1, 0.1), seed=8) != first
    assert first.counts == {"train": 83, "validation": 10, "test": 10}
    assert sorted(first.train + first.validation + first.test) == items
    assert not set(first.train) & set(first.validation) | set(first.train) & set(first.test)
    assert str(first).startswith("splits: train ")


def test_split_sizes_and_tiny_datasets():
    assert split(list(range(100)), (0.8, 0.1, 0.1)).counts == \
        {"train": 80, "validation": 10, "test": 10}
    assert split(list(range(3)), (0.8, 0.1, 0.1)).counts == \
        {"train": 1, "validation": 1, "test": 1}
    assert split(list(range(5)), (0.9, 0.0, 0.1)).counts == \
        {"train": 4, "validation": 0, "test": 1}
    assert split(list(range(10)), (0.7, 0.3)).counts == {"train": 7, "validation": 3, "test": 0}


def test_load_splits_from_one_file_or_one_file_per_split(tmp_path):
    rows = [{"text": f"doc {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    splits, reports = load_splits(path, ratios=(0.5, 0.25, 0.25), seed=1)
    assert splits.counts == {"train": 10, "validation": 5, "test": 5}
    assert reports["train"].kept == 20
    val = write_jsonl(tmp_path / "val.jsonl", rows[:3])
    splits, reports = load_splits(path, validation=val)  # the test split is carved by its share
    assert splits.counts == {"train": 18, "validation": 3, "test": 2}
    assert set(reports) == {"train", "validation"}
    splits, _ = load_splits(path, validation=val, test=val, ratios=(0.5, 0.25, 0.25))
    assert splits.counts == {"train": 20, "validation": 3, "test": 3}


def test_test_data_alone_still_leaves_a_validation_split(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": "c"} for i in range(50)]
    splits, _ = load_splits(rows, None, rows[:5], ratios=(0.8, 0.2))
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (40, 10, 5)


# --------------------------------------------------------------------------- mixing

def test_mix_follows_weights_and_is_deterministic():
    datasets = {"big": [f"b{i}" for i in range(500)], "small": [f"s{i}" for i in range(20)],
                "off": ["never"]}
    weights = {"big": 3.0, "small": 1.0, "off": 0.0}
    pairs = mix(datasets, weights, n=10_000, seed=3, with_names=True)
    counts = Counter(name for name, _ in pairs)
    assert counts["off"] == 0
    assert abs(counts["small"] / 10_000 - 0.25) < 0.015
    assert mix(datasets, weights, n=10_000, seed=3, with_names=True) == pairs
    assert mix(datasets, weights, n=100, seed=4) != [item for _, item in pairs[:100]]
    # The small dataset is upsampled by cycling: no repeat before every item has been seen.
    small = [item for name, item in pairs if name == "small"]
    assert sorted(small[:20]) == sorted(datasets["small"])
    assert len(mix(datasets, weights)) == 521  # n defaults to the total size


def test_iter_mixture_is_endless():
    draws = iter_mixture({"a": [1, 2]}, {"a": 1.0}, seed=0)
    assert sorted(next(draws)[1] for _ in range(6)) == [1, 1, 1, 2, 2, 2]


def test_stages_with_replay_fraction():
    stage0 = [("s0", i) for i in range(300)]
    stage1 = [("s1", i) for i in range(900)]
    stage2 = [("s2", i) for i in range(450)]
    out = stages([stage0, stage1, stage2], replay=0.1, seed=5)
    assert stages([stage0, stage1, stage2], replay=0.1, seed=5) == out
    assert sorted(out[0]) == stage0  # the first stage has nothing to replay
    assert len(out[1]) == 1000 and Counter(s for s, _ in out[1]) == {"s1": 900, "s0": 100}
    assert len(set(out[1])) == 1000  # replayed items are distinct while the pool lasts
    replayed = [item for item in out[2] if item[0] != "s2"]
    assert len(replayed) == 50 and len(replayed) / len(out[2]) == pytest.approx(0.1)
    assert {s for s, _ in replayed} == {"s0", "s1"}  # drawn from the union of earlier stages
    first_replay = min(i for i, (s, _) in enumerate(out[1]) if s == "s0")
    assert first_replay < 900  # shuffled in, not appended at the end
    assert [len(s) for s in stages([stage0, stage1], replay=0.0)] == [300, 900]
    with pytest.raises(ValueError, match=r"replay must be in \[0, 1\)"):
        stages([stage0, stage1], replay=1.0)
