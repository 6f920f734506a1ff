"""The sandbox backend interface: start an exec server somewhere isolated, say how to reach it, stop it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from ..errors import SandboxError
from ..execd_cmdline import SOCKET_FILE, InheritedFds
from .limits import Enforcement

# How long a backend may take to bring its exec server up before the start counts as failed.
DEFAULT_START_TIMEOUT = 60.0
# The exec server's stderr kept on the host: commands can write to it (e.g. through an inherited
# descriptor), so it is cut here rather than grow with whatever they write.
MAX_LOG_BYTES = 1024 * 1024
LOG_CUT_MARKER = b"\n[llmsandbox: exec server log cut at %d bytes]\n" % MAX_LOG_BYTES
# The ready report is one short JSON line; more is not the exec server speaking.
_MAX_READY_BYTES = 64 * 1024


@dataclass(frozen=True)
class SandboxConfig:
    """What a task asks of its sandbox, in backend-neutral units."""

    network: bool = False
    image: str | None = None
    cpus: float | None = None
    memory_bytes: int | None = None
    pids_limit: int | None = None
    disk_bytes: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    start_timeout: float = DEFAULT_START_TIMEOUT


@dataclass(frozen=True)
class ExecEndpoint:
    """How to reach a running exec server, and where its workspace is as commands see it."""

    token: str
    workspace: str
    uds: str | None = None
    url: str = "http://execd"


def execd_source() -> Path:
    """The exec server's file on disk, to copy or mount into a sandbox."""
    path = Path(str(resources.files("sandbox_agent").joinpath("execd.py")))
    if not path.is_file():
        raise SandboxError(f"exec server file not found at {path}; reinstall llm-sandbox-operator")
    return path


def unenforced(config: SandboxConfig, why: str, mechanism: str = "none") -> Enforcement:
    """An Enforcement in which every limit the config asks for is left unenforced, for `why`."""
    requested = {
        "memory": config.memory_bytes,
        "pids": config.pids_limit,
        "cpu": config.cpus,
        "disk": config.disk_bytes,
    }
    return Enforcement(mechanism, {}, {k: why for k, v in requested.items() if v})


def new_token() -> str:
    return secrets.token_urlsafe(32)


class HandOff:
    """The exec server's socket, token and ready report, passed as inherited descriptors.

    The host binds the listening socket in its private run directory, which is never mounted
    into the sandbox, and the token and the ready report travel through pipes: no path that a
    command can see (or replace) holds any of them.
    """

    def __init__(self, rundir: Path, token: str) -> None:
        self.socket_path = rundir / SOCKET_FILE
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.socket_path))
        self._listener.listen(128)
        self._token_r, token_w = os.pipe()
        # The token fits a pipe's buffer many times over: written now, read by the server later.
        os.write(token_w, token.encode())
        os.close(token_w)
        self._ready_r, self._ready_w = os.pipe()
        os.set_blocking(self._ready_r, False)
        self._child_fds = [self._listener.fileno(), self._token_r, self._ready_w]

    @property
    def fds(self) -> list[int]:
        """Descriptors the child must inherit (Popen pass_fds)."""
        return list(self._child_fds)

    def descriptors(self) -> InheritedFds:
        """The child's descriptors as the exec server's command line names them."""
        return InheritedFds(self._listener.fileno(), self._token_r, self._ready_w)

    async def launch(
        self,
        argv: list[str],
        *,
        log: CappedLog,
        what: str,
        timeout: float,
        cwd: str | Path,
        env: dict[str, str],
        extra_fds: tuple[int, ...] = (),
    ) -> asyncio.subprocess.Process:
        """Start the exec server's process with these descriptors (and `extra_fds`), its stderr
        into `log`, and return it once the server reports ready."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            pass_fds=[*self.fds, *extra_fds],
            cwd=cwd,
            env=env,
        )
        self.spawned()
        log.follow(proc.stderr)
        try:
            await self.wait_ready(proc, timeout, what, log)
        except BaseException:
            # The caller never gets the process: nothing of it may outlive a failed start.
            await terminate(proc)
            raise
        return proc

    def spawned(self) -> None:
        """The child has its copies; ours would keep the ready pipe from ever ending.
        Idempotent: a descriptor number closed twice could by then be someone else's."""
        for fd in self._child_fds[1:]:
            os.close(fd)
        self._listener.close()
        self._child_fds = []

    async def wait_ready(
        self, proc: asyncio.subprocess.Process, timeout: float, what: str, log: CappedLog
    ) -> dict[str, object]:
        """The server's ready report; fails fast, with its log, when it exits or closes the pipe."""
        deadline = time.monotonic() + timeout
        data = b""
        while time.monotonic() < deadline:
            try:
                chunk = os.read(self._ready_r, _MAX_READY_BYTES)
            except BlockingIOError:
                chunk = None
            if chunk == b"" or proc.returncode is not None:
                await log.settle()
                code = "" if proc.returncode is None else f" with code {proc.returncode}"
                raise SandboxError(
                    f"{what} exited{code} before the exec server was ready: {log.tail()}"
                )
            if chunk:
                data += chunk
                if b"\n" in data or len(data) > _MAX_READY_BYTES:
                    return _ready_info(data, what)
            await asyncio.sleep(0.005)
        raise SandboxError(f"{what}: the exec server was not ready after {timeout:.0f}s")

    def close(self) -> None:
        self.spawned()
        if self._ready_r >= 0:
            os.close(self._ready_r)
            self._ready_r = -1


def _ready_info(data: bytes, what: str) -> dict[str, object]:
    try:
        info = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise SandboxError(f"{what}: the exec server's ready report is not a JSON object")
    return info


class CappedLog:
    """Copies a child's stderr into a host file, up to MAX_LOG_BYTES; the rest is dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._task: asyncio.Task[None] | None = None

    def follow(self, stream: asyncio.StreamReader | None) -> None:
        if stream is not None:
            self._task = asyncio.create_task(self._copy(stream))

    async def _copy(self, stream: asyncio.StreamReader) -> None:
        written = 0
        with self.path.open("ab") as log:
            while chunk := await stream.read(65536):
                if written < MAX_LOG_BYTES:
                    piece = chunk[: MAX_LOG_BYTES - written]
                    log.write(piece)
                    written += len(piece)
                    if written >= MAX_LOG_BYTES:
                        log.write(LOG_CUT_MARKER)
                    log.flush()

    async def settle(self, timeout: float = 2.0) -> None:
        """Let the copy catch up with a child that has exited (its stderr ends soon after)."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout)

    def tail(self) -> str:
        return _file_tail(self.path)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class Sandbox(ABC):
    """One sandbox: `start()` returns the exec server's endpoint, `stop()` removes everything."""

    name: ClassVar[str]

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.token = new_token()
        self.parent = self.state_parent()
        # Private host directory for the socket and the ready file; removed on stop.
        self.rundir = Path(tempfile.mkdtemp(prefix=f"llmsandbox-{self.name}-", dir=self.parent))
        # The exec server's own log, outside anything the sandbox can write to; read on failure.
        fd, log = tempfile.mkstemp(
            prefix=f"llmsandbox-{self.name}-", suffix=".log", dir=self.parent
        )
        os.close(fd)
        self.log_path = Path(log)
        self._stopped = False
        # Whether commands run as another uid than the exec server (so they cannot signal,
        # trace or replace it); backends that can arrange it say so.
        self.split_users = False
        # What really holds the config's limits; backends fill it in when they start.
        self.enforcement = unenforced(config, f"the {self.name} sandbox has not started")

    @classmethod
    def state_parent(cls) -> str | None:
        """Where this backend keeps a sandbox's host state; None for the temporary directory."""
        return None

    @abstractmethod
    async def start(self) -> ExecEndpoint:
        """Start the sandbox and its exec server; return once the server answers."""

    @abstractmethod
    async def _teardown(self) -> None:
        """Kill whatever start() created. Must be safe to call after a failed start."""

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            await self._teardown()
        finally:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)

    async def __aenter__(self) -> ExecEndpoint:
        try:
            return await self.start()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def wait_for_ready_file(
    ready_file: Path,
    proc: asyncio.subprocess.Process,
    timeout: float,
    what: str,
    log_path: Path | None = None,
) -> dict[str, object]:
    """Poll for the exec server's ready file; fail fast, with its stderr, if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready_file.exists():
            try:
                data = json.loads(ready_file.read_text())
            except (OSError, ValueError):
                data = None
            if isinstance(data, dict):
                return data
        if proc.returncode is not None:
            raise SandboxError(
                f"{what} exited with code {proc.returncode} before the exec server was ready: "
                f"{_file_tail(log_path) if log_path else await _stderr_tail(proc)}"
            )
        await asyncio.sleep(0.005)
    raise SandboxError(f"{what}: the exec server was not ready after {timeout:.0f}s")


def _file_tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return "(no log)"
    return data.decode("utf-8", "replace").strip() or "(no output)"


async def _stderr_tail(proc: asyncio.subprocess.Process, limit: int = 2000) -> str:
    if proc.stderr is None:
        return "(no stderr captured)"
    try:
        data = await asyncio.wait_for(proc.stderr.read(), timeout=2)
    except TimeoutError:
        return "(stderr not readable)"
    text = data.decode("utf-8", "replace").strip()
    return text[-limit:] if text else "(no output)"


async def terminate(proc: asyncio.subprocess.Process | None, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after a grace period; always reaps the process."""
    if proc is None or proc.returncode is not None:
        return
    try:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=grace)
    except ProcessLookupError:
        return
    except TimeoutError:
        try:
            proc.kill()
        except ProcessLookupError:
            return
        await proc.wait()


def host_env_for_sandbox(extra: dict[str, str]) -> dict[str, str]:
    """A minimal environment for sandboxed processes: nothing of the caller's leaks in (no API keys)."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TERM": "dumb",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


def which(cmd: str) -> str | None:
    """shutil.which, remembered per PATH: every sandbox start looks up the same few programs
    (bwrap, setpriv, unshare, prlimit), each a stat of every PATH directory."""
    return _which(cmd, os.environ.get("PATH"))


@functools.lru_cache(maxsize=64)
def _which(cmd: str, path: str | None) -> str | None:
    return shutil.which(cmd, path=path)
