"""A SandboxTaskSet on this machine: its item-samples run N at a time in local sandboxes, each
finished one a line of DIR/results.jsonl (so an interrupted batch resumes where it stopped), and
the whole summed into DIR/summary.json. `sandboxctl batch` and the Python API's run_set share it."""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from pydantic import Field, ValidationError

from .agent_run import failed
from .artifacts import ArtifactStoreError, StoreOptions, read_object
from .errors import TaskSpecError
from .graders import MathGrader
from .result import ExitReason, Phase, TaskResult, WireModel, is_scored
from .runner import LOCAL_MODEL_LOG, RunOptions, RunOutcome, run_name, run_task
from .task import ObjectMeta, SandboxTask
from .taskfile import load_file, missing_input_files
from .taskset import (
    Child,
    SampleResult,
    SandboxTaskSet,
    SetItem,
    SetSummary,
    check_items,
    child_spec,
    children,
    parquet_items,
    parse_items,
    parse_set,
    summarise,
    template_task,
)

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
BATCH_FILE = "batch.json"
LOCK_FILE = ".batch.lock"
RUNS_DIR = "runs"
MAX_ITEMS_BYTES = 1024 * 1024 * 1024
DEFAULT_PARALLEL = 8

T = TypeVar("T")
R = TypeVar("R")


class BatchRow(WireModel):
    """One finished item-sample: a line of results.jsonl."""

    id: str
    sample: int
    task: str
    phase: Phase
    exit_reason: ExitReason
    message: str = ""
    answer: str | None = None
    expected: str | None = None
    score: float | None = None
    grader: str | None = None
    grade_message: str | None = None
    steps: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float | None = Field(default=None, alias="costUSD")
    duration_seconds: float = 0.0
    trajectory: str | None = None
    run_dir: str | None = None

    def sample_result(self) -> SampleResult:
        return SampleResult(
            self.id, self.sample, self.phase, self.exit_reason, self.score,
            self.prompt_tokens, self.completion_tokens, self.cost_usd,
        )  # fmt: skip


def load_set_file(path: Path) -> SandboxTaskSet:
    """Parse and validate one set file; errors name the file and the field."""
    return load_file(path, parse_set, "set", "SandboxTaskSet")


async def load_items(
    taskset: SandboxTaskSet, set_dir: Path, options: StoreOptions, env: dict[str, str]
) -> list[SetItem]:
    """The set's items, inline or from itemsFrom (a local file or an artifact-store URL), checked
    (check_items) so that a bad item is refused before anything runs."""
    spec = taskset.spec
    if spec.items is not None:
        items = spec.items
    else:
        source = spec.items_from
        assert source is not None
        where = "spec.itemsFrom"
        if source.config_map_key_ref is not None:
            raise TaskSpecError(
                f"{where}.configMapKeyRef: ConfigMaps exist only on a cluster; use file or url "
                "with sandboxctl batch"
            )
        if source.file is not None:
            items = _file_items(set_dir / source.file, f"{where}.file")
        else:
            assert source.url is not None
            try:
                data = await read_object(source.url, f"{where}.url", options, env, MAX_ITEMS_BYTES)
            except ArtifactStoreError as exc:
                raise TaskSpecError(str(exc)) from None
            if source.url.endswith(".parquet"):
                raise TaskSpecError(f"{where}.url: Parquet is read from a local file (file)")
            items = parse_items(_lines(data, f"{where}.url"), f"{where}.url")
    check_items(spec, items)
    return items


async def checked_items(
    taskset: SandboxTaskSet, set_dir: Path, options: StoreOptions, env: dict[str, str]
) -> list[SetItem]:
    """The set's items (load_items), with everything refused that would fail every run
    (check_runnable): what run_batch takes."""
    items = await load_items(taskset, set_dir, options, env)
    check_runnable(taskset, items, set_dir)
    return items


def load_checked_set(
    path: Path, options: StoreOptions, env: dict[str, str]
) -> tuple[SandboxTaskSet, list[SetItem], Path]:
    """A set file, its checked items and the directory its paths are relative to."""
    taskset = load_set_file(path)
    return (taskset, *check_set_file(path, taskset, options, env))


def check_set_file(
    path: Path, taskset: SandboxTaskSet, options: StoreOptions, env: dict[str, str]
) -> tuple[list[SetItem], Path]:
    """The checked items of the set read from `path`, and its directory; errors name the
    file, then the item and field."""
    set_dir = path.resolve().parent
    try:
        items = asyncio.run(checked_items(taskset, set_dir, options, env))
    except TaskSpecError as exc:
        raise TaskSpecError(f"{path}: {exc}") from None
    return items, set_dir


def _lines(data: bytes, where: str) -> list[str]:
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        raise TaskSpecError(f"{where}: not UTF-8 text") from None


def _file_items(path: Path, where: str) -> list[SetItem]:
    if not path.is_file():
        raise TaskSpecError(f"{where}: {path} is not a file")
    if path.suffix == ".parquet":
        return parquet_items(path, f"{where} {path}")
    if path.stat().st_size > MAX_ITEMS_BYTES:
        raise TaskSpecError(f"{where}: {path} is over {MAX_ITEMS_BYTES} bytes")
    return parse_items(_lines(path.read_bytes(), f"{where} {path}"), f"{where} {path}")


def run_name_of(taskset: SandboxTaskSet) -> str:
    """The set's name as a file name (its batch directory's)."""
    return run_name(template_task(taskset), None)


def fingerprint(taskset: SandboxTaskSet, items: list[SetItem]) -> str:
    """What a batch directory's results belong to: the set's spec and items (not its status)."""
    digest = hashlib.sha256()
    digest.update(taskset.spec.model_dump_json(by_alias=True, exclude={"items"}).encode())
    for item in items:
        digest.update(item.model_dump_json(by_alias=True).encode())
    return digest.hexdigest()


class BatchDir:
    """A batch's directory, held for the batch's whole run (a lock: two batches never share one),
    with its results so far."""

    def __init__(self, path: Path, lock: IO[str]) -> None:
        self.path = path
        self._lock = lock
        self._results: IO[str] | None = None

    @classmethod
    def open(cls, path: Path, mark: str, *, resume: bool) -> BatchDir:
        """Take `path` for the batch marked `mark` (its fingerprint): a new or empty directory,
        or with `resume` one that holds this same batch."""
        where = f"--out {path}"
        if path.exists() and not path.is_dir():
            raise TaskSpecError(f"{where}: is a file; give a directory for the batch")
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock = (path / LOCK_FILE).open("a")
        except OSError as exc:
            raise TaskSpecError(f"{where}: cannot write there ({exc.strerror or exc})") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise TaskSpecError(f"{where}: another batch is running in this directory") from None
        opened = cls(path, lock)
        try:
            opened._claim(mark, resume, where)
        except BaseException:
            opened.close()
            raise
        return opened

    def _claim(self, mark: str, resume: bool, where: str) -> None:
        marker = self.path / BATCH_FILE
        others = [p for p in self.path.iterdir() if p.name not in (LOCK_FILE, LOCAL_MODEL_LOG)]
        if marker.is_file():
            if not resume:
                raise TaskSpecError(
                    f"{where}: holds an earlier batch; --resume to finish it, or give a new directory"
                )
            try:
                found = json.loads(marker.read_text()).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                found = None
            if found != mark:
                raise TaskSpecError(
                    f"{where}: its batch ran a different set (spec or items changed); give a new "
                    "directory for this one"
                )
        elif others:
            raise TaskSpecError(f"{where}: the directory is not empty; give a new or empty one")
        else:
            marker.write_text(json.dumps({"fingerprint": mark}) + "\n")

    def finished(self) -> dict[tuple[str, int], BatchRow]:
        """The rows of results.jsonl that count as done, by (id, sample): the last line of each
        wins, and an infrastructure failure is not done (a resumed batch runs it again). A line
        cut short by a crash is skipped."""
        rows: dict[tuple[str, int], BatchRow] = {}
        path = self.path / RESULTS_FILE
        if not path.is_file():
            return rows
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = BatchRow.model_validate_json(line)
            except ValidationError:
                continue
            rows[(row.id, row.sample)] = row
        return {k: r for k, r in rows.items() if is_scored(r.exit_reason)}

    def record(self, row: BatchRow) -> None:
        if self._results is None:
            path = self.path / RESULTS_FILE
            # A line cut short by a crash ends here, so the next one starts on its own.
            if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
                with path.open("a") as tail:
                    tail.write("\n")
            self._results = path.open("a", encoding="utf-8")
        self._results.write(row.model_dump_json(by_alias=True, exclude_none=True) + "\n")
        self._results.flush()

    def run_dir(self, child: Child) -> Path:
        """A new directory for the child's run: a rerun (after a cancel) never reuses one."""
        base = self.path / RUNS_DIR / child.name
        candidate, n = base, 1
        while candidate.exists():
            n += 1
            candidate = base.with_name(f"{child.name}.{n}")
        return candidate

    def close(self) -> None:
        if self._results is not None:
            self._results.close()
        self._lock.close()


@dataclass(frozen=True)
class BatchProgress:
    """How far a batch is: what the progress bar shows."""

    total: int
    done: int
    skipped: int
    failed: int
    infrastructure_failures: int
    accuracy: float | None
    tokens: int
    elapsed_seconds: float

    @property
    def rate(self) -> float:
        """Finished item-samples per second in this run (resumed ones left out)."""
        ran = self.done - self.skipped
        return ran / self.elapsed_seconds if self.elapsed_seconds > 0 and ran > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None


@dataclass(frozen=True)
class BatchOutcome:
    summary: SetSummary
    rows: list[BatchRow]
    out_dir: Path
    parallel: int
    elapsed_seconds: float
    skipped: int


async def concurrently(
    items: Iterable[T], parallel: int, work: Callable[[T], Awaitable[R]]
) -> AsyncIterator[tuple[T, R]]:
    """(item, work(item)) as each finishes, at most `parallel` at once; closing the iterator (or
    cancelling its consumer) cancels the work still running and waits for it to end."""
    pending: set[asyncio.Task[tuple[T, R]]] = set()
    source = iter(items)

    async def one(item: T) -> tuple[T, R]:
        return item, await work(item)

    def refill() -> None:
        for item in source:
            pending.add(asyncio.ensure_future(one(item)))
            if len(pending) >= parallel:
                return

    try:
        refill()
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            pending.difference_update(done)
            for finished in done:
                yield finished.result()
            refill()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


def row_for(child: Child, item: SetItem, outcome: RunOutcome, base: Path) -> BatchRow:
    """The row of a finished run; its paths relative to the batch directory `base` (which can
    be moved or copied whole)."""
    r = outcome.result
    return BatchRow(
        id=child.item_id, sample=child.sample, task=child.name, phase=r.phase,
        exit_reason=r.exit_reason, message=r.message, answer=r.answer, expected=item.expected,
        score=r.score, grader=r.grader, grade_message=r.grade_message, steps=r.steps,
        prompt_tokens=r.usage.prompt_tokens, completion_tokens=r.usage.completion_tokens,
        total_tokens=r.usage.total_tokens, cost_usd=r.usage.cost_usd,
        duration_seconds=r.duration_seconds,
        trajectory=str(outcome.trajectory_path.relative_to(base)),
        run_dir=str(outcome.run_dir.relative_to(base)),
    )  # fmt: skip


def _row_of_error(
    child: Child, item: SetItem, result: TaskResult, run_dir: Path, base: Path
) -> BatchRow:
    return BatchRow(
        id=child.item_id, sample=child.sample, task=child.name, phase=result.phase,
        exit_reason=result.exit_reason, message=result.message, expected=item.expected,
        run_dir=str(run_dir.relative_to(base)),
    )  # fmt: skip


def check_runnable(taskset: SandboxTaskSet, items: list[SetItem], set_dir: Path) -> None:
    """What would fail every run, refused before any: a missing input file, a grader whose
    package is not installed."""
    problems: list[str] = []
    for i, item in enumerate(items):
        task = SandboxTask(spec=child_spec(taskset.spec, item, i))
        problems += [f"items[{i}] ({item.id}): {m}" for m in missing_input_files(task, set_dir)]
    if isinstance(taskset.spec.grader, MathGrader):
        from .math_grading import MATH_EXTRA_HINT, math_verify_installed

        if not math_verify_installed():
            problems.append(f"spec.grader: {MATH_EXTRA_HINT}")
    if problems:
        raise TaskSpecError("\n".join(problems[:20]))


async def run_batch(
    taskset: SandboxTaskSet,
    items: list[SetItem],
    set_dir: Path,
    out_dir: Path,
    opts: RunOptions,
    *,
    parallel: int = DEFAULT_PARALLEL,
    resume: bool = False,
    on_progress: Callable[[BatchProgress], None] = lambda _: None,
    on_row: Callable[[BatchRow], None] = lambda _: None,
) -> BatchOutcome:
    """Run every item-sample not yet finished in `out_dir`, `parallel` at once; each finished one
    is a line of results.jsonl as soon as it ends, and summary.json is written at the end (also
    when interrupted: the summary of what finished). `items` are checked_items'."""
    if parallel < 1:
        raise TaskSpecError(f"--parallel: must be at least 1 (got {parallel})")
    name = taskset.metadata.name or "set"
    samples = taskset.spec.samples_per_item
    every = list(children(name, items, samples))
    directory = BatchDir.open(out_dir, fingerprint(taskset, items), resume=resume)
    started = time.monotonic()
    try:
        done = directory.finished() if resume else {}
        rows = [done[(c.item_id, c.sample)] for c in every if (c.item_id, c.sample) in done]
        todo = [c for c in every if (c.item_id, c.sample) not in done]
        skipped = len(rows)
        progress = _Tally(len(every), skipped, started, rows)
        on_progress(progress.now())

        async def work(child: Child) -> BatchRow:
            return await run_child(taskset, items[child.index], child, set_dir, directory, opts)

        try:
            async for _, row in concurrently(todo, parallel, work):
                if row.exit_reason is ExitReason.CANCELLED:
                    continue
                directory.record(row)
                rows.append(row)
                progress.add(row)
                on_row(row)
                on_progress(progress.now())
        finally:
            summary = summarise([r.sample_result() for r in rows], len(every), samples)
            elapsed = time.monotonic() - started
            write_summary(out_dir, taskset, summary, parallel, elapsed, skipped)
        return BatchOutcome(summary, rows, out_dir, parallel, elapsed, skipped)
    finally:
        directory.close()


async def run_child(
    taskset: SandboxTaskSet,
    item: SetItem,
    child: Child,
    set_dir: Path,
    directory: BatchDir,
    opts: RunOptions,
) -> BatchRow:
    """One item-sample run to an end; a run that cannot start is a row, not an exception (the
    other item-samples go on)."""
    task = SandboxTask(
        metadata=ObjectMeta(name=child.name),
        spec=child_spec(taskset.spec, item, child.index),
    )
    run_dir = directory.run_dir(child)
    child_opts = dataclasses.replace(opts, out_dir=run_dir, overwrite=False, local_model=None)
    try:
        outcome = await run_task(task, set_dir, child_opts)
    except TaskSpecError as exc:
        result = failed(ExitReason.INVALID_SPEC, str(exc))
        return _row_of_error(child, item, result, run_dir, directory.path)
    except (OSError, RuntimeError) as exc:
        message = f"the run could not start: {type(exc).__name__}: {exc}"
        result = failed(ExitReason.SANDBOX_ERROR, message)
        return _row_of_error(child, item, result, run_dir, directory.path)
    return row_for(child, item, outcome, directory.path)


class _Tally:
    """The running counts behind the progress bar."""

    def __init__(self, total: int, skipped: int, started: float, rows: list[BatchRow]) -> None:
        self.total, self.skipped, self.started = total, skipped, started
        self.done = self.failed = self.infra = self.tokens = 0
        self.scores: list[float] = []
        for row in rows:
            self.add(row)

    def add(self, row: BatchRow) -> None:
        self.done += 1
        self.tokens += row.total_tokens
        if row.phase is not Phase.SUCCEEDED:
            self.failed += 1
        if not is_scored(row.exit_reason):
            self.infra += 1
        elif row.score is not None:
            self.scores.append(row.score)

    def now(self) -> BatchProgress:
        accuracy = sum(self.scores) / len(self.scores) if self.scores else None
        return BatchProgress(
            self.total, self.done, self.skipped, self.failed, self.infra, accuracy, self.tokens,
            time.monotonic() - self.started,
        )  # fmt: skip


def write_summary(
    out_dir: Path,
    taskset: SandboxTaskSet,
    summary: SetSummary,
    parallel: int,
    elapsed: float,
    skipped: int,
) -> None:
    data = {
        "set": taskset.metadata.name,
        "items": summary.tasks // taskset.spec.samples_per_item,
        "samplesPerItem": taskset.spec.samples_per_item,
        "grader": taskset.spec.grader.type if taskset.spec.grader else None,
        "parallel": parallel,
        "elapsedSeconds": round(elapsed, 3),
        "resumedFinished": skipped,
        **summary.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    tmp = out_dir / f".{SUMMARY_FILE}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, out_dir / SUMMARY_FILE)
