"""Shared fixtures: the scripted LLM server, and the local sandbox backends this machine offers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8s.fixtures import arun_operator, k8s, kubelet, run_operator
from llmserver import ScriptedLLMServer, llm_server
from realmodel import served_test_model, test_model_file
from sandbox_agent.backends import choose_backend
from sandbox_agent.backends.bwrap import bwrap_path
from sandbox_agent.backends.docker import docker_reachable
from sandbox_agent.runner import RunOptions, RunOutcome, run_task
from sandbox_agent.taskfile import load_task_file
from sandbox_operator.settings import OperatorSettings, SettingsError, load_settings

__all__ = [
    "arun_operator",
    "k8s",
    "kubelet",
    "llm_server",
    "run_operator",
    "served_test_model",
    "test_model_file",
]

# The image container tests run the docker backend with (built by images/base/build.sh).
TEST_IMAGE = "llm-sandbox/base:bookworm"
REPO = Path(__file__).resolve().parents[1]
# What a child process (sandboxctl, the operator, a pod's containers) imports, asked of a fresh
# interpreter with nothing but PATH, as pods get.
_IMPORTED_FROM = (
    "import sandbox_agent, sandbox_operator; "
    "print(sandbox_agent.__file__); print(sandbox_operator.__file__)"
)


def imported_from(python: str = sys.executable) -> list[Path]:
    """Where a child process finds the two packages (an empty list when it finds none)."""
    probe = subprocess.run(
        [python, "-c", _IMPORTED_FROM],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:
        return []
    return [Path(line).resolve().parents[1] for line in probe.stdout.split()]


def checkout_problem(found: list[Path], repo: Path = REPO) -> str | None:
    """Why child processes would not test `repo`, given where they import the packages from."""
    if found == [repo / "agent", repo / "operator"]:
        return None
    where = ", ".join(map(str, found)) or "nowhere (it is not installed)"
    return (
        f"child processes would import llm-sandbox-operator from {where}, not from this "
        f"checkout ({repo}): run `pip install -e .` here first (`make test` does)"
    )


# Fixtures that bring up the emulated API server (and with it, usually, the test kubelet).
_EMULATOR_FIXTURES = {"k8s", "kubelet", "run_operator", "arun_operator"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the emulator, so `make unit` can leave them out."""
    for item in items:
        if _EMULATOR_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.emulator)


def pytest_configure(config: pytest.Config) -> None:
    """In-process tests import this checkout; child processes import what is installed. Both
    must be this checkout, or the subprocess and pod tests would test another copy."""
    problem = checkout_problem(imported_from())
    if problem is not None:
        raise pytest.UsageError(problem)


@cache
def bwrap_works() -> bool:
    exe = bwrap_path()
    if exe is None:
        return False
    probe = subprocess.run(
        [exe, "--ro-bind", "/", "/", "--unshare-user", "--unshare-pid", "true"],
        capture_output=True,
        timeout=20,
        check=False,
    )
    return probe.returncode == 0


@cache
def docker_image_present(image: str = TEST_IMAGE) -> bool:
    if not docker_reachable():
        return False
    probe = subprocess.run(
        ["docker", "image", "inspect", image], capture_output=True, timeout=30, check=False
    )
    return probe.returncode == 0


def backend_param(name: str, marks: Sequence[Any] = ()) -> Any:
    """A pytest.param for a backend, skipped where it cannot run, with `marks` added."""
    all_marks = list(marks)
    if name == "bwrap":
        all_marks += [
            pytest.mark.bwrap,
            pytest.mark.skipif(not bwrap_works(), reason="bubblewrap not installed or not usable"),
        ]
    elif name == "docker":
        all_marks += [
            pytest.mark.container,
            pytest.mark.skipif(
                not docker_image_present(),
                reason=f"no Docker engine, or image {TEST_IMAGE} missing (bash images/base/build.sh)",
            ),
        ]
    return pytest.param(name, marks=all_marks, id=name)


ALL_BACKENDS = [backend_param(n) for n in ("process", "bwrap", "docker")]


@pytest.fixture(params=ALL_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each local backend available on this machine."""
    name: str = request.param
    assert choose_backend(name).name == name
    return name


def operator_settings(**overrides: Any) -> OperatorSettings:
    """Operator settings for tests that run its decisions or controller without an API server:
    a default endpoint on a closed port, model `m`, key Secret `llm-key`, no metrics server."""
    defaults: dict[str, Any] = {
        "default_base_url": "http://127.0.0.1:9/v1",
        "default_model": "m",
        "default_api_key_secret": "llm-key",
        "metrics_port": 0,
    }
    return OperatorSettings(**{**defaults, **overrides})


def settings_refusal(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> list[str]:
    """The lines of the SettingsError the operator's settings raise with `env` set."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    return str(info.value).splitlines()


def task_doc(prompt: str = "Solve it.", **spec: Any) -> dict[str, Any]:
    """A SandboxTask document with test-friendly defaults, spec keys as on the wire."""
    spec.setdefault("model", {})
    spec["model"].setdefault("name", "scripted-model")
    spec.setdefault("limits", {})
    spec["limits"].setdefault("maxSteps", 10)
    spec["limits"].setdefault("maxLlmRetries", 2)
    spec.setdefault("sandbox", {})
    spec["sandbox"].setdefault("image", TEST_IMAGE)
    return {
        "apiVersion": "llmsandbox.io/v1alpha1",
        "kind": "SandboxTask",
        "metadata": {"name": "test-task"},
        "spec": {"prompt": prompt, **spec},
    }


@pytest.fixture
def run_local(tmp_path: Path, llm_server: ScriptedLLMServer) -> Callable[..., RunOutcome]:
    """Write a task file, run it through the real runner against the scripted server."""

    def run(doc: dict[str, Any], backend: str = "process", **opts: Any) -> RunOutcome:
        task_file = tmp_path / "task.yaml"
        task_file.write_text(yaml.safe_dump(doc))
        task = load_task_file(task_file)
        options = RunOptions(
            backend=backend,
            base_url=opts.pop("base_url", llm_server.base_url),
            api_key=opts.pop("api_key", "test-key"),
            out_dir=tmp_path / "run",
            retry_backoff_seconds=opts.pop("retry_backoff_seconds", 0.01),
            env=opts.pop("env", {}),
            **opts,
        )
        return asyncio.run(run_task(task, tmp_path, options, task_file=task_file))

    return run
