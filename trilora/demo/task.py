"""The embedded demo: a tiny character-level model and the tasks it is trained and tuned on.

The base model (`assets/`, trained by `scripts/train_demo_base.py`) learned two string tasks,
"copy: w = w" and "reverse: w = esrever". The fine-tuning task it has never seen is
rotation, "rotate: hello = elloh": the first letter moves to the end. It reuses what the base
knows (the format, attending to the input letters in order) and needs a new positional
pattern, which a rank-8 QLoRA adapter learns within a minute on a CPU: exact match on the
test split goes from 0 to nearly 1. (A task that needs a new letter-to-letter map, such as a
Caesar shift, is a full-rank change: full fine-tuning learns it, rank-8 LoRA does not.)
"""
from __future__ import annotations

import random
import string

ALPHABET = string.ascii_lowercase
# characters the tokenizer knows: letters, digits, punctuation used by the tasks, space, newline
CHARS = ALPHABET + string.digits + " :=,.-+?!'\n"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


TASKS = {
    "copy": lambda w: w,
    "reverse": lambda w: w[::-1],
    "rotate": lambda w: w[1:] + w[0],
}


def random_words(n: int, seed: int, min_len: int = 3, max_len: int = 7) -> list[str]:
    """`n` distinct random lowercase words, deterministic by seed."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(ALPHABET) for _ in range(rng.randint(min_len, max_len))))
    ordered = sorted(words)  # a set's order depends on the process's string-hash seed
    rng.shuffle(ordered)
    return ordered


def task_records(task: str, words: list[str]) -> list[dict]:
    """prompt/completion records, e.g. {"prompt": "rotate: abc =", "completion": " bca"}."""
    fn = TASKS[task]
    return [{"prompt": f"{task}: {w} =", "completion": f" {fn(w)}"} for w in words]


def demo_dataset(n: int = 1200, seed: int = 1234) -> list[dict]:
    """The demo's fine-tuning data: the rotate task over `n` random words."""
    return task_records("rotate", random_words(n, seed))
