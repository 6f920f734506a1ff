"""Tasks under Kueue's pod integration: the operator as a subprocess, the test kubelet, and the
test playing Kueue (k8s/kueue.py): its webhook gates every pod with the queue label, then the
test admits (removes the gate) or preempts (marks the pod TerminationTarget and deletes it)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from k8s.emulator import EmulatedApiServer
from k8s.history import TaskHistory
from k8s.kubelet import NeverStart, TestKubelet
from k8s.kueue import FakeKueue
from k8s.process import OperatorProcess
from llmserver import ScriptedLLMServer, slow, text, tool_call
from sandbox_operator.status import parse_rfc3339
from test_operator import TERMINAL, operator_env, pods_of, secret, status, task, wait_phase

ANSWER = {"phase": "Succeeded", "exitReason": "submitted", "answer": "42"}


@pytest.fixture
def kueue(k8s: EmulatedApiServer) -> Iterator[FakeKueue]:
    fake = FakeKueue(k8s).install()
    yield fake
    fake.uninstall()


def start_operator(k8s: EmulatedApiServer, env: dict[str, str], log_path: Path) -> OperatorProcess:
    return OperatorProcess(k8s, env, log_path.open("ab")).start()


def pod_scheduled(k8s: EmulatedApiServer, name: str) -> dict[str, Any]:
    conditions = {c["type"]: c for c in status(k8s, name).get("conditions") or []}
    return dict(conditions.get("PodScheduled") or {})


def current_pod(k8s: EmulatedApiServer, name: str) -> dict[str, Any]:
    pod = k8s.get("pods", status(k8s, name)["podName"])
    assert pod is not None
    return pod


def test_a_pod_held_by_kueue_waits_past_the_start_timeout_then_runs_once_admitted(
    k8s: EmulatedApiServer,
    kubelet: TestKubelet,
    kueue: FakeKueue,
    llm_server: ScriptedLLMServer,
    tmp_path: Path,
) -> None:
    kubelet.instant_complete(ANSWER)
    k8s.create(secret())
    env = operator_env(
        llm_server,
        LLMSANDBOX_MAX_RUNNING_TASKS="0",  # Kueue decides who runs
        LLMSANDBOX_POD_START_TIMEOUT_SECONDS="2",
        LLMSANDBOX_QUEUE_REFRESH_SECONDS="0.3",
    )
    op = start_operator(k8s, env, tmp_path / "operator.log")
    try:
        k8s.create(task("held", queueName="team-a"))
        k8s.wait_for(
            lambda: pod_scheduled(k8s, "held").get("reason") == "WaitingForKueue",
            timeout=30,
            message="the task to say that Kueue holds its pod",
        )
        pod = current_pod(k8s, "held")
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert pod["spec"]["schedulingGates"] == [{"name": "kueue.x-k8s.io/admission"}]
        # The test kubelet leaves a gated pod unscheduled, as the scheduler does.
        k8s.wait_for(
            lambda: any(
                c.get("reason") == "SchedulingGated"
                for c in (current_pod(k8s, "held").get("status") or {}).get("conditions") or []
            ),
            timeout=10,
        )
        assert "nodeName" not in current_pod(k8s, "held")["spec"]
        held = pod_scheduled(k8s, "held")
        assert (held["status"], held["message"]) == (
            "False",
            "pod held-a1 waits for Kueue to admit it in LocalQueue 'team-a' (scheduling gate "
            "kueue.x-k8s.io/admission); `kubectl get workloads -n default` shows why it waits",
        )
        # Held well past the 2 s start timeout (checked every 0.3 s): still waiting, not failed.
        time.sleep(4)
        assert status(k8s, "held")["phase"] == "Pending"
        assert pod_scheduled(k8s, "held")["reason"] == "WaitingForKueue"
        kueue.admit("held-a1")
        st = wait_phase(k8s, "held", TERMINAL)
    finally:
        op.stop()
    assert (st["phase"], st["answer"], st["attempt"]) == ("Succeeded", "42", 1), st
    assert "preemptions" not in st
    assert len(pods_of(k8s, "held")) == 1


def test_a_restarted_operator_counts_the_start_timeout_from_the_release_it_recorded(
    k8s: EmulatedApiServer,
    kubelet: TestKubelet,
    kueue: FakeKueue,
    llm_server: ScriptedLLMServer,
    tmp_path: Path,
) -> None:
    """status.ungatedTime is the record: the operator killed while Kueue holds the pod, the pod
    released while no operator runs, the next operator records the release when it first sees
    it, and only from then the start timeout counts (an hour-old pod is not failed at once)."""
    history = TaskHistory().attach(k8s)
    k8s.create(secret())
    env = operator_env(
        llm_server,
        LLMSANDBOX_DEFAULT_QUEUE_NAME="batch",
        LLMSANDBOX_POD_START_TIMEOUT_SECONDS="3",
        LLMSANDBOX_QUEUE_REFRESH_SECONDS="0.3",
    )
    log_path = tmp_path / "operator.log"
    op = start_operator(k8s, env, log_path)
    try:
        k8s.create(task("restarted"))
        k8s.wait_for(lambda: pod_scheduled(k8s, "restarted").get("reason") == "WaitingForKueue")
        labels = current_pod(k8s, "restarted")["metadata"]["labels"]
        assert labels["kueue.x-k8s.io/queue-name"] == "batch"  # the operator's default queue
    finally:
        assert op.kill() == -9
    time.sleep(3.5)  # held longer than the start timeout, with no operator
    # Released while no operator runs, and never scheduled after (no node fits it).
    kubelet.inject(lambda pod: True, NeverStart())
    kueue.admit("restarted-a1")
    op = start_operator(k8s, env, log_path)
    try:
        k8s.wait_for(lambda: "ungatedTime" in status(k8s, "restarted"), timeout=30)
        assert pod_scheduled(k8s, "restarted")["reason"] == "AdmittedByKueue"
        assert status(k8s, "restarted")["phase"] == "Pending"
        st = wait_phase(k8s, "restarted", TERMINAL, timeout=30)
    finally:
        op.stop()
    assert (st["phase"], st["exitReason"]) == ("Failed", "start_timeout"), st
    assert st["message"].startswith("the pod did not start within 3s of Kueue admitting it (")
    assert "Insufficient cpu" in st["message"]
    # Failed 3 s after the release was recorded, not at once for the time it was held.
    released, ended = parse_rfc3339(st["ungatedTime"]), parse_rfc3339(st["completionTime"])
    assert released is not None
    assert ended is not None
    assert (ended - released).total_seconds() >= 3
    assert history.violations == []


def test_a_pod_kueue_preempts_is_made_again_and_the_task_succeeds_with_no_failure_counted(
    k8s: EmulatedApiServer,
    kubelet: TestKubelet,
    kueue: FakeKueue,
    llm_server: ScriptedLLMServer,
    tmp_path: Path,
) -> None:
    history = TaskHistory().attach(k8s)
    # The first attempt's first call thinks for a long while; every later call answers.
    calls: list[object] = []

    def reply(request: dict[str, Any]) -> Any:
        calls.append(request)
        if len(calls) == 1:
            return slow(30, text("thinking"))
        return tool_call("submit", {"answer": "second time"})

    llm_server.set_default(reply)
    k8s.create(secret())
    env = operator_env(llm_server, LLMSANDBOX_MAX_RUNNING_TASKS="0")
    op = start_operator(k8s, env, tmp_path / "operator.log")
    try:
        # retries=0: a failure would end the task; Kueue's stop is not one.
        k8s.create(task("victim", queueName="team-a", retries=0))
        k8s.wait_for(lambda: pod_scheduled(k8s, "victim").get("reason") == "WaitingForKueue")
        kueue.admit("victim-a1")
        wait_phase(k8s, "victim", {"Running"})
        kueue.preempt("victim-a1")
        # The next attempt's pod goes through Kueue again: gated until admitted.
        k8s.wait_for(
            lambda: (
                status(k8s, "victim").get("attempt") == 2
                and pod_scheduled(k8s, "victim").get("reason") == "WaitingForKueue"
            ),
            timeout=30,
            message="the second attempt's pod to wait for Kueue",
        )
        retrying = status(k8s, "victim")
        complete = {c["type"]: c for c in retrying["conditions"]}["Complete"]
        assert (complete["status"], complete["reason"]) == ("False", "Preempted")
        assert retrying["message"].startswith(
            "attempt 1: Kueue stopped pod victim-a1 (WorkloadEvictedDueToPreempted: Preempted "
            "to accommodate a workload (UID: w-high) due to prioritization in the ClusterQueue); "
            "starting attempt 2 (Kueue's stop 1 of at most 10, not counted against spec.retries)"
        )
        kueue.admit("victim-a2")
        st = wait_phase(k8s, "victim", TERMINAL)
    finally:
        op.stop()
    assert (st["phase"], st["exitReason"], st["answer"]) == (
        "Succeeded",
        "submitted",
        "second time",
    ), st
    assert (st["attempt"], st["preemptions"]) == (2, 1)
    assert history.violations == []
    uid = k8s.get("sandboxtasks", "victim")["metadata"]["uid"]  # type: ignore[index]
    assert [attempt for _, attempt in history.tasks[uid].pods_created] == ["1", "2"]
