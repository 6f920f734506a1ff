"""Clean-up on the emulated cluster: finished tasks deleted after their TTL (the task's own or the
operator's), with their pods and ConfigMaps; finished pods deleted once their result is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from k8s.emulator import EmulatedApiServer
from k8s.kubelet import TestKubelet
from llmserver import ScriptedLLMServer, tool_call
from test_cluster_cli import sandboxctl
from test_operator import OPERATOR, TERMINAL, operator_env, pods_of, secret, task, wait_phase


def gone(k8s: EmulatedApiServer, kind: str, name: str) -> bool:
    return k8s.get(kind, name) is None


def test_a_task_with_ttl_zero_is_deleted_with_its_pod_and_configmap_once_it_ends(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(tool_call("submit", {"answer": "ok"}))
    k8s.create(secret())
    # Inputs too large for the pod's annotations: each task gets a ConfigMap.
    big = [{"path": "big.txt", "content": "x" * 200_000}]
    with run_operator(OPERATOR, env=operator_env(llm_server)):
        k8s.create(task("short", ttlSecondsAfterFinished=0, inputs=big))
        k8s.create(task("kept", inputs=big))
        k8s.wait_for(lambda: gone(k8s, "sandboxtasks", "short"), timeout=60,
                     message="the task with TTL 0 to be deleted")  # fmt: skip
        assert wait_phase(k8s, "kept", TERMINAL)["phase"] == "Succeeded"
        k8s.wait_for(lambda: gone(k8s, "configmaps", "short-task"), timeout=30, message="its cm")
        k8s.wait_for(lambda: not k8s.list("pods", "default", label_selector="llmsandbox.io/task=short"),
                     timeout=30, message="its pod")  # fmt: skip
    assert k8s.get("sandboxtasks", "kept") is not None
    assert k8s.get("configmaps", "kept-task") is not None
    # Its end was written first: the delete came after the terminal status, once.
    writes = [(w.verb, w.resource) for w in k8s.requests.writes(exclude_user_agent="test-kubelet")
              if w.name == "short" and w.resource.startswith("sandboxtasks")]  # fmt: skip
    assert writes[-1] == ("delete", "sandboxtasks")
    assert writes.count(("delete", "sandboxtasks")) == 1


def test_the_operators_ttl_applies_to_tasks_without_one_and_a_tasks_own_wins(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(tool_call("submit", {"answer": "ok"}))
    k8s.create(secret())
    env = operator_env(llm_server, LLMSANDBOX_TASK_TTL_SECONDS="1")
    with run_operator(OPERATOR, env=env):
        k8s.create(task("default-ttl"))
        k8s.create(task("own-ttl", ttlSecondsAfterFinished=3600))
        assert wait_phase(k8s, "own-ttl", TERMINAL)["phase"] == "Succeeded"
        k8s.wait_for(lambda: gone(k8s, "sandboxtasks", "default-ttl"), timeout=30,
                     message="the operator's TTL to delete the task")  # fmt: skip
    assert k8s.get("sandboxtasks", "own-ttl") is not None


def test_a_restarted_operator_deletes_tasks_whose_ttl_passed_while_it_was_down(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(tool_call("submit", {"answer": "ok"}))
    k8s.create(secret())
    with run_operator(OPERATOR, env=operator_env(llm_server)):
        k8s.create(task("old"))
        wait_phase(k8s, "old", TERMINAL)
    # The admin turns a TTL on; the operator finds the task finished long enough ago.
    with run_operator(OPERATOR, env=operator_env(llm_server, LLMSANDBOX_TASK_TTL_SECONDS="0")):
        k8s.wait_for(lambda: gone(k8s, "sandboxtasks", "old"), timeout=30,
                     message="the restarted operator to delete the finished task")  # fmt: skip


def test_a_finished_pod_is_deleted_and_logs_says_where_its_record_is(
    k8s: EmulatedApiServer,
    kubelet: TestKubelet,
    run_operator: Any,
    llm_server: ScriptedLLMServer,
    tmp_path: Path,
) -> None:
    llm_server.set_default(tool_call("submit", {"answer": "ok"}))
    k8s.create(secret())
    env = operator_env(llm_server, LLMSANDBOX_KEEP_FINISHED_PODS="false")
    with run_operator(OPERATOR, env=env):
        k8s.create(task("t"))
        wait_phase(k8s, "t", TERMINAL)
        k8s.wait_for(lambda: not pods_of(k8s, "t"), timeout=30, message="the pod to be deleted")
    logs = sandboxctl("logs", "t", env=k8s.env(), cwd=tmp_path)
    assert logs.returncode == 1
    assert logs.stderr.strip() == (
        "sandboxctl logs: t has finished and its pod t-a1 is gone (the operator deletes it once "
        "the result is read; LLMSANDBOX_KEEP_FINISHED_PODS=true keeps it)"
    )
