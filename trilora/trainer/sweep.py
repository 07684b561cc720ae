"""`trilora sweep`: a hyperparameter search made of ordinary training runs, driven by Optuna.

Why: the settings that decide a fine-tune (lr, r, alpha, dropout, ...) are found by trying them.
Trying them by hand loses track of which run had which settings, spends whole runs on settings
that are plainly bad after a few validations, and starts over when the machine goes down.

What:
- a trial is one `train()` run in SWEEP_DIR/trial-NNN/, with every guarantee of a run (its
  directory locked, artefacts complete or absent, summary.json last);
- the study (each trial's settings, state and result) lives in Optuna's SQLite storage
  SWEEP_DIR/study.db, so running the same command again continues the sweep: finished trials
  are kept, a trial killed mid-run runs again in its own directory (from its newest checkpoint
  when it has one; a finished run there is read, never trained over), and a changed search is
  refused before anything runs;
- Optuna searches: every combination of the `--grid` values, in the order given (queued in the
  study as trials with fixed settings, so a killed sweep knows which are left), or `--trials N`
  drawn at random or by TPE from `--space` ranges (and `--grid` values); `--prune` stops a trial
  whose validation loss is worse than the median of the completed trials' at the same step
  (MedianPruner, told each validation through `loop.on_validation`);
- a trial that fails (NaN/Inf, out of memory, a setting the model refuses) is recorded and the
  sweep goes on; a bad sweep specification fails before any trial starts;
- after each trial SWEEP_DIR holds trials.csv, sweep.json, sweep.png and best.yaml (the best
  trial's whole config, for `trilora train --config best.yaml`), each written atomically.

Not done: trials in parallel (one per GPU); they run one after another in this process.
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import io
import itertools
import json
import re
import signal
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import latest_checkpoint
from .config import TrainConfig
from .checkpoint import read_metrics
from .loop import TrainingStopped, on_validation
from .outputs import OutputDirError, RunLock, existing_results, write_json, write_text
from .run import train
from .sweep_spec import (METRICS, SAMPLERS, SWEEP_OWNED, MetricMissing, OptunaMissing, Searched,  # noqa: F401
                         SweepError, SweepSpec, check_inputs, parse_grid, parse_space, parse_spec, require_optuna,
                         to_setting)

STUDY_NAME = "trilora-sweep"
SPEC_ATTR = "trilora_sweep"  # the study's user attribute holding the search it was made with

STATUS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "queued"}


class SweepStopped(TrainingStopped):
    """SIGINT/SIGTERM stopped a trial after a checkpoint: the same command continues the sweep."""

    def __init__(self, stop: TrainingStopped, trial: str):
        super().__init__(stop.step, stop.checkpoint, stop.signum)
        self.args = (f"stopped by {signal.Signals(stop.signum).name} in {trial} after step {stop.step}: run the "
                     "same trilora sweep command to continue (finished trials are kept, this one resumes from "
                     "its checkpoint)",)


# ----------------------------------------------------------------------------- the sweep

def run_sweep(base: TrainConfig, spec: SweepSpec, sweep_dir: Path) -> dict:
    """Run (or continue) the sweep in `sweep_dir`; returns {"best": row or None, "trials": rows}."""
    optuna = require_optuna()
    sweep_dir = Path(sweep_dir)
    check_inputs(base)
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise SweepError(f"--output-dir {sweep_dir} is a file")
    found = existing_results(sweep_dir) if sweep_dir.is_dir() else []
    if found:
        raise SweepError(f"--output-dir {sweep_dir} holds a training run's results ({', '.join(found)}): "
                         "a sweep needs a directory of its own")
    if sweep_dir.is_dir() and not (sweep_dir / "study.db").exists() and any(sweep_dir.glob("trial-*")):
        raise SweepError(f"--output-dir {sweep_dir} holds trial directories but no study.db: "
                         "choose another --output-dir")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with RunLock(sweep_dir):
        study = _open_study(optuna, base, spec, sweep_dir)
        _requeue_killed(study)
        if len(_counted(study)) >= spec.trials:
            print(f"[sweep] {sweep_dir}: all {spec.trials} trials have finished")
        distributions = {s.name: s.distribution() for s in spec.searched}
        while (done := len(_counted(study))) < spec.trials:
            _queue_grid(study, spec)
            trial = study.ask(distributions)
            name = trial.user_attrs.get("dir") or _next_dir(study, sweep_dir)
            trial.set_user_attr("dir", name)
            shown = ", ".join(f"{k}={v}" for k, v in trial.params.items())
            print(f"\n[sweep] {name} ({done + 1} of {spec.trials}): {shown}", flush=True)
            _run_trial(optuna, study, trial, base, spec, sweep_dir / name)
            write_reports(study, spec, sweep_dir)
        rows = write_reports(study, spec, sweep_dir)
    best = next((r for r in rows if r["best"]), None)
    return {"best": best, "trials": rows, "table": format_table(rows, spec)}


def _open_study(optuna, base: TrainConfig, spec: SweepSpec, sweep_dir: Path):
    """The study in sweep_dir/study.db, created or continued; a continued one must search the same way."""
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=spec.prune_startup_trials) if spec.prune
              else optuna.pruners.NopPruner())
    storage = f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=spec.direction,
                                sampler=optuna.samplers.RandomSampler(seed=spec.seed), pruner=pruner,
                                load_if_exists=True)
    # a continued sweep must not draw again what it drew before: the seed moves on with the trials made
    seed = spec.seed + len(study.get_trials(deepcopy=False))
    if spec.sampler == "tpe":
        study.sampler = optuna.samplers.TPESampler(seed=seed)
    else:  # grid: every trial is queued with its settings (`_queue_grid`), the sampler draws nothing
        study.sampler = optuna.samplers.RandomSampler(seed=seed)
    now, saved = spec.describe(base), study.user_attrs.get(SPEC_ATTR)
    if saved is None:
        study.set_user_attr(SPEC_ATTR, now)
    elif saved != now:
        raise SweepError(f"{sweep_dir} holds a sweep made with other settings ({'; '.join(_changes(saved, now))}): "
                         "continue it with the same settings (only --trials may change), or choose another "
                         "--output-dir")
    return study


def _changes(saved: dict, now: dict) -> list[str]:
    out = [f"{k}: {saved.get(k)} -> {now.get(k)}" for k in now
           if k not in ("settings", "search") and saved.get(k) != now.get(k)]
    searched, searching = saved.get("search", {}), now["search"]
    out += [f"searched {k}: {_span(searched.get(k))} -> {_span(searching.get(k))}"
            for k in sorted(set(searched) | set(searching)) if searched.get(k) != searching.get(k)]
    before, after = saved.get("settings", {}), now["settings"]
    out += [f"{k}: {before[k]!r} -> {after[k]!r}" for k in after if k in before and before[k] != after[k]]
    return out or ["settings added or removed"]


def _span(search: dict | None) -> str:
    if search is None:
        return "not searched"
    if "choices" in search:
        return ",".join(map(str, search["choices"]))
    return f"{search['low']}:{search['high']}" + (":log" if search["log"] else "")


def _killed(study) -> set[int]:
    """The numbers of the trials a killed sweep left running (each has a trial queued to re-run it)."""
    return {t.user_attrs["retry_of"] for t in study.get_trials(deepcopy=False) if "retry_of" in t.user_attrs}


def _counted(study) -> list:
    """The trials that count towards --trials: finished, except those killed (they run again)."""
    from optuna.trial import TrialState
    killed = _killed(study)
    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and t.number not in killed)]


def _requeue_killed(study) -> None:
    """Trials left running by a killed sweep (this process holds the sweep's lock, so nothing runs
    them now) are queued again with the same settings and directory, then marked failed."""
    from optuna.trial import TrialState
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number not in _killed(study):  # (a kill between these two steps queued it already)
            attrs = {"retry_of": t.number, **({"dir": t.user_attrs["dir"]} if "dir" in t.user_attrs else {})}
            study.enqueue_trial(t.params, user_attrs=attrs)
        study.tell(t.number, state=TrialState.FAIL)
        print(f"[sweep] {t.user_attrs.get('dir', f'trial {t.number}')} was killed mid-run: it runs again", flush=True)


def _queue_grid(study, spec: SweepSpec) -> None:
    """A grid search: the next combination of the --grid values (in the order given, the first
    --trials of them) that no trial has, queued when the queue is empty (so a killed trial,
    queued again, runs first)."""
    from optuna.trial import TrialState
    if spec.sampler != "grid" or study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return
    names = [s.name for s in spec.grid]
    killed = _killed(study)
    taken = [t.params or t.system_attrs.get("fixed_params", {}) for t in study.get_trials(deepcopy=False)
             if t.number not in killed]
    for combo in itertools.product(*(s.choices for s in spec.grid)):
        if dict(zip(names, combo)) not in taken:
            study.enqueue_trial(dict(zip(names, combo)))
            return


def _next_dir(study, sweep_dir: Path) -> str:
    """trial-NNN, numbered after every directory a trial has used or that exists."""
    used = [t.user_attrs.get("dir", "") for t in study.get_trials(deepcopy=False)]
    used += [p.name for p in sweep_dir.glob("trial-*")]
    numbers = [int(n.split("-", 1)[1]) for n in used if re.fullmatch(r"trial-\d+", n)]
    return f"trial-{max(numbers, default=-1) + 1:03d}"


def trial_config(base: TrainConfig, params: dict, out: Path, resume: bool = False, overwrite: bool = False):
    values = {name: to_setting(name, value) for name, value in params.items()}
    return dataclasses.replace(base, **values, output_dir=str(out), resume=resume, overwrite=overwrite)


def _run_trial(optuna, study, trial, base: TrainConfig, spec: SweepSpec, out: Path) -> None:
    """Train one trial and tell the study how it went: complete (with the metric), pruned or failed."""
    from optuna.trial import TrialState

    config = trial_config(base, trial.params, out)
    note = ""
    try:
        if "retry_of" in trial.user_attrs and (out / "summary.json").exists():
            # it finished before the sweep was killed: read its result, never train over it
            summary = json.loads((out / "summary.json").read_text())
            if any(summary["config"].get(k) != v for k, v in config.to_dict().items() if k in trial.params):
                raise SweepError(f"{out}/summary.json is a run with other settings than this trial's")
            note = "finished before the sweep was killed"
        else:
            if "retry_of" in trial.user_attrs:  # a killed run of this trial: continue it, or start it again
                resume = latest_checkpoint(out) is not None
                config = trial_config(base, trial.params, out, resume=resume,
                                      overwrite=not resume and bool(existing_results(out)))
                note = "resumed from its checkpoint" if resume else "restarted (killed before a checkpoint)"

            def report(step: int, val_loss: float) -> None:
                trial.report(val_loss if spec.direction == "minimize" else -val_loss, step)
                if spec.prune and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {step}: validation loss {val_loss:.4g}")

            with on_validation(report):
                summary = train(config)
    except optuna.TrialPruned as pruned:
        trial.set_user_attr("note", str(pruned))
        study.tell(trial, state=TrialState.PRUNED)
        print(f"[sweep] {out.name}: {pruned}", flush=True)
        return
    except TrainingStopped as stop:  # SIGINT/SIGTERM: the trial stays "running"; the next sweep resumes it
        raise SweepStopped(stop, out.name) from None
    except (SweepError, OutputDirError):  # the sweep's problem, not this trial's
        raise
    except Exception as err:  # noqa: BLE001 - NaN/Inf, out of memory, a setting the model refuses: the sweep goes on
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        trial.set_user_attr("note", message)
        study.tell(trial, state=TrialState.FAIL)
        print(f"[sweep] {out.name}: failed: {message}", flush=True)
        return
    finally:
        _free_memory()
    try:
        value = metric_value(summary, spec.metric)
    except MetricMissing as err:  # every trial would miss it: stop the sweep
        trial.set_user_attr("note", str(err))
        study.tell(trial, state=TrialState.FAIL)
        raise
    if note:
        trial.set_user_attr("note", note)
    study.tell(trial, value)
    print(f"[sweep] {out.name}: {spec.metric} {value:.6g}", flush=True)


def metric_value(summary: dict, metric: str) -> float:
    """The value of `metric` in a run's summary.json."""
    if metric == "val_loss":
        value = summary.get("best_val_loss")
        if value is None:
            raise MetricMissing("the trial ran no validation (no validation records?): --metric val_loss has no value")
        return float(value)
    scores = summary.get("test_after") or {}
    key = metric[len("test_"):]
    if scores.get(key) is None:
        have = ", ".join(f"test_{k}" for k, v in scores.items() if f"test_{k}" in METRICS and v is not None)
        raise MetricMissing(f"--metric {metric}: this task's test scores are {have}; start again with one of "
                            "them (and another --output-dir)")
    return float(scores[key])


def _free_memory() -> None:
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ----------------------------------------------------------------------------- the reports

def trial_rows(study, spec: SweepSpec, sweep_dir: Path) -> list[dict]:
    """One row per trial directory (a killed run and the run that replaced it share one), in order."""
    latest: dict[str, Any] = {}
    killed = _killed(study)
    for t in study.get_trials(deepcopy=False):
        if "dir" in t.user_attrs:  # started (or queued to run again); a later trial replaces a killed one
            latest[t.user_attrs["dir"]] = t
    rows = []
    for name, t in sorted(latest.items()):
        status = "killed" if t.number in killed else STATUS.get(t.state.name, t.state.name.lower())
        curve = []
        if (sweep_dir / name / "metrics.jsonl").exists():
            curve = [(r["step"], r["val_loss"]) for r in read_metrics(sweep_dir / name / "metrics.jsonl")
                     if "val_loss" in r]
        rows.append({"trial": name, "status": status, "value": t.value if status == "complete" else None,
                     "params": dict(t.params), "note": t.user_attrs.get("note", ""), "val_curve": curve,
                     "best": False})
    complete = [r for r in rows if r["value"] is not None]
    if complete:
        pick = min if spec.direction == "minimize" else max
        pick(complete, key=lambda r: r["value"])["best"] = True  # ties: the first trial
    return rows


def write_reports(study, spec: SweepSpec, sweep_dir: Path) -> list[dict]:
    """trials.csv, sweep.json, sweep.png and best.yaml in sweep_dir, each complete or as before."""
    from .plots import plot_sweep

    rows = trial_rows(study, spec, sweep_dir)
    names = [s.name for s in spec.searched]
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["trial", "status", spec.metric, *names, "best", "note"])
    for r in rows:
        writer.writerow([r["trial"], r["status"], "" if r["value"] is None else repr(r["value"]),
                         *(r["params"].get(n, "") for n in names), "yes" if r["best"] else "", r["note"]])
    write_text(sweep_dir / "trials.csv", table.getvalue())
    best = next((r for r in rows if r["best"]), None)
    if best is not None:
        write_best_config(sweep_dir, best, spec, len(rows))
    write_json(sweep_dir / "sweep.json", {
        "metric": spec.metric, "direction": spec.direction, "sampler": spec.sampler, "trials_planned": spec.trials,
        "best": None if best is None else {"trial": best["trial"], "value": best["value"], "params": best["params"],
                                           "config": str(sweep_dir / "best.yaml")},
        "trials": [{k: v for k, v in r.items() if k != "best"} for r in rows],
        "search": {s.name: s.describe() for s in spec.searched}})
    plot_sweep(rows, spec.metric, sweep_dir / "sweep.png")
    return rows


def write_best_config(sweep_dir: Path, best: dict, spec: SweepSpec, n_rows: int) -> Path:
    """best.yaml: the best trial's whole config (from its summary.json), output_dir a fresh
    directory beside the trials, ready for `trilora train --config best.yaml`."""
    summary = json.loads((sweep_dir / best["trial"] / "summary.json").read_text())
    config = dict(summary["config"])
    config.update(output_dir=str(sweep_dir / "best-run"), resume=False, overwrite=False)
    header = (f"# trilora sweep: the best of {n_rows} trials, {best['trial']} ({spec.metric} {best['value']:.6g}),\n"
              f"# in {sweep_dir}. Re-run it with `trilora train --config {sweep_dir / 'best.yaml'}`;\n"
              "# output_dir is a fresh directory: change it here or with --output-dir.\n")
    path = sweep_dir / "best.yaml"
    write_text(path, header + yaml.safe_dump(config, sort_keys=False))
    return path


def format_table(rows: list[dict], spec: SweepSpec) -> str:
    """The trials as an aligned text table, the best marked with *."""
    names = [s.name for s in spec.searched]
    head = ["trial", "status", spec.metric, *names, "note"]
    body = [[r["trial"] + (" *" if r["best"] else ""), r["status"],
             "" if r["value"] is None else f"{r['value']:.6g}",
             *(_short(r["params"].get(n, "")) for n in names), r["note"][:70]] for r in rows]
    widths = [max(len(str(line[i])) for line in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body])


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
