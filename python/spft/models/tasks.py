"""Generated toy tasks (prompt + completion records) for the demo and the tests.

Each task is deterministic in its seed and short enough for a tiny byte-level model to learn on
the CPU in a few hundred steps:

* `add`: two-digit addition, "37+45=" → "82\\n".
* `reverse`: reverse a 3-6 letter word, "<abcd>" → "dcba\\n".
* `sort`: sort 3-6 letters, "{dbca}" → "abcd\\n".
"""

from __future__ import annotations

import random
from collections.abc import Callable

_LETTERS = "abcdefghij"


def _add(rng: random.Random) -> dict[str, str]:
    a, b = rng.randrange(10, 100), rng.randrange(10, 100)
    return {"prompt": f"{a}+{b}=", "completion": f"{a + b}\n"}


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))


def _reverse(rng: random.Random) -> dict[str, str]:
    w = _word(rng)
    return {"prompt": f"<{w}>", "completion": f"{w[::-1]}\n"}


def _sort(rng: random.Random) -> dict[str, str]:
    w = _word(rng)
    return {"prompt": "{" + w + "}", "completion": "".join(sorted(w)) + "\n"}


TASKS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "add": _add, "reverse": _reverse, "sort": _sort,
}


def generate_task(name: str, n: int, *, seed: int = 0) -> list[dict[str, str]]:
    """`n` records {"prompt", "completion"} of task `name` (one of `TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    rng = random.Random(f"{name}-{seed}")
    return [TASKS[name](rng) for _ in range(n)]
