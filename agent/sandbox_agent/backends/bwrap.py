"""The `bwrap` backend: bubblewrap namespaces around the exec server, on an allow-listed view of the host.

What a sandbox sees of the host is read-only and short: the system directories (/usr and the
/bin, /sbin, /lib* links or directories), the few /etc files a shell, Python and a compiler
need, and stub passwd/group/hosts files. Never the host's home directories, /root, /var, /tmp,
the project checkout, Docker's data or any sandbox's run directory: /workspace, /tmp and /run are
its own. Each sandbox runs under host uids of its own, never the caller's root:

- As root, a user namespace is made per sandbox with two host uids: the exec server is uid 0
  inside (an unprivileged host uid, with CAP_KILL, CAP_SETGID and CAP_SETUID in that namespace
  only) and the commands are uid 1000 (another host uid, no capabilities). The commands cannot
  signal, trace or read the exec server; it makes files for them with their rights.
- As another user, bubblewrap maps that user to uid 1000 inside, once: the exec server and the
  commands share it, and the exec server protects itself by being non-dumpable.

Either way a seccomp filter (backends/seccomp.py) refuses namespaces, mounts, ptrace,
pidfd_getfd and the rest of its list, and the exec server's socket and token are passed as
inherited descriptors, so nothing of them lies on a path the commands can see.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import glob
import os
import py_compile
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import BackendUnavailableError, SandboxError
from ..execd_cmdline import InheritedFds, execd_cmdline
from ..wire import WORKSPACE
from .base import (
    CappedLog,
    ExecEndpoint,
    HandOff,
    Sandbox,
    SandboxConfig,
    execd_source,
    host_env_for_sandbox,
    terminate,
    which,
)
from .limits import MIB, Enforcement, SandboxLimits, human_bytes
from .seccomp import filter_program, machine, supported

# The commands' uid and gid inside every sandbox; the exec server's is 0 when the host is root.
SANDBOX_UID = 1000
EXECD_UID = 0
HOME = "/tmp/home"
# Host paths bound read-only where they exist (as symlinks where the host has symlinks).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_ENTRIES = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "ssl/certs",
    "ssl/openssl.cnf",
    "ca-certificates",
    "ca-certificates.conf",
    "localtime",
    "timezone",
    "nsswitch.conf",
    "host.conf",
    "gai.conf",
    "os-release",
    "debian_version",
    "mime.types",
    "magic",
    "protocols",
    "services",
    "inputrc",
)
# Python's per-version configuration (Debian's sitecustomize lives there).
ETC_GLOBS = ("python3*",)
# Only with a network: name resolution.
ETC_NETWORK_ENTRIES = ("resolv.conf",)
# Caps for the writable tmpfs mounts that are not the task's disk: without a size each could grow
# to half the host's RAM. /dev/shm gets Docker's default; /run holds nothing but mount points.
SHM_BYTES = 64 * MIB
SCRATCH_BYTES = 1 * MIB
# Host uids for sandboxes run by root: a base per sandbox (the exec server), plus one (the
# commands), far above any real account and below the overflow ids.
HOST_UID_BASE = 1_879_048_192
HOST_UID_SLOTS = 1 << 24
# Stops a root sandbox's holder process once its user namespace is in use.
_HOLDER_TIMEOUT = 10.0


# Imported rather than run as a script so Python can use bytecode compiled ahead of time: it
# saves compiling the exec server on every start, about a quarter of the sandbox's start time.
# os._exit, as execd's own __main__ does: request threads have nothing to finish at exit.
_LAUNCH = (
    "import os, sys; sys.path.insert(0, '/run/execd-bin'); import execd; os._exit(execd.main())"
)
# Leaves root for one uid (with no groups) and execs the rest; used where setpriv is missing.
_DEMOTE = (
    "import os, sys; u = int(sys.argv[1]); os.setgroups([]); os.setresgid(u, u, u); "
    "os.setresuid(u, u, u); os.execvp(sys.argv[2], sys.argv[2:])"
)


def _shared_dir(prefix: str) -> Path:
    """A directory every sandbox of this process reads (never writes): removed at exit."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    # Sandboxes of a root caller run under other host uids: they must be able to read it.
    root.chmod(0o755)
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.cache
def _compiled_execd() -> Path:
    """The exec server with its bytecode beside it, mounted read-only into every sandbox.

    A sandbox whose python3 has another version ignores the bytecode (the magic number
    differs) and compiles in memory; nothing in the sandbox can write to it.
    """
    root = _shared_dir("llmsandbox-execd-")
    source = root / "execd.py"
    shutil.copy2(execd_source(), source)
    source.chmod(0o644)
    cache = root / "__pycache__" / f"execd.{sys.implementation.cache_tag}.pyc"
    py_compile.compile(str(source), cfile=str(cache), doraise=True)
    cache.parent.chmod(0o755)
    cache.chmod(0o644)
    return root


def stub_etc_files() -> dict[str, str]:
    """/etc/passwd, group, hosts and hostname as a sandbox sees them: its own users only."""
    return {
        "passwd": (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox:{HOME}:/bin/bash\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "group": f"root:x:0:\nsandbox:x:{SANDBOX_UID}:\nnogroup:x:65534:\n",
        "hosts": "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        "hostname": "sandbox\n",
    }


@functools.cache
def _stub_etc() -> Path:
    root = _shared_dir("llmsandbox-etc-")
    for name, text in stub_etc_files().items():
        (root / name).write_text(text)
        (root / name).chmod(0o644)
    return root


def bwrap_path() -> str | None:
    return which("bwrap")


@functools.cache
def _bwrap_help() -> str:
    exe = bwrap_path()
    if exe is None:
        return ""
    try:
        res = subprocess.run(
            [exe, "--help"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return res.stdout + res.stderr


def bwrap_sizes_tmpfs() -> bool:
    """Whether this bubblewrap has `--size` (0.5 and later), to cap a tmpfs."""
    return "--size" in _bwrap_help()


def bwrap_disables_userns() -> bool:
    """Whether this bubblewrap has `--disable-userns` (0.8 and later)."""
    return "--disable-userns" in _bwrap_help()


def _tmpfs(path: str, size: int | None, perms: str) -> list[str]:
    args = ["--perms", perms]
    if size and bwrap_sizes_tmpfs():
        args += ["--size", str(size)]
    return [*args, "--tmpfs", path]


@functools.cache
def system_binds(network: bool) -> tuple[str, ...]:
    """The allow-listed view of the host: system directories and a few /etc entries, read-only.
    Worked out once per process (it globs and stats /etc), not at every sandbox start."""
    args: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    entries = list(ETC_ENTRIES) + (list(ETC_NETWORK_ENTRIES) if network else [])
    for pattern in ETC_GLOBS:
        entries += sorted(os.path.relpath(p, "/etc") for p in glob.glob(f"/etc/{pattern}"))
    # Made explicitly: the parents bwrap makes for a bind on its own are 0700 (root's alone).
    made: set[str] = set()
    for entry in entries:
        host = os.path.join("/etc", entry)
        if not os.path.lexists(host):
            continue
        for parent in reversed(Path(host).parents[:-1]):
            if str(parent) not in made:
                made.add(str(parent))
                args += ["--perms", "0755", "--dir", str(parent)]
        # Bound as resolved (resolv.conf is often a link into /run); inside, at its own name.
        args += ["--ro-bind", os.path.realpath(host), host]
    stubs = _stub_etc()
    for name in stub_etc_files():
        args += ["--ro-bind", str(stubs / name), f"/etc/{name}"]
    return tuple(args)


def visible_roots() -> list[str]:
    """Host directories (resolved) that any sandbox can read: nothing private may live below."""
    roots = {os.path.realpath(p) for p in SYSTEM_DIRS if os.path.exists(p)}
    roots |= {os.path.realpath(str(_compiled_execd())), os.path.realpath(str(_stub_etc()))}
    return sorted(roots | {"/etc"})


def private_parent() -> str:
    """Where a sandbox's own host state (run directory, workspace) may live: the temporary
    directory, unless TMPDIR points into something every sandbox sees."""
    for candidate in (tempfile.gettempdir(), "/tmp"):
        real = os.path.realpath(candidate)
        if not any(real == r or real.startswith(r.rstrip("/") + "/") for r in visible_roots()):
            return real
    raise SandboxError(
        f"TMPDIR={tempfile.gettempdir()} lies inside a directory every bwrap sandbox can read; "
        "point TMPDIR elsewhere (e.g. /tmp) so that one sandbox's files stay its own"
    )


def _host_uid_base() -> int:
    return HOST_UID_BASE + 2 * secrets.randbelow(HOST_UID_SLOTS)


def _demote(uid: int) -> list[str]:
    """A command prefix that runs the rest as host uid:gid `uid` with no groups or capabilities."""
    setpriv = which("setpriv")
    if setpriv is not None:
        return [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    return [sys.executable, "-I", "-S", "-c", _DEMOTE, str(uid)]


class _UserNamespace:
    """A user namespace made by root with two mapped uids, held open until bwrap has entered it.

    Only root may map more than one uid into a namespace; bubblewrap maps one. So a short-lived
    holder process (owned by the exec server's host uid, which bwrap then runs as) creates the
    namespace, root writes its maps, and bwrap joins it with `--userns FD`.
    """

    def __init__(self, base: int) -> None:
        self.base = base
        self.fd: int | None = None
        self._holder: asyncio.subprocess.Process | None = None

    @staticmethod
    def available() -> bool:
        return os.geteuid() == 0 and which("unshare") is not None

    async def open(self) -> int:
        unshare = which("unshare")
        assert unshare is not None
        holder = await asyncio.create_subprocess_exec(
            *_demote(self.base),
            unshare,
            "--user",
            "--",
            "/bin/sh",
            "-c",
            "echo ready; exec cat >/dev/null",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
        )
        self._holder = holder
        assert holder.stdout is not None
        try:
            line = await asyncio.wait_for(holder.stdout.readline(), _HOLDER_TIMEOUT)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            err = b""
            if holder.stderr is not None:
                with contextlib.suppress(TimeoutError):
                    err = await asyncio.wait_for(holder.stderr.read(2000), 2)
            raise SandboxError(
                f"cannot make the sandbox's user namespace: {err.decode(errors='replace').strip()}"
            )
        pid = holder.pid
        maps = f"{EXECD_UID} {self.base} 1\n{SANDBOX_UID} {self.base + 1} 1\n"
        try:
            Path(f"/proc/{pid}/uid_map").write_text(maps)
            Path(f"/proc/{pid}/gid_map").write_text(maps)
            self.fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SandboxError(f"cannot map the sandbox's user namespace: {exc}") from exc
        return self.fd

    async def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        holder, self._holder = self._holder, None
        if holder is not None:
            if holder.stdin is not None:
                holder.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(holder.wait(), 2)
            await terminate(holder, grace=1.0)


class BwrapSandbox(Sandbox):
    """An allow-listed read-only view of the host, private /workspace, /tmp and /run, new
    pid/ipc/uts/user namespaces, a seccomp filter, no network unless the task allows it; the
    whole sandbox dies with its parent."""

    name = "bwrap"

    def __init__(self, config: SandboxConfig) -> None:
        super().__init__(config)
        # With a disk limit the workspace is a tmpfs of that size: a host directory could not be
        # capped as a whole (RLIMIT_FSIZE caps one file; many files would fill the host's disk).
        # Outputs leave through the exec server's file API, so the host needs no view of it.
        self.workspace_bytes = config.disk_bytes if bwrap_sizes_tmpfs() else None
        self.host_workspace: Path | None = None
        if not self.workspace_bytes:
            self.host_workspace = Path(tempfile.mkdtemp(prefix="llmsandbox-ws-", dir=self.parent))
        self.limits = SandboxLimits(config)
        # Root splits the exec server from the commands (two host uids); others cannot.
        self.split_users = _UserNamespace.available()
        self.host_uid = _host_uid_base() if os.geteuid() == 0 else os.getuid()
        self._proc: asyncio.subprocess.Process | None = None
        self._userns: _UserNamespace | None = None
        self._log = CappedLog(self.log_path)

    @classmethod
    def state_parent(cls) -> str:
        return private_parent()

    def command(
        self,
        hand_off: InheritedFds,
        userns_fd: int | None = None,
        seccomp_fd: int | None = None,
    ) -> list[str]:
        """The full bwrap command line; pure, so tests can inspect the isolation it asks for."""
        exe = bwrap_path()
        if exe is None:
            raise BackendUnavailableError(
                "bubblewrap is not installed: `apt-get install bubblewrap` "
                "(or choose --backend docker / --backend process)"
            )
        args = [exe, *system_binds(self.config.network)]
        if self.host_workspace is None:
            workspace = _tmpfs(WORKSPACE, self.workspace_bytes, "0777")
        else:
            workspace = ["--bind", str(self.host_workspace), WORKSPACE]
        args += [
            "--dev", "/dev",
            *_tmpfs("/dev/shm", SHM_BYTES, "1777"),
            # bwrap's /dev is a tmpfs the sandbox owns; read-only, it cannot be used as disk.
            # Device nodes, /dev/pts and /dev/shm are mounts of their own and stay writable.
            "--remount-ro", "/dev",
            "--proc", "/proc",
            *_tmpfs("/tmp", self.config.disk_bytes, "1777"),
            *_tmpfs("/run", SCRATCH_BYTES, "0755"),
            *workspace,
            "--ro-bind", str(_compiled_execd()), "/run/execd-bin",
            # The root itself is bwrap's tmpfs, holding the mount points: read-only, it cannot be
            # used as (unbounded, in-memory) disk space, nor /etc changed.
            "--remount-ro", "/",
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "sandbox",
            "--die-with-parent",
            "--new-session",
            "--clearenv",
            "--chdir", WORKSPACE,
        ]  # fmt: skip
        args += self._user_args(userns_fd)
        if seccomp_fd is not None:
            args += ["--seccomp", str(seccomp_fd)]
        if not self.config.network:
            args.append("--unshare-net")
        env = host_env_for_sandbox(
            {"HOME": HOME, "USER": "sandbox"} | self.limits.env() | self.config.env
        )
        for key, value in sorted(env.items()):
            args += ["--setenv", key, value]
        commands = (SANDBOX_UID, SANDBOX_UID) if self.split_users else None
        execd = execd_cmdline(["-c", _LAUNCH], WORKSPACE, hand_off, command_user=commands)
        return [*args, "--", *execd]

    def _user_args(self, userns_fd: int | None) -> list[str]:
        if self.split_users:
            # Inside the namespace made for this sandbox: the exec server as its uid 0, with just
            # what it needs to start shells as the commands' uid and to kill them.
            return [
                "--userns", str(userns_fd if userns_fd is not None else -1),
                "--uid", str(EXECD_UID), "--gid", str(EXECD_UID),
                "--cap-drop", "ALL",
                "--cap-add", "CAP_KILL", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETUID",
            ]  # fmt: skip
        args = ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
        if bwrap_disables_userns():
            args.append("--disable-userns")
        return [*args, "--cap-drop", "ALL"]

    def _launcher(self) -> list[str]:
        """Root never runs bwrap itself: the sandbox's own host uid does."""
        return _demote(self.host_uid) if os.geteuid() == 0 else []

    async def start(self) -> ExecEndpoint:
        if self.host_workspace is not None and self.split_users:
            # The commands' host uid owns the workspace they write, the exec server's group may
            # enter it (bwrap starts there), nobody else may.
            os.chown(self.host_workspace, self.host_uid + 1, self.host_uid)
            self.host_workspace.chmod(0o770)
        elif self.host_workspace is not None and os.geteuid() == 0:
            os.chown(self.host_workspace, self.host_uid, self.host_uid)
        handoff = HandOff(self.rundir, self.token)
        seccomp_r: int | None = None
        try:
            userns_fd = None
            if self.split_users:
                self._userns = _UserNamespace(self.host_uid)
                userns_fd = await self._userns.open()
            if supported():
                seccomp_r, seccomp_w = os.pipe()
                os.write(seccomp_w, filter_program())
                os.close(seccomp_w)
            command = self.command(handoff.descriptors(), userns_fd, seccomp_r)
            self.enforcement = self._enforcement(self.limits.setup())
            self._proc = await handoff.launch(
                self.limits.wrap([*self._launcher(), *command]),
                log=self._log,
                what="bwrap sandbox",
                timeout=self.config.start_timeout,
                # No PWD or anything else of ours: bwrap's own process is visible inside.
                cwd="/",
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                extra_fds=tuple(fd for fd in (userns_fd, seccomp_r) if fd is not None),
            )
        finally:
            handoff.close()
            if seccomp_r is not None:
                os.close(seccomp_r)
            if self._userns is not None:
                await self._userns.close()
                self._userns = None
        return ExecEndpoint(token=self.token, workspace=WORKSPACE, uds=str(handoff.socket_path))

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
        if not supported():
            unenforced["seccomp"] = f"no filter is known for the {machine()} architecture"
        mechanism = limits.mechanism
        if "disk" in enforced:
            mechanism = "tmpfs sizes" if mechanism == "none" else f"{mechanism} + tmpfs sizes"
        return Enforcement(mechanism, enforced, unenforced)

    async def _teardown(self) -> None:
        try:
            await terminate(self._proc)
            # Nothing outlives the sandbox: whatever escaped the pid namespace's end is killed here.
            await self.limits.release()
            await self._log.stop()
        finally:
            if self.host_workspace is not None:
                shutil.rmtree(self.host_workspace, ignore_errors=True)
