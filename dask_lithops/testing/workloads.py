"""Small task functions for tests: importable on every worker (they ship with dask_lithops),
unlike functions defined in a test module, which workers cannot import."""

from __future__ import annotations

import time


def inc(x):
    return x + 1


def hold_memory(mb: int, seconds: float = 10.0) -> int:
    """Keep ``mb`` MiB resident for ``seconds`` (touched pages, unlike ``bytearray(n)``)."""
    data = b"\x01" * (mb * 2**20)
    time.sleep(seconds)
    return len(data)


def sleep_then(seconds: float, value=None):
    time.sleep(seconds)
    return value


def grow_memory(mb: int, step_mb: int = 16, pause: float = 0.02) -> int:
    """Allocate ``mb`` MiB step by step, as a task building a large result does."""
    chunks = []
    for _ in range(mb // step_mb):
        chunks.append(b"\x01" * (step_mb * 2**20))
        time.sleep(pause)
    return sum(len(c) for c in chunks)
