"""The agent container's entry point: `install` (init container) and `run` (the agent itself).

`install` copies the exec server into a shared volume for the sandbox container and writes the
shared token; `run` waits for the exec server, runs the loop, and reports the result through the
termination message (and, when that is too small, the last log line).

The token, the exec server's socket and its ready file live in `private/` under the run
directory: made by `install` as the agent's uid, mode 0700. The exec server drops to that same
uid to use it; the model's commands, which run as another uid, cannot enter it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from .backends.base import ExecEndpoint, execd_source
from .errors import SandboxError
from .events import Event, LLMRetrying, Notice
from .execclient import ExecClient
from .execd_cmdline import READY_FILE, SOCKET_FILE, TOKEN_FILE, Ids, RunDirFiles, execd_cmdline
from .llm import ChatLLM
from .loop import AgentLoop, AgentSettings
from .outputs import KEEP_FILE, with_outputs
from .podconfig import PodTaskConfig
from .procenv import hide_from_environ
from .result import (
    RESULT_LOG_PREFIX,
    ExitReason,
    TaskResult,
    phase_for,
    termination_message,
)
from .task import format_validation_error
from .trajectory import Trajectory
from .wire import OUTPUT_DIR, WORKSPACE

# How long the sandbox container may take to start its exec server (image pull is already done).
EXECD_READY_TIMEOUT = 120.0


PRIVATE_DIR = "private"


def private_dir(run_dir: Path) -> Path:
    """Where the exec server's token, socket and ready file are, below the shared run volume."""
    return run_dir / PRIVATE_DIR


def execd_command(
    execd: str,
    run_dir: str,
    workspace: str = WORKSPACE,
    users: tuple[Ids, Ids] | None = None,
) -> list[str]:
    """The sandbox container's command: the exec server on the private run directory.

    `users` is (server, commands): the container then starts as root, the server drops to the
    first (the agent's uid, which owns private/) and runs commands as the second."""
    server, commands = users if users is not None else (None, None)
    files = RunDirFiles(f"{run_dir}/{PRIVATE_DIR}")
    return execd_cmdline([execd], workspace, files, drop_to=server, command_user=commands)


def install(execd_dir: Path, run_dir: Path) -> None:
    execd_dir.mkdir(parents=True, exist_ok=True)
    target = execd_dir / "execd.py"
    shutil.copyfile(execd_source(), target)
    target.chmod(0o644)
    run_dir.mkdir(parents=True, exist_ok=True)
    private = private_dir(run_dir)
    private.mkdir(mode=0o700, exist_ok=True)
    # mkdir's mode is cut by the umask; and a directory left by an earlier run must be ours too.
    private.chmod(0o700)
    token = private / TOKEN_FILE
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32))


def _log(event: Event) -> None:
    """One JSON line per notable event on stderr: the pod log is the operator's debugging aid."""
    if isinstance(event, LLMRetrying | Notice):
        print(json.dumps({"event": type(event).__name__, **event.__dict__}), file=sys.stderr)


async def _wait_for_execd(run_dir: Path, timeout: float) -> ExecEndpoint:
    deadline = time.monotonic() + timeout
    private = private_dir(run_dir)
    ready = private / READY_FILE
    token_file = private / TOKEN_FILE
    while time.monotonic() < deadline:
        if ready.exists() and token_file.exists():
            endpoint = ExecEndpoint(
                token=token_file.read_text().strip(),
                workspace=WORKSPACE,
                uds=str(private / SOCKET_FILE),
            )
            async with ExecClient(endpoint) as client:
                if await client.healthy():
                    return endpoint
        await asyncio.sleep(0.1)
    raise SandboxError(
        f"the exec server in the sandbox container was not ready after {timeout:.0f}s; "
        "does the sandbox image have python3?"
    )


async def run(
    config: PodTaskConfig,
    run_dir: Path,
    artifacts: Path | None,
    execd_timeout: float = EXECD_READY_TIMEOUT,
) -> TaskResult:
    api_key = os.environ.get("OPENAI_API_KEY") or "EMPTY"
    # Out of /proc/PID/environ, for anything that shares this process's PID namespace.
    hide_from_environ("OPENAI_API_KEY")
    trajectory = Trajectory(
        task_name=config.name,
        model=config.model.name,
        base_url=config.model.base_url,
        tool_call_format=str(config.model.tool_call_format),
    )
    started = time.monotonic()
    try:
        endpoint = await _wait_for_execd(run_dir, execd_timeout)
    except SandboxError as exc:
        return TaskResult(
            phase=phase_for(ExitReason.SANDBOX_ERROR),
            exit_reason=ExitReason.SANDBOX_ERROR,
            message=str(exc),
            cause="ExecServerNotReady",
        )
    llm = ChatLLM(
        config.model.base_url,
        api_key,
        config.model.name,
        request_timeout=config.model.request_timeout_seconds,
        max_retries=config.limits.max_llm_retries,
        on_event=_log,
    )
    async with ExecClient(endpoint) as client:
        try:
            await client.write_bytes(f"{OUTPUT_DIR}/{KEEP_FILE}", b"")
            listing = await client.list_dir("input", recursive=True, max_entries=1000)
            # Shown to the model only; the names are the sandbox's own files.
            inputs = [e.path for e in listing.entries if e.type == "file"]
        except SandboxError:
            inputs = []
        loop = AgentLoop(
            llm,
            client,
            WORKSPACE,
            AgentSettings.of(config.model.name, config.model, config.limits),
            _log,
            trajectory,
        )
        try:
            result = await loop.run(config.prompt, inputs)
            output_dir = artifacts / OUTPUT_DIR if artifacts is not None else None
            result = await with_outputs(result, client, output_dir, _log)
        finally:
            await llm.aclose()
            # The sandbox container's main process is the exec server: stopping it ends the pod.
            await client.shutdown()
    result.duration_seconds = round(time.monotonic() - started, 3)
    if artifacts is not None:
        trajectory.result = result
        trajectory.write(artifacts / "trajectory.json")
    return result


def report(result: TaskResult, termination_log: Path) -> None:
    """Termination message first (free for the operator: it arrives with the pod), log line always."""
    message = termination_message(result)
    try:
        termination_log.write_text(message)
    except OSError as exc:
        print(f"cannot write the termination message to {termination_log}: {exc}", file=sys.stderr)
    print(RESULT_LOG_PREFIX + result.to_json(), flush=True)


def load_config(path: Path) -> PodTaskConfig:
    try:
        return PodTaskConfig.model_validate_json(path.read_bytes(), by_alias=True, by_name=False)
    except ValidationError as exc:
        raise SystemExit(f"invalid task config {path}:\n{format_validation_error(exc)}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox_agent.pod_entrypoint")
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="init container: copy the exec server, write the token")
    inst.add_argument("--execd-dir", type=Path, required=True)
    inst.add_argument("--run-dir", type=Path, required=True)
    run_p = sub.add_parser("run", help="agent container: run the task against the sandbox")
    run_p.add_argument("--task", type=Path, required=True)
    run_p.add_argument("--run-dir", type=Path, required=True)
    run_p.add_argument("--termination-log", type=Path, default=Path("/dev/termination-log"))
    run_p.add_argument("--artifacts", type=Path, default=None)
    run_p.add_argument("--execd-timeout", type=float, default=EXECD_READY_TIMEOUT)
    args = parser.parse_args(argv)
    if args.command == "install":
        install(args.execd_dir, args.run_dir)
        return 0
    config = load_config(args.task)
    result = asyncio.run(run(config, args.run_dir, args.artifacts, args.execd_timeout))
    report(result, args.termination_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
