"""Which local backend `auto` picks, and the refusal when there is none."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_agent.backends import BwrapSandbox, DockerSandbox, ProcessSandbox, choose_backend
from sandbox_agent.backends import docker as docker_backend
from sandbox_agent.errors import BackendUnavailableError


@pytest.fixture
def empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("PATH", str(tmp_path))
    docker_backend.docker_reachable.cache_clear()
    yield tmp_path
    docker_backend.docker_reachable.cache_clear()


def fake_tool(directory: Path, name: str, script: str = "exit 0") -> None:
    tool = directory / name
    tool.write_text(f"#!/bin/sh\n{script}\n")
    tool.chmod(0o755)


def test_auto_refuses_with_instructions_when_nothing_is_installed(empty_path: Path) -> None:
    with pytest.raises(BackendUnavailableError) as info:
        choose_backend("auto")
    message = str(info.value)
    assert "apt-get install bubblewrap" in message
    assert "Docker" in message
    assert "--backend process" in message


def test_auto_prefers_bwrap(empty_path: Path) -> None:
    fake_tool(empty_path, "bwrap")
    fake_tool(empty_path, "docker", "echo 20.10")
    assert choose_backend("auto") is BwrapSandbox


def test_auto_falls_back_to_a_reachable_docker(empty_path: Path) -> None:
    fake_tool(empty_path, "docker", "echo 20.10")
    assert choose_backend("auto") is DockerSandbox


def test_an_unreachable_docker_engine_does_not_count(empty_path: Path) -> None:
    fake_tool(empty_path, "docker", "echo 'Cannot connect to the Docker daemon' >&2; exit 1")
    with pytest.raises(BackendUnavailableError):
        choose_backend("auto")


def test_explicit_choices_and_an_unknown_name() -> None:
    assert choose_backend("process") is ProcessSandbox
    with pytest.raises(BackendUnavailableError, match="unknown backend 'vm'"):
        choose_backend("vm")
