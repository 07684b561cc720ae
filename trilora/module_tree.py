"""Module-tree helpers shared by every layer of trilora (quant, lora, trainer, patching)."""
from __future__ import annotations

import re
from typing import Iterable

import torch.nn as nn


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` (dotted path) sits in `model`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether module `name` is one of `patterns`: its full dotted path, a dotted suffix of it,
    its last component, or a regex matching the full path."""
    leaf = name.rsplit(".", 1)[-1]
    return any(name == p or leaf == p or name.endswith("." + p) or re.fullmatch(p, name) for p in patterns)
