"""The docker backend: pure `docker run` argument tests, and container tests against a local engine."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from sandbox_agent.backends import docker as docker_backend
from sandbox_agent.backends.base import ExecEndpoint, SandboxConfig
from sandbox_agent.backends.docker import (
    BASE_IMAGE,
    DEFAULT_IMAGE,
    EXECD_PATH,
    MANAGED_LABEL,
    DockerSandbox,
    docker_reachable,
    docker_run_args,
)
from sandbox_agent.errors import SandboxError

MiB = 1024 * 1024


def _engine_skip_reason() -> str | None:
    if not docker_reachable():
        return "no reachable Docker engine (as root: `bash scripts/start-dockerd.sh`)"
    res = subprocess.run(
        ["docker", "image", "inspect", BASE_IMAGE], capture_output=True, check=False, timeout=30
    )
    if res.returncode != 0:
        return f"base image {BASE_IMAGE} missing: build it with `bash images/base/build.sh`"
    return None


# Evaluated once at import: the container tests below need both an engine and the base image;
# the argument tests at the top run everywhere.
_SKIP_REASON = _engine_skip_reason()
needs_engine = pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or "")


# ---------------------------------------------------------------------------------------------
# `docker run` arguments (no engine needed)


def _args(config: SandboxConfig, user: tuple[int, int] = (65534, 65534)) -> list[str]:
    return docker_run_args(
        config, name="llmsandbox-test", rundir="/tmp/rundir", execd="/src/execd.py", user=user
    )


def _values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]


def _image_index(args: list[str], image: str) -> int:
    return args.index(image)


def test_default_args_lock_the_container_down() -> None:
    args = _args(SandboxConfig())
    options = args[: _image_index(args, DEFAULT_IMAGE)]
    assert args[0] == "run"
    for flag in ("--rm", "--read-only", "--init", "--interactive"):
        assert flag in options
    assert _values(options, "--cap-drop") == ["ALL"]
    # Only what the exec server needs to run commands as another uid, and to kill them.
    assert sorted(_values(options, "--cap-add")) == ["KILL", "SETGID", "SETUID"]
    assert _values(options, "--security-opt") == ["no-new-privileges"]
    assert _values(options, "--network") == ["none"]
    # Root only until the exec server drops (--drop-to); the commands are nobody.
    assert _values(options, "--user") == ["0:0"]
    assert _values(options, "--pull") == ["never"]
    assert _values(options, "--name") == ["llmsandbox-test"]
    assert _values(options, "--label") == [f"{MANAGED_LABEL}=true"]
    assert _values(options, "--log-driver") == ["none"]
    # No limits asked, none set.
    for flag in ("--memory", "--memory-swap", "--cpus", "--pids-limit"):
        assert flag not in options


def test_mounts_and_command() -> None:
    args = _args(SandboxConfig())
    mounts = _values(args, "--mount")
    assert f"type=bind,source=/src/execd.py,target={EXECD_PATH},readonly" in mounts
    assert "type=bind,source=/tmp/rundir,target=/run/execd" in mounts
    tmpfs = {t.split(":", 1)[0]: t.split(":", 1)[1] for t in _values(args, "--tmpfs")}
    assert set(tmpfs) == {"/tmp", "/workspace"}
    assert "uid=65534" in tmpfs["/workspace"]
    assert "gid=65534" in tmpfs["/workspace"]
    assert all("exec" in o.split(",") and "nosuid" in o.split(",") for o in tmpfs.values())
    tail = args[_image_index(args, DEFAULT_IMAGE) + 1 :]
    assert tail[:2] == ["/bin/sh", "-c"]
    execd = tail[tail.index("python3") :]
    assert execd[1:4] == ["-I", "-S", EXECD_PATH]
    assert execd[execd.index("--root") + 1] == "/workspace"
    assert execd[execd.index("--drop-to") + 1] == "65533:65533"
    assert execd[execd.index("--command-user") + 1] == "65534:65534"
    assert execd[execd.index("--unix-socket") + 1] == "/run/execd/execd.sock"
    assert execd[execd.index("--token-file") + 1] == "/run/execd/token"
    assert execd[execd.index("--ready-file") + 1] == "/run/execd/ready.json"


def test_limits_and_network_from_config() -> None:
    config = SandboxConfig(
        network=True,
        image="example/image:1",
        cpus=1.5,
        memory_bytes=256 * MiB,
        pids_limit=100,
        disk_bytes=64 * MiB,
    )
    args = _args(config, user=(1000, 1001))
    options = args[: _image_index(args, "example/image:1")]
    assert DEFAULT_IMAGE not in args
    assert "--network" not in options
    assert _values(options, "--cpus") == ["1.5"]
    assert _values(options, "--memory") == [str(256 * MiB)]
    assert _values(options, "--memory-swap") == [str(256 * MiB)]
    assert _values(options, "--pids-limit") == ["100"]
    assert "--command-user" in args
    assert args[args.index("--command-user") + 1] == "1000:1001"
    for t in _values(options, "--tmpfs"):
        assert f"size={64 * MiB}" in t.split(":", 1)[1].split(",")
    workspace = next(t for t in _values(options, "--tmpfs") if t.startswith("/workspace:"))
    assert "uid=1000" in workspace
    assert "gid=1001" in workspace


def test_environment_is_minimal_and_never_the_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-caller-secret")
    args = _args(SandboxConfig(env={"TASK_VAR": "1"}))
    env = dict(e.split("=", 1) for e in _values(args, "--env"))
    assert env["HOME"] == "/tmp/home"
    assert env["TASK_VAR"] == "1"
    assert "OPENAI_API_KEY" not in env
    assert not any("sk-caller-secret" in a for a in args)
    # Every --env carries its value: a bare `--env NAME` would copy it from the CLI's environment.
    assert all("=" in e for e in _values(args, "--env"))


def test_cli_environment_drops_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-caller-secret")
    monkeypatch.setenv("DOCKER_HOST", "unix:///var/run/docker.sock")
    env = docker_backend._cli_env()
    assert "OPENAI_API_KEY" not in env
    assert env["DOCKER_HOST"] == "unix:///var/run/docker.sock"


def test_docker_reachable_is_false_without_a_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(docker_backend, "docker_path", lambda: None)
    docker_reachable.cache_clear()
    try:
        assert docker_reachable() is False
    finally:
        docker_reachable.cache_clear()


def test_missing_image_message_says_how_to_build() -> None:
    msg = docker_backend.missing_image_message(docker_backend.DEFAULT_IMAGE)
    assert f"Docker image {docker_backend.DEFAULT_IMAGE!r} is not present" in msg
    assert "`bash images/build.sh sandbox`" in msg
    other = docker_backend.missing_image_message("some/image:1")
    assert "'some/image:1'" in other
    assert "--image" in other
    assert "images/build.sh" not in other  # the project's script builds only its own images


def test_the_readme_docker_command_builds_the_default_image() -> None:
    root = Path(__file__).parent.parent
    assert "bash images/build.sh sandbox" in (root / "README.md").read_text()
    script = (root / "images" / "build.sh").read_text()
    name, tag = docker_backend.DEFAULT_IMAGE.rsplit(":", 1)
    assert f"tag={tag}\n" in script  # the script's default tag is the backend's
    assert f'image="{name}:${{tag}}"' in script


# ---------------------------------------------------------------------------------------------
# Against a Docker engine


def _client(endpoint: ExecEndpoint, auth: bool = True) -> httpx.AsyncClient:
    assert endpoint.uds is not None
    headers = {"Authorization": f"Bearer {endpoint.token}"} if auth else {}
    return httpx.AsyncClient(
        base_url=endpoint.url,
        transport=httpx.AsyncHTTPTransport(uds=endpoint.uds),
        headers=headers,
        timeout=30,
    )


async def _exec(endpoint: ExecEndpoint, command: str) -> dict[str, object]:
    async with _client(endpoint) as client:
        resp = await client.post("/exec", json={"command": command, "timeout": 20})
    assert resp.status_code == 200, resp.text
    data: dict[str, object] = resp.json()
    return data


def _docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=False, timeout=60
    )


def _container_exists(name: str) -> bool:
    res = _docker("ps", "-a", "--filter", f"name=^{name}$", "--format", "{{.Names}}")
    return name in res.stdout.split()


LIMITS = SandboxConfig(
    image=BASE_IMAGE, cpus=1, memory_bytes=256 * MiB, pids_limit=128, disk_bytes=32 * MiB
)


@pytest.fixture
async def sandbox(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[DockerSandbox]:
    # A secret in the caller's environment that must never reach the sandbox.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-must-not-leak")
    sb = DockerSandbox(LIMITS)
    try:
        yield sb
    finally:
        await sb.stop()


@pytest.mark.container
@needs_engine
async def test_exec_server_answers_over_the_socket(sandbox: DockerSandbox) -> None:
    endpoint = await sandbox.start()
    assert endpoint.workspace == "/workspace"
    assert endpoint.uds == str(sandbox.rundir / "execd.sock")
    async with _client(endpoint, auth=False) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.post("/exec", json={"command": "true"})).status_code == 401
    # The token file was only for start-up.
    assert not (sandbox.rundir / "token").exists()


@pytest.mark.container
@needs_engine
async def test_commands_run_as_non_root_in_the_workspace(sandbox: DockerSandbox) -> None:
    endpoint = await sandbox.start()
    out = await _exec(endpoint, "id -u; echo hi > /workspace/x; cat /workspace/x; pwd")
    assert out["exit_code"] == 0, out
    assert out["stdout"] == "65534\nhi\n/workspace\n"
    # Read-only root: nothing outside the tmpfs mounts is writable.
    out = await _exec(endpoint, "touch /etc/x || touch /usr/x || echo ro")
    assert str(out["stdout"]).strip() == "ro"
    if os.geteuid() == 0:
        # The host run directory is sealed once the server listens: no disk space outside tmpfs.
        out = await _exec(endpoint, "echo x > /run/execd/x || echo sealed")
        assert str(out["stdout"]).strip() == "sealed"


@pytest.mark.container
@needs_engine
async def test_no_network_by_default(sandbox: DockerSandbox) -> None:
    endpoint = await sandbox.start()
    out = await _exec(endpoint, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert str(out["stdout"]).split() == ["lo"]
    probe = textwrap.dedent(
        """\
        python3 -c 'import socket
        s = socket.socket(); s.settimeout(3); s.connect(("1.1.1.1", 53))'
        """
    )
    out = await _exec(endpoint, probe)
    assert out["exit_code"] != 0


@pytest.mark.container
@needs_engine
async def test_network_when_the_task_allows_it() -> None:
    async with DockerSandbox(SandboxConfig(image=BASE_IMAGE, network=True)) as endpoint:
        out = await _exec(endpoint, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert "eth0" in str(out["stdout"]).split()


@pytest.mark.container
@needs_engine
async def test_caller_environment_does_not_leak(sandbox: DockerSandbox) -> None:
    assert os.environ["OPENAI_API_KEY"] == "sk-test-must-not-leak"
    endpoint = await sandbox.start()
    out = await _exec(endpoint, "env; echo HOME=$HOME; test -d $HOME && echo home-exists")
    stdout = str(out["stdout"])
    assert "OPENAI_API_KEY" not in stdout
    assert "sk-test-must-not-leak" not in stdout
    assert endpoint.token not in stdout
    assert "HOME=/tmp/home" in stdout
    assert "home-exists" in stdout
    inspect = _docker("inspect", "--format", "{{json .Config.Env}}", sandbox.container_name)
    assert "sk-test-must-not-leak" not in inspect.stdout


@pytest.mark.container
@needs_engine
async def test_limits_reach_the_engine(sandbox: DockerSandbox) -> None:
    endpoint = await sandbox.start()
    res = _docker("inspect", sandbox.container_name)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)[0]
    host = info["HostConfig"]
    assert host["Memory"] == 256 * MiB
    assert host["MemorySwap"] == 256 * MiB
    assert host["PidsLimit"] == 128
    assert host["NanoCpus"] == 1_000_000_000
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["NetworkMode"] == "none"
    assert host["AutoRemove"] is True
    # Root only for the exec server's first instructions (it drops to 65533 at once).
    assert info["Config"]["User"] == "0:0"
    assert sorted(host["CapAdd"]) == ["CAP_KILL", "CAP_SETGID", "CAP_SETUID"]
    assert info["Config"]["Labels"][MANAGED_LABEL] == "true"
    # The workspace tmpfs is capped at disk_bytes.
    out = await _exec(endpoint, "head -c 40M /dev/zero > /workspace/big; echo rc=$?")
    assert "rc=0" not in str(out["stdout"]), out


@pytest.mark.container
@needs_engine
async def test_commands_run_as_nobody_apart_from_the_exec_server(sandbox: DockerSandbox) -> None:
    """Different uids: commands cannot signal, trace or read the exec server, nor enter the run
    directory that holds its socket and token."""
    endpoint = await sandbox.start()
    out = await _exec(
        endpoint,
        "id -u; grep -E '^(Uid|CapEff)' /proc/$PPID/status | tr -s '\t' ' '; "
        "kill -STOP $PPID 2>&1; ls /run/execd 2>&1; head -c1 /proc/$PPID/mem 2>&1; "
        "grep CapEff /proc/self/status | tr -s '\t' ' '",
    )
    lines = str(out["stdout"]).splitlines()
    assert lines[0] == "65534"
    # Real, effective and saved uid the server's own; the file-system uid the commands'.
    assert lines[1] == "Uid: 65533 65533 65533 65534"
    # CAP_KILL, CAP_SETGID, CAP_SETUID and nothing else.
    assert lines[2] == "CapEff: 00000000000000e0"
    assert "Operation not permitted" in lines[3]
    assert "Permission denied" in lines[4]
    assert "Permission denied" in lines[5]
    assert lines[6] == "CapEff: 0000000000000000"
    # Still serving: the STOP never arrived.
    assert (await _exec(endpoint, "echo alive"))["stdout"] == "alive\n"


@pytest.mark.container
@needs_engine
async def test_stop_removes_container_and_rundir(sandbox: DockerSandbox) -> None:
    await sandbox.start()
    assert _container_exists(sandbox.container_name)
    await sandbox.stop()
    assert not _container_exists(sandbox.container_name)
    assert not sandbox.rundir.exists()
    await sandbox.stop()  # idempotent


@pytest.mark.container
@needs_engine
async def test_teardown_tolerates_an_already_gone_container(sandbox: DockerSandbox) -> None:
    await sandbox.start()
    assert _docker("rm", "-f", sandbox.container_name).returncode == 0
    await sandbox.stop()
    assert not sandbox.rundir.exists()


@pytest.mark.container
@needs_engine
async def test_missing_image_is_a_clear_error() -> None:
    image = "llm-sandbox/does-not-exist:0"
    sb = DockerSandbox(SandboxConfig(image=image))
    with pytest.raises(
        SandboxError, match=r"'llm-sandbox/does-not-exist:0' is not present.*--image"
    ):
        async with sb:
            pass
    assert not _container_exists(sb.container_name)
    assert not sb.rundir.exists()


@pytest.mark.container
@needs_engine
async def test_container_dies_with_its_owner(tmp_path: Path) -> None:
    """Even a SIGKILLed owner leaves no container behind: its stdin pipe closes, the container
    stops, and --rm deletes it."""
    script = tmp_path / "owner.py"
    script.write_text(
        textwrap.dedent(
            f"""\
            import asyncio, os, sys
            from sandbox_agent.backends.base import SandboxConfig
            from sandbox_agent.backends.docker import DockerSandbox

            async def main():
                sb = DockerSandbox(SandboxConfig(image={BASE_IMAGE!r}))
                await sb.start()
                print(sb.container_name, sb.rundir, flush=True)
                os.kill(os.getpid(), 9)

            asyncio.run(main())
            """
        )
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == -9
    name, rundir = stdout.decode().split()
    shutil.rmtree(rundir, ignore_errors=True)
    assert name.startswith("llmsandbox-")
    for _ in range(100):
        if not _container_exists(name):
            break
        await asyncio.sleep(0.1)
    else:
        _docker("rm", "-f", name)
        pytest.fail(f"container {name} outlived its owner")
