"""One architecture of the compiled-code report, in its own process (see `record.py` for why).

    python -m bench.compiled.run --arch 90 --json rows.json [--only REGEX]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset


def _jsonable(v):
    return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


def compile_all(arch: int, only: str | None = None) -> dict:
    import torch
    import triton

    from .analyze import analyze
    from .record import record_compiles
    from .scenarios import all_scenarios

    rows, failures = [], []
    started = time.time()
    with record_compiles(arch) as (records, set_scenario):
        for label, thunk in all_scenarios():
            if only and not re.search(only, label):
                continue
            set_scenario(label)
            try:
                thunk()
            except Exception as err:  # noqa: BLE001 - a failure is a row of the report
                failures.append(dict(scenario=label, error=f"{type(err).__name__}: {err}"[-2000:],
                                     where="".join(traceback.format_exc().splitlines(True)[-8:])))
    for rec in records:
        row = dict(kernel=rec.kernel_name, scenario=rec.scenario, also_in=sorted(set(rec.seen_in) - {rec.scenario}),
                   constexprs={k: _jsonable(v) for k, v in rec.constexprs.items()}, none_args=rec.none_args,
                   grid=list(rec.grid) if rec.grid else None)
        try:
            row.update(analyze(rec.kernel))
        except Exception as err:  # noqa: BLE001
            failures.append(dict(scenario=rec.scenario, error=f"analysis of {rec.kernel_name}: {err}"))
        rows.append(row)
    return dict(triton=triton.__version__, torch=torch.__version__, arch=arch, seconds=round(time.time() - started, 1),
                rows=rows, failures=failures)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--only", default=None)
    args = ap.parse_args(argv)
    result = compile_all(args.arch, args.only)
    with open(args.json, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
