"""Sandbox abuse: what a hostile or broken command does to a local sandbox, and what it cannot do.

Each case runs real commands in a real sandbox with small limits and asserts the effect: the
limit was hit (a fork failed, a process was OOM-killed, a write hit ENOSPC), the exec server and
its session carried on, and after stop no process and no cgroup of the sandbox is left on the
host. The agent-level cases go through the real loop with the scripted LLM server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from conftest import TEST_IMAGE, backend_param, bwrap_works, task_doc
from llmserver import ScriptedLLMServer, tool_call
from sandbox_agent.backends import BACKENDS, Sandbox, SandboxConfig
from sandbox_agent.backends import limits as limits_module
from sandbox_agent.backends.limits import (
    CGROUP_PREFIX,
    SANDBOX_CPU_SHARES,
    SANDBOX_CPU_WEIGHT,
    CgroupParents,
    Enforcement,
    SandboxCgroup,
    SandboxLimits,
    locate_parents,
    own_cgroup_parents,
    sweep_stale_cgroups,
)
from sandbox_agent.errors import SandboxError
from sandbox_agent.events import Event, Notice
from sandbox_agent.execclient import ExecClient, ExecResult
from sandbox_agent.result import ExitReason, Phase
from sandbox_agent.runner import RunOptions, run_task
from sandbox_agent.task import SandboxTask

MIB = 1024 * 1024
MEMORY = 256 * MIB
PIDS = 64
DISK = 32 * MIB
LIMITS = SandboxConfig(memory_bytes=MEMORY, pids_limit=PIDS, disk_bytes=DISK, cpus=1)
# The same limits as a task spells them.
SPEC_SANDBOX: dict[str, Any] = {
    "resources": {"limits": {"memory": "256Mi", "ephemeral-storage": "32Mi"}},
    "maxProcesses": PIDS,
}
FORK_FAILED = "Resource temporarily unavailable"
HOG = "python3 -c \"b = b'x' * (1 << 30); print('survived')\""


@cache
def cgroups_usable() -> bool:
    """Whether this host lets us give a sandbox a pids-limited cgroup (root, or a delegated one)."""
    limits = SandboxLimits(SandboxConfig(pids_limit=PIDS))
    try:
        return "pids" in limits.setup().enforced
    finally:
        asyncio.run(limits.release())


ISOLATED = [backend_param("bwrap"), backend_param("docker")]
# Without a cgroup the process backend has no pids or memory cap at all: a fork bomb or a hog
# would be the host's problem. It runs these cases only where a cgroup contains it.
CONTAINED = [
    *ISOLATED,
    backend_param(
        "process", [pytest.mark.skipif(not cgroups_usable(), reason="no writable cgroup here")]
    ),
]


@pytest.fixture(autouse=True)
def no_cgroup_left_behind() -> Iterator[None]:
    """Every test leaves the host's cgroup tree as it found it."""
    before = _our_cgroups()
    yield
    assert _our_cgroups() <= before


def _our_cgroups() -> set[Path]:
    parents = own_cgroup_parents()
    dirs = [*parents.v1.values(), *([parents.v2] if parents.v2 else [])]
    found: set[Path] = set()
    for parent in dirs:
        with contextlib.suppress(OSError):
            found.update(parent.glob(f"{CGROUP_PREFIX}{os.getpid()}-*"))
    return found


def make_sandbox(backend: str, config: SandboxConfig = LIMITS) -> Sandbox:
    if backend == "docker":
        config = SandboxConfig(**{**config.__dict__, "image": TEST_IMAGE})
    return BACKENDS[backend](config)


@contextlib.asynccontextmanager
async def sandbox_client(sandbox: Sandbox) -> AsyncIterator[ExecClient]:
    async with sandbox as endpoint, ExecClient(endpoint) as client:
        yield client


def run(
    backend: str,
    body: Callable[[ExecClient, Sandbox], Awaitable[Any]],
    config: SandboxConfig = LIMITS,
) -> Any:
    async def go() -> Any:
        sandbox = make_sandbox(backend, config)
        async with sandbox_client(sandbox) as client:
            return await body(client, sandbox)

    return asyncio.run(go())


def host_processes_with(marker: str) -> list[int]:
    """Live host processes whose command line holds `marker` (zombies have none and don't count)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" "):
                found.append(int(entry))
    return found


# --- Fork bomb ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CONTAINED)
def test_a_fork_bomb_hits_the_pids_limit_and_dies_with_its_command(backend: str) -> None:
    async def body(client: ExecClient, sandbox: Sandbox) -> tuple[ExecResult, ExecResult]:
        bomb = await client.exec("bomb() { bomb | bomb & }; bomb; sleep 60", timeout=3)
        after = await client.exec("echo alive", timeout=30)
        return bomb, after

    bomb, after = run(backend, body)
    assert bomb.timed_out
    assert FORK_FAILED in bomb.stderr
    assert after.exit_code == 0
    assert after.stdout.strip() == "alive"


# --- Memory hog --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CONTAINED)
def test_a_memory_hog_is_oom_killed_and_the_exec_server_survives(backend: str) -> None:
    async def body(client: ExecClient, sandbox: Sandbox) -> tuple[ExecResult, ExecResult]:
        return await client.exec(HOG, timeout=60), await client.exec("echo alive", timeout=30)

    hog, after = run(backend, body)
    assert hog.exit_code == 137, hog
    assert "survived" not in hog.stdout
    assert after.stdout.strip() == "alive"


# --- Disk fill ---------------------------------------------------------------------------------

USED = "df -B1 --output=used {dir} | tail -1"
FILL_ONE = "dd if=/dev/zero of={dir}/big bs=1M count=200; " + USED
FILL_MANY = (
    "mkdir -p {dir}/many && cd {dir}/many && "
    "for i in $(seq 200); do head -c 1048576 /dev/zero > f$i || break; done; " + USED
)
STOPPED = ("No space left on device", "File size limit exceeded")


@pytest.mark.parametrize("backend", ISOLATED)
@pytest.mark.parametrize("where", ["/workspace", "/tmp"])
def test_filling_the_disk_stops_at_the_disk_limit(backend: str, where: str) -> None:
    async def body(client: ExecClient, sandbox: Sandbox) -> list[ExecResult]:
        one = await client.exec(FILL_ONE.format(dir=where), timeout=60)
        await client.exec(f"rm -f {where}/big", timeout=30)
        many = await client.exec(FILL_MANY.format(dir=where), timeout=60)
        after = await client.exec("echo alive", timeout=30)
        return [one, many, after]

    one, many, after = run(backend, body)
    # One file: the tmpfs is full, or the file size limit struck first; either way it stopped.
    assert any(reason in one.stderr for reason in STOPPED), one
    assert int(one.stdout.split()[-1]) <= DISK
    # Many files, each under the file size limit: the size of the tmpfs stops them.
    assert "No space left on device" in many.stderr, many
    assert int(many.stdout.split()[-1]) <= DISK
    assert after.stdout.strip() == "alive"


def test_the_bwrap_workspace_is_not_host_disk_and_every_writable_mount_is_sized() -> None:
    if not bwrap_works():
        pytest.skip("bubblewrap not installed or not usable")

    async def body(client: ExecClient, sandbox: Sandbox) -> ExecResult:
        assert getattr(sandbox, "host_workspace", "") is None
        return await client.exec("grep -E '^tmpfs ' /proc/mounts", timeout=30)

    mounts = run("bwrap", body)
    sizes = {line.split()[1]: line.split()[3] for line in mounts.stdout.splitlines()}
    assert f"size={DISK // 1024}k" in sizes["/workspace"]
    assert f"size={DISK // 1024}k" in sizes["/tmp"]
    assert "size=" in sizes["/dev/shm"]
    assert "size=" in sizes["/run"]
    assert sizes["/dev"].startswith("ro,")


# --- Endless output ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CONTAINED)
def test_endless_output_is_capped_and_the_command_times_out(backend: str) -> None:
    async def body(client: ExecClient, sandbox: Sandbox) -> tuple[ExecResult, ExecResult]:
        flood = await client.exec("yes", timeout=2, max_output_bytes=4096)
        return flood, await client.exec("echo alive", timeout=30)

    flood, after = run(backend, body)
    assert flood.timed_out
    assert flood.stdout_truncated_bytes > 0
    assert len(flood.stdout.encode()) <= 4096 + 200
    assert after.stdout.strip() == "alive"


@pytest.mark.skipif(
    os.geteuid() != 0, reason="only root may write to another process's descriptors here"
)
def test_whatever_reaches_the_exec_servers_log_the_host_keeps_capped() -> None:
    """A command that gets hold of the exec server's stderr (here: root on the process backend
    writes to /proc/PID/fd/2) cannot grow the host's log file past MAX_LOG_BYTES."""
    from sandbox_agent.backends.base import LOG_CUT_MARKER, MAX_LOG_BYTES

    async def body(client: ExecClient, sandbox: Sandbox) -> tuple[ExecResult, int, bytes]:
        flood = await client.exec(
            "head -c 8M /dev/zero | tr '\\0' x > /proc/$PPID/fd/2; echo rc=$?", timeout=60
        )
        await client.exec("true", timeout=30)
        await asyncio.sleep(0.5)
        return flood, sandbox.log_path.stat().st_size, sandbox.log_path.read_bytes()[-200:]

    flood, size, tail = run("process", body, SandboxConfig())
    assert "rc=0" in flood.stdout
    assert size <= MAX_LOG_BYTES + len(LOG_CUT_MARKER)
    assert tail.endswith(LOG_CUT_MARKER)


# --- Writes outside /workspace -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ISOLATED)
def test_writes_outside_the_workspace_fail(backend: str) -> None:
    marker = f"llmsandbox-escape-{secrets.token_hex(4)}"
    targets = [f"/etc/{marker}", f"/usr/{marker}", f"/var/tmp/{marker}", f"/root/{marker}"]

    async def body(client: ExecClient, sandbox: Sandbox) -> tuple[list[ExecResult], list[str]]:
        shell = [await client.exec(f"echo x > {t}", timeout=30) for t in targets]
        refused = []
        for path in ("../escape.txt", "/etc/escape.txt", "/workspace/../etc/escape.txt"):
            try:
                await client.write_text(path, "x")
            except SandboxError as exc:
                refused.append(str(exc))
        return shell, refused

    shell, refused = run(backend, body)
    for target, result in zip(targets, shell, strict=True):
        assert result.exit_code != 0, target
        # Read-only, not ours, or (bwrap: only an allow-list of the host is there) absent.
        assert any(
            why in result.stderr
            for why in ("Read-only file system", "Permission denied", "No such file or directory")
        ), result.stderr
        assert not Path(target).exists()
    assert len(refused) == 3
    assert all("outside" in message for message in refused), refused


# --- Sleeping forever, and a process that ignores SIGTERM --------------------------------------


@pytest.mark.parametrize("backend", CONTAINED)
def test_a_command_that_sleeps_forever_times_out_and_the_session_recovers(backend: str) -> None:
    async def body(client: ExecClient, sandbox: Sandbox) -> tuple[ExecResult, ...]:
        setup = await client.exec("cd /tmp && export KEEP=yes", timeout=30)
        stuck = await client.exec("sleep 100000", timeout=1)
        after = await client.exec('echo "$KEEP $(pwd)"', timeout=30)
        return setup, stuck, after

    _, stuck, after = run(backend, body)
    assert stuck.timed_out
    assert stuck.exit_code == 124
    assert after.stdout.strip() == "yes /tmp"


@pytest.mark.parametrize("backend", CONTAINED)
def test_no_process_outlives_its_sandbox_not_even_one_that_ignores_sigterm(backend: str) -> None:
    """Two stubborn background processes: one ignores SIGTERM, one also leaves the shell's
    process group and session (so the timeout's kill of the group misses it)."""
    tag = str(900_000 + secrets.randbelow(90_000))
    stubborn = (
        f"(trap '' TERM; exec sleep {tag}1) & "
        f"setsid sh -c \"trap '' TERM; exec sleep {tag}2\" </dev/null >/dev/null 2>&1 & "
        "sleep 100000"
    )

    async def body(client: ExecClient, sandbox: Sandbox) -> tuple[ExecResult, list[int]]:
        stuck = await client.exec(stubborn, timeout=1)
        # The one that left the session survives the command's timeout: only the stop gets it.
        return stuck, host_processes_with(f"sleep {tag}2")

    stuck, survivors_before_stop = run(backend, body)
    assert stuck.timed_out
    assert survivors_before_stop, "the setsid process should still run until the sandbox stops"
    assert host_processes_with(f"sleep {tag}") == []


# --- Killing the exec server -------------------------------------------------------------------


@pytest.mark.parametrize("backend", CONTAINED)
def test_killing_the_exec_server_is_refused_or_a_sandbox_error_and_stop_cleans_up(
    backend: str,
) -> None:
    """Where commands run as their own uid (bwrap as root, docker) they cannot signal the exec
    server at all; where they share its uid, killing it ends the sandbox with a SandboxError."""

    async def body(client: ExecClient, sandbox: Sandbox) -> tuple[bool, str]:
        if sandbox.split_users:
            refused = await client.exec("kill -9 $PPID", timeout=30)
            after = await client.exec("echo alive", timeout=30)
            return True, refused.stderr + after.stdout
        with pytest.raises(SandboxError) as caught:
            await client.exec("kill -9 $PPID; sleep 5", timeout=30)
        return False, str(caught.value)

    split, message = run(backend, body)
    if split:
        assert "Operation not permitted" in message
        assert message.endswith("alive\n")
    else:
        assert "exec server" in message


# --- Through the agent loop --------------------------------------------------------------------


def _bwrap_only() -> None:
    if not bwrap_works():
        pytest.skip("bubblewrap not installed or not usable")


def last_observation(llm_server: ScriptedLLMServer, index: int) -> str:
    return str((llm_server.chat_requests[index].json or {})["messages"][-1]["content"])


def test_the_agent_ends_with_sandbox_error_when_a_command_kills_the_exec_server(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    """On the process backend commands share the exec server's uid, so they can kill it."""
    llm_server.script(
        tool_call("execute_bash", {"command": "echo before"}),
        tool_call("execute_bash", {"command": "kill -9 $PPID"}),
        tool_call("submit", {"answer": "never reached"}),
    )
    outcome = run_local(task_doc(), backend="process")
    result = outcome.result
    assert result.exit_reason is ExitReason.SANDBOX_ERROR
    assert result.phase is Phase.FAILED
    assert result.message is not None
    assert "the sandbox failed" in result.message
    assert "exec server" in result.message
    assert result.steps == 2
    assert result.answer is None


def test_the_agent_recovers_from_a_timeout_a_fork_bomb_and_a_memory_hog(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    _bwrap_only()
    llm_server.script(
        tool_call("execute_bash", {"command": "cd /tmp && export KEEP=yes"}),
        tool_call("execute_bash", {"command": "sleep 100000"}),
        tool_call("execute_bash", {"command": "bomb() { bomb | bomb & }; bomb; sleep 60"}),
        tool_call("execute_bash", {"command": HOG}),
        tool_call("execute_bash", {"command": 'echo "$KEEP $(pwd)"'}),
        tool_call("submit", {"answer": "still here"}),
    )
    doc = task_doc(sandbox=dict(SPEC_SANDBOX), limits={"commandTimeoutSeconds": 2})
    outcome = run_local(doc, backend="bwrap")
    assert outcome.result.phase is Phase.SUCCEEDED, outcome.result.message
    assert outcome.result.answer == "still here"
    assert "killed after 2s (timeout)" in last_observation(llm_server, 2)
    assert FORK_FAILED in last_observation(llm_server, 3)
    assert "[exit code 137]" in last_observation(llm_server, 4)
    assert last_observation(llm_server, 5).endswith("yes /tmp")


def test_a_full_disk_is_an_error_the_model_sees_and_can_clear(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    # Filled workspace and /dev/shm (where the exec server keeps each command's script): the
    # editor's write and a long command are refused as "no space", never a task-ending error,
    # and once the model frees space everything works again.
    _bwrap_only()
    # Several files each: a single file stops at the file-size limit (the disk limit) first.
    fill = (
        "for i in 1 2 3; do head -c 40M /dev/zero > /workspace/fill$i;"
        " head -c 40M /dev/zero > /dev/shm/fill$i; done 2>/dev/null;"
        " echo AVAIL $(df --output=avail /workspace /dev/shm | tail -n +2)"
    )
    long_command = "echo long # " + "x" * 20_000
    write = {"command": "create", "path": "/workspace/notes.txt", "file_text": "y" * 100_000}
    llm_server.script(
        tool_call("execute_bash", {"command": fill}),
        tool_call("str_replace_editor", write),
        tool_call("execute_bash", {"command": long_command}),
        tool_call("execute_bash", {"command": "rm /workspace/fill* /dev/shm/fill*"}),
        tool_call("str_replace_editor", write),
        tool_call("execute_bash", {"command": long_command}),
        tool_call("submit", {"answer": "cleared"}),
    )
    doc = task_doc(sandbox=dict(SPEC_SANDBOX))
    outcome = run_local(doc, backend="bwrap")
    assert outcome.result.phase is Phase.SUCCEEDED, outcome.result.message
    assert outcome.result.answer == "cleared"
    assert "AVAIL 0 0" in last_observation(llm_server, 1), "the disks were not full"
    refused_write = last_observation(llm_server, 2)
    assert "No space left on device" in refused_write
    assert "free some space" in refused_write
    refused_command = last_observation(llm_server, 3)
    assert "cannot store a" in refused_command
    assert "short commands still run" in refused_command
    assert "Error" not in last_observation(llm_server, 5)
    assert "long" in last_observation(llm_server, 6)


def test_the_runner_says_how_the_limits_are_enforced(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    _bwrap_only()
    llm_server.script(tool_call("submit", {"answer": "x"}))
    task = SandboxTask.model_validate(task_doc(sandbox=dict(SPEC_SANDBOX)))
    options = RunOptions(
        backend="bwrap", base_url=llm_server.base_url, api_key="k", out_dir=tmp_path, env={}
    )
    notes: list[str] = []

    def on_event(event: Event) -> None:
        if isinstance(event, Notice):
            notes.append(event.message)

    asyncio.run(run_task(task, tmp_path, options, on_event))
    (note,) = [n for n in notes if "limits" in n]
    assert note.startswith("bwrap sandbox limits (")
    assert "memory 256 MiB" in note
    assert "disk 32 MiB" in note
    if cgroups_usable():
        assert "pids 64 tasks" in note
        assert "NOT enforced" not in note


# --- Other tasks are unaffected ----------------------------------------------------------------

PRIMES = "python3 -c 'print(sum(p for p in range(2, 20000) if all(p % d for d in range(2, int(p**0.5) + 1))))'"


@pytest.mark.parametrize("backend", CONTAINED)
def test_a_neighbour_of_a_fork_bomb_and_a_memory_hog_is_unaffected(backend: str) -> None:
    async def abuse(command: str) -> ExecResult:
        async with sandbox_client(make_sandbox(backend)) as client:
            return await client.exec(command, timeout=4)

    async def normal() -> list[ExecResult]:
        async with sandbox_client(make_sandbox(backend)) as client:
            return [await client.exec(PRIMES, timeout=60) for _ in range(3)]

    async def go() -> tuple[ExecResult, ExecResult, list[ExecResult]]:
        return await asyncio.gather(
            abuse("bomb() { bomb | bomb & }; bomb; sleep 60"), abuse(HOG), normal()
        )

    bomb, hog, results = asyncio.run(go())
    assert FORK_FAILED in bomb.stderr
    assert hog.exit_code == 137
    assert [r.stdout.strip() for r in results] == ["21171191"] * 3


# --- Without a cgroup: rlimits, and an honest account of what is not enforced ------------------


@pytest.fixture
def no_cgroups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits_module, "own_cgroup_parents", CgroupParents)


@pytest.mark.usefixtures("no_cgroups")
def test_without_a_cgroup_memory_falls_back_to_rlimit_as_and_pids_is_reported_unenforced() -> None:
    _bwrap_only()

    async def body(client: ExecClient, sandbox: Sandbox) -> tuple[Enforcement, ExecResult]:
        return sandbox.enforcement, await client.exec(HOG, timeout=60)

    enforcement, hog = run("bwrap", body, SandboxConfig(memory_bytes=MEMORY, pids_limit=PIDS))
    assert enforcement.mechanism == "rlimits"
    assert "RLIMIT_AS" in enforcement.enforced["memory"]
    assert "RLIMIT_NPROC" in enforcement.unenforced["pids"]
    assert "NOT enforced: pids" in enforcement.describe()
    assert "MemoryError" in hog.stderr
    assert "survived" not in hog.stdout


@pytest.mark.usefixtures("no_cgroups")
def test_under_rlimit_as_the_exec_server_serves_many_requests_at_once() -> None:
    # RLIMIT_AS counts address space: with 8 MiB thread stacks and a malloc arena per thread the
    # server could start only a few threads under the 256 MiB cap ("can't start new thread").
    _bwrap_only()

    async def body(client: ExecClient, sandbox: Sandbox) -> list[ExecResult]:
        assert "RLIMIT_AS" in sandbox.enforcement.enforced["memory"]
        reads = [client.list_dir(".") for _ in range(12)]
        listed = await asyncio.gather(*reads)
        assert len(listed) == 12
        return list(await asyncio.gather(*(client.exec(f"echo {i}", timeout=30) for i in range(4))))

    results = run("bwrap", body, SandboxConfig(memory_bytes=MEMORY, pids_limit=PIDS))
    assert [r.stdout.strip() for r in results] == ["0", "1", "2", "3"]


def test_the_process_backend_says_its_disk_is_not_capped() -> None:
    sandbox = make_sandbox("process", SandboxConfig(disk_bytes=DISK))

    async def go() -> Enforcement:
        async with sandbox:
            return sandbox.enforcement

    enforcement = asyncio.run(go())
    assert "disk" in enforcement.unenforced
    assert "RLIMIT_FSIZE" in enforcement.enforced["file size"]


# --- Finding and cleaning cgroups (pure) -------------------------------------------------------

HYBRID_MOUNTINFO = """\
30 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,pids
37 30 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,cpu,cpuacct
"""
HYBRID_CGROUP = "4:memory:/a/b\n3:pids:/\n2:cpu,cpuacct:/c\n0::/u\n"


def test_own_cgroups_are_found_in_a_v1_hybrid_layout() -> None:
    parents = locate_parents(HYBRID_MOUNTINFO, HYBRID_CGROUP)
    assert parents.v1 == {
        "memory": Path("/sys/fs/cgroup/memory/a/b"),
        "pids": Path("/sys/fs/cgroup/pids"),
        "cpu": Path("/sys/fs/cgroup/cpu,cpuacct/c"),
    }
    assert parents.v2 == Path("/sys/fs/cgroup/unified/u")


def test_own_cgroup_is_found_in_a_v2_layout_and_inside_a_cgroup_namespace() -> None:
    unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    parents = locate_parents(unified, "0::/user.slice/app.scope\n")
    assert parents == CgroupParents({}, Path("/sys/fs/cgroup/user.slice/app.scope"))
    # A container whose cgroupfs is mounted at its own cgroup: the mount root is cut off.
    nested = "29 23 0:26 /ctr /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert locate_parents(nested, "0::/ctr/sub\n").v2 == Path("/sys/fs/cgroup/sub")
    assert locate_parents(nested, "0::/elsewhere\n").v2 is None


def test_stale_cgroups_of_dead_processes_are_swept_and_others_kept(tmp_path: Path) -> None:
    dead = tmp_path / f"{CGROUP_PREFIX}999999999-abcd"
    alive = tmp_path / f"{CGROUP_PREFIX}{os.getpid()}-abcd"
    other = tmp_path / "someone-else"
    for d in (dead, alive, other):
        d.mkdir()
    removed = sweep_stale_cgroups(CgroupParents({"pids": tmp_path}))
    assert removed == [dead]
    assert alive.exists()
    assert other.exists()


def test_an_enforcement_says_loudly_what_is_not_enforced() -> None:
    text = Enforcement("rlimits", {"memory": "1 GiB (RLIMIT_AS)"}, {"cpu": "no cgroup"}).describe()
    assert text == "limits (rlimits): memory 1 GiB (RLIMIT_AS) | NOT enforced: cpu (no cgroup)"


@pytest.mark.parametrize("version", [1, 2])
def test_a_wrapped_process_is_in_the_cgroup_from_its_start_and_killed_at_release(
    version: int,
) -> None:
    """The join wrapper and the kill at release, on each cgroup version this host mounts (on a
    hybrid host the unified hierarchy has no controllers: the limits fall back, the kill holds)."""
    own = own_cgroup_parents()
    parents = CgroupParents(v1=own.v1) if version == 1 else CgroupParents(v2=own.v2)
    limits = SandboxLimits(SandboxConfig(memory_bytes=MEMORY, pids_limit=PIDS))
    enforcement = limits.setup(parents)
    if limits.cgroup is None:
        pytest.skip(f"no writable cgroup v{version} here")
    tag = str(800_000 + secrets.randbelow(90_000))

    async def go() -> tuple[int, set[int], set[int]]:
        assert limits.cgroup is not None
        proc = await asyncio.create_subprocess_exec(
            *limits.wrap(["sh", "-c", f"sleep {tag} & echo started; exec sleep {tag}"]),
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert await proc.stdout.readline() == b"started\n"
        inside = limits.cgroup.pids()
        await limits.release()
        await proc.wait()
        return proc.pid, inside, set(host_processes_with(f"sleep {tag}"))

    pid, inside, left = asyncio.run(go())
    assert pid in inside
    assert len(inside) == 2
    assert left == set()
    assert enforcement.mechanism.startswith(f"cgroup v{version}")
    # Whatever the cgroup could not hold is said, never silently dropped.
    for resource in ("memory", "pids"):
        assert resource in enforcement.enforced or resource in enforcement.unenforced


def test_the_limit_files_written_on_cgroup_v2(tmp_path: Path) -> None:
    """The v2 path on a directory standing in for a delegated cgroupfs (the kernel would create
    the files; here they are made up front), as on a typical systemd host."""
    parent = tmp_path / "user.slice"
    parent.mkdir()
    (parent / "cgroup.subtree_control").write_text("")
    config = SandboxConfig(memory_bytes=MEMORY, pids_limit=PIDS, cpus=1.5)
    original_mkdir = Path.mkdir

    def kernel_mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        original_mkdir(self, *args, **kwargs)
        if self.parent == parent:
            (self / "cgroup.controllers").write_text("cpu memory pids\n")
            (self / "memory.swap.max").write_text("max\n")

    enabled: list[str] = []
    original_write = limits_module._write

    def write(path: Path, value: str) -> None:
        if path == parent / "cgroup.subtree_control":
            enabled.append(value)
        original_write(path, value)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "mkdir", kernel_mkdir)
        mp.setattr(limits_module, "_write", write)
        cgroup = SandboxCgroup.create(CgroupParents(v2=parent), config)
    assert cgroup is not None
    (path,) = cgroup.all_dirs
    assert path.parent == parent
    assert path.name.startswith(f"{CGROUP_PREFIX}{os.getpid()}-")
    enforced, failed = cgroup.apply(config)
    assert failed == {}
    assert (path / "memory.max").read_text() == str(MEMORY)
    assert (path / "memory.swap.max").read_text() == "0"
    assert (path / "pids.max").read_text() == str(PIDS)
    assert (path / "cpu.max").read_text() == "150000 100000"
    # Under contention a sandbox weighs a sixteenth of the agent process that drives it.
    assert (path / "cpu.weight").read_text() == str(SANDBOX_CPU_WEIGHT)
    # Our children get the controllers only if our own cgroup hands them down.
    assert enabled == ["+memory", "+pids", "+cpu"]
    assert enforced["memory"].startswith("256 MiB (cgroup v2, no swap")
    assert enforced["pids"].startswith(f"{PIDS} tasks (cgroup v2")


def test_the_limit_files_written_on_cgroup_v1(tmp_path: Path) -> None:
    """v1: one directory per hierarchy, cpu and cpuacct co-mounted in one, swap capped too."""
    memory, pids, cpu = (tmp_path / name for name in ("memory", "pids", "cpu,cpuacct"))
    for hierarchy in (memory, pids, cpu):
        hierarchy.mkdir()
    config = SandboxConfig(memory_bytes=MEMORY, pids_limit=PIDS, cpus=0.5)
    cgroup = SandboxCgroup.create(
        CgroupParents(v1={"memory": memory, "pids": pids, "cpu": cpu}), config
    )
    assert cgroup is not None
    assert len(cgroup.all_dirs) == 3
    (memory / cgroup.all_dirs[0].name / "memory.memsw.limit_in_bytes").write_text("")
    enforced, failed = cgroup.apply(config)
    assert failed == {}
    mem_dir, pids_dir, cpu_dir = (cgroup.dirs[c] for c in ("memory", "pids", "cpu"))
    assert (mem_dir / "memory.limit_in_bytes").read_text() == str(MEMORY)
    assert (mem_dir / "memory.memsw.limit_in_bytes").read_text() == str(MEMORY)
    assert (pids_dir / "pids.max").read_text() == str(PIDS)
    assert (cpu_dir / "cpu.cfs_quota_us").read_text() == "50000"
    assert (cpu_dir / "cpu.cfs_period_us").read_text() == "100000"
    assert (cpu_dir / "cpu.shares").read_text() == str(SANDBOX_CPU_SHARES)
    assert "no swap" in enforced["memory"]
