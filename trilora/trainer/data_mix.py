"""Split a dataset, mix several by weight, and chain training stages with replay.

Everything here works on plain sequences (records or tokenized examples alike) and is a
pure function of its inputs and seed, so a run can be rebuilt exactly from its config.
"""
from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from .data import CleaningReport, load_records

SPLIT_NAMES = ("train", "validation", "test")


class Splits(NamedTuple):
    """train / validation / test lists; `str()` gives the counts."""

    train: list
    validation: list
    test: list

    @property
    def counts(self) -> dict[str, int]:
        return {name: len(part) for name, part in zip(SPLIT_NAMES, self)}

    def __str__(self) -> str:
        return "splits: " + ", ".join(f"{name} {n}" for name, n in self.counts.items())


def split(records: Sequence, ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, *,
          verbose: bool = False) -> Splits:
    """Shuffle records by seed and cut them into train / validation / test.

    ratios: 2 (train, validation) or 3 non-negative numbers summing to 1. Sizes are rounded
    by largest remainder, then every split with a positive ratio gets at least one record
    when there are enough records, taken from the largest split. The splits are disjoint,
    together hold every record, and depend only on (records, ratios, seed).
    """
    ratios = tuple(float(r) for r in ratios)
    if len(ratios) not in (2, 3):
        raise ValueError(f"ratios must be (train, validation[, test]), got {len(ratios)} values")
    if any(r < 0 or math.isnan(r) for r in ratios):
        raise ValueError(f"split ratios must be non-negative, got {ratios}")
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"split ratios must sum to 1, got {ratios} (sum {sum(ratios):g})")
    ratios += (0.0,) * (3 - len(ratios))

    n = len(records)
    exact = [r * n for r in ratios]
    sizes = [math.floor(x) for x in exact]
    by_remainder = sorted(range(3), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    # A tiny dataset must still yield a validation / test example if one was asked for.
    for i in range(3):
        if ratios[i] > 0 and sizes[i] == 0:
            donor = max(range(3), key=lambda j: sizes[j])
            if sizes[donor] > 1:
                sizes[donor] -= 1
                sizes[i] += 1

    order = list(range(n))
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for size in sizes:
        parts.append([records[i] for i in order[start:start + size]])
        start += size
    result = Splits(*parts)
    if verbose:
        print(result)
    return result


def load_splits(train: str | os.PathLike | Sequence[dict], validation=None, test=None, *,
                ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                format: str | None = None, verbose: bool = False
                ) -> tuple[Splits, dict[str, CleaningReport]]:
    """Load the splits of a dataset: one source cut by ratios, or one source per split.

    With only `train` given, it is loaded and `split` by (ratios, seed). With `validation`
    and/or `test` given, each given source is its own split as it stands, and the missing one
    is carved from `train` by its share of `ratios` (validation: the second ratio, test: the
    third), so that `--test-data` alone still leaves a validation split for early stopping.
    Returns the splits and each source's cleaning report.
    """
    sources = {"train": train, "validation": validation, "test": test}
    reports, loaded = {}, {}
    for name, source in sources.items():
        if source is not None:
            loaded[name], reports[name] = load_records(source, format, verbose=verbose)
    if validation is None and test is None:
        return split(loaded["train"], ratios, seed, verbose=verbose), reports
    ratios = tuple(float(r) for r in ratios) + (0.0,) * (3 - len(ratios))
    share = ratios[1] if validation is None else ratios[2]
    parts = dict(loaded)
    if validation is None or test is None:
        keep = ratios[0] / (ratios[0] + share) if share > 0 else 1.0
        carved = split(loaded["train"], (keep, 1.0 - keep), seed)
        parts["train"] = carved.train
        parts["validation" if validation is None else "test"] = carved.validation
    result = Splits(*(parts.get(name, []) for name in SPLIT_NAMES))
    if verbose:
        print(result)
    return result, reports


# --------------------------------------------------------------------------- mixing

def iter_mixture(datasets: Mapping[str, Sequence], weights: Mapping[str, float],
                 seed: int = 0) -> Iterator[tuple[str, Any]]:
    """Endless (name, item) draws: each draw picks a dataset with probability proportional
    to its weight, then its next item in a shuffled order that is reshuffled when it runs
    out (so a small dataset is upsampled without repeating an item before all are used).
    """
    _check_weights(datasets, weights)
    rng = random.Random(seed)
    names = [name for name in datasets if weights[name] > 0]
    cumulative, total = [], 0.0
    for name in names:
        total += weights[name]
        cumulative.append(total)
    orders = {name: [] for name in names}
    while True:
        name = rng.choices(names, cum_weights=cumulative)[0]
        if not orders[name]:
            orders[name] = list(range(len(datasets[name])))
            rng.shuffle(orders[name])
        yield name, datasets[name][orders[name].pop()]


def mix(datasets: Mapping[str, Sequence], weights: Mapping[str, float],
        n: int | None = None, seed: int = 0, *, with_names: bool = False) -> list:
    """n items drawn from several datasets in proportion to weights (see iter_mixture).

    n defaults to the datasets' total size. with_names=True returns (name, item) pairs.
    Deterministic in (datasets, weights, n, seed).
    """
    if n is None:
        n = sum(len(d) for d in datasets.values())
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    draws = iter_mixture(datasets, weights, seed)
    pairs = [next(draws) for _ in range(n)]
    return pairs if with_names else [item for _, item in pairs]


def _check_weights(datasets: Mapping[str, Sequence], weights: Mapping[str, float]) -> None:
    if set(datasets) != set(weights):
        raise ValueError(f"mixing weights must name exactly the datasets: datasets "
                         f"{sorted(datasets)}, weights {sorted(weights)}")
    for name, weight in weights.items():
        if not weight >= 0 or math.isinf(weight):
            raise ValueError(f"mixing weight of {name!r} must be a finite number >= 0, "
                             f"got {weight}")
        if weight > 0 and len(datasets[name]) == 0:
            raise ValueError(f"dataset {name!r} is empty but has mixing weight {weight}")
    if sum(weights.values()) <= 0:
        raise ValueError("at least one mixing weight must be positive")


def stages(datasets: Sequence[Sequence], replay: float = 0.1, seed: int = 0) -> list[list]:
    """Training stages in order, each later stage mixed with replay of the earlier ones.

    Stage k (k >= 1) gets round(replay / (1 - replay) * len(stage k)) items drawn from the
    union of stages 0..k-1 (without repetition while the union lasts), so replayed items
    are a `replay` fraction of the returned stage; they counter catastrophic forgetting.
    Each returned stage is shuffled by seed; stage 0 is returned shuffled and unmixed.
    """
    if not 0 <= replay < 1:
        raise ValueError(f"replay must be in [0, 1), got {replay}")
    rng = random.Random(seed)
    result, earlier = [], []
    for k, stage in enumerate(datasets):
        stage = list(stage)
        if k > 0 and replay > 0 and earlier:
            wanted = round(replay / (1 - replay) * len(stage))
            picks: list[int] = []
            while len(picks) < wanted:  # cycle through the union only if it is too small
                picks += rng.sample(range(len(earlier)), min(len(earlier), wanted - len(picks)))
            stage += [earlier[i] for i in picks]
        rng.shuffle(stage)
        result.append(stage)
        earlier += list(datasets[k])
    return result

