"""sandboxctl's cluster commands as the command line knows them (the `sandboxctl.commands` entry
point): their parsers, and runners that import cluster_cli.py (the Kubernetes client, aiohttp,
the CRD) only when one of them is run, so that `sandboxctl --help` stays quick."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandbox_agent.cli import Command


def _runs(name: str) -> Command:
    def run(args: argparse.Namespace) -> int:
        from .cluster_cli import COMMANDS

        return COMMANDS[name](args)

    return run


# What the cluster commands import when they run, besides this package: from the operator extra.
NEEDED = ("aiohttp",)


def add_commands(sub: Any) -> dict[str, Command]:
    """The cluster commands' parsers go into `sub`; the returned map runs them. An ImportError
    naming the module when the operator extra is not installed (sandboxctl then shows a hint),
    found without importing it."""
    for module in NEEDED:
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"No module named {module!r}", name=module)
    crd = sub.add_parser("crd", help="print a CustomResourceDefinition (YAML)")
    crd.add_argument(
        "--kind",
        choices=("SandboxTask", "SandboxTaskSet"),
        default="SandboxTask",
        help="which one (default SandboxTask)",
    )

    def cluster(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig's)")
        return p

    submit = cluster("submit", "create a SandboxTask on the cluster from a task file")
    submit.add_argument("task", type=Path, help="the task file (YAML); file: inputs are inlined")
    get = cluster("get", "list SandboxTasks, or show one")
    get.add_argument("name", nargs="?", help="one task to describe (default: list them)")
    get.add_argument(
        "-A", "--all-namespaces", action="store_true", help="list tasks of every namespace"
    )
    get.add_argument(
        "-o", "--output", choices=["table", "json"], default="table", help="table (default) or json"
    )
    wait = cluster("wait", "wait until a task ends; print its result; exit 0 only on success")
    wait.add_argument("name", help="the task to wait for")
    wait.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds to wait (default 3600; exit 3)"
    )
    wait.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    logs = cluster("logs", "print the log of a task's pod")
    logs.add_argument("name", help="the task whose pod's log to print")
    logs.add_argument(
        "-c",
        "--container",
        choices=["agent", "sandbox"],
        default="agent",
        help="agent (default: the run, ending with its result line) or sandbox (the exec server)",
    )
    logs.add_argument("--tail", type=int, default=1000, help="last lines to print (default 1000)")
    arts = cluster(
        "artifacts", "fetch a task's result, trajectory and output files from the artifact store"
    )
    arts.add_argument("name", nargs="?", help="the task (where its status.artifactsURL points)")
    arts.add_argument(
        "-o",
        "--output-dir",
        type=Path,
        help="where to put them (default: ./NAME, or the URL's last part); must be new or empty",
    )
    from sandbox_agent.cli import add_store_arguments

    add_store_arguments(
        arts,
        "the store is read with this machine's credentials",
        "--url",
        "fetch this prefix instead of a task's (any run: s3://BUCKET/.../TASK/ATTEMPT, file:///...)",
    )
    commands = ("crd", "submit", "get", "wait", "logs", "artifacts")
    return {name: _runs(name) for name in commands}
