"""An output directory that belongs to one run, and artefacts that are complete or absent.

A user's finished work is never replaced silently: a run refuses a directory that holds another
run's results unless told what to do (`--resume` continues an unfinished run, `--overwrite`
starts again), takes a lock on it for its lifetime (two runs into one directory would interleave
their records), clears what killed runs left half-written, and writes every final artefact to a
temporary path that is renamed into place (the summary last, so a summary means "done").
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

# what a run writes into its output directory (`--overwrite` removes exactly these)
RUN_ARTEFACTS = ("summary.json", "adapter", "model", "best", "metrics.jsonl", "loss_curve.png", "checkpoints")
LOCK_NAME = ".trilora.lock"


class OutputDirError(ValueError):
    """The output directory cannot be used as asked (another run's results, a live lock)."""


def existing_results(out: Path) -> list[str]:
    """The run artefacts present in `out` ("adapter/", "summary.json", ...; empty directories do not count)."""
    out = Path(out)
    return [name + ("/" if (out / name).is_dir() else "") for name in RUN_ARTEFACTS
            if (out / name).exists() and not ((out / name).is_dir() and not any((out / name).iterdir()))]


def claim(out: Path, resume: bool, overwrite: bool, has_checkpoint: bool) -> None:
    """Check that this run may write into `out` and prepare it; raises OutputDirError.

    resume: continue the run in `out` (needs a checkpoint and no summary: an unfinished run);
    overwrite: remove another run's results first. Stale temporaries of killed runs are removed
    first in every case (call this holding the directory's `RunLock`).
    """
    out = Path(out)
    if resume and overwrite:
        raise OutputDirError("--resume and --overwrite contradict each other: continue the run, or replace it")
    remove_stale_temporaries(out)  # (this run holds the directory's lock: nothing else is writing them)
    found = existing_results(out)
    finished = (out / "summary.json").exists()
    if resume:
        if finished:
            raise OutputDirError(f"{out} holds a finished run (summary.json): there is nothing to resume; "
                                 "--overwrite trains it again, or choose another --output-dir")
        if not has_checkpoint:
            raise OutputDirError(f"nothing to resume in {out}: it holds no checkpoint (checkpoints are written "
                                 "with --save-every N)")
    elif found:
        if not overwrite:
            raise OutputDirError(f"{out} holds another run's results ({', '.join(found)}): continue it with "
                                 "--resume, replace it with --overwrite, or choose another --output-dir")
        for name in RUN_ARTEFACTS:
            remove(out / name)


def remove(path: Path) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_stale_temporaries(out: Path) -> None:
    """Half-written artefacts of killed runs: `.tmp-*`/`.old-*` here and under checkpoints/."""
    for root in (Path(out), Path(out) / "checkpoints"):
        if root.is_dir():
            for p in list(root.glob(".tmp-*")) + list(root.glob(".old-*")):
                remove(p)


class RunLock:
    """An exclusive lock on an output directory while a run writes to it (fcntl.flock: the
    kernel releases it when the holder dies, so a killed run never blocks the next one). The
    lock file is removed on release; a process that locked a file removed meanwhile retries on
    the new one, so two runs never both hold "the" lock."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.file = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (documented limitation)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            self.file = open(self.path, "a+")
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.seek(0)
                holder = self.file.read().strip() or "?"
                self.file.close()
                self.file = None
                raise OutputDirError(f"another trilora run (pid {holder}) is writing to {self.path.parent}; "
                                     "wait for it to finish or choose another --output-dir") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(self.file.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            self.file.close()  # the holder released and removed it meanwhile: lock the new file
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def release(self) -> None:
        if self.file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # while still holding it (see the class docstring)
            self.file.close()  # closing drops the flock
            self.file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ----------------------------------------------------------------------------- atomic writes

def fsync_dir(path: Path) -> None:
    """The directory's entries (a rename into it) on disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir(write: Callable[[Path], None], path: Path) -> None:
    """write(dir) into a temporary sibling, then swap it in: a kill never leaves a half-written
    `path` (at worst the previous one, under .old-<name>, which the next run removes)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    remove(tmp)
    write(tmp)
    swap_in(tmp, path)


def swap_in(tmp: Path, path: Path) -> None:
    """Put the complete directory `tmp` in `path`'s place (the previous one, if any, moved to
    .old-<name> first and removed after), and fsync the rename."""
    old = path.with_name(f".old-{path.name}")
    if path.exists():
        remove(old)
        os.rename(path, old)
    os.rename(tmp, path)
    remove(old)
    fsync_dir(path.parent)


def write_file(write: Callable[[Path], None], path: Path) -> None:
    """write(file) to a temporary sibling, then rename it into place: `path` is complete or
    keeps what it held before (the temporary is removed if write fails)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    """`path` holds `text` completely, or keeps what it held before."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")
