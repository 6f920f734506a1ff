"""The Python API for eval and RL code, on this machine: run one task, many tasks N at a time, or
a whole SandboxTaskSet into a batch directory. `sandboxctl run` and `sandboxctl batch` are built
on the same functions. (On a cluster: sandbox_operator.client.)"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

from .batch import (
    DEFAULT_PARALLEL,
    BatchOutcome,
    BatchProgress,
    BatchRow,
    checked_items,
    concurrently,
    load_set_file,
    run_batch,
)
from .errors import TaskSpecError
from .local_model import LocalModelServer
from .models import KnownModel
from .runner import (
    LOCAL_MODEL_LOG,
    RunOptions,
    RunOutcome,
    local_context,
    run_name,
    run_task,
    start_local_model,
)
from .task import SandboxTask, SandboxTaskSpec, ToolCallFormat, parse_task
from .taskset import SandboxTaskSet, template_task


def as_task(task: SandboxTask | SandboxTaskSpec | dict[str, object] | str) -> SandboxTask:
    """A task from what a caller has: the model, a spec, a decoded task document, or a prompt."""
    if isinstance(task, SandboxTask):
        return task
    if isinstance(task, SandboxTaskSpec):
        return SandboxTask(spec=task)
    if isinstance(task, str):
        return SandboxTask(spec=SandboxTaskSpec(prompt=task))
    return parse_task(task)


async def run(
    task: SandboxTask | SandboxTaskSpec | dict[str, object] | str,
    options: RunOptions | None = None,
    *,
    task_dir: Path | None = None,
) -> RunOutcome:
    """Run one task to an end in a local sandbox: `outcome.result` (phase, answer, score, usage),
    `outcome.trajectory_path`. The endpoint comes from `options` (base_url, model, api_key), else
    OPENAI_BASE_URL / OPENAI_API_KEY / OPENAI_MODEL, else the task. TaskSpecError when the task or
    the options are refused (the message names the field)."""
    opts = options or RunOptions()
    return await run_task(as_task(task), task_dir or Path.cwd(), opts)


async def run_many(
    tasks: Iterable[SandboxTask | SandboxTaskSpec | dict[str, object] | str],
    options: RunOptions | None = None,
    *,
    parallel: int = DEFAULT_PARALLEL,
    task_dir: Path | None = None,
) -> AsyncIterator[tuple[int, RunOutcome]]:
    """Run the tasks `parallel` at once; yields (index, outcome) as each finishes. With
    options.out_dir each run gets its own directory below it (INDEX-NAME). Breaking out of the
    loop cancels the runs still going (each still writes its result.json)."""
    if parallel < 1:
        raise TaskSpecError(f"parallel: must be at least 1 (got {parallel})")
    opts = options or RunOptions()
    base = opts.out_dir
    where = task_dir or Path.cwd()
    indexed = [(i, as_task(t)) for i, t in enumerate(tasks)]

    async def one(pair: tuple[int, SandboxTask]) -> RunOutcome:
        i, task = pair
        out = base / f"{i:05d}-{run_name(task, None)}" if base is not None else None
        return await run_task(task, where, dataclasses.replace(opts, out_dir=out))

    async for (i, _), outcome in concurrently(indexed, parallel, one):
        yield i, outcome


async def run_set(
    taskset: SandboxTaskSet | Path,
    out_dir: Path,
    options: RunOptions | None = None,
    *,
    parallel: int = DEFAULT_PARALLEL,
    resume: bool = False,
    on_row: Callable[[BatchRow], None] = lambda _: None,
    on_progress: Callable[[BatchProgress], None] = lambda _: None,
) -> BatchOutcome:
    """Run a SandboxTaskSet (a model, or the path of its file) into `out_dir`: results.jsonl,
    summary.json and a run directory per item-sample. `resume` finishes an interrupted batch in
    the same directory. `on_row` gets each finished item-sample as it ends."""
    opts = options or RunOptions()
    if isinstance(taskset, Path):
        set_dir = taskset.resolve().parent
        taskset = load_set_file(taskset)
    else:
        set_dir = Path.cwd()
    items = await checked_items(taskset, set_dir, opts.store_options, opts.env)
    return await run_batch(
        taskset, items, set_dir, out_dir, opts,
        parallel=parallel, resume=resume, on_progress=on_progress, on_row=on_row,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def served_model(
    model: KnownModel, file: Path, opts: RunOptions, log_dir: Path, context: int
) -> AsyncIterator[RunOptions]:
    """The built-in model served once on 127.0.0.1 for many runs: the options that point at it
    (a key of its own, so a sandbox that shares the host's network cannot use it)."""
    key = secrets.token_urlsafe(32)
    log_dir.mkdir(parents=True, exist_ok=True)
    server = LocalModelServer(
        file, model.name, log_path=log_dir / LOCAL_MODEL_LOG, context=context, api_key=key
    )
    url = await start_local_model(server)
    try:
        yield dataclasses.replace(
            opts, base_url=url, api_key=key, model=model.name, local_model=None
        )
    finally:
        server.stop()


def set_for_local_model(taskset: SandboxTaskSet, model: KnownModel) -> SandboxTaskSet:
    """The set as the built-in model runs it: its template in the model's measured tool-call
    format unless the template names one (as for_local_model does for one task)."""
    template = taskset.spec.template
    if "tool_call_format" in template.model.model_fields_set:
        return taskset
    fmt = ToolCallFormat(model.tool_call_format)
    template = template.model_copy(
        update={"model": template.model.model_copy(update={"tool_call_format": fmt})}
    )
    return taskset.model_copy(
        update={"spec": taskset.spec.model_copy(update={"template": template})}
    )


def local_set_context(taskset: SandboxTaskSet) -> int:
    """The local server's context for the set's tasks (local_context of its template)."""
    return local_context(template_task(taskset))


__all__ = ["RunOptions", "RunOutcome", "run", "run_many", "run_set"]
