"""`trilora sweep`: a grid runs every combination in a directory of its own and picks the best,
whose best.yaml re-runs to the same result; a killed sweep continues where it stopped (finished
trials kept, the killed one resumed from its checkpoint); --prune stops a trial that is plainly
worse; a failing trial is recorded while the sweep goes on; a bad specification fails at once.

Every trial is a 2-6 step run of the demo model (`_trainer_helpers.fast_args`), in this process."""
import csv
import json
import signal
import sys
from pathlib import Path

import pytest
import yaml
from _trainer_helpers import demo_data, fast_args, metrics, run_cli

from trilora.trainer import sweep
from trilora.trainer.config import TrainConfig
from trilora.trainer.evaluate import NonFiniteError
from trilora.trainer.loop import TrainingStopped, on_validation


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp("data"), n=120)  # splits 96 / 12 / 12


def sweep_args(out, data, *search, steps=6, **overrides):
    """`trilora sweep` over short demo runs validated every 2 steps, SWEEP_DIR `out`."""
    settings = dict(eval_every=2, eval_max_new_tokens=4)
    settings.update(overrides)
    return ["sweep", *fast_args(out, data, steps=steps, **settings)[1:], *search]


def rows(out):
    with open(out / "trials.csv") as f:
        return list(csv.DictReader(f))


def summary(path):
    return json.loads((path / "summary.json").read_text())


@pytest.fixture
def train_calls(monkeypatch):
    """The configs the sweep trains, in order (the training itself runs as usual)."""
    calls, train = [], sweep.train

    def counting(config):
        calls.append(config)
        return train(config)
    monkeypatch.setattr(sweep, "train", counting)
    return calls


def test_grid_runs_every_combination_and_best_yaml_reproduces_the_best(data, tmp_path, train_calls):
    out = tmp_path / "sweep"
    code, stdout, stderr = run_cli(sweep_args(out, data, "--grid", "lr=3e-3,1e-3", "--grid", "r=2,4"))
    assert code == 0, stderr
    # every combination, in the order given, each an ordinary finished run of its own
    dirs = sorted(p.name for p in out.glob("trial-*"))
    assert dirs == ["trial-000", "trial-001", "trial-002", "trial-003"]
    ran = [(summary(out / d)["config"]["lr"], summary(out / d)["config"]["r"]) for d in dirs]
    assert ran == [(3e-3, 2), (3e-3, 4), (1e-3, 2), (1e-3, 4)]
    assert all(summary(out / d)["config"]["output_dir"] == str(out / d) for d in dirs)
    assert all((out / d / "adapter").is_dir() for d in dirs)
    # the table holds each trial's own validation loss, and the best is the lowest
    table = rows(out)
    assert [r["trial"] for r in table] == dirs and {r["status"] for r in table} == {"complete"}
    losses = {r["trial"]: float(r["val_loss"]) for r in table}
    assert losses == {d: summary(out / d)["best_val_loss"] for d in dirs}
    assert len(set(losses.values())) == 4
    best = min(losses, key=losses.get)
    assert [r["trial"] for r in table if r["best"] == "yes"] == [best]
    report = json.loads((out / "sweep.json").read_text())
    assert report["best"]["trial"] == best and report["best"]["value"] == losses[best]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".tmp-*"))
    assert f"best: {best}, val_loss" in stdout and all(d in stdout for d in dirs)

    # best.yaml is the best trial's whole config, into a fresh directory; it re-runs to the same result
    config = yaml.safe_load((out / "best.yaml").read_text())
    expected = dict(summary(out / best)["config"], output_dir=str(out / "best-run"))
    assert config == expected
    code, _, stderr = run_cli(["train", "--config", out / "best.yaml"])
    assert code == 0, stderr
    again = summary(out / "best-run")
    assert again["best_val_loss"] == pytest.approx(losses[best], abs=1e-6)
    assert again["test_after"]["loss"] == pytest.approx(summary(out / best)["test_after"]["loss"], abs=1e-6)

    # the same command again: every trial has finished, nothing is trained
    before = {d: (out / d / "summary.json").stat().st_mtime_ns for d in dirs}
    n_calls = len(train_calls)
    code, stdout, stderr = run_cli(sweep_args(out, data, "--grid", "lr=3e-3,1e-3", "--grid", "r=2,4"))
    assert code == 0, stderr
    assert len(train_calls) == n_calls and "all 4 trials have finished" in stdout
    assert {d: (out / d / "summary.json").stat().st_mtime_ns for d in dirs} == before


def test_a_killed_sweep_continues_where_it_stopped(data, tmp_path, train_calls):
    out = tmp_path / "sweep"
    args = sweep_args(out, data, "--grid", "lr=3e-3,2e-3,1e-3", save_every=2)
    validations = []

    def kill_in_second_trial(step, loss):  # the 5th validation: trial 2 at step 4, after its step-2 checkpoint
        validations.append(step)
        if len(validations) == 5:
            raise KeyboardInterrupt

    with on_validation(kill_in_second_trial):
        code, _, stderr = run_cli(args)
    assert code == 130, stderr
    assert (out / "trial-000" / "summary.json").exists()
    assert not (out / "trial-001" / "summary.json").exists() and (out / "trial-001" / "checkpoints" / "step-2").is_dir()
    assert not (out / "trial-002").exists()
    assert [(r["trial"], r["status"]) for r in rows(out)] == [("trial-000", "complete")]
    first = (out / "trial-000" / "summary.json").stat().st_mtime_ns

    # another search, or other shared settings, in this directory: refused before anything runs
    n_calls = len(train_calls)
    for other, words in [(sweep_args(out, data, "--grid", "lr=3e-3,2e-3,5e-4", save_every=2), "searched lr"),
                         (sweep_args(out, data, "--grid", "lr=3e-3,2e-3,1e-3", save_every=2, lora_r=8), "r: 4 -> 8")]:
        code, _, stderr = run_cli(other)
        assert code == 2 and "other settings" in stderr and words in stderr, stderr
    assert len(train_calls) == n_calls

    # the same command: trial-000 is kept, trial-001 continues from step 2 (first), then trial-002 runs
    code, stdout, stderr = run_cli(args)
    assert code == 0, stderr
    trained = [(c.output_dir, c.resume) for c in train_calls[n_calls:]]
    assert trained == [(str(out / "trial-001"), True), (str(out / "trial-002"), False)]
    assert (out / "trial-000" / "summary.json").stat().st_mtime_ns == first
    resumed = summary(out / "trial-001")
    assert resumed["resumed"] is True and resumed["steps"] == 6 and resumed["config"]["lr"] == 2e-3
    assert [r["step"] for r in metrics(out / "trial-001") if "val_loss" in r] == [2, 4, 6]
    table = rows(out)
    assert [(r["trial"], r["status"], float(r["lr"])) for r in table] == [
        ("trial-000", "complete", 3e-3), ("trial-001", "complete", 2e-3), ("trial-002", "complete", 1e-3)]
    assert "resumed from its checkpoint" in table[1]["note"]
    assert sorted(p.name for p in out.glob("trial-*")) == ["trial-000", "trial-001", "trial-002"]


def test_a_stopped_trial_restarts_and_a_finished_one_is_never_trained_again(data, tmp_path, train_calls,
                                                                            monkeypatch):
    out = tmp_path / "sweep"
    args = sweep_args(out, data, "--grid", "lr=3e-3,1e-3", steps=2)

    def sigterm(step, loss):  # as SIGTERM stops the loop (here without a checkpoint to resume from)
        raise TrainingStopped(step, out / "trial-000" / "nowhere", signal.SIGTERM)

    with on_validation(sigterm):
        code, _, stderr = run_cli(args)
    assert code == 143 and "SIGTERM in trial-000 after step 2" in stderr and "same trilora sweep command" in stderr
    assert (out / "trial-000" / "metrics.jsonl").exists() and not (out / "trial-000" / "summary.json").exists()
    code, _, stderr = run_cli(args)  # the partial run is replaced (it never finished), then trial-001 runs
    assert code == 0, stderr
    assert [(c.output_dir, c.resume, c.overwrite) for c in train_calls[1:]] == [
        (str(out / "trial-000"), False, True), (str(out / "trial-001"), False, False)]
    table = rows(out)
    assert [r["status"] for r in table] == ["complete", "complete"]
    assert "restarted" in table[0]["note"]

    # killed after its run finished, before the study heard of it: the result is read, not trained again
    out = tmp_path / "sweep2"
    args = sweep_args(out, data, "--grid", "lr=3e-3", steps=2)
    train = sweep.train

    def train_then_die(config):
        train(config)
        raise KeyboardInterrupt
    monkeypatch.setattr(sweep, "train", train_then_die)
    assert run_cli(args)[0] == 130
    monkeypatch.setattr(sweep, "train", lambda config: pytest.fail("trained again"))
    code, _, stderr = run_cli(args)
    assert code == 0, stderr
    (row,) = rows(out)
    assert row["status"] == "complete" and "finished before the sweep was killed" in row["note"]
    assert float(row["val_loss"]) == summary(out / "trial-000")["best_val_loss"]


def test_prune_stops_a_trial_that_is_plainly_worse(data, tmp_path):
    """lr 1e-7 does not learn: at its first validation its loss is the untrained model's, well above
    the two completed trials' at that step (about 5.37 against 5.15-5.2), so the median rule stops it."""
    out = tmp_path / "sweep"
    code, stdout, stderr = run_cli(sweep_args(out, data, "--grid", "lr=3e-3,2e-3,1e-7", "--prune",
                                              "--prune-startup-trials", "2"))
    assert code == 0, stderr
    table = {r["trial"]: r for r in rows(out)}
    assert [table[t]["status"] for t in sorted(table)] == ["complete", "complete", "pruned"]
    assert table["trial-002"]["val_loss"] == "" and "pruned at step 2" in table["trial-002"]["note"]
    assert not (out / "trial-002" / "summary.json").exists()  # stopped: no test evaluation, no adapter
    assert [r["step"] for r in metrics(out / "trial-002") if "val_loss" in r] == [2]
    assert [r["step"] for r in metrics(out / "trial-001") if "val_loss" in r] == [2, 4, 6]
    assert "best: trial-000" in stdout


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on(data, tmp_path):
    out = tmp_path / "sweep"
    validations = []

    def nan_in_first_trial(step, loss):  # as the loop raises on a NaN validation loss
        validations.append(step)
        if len(validations) == 1:
            raise NonFiniteError(f"step {step}: the validation loss is nan; stopped")

    with on_validation(nan_in_first_trial):
        code, stdout, stderr = run_cli(sweep_args(out, data, "--grid", "lr=3e-3,1e-3", steps=2))
    assert code == 0, stderr
    table = rows(out)
    assert [(r["trial"], r["status"]) for r in table] == [("trial-000", "failed"), ("trial-001", "complete")]
    assert "NonFiniteError: step 2: the validation loss is nan" in table[0]["note"]
    assert table[1]["best"] == "yes" and "trial-000: failed" in stdout


def test_random_ranges_stay_inside_them_and_more_trials_extend_the_sweep(data, tmp_path, train_calls):
    out = tmp_path / "sweep"
    search = ["--space", "lr=1e-4:1e-2:log", "--space", "r=2|4", "--sampler", "random"]
    code, _, stderr = run_cli(sweep_args(out, data, *search, "--trials", "2", steps=2))
    assert code == 0, stderr
    code, _, stderr = run_cli(sweep_args(out, data, *search, "--trials", "3", steps=2))
    assert code == 0, stderr
    assert [c.output_dir for c in train_calls] == [str(out / f"trial-00{i}") for i in range(3)]
    for c in train_calls:
        assert 1e-4 <= c.lr <= 1e-2 and c.r in (2, 4)
    assert len({c.lr for c in train_calls}) == 3
    assert [r["status"] for r in rows(out)] == ["complete"] * 3


def test_values_are_read_as_the_settings_take_them():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    base = TrainConfig()
    spec = sweep.parse_spec(base, grid=["lr=1e-4,2e-4", "target_modules=q_proj v_proj,all-linear",
                                        "packing=true,false", "lora-r=8,16"])
    assert spec.sampler == "grid" and spec.trials == 16
    assert {s.name: s.choices for s in spec.grid} == {
        "lr": [1e-4, 2e-4], "target_modules": ["q_proj v_proj", "all-linear"], "packing": [True, False], "r": [8, 16]}
    config = sweep.trial_config(base, {"target_modules": "q_proj v_proj", "r": 8, "lr": 1e-4}, Path("x"))
    assert config.target_modules == ("q_proj", "v_proj") and config.r == 8 and config.lr == 1e-4
    assert config.output_dir == "x" and not config.resume and not config.overwrite

    spec = sweep.parse_spec(base, space=["lr=1e-5:1e-3:log", "r=4:32", "scheduler=cosine|constant"], trials=5)
    assert spec.sampler == "tpe" and spec.trials == 5
    found = {s.name: s.distribution() for s in spec.space}
    assert found == {"lr": FloatDistribution(1e-5, 1e-3, log=True), "r": IntDistribution(4, 32),
                     "scheduler": CategoricalDistribution(["cosine", "constant"])}


def test_help_lists_the_search_and_hides_what_the_sweep_sets():
    code, stdout, _ = run_cli(["sweep", "--help"])
    assert code == 0 and all(flag in stdout for flag in ("--grid", "--space", "--trials", "--prune", "SWEEP_DIR"))
    assert "--lr" in stdout and not any(flag in stdout for flag in ("--resume", "--overwrite", "--fsdp"))


@pytest.mark.parametrize("search, words", [
    (["--grid", "lrr=1e-4,2e-4"], "unknown setting 'lrr' (did you mean lr?)"),
    (["--grid", "learning_rate=1e-4,2e-4"], "did you mean lr?"),
    (["--grid", "lr=-1,1e-3"], "lr must be a positive number"),
    (["--grid", "r=8,abc"], "r must be integer"),
    (["--grid", "lr=1e-4,1e-4"], "repeated"),
    (["--grid", "lr"], "expected KEY=VALUES"),
    (["--grid", "output_dir=a,b"], "output_dir cannot be searched"),
    (["--grid", "lr=1e-4", "--space", "lr=1e-5:1e-3", "--trials", "2"], "lr searched twice"),
    (["--grid", "lr=1e-4,2e-4", "--trials", "3"], "the grid has 2 combinations"),
    (["--space", "lr=1e-3:1e-5", "--trials", "2"], "LOW < HIGH"),
    (["--space", "lr=0:1e-3:log", "--trials", "2"], "a log range needs LOW > 0"),
    (["--space", "dropout=0:1", "--trials", "2"], "dropout must be in [0, 1)"),
    (["--space", "r=2:x", "--trials", "2"], "r takes integers"),
    (["--space", "scheduler=1:2", "--trials", "2"], "scheduler is not a number"),
    (["--space", "lr=1e-5..1e-3", "--trials", "2"], "expected LOW:HIGH"),
    (["--space", "lr=1e-5:1e-3"], "needs --trials N"),
    (["--space", "lr=1e-5:1e-3", "--sampler", "grid", "--trials", "2"], "ranges (--space) need"),
    (["--grid", "lr=1e-4,2e-4", "--metric", "test_acuracy"], "did you mean test_accuracy?"),
    (["--grid", "lr=1e-4,2e-4", "--prune", "--eval-every", "0"], "set --eval-every N"),
    (["--grid", "lr=1e-4,2e-4", "--split", "0.9", "0", "0.1"], "needs a validation split"),
    (["--grid", "lr=1e-4,2e-4", "--resume"], "--resume: a sweep resumes by itself"),
    ([], "nothing to search"),
])
def test_a_bad_specification_is_one_line_before_any_trial(data, tmp_path, train_calls, search, words):
    out = tmp_path / "sweep"
    code, _, stderr = run_cli(sweep_args(out, data, *search))
    assert code == 2, stderr
    assert words in stderr and stderr.startswith("trilora sweep: error:") and stderr.count("\n") == 1, stderr
    assert not out.exists() and train_calls == []


def test_missing_files_and_foreign_directories_are_refused(data, tmp_path, train_calls):
    code, _, stderr = run_cli(sweep_args(tmp_path / "a", tmp_path / "missing.jsonl", "--grid", "lr=1e-4,2e-4"))
    assert code == 2 and "--data" in stderr and "missing.jsonl" in stderr, stderr
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").write_text("x")
    code, _, stderr = run_cli(sweep_args(run, data, "--grid", "lr=1e-4,2e-4"))
    assert code == 2 and "holds a training run's results" in stderr, stderr
    orphans = tmp_path / "orphans"
    (orphans / "trial-000").mkdir(parents=True)
    code, _, stderr = run_cli(sweep_args(orphans, data, "--grid", "lr=1e-4,2e-4"))
    assert code == 2 and "no study.db" in stderr, stderr
    assert train_calls == []


def test_without_optuna_the_error_says_how_to_install_it(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    code, _, stderr = run_cli(sweep_args(tmp_path / "sweep", data, "--grid", "lr=1e-4,2e-4"))
    assert code == 1 and stderr == "trilora sweep: error: Optuna is not installed: pip install 'trilora[sweep]'\n"
    assert not (tmp_path / "sweep").exists()
