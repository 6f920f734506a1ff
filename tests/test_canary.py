"""The network-policy canary: its pod, how its exit is judged, and on the emulated cluster (whose
test kubelet runs pods on the host network and enforces no NetworkPolicy) the verdict it must
give there: not enforced."""

from __future__ import annotations

import socket
from typing import Any

import kubernetes_validate
import pytest

from conftest import settings_refusal
from k8s.emulator import EmulatedApiServer
from k8s.kubelet import TestKubelet
from llmserver import ScriptedLLMServer
from sandbox_operator.canary import (
    BLOCKED,
    CANARY_SCRIPT,
    CONNECTED,
    Enforcement,
    Target,
    canary_pod,
    judge,
    target_problem,
)
from sandbox_operator.policy import shared_policies
from sandbox_operator.settings import EgressRule, OperatorSettings
from test_operator import OPERATOR, operator_env
from test_operator_metrics import free_port, scrape, value

TARGET = Target("10.96.0.1", 443)
SETTINGS = OperatorSettings(agent_image="llm-sandbox/agent:test")


def finished(
    code: int | None, reason: str = "Completed", phase: str = "Succeeded"
) -> dict[str, Any]:
    statuses = []
    if code is not None:
        term = {"exitCode": code, "reason": reason}
        statuses = [{"name": "canary", "state": {"terminated": term}}]
    return {"status": {"phase": phase, "containerStatuses": statuses}}


def test_the_canary_pod_is_selected_by_the_isolated_policy_and_locked_down() -> None:
    pod = canary_pod("team-a", TARGET, SETTINGS)
    for version in ("1.29", "1.33"):
        kubernetes_validate.validate(
            {**pod, "metadata": {**pod["metadata"], "name": "c"}}, version, strict=True
        )
    (isolated,) = [
        p
        for p in shared_policies("team-a", SETTINGS)
        if p["metadata"]["name"] == "llmsandbox-isolated"
    ]
    selector = isolated["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert "llmsandbox.io/task-uid" not in pod["metadata"]["labels"]
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    assert container["image"] == "llm-sandbox/agent:test"
    assert container["command"][-2:] == ["10.96.0.1", "443"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize(
    ("pod", "enforcement", "words"),
    [
        (finished(CONNECTED), Enforcement.NOT_ENFORCED, "task pods are NOT isolated"),
        (
            finished(BLOCKED, "Error", "Failed"),
            Enforcement.ENFORCED,
            "could not connect to 10.96.0.1:443",
        ),
        (
            finished(137, "OOMKilled", "Failed"),
            Enforcement.UNKNOWN,
            "exited with code 137 (OOMKilled)",
        ),
        (
            {"status": {"phase": "Failed", "reason": "DeadlineExceeded"}},
            Enforcement.UNKNOWN,
            "ended without running (DeadlineExceeded)",
        ),
        (None, Enforcement.UNKNOWN, "disappeared"),
    ],
    ids=["connected", "blocked", "other-exit", "never-ran", "gone"],
)
def test_the_canary_is_judged_by_its_exit_code(
    pod: dict[str, Any] | None, enforcement: Enforcement, words: str
) -> None:
    verdict = judge(pod, TARGET)
    assert verdict is not None
    assert verdict.enforcement is enforcement
    assert words in verdict.detail


def test_a_canary_still_running_has_no_verdict_yet() -> None:
    assert judge({"status": {"phase": "Running"}}, TARGET) is None
    assert judge({"status": {"phase": "Pending"}}, TARGET) is None


def test_a_target_the_isolated_policy_allows_would_prove_nothing() -> None:
    settings = OperatorSettings(inference_egress=[EgressRule(cidrs=["10.96.0.0/12"], ports=[443])])
    problem = target_problem(TARGET, settings)
    assert problem is not None
    assert "inside 10.96.0.0/12 of LLMSANDBOX_INFERENCE_EGRESS[0]" in problem
    assert target_problem(Target("fd00::1", 443), settings) is None
    assert target_problem(TARGET, SETTINGS) is None


def test_the_canary_script_reports_connected_and_blocked_by_exit_code() -> None:
    import subprocess
    import sys

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        ok = subprocess.run(
            [sys.executable, "-c", CANARY_SCRIPT, "127.0.0.1", str(port)], check=False
        )
    assert ok.returncode == CONNECTED
    refused = subprocess.run(
        [sys.executable, "-c", CANARY_SCRIPT, "127.0.0.1", str(port)],
        capture_output=True,
        check=False,
    )
    assert refused.returncode == BLOCKED
    assert refused.stdout.startswith(b"blocked: ")


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"LLMSANDBOX_NETPOL_CANARY_TARGET": "kubernetes.default:443"},
            "LLMSANDBOX_NETPOL_CANARY_TARGET: 'kubernetes.default:443' is not ADDRESS:PORT",
        ),
        (
            {
                "LLMSANDBOX_WATCHED_NAMESPACES": '["team-a"]',
                "LLMSANDBOX_NETPOL_CANARY_NAMESPACE": "default",
            },
            "LLMSANDBOX_NETPOL_CANARY_NAMESPACE: 'default' is not one of LLMSANDBOX_WATCHED_NAMESPACES",
        ),
    ],
)
def test_bad_canary_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], line: str
) -> None:
    lines = settings_refusal(monkeypatch, env)
    assert any(text.startswith(line) for text in lines), lines


def test_the_canary_namespace_defaults_to_the_first_watched_one() -> None:
    assert OperatorSettings().canary_namespace == "default"
    assert OperatorSettings(watched_namespaces=["b", "a"]).canary_namespace == "b"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("target", "gauge", "words"),
    [
        (
            None,
            0,
            "not enforced: a pod under NetworkPolicy llmsandbox-isolated connected to 127.0.0.1:",
        ),
        ("closed", 1, "enforced: a pod under NetworkPolicy llmsandbox-isolated could not connect"),
    ],
    ids=["the-test-kubelet-enforces-nothing", "a-blocked-connection"],
)
def test_the_canary_on_the_emulated_cluster_reports_what_its_pod_could_reach(
    k8s: EmulatedApiServer,
    kubelet: TestKubelet,
    run_operator: Any,
    llm_server: ScriptedLLMServer,
    target: str | None,
    gauge: int,
    words: str,
) -> None:
    port = free_port()
    env = operator_env(
        llm_server, LLMSANDBOX_METRICS_PORT=str(port), LLMSANDBOX_NETPOL_CANARY="true"
    )
    if target == "closed":
        # Nothing listens there: the connection is refused, as a deny policy would make it.
        env["LLMSANDBOX_NETPOL_CANARY_TARGET"] = f"127.0.0.1:{closed_port()}"
    with run_operator(OPERATOR, env=env) as runner:
        k8s.wait_for(
            lambda: (
                value(
                    scrape(port).get("llmsandbox_network_policy_enforced", []),
                    "llmsandbox_network_policy_enforced",
                )
                != -1
            ),
            timeout=60,
            message="the canary's verdict",
        )
        enforced = value(
            scrape(port)["llmsandbox_network_policy_enforced"], "llmsandbox_network_policy_enforced"
        )
        k8s.wait_for(
            lambda: (
                not k8s.list(
                    "pods", "default", label_selector="app.kubernetes.io/component=netpol-canary"
                )
            ),
            timeout=20,
            message="the canary pod to be deleted",
        )
    assert enforced == gauge
    assert f"network policy enforcement in namespace default: {words}" in runner.output
    # The canary ran under the operator's isolated policy, which it put in place first.
    assert k8s.get("networkpolicies", "llmsandbox-isolated") is not None
    created = k8s.requests.entries(
        verb="create", resource="pods", exclude_user_agent="test-kubelet"
    )
    assert len(created) == 1


def test_the_canary_runs_under_the_runtime_class_task_pods_must_use() -> None:
    gvisor = SETTINGS.model_copy(update={"required_runtime_class": "gvisor"})
    assert canary_pod("default", TARGET, gvisor)["spec"]["runtimeClassName"] == "gvisor"
    assert "runtimeClassName" not in canary_pod("default", TARGET, SETTINGS)["spec"]


def test_the_canary_runs_where_task_pods_run_and_pulls_as_they_do() -> None:
    placed = OperatorSettings.model_validate(
        {
            "agent_image": "registry.example.com/llm-sandbox/agent:0.1.0",
            "agent_image_pull_policy": "Always",
            "task_scheduling": {
                "nodeSelector": {"llmsandbox.io/pool": "sandbox"},
                "tolerations": [{"key": "llmsandbox.io/sandbox", "operator": "Exists"}],
                "priorityClassName": "llmsandbox-batch",
            },
            "task_image_pull_secrets": [{"name": "regcred"}, {"name": "regcred"}],
        }
    )
    pod = canary_pod("default", TARGET, placed)
    spec = pod["spec"]
    assert spec["nodeSelector"] == {"llmsandbox.io/pool": "sandbox"}
    assert spec["tolerations"] == [{"key": "llmsandbox.io/sandbox", "operator": "Exists"}]
    assert spec["priorityClassName"] == "llmsandbox-batch"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["containers"][0]["imagePullPolicy"] == "Always"
    kubernetes_validate.validate(pod, "1.29", strict=True)
    plain = canary_pod("default", TARGET, SETTINGS)["spec"]
    assert not {"nodeSelector", "tolerations", "imagePullSecrets"} & set(plain)
    assert "imagePullPolicy" not in plain["containers"][0]
