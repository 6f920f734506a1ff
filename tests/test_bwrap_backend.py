"""The bwrap backend's isolation, checked from inside a real sandbox."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import bwrap_works
from sandbox_agent.backends import BwrapSandbox, SandboxConfig
from sandbox_agent.backends.limits import CGROUP_PREFIX, own_cgroup_parents, sweep_stale_cgroups
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


def test_the_sandbox_cannot_write_into_its_host_run_directory() -> None:
    (probe,) = run_in_sandbox("touch /run/execd/fill 2>&1; echo rc=$?")
    if os.geteuid() == 0:
        assert "rc=1" in probe.stdout


@pytest.fixture
def orphan_script(tmp_path: Path) -> Path:
    script = tmp_path / "orphan.py"
    script.write_text(
        "import asyncio, os, signal\n"
        "from sandbox_agent.backends import BwrapSandbox, SandboxConfig\n"
        "async def main():\n"
        "    sb = BwrapSandbox(SandboxConfig())\n"
        "    await sb.start()\n"
        "    print(sb.rundir, os.getpid(), flush=True)\n"
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
    rundir, _, pid = proc.stdout.strip().partition(" ")
    assert rundir, proc.stderr
    for _ in range(50):
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
        if not any("bwrap" in line and rundir in line for line in ps.stdout.splitlines()):
            break
        subprocess.run(["sleep", "0.1"], check=True)
    else:
        pytest.fail(f"a bwrap sandbox for {rundir} outlived its parent")
    shutil.rmtree(rundir, ignore_errors=True)
    # The dead parent could not remove the sandbox's cgroup; the next start sweeps it away.
    sweep_stale_cgroups()
    parents = own_cgroup_parents()
    for parent in [*parents.v1.values(), *([parents.v2] if parents.v2 else [])]:
        assert not list(parent.glob(f"{CGROUP_PREFIX}{pid}-*"))
