"""A test kubelet: watches pods in the emulated API server and runs their containers locally.

Each container is a local process under bubblewrap, which gives it the pod's view of the file
system: the host's top-level directories read-only, fresh ``/dev``, ``/proc`` (own PID
namespace) and ``/tmp``, the pod's volumes at their mount paths, and a per-container file at the
termination message path. The network is the host's (pod containers share 127.0.0.1, and so do
the test servers). Images do not exist here: ``command + args`` run on the host, with the
executable mapped through ``command_map`` (``python`` -> the test's interpreter, ``python3`` -> the
system's). As root, containers run as their security context's user and capabilities.

The kubelet talks to the API server over HTTP (User-Agent ``test-kubelet``, so its writes can be
told apart from the operator's in the request log): it binds pods to its node (``pods/binding``),
writes ``pods/status`` as the containers change, serves ``pods/log`` through the emulator, honours
``activeDeadlineSeconds`` and graceful deletion, and can inject faults (``inject``) or complete
pods without running anything (``instant_complete``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from .emulator import JSON, EmulatedApiServer, now_rfc3339

__all__ = [
    "DEFAULT_COMMAND_MAP",
    "DelayStart",
    "Evict",
    "Fault",
    "ImagePullFailure",
    "InstantComplete",
    "NeverStart",
    "OOMKill",
    "TestKubelet",
    "bwrap_usable",
    "process_group_alive",
]

# `python` (the agent image's) has the project installed; `python3` (what sandbox images run the
# exec server with) is the system's where there is one: the exec server is stdlib-only, and after
# it drops from root it must still import from an interpreter every uid can read (a pyenv under
# /root is not).
DEFAULT_COMMAND_MAP: dict[str, str] = {
    "python": sys.executable,
    "python3": "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable,
}
DEFAULT_PATH = ":".join(
    [
        os.path.dirname(sys.executable),
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]
)
TERMINATION_MESSAGE_LIMIT = 4096
SPECIAL_MOUNTS = ("/proc", "/dev", "/tmp")
DEADLINE_MESSAGE = "Pod was active on the node longer than the specified deadline"


# --------------------------------------------------------------------------------------------
# Faults


@dataclass(frozen=True)
class ImagePullFailure:
    """The image of ``container`` (all containers when None) cannot be pulled: the container
    waits in ErrImagePull, then ImagePullBackOff; the pod stays Pending."""

    container: str | None = None


@dataclass(frozen=True)
class OOMKill:
    """Kill ``container`` ``after`` seconds after it starts: terminated, OOMKilled, exit 137."""

    container: str
    after: float = 0.0


@dataclass(frozen=True)
class Evict:
    """Evict the pod ``after`` seconds after it runs: containers killed, phase Failed."""

    after: float = 0.0
    message: str = "The node was low on resource: memory."


@dataclass(frozen=True)
class NeverStart:
    """The pod is never scheduled: Pending with PodScheduled False (Unschedulable)."""

    message: str = "0/1 nodes are available: 1 Insufficient cpu."


@dataclass(frozen=True)
class DelayStart:
    """Wait ``seconds`` before the containers start (the pod shows ContainerCreating)."""

    seconds: float


Fault = ImagePullFailure | OOMKill | Evict | NeverStart | DelayStart


@dataclass(frozen=True)
class InstantComplete:
    """Run nothing: every container terminates at once with exit 0, and ``container`` carries
    ``result`` (a string, a JSON-able value, or a function of the pod) as its message."""

    result: str | Mapping[str, Any] | Callable[[JSON], str | Mapping[str, Any]]
    container: str = "agent"

    def message_for(self, pod: JSON) -> str:
        result = self.result(pod) if callable(self.result) else self.result
        return result if isinstance(result, str) else json.dumps(result)


PodMatch = Callable[[JSON], bool]


def _match_all(_pod: JSON) -> bool:
    return True


# --------------------------------------------------------------------------------------------
# Processes


def _user_namespace_args() -> list[str]:
    return [] if os.geteuid() == 0 else ["--unshare-user"]


def _capability_args(context: Mapping[str, Any]) -> list[str]:
    """A container's capabilities as bwrap applies them to root (not as another user: there
    bwrap drops them all anyway). Kubernetes names them without the CAP_ prefix."""
    if os.geteuid() != 0:
        return []
    caps = context.get("capabilities") or {}
    args: list[str] = []
    for cap in caps.get("drop") or []:
        args += ["--cap-drop", "ALL" if cap == "ALL" else f"CAP_{cap}"]
    for cap in caps.get("add") or []:
        args += ["--cap-add", f"CAP_{cap}"]
    return args


@functools.cache
def bwrap_usable(bwrap: str | None = None) -> bool:
    """Whether bubblewrap can build the sandboxes the kubelet needs on this machine."""
    exe = bwrap or shutil.which("bwrap")
    if exe is None:
        return False
    probe = [
        exe,
        *_user_namespace_args(),
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        "--unshare-pid",
        "--die-with-parent",
        "true",
    ]
    try:
        return subprocess.run(probe, capture_output=True, timeout=20, check=False).returncode == 0
    except OSError:
        return False


def _group_pids(pgid: int) -> list[tuple[int, str]]:
    """(pid, command name) of the live processes in the process group ``pgid``."""
    result = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm_end = stat.rindex(")")
        comm = stat[stat.index("(") + 1 : comm_end]
        fields = stat[comm_end + 2 :].split()
        if fields[0] not in ("Z", "X", "x") and int(fields[2]) == pgid:
            result.append((int(entry), comm))
    return result


def process_group_alive(pgid: int) -> bool:
    """Whether any non-zombie process of the group is still running."""
    return bool(_group_pids(pgid))


def _signal_group(pgid: int, sig: int, *, spare_bwrap: bool = False) -> None:
    if spare_bwrap:
        for pid, comm in _group_pids(pgid):
            if comm != "bwrap":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


async def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """Wait until the killed processes of a group have really exited (not just been signalled)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while process_group_alive(pgid) and asyncio.get_running_loop().time() < deadline:
        _signal_group(pgid, signal.SIGKILL)
        await asyncio.sleep(0.01)


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion (``$$`` escapes; unknown references stay as they are)."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(replace, text)


def _make_nested_mountpoints(mounts: list[tuple[str, Path, bool]]) -> None:
    """A mount inside another volume needs its directory there, even in a read-only volume:
    the kubelet creates it in the volume's host directory (MakeNestedMountpoints)."""
    for target, _, _ in mounts:
        for outer, outer_host, _ in mounts:
            if target != outer and target.startswith(outer.rstrip("/") + "/"):
                (outer_host / os.path.relpath(target, outer)).mkdir(parents=True, exist_ok=True)


@functools.cache
def _code_under_tmp() -> tuple[str, ...]:
    """Where the containers' Python finds the project when that is below /tmp (a checkout
    or virtualenv in /tmp, as CI may use): the fresh /tmp of each container would hide it.
    Asked of a fresh interpreter, since that (not this test process) is what pods run."""
    found = subprocess.run(
        [sys.executable, "-c", "import sandbox_agent, sandbox_operator as o; "
         "print(sandbox_agent.__file__); print(o.__file__)"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    paths = {str(Path(f).resolve().parent.parent) for f in found}
    paths |= {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}
    return tuple(sorted(p for p in paths if p.startswith("/tmp/")))


@functools.cache
def _interpreter_ancestors() -> frozenset[Path]:
    """The directories above the test interpreter's prefix (e.g. /root for a pyenv there): a
    container running as another user must be able to pass through them to run it."""
    ancestors: set[Path] = set()
    for prefix in {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}:
        ancestors.update(p for p in Path(prefix).parents if p != Path("/"))
    return frozenset(ancestors)


def _root_args(targets: list[str], open_up: frozenset[Path] = frozenset()) -> list[str]:
    """bwrap arguments for a root like ``--ro-bind / /`` in which ``targets`` (paths with the
    host's symlinks resolved) can be created.

    bwrap's root is a tmpfs; each host entry is bound read-only into it. A directory that must
    gain a new mount point (e.g. ``/etc`` for ``/etc/app``) is recreated and its entries bound one
    by one, since bwrap cannot create a mount point inside a read-only bind. The directories in
    ``open_up`` are recreated the same way (as 0755), so that any user can pass through them.
    """
    expand: set[Path] = set(open_up)
    for target in targets:
        current = Path("/")
        for part in Path(target).parts[1:]:
            child = current / part
            if str(child) in SPECIAL_MOUNTS:
                break
            if not os.path.lexists(child):
                while current != Path("/"):
                    expand.add(current)
                    current = current.parent
                break
            if child.is_symlink() or not child.is_dir():
                break
            current = child
    args: list[str] = []

    def bind_children(directory: Path) -> None:
        for entry in sorted(os.listdir(directory)):
            path = directory / entry
            if str(path) in SPECIAL_MOUNTS:
                continue
            if path in expand:
                args.extend(["--dir", str(path)])
                bind_children(path)
            elif path.is_symlink():
                args.extend(["--symlink", os.readlink(path), str(path)])
            else:
                args.extend(["--ro-bind", str(path), str(path)])

    bind_children(Path("/"))
    return args


class _ConfigError(Exception):
    """A container cannot start yet (CreateContainerConfigError / ContainerCreating)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class _PodGoneError(Exception):
    """The pod object no longer exists."""


@dataclass
class _Container:
    spec: JSON
    init: bool
    log_path: Path
    message_path: Path
    process: asyncio.subprocess.Process | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    oom_killed: bool = False
    killed: bool = False
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    message: str = ""
    container_id: str = field(default_factory=lambda: f"emulated://{uuid.uuid4().hex[:16]}")

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def running(self) -> bool:
        return self.process is not None and self.exit_code is None

    def status(self) -> JSON:
        state: JSON
        if self.exit_code is not None:
            terminated: JSON = {
                "exitCode": self.exit_code,
                "reason": self.reason,
                "startedAt": self.started_at,
                "finishedAt": self.finished_at,
                "containerID": self.container_id,
            }
            if self.message:
                terminated["message"] = self.message
            state = {"terminated": terminated}
        elif self.process is not None:
            state = {"running": {"startedAt": self.started_at}}
        else:
            reason, message = self.waiting or ("ContainerCreating", "")
            state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        return {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "containerID": self.container_id if self.process is not None else None,
            "ready": self.running and not self.init,
            "started": self.running,
            "restartCount": 0,
            "state": state,
            "lastState": {},
        }


# --------------------------------------------------------------------------------------------
# The kubelet


class TestKubelet:
    """Runs the pods of the emulated cluster as local processes (see the module docstring).

    ``start()`` runs it in a background thread with its own event loop; ``stop()`` kills every
    container process (no process outlives the kubelet) and removes its working directory.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        api: EmulatedApiServer,
        *,
        node_name: str = "emulated-node",
        command_map: Mapping[str, str] | None = None,
        path_env: str = DEFAULT_PATH,
        max_grace_seconds: float = 2.0,
        bwrap: str | None = None,
        root_dir: Path | None = None,
        user_agent: str = "test-kubelet/0.1",
    ) -> None:
        self.api = api
        self.node_name = node_name
        self.command_map = dict(DEFAULT_COMMAND_MAP if command_map is None else command_map)
        self.path_env = path_env
        self.max_grace_seconds = max_grace_seconds
        self.bwrap = bwrap or shutil.which("bwrap") or "/usr/bin/bwrap"
        self._root_arg = root_dir
        self.root_dir: Path | None = None
        self.user_agent = user_agent
        self._faults: list[tuple[PodMatch, Fault]] = []
        # PersistentVolumeClaims, by (namespace, claim name): a directory standing in for each.
        self.claims: dict[tuple[str, str], Path] = {}
        self._instant: list[tuple[PodMatch, InstantComplete]] = []
        self._workers: dict[str, _PodWorker] = {}
        # Pods held by scheduling gates, by uid: not scheduled until their last gate goes.
        self._gated: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._logs: dict[tuple[str, str], dict[str, Path]] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.session: aiohttp.ClientSession | None = None

    # -- configuration -----------------------------------------------------------------------

    def inject(self, match: PodMatch, fault: Fault) -> None:
        """Apply ``fault`` to the pods (created from now on) for which ``match(pod)`` is true."""
        self._faults.append((match, fault))

    def clear_faults(self) -> None:
        self._faults.clear()
        self._instant.clear()

    def instant_complete(
        self,
        result: str | Mapping[str, Any] | Callable[[JSON], str | Mapping[str, Any]],
        *,
        match: PodMatch = _match_all,
        container: str = "agent",
    ) -> None:
        """Complete matching pods at once without running them (for load benchmarks)."""
        self._instant.append((match, InstantComplete(result, container)))

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> TestKubelet:
        if self._thread is not None:
            raise RuntimeError("the kubelet is already started")
        self.root_dir = self._root_arg or Path(tempfile.mkdtemp(prefix="test-kubelet-"))
        assert self.api.handler is not None, "start the API server first"
        self.api.handler.log_provider = self.read_log
        self._thread = threading.Thread(target=self._run, name="test-kubelet", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._error is not None:
            raise RuntimeError("the test kubelet failed to start") from self._error
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        self._thread = None
        if self.api.handler is not None and self.api.handler.log_provider == self.read_log:
            self.api.handler.log_provider = None
        if self.root_dir is not None and self._root_arg is None:
            shutil.rmtree(self.root_dir, ignore_errors=True)

    def __enter__(self) -> TestKubelet:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        except BaseException as e:
            self._error = e
            self._ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with aiohttp.ClientSession(
            self.api.base_url, headers={"User-Agent": self.user_agent}
        ) as session:
            self.session = session
            watcher = asyncio.create_task(self._watch_pods())
            try:
                await self._stop.wait()
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                workers = list(self._workers.values())
                await asyncio.gather(*(w.abandon() for w in workers), return_exceptions=True)
                self._workers.clear()

    # -- introspection -----------------------------------------------------------------------

    def read_log(self, namespace: str, name: str, container: str) -> bytes | None:
        """The captured stdout+stderr of a container (the ``pods/log`` provider)."""
        path = self._logs.get((namespace, name), {}).get(container)
        if path is None or not path.exists():
            return None
        return path.read_bytes()

    def process_groups(self, namespace: str, name: str) -> dict[str, int]:
        """Process group ids of the containers of a pod that were started (running or not)."""
        for worker in list(self._workers.values()):
            if (worker.namespace, worker.name) == (namespace, name):
                return {c.name: c.process.pid for c in worker.containers.values() if c.process}
        return {}

    # -- watching ----------------------------------------------------------------------------

    async def _watch_pods(self) -> None:
        assert self.session is not None
        resource_version: str | None = None
        while True:
            try:
                if resource_version is None:
                    async with self.session.get("/api/v1/pods") as response:
                        listing = await response.json()
                    for pod in listing["items"]:
                        self._on_pod("ADDED", pod)
                    resource_version = listing["metadata"]["resourceVersion"]
                    self._ready.set()
                params = {"watch": "true", "resourceVersion": resource_version}
                timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
                async with self.session.get("/api/v1/pods", params=params, timeout=timeout) as r:
                    async for line in r.content:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        if event["type"] == "ERROR":
                            resource_version = None
                            break
                        obj = event["object"]
                        resource_version = obj["metadata"]["resourceVersion"]
                        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            self._on_pod(event["type"], obj)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.2)

    def _on_pod(self, event_type: str, pod: JSON) -> None:
        meta, spec = pod["metadata"], pod.get("spec", {})
        uid = meta["uid"]
        worker = self._workers.get(uid)
        if event_type == "DELETED":
            self._gated.discard(uid)
            if worker is not None:
                del self._workers[uid]
                self._spawn(worker.abandon())
            self._logs.pop((meta.get("namespace", ""), meta["name"]), None)
            return
        node = spec.get("nodeName")
        if node and node != self.node_name:
            return
        if worker is not None:
            worker.update(pod)
            return
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            return
        if meta.get("deletionTimestamp"):
            if node == self.node_name:  # ours, but not running (e.g. a restarted kubelet)
                self._spawn(self._final_delete(pod))
            return
        if node:  # bound to us before this kubelet started: its processes are unknown
            return
        if spec.get("schedulingGates"):
            self._hold(pod)
            return
        self._gated.discard(uid)
        faults = [f for m, f in list(self._faults) if m(pod)]
        instants = [i for m, i in list(self._instant) if m(pod)]
        worker = _PodWorker(self, pod, faults, instants[-1] if instants else None)
        self._workers[uid] = worker
        self._logs[worker.namespace, worker.name] = {
            c.name: c.log_path for c in worker.containers.values()
        }
        worker.start()

    def _hold(self, pod: JSON) -> None:
        """A pod with scheduling gates is not scheduled: as the scheduler does, say so once
        (PodScheduled False, SchedulingGated) and leave it Pending and unbound; the event that
        shows its last gate removed starts it like a new pod."""
        uid = pod["metadata"]["uid"]
        if uid not in self._gated:
            self._gated.add(uid)
            self._spawn(self._write_gated(pod))

    async def _write_gated(self, pod: JSON) -> None:
        assert self.session is not None
        meta = pod["metadata"]
        if meta["uid"] not in self._gated:
            return  # released (or gone) meanwhile
        url = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status"
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "SchedulingGated",
            "message": "Scheduling is blocked due to non-empty scheduling gates",
            "lastProbeTime": None,
            "lastTransitionTime": now_rfc3339(),
        }
        body = {"metadata": {"uid": meta["uid"]}, "status": {"conditions": [condition]}}
        headers = {"Content-Type": "application/merge-patch+json"}
        with contextlib.suppress(aiohttp.ClientError):
            async with self.session.patch(url, json=body, headers=headers):
                pass

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _final_delete(self, pod: JSON) -> None:
        assert self.session is not None
        meta = pod["metadata"]
        url = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        with contextlib.suppress(aiohttp.ClientError):
            async with self.session.delete(
                url, json={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
            ):
                pass

    def _forget(self, worker: _PodWorker) -> None:
        if self._workers.get(worker.uid) is worker:
            del self._workers[worker.uid]


class _PodWorker:
    """Runs one pod: scheduling, volumes, init containers, containers, status, termination."""

    def __init__(
        self,
        kubelet: TestKubelet,
        pod: JSON,
        faults: list[Fault],
        instant: InstantComplete | None,
    ) -> None:
        self.kubelet = kubelet
        self.pod = pod
        self.faults = faults
        self.instant = instant
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta.get("namespace", "default")
        self.name: str = meta["name"]
        assert kubelet.root_dir is not None
        self.dir: Path = kubelet.root_dir / "pods" / self.uid
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.dir / "messages").mkdir(parents=True, exist_ok=True)
        spec = pod.get("spec", {})
        self.containers: dict[str, _Container] = {}
        for init, key in ((True, "initContainers"), (False, "containers")):
            for c in spec.get(key, []):
                self.containers[c["name"]] = _Container(
                    spec=c,
                    init=init,
                    log_path=self.dir / "logs" / f"{c['name']}.log",
                    message_path=self.dir / "messages" / c["name"],
                    waiting=("PodInitializing", "")
                    if not init and spec.get("initContainers")
                    else ("ContainerCreating", ""),
                )
        self.status: JSON = copy.deepcopy(pod.get("status", {}))
        self._sent_keys: set[str] = set(self.status)
        self._conditions: dict[str, JSON] = {}
        self._dirty = False
        self._writing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._flow: asyncio.Task[None] | None = None
        self._interrupt: tuple[str, str, str] | None = None
        self._interrupted = asyncio.Event()
        self._timers: list[asyncio.Task[None]] = []
        self._volumes: dict[str, Path] = {}
        self._finished = False

    # -- public ------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._main())

    def update(self, pod: JSON) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp") and self._interrupt is None:
            self.interrupt("delete", "", "")

    def interrupt(self, kind: str, reason: str, message: str) -> None:
        if self._interrupt is None and not self._finished:
            self._interrupt = (kind, reason, message)
            self._interrupted.set()

    async def abandon(self) -> None:
        """The pod is gone or the kubelet stops: kill everything now, write nothing."""
        self._finished = True
        for timer in self._timers:
            timer.cancel()
        for task in (self._flow, self._task):
            if task is not None and not task.done():
                task.cancel()
        await self._kill_all(grace=0)
        for task in (self._flow, self._task):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task

    # -- API ---------------------------------------------------------------------------------

    @property
    def _url(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"

    async def _request(self, method: str, url: str, body: Any = None, **kw: Any) -> JSON | None:
        """One API call; None on 404; server errors and lost connections are retried."""
        session = self.kubelet.session
        assert session is not None
        for attempt in range(20):
            try:
                async with session.request(method, url, json=body, **kw) as response:
                    if response.status == 404:
                        return None
                    if response.status < 500 or attempt == 19:
                        response.raise_for_status()
                        result: JSON = await response.json()
                        return result
            except aiohttp.ClientConnectionError:
                if attempt == 19:
                    raise
            await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
        raise AssertionError("unreachable")

    async def _fetch(self, plural: str, name: str) -> JSON | None:
        return await self._request("GET", f"/api/v1/namespaces/{self.namespace}/{plural}/{name}")

    async def _push(self) -> None:
        """Write the in-memory status; concurrent changes coalesce into the next write."""
        self._dirty = True
        if self._writing:
            return
        self._writing = True
        self._idle.clear()
        try:
            while self._dirty:
                self._dirty = False
                status = copy.deepcopy(self.status)
                status["conditions"] = list(self._conditions.values())
                init = [c.status() for c in self.containers.values() if c.init]
                if init:
                    status["initContainerStatuses"] = init
                status["containerStatuses"] = [
                    c.status() for c in self.containers.values() if not c.init
                ]
                patch: JSON = {k: None for k in self._sent_keys if k not in status}
                patch.update(status)
                self._sent_keys = set(status)
                # The uid makes the patch fail on a pod that replaced ours under its name, as a
                # real kubelet's status manager does.
                try:
                    result = await self._request(
                        "PATCH",
                        self._url + "/status",
                        {"metadata": {"uid": self.uid}, "status": patch},
                        headers={"Content-Type": "application/merge-patch+json"},
                    )
                except aiohttp.ClientResponseError as exc:
                    if exc.status != 409:
                        raise
                    result = None
                if result is None:
                    raise _PodGoneError
        finally:
            self._writing = False
            self._idle.set()

    async def _flush(self) -> None:
        await self._idle.wait()
        if self._dirty:
            await self._push()

    def _condition(self, type_: str, status: bool, reason: str = "", message: str = "") -> None:
        value = "True" if status else "False"
        old = self._conditions.get(type_)
        condition: JSON = {
            "type": type_,
            "status": value,
            "lastProbeTime": None,
            "lastTransitionTime": old["lastTransitionTime"]
            if old and old["status"] == value
            else now_rfc3339(),
        }
        if reason:
            condition["reason"] = reason
        if message:
            condition["message"] = message
        self._conditions[type_] = condition

    # -- the pod's life ----------------------------------------------------------------------

    async def _main(self) -> None:
        interrupted = asyncio.get_running_loop().create_task(self._interrupted.wait())
        try:
            self._flow = asyncio.get_running_loop().create_task(self._run())
            await asyncio.wait({self._flow, interrupted}, return_when=asyncio.FIRST_COMPLETED)
            interrupted.cancel()
            if self._interrupt is not None and not self._flow.done():
                self._flow.cancel()
                with contextlib.suppress(asyncio.CancelledError, _PodGoneError):
                    await self._flow
                await self._terminate(*self._interrupt)
            elif self._flow.done():
                self._flow.result()
        except _PodGoneError:
            await self._kill_all(grace=0)
        except Exception:
            traceback.print_exc()
            await self._kill_all(grace=0)
        finally:
            self._finished = True
            interrupted.cancel()
            for timer in self._timers:
                timer.cancel()
            self.kubelet._forget(self)

    async def _run(self) -> None:
        spec = self.pod.get("spec", {})
        unschedulable = next((f for f in self.faults if isinstance(f, NeverStart)), None)
        if unschedulable is not None:
            self._condition("PodScheduled", False, "Unschedulable", unschedulable.message)
            await self._push()
            await asyncio.Event().wait()  # until deleted
        bound = await self._request(
            "POST",
            self._url + "/binding",
            {
                "apiVersion": "v1",
                "kind": "Binding",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.kubelet.node_name},
            },
        )
        if bound is None:
            raise _PodGoneError
        self._started = asyncio.get_running_loop().time()
        deadline = spec.get("activeDeadlineSeconds")
        if deadline is not None:
            self._timer(float(deadline), "deadline", "DeadlineExceeded", DEADLINE_MESSAGE)
        self.status.update(
            {
                "phase": "Pending",
                "hostIP": "127.0.0.1",
                "podIP": "127.0.0.1",
                "podIPs": [{"ip": "127.0.0.1"}],
                "startTime": now_rfc3339(),
            }
        )
        self._condition("PodScheduled", True)
        has_init = bool(spec.get("initContainers"))
        self._condition(
            "Initialized", not has_init, "" if not has_init else "ContainersNotInitialized"
        )
        self._condition("ContainersReady", False, "ContainersNotReady")
        self._condition("Ready", False, "ContainersNotReady")
        if self.instant is not None:
            await self._instant_with_faults(self.instant)
            return
        await self._push()

        for fault in self.faults:
            if isinstance(fault, DelayStart):
                await asyncio.sleep(fault.seconds)
        pull = next((f for f in self.faults if isinstance(f, ImagePullFailure)), None)
        if pull is not None:
            await self._image_pull_failure(pull)

        await self._with_retries(self._prepare_volumes)
        for container in [c for c in self.containers.values() if c.init]:
            env = await self._with_retries(partial(self._resolve_env, container), container)
            await self._start(container, env)
            await self._push()
            await self._wait(container)
            await self._push()
            if container.exit_code != 0:
                self.status["phase"] = "Failed"
                self._condition("Initialized", False, "ContainersNotInitialized")
                await self._push()
                return
        if has_init:
            self._condition("Initialized", True)
        main = [c for c in self.containers.values() if not c.init]
        for c in main:
            c.waiting = ("ContainerCreating", "")
        envs = {}
        for container in main:
            envs[container.name] = await self._with_retries(
                partial(self._resolve_env, container), container
            )
        for container in main:
            await self._start(container, envs[container.name])
        self.status["phase"] = "Running"
        self._condition("ContainersReady", True)
        self._condition("Ready", True)
        await self._push()
        for fault in self.faults:
            if isinstance(fault, OOMKill) and fault.container in self.containers:
                self._timers.append(asyncio.get_running_loop().create_task(self._oom_kill(fault)))
            elif isinstance(fault, Evict):
                self._timer(fault.after, "evict", "Evicted", fault.message)
        waits = [asyncio.create_task(self._wait_and_push(c)) for c in main]
        await asyncio.gather(*waits)
        succeeded = all(c.exit_code == 0 for c in main)
        self.status["phase"] = "Succeeded" if succeeded else "Failed"
        self._condition("ContainersReady", False, "PodCompleted")
        self._condition("Ready", False, "PodCompleted")
        await self._push()

    def _timer(self, delay: float, kind: str, reason: str, message: str) -> None:
        async def fire() -> None:
            await asyncio.sleep(delay)
            self.interrupt(kind, reason, message)

        self._timers.append(asyncio.get_running_loop().create_task(fire()))

    async def _with_retries(
        self, fn: Callable[[], Any], container: _Container | None = None
    ) -> Any:
        """Run ``fn`` until the missing objects it needs exist (Kubernetes retries too)."""
        while True:
            try:
                return await fn()
            except _ConfigError as e:
                targets = (
                    [container]
                    if container
                    else [c for c in self.containers.values() if c.process is None]
                )
                changed = False
                for c in targets:
                    if c.waiting != (e.reason, e.message):
                        c.waiting = (e.reason, e.message)
                        changed = True
                if changed:
                    await self._push()
                await asyncio.sleep(0.5)

    async def _image_pull_failure(self, fault: ImagePullFailure) -> None:
        targets = [
            c
            for c in self.containers.values()
            if fault.container is None or c.name == fault.container
        ]
        for c in targets:
            image = c.spec.get("image", "")
            c.waiting = (
                "ErrImagePull",
                f'failed to pull and unpack image "{image}": failed to resolve reference '
                f'"{image}": not found',
            )
        await self._push()
        await asyncio.sleep(0.3)
        for c in targets:
            c.waiting = ("ImagePullBackOff", f'Back-off pulling image "{c.spec.get("image", "")}"')
        await self._push()
        await asyncio.Event().wait()  # until deleted or past the deadline

    async def _instant_with_faults(self, instant: InstantComplete) -> None:
        """An instant pod with the faults that apply without processes: DelayStart waits first,
        ImagePullFailure keeps it Pending, Evict fails it (Evicted, no container reports), and
        OOMKill ends that container OOMKilled (exit 137) while the others complete."""
        delay = sum(f.seconds for f in self.faults if isinstance(f, DelayStart))
        if delay:
            await self._push()
            await asyncio.sleep(delay)
        pull = next((f for f in self.faults if isinstance(f, ImagePullFailure)), None)
        if pull is not None:
            await self._image_pull_failure(pull)
        evict = next((f for f in self.faults if isinstance(f, Evict)), None)
        if evict is not None:
            if evict.after:
                await asyncio.sleep(evict.after)
            now = now_rfc3339()
            for c in self.containers.values():
                c.started_at = c.finished_at = now
                c.exit_code, c.reason, c.message, c.waiting = 137, "Error", "", None
            self.status.update({"phase": "Failed", "reason": "Evicted", "message": evict.message})
            self._condition("DisruptionTarget", True, "TerminationByKubelet", evict.message)
            self._condition("ContainersReady", False, "PodCompleted")
            self._condition("Ready", False, "PodCompleted")
            await self._push()
            return
        await self._complete_instantly(instant)

    async def _complete_instantly(self, instant: InstantComplete) -> None:
        now = now_rfc3339()
        for c in self.containers.values():
            c.started_at = c.finished_at = now
            c.exit_code, c.reason = 0, "Completed"
            c.message = instant.message_for(self.pod) if c.name == instant.container else ""
            c.waiting = None
        oom = {f.container for f in self.faults if isinstance(f, OOMKill)}
        for c in self.containers.values():
            if c.name in oom:
                c.exit_code, c.reason, c.message = 137, "OOMKilled", ""
        if self.containers:
            self._condition("Initialized", True)
        main = [c for c in self.containers.values() if not c.init]
        self.status["phase"] = "Succeeded" if all(c.exit_code == 0 for c in main) else "Failed"
        self._condition("ContainersReady", False, "PodCompleted")
        self._condition("Ready", False, "PodCompleted")
        await self._push()

    async def _terminate(self, kind: str, reason: str, message: str) -> None:
        """Deadline, eviction or deletion: stop the containers and record why."""
        try:
            grace = float(self.pod.get("spec", {}).get("terminationGracePeriodSeconds", 30))
            if kind == "delete":
                grace = float(self.pod["metadata"].get("deletionGracePeriodSeconds", grace))
            await self._kill_all(grace=min(grace, self.kubelet.max_grace_seconds))
            if kind in ("deadline", "evict"):
                self.status.update({"phase": "Failed", "reason": reason, "message": message})
                if kind == "evict":
                    self._condition("DisruptionTarget", True, "TerminationByKubelet", message)
            else:
                main = [c for c in self.containers.values() if not c.init]
                done = main and all(c.exit_code == 0 for c in main)
                self.status["phase"] = "Succeeded" if done else "Failed"
            self._condition("ContainersReady", False, "PodCompleted")
            self._condition("Ready", False, "PodCompleted")
            await self._push()
            await self._flush()
        except _PodGoneError:
            return
        if kind == "delete":
            await self.kubelet._final_delete(self.pod)

    # -- volumes and environment -------------------------------------------------------------

    async def _source_data(self, kind: str, name: str, optional: bool) -> dict[str, bytes] | None:
        plural = "configmaps" if kind == "configMap" else "secrets"
        obj = await self._fetch(plural, name)
        if obj is None:
            if optional:
                return None
            label = "configmap" if kind == "configMap" else "secret"
            raise _ConfigError("ContainerCreating", f'{label} "{name}" not found')
        data: dict[str, bytes] = {}
        if plural == "configmaps":
            data.update({k: v.encode() for k, v in (obj.get("data") or {}).items()})
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        else:
            data.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
        return data

    def _field(self, path: str) -> str:
        meta = self.pod["metadata"]
        values: dict[str, str] = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta.get("namespace", ""),
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.kubelet.node_name,
            "spec.serviceAccountName": str(self.pod.get("spec", {}).get("serviceAccountName", "")),
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
        }
        match = re.match(r"metadata\.(labels|annotations)\['(.+)'\]$", path)
        if match:
            return str((meta.get(match[1]) or {}).get(match[2], ""))
        return values.get(path, "")

    async def _prepare_volumes(self) -> None:
        for volume in self.pod.get("spec", {}).get("volumes", []):
            name = volume["name"]
            if "hostPath" in volume:
                self._volumes[name] = Path(volume["hostPath"]["path"])
                continue
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                namespace = self.pod["metadata"].get("namespace", "default")
                bound = self.kubelet.claims.get((namespace, claim))
                if bound is None:
                    raise _ConfigError(
                        "ContainerCreating", f'persistentvolumeclaim "{claim}" not found'
                    )
                self._volumes[name] = bound
                continue
            files: dict[str, bytes] = {}
            sources: list[tuple[str, JSON]] = []
            if "configMap" in volume:
                sources.append(("configMap", volume["configMap"]))
            elif "secret" in volume:
                secret = dict(volume["secret"])
                secret["name"] = secret.get("secretName", "")
                sources.append(("secret", secret))
            elif "projected" in volume:
                for source in volume["projected"].get("sources", []):
                    for kind in ("configMap", "secret", "downwardAPI"):
                        if kind in source:
                            sources.append((kind, source[kind]))
            elif "downwardAPI" in volume:
                sources.append(("downwardAPI", volume["downwardAPI"]))
            for kind, source in sources:
                if kind == "downwardAPI":
                    for item in source.get("items", []):
                        files[item["path"]] = self._field(item["fieldRef"]["fieldPath"]).encode()
                    continue
                data = await self._source_data(kind, source["name"], source.get("optional", False))
                if data is None:
                    continue
                items = source.get("items")
                if items:
                    for item in items:
                        if item["key"] not in data:
                            if source.get("optional"):
                                continue
                            label = "configmap" if kind == "configMap" else "secret"
                            raise _ConfigError(
                                "ContainerCreating",
                                f"{label} references non-existent config key: {item['key']}",
                            )
                        files[item["path"]] = data[item["key"]]
                else:
                    files.update(data)
            self._volumes[name] = self._write_volume(name, files)
            if "emptyDir" in volume:
                # World-writable, as the kubelet makes them: containers may run as any user.
                self._volumes[name].chmod(0o777)

    def _write_volume(self, name: str, files: Mapping[str, bytes]) -> Path:
        directory = self.dir / "volumes" / name
        directory.mkdir(parents=True, exist_ok=True)
        for rel, content in files.items():
            target = directory / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        return directory

    async def _resolve_env(self, container: _Container) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.spec.get("envFrom", []):
            prefix = source.get("prefix", "")
            for kind, key in (("configMap", "configMapRef"), ("secret", "secretRef")):
                if key in source:
                    ref = source[key]
                    data = await self._source_data(kind, ref["name"], ref.get("optional", False))
                    for k, v in (data or {}).items():
                        env[prefix + k] = v.decode("utf-8", "replace")
        for item in container.spec.get("env", []):
            if "valueFrom" not in item:
                env[item["name"]] = expand_vars(str(item.get("value", "")), env)
                continue
            source = item["valueFrom"]
            if "fieldRef" in source:
                env[item["name"]] = self._field(source["fieldRef"]["fieldPath"])
                continue
            if "resourceFieldRef" in source:
                env[item["name"]] = "0"
                continue
            for kind, key, label in (
                ("secret", "secretKeyRef", "Secret"),
                ("configMap", "configMapKeyRef", "ConfigMap"),
            ):
                if key not in source:
                    continue
                ref = source[key]
                optional = ref.get("optional", False)
                try:
                    data = await self._source_data(kind, ref["name"], optional)
                except _ConfigError as e:
                    raise _ConfigError("CreateContainerConfigError", e.message) from None
                if data is None:
                    break
                if ref["key"] not in data:
                    if optional:
                        break
                    raise _ConfigError(
                        "CreateContainerConfigError",
                        f"couldn't find key {ref['key']} in {label} {self.namespace}/{ref['name']}",
                    )
                env[item["name"]] = data[ref["key"]].decode("utf-8", "replace")
        return env

    # -- processes ---------------------------------------------------------------------------

    def _argv(self, container: _Container, env: Mapping[str, str]) -> list[str]:
        spec = container.spec
        argv = [expand_vars(str(a), env) for a in spec.get("command", []) + spec.get("args", [])]
        if not argv:
            raise _ConfigError(
                "RunContainerError",
                "no command: images are not available in "
                "the test kubelet, give the container a command",
            )
        exe = argv[0]
        mapped = self.kubelet.command_map.get(exe) or self.kubelet.command_map.get(
            os.path.basename(exe)
        )
        if mapped:
            argv[0] = mapped
        return argv

    def _bwrap_command(self, container: _Container, argv: list[str]) -> list[str]:
        spec = container.spec
        mounts: list[tuple[str, Path, bool]] = []
        for mount in spec.get("volumeMounts", []):
            host = self._volumes.get(mount["name"])
            if host is None:
                host = self._write_volume(mount["name"], {})
            if mount.get("subPath"):
                host = host / mount["subPath"]
                host.mkdir(parents=True, exist_ok=True)
            # bwrap resolves the symlinks of a destination against the host root during setup
            # (so /var/run -> /run would miss): give it the resolved path.
            target = os.path.realpath(mount["mountPath"])
            mounts.append((target, host, bool(mount.get("readOnly"))))
        _make_nested_mountpoints(mounts)
        message_target = os.path.realpath(
            spec.get("terminationMessagePath", "/dev/termination-log")
        )
        workdir = os.path.realpath(spec.get("workingDir") or "/")
        targets = [m[0] for m in mounts] + [message_target, workdir]
        user, switched = self._run_as(container)
        open_up = _interpreter_ancestors() if switched else frozenset()
        cmd = [self.kubelet.bwrap, *_root_args(targets, open_up)]
        # /tmp as an image has it (1777): containers may run as any user.
        cmd += ["--dev", "/dev", "--proc", "/proc", "--perms", "1777", "--tmpfs", "/tmp"]
        for target, host, read_only in sorted(mounts, key=lambda m: len(Path(m[0]).parts)):
            cmd += ["--ro-bind" if read_only else "--bind", str(host), target]
        # After the volumes: a volume at /tmp (the agent's) would hide the code otherwise. The
        # directories above it are made passable first: bwrap's own are root's alone (0700).
        for code in _code_under_tmp():
            for parent in reversed(Path(code).parents[:-2]):
                cmd += ["--perms", "0755", "--dir", str(parent)]
            cmd += ["--ro-bind", code, code]
        cmd += ["--bind", str(container.message_path), message_target]
        if workdir != "/":
            cmd += ["--dir", workdir]
        context = spec.get("securityContext") or {}
        if context.get("readOnlyRootFilesystem"):
            cmd += ["--remount-ro", "/"]
        if not switched:
            # Another user's process has no capabilities anyway (setpriv's switch clears them);
            # dropping them first would forbid the switch itself.
            cmd += _capability_args(context)
        cmd += ["--chdir", workdir, *_user_namespace_args(), "--unshare-pid", "--die-with-parent"]
        cmd += ["--", *user, *argv]
        return cmd

    def _run_as(self, container: _Container) -> tuple[list[str], bool]:
        """setpriv arguments for the container's runAsUser/runAsGroup with the pod's fsGroup and
        supplementalGroups, as the kubelet applies them (only as root, and not for uid 0), and
        whether they switch to another user."""
        pod_context = self.pod.get("spec", {}).get("securityContext") or {}
        context = container.spec.get("securityContext") or {}
        if os.geteuid() != 0:
            return [], False
        nnp = ["--no-new-privs"] if context.get("allowPrivilegeEscalation") is False else []
        uid = context.get("runAsUser", pod_context.get("runAsUser"))
        if not uid:
            return (["setpriv", *nnp, "--"] if nnp else []), False
        gid = context.get("runAsGroup", pod_context.get("runAsGroup", uid))
        groups = [pod_context[k] for k in ("fsGroup",) if k in pod_context]
        groups += pod_context.get("supplementalGroups") or []
        group_arg = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", *group_arg, *nnp, "--"], True

    def _open_log(self, container: _Container) -> Any:
        container.message_path.write_bytes(b"")
        # Writable by whichever user the container runs as.
        container.message_path.chmod(0o666)
        return container.log_path.open("ab")

    async def _start(self, container: _Container, env: Mapping[str, str]) -> None:
        full_env = {"PATH": self.kubelet.path_env, "HOSTNAME": self.name, **env}
        try:
            argv = self._argv(container, full_env)
        except _ConfigError as e:
            container.waiting = None
            container.started_at = container.finished_at = now_rfc3339()
            container.exit_code, container.reason, container.message = 128, "StartError", e.message
            return
        log = self._open_log(container)
        try:
            container.process = await asyncio.create_subprocess_exec(
                *self._bwrap_command(container, argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
            )
        finally:
            log.close()
        container.started_at = now_rfc3339()
        container.waiting = None

    async def _wait(self, container: _Container) -> None:
        if container.process is None:
            return
        code = await container.process.wait()
        code = 128 - code if code < 0 else code
        container.finished_at = now_rfc3339()
        container.exit_code = 137 if container.oom_killed else code
        if container.oom_killed:
            container.reason = "OOMKilled"
        else:
            container.reason = "Completed" if code == 0 else "Error"
        container.message = self._termination_message(container)
        # The command is gone; anything it left behind in its PID namespace goes with it.
        _signal_group(container.process.pid, signal.SIGKILL)

    async def _wait_and_push(self, container: _Container) -> None:
        await self._wait(container)
        if self._interrupt is None:
            await self._push()

    def _termination_message(self, container: _Container) -> str:
        spec = container.spec
        message = b""
        with contextlib.suppress(OSError):
            message = container.message_path.read_bytes()[:TERMINATION_MESSAGE_LIMIT]
        policy = spec.get("terminationMessagePolicy", "File")
        if not message and policy == "FallbackToLogsOnError" and container.exit_code != 0:
            with contextlib.suppress(OSError):
                lines = container.log_path.read_bytes().splitlines(keepends=True)[-80:]
                message = b"".join(lines)[-2048:]
        return message.decode("utf-8", "replace")

    async def _oom_kill(self, fault: OOMKill) -> None:
        container = self.containers[fault.container]
        await asyncio.sleep(fault.after)
        if container.running and container.process is not None:
            container.oom_killed = True
            _signal_group(container.process.pid, signal.SIGKILL)

    async def _kill_all(self, grace: float) -> None:
        running = [c for c in self.containers.values() if c.running and c.process is not None]
        for c in running:
            c.killed = True
            assert c.process is not None
            _signal_group(
                c.process.pid,
                signal.SIGTERM if grace > 0 else signal.SIGKILL,
                spare_bwrap=grace > 0,
            )
        if grace > 0 and running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(c.process.wait() for c in running if c.process)), grace
                )
        for c in running:
            assert c.process is not None
            _signal_group(c.process.pid, signal.SIGKILL)
        for c in running:
            assert c.process is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(c.process.wait(), 10)
            if c.exit_code is None:
                await self._wait(c)
            await _wait_group_gone(c.process.pid)
