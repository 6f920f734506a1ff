"""The `docker` backend: the exec server in a locked-down container on a local Docker engine.

The container starts as root with three capabilities only (CAP_KILL, CAP_SETGID, CAP_SETUID)
and no-new-privileges; the exec server drops at once to an unprivileged uid of its own, keeping
just those, and runs every command as nobody (65534) without any capability. So commands cannot
signal, trace or read the exec server (Docker's default seccomp profile allows ptrace), nor
enter the bind-mounted run directory that holds its socket and token. The root is read-only,
/workspace and /tmp are tmpfs, and there is no network unless the task allows one. The exec
server file is mounted in read-only. Images are never pulled: they are built locally
(`bash images/base/build.sh`, then images/).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import subprocess
from pathlib import Path

from ..errors import BackendUnavailableError, SandboxError
from ..execd_cmdline import READY_FILE, SOCKET_FILE, TOKEN_FILE, RunDirFiles, execd_cmdline
from ..wire import DEFAULT_SANDBOX_IMAGE, WORKSPACE
from .base import (
    ExecEndpoint,
    Sandbox,
    SandboxConfig,
    execd_source,
    host_env_for_sandbox,
    terminate,
    wait_for_ready_file,
    which,
)
from .limits import Enforcement, human_bytes

DEFAULT_IMAGE = DEFAULT_SANDBOX_IMAGE
BASE_IMAGE = "llm-sandbox/base:bookworm"
# Commands run as nobody:nogroup, which exists in every Debian-based image and owns nothing.
SANDBOX_UID = 65534
SANDBOX_GID = 65534
# The exec server's own uid when the host is root: any uid the image gives no meaning to.
EXECD_UID = 65533
# What the exec server needs to start commands as another uid and to kill them.
EXECD_CAPS = ("KILL", "SETGID", "SETUID")
MANAGED_LABEL = "llmsandbox.io/managed"
EXECD_PATH = "/opt/llmsandbox/execd.py"
RUNDIR = "/run/execd"

# `docker version` answers in ~50 ms from a healthy local engine; a stuck one must not stall callers.
_REACHABLE_TIMEOUT = 5.0
_CLI_TIMEOUT = 60.0

# The container's main process. The host keeps the `docker run -i` CLI's stdin open for the
# sandbox's lifetime; when the host process goes away, even by SIGKILL, the pipe closes, the
# container's stdin reaches EOF, the exec server is stopped, and `--rm` deletes the container.
# Background jobs of a non-interactive sh get /dev/null as stdin, hence the copy on fd 3.
_ENTRYPOINT = """\
exec 3<&0
"$@" </dev/null 3<&- &
pid=$!
{ cat <&3 >/dev/null; kill -TERM "$pid" 2>/dev/null; } &
exec 3<&-
wait "$pid"
"""


def docker_path() -> str | None:
    return which("docker")


def _cli_env() -> dict[str, str]:
    """Environment for the docker CLI: what it needs to find the engine and nothing else, so that
    even a stray `-e NAME` could not copy a caller's secret into a sandbox."""
    keep = {"PATH", "HOME", "XDG_RUNTIME_DIR"}
    return {k: v for k, v in os.environ.items() if k in keep or k.startswith("DOCKER_")}


@functools.cache
def docker_reachable() -> bool:
    """Whether a docker CLI is on PATH and its engine answers; cached for the process, never raises."""
    exe = docker_path()
    if exe is None:
        return False
    try:
        res = subprocess.run(
            [exe, "version", "--format", "{{.Server.Version}}"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_REACHABLE_TIMEOUT,
            env=_cli_env(),
            check=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return False
    return res.returncode == 0 and bool(res.stdout.strip())


def missing_image_message(image: str) -> str:
    if image == DEFAULT_IMAGE:
        build = (
            f"build it from a checkout of the project with `bash images/build.sh sandbox` "
            f"(no registry needed: it starts from a debootstrapped {BASE_IMAGE})"
        )
    else:
        build = "build it, or `docker load` it"
    return (
        f"Docker image {image!r} is not present on the local engine, and sandboxes never pull "
        f"images: {build}; or name one that exists (`docker images`) with --image or the "
        "task's spec.sandbox.image."
    )


def _tmpfs(path: str, size: int | None, extra: str) -> str:
    # exec: tasks compile and run their own programs here (Docker's tmpfs default is noexec).
    opts = f"rw,exec,nosuid,nodev,{extra}"
    if size:
        opts += f",size={size}"
    return f"{path}:{opts}"


def docker_run_args(
    config: SandboxConfig,
    *,
    name: str,
    rundir: str | Path,
    execd: str | Path,
    server_user: tuple[int, int] = (EXECD_UID, EXECD_UID),
    user: tuple[int, int] = (SANDBOX_UID, SANDBOX_GID),
) -> list[str]:
    """The `docker` arguments (from `run` on) for one sandbox; pure, so tests can check the
    isolation it asks for without an engine. `server_user` runs the exec server, `user` the
    commands."""
    uid, gid = user
    image = config.image or DEFAULT_IMAGE
    args = [
        "run",
        "--rm",
        # Attached with stdin open: see _ENTRYPOINT for why the container's life hangs on it.
        "--interactive",
        "--pull", "never",
        "--name", name,
        "--label", f"{MANAGED_LABEL}=true",
        "--hostname", "sandbox",
        # tini as PID 1 reaps the zombies that backgrounded commands leave behind.
        "--init",
        # Root only until the exec server drops to server_user (see the module docstring).
        "--user", "0:0",
        "--cap-drop", "ALL",
        *(arg for cap in EXECD_CAPS for arg in ("--cap-add", cap)),
        "--security-opt", "no-new-privileges",
        "--read-only",
        "--tmpfs", _tmpfs("/tmp", config.disk_bytes, "mode=1777"),
        "--tmpfs", _tmpfs(WORKSPACE, config.disk_bytes, f"mode=0755,uid={uid},gid={gid}"),
        "--mount", f"type=bind,source={execd},target={EXECD_PATH},readonly",
        "--mount", f"type=bind,source={rundir},target={RUNDIR}",
        "--workdir", WORKSPACE,
        # Output reaches us through the attached CLI; the json-file driver would keep an
        # unbounded copy on the host disk that sandboxed commands could fill.
        "--log-driver", "none",
    ]  # fmt: skip
    if not config.network:
        args += ["--network", "none"]
    if config.cpus:
        args += ["--cpus", f"{config.cpus:g}"]
    if config.memory_bytes:
        # Swap equal to memory means no swap: the limit is the real ceiling.
        args += ["--memory", str(config.memory_bytes), "--memory-swap", str(config.memory_bytes)]
    if config.pids_limit:
        args += ["--pids-limit", str(config.pids_limit)]
    env = host_env_for_sandbox({"HOME": "/tmp/home", "USER": "sandbox"} | config.env)
    for key, value in sorted(env.items()):
        args += ["--env", f"{key}={value}"]
    server = execd_cmdline(
        [EXECD_PATH], WORKSPACE, RunDirFiles(RUNDIR), drop_to=server_user, command_user=user
    )
    return [*args, image, "/bin/sh", "-c", _ENTRYPOINT, "execd-entrypoint", *server]


def docker_enforcement(config: SandboxConfig) -> Enforcement:
    """What `docker_run_args` asks the engine to enforce; the engine applies it with the
    container's cgroup, so the sentences name the flag rather than a mechanism we checked."""
    enforced: dict[str, str] = {}
    if config.memory_bytes:
        enforced["memory"] = (
            f"{human_bytes(config.memory_bytes)} (--memory = --memory-swap: no swap; "
            "tmpfs files count towards it)"
        )
    if config.pids_limit:
        enforced["pids"] = f"{config.pids_limit} tasks (--pids-limit)"
    if config.cpus:
        enforced["cpu"] = f"{config.cpus:g} (--cpus)"
    if config.disk_bytes:
        enforced["disk"] = (
            f"{human_bytes(config.disk_bytes)} each for /workspace and /tmp (sized tmpfs, "
            "in memory); the root file system is read-only"
        )
    return Enforcement("docker", enforced)


def _server_user() -> tuple[int, int]:
    """The exec server's uid: it must own the run directory. As root we hand the directory to
    EXECD_UID; a non-root caller in the docker group cannot, so the server runs as that caller's
    own (non-root) uid, which owns it already."""
    if os.geteuid() == 0:
        return EXECD_UID, EXECD_UID
    return os.getuid(), os.getgid()


def _command_user(server: tuple[int, int]) -> tuple[int, int]:
    # Never the server's uid: that difference is the whole point.
    if server[0] != SANDBOX_UID:
        return SANDBOX_UID, SANDBOX_GID
    return EXECD_UID, EXECD_UID


async def _docker(exe: str, *args: str, timeout: float = _CLI_TIMEOUT) -> tuple[int, str]:
    """Run one short docker CLI command; return its exit code and stderr."""
    proc = await asyncio.create_subprocess_exec(
        exe,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=_cli_env(),
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except TimeoutError:
        await terminate(proc, grace=1.0)
        raise SandboxError(f"`docker {' '.join(args)}` did not finish in {timeout:.0f}s") from None
    assert proc.returncode is not None
    return proc.returncode, err.decode("utf-8", "replace").strip()


def _engine_down(stderr: str) -> bool:
    low = stderr.lower()
    return "cannot connect to the docker daemon" in low or "is the docker daemon running" in low


class DockerSandbox(Sandbox):
    """One container per sandbox: non-root, no capabilities, read-only root, tmpfs workspace,
    no network unless asked, cgroup limits from the config; removed on stop or when we die."""

    name = "docker"

    def __init__(self, config: SandboxConfig) -> None:
        super().__init__(config)
        self.image = config.image or DEFAULT_IMAGE
        self.container_name = f"llmsandbox-{secrets.token_hex(6)}"
        self._server_user = _server_user()
        self._user = _command_user(self._server_user)
        self.split_users = True
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    def command(self) -> list[str]:
        """The full `docker run` command line for this sandbox."""
        exe = docker_path()
        if exe is None:
            raise BackendUnavailableError(
                "no docker CLI on PATH: `apt-get install docker.io` "
                "(or choose --backend bwrap / --backend process)"
            )
        return [
            exe,
            *docker_run_args(
                self.config,
                name=self.container_name,
                rundir=self.rundir,
                execd=execd_source(),
                server_user=self._server_user,
                user=self._user,
            ),
        ]

    async def start(self) -> ExecEndpoint:
        cmd = self.command()
        await self._check_image(cmd[0])
        token_file = self.rundir / TOKEN_FILE
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        if os.geteuid() == 0:
            # The exec server must create its socket and ready file in the run directory and
            # read the token, all of which mkdtemp made root-only; the commands' uid may not.
            uid, gid = self._server_user
            os.chown(self.rundir, uid, gid)
            os.chown(token_file, uid, gid)
        self.enforcement = docker_enforcement(self.config)
        self._proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            # Our own session: a Ctrl-C at the terminal goes to us, and we stop the container.
            start_new_session=True,
            env=_cli_env(),
        )
        try:
            await wait_for_ready_file(
                self.rundir / READY_FILE,
                self._proc,
                self.config.start_timeout,
                f"docker sandbox {self.container_name} (image {self.image})",
            )
        except BaseException:
            # Nothing may outlive a failed start, even if the caller never calls stop().
            await self._teardown()
            raise
        # The exec server read its token at start; the file need not outlive that.
        token_file.unlink(missing_ok=True)
        self._seal_rundir()
        # Nobody else reads the CLI's stderr from here on; unread, a full pipe would block the
        # exec server's next log line.
        self._drain = asyncio.create_task(_drain(self._proc.stderr))
        return ExecEndpoint(
            token=self.token, workspace=WORKSPACE, uds=str(self.rundir / SOCKET_FILE)
        )

    async def _check_image(self, exe: str) -> None:
        """Fail early and clearly on a missing image; `docker run --pull never` says less."""
        rc, err = await _docker(exe, "image", "inspect", "--format", "{{.Id}}", self.image)
        if rc == 0:
            return
        if "no such image" in err.lower():
            raise SandboxError(missing_image_message(self.image))
        if _engine_down(err):
            raise BackendUnavailableError(
                f"the Docker engine is not reachable ({err[-300:]}); as root, start it with "
                "`bash scripts/start-dockerd.sh` (or choose --backend bwrap / --backend process)"
            )
        raise SandboxError(f"`docker image inspect {self.image}` failed: {err[-500:]}")

    def _seal_rundir(self) -> None:
        """Once the server listens, give the run directory back to root: the sandbox must not use
        this host directory as disk space beyond its tmpfs limits. Best effort, root only."""
        if os.geteuid() != 0:
            return
        for path in (self.rundir / READY_FILE, self.rundir):
            with contextlib.suppress(OSError):
                os.chown(path, 0, 0)
        with contextlib.suppress(OSError):
            self.rundir.chmod(0o700)

    async def _teardown(self) -> None:
        error: SandboxError | None = None
        exe = docker_path()
        if self._proc is not None and exe is not None:
            try:
                rc, err = await _docker(exe, "rm", "--force", self.container_name)
            except SandboxError as exc:
                error = exc
            else:
                # Already gone, or already being removed by --rm: both are what we want.
                low = err.lower()
                if rc != 0 and "no such container" not in low and "already in progress" not in low:
                    error = SandboxError(
                        f"could not remove container {self.container_name}: {err[-500:]}"
                    )
        if self._proc is not None:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            await terminate(self._proc)
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
            self._drain = None
        if error is not None:
            raise error
        # Done: a second call (stop() after a failed start cleaned up) has nothing left to do.
        self._proc = None


async def _drain(stream: asyncio.StreamReader | None) -> None:
    if stream is None:
        return
    while await stream.read(65536):
        pass
