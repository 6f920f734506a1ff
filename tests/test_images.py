"""The real images, run the way a pod runs them: an init step copies the exec server into a
shared volume, the sandbox container serves it, and the agent container (sharing the sandbox's
network namespace) solves a task against the scripted LLM server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import docker_image_present
from llmserver import ScriptedLLMServer, tool_call
from sandbox_agent.backends.docker import docker_reachable
from sandbox_agent.task import SandboxTask
from sandbox_operator.pod_builder import build_pod
from sandbox_operator.settings import OperatorSettings

pytestmark = [
    pytest.mark.container,
    # The first test builds the images (minutes on a fresh machine); cached builds take seconds.
    pytest.mark.timeout(1800),
    pytest.mark.skipif(
        not docker_reachable() or not docker_image_present(),
        reason="no Docker engine, or no base image (bash images/base/build.sh)",
    ),
]

ROOT = Path(__file__).parent.parent
TAG = "test"
AGENT = f"llm-sandbox/agent:{TAG}"
SANDBOX = f"llm-sandbox/sandbox-python:{TAG}"
HARDENED = ["--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--user", "65534:65534"]


def pod_manifest() -> dict[str, Any]:
    task = SandboxTask.model_validate(
        {
            "apiVersion": "llmsandbox.io/v1alpha1",
            "kind": "SandboxTask",
            "metadata": {"name": "image-test", "namespace": "default"},
            "spec": {"prompt": "p", "model": {"name": "m"}, "sandbox": {"image": SANDBOX}},
        }
    )
    settings = OperatorSettings(
        agent_image=AGENT, default_base_url="http://llm:8000/v1", default_api_key_secret="k"
    )
    return build_pod(task, namespace="default", uid="u1", attempt=1, settings=settings)


def container_of(pod: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod["spec"]
    return next(c for c in spec["initContainers"] + spec["containers"] if c["name"] == name)


def security_flags(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """`docker run` flags for what a container runtime makes of the pod's security contexts."""
    ctx = container["securityContext"]
    flags = ["--user", f"{ctx['runAsUser']}:{ctx['runAsGroup']}"]
    flags += ["--group-add", str(pod["spec"]["securityContext"]["fsGroup"])]
    flags += [f for cap in ctx["capabilities"]["drop"] for f in ("--cap-drop", cap)]
    flags += [f for cap in ctx["capabilities"].get("add", []) for f in ("--cap-add", cap)]
    if ctx["allowPrivilegeEscalation"] is False:
        flags += ["--security-opt", "no-new-privileges"]
    if ctx.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    return flags


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def images() -> None:
    build = subprocess.run(
        ["bash", str(ROOT / "images" / "build.sh"), TAG],
        capture_output=True, text=True, timeout=1500, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr


@pytest.fixture
def pod_dirs(tmp_path: Path) -> dict[str, Path]:
    dirs = {name: tmp_path / name for name in ("bin", "run", "task", "term", "workspace", "tmp")}
    for d in dirs.values():
        d.mkdir()
        d.chmod(0o777)  # what the kubelet does for the pod's emptyDirs
    dirs["tmp"].chmod(0o1777)
    return dirs


def test_the_sandbox_image_has_the_papers_toolset(images: None) -> None:
    probe = docker(
        "run", "--rm", *HARDENED, SANDBOX, "python3", "-c",
        "import numpy, scipy, sympy, pandas, matplotlib; import shutil; "
        "print(all(shutil.which(t) for t in ('git', 'curl', 'gcc', 'make')))",
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "True"
    whoami = docker("run", "--rm", SANDBOX, "id", "-u")
    assert whoami.stdout.strip() == "65534"


def test_the_images_run_a_task_as_a_pod_would(
    images: None, pod_dirs: dict[str, Path], llm_server: ScriptedLLMServer
) -> None:
    llm_server.script(
        tool_call(
            "execute_bash",
            {
                "command": "id -u; kill -STOP $PPID; "
                "python3 -c 'import sympy; print(sympy.factorint(2**32 + 1))' | tee output/answer.txt"
            },
        ),
        tool_call("submit", {"answer": "{641: 1, 6700417: 1}"}),
    )
    (pod_dirs["task"] / "task.json").write_text(
        json.dumps(
            {
                "name": "image-test",
                "prompt": "Factor 2**32 + 1.",
                "model": {"name": "scripted-model", "baseURL": llm_server.base_url},
                "limits": {"maxSteps": 5},
            }
        )
    )
    bin_mount = f"{pod_dirs['bin']}:/opt/llmsandbox"
    run_mount = f"{pod_dirs['run']}:/run/execd"
    # Each container with the command and security context the operator's pod builder gives it.
    pod = pod_manifest()
    install, sandbox_c, agent_c = (
        container_of(pod, n) for n in ("install-execd", "sandbox", "agent")
    )
    init = docker(
        "run", "--rm", *security_flags(pod, install), "-v", bin_mount, "-v", run_mount, AGENT,
        *install["command"],
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    sandbox = f"llmsandbox-imgtest-{uuid.uuid4().hex[:8]}"
    # The pod's shared network namespace: the host's here, so the agent reaches the LLM server.
    started = docker(
        "run", "-d", "--name", sandbox, "--network", "host", *security_flags(pod, sandbox_c),
        # The pod's emptyDirs: host directories the kubelet makes world-writable.
        "-v", f"{bin_mount}:ro", "-v", run_mount, "-v", f"{pod_dirs['workspace']}:/workspace",
        "-v", f"{pod_dirs['tmp']}:/tmp", "-e", "HOME=/tmp/home", SANDBOX, *sandbox_c["command"],
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        command = agent_c["command"]
        command[command.index("--termination-log") + 1] = "/term/message"
        agent = docker(
            "run", "--rm", "--network", f"container:{sandbox}", *security_flags(pod, agent_c),
            "--tmpfs", "/tmp", "-v", run_mount, "-v", f"{pod_dirs['task']}:/etc/llmsandbox:ro",
            "-v", f"{pod_dirs['term']}:/term", "-e", "OPENAI_API_KEY=sk-image-test", AGENT,
            *command, timeout=300,
        )  # fmt: skip
        assert agent.returncode == 0, agent.stderr
        result = json.loads((pod_dirs["term"] / "message").read_text())
        assert result["phase"] == "Succeeded", result
        assert result["answer"] == "{641: 1, 6700417: 1}"
        # The command wrote output/answer.txt, and the agent collected it.
        assert result["outputs"] == [{"path": "answer.txt", "bytes": 21}]
        assert "could not be made" not in agent.stderr
        observation = (llm_server.chat_requests[1].json or {})["messages"][-1]["content"]
        assert "641" in observation
        # Commands are nobody and cannot signal the exec server (it dropped to the agent's uid).
        assert "65534" in observation
        assert "Operation not permitted" in observation
        # The agent stopped the exec server, so the sandbox container ends as the pod would.
        for _ in range(100):
            state = docker(
                "inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", sandbox
            ).stdout.split()
            if state and state[0] == "false":
                break
            time.sleep(0.1)
        assert state == ["false", "0"]
        sandbox_env = docker("inspect", "-f", "{{json .Config.Env}}", sandbox).stdout
        assert "sk-image-test" not in sandbox_env
    finally:
        docker("rm", "-f", sandbox)


def test_the_operator_image_runs_the_operator_as_nobody(images: None) -> None:
    config = json.loads(
        docker("inspect", "-f", "{{json .Config}}", f"llm-sandbox/operator:{TAG}").stdout
    )
    assert config["Cmd"] == ["python", "-m", "sandbox_operator"]
    assert config["User"] == "65534:65534"
    # Without settings it must refuse clearly, not crash: a bad value names its variable.
    bad = docker(
        "run", "--rm", "-e", "LLMSANDBOX_MAX_RUNNING_TASKS=-1", f"llm-sandbox/operator:{TAG}"
    )
    assert bad.returncode == 2
    assert "LLMSANDBOX_MAX_RUNNING_TASKS" in bad.stderr


def test_the_agent_image_carries_no_operator_and_the_operator_image_does(images: None) -> None:
    """The agent runs next to model-written code: it installs without the operator's extra."""
    probe = "import importlib.util as u; print([bool(u.find_spec(m)) for m in ('kopf', 'aiohttp', 'sandbox_agent')])"
    agent = docker("run", "--rm", AGENT, "python", "-c", probe)
    assert agent.returncode == 0, agent.stderr
    assert agent.stdout.strip() == "[False, False, True]"
    operator = docker("run", "--rm", f"llm-sandbox/operator:{TAG}", "python", "-c", probe)
    assert operator.stdout.strip() == "[True, True, True]", operator.stderr
    # sandboxctl in the agent image: the local commands, and a hint for the cluster ones.
    usage = docker("run", "--rm", AGENT, "sandboxctl", "--help")
    assert usage.returncode == 0, usage.stderr
    assert "run" in usage.stdout
    assert "llm-sandbox-operator[operator]" in usage.stdout
    cluster = docker("run", "--rm", AGENT, "sandboxctl", "get")
    assert cluster.returncode == 2
    assert cluster.stderr.count("\n") == 1
    assert "no command 'get' here" in cluster.stderr
    assert "llm-sandbox-operator[operator]" in cluster.stderr


def test_sandboxctl_runs_a_task_in_the_sandbox_image_given_by_image(
    images: None, tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    # What the README's Docker instructions do, with the image this module built.
    llm_server.script(
        tool_call("execute_bash", {"command": "python3 -c 'import sympy; print(sympy.prime(10))'"}),
        lambda request: tool_call("submit", {"answer": request["messages"][-1]["content"]}),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env |= {"OPENAI_BASE_URL": llm_server.base_url, "OPENAI_MODEL": "m", "OPENAI_API_KEY": "k"}
    run = subprocess.run(
        [sys.executable, "-m", "sandbox_agent.cli", "run", "--prompt", "p", "--backend",
         "docker", "--image", SANDBOX, "--out", "out", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)["result"]
    assert result["answer"].endswith("29")
