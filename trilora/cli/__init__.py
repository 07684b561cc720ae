"""`trilora` / `python -m trilora`: train, sweep, eval, merge, generate, predict, bench.

This package is the command line only. `main` (here) runs one command and turns every failure
into one line and an exit code; `parser.py` holds the flags; the commands live in `commands.py`
(train, eval, generate, predict), `sweep.py`, `merge.py` and `bench.py`, sharing `loading.py`
(which base, adapter, 4-bit format and head a command loads). The library (trilora.lora, quant,
kernels) never imports this package.
"""
from __future__ import annotations

import os
import sys

from .bench import BENCH_SCRIPTS
from .loading import DEMO_CONFIG
from .merge import check_merge_output
from .parser import build_parser, parse_args

# The names `from trilora.cli import ...` gave before the CLI became a package.
__all__ = ["main", "build_parser", "check_merge_output", "BENCH_SCRIPTS", "DEMO_CONFIG"]


def main(argv=None) -> int:
    """Every failure is one line naming the problem (and a non-zero exit); --debug adds the traceback.

    Exit codes: 0 done; 2 bad input (a ValueError, TypeError or OSError such as a missing file;
    argparse's usage errors exit 2 too); 1 anything else; 128 + signal number when training
    stopped on a signal (130 SIGINT, 143 SIGTERM); 130 on Ctrl-C elsewhere. `trilora bench`
    returns its scripts' exit codes or-ed together.
    """
    args = parse_args(argv)
    args.debug = args.debug or os.environ.get("TRILORA_DEBUG", "") not in ("", "0")
    from ..trainer.loop import TrainingStopped

    try:
        return args.func(args)
    except TrainingStopped as stop:
        print(f"trilora {args.command}: {stop}", file=sys.stderr)
        return 128 + stop.signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"trilora {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, TypeError) as err:  # bad input; OSError: missing / unreadable files
        if args.debug:
            raise
        print(f"trilora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - anything else is still one line unless --debug
        if args.debug:
            raise
        print(f"trilora {args.command}: error: {type(err).__name__}: {err} (--debug shows where)", file=sys.stderr)
        return 1
