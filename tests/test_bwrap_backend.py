"""The bwrap backend's isolation, checked from inside a real sandbox."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from conftest import bwrap_works
from sandbox_agent.backends import BwrapSandbox, SandboxConfig
from sandbox_agent.backends.limits import CGROUP_PREFIX, own_cgroup_parents, sweep_stale_cgroups
from sandbox_agent.errors import SandboxError
from sandbox_agent.execclient import ExecClient, ExecResult

pytestmark = [
    pytest.mark.bwrap,
    pytest.mark.skipif(not bwrap_works(), reason="bubblewrap not installed or not usable"),
]


def run_in_sandbox(*commands: str, config: SandboxConfig | None = None) -> list[ExecResult]:
    async def go() -> list[ExecResult]:
        async with (
            BwrapSandbox(config or SandboxConfig()) as endpoint,
            ExecClient(endpoint) as client,
        ):
            return [await client.exec(c, timeout=30) for c in commands]

    return asyncio.run(go())


def interfaces(result: ExecResult) -> set[str]:
    return {line.split(":")[0].strip() for line in result.stdout.splitlines()[2:]}


def test_there_is_no_network_by_default_and_there_is_when_allowed() -> None:
    (closed,) = run_in_sandbox("cat /proc/net/dev")
    assert interfaces(closed) == {"lo"}
    (opened,) = run_in_sandbox("cat /proc/net/dev", config=SandboxConfig(network=True))
    assert interfaces(opened) == interfaces_on_host()


def interfaces_on_host() -> set[str]:
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    return {line.split(":")[0].strip() for line in lines}


def test_the_host_is_read_only_and_the_workspace_is_writable() -> None:
    host, work, tmp = run_in_sandbox(
        "touch /etc/llmsandbox-probe", "touch /workspace/probe && pwd", "touch /tmp/probe"
    )
    assert host.exit_code != 0
    assert "Read-only file system" in host.stderr or "Permission denied" in host.stderr
    assert not Path("/etc/llmsandbox-probe").exists()
    assert work.exit_code == 0
    assert work.stdout.strip() == "/workspace"
    assert tmp.exit_code == 0


def test_commands_run_unprivileged_in_their_own_pid_namespace() -> None:
    ident, procs = run_in_sandbox("id -u; id -g", "ls /proc | grep -c '^[0-9]'")
    assert ident.stdout.split() == ["1000", "1000"]
    # bwrap, the exec server, the shell and the listing itself: nothing of the host's.
    assert int(procs.stdout.strip()) < 10


def test_the_callers_environment_and_credentials_do_not_leak_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        (home / ".ssh").mkdir()
        (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY")
        (home / ".netrc").write_text("machine x password hunter2")
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
        env, ssh, netrc = run_in_sandbox(
            "env", f"ls -A {home}/.ssh | wc -l", f"cat {home}/.netrc | wc -c"
        )
    finally:
        shutil.rmtree(home)
    assert "sk-must-not-leak" not in env.stdout
    assert "OPENAI" not in env.stdout
    assert ssh.stdout.strip() == "0"
    assert netrc.stdout.strip() == "0"


def test_the_exec_servers_run_directory_is_nowhere_in_the_sandbox() -> None:
    """Its socket and token reach the exec server as descriptors: no path inside names them."""

    async def go() -> tuple[ExecResult, ExecResult, str]:
        sandbox = BwrapSandbox(SandboxConfig())
        async with sandbox as endpoint, ExecClient(endpoint) as client:
            run = await client.exec("ls -A /run", timeout=30)
            host = await client.exec(f"ls {sandbox.rundir} 2>&1; echo rc=$?", timeout=30)
            return run, host, str(sandbox.rundir)

    run, host, rundir = asyncio.run(go())
    assert run.stdout.split() == ["execd-bin"]
    assert "No such file or directory" in host.stdout
    assert host.stdout.endswith("rc=2\n")
    assert not Path(rundir).exists()


@pytest.fixture
def orphan_script(tmp_path: Path) -> Path:
    script = tmp_path / "orphan.py"
    script.write_text(
        "import asyncio, os, signal\n"
        "from sandbox_agent.backends import BwrapSandbox, SandboxConfig\n"
        "async def main():\n"
        "    sb = BwrapSandbox(SandboxConfig())\n"
        "    await sb.start()\n"
        "    print(sb.host_workspace, sb.rundir, os.getpid(), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "asyncio.run(main())\n"
    )
    return script


def test_the_sandbox_dies_with_the_process_that_started_it(orphan_script: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(orphan_script)],
        # The package from this checkout, whether or not (or wherever) it is installed.
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "agent")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # The sandbox's host workspace is on bwrap's command line: that is how it is found.
    workspace, rundir, pid = [*proc.stdout.strip().split(" "), "", "", ""][:3]
    assert workspace.startswith("/"), proc.stderr
    for _ in range(50):
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
        if not any("bwrap" in line and workspace in line for line in ps.stdout.splitlines()):
            break
        subprocess.run(["sleep", "0.1"], check=True)
    else:
        pytest.fail(f"a bwrap sandbox with workspace {workspace} outlived its parent")
    shutil.rmtree(workspace, ignore_errors=True)
    shutil.rmtree(rundir, ignore_errors=True)
    # The dead parent could not remove the sandbox's cgroup; the next start sweeps it away.
    sweep_stale_cgroups()
    parents = own_cgroup_parents()
    for parent in [*parents.v1.values(), *([parents.v2] if parents.v2 else [])]:
        assert not list(parent.glob(f"{CGROUP_PREFIX}{pid}-*"))


# --- What the sandbox sees of the host (an allow-list) ----------------------------------------


def test_only_an_allow_list_of_the_host_is_visible(tmp_path: Path) -> None:
    """Not /etc/shadow, /root, /var, /home, the project checkout or the host's /tmp: they are not
    there at all. /etc holds the few files a shell and Python need, passwd and group stubs."""
    checkout = Path(__file__).resolve().parents[1]
    marker = tmp_path / "host-tmp-marker"
    marker.write_text("secret")
    shadow, listing, etc, passwd, me = run_in_sandbox(
        "head -c 100 /etc/shadow 2>&1",
        f"for p in /root /var /home /work /srv /opt {checkout} {marker}; do ls -d $p 2>&1; done",
        "ls /etc",
        "cat /etc/passwd",
        "whoami; echo $HOME; pwd",
    )
    assert "No such file or directory" in shadow.stdout
    lines = listing.stdout.splitlines()
    assert len(lines) == 8
    assert all("No such file or directory" in line for line in lines), lines
    visible = set(etc.stdout.split())
    assert {"passwd", "group", "hosts", "ld.so.cache"} <= visible
    assert not visible & {"shadow", "gshadow", "sudoers", "ssh", "pip.conf", "docker", "machine-id"}
    assert Path("/etc/passwd").read_text() != passwd.stdout
    assert passwd.stdout.count("\n") == 3
    assert me.stdout.split() == ["sandbox", "/tmp/home", "/workspace"]


def test_no_sandbox_sees_another_sandboxs_workspace() -> None:
    async def go() -> tuple[ExecResult, ExecResult, str]:
        first, second = BwrapSandbox(SandboxConfig()), BwrapSandbox(SandboxConfig())
        async with first as a, second as b, ExecClient(a) as ca, ExecClient(b) as cb:
            await ca.exec("echo neighbour-secret > /workspace/mine.txt", timeout=30)
            assert first.host_workspace is not None
            host_path = first.host_workspace / "mine.txt"
            direct = await cb.exec(f"cat {host_path} 2>&1", timeout=30)
            # The pattern is put together at run time: the command file itself must not match.
            search = await cb.exec(
                'p=neighbour; grep -rl "$p-secret" /workspace /tmp /run /dev/shm 2>/dev/null; '
                "echo done",
                timeout=30,
            )
            return direct, search, host_path.read_text()

    direct, search, written = asyncio.run(go())
    assert written == "neighbour-secret\n"
    assert "No such file or directory" in direct.stdout
    assert search.stdout == "done\n"


def test_nothing_of_the_callers_environment_or_cwd_shows_inside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not in the shell's environment, nor in any process's environ or cwd (bwrap's own pid 1
    included): no PWD, OLDPWD, HOME or variable of the caller."""
    cwd = tmp_path / "caller-cwd-canary"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("LLMSANDBOX_CANARY", "env-canary-value")
    monkeypatch.setenv("OLDPWD", str(tmp_path / "oldpwd-canary"))
    env, environs, cwds = run_in_sandbox(
        "env",
        "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f 2>/dev/null; done",
        "for p in /proc/[0-9]*; do readlink $p/cwd 2>/dev/null; done",
    )
    for text in (env.stdout, environs.stdout, cwds.stdout):
        assert "canary" not in text
        assert str(tmp_path) not in text
    assert "PWD=/workspace" in env.stdout
    assert set(cwds.stdout.split()) <= {"/", "/workspace"}


def test_state_never_lies_below_a_tmpdir_every_sandbox_sees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sandbox_agent.backends.bwrap import private_parent

    monkeypatch.setattr(tempfile, "tempdir", "/usr/share")
    assert private_parent() == "/tmp"
    sandbox = BwrapSandbox(SandboxConfig())
    try:
        assert sandbox.rundir.parent == Path("/tmp")
        assert sandbox.host_workspace is not None
        assert sandbox.host_workspace.parent == Path("/tmp")
    finally:
        asyncio.run(sandbox.stop())


# --- The seccomp filter and nested namespaces --------------------------------------------------

# Calls whose unfiltered result here differs from the filter's EPERM (they succeed, or fail for
# another reason), so the sandbox's answer shows the filter at work: (name, arguments).
DISCRIMINATING = [
    ("unshare", (0x10000000,)),  # CLONE_NEWUSER: allowed to unprivileged users on this host
    ("keyctl", (0, -3, 0)),  # KEYCTL_GET_KEYRING_ID of the session keyring
    ("ptrace", (12, 0, 0, 0)),  # PTRACE_GETREGS of pid 0: ESRCH unfiltered
    ("io_uring_setup", (1, 0)),  # EFAULT unfiltered: the params pointer is NULL
    ("process_vm_readv", (0, 0, 0, 0, 0, 0)),  # pid 0: ESRCH unfiltered
    ("pidfd_getfd", (-1, 0, 0)),  # EBADF unfiltered
    ("setns", (-1, 0)),  # EBADF unfiltered
    ("mount", (0, 0, 0, 0, 0)),  # EFAULT unfiltered as root
    ("bpf", (-1, 0, 0)),  # EINVAL unfiltered
    ("perf_event_open", (0, 0, -1, -1, 0)),  # EFAULT unfiltered
    ("open_by_handle_at", (-1, 0, 0)),  # EBADF/EPERM unfiltered
]

_PROBE = """
import ctypes, errno, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    ctypes.set_errno(0)
    rc = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    return "ok" if rc >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
plan = json.loads(sys.argv[1])
out = {name: call(nr, *args) for name, nr, args in plan["cases"]}
if sys.argv[2] == "inside":
    # Never on the host: with junk arguments, as root, some of these would do harm.
    out["every_denied_call"] = sorted({call(nr, -1, -1, -1, -1) for nr in plan["denied"]})
out["clone3"] = call(plan["clone3"], 0, 0)
out["clone_newuser"] = call(plan["clone"], 0x10000000 | 17, 0, 0, 0, 0)
pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork"] = os.waitpid(pid, 0)[1] >> 8
print(json.dumps(out))
"""


def probe_syscalls(inside: bool) -> dict[str, Any]:
    import json

    from sandbox_agent.backends.seccomp import CLONE, CLONE3, SYSCALLS, machine

    index = 0 if machine() == "x86_64" else 1
    plan = {
        "cases": [(name, SYSCALLS[name][index], args) for name, args in DISCRIMINATING],
        "denied": [nrs[index] for nrs in SYSCALLS.values() if nrs[index] is not None],
        "clone3": CLONE3,
        "clone": CLONE[machine()],
    }
    if not inside:
        proc = subprocess.run(
            ["/usr/bin/python3", "-c", _PROBE, json.dumps(plan), "outside"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return dict(json.loads(proc.stdout))
    (res,) = run_in_sandbox(
        f"cat > /tmp/probe.py <<'EOF'\n{_PROBE}\nEOF\n"
        f"python3 /tmp/probe.py '{json.dumps(plan)}' inside"
    )
    assert res.exit_code == 0, res.stderr
    return dict(json.loads(res.stdout))


@pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="needs /usr/bin/python3")
def test_the_seccomp_filter_refuses_each_listed_call_inside_the_sandbox() -> None:
    outside = probe_syscalls(inside=False)
    inside = probe_syscalls(inside=True)
    for name, _ in DISCRIMINATING:
        assert inside[name] == "EPERM", (name, inside[name])
    # Every one of them would have been answered otherwise.
    assert all(outside[name] != "EPERM" for name in ("unshare", "keyctl", "ptrace", "setns"))
    assert sum(outside[name] != "EPERM" for name, _ in DISCRIMINATING) >= 8, outside
    assert inside["every_denied_call"] == ["EPERM"]
    assert inside["clone3"] == "ENOSYS"
    assert inside["clone_newuser"] == "EPERM"
    assert inside["fork"] == 7


def test_no_nested_user_namespace_can_be_made() -> None:
    (res,) = run_in_sandbox("unshare -Ur id 2>&1; echo rc=$?; unshare -rn true 2>&1; echo rc=$?")
    assert "rc=0" not in res.stdout
    assert "uid=0" not in res.stdout


# --- Ordinary work still works -----------------------------------------------------------------


def test_python_pip_gcc_git_and_numpy_work_under_the_filter() -> None:
    numpy = subprocess.run(
        ["/usr/bin/python3", "-c", "import numpy"], capture_output=True, check=False
    )
    commands = [
        "python3 -c 'import json, sqlite3, ssl, hashlib, multiprocessing as m;"
        " print(m.Pool(2).map(abs, [-1, -2]))'",
        "mkdir -p /tmp/pkg/hello && echo 'X = 1' > /tmp/pkg/hello/__init__.py && "
        'printf \'[project]\\nname = "hello"\\nversion = "1.0"\\n\' > /tmp/pkg/pyproject.toml && '
        "python3 -m pip install --user --no-index --no-build-isolation --break-system-packages "
        "-q /tmp/pkg 2>&1 | tail -2; python3 -c 'import hello; print(hello.X)'",
        "cat > /tmp/a.c <<'EOF'\n#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 6 * 7); }\n"
        "EOF\ngcc -O1 -o /tmp/a /tmp/a.c && /tmp/a",
        "cd /tmp && git init -q r && cd r && git -c user.email=a@b -c user.name=a commit -q "
        "--allow-empty -m x && git log --oneline | wc -l",
    ]
    if numpy.returncode == 0:
        commands.append("python3 -c 'import numpy; print(int(numpy.arange(10).sum()))'")
    results = run_in_sandbox(*commands)
    outputs = [r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr for r in results]
    expected = ["[1, 2]", "1", "42", "1", "45"][: len(commands)]
    assert outputs == expected, [r.stderr for r in results]


def test_no_uid_in_the_sandbox_is_the_hosts_root() -> None:
    """As root the sandbox's uids map to host uids of its own (one for the exec server, one for
    the commands); otherwise to the caller. Never to host uid 0."""
    (mapping,) = run_in_sandbox("cat /proc/self/uid_map")
    rows = [tuple(map(int, line.split())) for line in mapping.stdout.splitlines()]
    assert rows
    assert all(outside != 0 for _, outside, _ in rows), rows
    inside = {row[0] for row in rows}
    if os.geteuid() == 0:
        assert inside == {0, 1000}
        assert len({outside for _, outside, _ in rows}) == 2
    else:
        assert inside == {1000}


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_start_that_times_out_leaves_no_sandbox_behind() -> None:
    """The failed start itself ends the process it began (before stop() and its cgroup sweep)."""
    sandbox = BwrapSandbox(SandboxConfig(start_timeout=0.001))
    workspace = str(sandbox.host_workspace)

    async def go() -> tuple[str, list[str]]:
        try:
            await sandbox.start()
        except SandboxError as exc:
            return str(exc), [
                cmd
                for pid in os.listdir("/proc")
                if pid.isdigit() and workspace in (cmd := _cmdline(pid))
            ]
        finally:
            await sandbox.stop()
        return "started", []

    message, left = asyncio.run(go())
    assert "not ready after" in message
    assert left == []
