"""The maths grader: math-verify's equivalence of an answer and the expected one, and a worker
process that runs it on untrusted answers with a hard timeout (sympy can spin for minutes on a
crafted expression, and its own timeouts are signals that only a main thread gets)."""

from __future__ import annotations

import asyncio
import importlib.util
import multiprocessing
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from .graders import MAX_GRADED_CHARS, Grade, GraderUnavailableError, last_boxed

MATH_EXTRA_HINT = "the math grader needs math-verify: pip install 'llm-sandbox-operator[grading]'"
# Starting the worker imports sympy: allow for a slow machine.
WORKER_START_SECONDS = 120.0


def math_verify_installed() -> bool:
    return importlib.util.find_spec("math_verify") is not None


def _as_latex(text: str) -> str:
    """The expected answer as math-verify parses a gold answer: boxed or in $...$ as given,
    else wrapped in $...$ so that plain `1/2` and `\\frac{1}{2}` are read as maths."""
    stripped = text.strip()
    if last_boxed(stripped) is not None or stripped.startswith("$"):
        return stripped
    return f"${stripped}$"


def grade_math(answer: str, expected: str, timeout_seconds: float) -> Grade:
    """math-verify in this process (its signal timeouts work only in a main thread)."""
    try:
        from math_verify import parse, verify  # type: ignore[import-untyped]
    except ImportError:
        raise GraderUnavailableError(MATH_EXTRA_HINT) from None
    seconds = max(1, round(timeout_seconds))
    gold = parse(_as_latex(expected), parsing_timeout=seconds)
    if not gold:
        return Grade(0.0, "math-verify cannot read the expected answer")
    got = parse(answer[-MAX_GRADED_CHARS:], parsing_timeout=seconds)
    if not got:
        return Grade(0.0, "math-verify finds no mathematical answer in the answer")
    if verify(gold, got, timeout_seconds=seconds):
        return Grade(1.0)
    return Grade(0.0, f"not equivalent: expected {gold[-1]}, got {got[-1]}")


def _serve(conn: Connection) -> None:
    """The worker: grade each (answer, expected, timeout) it is sent, until the pipe closes."""
    try:
        import math_verify  # noqa: F401 - imported once, before the first answer
    except ImportError:
        conn.send(("unavailable", MATH_EXTRA_HINT))
        return
    conn.send(("ready", ""))
    while True:
        try:
            answer, expected, timeout = conn.recv()
        except EOFError:
            return
        try:
            result = grade_math(answer, expected, timeout)
            conn.send((result.score, result.message))
        except Exception as exc:  # a crafted answer may break the parser: a zero, not a crash
            conn.send((0.0, f"math-verify failed: {type(exc).__name__}"))


class MathWorker:
    """One worker process that grades maths answers one at a time. An answer that takes longer
    than twice its timeout (plus a margin) scores 0 and the worker is replaced."""

    def __init__(self, serve: Callable[[Connection], None] | None = None) -> None:
        # What the worker runs: _serve (tests put a stand-in here).
        self._serve = serve or _serve
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    def _lock(self) -> asyncio.Lock:
        """One lock per event loop: a process may run several (asyncio.run after asyncio.run),
        and a lock serves the loop it was first waited on in only."""
        loop = asyncio.get_running_loop()
        for old in [other for other in self._locks if other.is_closed()]:
            del self._locks[old]
        return self._locks.setdefault(loop, asyncio.Lock())

    async def grade(self, answer: str, expected: str, timeout_seconds: float) -> Grade:
        async with self._lock():
            conn = await self._started()
            conn.send((answer[-MAX_GRADED_CHARS:], expected, timeout_seconds))
            budget = 2 * timeout_seconds + 5
            if not await asyncio.to_thread(conn.poll, budget):
                self.close()
                return Grade(0.0, f"grading took longer than {budget:.0f}s")
            try:
                score, message = conn.recv()
            except (EOFError, OSError):
                self.close()
                return Grade(0.0, "the maths grader stopped while grading")
            return Grade(float(score), str(message))

    async def _started(self) -> Connection:
        if self._process is not None and self._process.is_alive() and self._conn is not None:
            return self._conn
        self.close()
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=self._serve, args=(child,), daemon=True, name="math-grader")
        process.start()
        child.close()
        self._process, self._conn = process, parent
        if not await asyncio.to_thread(parent.poll, WORKER_START_SECONDS):
            self.close()
            raise GraderUnavailableError("the maths grader did not start")
        try:
            state, detail = parent.recv()
        except EOFError:
            self.close()
            raise GraderUnavailableError("the maths grader stopped as it started") from None
        if state != "ready":
            self.close()
            raise GraderUnavailableError(detail)
        return parent

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            self._process.kill()
            self._process.join(timeout=5)
        self._process, self._conn = None, None
