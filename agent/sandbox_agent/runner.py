"""Run one SandboxTask on this machine: start a local sandbox, upload inputs, run the loop, collect outputs."""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .backends import SandboxConfig, choose_backend
from .errors import SandboxError, TaskSpecError
from .events import EventSink, Notice, ignore
from .execclient import ExecClient
from .llm import ChatLLM
from .loop import AgentLoop, AgentSettings
from .outputs import KEEP_FILE, with_outputs
from .quantity import parse_quantity
from .result import ExitReason, Phase, TaskResult, phase_for
from .task import NetworkMode, SandboxTask
from .wire import OUTPUT_DIR

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# A local input file larger than this is almost certainly a mistake in the task file.
MAX_INPUT_FILE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    api_key: str
    model: str


@dataclass
class RunOptions:
    backend: str = "auto"
    model: str | None = None
    base_url: str | None = None
    api_key: str | None = None
    out_dir: Path | None = None
    # spec.sandbox.network mode internet locally means this machine's own network; only with this.
    allow_host_network: bool = False
    # First retry waits about this long, doubling up to a minute (Retry-After wins when sent).
    retry_backoff_seconds: float = 1.0
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass(frozen=True)
class RunOutcome:
    result: TaskResult
    run_dir: Path
    backend: str
    endpoint: Endpoint

    @property
    def trajectory_path(self) -> Path:
        return self.run_dir / "trajectory.json"

    @property
    def output_dir(self) -> Path:
        return self.run_dir / "output"


def resolve_endpoint(task: SandboxTask, opts: RunOptions) -> Endpoint:
    """Flags win, then OPENAI_* variables, then the task file."""
    spec = task.spec.model
    env = opts.env
    model = opts.model or env.get("OPENAI_MODEL") or spec.name
    if not model:
        raise TaskSpecError(
            "spec.model.name: no model given; set it in the task, pass --model, or export OPENAI_MODEL"
        )
    base_url = opts.base_url or env.get("OPENAI_BASE_URL") or spec.base_url or DEFAULT_BASE_URL
    # Servers without auth (a local vLLM) accept any key, but the client insists on one.
    api_key = opts.api_key or env.get("OPENAI_API_KEY") or "EMPTY"
    return Endpoint(base_url=base_url.rstrip("/"), api_key=api_key, model=model)


HOST_NETWORK_REFUSED = (
    "spec.sandbox.network.mode: internet is, on this machine, the host's own network (bubblewrap) "
    "or Docker's bridge: model-written code could reach this machine's loopback services, your "
    "local network and cloud metadata addresses, which a cluster's NetworkPolicy excludes. Pass "
    "--allow-host-network to accept that, or use mode isolated"
)


def check_network(task: SandboxTask, opts: RunOptions) -> None:
    if task.spec.sandbox.network.mode is NetworkMode.INTERNET and not opts.allow_host_network:
        raise TaskSpecError(HOST_NETWORK_REFUSED)


def sandbox_config(task: SandboxTask) -> SandboxConfig:
    sb = task.spec.sandbox
    limits = sb.resources.limits

    def quantity(name: str) -> float | None:
        return float(parse_quantity(limits[name])) if name in limits else None

    memory = quantity("memory")
    disk = quantity("ephemeral-storage")
    return SandboxConfig(
        network=sb.network.mode is NetworkMode.INTERNET,
        image=sb.image,
        cpus=quantity("cpu"),
        memory_bytes=int(memory) if memory else None,
        disk_bytes=int(disk) if disk else None,
        pids_limit=sb.max_processes,
    )


def collect_inputs(task: SandboxTask, task_dir: Path) -> list[tuple[str, bytes]]:
    """Every input as (path under input/, bytes); errors name the spec field."""
    files: list[tuple[str, bytes]] = []
    for i, item in enumerate(task.spec.inputs):
        where = f"spec.inputs[{i}]"
        if item.content is not None:
            files.append((item.path, item.content.encode("utf-8")))
        elif item.config_map_ref is not None:
            raise TaskSpecError(
                f"{where}.configMapRef: ConfigMaps exist only on a cluster; "
                "use content or file with sandboxctl run"
            )
        elif item.file is not None:
            source = (task_dir / item.file).expanduser()
            if source.is_dir():
                for sub in sorted(p for p in source.rglob("*") if p.is_file()):
                    rel = PurePosixPath(item.path) / sub.relative_to(source).as_posix()
                    files.append((str(rel), _read_input(sub, f"{where}.file")))
            elif source.is_file():
                files.append((item.path, _read_input(source, f"{where}.file")))
            else:
                raise TaskSpecError(f"{where}.file: {source} does not exist")
    return files


def _read_input(path: Path, where: str) -> bytes:
    size = path.stat().st_size
    if size > MAX_INPUT_FILE_BYTES:
        raise TaskSpecError(
            f"{where}: {path} is {size} bytes, over the {MAX_INPUT_FILE_BYTES} limit"
        )
    return path.read_bytes()


def default_run_dir(task: SandboxTask, task_file: Path | None) -> Path:
    name = task.metadata.name or (task_file.stem if task_file else "prompt")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:80]
    return Path("sandboxctl-runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


async def upload_inputs(client: ExecClient, files: list[tuple[str, bytes]]) -> list[str]:
    await client.write_bytes(f"{OUTPUT_DIR}/{KEEP_FILE}", b"")
    for rel, data in files:
        await client.write_bytes(f"input/{rel}", data)
    return [rel for rel, _ in files]


def _failed(reason: ExitReason, message: str) -> TaskResult:
    return TaskResult(phase=phase_for(reason), exit_reason=reason, message=message)


async def run_task(
    task: SandboxTask,
    task_dir: Path,
    opts: RunOptions,
    on_event: EventSink = ignore,
    task_file: Path | None = None,
) -> RunOutcome:
    """Run the task to an end; every ending, including Ctrl-C, leaves result.json and trajectory.json."""
    from .trajectory import Trajectory

    endpoint = resolve_endpoint(task, opts)
    check_network(task, opts)
    files = collect_inputs(task, task_dir)
    backend_cls = choose_backend(opts.backend)
    run_dir = opts.out_dir or default_run_dir(task, task_file)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = task.spec
    if spec.sandbox.network.mode is NetworkMode.ALLOW_LIST:
        on_event(
            Notice(
                "spec.sandbox.network allowList is enforced by a NetworkPolicy on a cluster; "
                "locally the sandbox gets no network"
            )
        )
    trajectory = Trajectory(
        task_name=task.metadata.name or "",
        model=endpoint.model,
        base_url=endpoint.base_url,
        tool_call_format=str(spec.model.tool_call_format),
    )
    result: TaskResult | None = None
    sandbox = backend_cls(sandbox_config(task))
    llm = ChatLLM(
        endpoint.base_url,
        endpoint.api_key,
        endpoint.model,
        request_timeout=spec.model.request_timeout_seconds,
        max_retries=spec.limits.max_llm_retries,
        on_event=on_event,
        backoff_base=opts.retry_backoff_seconds,
    )
    started = time.monotonic()
    try:
        try:
            exec_endpoint = await sandbox.start()
        except SandboxError as exc:
            result = _failed(ExitReason.SANDBOX_ERROR, f"{backend_cls.name} sandbox: {exc}")
            return RunOutcome(result, run_dir, backend_cls.name, endpoint)
        # Say what really holds the task's limits, and loudly what does not (no cgroup here, ...).
        enforcement = sandbox.enforcement
        if enforcement.enforced or enforcement.unenforced:
            on_event(Notice(f"{backend_cls.name} sandbox {enforcement.describe()}"))
        async with ExecClient(exec_endpoint) as client:
            try:
                listing = await upload_inputs(client, files)
            except SandboxError as exc:
                result = _failed(ExitReason.SANDBOX_ERROR, f"uploading inputs failed: {exc}")
                return RunOutcome(result, run_dir, backend_cls.name, endpoint)
            loop = AgentLoop(
                llm,
                client,
                exec_endpoint.workspace,
                AgentSettings.of(endpoint.model, spec.model, spec.limits),
                on_event,
                trajectory,
            )
            result = await loop.run(spec.prompt, listing)
            result = await with_outputs(result, client, run_dir / OUTPUT_DIR, on_event)
        return RunOutcome(result, run_dir, backend_cls.name, endpoint)
    except asyncio.CancelledError:
        result = _failed(ExitReason.CANCELLED, "interrupted before the task finished")
        raise
    finally:
        await asyncio.shield(_cleanup(sandbox, llm))
        if result is not None:
            result.duration_seconds = round(time.monotonic() - started, 3)
            trajectory.result = result
            (run_dir / "result.json").write_text(result.to_json() + "\n")
        trajectory.write(run_dir / "trajectory.json")


async def _cleanup(sandbox: object, llm: ChatLLM) -> None:
    from .backends import Sandbox

    assert isinstance(sandbox, Sandbox)
    try:
        await sandbox.stop()
    finally:
        await llm.aclose()


__all__ = ["Endpoint", "Phase", "RunOptions", "RunOutcome", "run_task"]
