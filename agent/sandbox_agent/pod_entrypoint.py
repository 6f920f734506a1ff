"""The agent container's entry point: `install` (init container) and `run` (the agent itself).

`install` copies the exec server into a shared volume for the sandbox container and writes the
shared token; `run` waits for the exec server, runs the agent against it (agent_run.py), and
reports the result through the termination message (and, when that is too small, the last log
line).

The token, the exec server's socket and its ready file live in `private/` under the run
directory: made by `install` as the agent's uid, mode 0700. The exec server drops to that same
uid to use it; the model's commands, which run as another uid, cannot enter it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .agent_run import AgentTask, LLMEndpoint, RunRecord, failed, run_agent
from .artifacts import (
    ArtifactStoreError,
    ArtifactWriter,
    StoreOptions,
    open_store,
)
from .backends.base import ExecEndpoint, execd_source
from .errors import SandboxError
from .events import Event, LLMRetrying, Notice
from .execclient import ExecClient
from .execd_cmdline import PRIVATE_DIR, READY_FILE, SOCKET_FILE, TOKEN_FILE
from .outputs import DEFAULT_CAPS
from .podconfig import PodTaskConfig
from .procenv import hide_from_environ
from .result import RESULT_LOG_PREFIX, ExitReason, TaskResult, termination_message
from .task import format_validation_error
from .wire import INPUT_DIR, WORKSPACE

# How long the sandbox container may take to start its exec server (image pull is already done).
EXECD_READY_TIMEOUT = 120.0
# How often the agent checks that the sandbox container's exec server is still there.
SANDBOX_WATCH_SECONDS = 2.0
SANDBOX_STOPPED = (
    "the sandbox container stopped during the run (its exec server no longer accepts "
    "connections); the run was ended at once"
)
# Input files listed for the prompt (which names the first 50 and counts the rest).
MAX_LISTED_INPUTS = 1000


def private_dir(run_dir: Path) -> Path:
    """Where the exec server's token, socket and ready file are, below the shared run volume."""
    return run_dir / PRIVATE_DIR


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


def agent_task(config: PodTaskConfig) -> AgentTask:
    """The task as the agent runs it; the API key comes from the environment, then leaves it."""
    api_key = os.environ.get("OPENAI_API_KEY") or "EMPTY"
    # Out of /proc/PID/environ, for anything that shares this process's PID namespace.
    hide_from_environ("OPENAI_API_KEY")
    endpoint = LLMEndpoint(config.model.base_url, api_key, config.model.name)
    return AgentTask(
        config.name, config.prompt, endpoint, config.model, config.limits, config.grading
    )


async def list_inputs(client: ExecClient) -> list[str]:
    """The files the kubelet mounted under input/. Shown to the model only (the names are the
    sandbox's own files), so a listing that fails names none rather than ending the run."""
    try:
        listing = await client.list_dir(INPUT_DIR, recursive=True, max_entries=MAX_LISTED_INPUTS)
    except SandboxError:
        return []
    return [e.path for e in listing.entries if e.type == "file"]


async def _shutdown(endpoint: ExecEndpoint) -> None:
    # The sandbox container's main process is the exec server: stopping it ends the pod.
    async with ExecClient(endpoint) as client:
        await client.shutdown()


async def run(
    config: PodTaskConfig,
    run_dir: Path,
    artifacts: Path | None,
    execd_timeout: float = EXECD_READY_TIMEOUT,
    artifacts_prefix: str | None = None,
) -> TaskResult:
    """The run, recorded in `artifacts` (a directory) and in the operator's artifact store
    (config.artifacts, under `artifacts_prefix`) whatever its ending."""
    task = agent_task(config)
    with tempfile.TemporaryDirectory(prefix="run-") as scratch:
        writer, store_error = _artifact_writer(config, artifacts_prefix, task)
        directory = artifacts if artifacts is not None or writer is None else Path(scratch)
        caps = config.artifacts.caps if config.artifacts is not None else DEFAULT_CAPS
        record = RunRecord(task, directory, writer, caps)
        result = await _run_recorded(task, run_dir, execd_timeout, record)
        record.save(result)
        await record.store(result)
    if store_error is not None:
        result.artifacts_error = store_error
    return result


def _artifact_writer(
    config: PodTaskConfig, prefix: str | None, task: AgentTask
) -> tuple[ArtifactWriter | None, str | None]:
    """The writer for the operator's store (None without one), or why it cannot be opened."""
    if config.artifacts is None or prefix is None:
        return None, None
    deadline = time.monotonic() + task.limits.active_deadline_seconds
    try:
        store = open_store(config.artifacts.url, "artifacts.url", StoreOptions(), os.environ)
    except ArtifactStoreError as exc:
        return None, str(exc)
    return ArtifactWriter(store, prefix, deadline, _log), None


async def _run_recorded(
    task: AgentTask, run_dir: Path, execd_timeout: float, record: RunRecord
) -> TaskResult:
    try:
        endpoint = await _wait_for_execd(run_dir, execd_timeout)
    except SandboxError as exc:
        return failed(ExitReason.SANDBOX_ERROR, str(exc), cause="ExecServerNotReady")
    try:
        return await _while_sandbox_runs(
            run_agent(task, endpoint, list_inputs, record, _log), endpoint, record
        )
    finally:
        await _shutdown(endpoint)


async def sandbox_stopped(socket_path: str, interval: float = SANDBOX_WATCH_SECONDS) -> None:
    """Return once the exec server's socket refuses connections (or is gone) twice in a row: its
    process has exited, for good (restartPolicy Never). A busy server still accepts (the kernel
    queues the connection), so load is never taken for death."""
    misses = 0
    while misses < 2:
        await asyncio.sleep(interval)
        try:
            _, writer = await asyncio.open_unix_connection(socket_path)
        except (ConnectionRefusedError, FileNotFoundError):
            misses += 1
            continue
        except OSError:
            misses = 0  # a full backlog or the like: someone is there
            continue
        writer.close()
        misses = 0


async def _while_sandbox_runs(
    work: Coroutine[Any, Any, TaskResult], endpoint: ExecEndpoint, record: RunRecord
) -> TaskResult:
    """`work`'s result; or, when the sandbox container stops first (OOM-killed, crashed), the run
    ended at once as sandbox_error with what it had spent and done, rather than the model asked
    on and on by an agent that finds out only at its next command."""
    running = asyncio.ensure_future(work)
    if endpoint.uds is None:
        return await running
    watch = asyncio.ensure_future(sandbox_stopped(endpoint.uds))
    try:
        await asyncio.wait({running, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if running.done():
        return running.result()
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    ended = failed(ExitReason.SANDBOX_ERROR, SANDBOX_STOPPED, cause="SandboxStopped")
    so_far = record.trajectory.result
    if so_far is not None:
        ended = so_far.model_copy(
            update={
                "phase": ended.phase,
                "exit_reason": ended.exit_reason,
                "message": ended.message,
                "cause": ended.cause,
            }
        )
    return ended


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
    run_p.add_argument(
        "--artifacts-prefix", default=None, help="this attempt's place in the artifact store"
    )
    args = parser.parse_args(argv)
    if args.command == "install":
        install(args.execd_dir, args.run_dir)
        return 0
    config = load_config(args.task)
    result = asyncio.run(
        run(config, args.run_dir, args.artifacts, args.execd_timeout, args.artifacts_prefix)
    )
    report(result, args.termination_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
