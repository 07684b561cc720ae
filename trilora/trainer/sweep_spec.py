"""The specification of a `trilora sweep`: what is searched (`--grid`, `--space`), how
(`--trials`, `--sampler`, `--prune`) and by which metric, parsed and checked against the
training settings before any trial runs (`sweep.py` runs it)."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from .config import TrainConfig, _coerce, _kind, closest_setting

INSTALL_HINT = "pip install 'trilora[sweep]'"

# settings the sweep sets for each trial itself, and why they cannot be searched or given
SWEEP_OWNED = {
    "output_dir": "each trial writes to SWEEP_DIR/trial-NNN (--output-dir names SWEEP_DIR)",
    "resume": "a sweep resumes by itself: run the same command again (a killed trial continues from its checkpoint)",
    "overwrite": "a sweep never replaces a trial's results: choose another --output-dir to start again",
    "fsdp": "trials run one after another in this process, not under torchrun",
}

# --metric: the validation loss (the best of the run), or a test-split score from summary.json
METRICS = {"val_loss": "minimize", "test_loss": "minimize", "test_perplexity": "minimize",
           **{f"test_{m}": "maximize" for m in ("exact_match", "accuracy", "precision", "recall", "f1",
                                                 "weighted_precision", "weighted_recall", "weighted_f1",
                                                 "token_accuracy")}}
SAMPLERS = ("grid", "random", "tpe")
class SweepError(ValueError):
    """The sweep cannot run as specified (reported as one line, before any trial starts)."""


class MetricMissing(SweepError):
    """The trials' summary has no such metric (known only once a trial finished)."""


class OptunaMissing(ImportError):
    """`trilora sweep` without Optuna installed (it is an optional dependency: trilora[sweep])."""


def require_optuna():
    """The optuna module, or OptunaMissing with the install command."""
    try:
        import optuna
    except ImportError:
        raise OptunaMissing(f"Optuna is not installed: {INSTALL_HINT}") from None
    return optuna


# ----------------------------------------------------------------------------- the specification

@dataclass
class Searched:
    """One searched setting: `choices` (a --grid, or a|b|c in --space) or the range [low, high]."""
    name: str
    source: str  # the argument as given, for messages
    choices: list | None = None
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
        if self.choices is not None:
            return CategoricalDistribution(self.choices)
        kind = IntDistribution if isinstance(self.low, int) else FloatDistribution
        return kind(self.low, self.high, log=self.log)

    def describe(self) -> dict:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log}


@dataclass
class SweepSpec:
    grid: list[Searched]
    space: list[Searched]
    sampler: str
    trials: int
    metric: str
    prune: bool = False
    prune_startup_trials: int = 3
    seed: int = 0

    @property
    def searched(self) -> list[Searched]:
        return sorted(self.grid + self.space, key=lambda s: s.name)

    @property
    def direction(self) -> str:
        return METRICS[self.metric]

    def describe(self, base: TrainConfig) -> dict:
        """What must not change when a sweep is continued (everything but --trials), as JSON values."""
        names = {s.name for s in self.searched}
        fixed = {k: v for k, v in base.to_dict().items() if k not in names and k not in SWEEP_OWNED}
        return json.loads(json.dumps({
            "search": {s.name: s.describe() for s in self.searched}, "sampler": self.sampler,
            "metric": self.metric, "prune": self.prune, "prune_startup_trials": self.prune_startup_trials,
            "seed": self.seed, "settings": fixed}))


def _field(key: str, source: str):
    """The TrainConfig field `key` names (dashes or underscores, --lora-r's alias too)."""
    by_name = {f.name: f for f in fields(TrainConfig)}
    aliases = {a.lstrip("-").replace("-", "_"): f.name
               for f in fields(TrainConfig) for a in f.metadata.get("aliases", ())}
    name = key.strip().lstrip("-").replace("-", "_")
    name = aliases.get(name, name)
    if name not in by_name:
        close = closest_setting(name, by_name)
        raise SweepError(f"{source}: unknown setting {key!r}" + (f" (did you mean {close}?)" if close else "")
                         + "; the settings are those of `trilora train --help`")
    if name in SWEEP_OWNED:
        raise SweepError(f"{source}: {name} cannot be searched: {SWEEP_OWNED[name]}")
    return by_name[name]


def _choice(f, text: str, source: str):
    """One value as Optuna stores it (bool, int, float, str or None): read as YAML reads it and
    coerced as a YAML setting is; a list setting's value is its items separated by spaces."""
    cast, is_list = _kind(f)
    text = text.strip()
    if text == "":
        raise SweepError(f"{source}: an empty value")
    try:
        if is_list:
            items = [item if cast is str else yaml.safe_load(item) for item in text.split()]
            return " ".join(map(str, _coerce(f, items, source)))
        return _coerce(f, text if cast is str else yaml.safe_load(text), source)
    except yaml.YAMLError:
        raise SweepError(f"{source}: {text!r} is not a value of {f.name}") from None
    except ValueError as err:
        raise SweepError(str(err)) from None


def to_setting(name: str, value):
    """A searched value as the TrainConfig field takes it (a list setting's items were joined by spaces)."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    if _kind(f)[1] and isinstance(value, str):
        return _coerce(f, value.split() if _kind(f)[0] is str else [yaml.safe_load(v) for v in value.split()],
                       f"--grid {name}")
    return value


def _split(arg: str, flag: str) -> tuple[str, str]:
    if "=" not in arg:
        raise SweepError(f"{flag} {arg}: expected KEY=VALUES, e.g. {flag} lr=1e-4,2e-4")
    key, values = arg.split("=", 1)
    return key, values


def parse_grid(arg: str) -> Searched:
    """`KEY=V1,V2,...`: every value is tried (with each combination of the other --grid values)."""
    key, values = _split(arg, "--grid")
    source = f"--grid {arg}"
    f = _field(key, source)
    choices = [_choice(f, v, source) for v in values.split(",")]
    if len(set(map(repr, choices))) != len(choices):
        raise SweepError(f"{source}: a value is repeated")
    return Searched(f.name, source, choices=choices)


_RANGE = re.compile(r"^\s*([^:|]+):([^:|]+)(?::(log))?\s*$")


def parse_space(arg: str) -> Searched:
    """`KEY=LOW:HIGH` (uniform), `KEY=LOW:HIGH:log` (log-uniform) for a number setting, or
    `KEY=A|B|C` (one of the values) for any setting."""
    key, values = _split(arg, "--space")
    source = f"--space {arg}"
    f = _field(key, source)
    cast, is_list = _kind(f)
    if "|" in values:
        choices = [_choice(f, v, source) for v in values.split("|")]
        if len(set(map(repr, choices))) != len(choices):
            raise SweepError(f"{source}: a value is repeated")
        return Searched(f.name, source, choices=choices)
    match = _RANGE.match(values)
    if match is None:
        raise SweepError(f"{source}: expected LOW:HIGH, LOW:HIGH:log or A|B|C")
    if cast not in (int, float) or is_list:
        raise SweepError(f"{source}: {f.name} is not a number: give its values as A|B|C")
    try:
        low, high = (cast(yaml.safe_load(v) if cast is float else v) for v in match.group(1, 2))
    except (TypeError, ValueError):
        raise SweepError(f"{source}: {f.name} takes {'integers' if cast is int else 'numbers'}") from None
    log = match.group(3) == "log"
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise SweepError(f"{source}: the range needs finite LOW < HIGH")
    if log and low <= 0:
        raise SweepError(f"{source}: a log range needs LOW > 0")
    return Searched(f.name, source, low=low, high=high, log=log)


def _check_values(base: TrainConfig, searched: Searched, values) -> None:
    """Each value is a valid setting on top of `base` (TrainConfig's own checks)."""
    for value in values:
        try:
            dataclasses.replace(base, **{searched.name: to_setting(searched.name, value)})
        except (ValueError, TypeError) as err:
            raise SweepError(f"{searched.source}: {value!r}: {err}") from None


def parse_spec(base: TrainConfig, grid: list[str] | None = None, space: list[str] | None = None,
               trials: int | None = None, sampler: str | None = None, metric: str = "val_loss",
               prune: bool = False, prune_startup_trials: int = 3, seed: int = 0) -> SweepSpec:
    """The sweep as the flags describe it, every value checked against `base`; raises SweepError."""
    grid_params = [parse_grid(a) for a in grid or []]
    space_params = [parse_space(a) for a in space or []]
    names = [s.name for s in grid_params + space_params]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SweepError(f"{', '.join(repeated)} searched twice: give each setting one --grid or --space")
    if not names:
        raise SweepError("nothing to search: give --grid KEY=V1,V2,... or --space KEY=LOW:HIGH with --trials N")
    if base.fsdp:
        raise SweepError(f"fsdp: {SWEEP_OWNED['fsdp']}")
    sampler = sampler or ("tpe" if space_params else "grid")
    if sampler not in SAMPLERS:
        raise SweepError(f"--sampler {sampler}: one of {', '.join(SAMPLERS)}")
    if trials is not None and trials < 1:
        raise SweepError(f"--trials {trials}: at least 1")
    if sampler == "grid":
        if space_params:
            raise SweepError("--sampler grid tries --grid values only; ranges (--space) need --sampler random or tpe")
        size = math.prod(len(s.choices) for s in grid_params)
        if trials is not None and trials > size:
            raise SweepError(f"--trials {trials}: the grid has {size} combinations")
        trials = trials or size
    elif trials is None:
        raise SweepError(f"--sampler {sampler} needs --trials N, the number of trials to run")
    if metric not in METRICS:
        close = closest_setting(metric, METRICS)
        raise SweepError(f"--metric {metric}: unknown" + (f" (did you mean {close}?)" if close else "")
                         + f"; one of {', '.join(METRICS)}")
    has_validation = base.val_data is not None or (len(base.split) > 1 and base.split[1] > 0)
    if (metric == "val_loss" or prune) and not has_validation:
        raise SweepError(f"{'--prune' if prune else '--metric val_loss'} needs a validation split: "
                         "--val-data or a --split with a validation share")
    if prune and not base.eval_every:
        raise SweepError("--prune compares validation losses during training: set --eval-every N")
    if prune_startup_trials < 0:
        raise SweepError(f"--prune-startup-trials {prune_startup_trials}: at least 0")
    for s in space_params:
        _check_values(base, s, s.choices if s.choices is not None else (s.low, s.high))
    if sampler == "grid":  # every combination is a run: check them all (cross-setting rules too)
        for combo in itertools.product(*(s.choices for s in grid_params)):
            try:
                dataclasses.replace(base, **{s.name: to_setting(s.name, v) for s, v in zip(grid_params, combo)})
            except (ValueError, TypeError) as err:
                where = ", ".join(f"{s.name}={v}" for s, v in zip(grid_params, combo))
                raise SweepError(f"--grid combination {where}: {err}") from None
    else:
        for s in grid_params:
            _check_values(base, s, s.choices)
    return SweepSpec(grid_params, space_params, sampler, trials, metric, prune, prune_startup_trials, seed)


def check_inputs(base: TrainConfig) -> None:
    """The files every trial reads exist (a typo would otherwise fail every trial in turn)."""
    named = {"--model": [base.model], "--data": base.data, "--val-data": [base.val_data],
             "--test-data": [base.test_data], "--replay-data": base.replay_data, "--init-adapter": [base.init_adapter]}
    for flag, paths in named.items():
        for path in paths or []:
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"{flag} {path}: no such file or directory")


