"""`trilora sweep`: the flags of a hyperparameter search turned into `trainer.sweep.run_sweep`'s
arguments, and its outcome printed (the trials' table, the best settings and how to re-run them)."""
from __future__ import annotations

import sys
from pathlib import Path

from .commands import train_config


def run_sweep(args) -> int:
    from ..trainer import sweep

    try:
        sweep.require_optuna()
    except sweep.OptunaMissing as err:
        print(f"trilora sweep: error: {err}", file=sys.stderr)
        return 1
    for name in ("resume", "overwrite", "fsdp"):
        if getattr(args, name, None):
            raise sweep.SweepError(f"--{name}: {sweep.SWEEP_OWNED[name]}")
    base = train_config(args, doing="sweeping")
    spec = sweep.parse_spec(base, args.grid, args.space, args.trials, args.sampler, args.metric, args.prune,
                            args.prune_startup_trials, args.sampler_seed)
    out = Path(args.output_dir)
    try:
        result = sweep.run_sweep(base, spec, out)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("trilora sweep: interrupted: run the same command to continue the sweep (finished trials are kept, "
              "the interrupted one runs again)", file=sys.stderr)
        return 130
    print(f"\n{result['table']}")
    best = result["best"]
    if best is None:
        print(f"trilora sweep: no trial completed (see {out / 'trials.csv'})", file=sys.stderr)
        return 1
    settings = ", ".join(f"{k}={v}" for k, v in best["params"].items())
    print(f"\nbest: {best['trial']}, {spec.metric} {best['value']:.6g}, with {settings}\n"
          f"its whole config: {out / 'best.yaml'} (re-run: trilora train --config {out / 'best.yaml'}); "
          f"table: {out / 'trials.csv'}, plot: {out / 'sweep.png'}")
    return 0
