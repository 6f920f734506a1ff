"""The local commands, `sandboxctl run` and `sandboxctl validate`, and how a run is shown: its
progress as one line per event, its result as a status block. Imported by cli.py only when one of
them runs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from .cli import EXIT_OK, EXIT_TASK_FAILED
from .display import for_terminal
from .errors import TaskSpecError
from .events import (
    EndpointChosen,
    Event,
    LLMReplied,
    LLMRetrying,
    Notice,
    StepStarted,
    ToolCallFinished,
    ToolCallStarted,
)
from .task import SandboxTask, format_validation_error
from .taskfile import load_task_file, missing_input_files, task_from_prompt

if TYPE_CHECKING:
    from .models import KnownModel
    from .result import TaskResult
    from .runner import RunOptions, RunOutcome

T = TypeVar("T")


class ProgressPrinter:
    """Renders loop events as one line each on stderr: the step, the command, tokens so far."""

    def __init__(self, stream: TextIO, quiet: bool = False) -> None:
        self.stream = stream
        self.quiet = quiet

    def __call__(self, event: Event) -> None:
        if self.quiet:
            return
        line = self.render(event)
        if line:
            print(for_terminal(line), file=self.stream, flush=True)

    @staticmethod
    def render(event: Event) -> str:
        if isinstance(event, StepStarted):
            return f"[step {event.step}/{event.max_steps}] tokens so far: {event.total_tokens}"
        if isinstance(event, LLMReplied):
            return (
                f"  model replied in {event.seconds:.1f}s "
                f"({event.prompt_tokens} prompt + {event.completion_tokens} completion tokens)"
            )
        if isinstance(event, ToolCallStarted):
            prefix = "$ " if event.tool == "execute_bash" else f"{event.tool}: "
            return f"  {prefix}{event.summary}"
        if isinstance(event, ToolCallFinished):
            return f"    -> {event.summary}" if event.tool == "execute_bash" else ""
        if isinstance(event, LLMRetrying):
            return f"  retry {event.attempt} in {event.delay_seconds:.1f}s: {event.reason}"
        if isinstance(event, Notice):
            return f"  note: {event.message}"
        if isinstance(event, EndpointChosen):
            line = f"endpoint: {event.base_url}  model: {event.model}"
            if event.local:
                line += "  (the local model, stopped when the run ends)"
            elif event.default:
                line += "  (no base URL given: --base-url, OPENAI_BASE_URL or spec.model.baseURL)"
            return line
        return ""


def counted(n: int, one: str, many: str | None = None) -> str:
    """`1 call`, `2 calls`, `0 retries`."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def outputs_line(output_dir: Path, files: int) -> str:
    """Where the outputs are, or that there are none (no folder is named that does not exist)."""
    if files == 0 and not output_dir.is_dir():
        return "(none)"
    return f"{output_dir} ({counted(files, 'file')})"


def status_block(outcome: RunOutcome) -> str:
    r: TaskResult = outcome.result
    u = r.usage
    lines = [
        f"phase:       {r.phase}",
        f"exitReason:  {r.exit_reason}",
    ]
    if r.message:
        lines.append(f"message:     {r.message}")
    answer = "(none)" if r.answer is None else r.answer
    if "\n" in answer:
        answer = "\n" + "\n".join(f"  {line}" for line in answer.splitlines())
    lines += [
        f"answer:      {answer}",
        f"steps:       {r.steps}",
        f"usage:       {u.prompt_tokens} prompt + {u.completion_tokens} completion = "
        f"{u.total_tokens} tokens in {counted(u.llm_calls, 'call')} "
        f"({counted(u.llm_retries, 'retry', 'retries')})",
        f"duration:    {r.duration_seconds:.1f}s on the {outcome.backend} backend",
        f"trajectory:  {outcome.trajectory_path}",
        f"outputs:     {outputs_line(outcome.output_dir, len(r.outputs))}",
    ]
    # The answer and the message are the sandbox's words.
    return for_terminal("\n".join(lines))


def _load(args: argparse.Namespace) -> tuple[SandboxTask, Path, Path | None]:
    if args.task is not None and args.prompt is not None:
        raise TaskSpecError("give a task file or --prompt, not both")
    if args.prompt is not None:
        try:
            return task_from_prompt(args.prompt), Path.cwd(), None
        except ValueError as exc:
            from pydantic import ValidationError

            if isinstance(exc, ValidationError):
                raise TaskSpecError(format_validation_error(exc, "--prompt")) from None
            raise
    if args.task is None:
        raise TaskSpecError("give a task file, or --prompt TEXT")
    return load_task_file(args.task), args.task.resolve().parent, args.task


def run(args: argparse.Namespace) -> int:
    from .local_model import LocalModelError
    from .procenv import hide_from_environ
    from .result import Phase
    from .runner import local_model_wanted, plan_run, run_task

    # The process backend's commands run as this user and could read the key from
    # /proc/PID/environ (`ps e`); os.environ, which the run reads, keeps it.
    hide_from_environ("OPENAI_API_KEY")
    task, task_dir, task_file = _load(args)
    if args.max_steps is not None:
        task = with_max_steps(task, args.max_steps)
    opts = dataclasses.replace(run_options_from(args), out_dir=args.out, overwrite=args.overwrite)
    progress = ProgressPrinter(sys.stderr, quiet=args.quiet)
    wanted = local_model_wanted(task, opts)
    # Everything that can be refused is, before a model is pulled.
    out_existed = opts.out_dir is not None and opts.out_dir.exists()
    plan = plan_run(task, task_dir, opts, task_file, local=wanted is not None)
    if wanted is not None:
        try:
            pulled = with_local_model(task, opts, wanted, progress)
        finally:
            if opts.local_model is None and not out_existed:
                # Made by the plan and still empty (with sandboxctl-runs/ when that is too).
                made = [plan.run_dir] + ([plan.run_dir.parent] if opts.out_dir is None else [])
                remove_if_empty(made)
        if not pulled:
            return EXIT_TASK_FAILED
    try:
        outcome = asyncio.run(
            until_signalled(run_task(task, task_dir, opts, progress, task_file, plan))
        )
    except LocalModelError as exc:
        print(for_terminal(f"sandboxctl run: {exc}"), file=sys.stderr)
        return EXIT_TASK_FAILED
    except TerminatedError as stop:
        name = signal.Signals(stop.signum).name
        print(
            f"sandboxctl: stopped by {name}; the sandbox was removed and result.json written",
            file=sys.stderr,
        )
        return 128 + stop.signum
    if args.json:
        print(
            json.dumps(
                {
                    "result": outcome.result.model_dump(mode="json", by_alias=True),
                    "trajectory": str(outcome.trajectory_path),
                    "outputDir": str(outcome.output_dir),
                    "backend": outcome.backend,
                }
            )
        )
    else:
        print(status_block(outcome))
    return EXIT_OK if outcome.result.phase is Phase.SUCCEEDED else EXIT_TASK_FAILED


def run_options_from(args: argparse.Namespace) -> RunOptions:
    """The options `run` and `batch` share: backend, endpoint, image, network and store flags."""
    from .artifacts import store_options_from
    from .runner import RunOptions

    return RunOptions(
        backend=args.backend,
        model=args.model,
        base_url=args.base_url,
        image=args.image,
        allow_host_network=args.allow_host_network,
        artifacts_url=args.artifacts_url,
        store_options=store_options_from(args),
    )


def remove_if_empty(directories: list[Path]) -> None:
    for directory in directories:
        with contextlib.suppress(OSError):
            directory.rmdir()  # only an empty one goes


def with_max_steps(task: SandboxTask, steps: int) -> SandboxTask:
    """The task with spec.limits.maxSteps replaced, checked as the task file's is."""
    from pydantic import ValidationError

    from .task import Limits

    try:
        limits = Limits.model_validate(
            {**task.spec.limits.model_dump(by_alias=True), "maxSteps": steps}
        )
    except ValidationError as exc:
        raise TaskSpecError(f"--max-steps: {exc.errors()[0]['msg']}") from None
    return task.model_copy(update={"spec": task.spec.model_copy(update={"limits": limits})})


def with_local_model(
    task: SandboxTask, opts: RunOptions, model: KnownModel, progress: ProgressPrinter
) -> bool:
    """No endpoint is configured: say so, pull `model` (with progress) and set
    opts.local_model; False when it cannot be had (the reason printed)."""
    from .local_model import LOCAL_EXTRA_HINT, xllamacpp_installed
    from .model_commands import ProgressLine, pull
    from .models import ModelCache, cache_dir
    from .runner import LocalModel, local_model_note

    progress(Notice(local_model_note(task, opts, model)))
    if not xllamacpp_installed():
        raise TaskSpecError(
            f"{LOCAL_EXTRA_HINT}, or give an endpoint (--base-url URL, or OPENAI_BASE_URL)"
        )
    cache = ModelCache(cache_dir(opts.env))
    found = pull(cache, model, None, "run", ProgressLine(sys.stderr, quiet=progress.quiet))
    if found is None:
        return False
    opts.local_model = LocalModel(model, found)
    return True


class TerminatedError(Exception):
    """The run was stopped by SIGTERM or SIGHUP (what `timeout`, CI and process managers send)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


async def until_signalled(work: Coroutine[Any, Any, T]) -> T:
    """Await `work`; SIGTERM or SIGHUP cancel it as Ctrl-C does (the runner then stops the
    sandbox, removes its state and writes result.json as cancelled) and raise TerminatedError."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    received: list[int] = []

    def stop(signum: int) -> None:
        if not received:
            received.append(signum)
            me.cancel()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await work
    except asyncio.CancelledError:
        if received:
            raise TerminatedError(received[0]) from None
        raise
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def validate(args: argparse.Namespace) -> int:
    from .task import parse_task
    from .taskfile import parse_read, read_document

    document = read_document(args.task, "task")
    if isinstance(document, dict) and document.get("kind") == "SandboxTaskSet":
        return validate_set(args.task, document)
    task = parse_read(args.task, document, parse_task, "SandboxTask")
    missing = missing_input_files(task, args.task.resolve().parent)
    if missing:
        raise TaskSpecError(f"{args.task}: " + "; ".join(missing))
    print(json.dumps(task.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2))
    return EXIT_OK


def validate_set(path: Path, document: object) -> int:
    """A set file (read as `document`) checked as `sandboxctl batch` checks it (its items read,
    every item-sample's task built); one line of counts on success."""
    from .batch import check_set_file
    from .runner import RunOptions
    from .taskfile import parse_read
    from .taskset import parse_set

    opts = RunOptions()
    taskset = parse_read(path, document, parse_set, "SandboxTaskSet")
    items, _ = check_set_file(path, taskset, opts.store_options, opts.env)
    samples = taskset.spec.samples_per_item
    grader = taskset.spec.grader.type if taskset.spec.grader else "none"
    print(
        f"{path}: SandboxTaskSet {taskset.metadata.name or '(unnamed)'}: {len(items)} items x "
        f"{samples} samples = {len(items) * samples} tasks, grader {grader}"
    )
    return EXIT_OK
