"""A scripted model in a process of its own, for the benchmarks whose work waits on the model:
its HTTP threads then do not share the measured process's GIL or CPU accounting."""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any


@contextlib.contextmanager
def model_process(serve: Callable[..., None], *args: Any) -> Iterator[tuple[str, Connection]]:
    """`serve(*args, conn)` started in a spawned process: it sends its base URL on `conn`, then
    answers what it is sent until "stop". Yields the base URL and the connection."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=serve, args=(*args, child), daemon=True)
    process.start()
    try:
        yield parent.recv(), parent
    finally:
        parent.send("stop")
        process.join(timeout=10)
