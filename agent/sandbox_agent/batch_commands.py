"""`sandboxctl batch`: a SandboxTaskSet run on this machine, with a progress bar and a summary
table. Imported by cli.py only when it runs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from .api import local_set_context, served_model, set_for_local_model
from .artifacts import attempt_id
from .batch import BatchOutcome, load_checked_set, run_batch, run_name_of
from .batch_display import ProgressBar, summary_table
from .cli import EXIT_OK, EXIT_TASK_FAILED
from .display import for_terminal
from .errors import TaskSpecError
from .local_commands import (
    ProgressPrinter,
    TerminatedError,
    run_options_from,
    until_signalled,
    with_local_model,
)
from .procenv import hide_from_environ
from .runner import RunOptions, local_model_wanted
from .taskset import SandboxTaskSet, SetItem, template_task

BATCHES_DIR = "sandboxctl-batches"


def batch(args: argparse.Namespace) -> int:
    hide_from_environ("OPENAI_API_KEY")
    if args.parallel < 1:
        raise TaskSpecError(f"--parallel: must be at least 1 (got {args.parallel})")
    if args.resume and args.out is None:
        raise TaskSpecError("--resume: give the batch's directory with --out DIR")
    opts = run_options_from(args)
    # Everything that can be refused is, before a model is pulled or a sandbox started.
    taskset, items, set_dir = load_checked_set(args.taskset, opts.store_options, opts.env)
    out = args.out or Path(BATCHES_DIR) / f"{run_name_of(taskset)}-{attempt_id()}"
    notes = ProgressPrinter(sys.stderr, quiet=args.quiet)
    probe = template_task(taskset)
    wanted = local_model_wanted(probe, opts)
    if wanted is not None and not with_local_model(probe, opts, wanted, notes):
        return EXIT_TASK_FAILED
    bar = ProgressBar(sys.stderr, quiet=args.quiet)
    if not args.quiet:
        print(f"batch: {out}", file=sys.stderr)
    try:
        outcome = asyncio.run(until_signalled(_run(taskset, items, set_dir, args, out, opts, bar)))
    except (KeyboardInterrupt, TerminatedError) as stop:
        bar.end()
        signum = stop.signum if isinstance(stop, TerminatedError) else signal.SIGINT
        print(
            f"sandboxctl batch: stopped by {signal.Signals(signum).name}; finished item-samples "
            f"are in {out / 'results.jsonl'}: sandboxctl batch {args.taskset} --out {out} "
            "--resume goes on",
            file=sys.stderr,
        )
        return 128 + signum
    bar.end()
    if args.json:
        print((out / "summary.json").read_text(), end="")
    else:
        print(for_terminal(summary_table(outcome)))
    return EXIT_TASK_FAILED if outcome.summary.infrastructure_failures else EXIT_OK


async def _run(
    taskset: SandboxTaskSet,
    items: list[SetItem],
    set_dir: Path,
    args: argparse.Namespace,
    out: Path,
    opts: RunOptions,
    bar: ProgressBar,
) -> BatchOutcome:
    async with _endpoint(taskset, opts, out) as (ready_set, ready_opts):
        return await run_batch(
            ready_set, items, set_dir, out, ready_opts,
            parallel=args.parallel, resume=args.resume, on_progress=bar,
        )  # fmt: skip


@contextlib.asynccontextmanager
async def _endpoint(
    taskset: SandboxTaskSet, opts: RunOptions, out: Path
) -> AsyncIterator[tuple[SandboxTaskSet, RunOptions]]:
    """The options every run uses: as given, or pointing at the built-in model, served once for
    the whole batch."""
    local = opts.local_model
    if local is None:
        yield taskset, opts
        return
    print(
        for_terminal(f"note: one {local.model.name} server answers every run of the batch"),
        file=sys.stderr,
    )
    async with served_model(
        local.model, local.file, opts, out, local_set_context(taskset)
    ) as served:
        yield set_for_local_model(taskset, local.model), served
