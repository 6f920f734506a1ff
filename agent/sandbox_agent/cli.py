"""`sandboxctl`: run a SandboxTask locally; with the operator installed, talk to it on a cluster.

`run`, `validate` and `batch` are this package's (local_commands.py, batch_commands.py); other commands come from the
`sandboxctl.commands` entry point group (the operator's cluster commands:
`pip install 'llm-sandbox-operator[operator]'`), loaded only when a command other than these
is asked for. This module imports only what parsing needs, so that `sandboxctl --help` starts
in a blink: each command imports its own modules when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__
from .backend_names import BACKEND_NAMES
from .display import for_terminal
from .errors import BackendUnavailableError, TaskSpecError
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
    run.add_argument(
        "--model",
        help="model name (overrides OPENAI_MODEL and the task); with no endpoint configured, a "
        "name from `sandboxctl model list` picks the local model",
    )
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
    run.add_argument(
        "--max-steps",
        type=int,
        metavar="N",
        help="at most N model replies (overrides spec.limits.maxSteps)",
    )
    run.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    run.add_argument(
        "--allow-host-network",
        action="store_true",
        help="let a task with network mode internet use this machine's network (which reaches "
        "its loopback, local network and cloud metadata, unlike on a cluster)",
    )

    add_store_arguments(
        run,
        "keep the result, trajectory (step by step as the run goes) and output files in a store "
        "too, under URL/local/NAME/ATTEMPT/",
        "--artifacts-url",
        "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX or file:///DIR",
    )

    add_batch_parser(sub)

    validate = sub.add_parser(
        "validate",
        help="check a task file and print the parsed spec (or a set file and its items)",
    )
    validate.add_argument("task", type=Path, help="the task or set file (YAML)")
    from .model_commands import add_parser as add_model_parser

    add_model_parser(sub)
    return parser, sub


BATCH_EXIT_CODES = """exit codes:
  0    every item-sample finished (right or wrong: see accuracy)
  1    some failed for infrastructure reasons (--resume runs them again), or an unexpected error
  2    a bad set file, item, command line or output directory
  130  stopped by Ctrl-C (finished item-samples are kept: --resume goes on from there)
  143  stopped by SIGTERM (as for Ctrl-C)"""


def add_batch_parser(sub: Any) -> None:
    batch = sub.add_parser(
        "batch",
        help="run a SandboxTaskSet on this machine, N local sandboxes at once",
        description=(
            "Run every item-sample of a SandboxTaskSet in local sandboxes, N at once: a progress "
            "bar, DIR/results.jsonl (one line per finished item-sample), DIR/summary.json and a "
            "summary table. The endpoint is chosen as for `sandboxctl run`."
        ),
        epilog=BATCH_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    batch.add_argument("taskset", type=Path, help="the set file (YAML, kind SandboxTaskSet)")
    batch.add_argument(
        "--parallel", "-j", type=int, default=8, metavar="N",
        help="run N item-samples at once (default 8)",
    )  # fmt: skip
    batch.add_argument(
        "--out",
        type=Path,
        help="the batch directory (default: a new one under sandboxctl-batches/); an existing "
        "batch there is refused without --resume",
    )
    batch.add_argument(
        "--resume",
        action="store_true",
        help="finish the batch in --out: what finished is kept, the rest (and what failed for "
        "infrastructure reasons) runs",
    )
    batch.add_argument("--backend", choices=BACKEND_NAMES, default="auto", help="as for run")
    batch.add_argument("--model", help="model name (overrides OPENAI_MODEL and the template)")
    batch.add_argument("--base-url", help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    batch.add_argument("--image", help="the sandbox image for the docker backend")
    batch.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    batch.add_argument("--json", action="store_true", help="print summary.json on stdout")
    batch.add_argument(
        "--allow-host-network",
        action="store_true",
        help="let a template with network mode internet use this machine's network",
    )
    add_store_arguments(
        batch,
        "how an itemsFrom.url is read and, with --artifacts-url, where each run is kept too",
        "--artifacts-url",
        "also keep each run in this store, under URL/local/TASK/ATTEMPT/ (as for run)",
    )


def add_store_arguments(
    parser: argparse.ArgumentParser, what: str, url_flag: str, url_help: str
) -> None:
    """The store's URL and how to reach it, for `run` and `artifacts` alike (StoreOptions)."""
    store = parser.add_argument_group(
        "artifact store",
        f"{what}; S3 credentials, endpoint, region and profile come from the environment as for "
        "the AWS CLI (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION, "
        "AWS_PROFILE), overridden by these flags",
    )
    store.add_argument(url_flag, metavar="URL", help=url_help)
    store.add_argument(
        "--artifacts-endpoint", metavar="URL", help="an S3-compatible endpoint (MinIO, Ceph RGW)"
    )
    store.add_argument("--artifacts-region", metavar="REGION", help="the S3 region")
    store.add_argument(
        "--artifacts-path-style",
        action="store_true",
        help="path-style S3 requests (ENDPOINT/BUCKET/KEY), as most S3-compatible stores need",
    )
    store.add_argument("--artifacts-profile", metavar="NAME", help="an AWS profile (needs boto3)")


def _cmd_run(args: argparse.Namespace) -> int:
    from .local_commands import run

    return run(args)


def _cmd_validate(args: argparse.Namespace) -> int:
    from .local_commands import validate

    return validate(args)


def _cmd_batch(args: argparse.Namespace) -> int:
    from .batch_commands import batch

    return batch(args)


def _cmd_model(args: argparse.Namespace) -> int:
    from .model_commands import run

    return run(args)


LOCAL_COMMANDS: dict[str, Command] = {
    "run": _cmd_run,
    "validate": _cmd_validate,
    "batch": _cmd_batch,
    "model": _cmd_model,
}


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
            import traceback

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
            # A plugin says it cannot work here by an ImportError, when loaded or when adding.
            commands.update(point.load()(sub))
        except ImportError as exc:
            missing.append(f"{point.name}: {exc.name or exc} is not installed")
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
