"""A task's memory, process, CPU and file-size limits for local sandboxes, and what really enforces them.

A sandbox gets a cgroup of its own when this host lets us make one: under this process's own
cgroup, in the cgroup v1 hierarchies of the memory, pids and cpu controllers, or in the unified
(v2) hierarchy when that is the only one. The sandbox's first process joins it before it execs
anything (a tiny `sh` wrapper writes its own pid into cgroup.procs, then execs the real command),
so every process the sandbox ever makes is born inside; at stop every process left in it is
killed and the cgroup removed.

Where no cgroup can be made (not root, no delegation, a read-only cgroupfs), rlimits are the
fallback: RLIMIT_AS stands in for memory (per process, address space rather than resident memory)
and nothing stands in for pids or CPU. RLIMIT_NPROC is deliberately not used: root (the owner of
the sandbox's user namespace here) is exempt from it, and for any other user it counts every
process that user has on the host, so it is no per-sandbox cap. RLIMIT_FSIZE (no single file may
outgrow the disk limit) applies either way.

Nothing here pretends: `Enforcement` says, per requested limit, how it is enforced or why it is not,
and the runner shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SandboxError

if TYPE_CHECKING:
    from .base import SandboxConfig

MIB = 1024 * 1024
# CFS bandwidth period; the quota is cpus times this. 100 ms is the kernel's and Docker's default.
CPU_PERIOD_US = 100_000
# The kernel rejects quotas below 1 ms.
MIN_CPU_QUOTA_US = 1_000
# The controllers a sandbox's cgroup uses, in the order their limits are written.
CONTROLLERS = ("memory", "pids", "cpu")
# A sandbox's CPU weight against the processes of ours beside it: 1/16 of the default (1024 for
# v1's cpu.shares, 100 for v2's cpu.weight).
SANDBOX_CPU_SHARES = 64
SANDBOX_CPU_WEIGHT = 6
CGROUP_PREFIX = "llmsandbox-"
# How long stop() keeps killing and retrying rmdir before it reports processes that survived.
RELEASE_TIMEOUT = 10.0

# Joins every cgroup named before `--` (one cgroup.procs file per hierarchy), then execs the rest:
# the sandbox's first process is inside before it runs anything, so nothing can start outside.
_JOIN_SCRIPT = """\
while [ "$#" -gt 0 ] && [ "$1" != -- ]; do
  echo "$$" > "$1" || { echo "llmsandbox: cannot join cgroup $1" >&2; exit 125; }
  shift
done
shift
exec "$@"
"""


@dataclass(frozen=True)
class Enforcement:
    """How each requested limit of one sandbox is really enforced, or why it is not.

    `enforced` and `unenforced` map a resource (memory, pids, cpu, disk) to a sentence; a limit the
    task did not ask for appears in neither. `mechanism` names what carries the limits.
    """

    mechanism: str
    enforced: dict[str, str] = field(default_factory=dict)
    unenforced: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for a person: what holds, then, loudly, what does not."""
        held = "; ".join(f"{k} {v}" for k, v in self.enforced.items()) or "none requested"
        text = f"limits ({self.mechanism}): {held}"
        if self.unenforced:
            text += " | NOT enforced: " + "; ".join(
                f"{k} ({v})" for k, v in self.unenforced.items()
            )
        return text


def human_bytes(n: int) -> str:
    """Bytes as the largest binary unit that divides them evenly, e.g. 256 MiB; else in bytes."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def cpu_quota_us(cpus: float) -> int:
    return max(MIN_CPU_QUOTA_US, round(cpus * CPU_PERIOD_US))


# --- Finding our own cgroups -------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupMount:
    """One cgroupfs mount from /proc/self/mountinfo."""

    version: int
    root: str
    mount_point: Path
    controllers: frozenset[str]


@dataclass(frozen=True)
class CgroupParents:
    """This process's own cgroup directories: per v1 controller, and in the unified hierarchy."""

    v1: dict[str, Path] = field(default_factory=dict)
    v2: Path | None = None


def _unescape(field_text: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def parse_mountinfo(text: str) -> list[CgroupMount]:
    mounts = []
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        fstype, options = tail[0], set(tail[2].split(","))
        root, mount_point = _unescape(fields[3]), Path(_unescape(fields[4]))
        if fstype == "cgroup2":
            mounts.append(CgroupMount(2, root, mount_point, frozenset()))
        elif fstype == "cgroup":
            mounts.append(CgroupMount(1, root, mount_point, frozenset(options & set(CONTROLLERS))))
    return mounts


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """/proc/self/cgroup as (v1 controller -> path, unified path or None)."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
            continue
        for controller in controllers.split(","):
            v1[controller] = path
    return v1, v2


def _inside(mount: CgroupMount, path: str) -> Path | None:
    """Where cgroup `path` (as /proc/self/cgroup names it) lives under `mount`, if it is visible."""
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None
    return mount.mount_point / path[len(root) :].lstrip("/")


def locate_parents(mountinfo: str, proc_cgroup: str) -> CgroupParents:
    """This process's cgroup directories, from the text of /proc/self/{mountinfo,cgroup}; pure."""
    v1_paths, v2_path = parse_proc_cgroup(proc_cgroup)
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for mount in parse_mountinfo(mountinfo):
        if mount.version == 1:
            for controller in mount.controllers:
                if controller in v1_paths and controller not in v1:
                    where = _inside(mount, v1_paths[controller])
                    if where is not None:
                        v1[controller] = where
        elif v2 is None and v2_path is not None:
            v2 = _inside(mount, v2_path)
    return CgroupParents(v1, v2)


def own_cgroup_parents() -> CgroupParents:
    """Where this process's cgroups are on this host; empty when cgroupfs is not mounted."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
        proc_cgroup = Path("/proc/self/cgroup").read_text()
    except OSError:
        return CgroupParents()
    return locate_parents(mountinfo, proc_cgroup)


# --- One sandbox's cgroup ----------------------------------------------------------------------


def _write(path: Path, value: str) -> None:
    # No buffering games: cgroup files take one write(2) per value.
    with path.open("w") as fh:
        fh.write(value)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cgroup_name() -> str:
    # Our pid in the name lets a later run find and remove cgroups a killed process left behind.
    return f"{CGROUP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"


def sweep_stale_cgroups(parents: CgroupParents | None = None) -> list[Path]:
    """Remove empty sandbox cgroups whose creating process is gone (it was SIGKILLed before stop).

    Only empty cgroups can be removed (rmdir refuses the others), so this never touches a running
    sandbox. Returns what was removed.
    """
    parents = parents or own_cgroup_parents()
    removed = []
    dirs = [*parents.v1.values(), *([parents.v2] if parents.v2 else [])]
    for parent in dict.fromkeys(dirs):
        try:
            children = list(parent.glob(f"{CGROUP_PREFIX}*"))
        except OSError:
            continue
        for child in children:
            owner = child.name.removeprefix(CGROUP_PREFIX).split("-", 1)[0]
            if not owner.isdigit() or _pid_alive(int(owner)):
                continue
            with contextlib.suppress(OSError):
                child.rmdir()
                removed.append(child)
    return removed


class SandboxCgroup:
    """The cgroup(s) of one sandbox: one directory per v1 hierarchy, or one in the unified one."""

    def __init__(self, version: int, dirs: dict[str, Path], all_dirs: list[Path]) -> None:
        self.version = version
        # Controller -> the directory whose files set its limits.
        self.dirs = dirs
        # Every directory made (each must be joined and, at the end, removed).
        self.all_dirs = all_dirs

    @property
    def mechanism(self) -> str:
        return f"cgroup v{self.version}"

    @classmethod
    def create(cls, parents: CgroupParents, config: SandboxConfig) -> SandboxCgroup | None:
        """Make the sandbox's cgroup under our own; None when the host does not let us."""
        sweep_stale_cgroups(parents)
        name = _cgroup_name()
        if parents.v1:
            return cls._create_v1(parents.v1, name)
        if parents.v2 is not None:
            return cls._create_v2(parents.v2, name, config)
        return None

    @classmethod
    def _create_v1(cls, parents: dict[str, Path], name: str) -> SandboxCgroup | None:
        dirs: dict[str, Path] = {}
        made: dict[Path, Path] = {}
        for controller in CONTROLLERS:
            parent = parents.get(controller)
            if parent is None:
                continue
            # Co-mounted controllers (cpu,cpuacct) share one directory: make it once.
            if parent not in made:
                try:
                    (parent / name).mkdir()
                except OSError:
                    continue
                made[parent] = parent / name
            dirs[controller] = made[parent]
        return cls(1, dirs, list(made.values())) if made else None

    @classmethod
    def _create_v2(cls, parent: Path, name: str, config: SandboxConfig) -> SandboxCgroup | None:
        wanted = _wanted_controllers(config)
        _enable_controllers(parent, wanted)
        path = parent / name
        try:
            path.mkdir()
        except OSError:
            return None
        try:
            available = set((path / "cgroup.controllers").read_text().split())
        except OSError:
            available = set()
        # Even without a controller the cgroup still gathers every process, for the kill at stop.
        return cls(2, {c: path for c in CONTROLLERS if c in available}, [path])

    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.all_dirs]

    def apply(self, config: SandboxConfig) -> tuple[dict[str, str], dict[str, str]]:
        """Write the config's limits; return (enforced, failed) as resource -> sentence."""
        enforced: dict[str, str] = {}
        failed: dict[str, str] = {}
        self._lower_cpu_weight()
        for resource, setter in (
            ("memory", self._set_memory),
            ("pids", self._set_pids),
            ("cpu", self._set_cpu),
        ):
            if not _requested(config, resource):
                continue
            if resource not in self.dirs:
                failed[resource] = f"no {resource} controller in our {self.mechanism}"
                continue
            try:
                enforced[resource] = setter(self.dirs[resource], config)
            except OSError as exc:
                failed[resource] = f"writing the {self.mechanism} limit failed: {exc.strerror}"
        return enforced, failed

    def _lower_cpu_weight(self) -> None:
        """The sandbox's share of a busy CPU: SANDBOX_CPU_SHARES (v1) or SANDBOX_CPU_WEIGHT (v2),
        a sixteenth of the default. The scheduler weighs each cgroup as one process of ours, so
        at the default 32 sandboxes starved the one agent process that drives them (its event
        loop stalled for a third of a batch's time). Alone, a sandbox still gets a whole CPU: a
        weight only matters when the CPU is contended. Best effort: no cpu controller, no
        change."""
        path = self.dirs.get("cpu")
        if path is None:
            return
        name, value = (
            ("cpu.shares", SANDBOX_CPU_SHARES)
            if self.version == 1
            else ("cpu.weight", SANDBOX_CPU_WEIGHT)
        )
        with contextlib.suppress(OSError):
            _write(path / name, str(value))

    def _set_memory(self, path: Path, config: SandboxConfig) -> str:
        limit = config.memory_bytes
        assert limit is not None
        text = f"{human_bytes(limit)} ({self.mechanism}"
        # Swap would let a hog run on past its limit at disk speed: the limit must be the ceiling.
        if self.version == 1:
            _write(path / "memory.limit_in_bytes", str(limit))
            swap_file, swap_value = path / "memory.memsw.limit_in_bytes", str(limit)
        else:
            _write(path / "memory.max", str(limit))
            swap_file, swap_value = path / "memory.swap.max", "0"
        if swap_file.exists():
            _write(swap_file, swap_value)
            text += ", no swap"
        else:
            text += ", swap not capped: no swap accounting"
        return text + "; tmpfs files count towards it)"

    def _set_pids(self, path: Path, config: SandboxConfig) -> str:
        _write(path / "pids.max", str(config.pids_limit))
        return f"{config.pids_limit} tasks ({self.mechanism}, threads count)"

    def _set_cpu(self, path: Path, config: SandboxConfig) -> str:
        assert config.cpus is not None
        quota = cpu_quota_us(config.cpus)
        if self.version == 1:
            _write(path / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(path / "cpu.cfs_quota_us", str(quota))
        else:
            _write(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        return f"{config.cpus:g} ({self.mechanism} CFS quota)"

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files():
            with contextlib.suppress(OSError):
                found.update(int(p) for p in procs.read_text().split())
        return found

    def _kill_all(self) -> bool:
        """SIGKILL everything in the cgroup; False when it was already empty."""
        killed = False
        for path in self.all_dirs:
            # cgroup v2's cgroup.kill takes the whole cgroup at once, forks in flight included.
            kill_file = path / "cgroup.kill"
            if kill_file.exists():
                with contextlib.suppress(OSError):
                    _write(kill_file, "1")
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            killed = True
        return killed

    def _remove_dirs(self) -> bool:
        for path in list(self.all_dirs):
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                continue
            self.all_dirs.remove(path)
        return not self.all_dirs

    async def release(self, timeout: float = RELEASE_TIMEOUT) -> None:
        """Kill every process left in the cgroup, then remove it; raise if something survives.

        v1 has no cgroup.kill, so a process forking while we read cgroup.procs can slip through one
        round; the pids limit bounds how many, and the loop runs until the cgroup is empty.
        Processes that are already dead stay in it until their parent reaps them, hence the wait.
        """
        deadline = time.monotonic() + timeout
        while True:
            killed = self._kill_all()
            if not killed and self._remove_dirs():
                return
            if time.monotonic() > deadline:
                left = sorted(self.pids())
                raise SandboxError(
                    f"processes {left} survived the sandbox's stop in {', '.join(map(str, self.all_dirs))}"
                )
            await asyncio.sleep(0.01)


def _requested(config: SandboxConfig, resource: str) -> bool:
    value = {"memory": config.memory_bytes, "pids": config.pids_limit, "cpu": config.cpus}[resource]
    return bool(value)


def _wanted_controllers(config: SandboxConfig) -> list[str]:
    return [c for c in CONTROLLERS if _requested(config, c)]


def _enable_controllers(parent: Path, wanted: list[str]) -> None:
    """Ask the unified hierarchy to hand `wanted` to our children; it refuses (EBUSY) when our own
    cgroup holds processes and is not the root, and then the limits fall back to rlimits."""
    try:
        enabled = set((parent / "cgroup.subtree_control").read_text().split())
    except OSError:
        return
    for controller in wanted:
        if controller not in enabled:
            with contextlib.suppress(OSError):
                _write(parent / "cgroup.subtree_control", f"+{controller}")


# --- Everything one sandbox needs --------------------------------------------------------------


class SandboxLimits:
    """A config's limits for one sandbox's process tree: `setup()` before the start, `wrap()` the
    command that starts it, `release()` after it stopped."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.cgroup: SandboxCgroup | None = None
        self.rlimits: dict[str, int] = {}
        from .base import which  # base imports this module

        self.prlimit = which("prlimit")
        self.enforcement = Enforcement("none")

    def setup(self, parents: CgroupParents | None = None) -> Enforcement:
        """Make the cgroup (if the host allows) and choose the rlimits; say what holds."""
        if parents is None:
            parents = own_cgroup_parents()
        self.cgroup = SandboxCgroup.create(parents, self.config)
        enforced: dict[str, str] = {}
        failed: dict[str, str] = {}
        if self.cgroup is not None:
            enforced, failed = self.cgroup.apply(self.config)
        else:
            failed = {
                r: "no writable cgroup (not root, or no delegated cgroup)"
                for r in CONTROLLERS
                if _requested(self.config, r)
            }
        unenforced = self._fall_back(failed, enforced)
        mechanisms = [self.cgroup.mechanism] if self.cgroup is not None else []
        if self.rlimits:
            mechanisms.append("rlimits")
        self.enforcement = Enforcement(" + ".join(mechanisms) or "none", enforced, unenforced)
        return self.enforcement

    def _fall_back(self, failed: dict[str, str], enforced: dict[str, str]) -> dict[str, str]:
        """rlimits where they mean something; the rest stays unenforced, with the reason."""
        prlimit = self.prlimit
        unenforced: dict[str, str] = {}
        if self.config.disk_bytes:
            if prlimit is None:
                unenforced["file size"] = "prlimit (util-linux) not found"
            else:
                self.rlimits["fsize"] = self.config.disk_bytes
                enforced["file size"] = f"{human_bytes(self.config.disk_bytes)} (RLIMIT_FSIZE)"
        for resource, why in failed.items():
            if resource == "memory" and self.config.memory_bytes and prlimit is not None:
                self.rlimits["as"] = self.config.memory_bytes
                enforced["memory"] = (
                    f"{human_bytes(self.config.memory_bytes)} per process, address space "
                    f"(RLIMIT_AS, because {why}; not a total for the sandbox)"
                )
            elif resource == "pids":
                unenforced["pids"] = (
                    f"{why}; RLIMIT_NPROC is no per-sandbox cap (root is exempt, and for other "
                    "users it counts all their processes on the host)"
                )
            else:
                unenforced[resource] = why
        return unenforced

    def env(self) -> dict[str, str]:
        """Variables the sandbox's processes need under these limits. With RLIMIT_AS, glibc's
        per-thread malloc arenas (64 MiB of address space each) use the cap up long before
        memory does, and the exec server's threads then fail to allocate: two arenas suffice."""
        return {"MALLOC_ARENA_MAX": "2"} if "as" in self.rlimits else {}

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the cgroup and under the rlimits, joined before anything executes."""
        prefix: list[str] = []
        if self.cgroup is not None:
            files = [str(p) for p in self.cgroup.procs_files()]
            prefix += ["/bin/sh", "-c", _JOIN_SCRIPT, "llmsandbox-join", *files, "--"]
        if self.rlimits and self.prlimit is not None:
            caps = (f"--{k}={v}" for k, v in sorted(self.rlimits.items()))
            prefix += [self.prlimit, *caps, "--"]
        return [*prefix, *argv]

    async def release(self) -> None:
        """Kill whatever is left of the sandbox and remove its cgroup; idempotent."""
        cgroup, self.cgroup = self.cgroup, None
        if cgroup is not None:
            await cgroup.release()
