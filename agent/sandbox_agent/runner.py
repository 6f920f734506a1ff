"""Run one SandboxTask on this machine: resolve the endpoint, start a local sandbox, upload the
inputs and run the agent against it (agent_run.py); result.json and trajectory.json land in the
run directory whatever the ending."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from .agent_run import (
    DEFAULT_RETRY_BACKOFF_SECONDS,
    AgentTask,
    LLMEndpoint,
    RunRecord,
    failed,
    run_agent,
)
from .artifacts import (
    ArtifactStore,
    ArtifactStoreError,
    ArtifactWriter,
    StoreOptions,
    attempt_id,
    open_store,
    run_prefix,
)
from .backends import Sandbox, SandboxConfig, choose_backend
from .errors import SandboxError, TaskSpecError
from .events import EndpointChosen, EventSink, Notice, ignore
from .execclient import ExecClient
from .local_model import DEFAULT_CONTEXT, LocalModelServer
from .loop import CANCELLED_MESSAGE
from .models import CATALOGUE, DEFAULT_MODEL, KnownModel
from .quantity import parse_quantity
from .result import ExitReason, Phase, TaskResult
from .task import NetworkMode, SandboxTask, ToolCallFormat, valid_image
from .taskfile import input_source, missing_input_files
from .wire import INPUT_DIR, OUTPUT_DIR, RESULT_FILE, TRAJECTORY_FILE

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Local runs' namespace in the artifact store's layout (a cluster's are its namespaces).
LOCAL_NAMESPACE = "local"
LOCAL_MODEL_LOG = "local-model.log"
# A local input file larger than this is almost certainly a mistake in the task file.
MAX_INPUT_FILE_BYTES = 512 * 1024 * 1024


@dataclass
class RunOptions:
    backend: str = "auto"
    model: str | None = None
    base_url: str | None = None
    api_key: str | None = None
    # The sandbox image instead of spec.sandbox.image (the docker backend's).
    image: str | None = None
    out_dir: Path | None = None
    # Replace the result, trajectory and outputs of an earlier run in out_dir.
    overwrite: bool = False
    # spec.sandbox.network mode internet locally means this machine's own network; only with this.
    allow_host_network: bool = False
    retry_backoff_seconds: float = DEFAULT_RETRY_BACKOFF_SECONDS
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    # Serve this model here and ask it (local_model_wanted said so, and its file was pulled).
    local_model: LocalModel | None = None
    # Also keep the run in this artifact store (s3://, gs://, az://, file://).
    artifacts_url: str | None = None
    store_options: StoreOptions = field(default_factory=StoreOptions)


@dataclass(frozen=True)
class LocalModel:
    """The built-in endpoint: a catalogue model and its verified file, served for one run."""

    model: KnownModel
    file: Path


@dataclass(frozen=True)
class RunOutcome:
    result: TaskResult
    run_dir: Path
    backend: str
    endpoint: LLMEndpoint

    @property
    def trajectory_path(self) -> Path:
        return self.run_dir / TRAJECTORY_FILE

    @property
    def output_dir(self) -> Path:
        return self.run_dir / OUTPUT_DIR


def without_userinfo(url: str) -> str:
    """The URL as it may be shown: a `user:password@` part (a credential) left out."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def given_base_url(task: SandboxTask, opts: RunOptions) -> str | None:
    """The base URL the user gave: the flag, else OPENAI_BASE_URL, else the task file's."""
    for source, url in (
        ("--base-url", opts.base_url),
        ("OPENAI_BASE_URL", opts.env.get("OPENAI_BASE_URL")),
    ):
        if url:
            _check_base_url(source, url)
            return url
    return task.spec.model.base_url


def local_model_wanted(task: SandboxTask, opts: RunOptions) -> KnownModel | None:
    """The catalogue model to serve on this machine when no endpoint is configured anywhere (no
    base URL by flag, OPENAI_BASE_URL or spec.model.baseURL, and no API key); None when one is.
    A model name given by flag, OPENAI_MODEL or the task picks the model when it is a catalogue
    name; any other is for a configured endpoint and is left aside (local_model_note says so)."""
    if given_base_url(task, opts) is not None or opts.api_key or opts.env.get("OPENAI_API_KEY"):
        return None
    name = _asked_model(task, opts)
    return CATALOGUE.get(name or "", CATALOGUE[DEFAULT_MODEL])


def _asked_model(task: SandboxTask, opts: RunOptions) -> str | None:
    return opts.model or opts.env.get("OPENAI_MODEL") or task.spec.model.name


def local_model_note(task: SandboxTask, opts: RunOptions, model: KnownModel) -> str:
    """The one line that says the built-in model answers, and why."""
    line = (
        "no endpoint configured (--base-url, OPENAI_BASE_URL, spec.model.baseURL or "
        f"OPENAI_API_KEY): the local model {model.name} answers, served by llama.cpp on 127.0.0.1"
    )
    asked = _asked_model(task, opts)
    if asked and asked not in CATALOGUE:
        line += f" (model {asked!r} is not a local one: it needs an endpoint)"
    return line


def local_context(task: SandboxTask) -> int:
    """The local server's context: the task's conversation budget, at most DEFAULT_CONTEXT (what
    fits this machine's memory with room to spare), at least 4096."""
    return max(4096, min(task.spec.limits.max_tokens, DEFAULT_CONTEXT))


def for_local_model(task: SandboxTask, model: KnownModel) -> SandboxTask:
    """The task as the local model runs it: its measured tool-call format unless the task names
    one (an explicit spec.model.toolCallFormat always wins)."""
    spec = task.spec.model
    if "tool_call_format" in spec.model_fields_set:
        return task
    fmt = ToolCallFormat(model.tool_call_format)
    new_model = spec.model_copy(update={"tool_call_format": fmt})
    return task.model_copy(update={"spec": task.spec.model_copy(update={"model": new_model})})


async def start_local_model(server: LocalModelServer) -> str:
    """Start `server` off the event loop; a cancelled start stops the child before it raises."""
    abandon = threading.Event()
    starting = asyncio.ensure_future(asyncio.to_thread(server.start, abandon))
    try:
        return await asyncio.shield(starting)
    except asyncio.CancelledError:
        abandon.set()
        with contextlib.suppress(Exception):
            await starting
        server.stop()
        raise


def resolve_endpoint(task: SandboxTask, opts: RunOptions) -> LLMEndpoint:
    """Flags win, then OPENAI_* variables, then the task file."""
    spec = task.spec.model
    env = opts.env
    model = opts.model or env.get("OPENAI_MODEL") or spec.name
    if not model:
        raise TaskSpecError(
            "spec.model.name: no model given; set it in the task, pass --model, or export OPENAI_MODEL"
        )
    base_url = given_base_url(task, opts) or DEFAULT_BASE_URL
    # Servers without auth (a local vLLM) accept any key, but the client insists on one.
    api_key = opts.api_key or env.get("OPENAI_API_KEY") or "EMPTY"
    return LLMEndpoint(base_url=base_url.rstrip("/"), api_key=api_key, model=model)


_HTTP_URL = re.compile(r"https?://[^\s/?#]+(?:[/?#]\S*)?")


def _check_base_url(source: str, url: str) -> None:
    """A base URL from a flag or the environment, checked as the task file's is (the model
    loads that one), so that a typo is one line before anything starts."""
    if len(url) > 2048 or not _HTTP_URL.fullmatch(url):
        shown = url if len(url) <= 80 else url[:77] + "..."
        raise TaskSpecError(
            f"{source}: {without_userinfo(shown)!r} is not an http:// or https:// URL "
            "(for example http://127.0.0.1:8000/v1)"
        )


def image_unused_note(backend: str) -> str:
    return (
        f"--image is for the docker backend; the {backend} backend runs this machine's own "
        "programs (--backend docker to use the image)"
    )


ALLOW_LIST_NOTE = (
    "spec.sandbox.network allowList is enforced by a NetworkPolicy on a cluster; "
    "locally the sandbox gets no network"
)
HOST_NETWORK_REFUSED = (
    "spec.sandbox.network.mode: internet is, on this machine, the host's own network (bubblewrap) "
    "or Docker's bridge: model-written code could reach this machine's loopback services, your "
    "local network and cloud metadata addresses, which a cluster's NetworkPolicy excludes. Pass "
    "--allow-host-network to accept that, or use mode isolated"
)


def placement_note(task: SandboxTask) -> str | None:
    """The fields that place and pull a task's pod on a cluster, which a local run ignores."""
    fields = [f"spec.scheduling.{name}" for name in task.spec.scheduling.given()]
    if task.spec.sandbox.image_pull_secrets:
        fields.append("spec.sandbox.imagePullSecrets")
    if task.spec.queue_name is not None:
        fields.append("spec.queueName")
    if not fields:
        return None
    return f"{', '.join(fields)}: for the task's pod on a cluster; sandboxctl run ignores them"


def check_network(task: SandboxTask, opts: RunOptions) -> None:
    if task.spec.sandbox.network.mode is NetworkMode.INTERNET and not opts.allow_host_network:
        raise TaskSpecError(HOST_NETWORK_REFUSED)


def sandbox_config(task: SandboxTask, image: str | None = None) -> SandboxConfig:
    """What the task asks of its sandbox; `image` (checked) replaces spec.sandbox.image."""
    sb = task.spec.sandbox
    if image is not None:
        try:
            valid_image(image)
        except ValueError as exc:
            raise TaskSpecError(f"--image: {exc}") from None
    limits = sb.resources.limits

    def quantity(name: str) -> float | None:
        return float(parse_quantity(limits[name])) if name in limits else None

    memory = quantity("memory")
    disk = quantity("ephemeral-storage")
    return SandboxConfig(
        network=sb.network.mode is NetworkMode.INTERNET,
        image=image or sb.image,
        cpus=quantity("cpu"),
        memory_bytes=int(memory) if memory else None,
        disk_bytes=int(disk) if disk else None,
        pids_limit=sb.max_processes,
    )


def collect_inputs(task: SandboxTask, task_dir: Path) -> list[tuple[str, bytes]]:
    """Every input as (path under input/, bytes); errors name the spec field (every missing
    file at once)."""
    missing = missing_input_files(task, task_dir)
    if missing:
        raise TaskSpecError("; ".join(missing))
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
            source = input_source(task_dir, item.file)
            if source.is_dir():
                for sub in sorted(p for p in source.rglob("*") if p.is_file()):
                    rel = PurePosixPath(item.path) / sub.relative_to(source).as_posix()
                    files.append((str(rel), _read_input(sub, f"{where}.file")))
            elif source.is_file():
                files.append((item.path, _read_input(source, f"{where}.file")))
            else:
                raise TaskSpecError(f"{where}.file: {source} is neither a file nor a directory")
    return files


def _read_input(path: Path, where: str) -> bytes:
    size = path.stat().st_size
    if size > MAX_INPUT_FILE_BYTES:
        raise TaskSpecError(
            f"{where}: {path} is {size} bytes, over the {MAX_INPUT_FILE_BYTES} limit"
        )
    return path.read_bytes()


def run_name(task: SandboxTask, task_file: Path | None) -> str:
    """The task's name as a file name: metadata.name, else the file's stem, else `prompt`."""
    name = task.metadata.name or (task_file.stem if task_file else "prompt")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).lstrip("._-")[:80] or "task"


def default_run_dir(task: SandboxTask, task_file: Path | None, attempt: str | None = None) -> Path:
    """`sandboxctl-runs/NAME-ATTEMPT`, ATTEMPT `YYYYmmdd-HHMMSS-mmm-XXXXXXXX` (the run's, also
    its place in an artifact store): two runs started together never share one (milliseconds
    and 32 random bits: 16 gave 50 runs in one millisecond a 2% chance of two sharing, which a
    test saw)."""
    return Path("sandboxctl-runs") / f"{run_name(task, task_file)}-{attempt or attempt_id()}"


def prepare_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """Make the run directory, refusing to lose an earlier run: an existing non-empty one is
    used only with `overwrite`, and then only the files a run writes are replaced."""
    where = f"--out {run_dir}"
    if run_dir.exists() and not run_dir.is_dir():
        raise TaskSpecError(f"{where}: is a file; give a directory for the run")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise TaskSpecError(
                f"{where}: the directory is not empty (an earlier run?); give a new one, or "
                "--overwrite to replace its result, trajectory and outputs"
            )
        for name in (RESULT_FILE, TRAJECTORY_FILE):
            (run_dir / name).unlink(missing_ok=True)
        outputs = run_dir / OUTPUT_DIR
        if outputs.is_symlink() or outputs.is_file():
            outputs.unlink()
        elif outputs.is_dir():
            shutil.rmtree(outputs)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".sandboxctl-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TaskSpecError(f"{where}: cannot write there ({exc.strerror or exc})") from None


async def upload_inputs(client: ExecClient, files: list[tuple[str, bytes]]) -> list[str]:
    try:
        for rel, data in files:
            await client.write_bytes(f"{INPUT_DIR}/{rel}", data)
    except SandboxError as exc:
        raise SandboxError(f"uploading inputs failed: {exc}") from exc
    return [rel for rel, _ in files]


def agent_task(task: SandboxTask, endpoint: LLMEndpoint) -> AgentTask:
    spec = task.spec
    return AgentTask(
        task.metadata.name or "", spec.prompt, endpoint, spec.model, spec.limits, spec.grading
    )


@dataclass(frozen=True)
class RunPlan:
    """A run checked and ready: everything that can be refused has been, and the run directory
    exists. `endpoint` is None when the built-in local model is to answer."""

    files: list[tuple[str, bytes]]
    config: SandboxConfig
    backend_cls: type[Sandbox]
    run_dir: Path
    endpoint: LLMEndpoint | None
    # The run's place in the artifact store (`local/NAME/ATTEMPT`), when one was given.
    store: ArtifactStore | None = None
    store_prefix: str = ""


def plan_run(
    task: SandboxTask,
    task_dir: Path,
    opts: RunOptions,
    task_file: Path | None = None,
    *,
    local: bool = False,
) -> RunPlan:
    """Check the task and the options (errors name the field or flag) and make the run
    directory; `local`: the endpoint will be the built-in local model (none is resolved)."""
    endpoint = None if local or opts.local_model else resolve_endpoint(task, opts)
    check_network(task, opts)
    files = collect_inputs(task, task_dir)
    config = sandbox_config(task, opts.image)
    backend_cls = choose_backend(opts.backend)
    store = artifact_store(opts)
    attempt = attempt_id()
    run_dir = opts.out_dir or default_run_dir(task, task_file, attempt)
    prepare_run_dir(run_dir, overwrite=opts.overwrite)
    sub = task.spec.artifacts.prefix
    prefix = run_prefix(LOCAL_NAMESPACE, run_name(task, task_file), attempt, sub)
    return RunPlan(files, config, backend_cls, run_dir, endpoint, store, prefix)


def artifact_store(opts: RunOptions) -> ArtifactStore | None:
    """The store --artifacts-url names (None without one); its URL and settings checked."""
    if opts.artifacts_url is None:
        return None
    try:
        return open_store(opts.artifacts_url, "--artifacts-url", opts.store_options, opts.env)
    except ArtifactStoreError as exc:
        raise TaskSpecError(str(exc)) from None


async def run_task(
    task: SandboxTask,
    task_dir: Path,
    opts: RunOptions,
    on_event: EventSink = ignore,
    task_file: Path | None = None,
    plan: RunPlan | None = None,
) -> RunOutcome:
    """Run the task to an end (planned here unless `plan` is given); every ending, including
    Ctrl-C, leaves result.json and trajectory.json. With opts.local_model the model is served
    here for the run and stopped after it; a server that does not start raises
    LocalModelError (nothing ran)."""
    plan = plan or plan_run(task, task_dir, opts, task_file)
    local, endpoint = opts.local_model, plan.endpoint
    if task.spec.sandbox.network.mode is NetworkMode.ALLOW_LIST:
        on_event(Notice(ALLOW_LIST_NOTE))
    note = placement_note(task)
    if note is not None:
        on_event(Notice(note))
    if opts.image is not None and plan.backend_cls.name != "docker":
        on_event(Notice(image_unused_note(plan.backend_cls.name)))
    server: LocalModelServer | None = None
    try:
        if local is not None:
            task = for_local_model(task, local.model)
            # A key of the run's own: a sandbox sharing the host's network (the process backend,
            # --allow-host-network) can reach 127.0.0.1, but cannot use the model.
            key = secrets.token_urlsafe(32)
            server = LocalModelServer(
                local.file, local.model.name, log_path=plan.run_dir / LOCAL_MODEL_LOG,
                context=local_context(task), api_key=key,
            )  # fmt: skip
            url = await start_local_model(server)
            endpoint = LLMEndpoint(base_url=url, api_key=key, model=local.model.name)
        assert endpoint is not None
        on_event(
            EndpointChosen(
                without_userinfo(endpoint.base_url),
                endpoint.model,
                default=local is None and given_base_url(task, opts) is None,
                local=local is not None,
            )
        )
        return await _run_and_record(task, endpoint, plan, opts, on_event)
    finally:
        if server is not None:
            server.stop()


async def _run_and_record(
    task: SandboxTask, endpoint: LLMEndpoint, plan: RunPlan, opts: RunOptions, on_event: EventSink
) -> RunOutcome:
    backend_cls, run_dir = plan.backend_cls, plan.run_dir
    agent = agent_task(task, endpoint)
    writer = None
    if plan.store is not None:
        deadline = time.monotonic() + task.spec.limits.active_deadline_seconds
        writer = ArtifactWriter(plan.store, plan.store_prefix, deadline, on_event)
    record = RunRecord(agent, run_dir, writer)
    sandbox = backend_cls(plan.config)
    result: TaskResult | None = None
    try:
        result = await _run_in(sandbox, agent, record, plan.files, opts, on_event)
        return RunOutcome(result, run_dir, backend_cls.name, endpoint)
    except asyncio.CancelledError:
        # The loop's own account (steps, usage, tool calls so far) when it got that far.
        result = record.trajectory.result or failed(ExitReason.CANCELLED, CANCELLED_MESSAGE)
        raise
    finally:
        await asyncio.shield(sandbox.stop())
        record.save(result)
        if result is not None:
            await asyncio.shield(record.store(result))
            (run_dir / RESULT_FILE).write_text(result.to_json() + "\n")


async def _run_in(
    sandbox: Sandbox,
    agent: AgentTask,
    record: RunRecord,
    files: list[tuple[str, bytes]],
    opts: RunOptions,
    on_event: EventSink,
) -> TaskResult:
    """The sandbox started, the agent run against it; a start that fails is the result."""
    try:
        exec_endpoint = await sandbox.start()
    except SandboxError as exc:
        return failed(ExitReason.SANDBOX_ERROR, f"{sandbox.name} sandbox: {exc}")
    # Say what really holds the task's limits, and loudly what does not (no cgroup here, ...).
    enforcement = sandbox.enforcement
    if enforcement.enforced or enforcement.unenforced:
        on_event(Notice(f"{sandbox.name} sandbox {enforcement.describe()}"))
    return await run_agent(
        agent,
        exec_endpoint,
        lambda client: upload_inputs(client, files),
        record,
        on_event,
        retry_backoff_seconds=opts.retry_backoff_seconds,
    )


__all__ = ["LLMEndpoint", "Phase", "RunOptions", "RunOutcome", "run_task"]
