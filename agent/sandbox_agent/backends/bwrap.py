"""The `bwrap` backend: bubblewrap namespaces around the exec server, the host root mounted read-only."""

from __future__ import annotations

import asyncio
import atexit
import functools
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import BackendUnavailableError
from .base import (
    ExecEndpoint,
    Sandbox,
    SandboxConfig,
    execd_source,
    host_env_for_sandbox,
    seal_rundir,
    terminate,
    wait_for_ready_file,
)
from .limits import MIB, Enforcement, SandboxLimits, human_bytes

WORKSPACE = "/workspace"
SANDBOX_UID = 1000
# Top-level host directories the sandbox must not see as they are: they get fresh mounts instead.
_NOT_BOUND = {"proc", "dev", "sys", "tmp", "run", "workspace"}
# Places in a home directory that commonly hold credentials; hidden behind empty mounts.
_SECRET_HOME_PATHS = (
    ".ssh",
    ".aws",
    ".azure",
    ".config",
    ".docker",
    ".gnupg",
    ".kube",
    ".netrc",
    ".git-credentials",
    ".pypirc",
    ".npmrc",
)
# Caps for the writable tmpfs mounts that are not the task's disk: without a size each could grow
# to half the host's RAM. /dev/shm gets Docker's default; /run and the credential masks hold
# nothing but mount points.
SHM_BYTES = 64 * MIB
SCRATCH_BYTES = 1 * MIB


# Imported rather than run as a script so Python can use bytecode compiled ahead of time: it
# saves compiling the exec server on every start, about a quarter of the sandbox's start time.
# os._exit, as execd's own __main__ does: request threads have nothing to finish at exit.
_LAUNCH = (
    "import os, sys; sys.path.insert(0, '/run/execd-bin'); import execd; os._exit(execd.main())"
)


@functools.cache
def _compiled_execd() -> Path:
    """The exec server with its bytecode beside it, mounted read-only into every sandbox.

    A sandbox whose python3 has another version ignores the bytecode (the magic number
    differs) and compiles in memory; nothing in the sandbox can write to it.
    """
    root = Path(tempfile.mkdtemp(prefix="llmsandbox-execd-"))
    source = root / "execd.py"
    shutil.copy2(execd_source(), source)
    cache = root / "__pycache__" / f"execd.{sys.implementation.cache_tag}.pyc"
    py_compile.compile(str(source), cfile=str(cache), doraise=True)
    atexit.register(shutil.rmtree, root, True)
    return root


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


@functools.cache
def bwrap_sizes_tmpfs() -> bool:
    """Whether this bubblewrap has `--size` (0.5 and later), to cap a tmpfs."""
    exe = bwrap_path()
    if exe is None:
        return False
    try:
        res = subprocess.run(
            [exe, "--help"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return "--size" in res.stdout + res.stderr


def _tmpfs(path: str, size: int | None) -> list[str]:
    if size and bwrap_sizes_tmpfs():
        return ["--size", str(size), "--tmpfs", path]
    return ["--tmpfs", path]


class BwrapSandbox(Sandbox):
    """Read-only host root, private /workspace and /tmp, new pid/ipc/uts/user namespaces, no network
    unless the task allows it; the whole sandbox dies with its parent."""

    name = "bwrap"

    def __init__(self, config: SandboxConfig) -> None:
        super().__init__(config)
        # With a disk limit the workspace is a tmpfs of that size: a host directory could not be
        # capped as a whole (RLIMIT_FSIZE caps one file; many files would fill the host's disk).
        # Outputs leave through the exec server's file API, so the host needs no view of it.
        self.workspace_bytes = config.disk_bytes if bwrap_sizes_tmpfs() else None
        self.host_workspace: Path | None = None
        if not self.workspace_bytes:
            self.host_workspace = Path(tempfile.mkdtemp(prefix="llmsandbox-ws-"))
        self.limits = SandboxLimits(config)
        self._proc: asyncio.subprocess.Process | None = None

    def command(self) -> list[str]:
        """The full bwrap command line; pure, so tests can inspect the isolation it asks for."""
        exe = bwrap_path()
        if exe is None:
            raise BackendUnavailableError(
                "bubblewrap is not installed: `apt-get install bubblewrap` "
                "(or choose --backend docker / --backend process)"
            )
        args = [exe]
        for entry in sorted(os.listdir("/")):
            src = os.path.join("/", entry)
            if entry in _NOT_BOUND or not os.path.exists(src):
                continue
            args += ["--ro-bind", src, src]
        home = os.path.expanduser("~")
        for rel in _SECRET_HOME_PATHS:
            p = os.path.join(home, rel)
            if os.path.isdir(p) and not os.path.islink(p):
                args += _tmpfs(p, SCRATCH_BYTES)
            elif os.path.isfile(p):
                args += ["--ro-bind", "/dev/null", p]
        if self.host_workspace is None:
            workspace = _tmpfs(WORKSPACE, self.workspace_bytes)
        else:
            workspace = ["--bind", str(self.host_workspace), WORKSPACE]
        args += [
            "--dev", "/dev",
            *_tmpfs("/dev/shm", SHM_BYTES),
            # bwrap's /dev is a tmpfs the sandbox owns; read-only, it cannot be used as disk.
            # Device nodes, /dev/pts and /dev/shm are mounts of their own and stay writable.
            "--remount-ro", "/dev",
            "--proc", "/proc",
            *_tmpfs("/tmp", self.config.disk_bytes),
            *_tmpfs("/run", SCRATCH_BYTES),
            *workspace,
            "--bind", str(self.rundir), "/run/execd",
            "--ro-bind", str(_compiled_execd()), "/run/execd-bin",
            "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "sandbox",
            "--cap-drop", "ALL",
            "--die-with-parent",
            "--new-session",
            "--clearenv",
            "--chdir", WORKSPACE,
        ]  # fmt: skip
        if not self.config.network:
            args.append("--unshare-net")
        env = host_env_for_sandbox({"HOME": "/tmp/home", "USER": "sandbox"} | self.config.env)
        for key, value in sorted(env.items()):
            args += ["--setenv", key, value]
        args += [
            "--",
            "python3",
            "-I",
            "-S",
            "-c",
            _LAUNCH,
            "--root",
            WORKSPACE,
            "--unix-socket",
            "/run/execd/execd.sock",
            "--token-file",
            "/run/execd/token",
            "--ready-file",
            "/run/execd/ready.json",
        ]
        return args

    async def start(self) -> ExecEndpoint:
        token_file = self.rundir / "token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        command = self.command()
        self.enforcement = self._enforcement(self.limits.setup())
        with self.log_path.open("wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *self.limits.wrap(command),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            )
        await wait_for_ready_file(
            self.rundir / "ready.json",
            self._proc,
            self.config.start_timeout,
            "bwrap sandbox",
            self.log_path,
        )
        # The exec server read its token at start; the file need not outlive that.
        token_file.unlink(missing_ok=True)
        seal_rundir(self.rundir)
        return ExecEndpoint(
            token=self.token, workspace=WORKSPACE, uds=str(self.rundir / "execd.sock")
        )

    def _enforcement(self, limits: Enforcement) -> Enforcement:
        """The process limits, plus what caps the disk."""
        enforced, unenforced = dict(limits.enforced), dict(limits.unenforced)
        disk = self.config.disk_bytes
        if disk and self.workspace_bytes:
            enforced["disk"] = (
                f"{human_bytes(disk)} each for /workspace and /tmp (sized tmpfs, in memory)"
            )
        elif disk:
            unenforced["disk"] = (
                "this bubblewrap cannot size a tmpfs (--size needs 0.5 or later): /workspace is a "
                "host directory, only single files are capped"
            )
        mechanism = limits.mechanism
        if "disk" in enforced:
            mechanism = "tmpfs sizes" if mechanism == "none" else f"{mechanism} + tmpfs sizes"
        return Enforcement(mechanism, enforced, unenforced)

    async def _teardown(self) -> None:
        try:
            await terminate(self._proc)
            # Nothing outlives the sandbox: whatever escaped the pid namespace's end is killed here.
            await self.limits.release()
        finally:
            if self.host_workspace is not None:
                shutil.rmtree(self.host_workspace, ignore_errors=True)
