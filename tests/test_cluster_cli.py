"""`sandboxctl submit/get/wait/logs/crd` against the emulated API server, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from k8s.emulator import EmulatedApiServer
from k8s.kubelet import TestKubelet
from llmserver import ScriptedLLMServer, tool_call
from sandbox_operator.crd import crd_yaml, set_crd_yaml
from test_operator import OPERATOR, operator_env, secret

EXAMPLES = Path(__file__).parent.parent / "examples"


def sandboxctl(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandbox_agent.cli", *args],
        env={"PATH": os.environ["PATH"], "HOME": str(cwd or Path.cwd()), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def set_status(k8s: EmulatedApiServer, name: str, status: dict[str, Any]) -> None:
    k8s.patch("sandboxtasks", name, {"status": status}, subresource="status")


def test_crd_prints_the_generated_definition(tmp_path: Path) -> None:
    proc = sandboxctl("crd", env={}, cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout == crd_yaml()


def test_crd_prints_the_task_set_definition_when_asked(tmp_path: Path) -> None:
    proc = sandboxctl("crd", "--kind", "SandboxTaskSet", env={}, cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout == set_crd_yaml()


def test_submit_inlines_local_input_files_and_get_lists_the_task(
    k8s: EmulatedApiServer, tmp_path: Path
) -> None:
    proc = sandboxctl("submit", str(EXAMPLES / "long-document.yaml"), env=k8s.env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "sandboxtask/long-document created in namespace default" in proc.stdout
    body = k8s.get("sandboxtasks", "long-document") or {}
    inline = body["spec"]["inputs"][0]
    assert "file" not in inline
    assert inline["content"] == (EXAMPLES / "data" / "maintenance-log.txt").read_text()
    listing = sandboxctl("get", env=k8s.env(), cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "STEPS", "TOKENS", "ANSWER", "REASON", "AGE"]
    assert row.split()[:2] == ["long-document", "Pending"]


def test_get_shows_the_answer_and_wait_exits_by_outcome(
    k8s: EmulatedApiServer, tmp_path: Path
) -> None:
    k8s.create(_task("good"))
    k8s.create(_task("bad"))
    k8s.create(_task("busy"))
    set_status(
        k8s,
        "good",
        {
            "phase": "Succeeded",
            "exitReason": "submitted",
            "answer": "126",
            "answerShort": "126",
            "steps": 4,
            "usage": {"promptTokens": 10, "completionTokens": 5, "totalTokens": 15},
        },
    )
    set_status(
        k8s,
        "bad",
        {
            "phase": "Failed",
            "exitReason": "max_steps",
            "message": "the model used all 30 steps",
            "steps": 30,
        },
    )
    set_status(k8s, "busy", {"phase": "Running"})
    table = sandboxctl("get", "good", env=k8s.env(), cwd=tmp_path)
    assert table.stdout.splitlines()[1].split()[:6] == [
        "good",
        "Succeeded",
        "4",
        "15",
        "126",
        "submitted",
    ]
    good = sandboxctl("wait", "good", env=k8s.env(), cwd=tmp_path)
    assert good.returncode == 0
    assert "answer:      126" in good.stdout
    bad = sandboxctl("wait", "bad", env=k8s.env(), cwd=tmp_path)
    assert bad.returncode == 1
    assert "exitReason:  max_steps" in bad.stdout
    assert "the model used all 30 steps" in bad.stdout
    busy = sandboxctl("wait", "busy", "--timeout", "0.3", env=k8s.env(), cwd=tmp_path)
    assert busy.returncode == 3
    assert "still Running" in busy.stderr


def _task(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "llmsandbox.io/v1alpha1",
        "kind": "SandboxTask",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"prompt": "p"},
    }


def test_get_and_wait_show_escape_sequences_in_a_status_instead_of_obeying_them(
    k8s: EmulatedApiServer, tmp_path: Path
) -> None:
    """The answer and message in a status are the model's words: a terminal must not act on them."""
    k8s.create(_task("evil"))
    hostile = "42\x1b]52;c;cHduZWQ=\x07\x1b[2J\r"
    set_status(
        k8s,
        "evil",
        {
            "phase": "Failed",
            "exitReason": "max_steps",
            "answer": hostile,
            "answerShort": hostile,
            "message": "boom \x1b]0;title\x07",
        },
    )
    for args in (("get",), ("get", "evil"), ("wait", "evil")):
        proc = sandboxctl(*args, env=k8s.env(), cwd=tmp_path)
        assert "\x1b" not in proc.stdout, args
        assert "\r" not in proc.stdout, args
        assert "42\\x1b]52;c;cHduZWQ=" in proc.stdout, args
    waited = sandboxctl("wait", "evil", env=k8s.env(), cwd=tmp_path)
    assert "boom \\x1b]0;title\\x07" in waited.stdout


def test_missing_tasks_and_missing_clusters_are_named(
    k8s: EmulatedApiServer, tmp_path: Path
) -> None:
    proc = sandboxctl("get", "nope", env=k8s.env(), cwd=tmp_path)
    assert proc.returncode == 1
    assert "sandboxtask 'nope' not found" in proc.stderr
    logs = sandboxctl("logs", "nope", env=k8s.env(), cwd=tmp_path)
    assert logs.returncode == 1
    no_cluster = sandboxctl("get", env={}, cwd=tmp_path)
    assert no_cluster.returncode == 2
    assert no_cluster.stderr == (
        f"sandboxctl get: no kubeconfig at {tmp_path / '.kube' / 'config'}; set KUBECONFIG to "
        "your cluster's config file\n"
    )
    assert "KUBECONFIG" in no_cluster.stderr


def test_submit_of_an_invalid_file_names_the_field(k8s: EmulatedApiServer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: llmsandbox.io/v1alpha1\nkind: SandboxTask\nspec: {prompt: p, limits: {maxSteps: 0}}\n"
    )
    proc = sandboxctl("submit", str(bad), env=k8s.env(), cwd=tmp_path)
    assert proc.returncode == 2
    assert "spec.limits.maxSteps" in proc.stderr
    assert k8s.list("sandboxtasks", "default") == []


def test_submit_wait_and_logs_through_the_operator(
    k8s: EmulatedApiServer,
    kubelet: TestKubelet,
    run_operator: Any,
    llm_server: ScriptedLLMServer,
    tmp_path: Path,
) -> None:
    llm_server.script(
        tool_call("execute_bash", {"command": "echo 126 > output/answer.txt"}),
        tool_call("submit", {"answer": "126"}),
    )
    k8s.create(secret())
    with run_operator(OPERATOR, env=operator_env(llm_server)):
        submitted = sandboxctl(
            "submit", str(EXAMPLES / "maths-by-code.yaml"), env=k8s.env(), cwd=tmp_path
        )
        assert submitted.returncode == 0, submitted.stderr
        waited = sandboxctl("wait", "maths-by-code", "--timeout", "60", env=k8s.env(), cwd=tmp_path)
        assert waited.returncode == 0, waited.stdout + waited.stderr
        assert "answer:      126" in waited.stdout
        logs = sandboxctl("logs", "maths-by-code", env=k8s.env(), cwd=tmp_path)
    assert logs.returncode == 0, logs.stderr
    assert "LLMSANDBOX_RESULT" in logs.stdout


KUBECONFIG_UNREACHABLE = """\
apiVersion: v1
kind: Config
current-context: c
contexts:
- name: c
  context: {cluster: k, user: u}
clusters:
- name: k
  cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}
users:
- name: u
  user: {token: t}
"""


@pytest.mark.parametrize(
    ("kubeconfig", "expected"),
    [
        pytest.param(None, "no kubeconfig at KUBECONFIG={path}; set KUBECONFIG", id="missing"),
        pytest.param("garbage: [\n", "kubeconfig {path}: not valid YAML (line 2)", id="yaml"),
        pytest.param("a string\n", "kubeconfig {path}: not a kubeconfig", id="not-a-mapping"),
        pytest.param(
            KUBECONFIG_UNREACHABLE.replace("cluster: k,", "cluster: gone,"),
            "kubeconfig {path}: context 'c' names cluster 'gone', which is not among its clusters",
            id="missing-cluster",
        ),
        pytest.param(
            KUBECONFIG_UNREACHABLE.replace("user: u}", "user: nobody}"),
            "kubeconfig {path}: context 'c' names user 'nobody', which is not among its users",
            id="missing-user",
        ),
        pytest.param(
            KUBECONFIG_UNREACHABLE,
            "cannot reach the API server at https://127.0.0.1:1 (",
            id="unreachable",
        ),
    ],
)
@pytest.mark.parametrize("command", ["get", "wait", "logs"])
def test_a_kubeconfig_problem_is_one_line_naming_it(
    tmp_path: Path, kubeconfig: str | None, expected: str, command: str
) -> None:
    path = tmp_path / "kubeconfig"
    if kubeconfig is not None:
        path.write_text(kubeconfig)
    args = [command] if command == "get" else [command, "t"]
    proc = sandboxctl(*args, env={"KUBECONFIG": str(path)}, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"sandboxctl {command}: " + expected.format(path=path))
    assert len(proc.stderr.splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_submit_checks_the_task_file_before_the_cluster(tmp_path: Path) -> None:
    (tmp_path / "task.yaml").write_text(
        "apiVersion: llmsandbox.io/v1alpha1\nkind: SandboxTask\nspec: {}\n"
    )
    proc = sandboxctl(
        "submit", "task.yaml", env={"KUBECONFIG": str(tmp_path / "none")}, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "spec.prompt" in proc.stderr
    assert "kubeconfig" not in proc.stderr
