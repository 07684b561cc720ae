"""Reading files a user hands us: safetensors only (no pickle), with errors that name the file."""
from __future__ import annotations

import contextlib
import os

from safetensors import SafetensorError, safe_open


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike):
    """`safe_open(path)` on CPU; a truncated or corrupt file (at open or while reading a tensor)
    raises ValueError naming it, instead of the library's bare message."""
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as err:
        raise ValueError(f"{os.fspath(path)} is not a readable safetensors file (truncated or corrupt?): {err}") from None
