"""`sandboxctl`: run a SandboxTask locally; with the operator installed, talk to it on a cluster.

`run` and `validate` are this package's; other commands come from the `sandboxctl.commands`
entry point group (the operator's cluster commands: `pip install 'llm-sandbox-operator[operator]'`),
loaded only when a command other than these two is asked for, to keep `sandboxctl run` quick.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO, TypeVar

from . import __version__
from .backends import BACKEND_NAMES
from .display import for_terminal
from .errors import BackendUnavailableError, TaskSpecError
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
from .procenv import hide_from_environ
from .result import Phase, TaskResult
from .runner import RunOptions, RunOutcome, missing_input_files, run_task
from .task import SandboxTask, format_validation_error
from .taskfile import load_task_file, task_from_prompt
from .wire import DEFAULT_SANDBOX_IMAGE

EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEBUG_FLAG = "--debug"
RUN_EXIT_CODES = """exit codes:
  0    the task succeeded (the model submitted an answer)
  1    the task ran and failed (see exitReason), or an unexpected error
  2    a bad task file, command line or output directory
  129  stopped by SIGHUP (result.json says cancelled, as for the two below)
  130  stopped by Ctrl-C
  143  stopped by SIGTERM"""
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
            if event.default:
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


Command = Callable[[argparse.Namespace], int]


def build_parser() -> tuple[argparse.ArgumentParser, Any]:
    """The parser with the local commands; the operator package adds the cluster ones."""
    parser = argparse.ArgumentParser(
        prog="sandboxctl", description="Run LLM-in-Sandbox tasks locally or on Kubernetes."
    )
    parser.add_argument("--version", action="version", version=f"sandboxctl {__version__}")
    parser.add_argument(
        DEBUG_FLAG,
        action="store_true",
        help="show the traceback of an unexpected error (anywhere on the command line)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a SandboxTask on this machine in a local sandbox",
        description=(
            "Run a SandboxTask on this machine. The endpoint comes from the flags, else "
            "OPENAI_BASE_URL / OPENAI_API_KEY / OPENAI_MODEL, else the task file."
        ),
        epilog=RUN_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("task", nargs="?", type=Path, help="the task file (YAML)")
    run.add_argument("--prompt", help="run this prompt with default limits instead of a file")
    run.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        default="auto",
        help="where the sandbox runs: bwrap (bubblewrap), docker, or process (no isolation); "
        "auto (the default) is bwrap if installed, else Docker if reachable",
    )
    run.add_argument("--model", help="model name (overrides OPENAI_MODEL and the task)")
    run.add_argument("--base-url", help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    run.add_argument(
        "--image",
        help="the sandbox image for the docker backend, instead of spec.sandbox.image "
        f"(default {DEFAULT_SANDBOX_IMAGE})",
    )
    run.add_argument(
        "--out",
        type=Path,
        help="directory for result, trajectory and outputs (default: a new one under "
        "sandboxctl-runs/); an existing non-empty one is refused without --overwrite",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the result, trajectory and outputs of an earlier run in --out",
    )
    run.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    run.add_argument(
        "--allow-host-network",
        action="store_true",
        help="let a task with network mode internet use this machine's network (which reaches "
        "its loopback, local network and cloud metadata, unlike on a cluster)",
    )

    validate = sub.add_parser("validate", help="check a task file and print the parsed spec")
    validate.add_argument("task", type=Path, help="the task file (YAML)")
    return parser, sub


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


def _cmd_run(args: argparse.Namespace) -> int:
    # The process backend's commands run as this user and could read the key from
    # /proc/PID/environ (`ps e`); os.environ, which the run reads, keeps it.
    hide_from_environ("OPENAI_API_KEY")
    task, task_dir, task_file = _load(args)
    opts = RunOptions(
        backend=args.backend,
        model=args.model,
        base_url=args.base_url,
        image=args.image,
        out_dir=args.out,
        overwrite=args.overwrite,
        allow_host_network=args.allow_host_network,
    )
    progress = ProgressPrinter(sys.stderr, quiet=args.quiet)
    try:
        outcome = asyncio.run(until_signalled(run_task(task, task_dir, opts, progress, task_file)))
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


def _cmd_validate(args: argparse.Namespace) -> int:
    task = load_task_file(args.task)
    missing = missing_input_files(task, args.task.resolve().parent)
    if missing:
        raise TaskSpecError(f"{args.task}: " + "; ".join(missing))
    print(json.dumps(task.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2))
    return EXIT_OK


LOCAL_COMMANDS: dict[str, Command] = {"run": _cmd_run, "validate": _cmd_validate}


def dispatch(args: argparse.Namespace, commands: dict[str, Command], debug: bool = False) -> int:
    """Run one command; user errors become a message naming the command and exit code 2, and
    anything unexpected one line (exit 1) unless `debug` asks for the traceback."""
    try:
        return commands[args.command](args)
    except (TaskSpecError, BackendUnavailableError) as exc:
        print(for_terminal(f"sandboxctl {args.command}: {exc}"), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sandboxctl: interrupted; the sandbox was removed", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            traceback.print_exc()
        else:
            detail = str(exc).splitlines()[0] if str(exc) else ""
            print(
                for_terminal(
                    f"sandboxctl {args.command}: unexpected error: {type(exc).__name__}"
                    f"{': ' + detail if detail else ''} (run with {DEBUG_FLAG} for the traceback)"
                ),
                file=sys.stderr,
            )
        return EXIT_TASK_FAILED


PLUGIN_GROUP = "sandboxctl.commands"
CLUSTER_HINT = (
    "cluster commands (submit, get, wait, logs, crd) come with the operator: "
    "pip install 'llm-sandbox-operator[operator]'"
)


def add_plugin_commands(sub: Any) -> tuple[dict[str, Command], list[str]]:
    """The commands of every installed `sandboxctl.commands` plugin, and a line for each plugin
    that could not be loaded (its extra is not installed)."""
    from importlib.metadata import entry_points

    commands: dict[str, Command] = {}
    missing: list[str] = []
    for point in entry_points(group=PLUGIN_GROUP):
        try:
            add = point.load()
        except ImportError as exc:
            missing.append(f"{point.name}: {exc.name or exc} is not installed")
            continue
        commands.update(add(sub))
    return commands, missing


def _command_word(argv: list[str]) -> str | None:
    words = [a for a in argv if not a.startswith("-")]
    return words[0] if words else None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # --debug is taken anywhere on the line, before or after the command.
    debug = DEBUG_FLAG in args
    args = [a for a in args if a != DEBUG_FLAG]
    parser, sub = build_parser()
    commands = dict(LOCAL_COMMANDS)
    word = _command_word(args)
    if word not in LOCAL_COMMANDS:
        plugins, missing = add_plugin_commands(sub)
        commands.update(plugins)
        if missing:
            hint = f"{CLUSTER_HINT} ({'; '.join(missing)})"
            parser.epilog = hint
            if word is not None and word not in commands:
                print(f"sandboxctl: no command {word!r} here; {hint}", file=sys.stderr)
                return EXIT_USAGE
    return dispatch(parser.parse_args(args), commands, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
