"""The real kopf operator against the emulated API server, with a test kubelet running real pods:
the real exec server and the real agent, talking to the scripted LLM server."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from k8s.emulator import EmulatedApiServer
from k8s.history import TaskHistory
from k8s.kubelet import Evict, ImagePullFailure, NeverStart, OOMKill, TestKubelet
from llmserver import ScriptedLLMServer, slow, text, tool_call

OPERATOR = "sandbox_operator.handlers"
TERMINAL = {"Succeeded", "Failed", "Cancelled"}
ACTIVE_POD_PHASES = {"Pending", "Running"}


def operator_env(server: ScriptedLLMServer, **overrides: str) -> dict[str, str]:
    env = {
        "LLMSANDBOX_DEFAULT_BASE_URL": server.base_url,
        "LLMSANDBOX_DEFAULT_MODEL": "scripted-model",
        "LLMSANDBOX_DEFAULT_API_KEY_SECRET": "llm-key",
        "LLMSANDBOX_MAX_RUNNING_TASKS": "10",
        "LLMSANDBOX_METRICS_PORT": "0",
        "LLMSANDBOX_DEADLINE_GRACE_SECONDS": "5",
        "LLMSANDBOX_EXECD_READY_TIMEOUT_SECONDS": "5",
        "LLMSANDBOX_TOKEN_PRICES": '{"scripted-model": {"prompt_per_million": 1.0, "completion_per_million": 2.0}}',
        # Pods stay for the tests to look at; the tests of their clean-up set it false.
        "LLMSANDBOX_KEEP_FINISHED_PODS": "true",
        # Only a root test kubelet can start the sandbox container as root and let it drop.
        "LLMSANDBOX_SANDBOX_USER_SPLIT": "true" if os.geteuid() == 0 else "false",
    }
    env.update(overrides)
    return env


API_KEY_LABEL = {"llmsandbox.io/api-key": "true"}


def secret(name: str = "llm-key", labels: dict[str, str] | None = None) -> dict[str, Any]:
    """An API-key Secret; with the operator's API-key label unless `labels` says otherwise."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": API_KEY_LABEL if labels is None else labels,
        },
        "stringData": {"apiKey": "sk-cluster-secret"},
    }


def task(name: str, prompt: str = "Answer the question.", **spec: Any) -> dict[str, Any]:
    spec.setdefault("limits", {}).setdefault("maxSteps", 8)
    spec["limits"].setdefault("activeDeadlineSeconds", 120)
    spec["limits"].setdefault("maxLlmRetries", 1)
    spec.setdefault("sandbox", {}).setdefault("image", "llm-sandbox/sandbox-python:test")
    return {
        "apiVersion": "llmsandbox.io/v1alpha1",
        "kind": "SandboxTask",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"prompt": prompt, **spec},
    }


def status(k8s: EmulatedApiServer, name: str) -> dict[str, Any]:
    body = k8s.get("sandboxtasks", name) or {}
    return dict(body.get("status") or {})


def wait_phase(
    k8s: EmulatedApiServer, name: str, phases: set[str], timeout: float = 60
) -> dict[str, Any]:
    k8s.wait_for(
        lambda: status(k8s, name).get("phase") in phases,
        timeout=timeout,
        message=f"task {name} to reach {sorted(phases)}",
    )
    return status(k8s, name)


def st_uid(k8s: EmulatedApiServer, name: str) -> str:
    body = k8s.get("sandboxtasks", name)
    assert body is not None, f"sandboxtask {name} does not exist"
    return str(body["metadata"]["uid"])


def pods_of(k8s: EmulatedApiServer, name: str) -> list[dict[str, Any]]:
    uid = (k8s.get("sandboxtasks", name) or {}).get("metadata", {}).get("uid")
    return (
        k8s.list("pods", "default", label_selector=f"llmsandbox.io/task-uid={uid}") if uid else []
    )


def answer_after_tool(
    answer: str, command: str = "echo working"
) -> Callable[[dict[str, Any]], Any]:
    """A model that runs one command, then submits `answer`."""

    def reply(request: dict[str, Any]) -> Any:
        if request["messages"][-1]["role"] == "tool":
            return tool_call("submit", {"answer": answer})
        return tool_call("execute_bash", {"command": command})

    return reply


@contextlib.contextmanager
def max_active_pods(k8s: EmulatedApiServer) -> Iterator[list[int]]:
    """Samples how many task pods are active at once, while the block runs."""
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            active = [
                p for p in k8s.list("pods", "default")
                if (p.get("status") or {}).get("phase", "Pending") in ACTIVE_POD_PHASES
            ]  # fmt: skip
            peak[0] = max(peak[0], len(active))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def test_a_task_applied_ends_succeeded_with_the_answer_steps_and_usage_in_status(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.script(
        tool_call("execute_bash", {"command": "python3 -c 'print(6 * 7)' > output/answer.txt"}),
        tool_call("submit", {"answer": "42"}, usage=(1000, 20)),
    )
    k8s.create(secret())
    env = operator_env(llm_server, LLMSANDBOX_KEEP_FINISHED_PODS="false")
    with run_operator(OPERATOR, env=env):
        k8s.create(task("t1", inputs=[{"path": "q.txt", "content": "six times seven"}]))
        st = wait_phase(k8s, "t1", TERMINAL)
        # Its result read, the pod goes.
        k8s.wait_for(lambda: not pods_of(k8s, "t1"), timeout=30, message="the pod to be deleted")
    assert st["phase"] == "Succeeded", st
    assert st["exitReason"] == "submitted"
    assert st["answer"] == "42"
    assert st["answerShort"] == "42"
    assert st["steps"] == 2
    assert st["usage"]["completionTokens"] >= 20
    assert st["usage"]["costUSD"] > 0
    assert st["toolCalls"] == {"execute_bash": 1, "submit": 1}
    assert st["outputs"] == [{"path": "answer.txt", "bytes": 3}]
    assert st["attempt"] == 1
    assert st["runSeconds"] >= 0
    complete = {c["type"]: c for c in st["conditions"]}["Complete"]
    assert (complete["status"], complete["reason"]) == ("True", "Succeeded")
    # The key reached the endpoint from the agent container's Secret reference.
    assert llm_server.chat_requests[0].headers["authorization"] == "Bearer sk-cluster-secret"
    # The inline input was mounted into the sandbox.
    assert "q.txt" in (llm_server.chat_requests[0].json or {})["messages"][1]["content"]


def test_without_the_user_split_a_task_runs_with_every_container_as_nobody(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    """For namespaces that enforce Pod Security "restricted": no root, no added capability."""
    llm_server.script(
        tool_call("execute_bash", {"command": "id -u"}),
        tool_call("submit", {"answer": "ok"}),
    )
    k8s.create(secret())
    env = operator_env(llm_server, LLMSANDBOX_SANDBOX_USER_SPLIT="false")
    with run_operator(OPERATOR, env=env):
        k8s.create(task("nosplit"))
        st = wait_phase(k8s, "nosplit", TERMINAL)
    assert st["phase"] == "Succeeded", st
    (pod,) = pods_of(k8s, "nosplit")
    for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
        assert c["securityContext"]["runAsUser"] == 65534, c["name"]
        assert "add" not in c["securityContext"]["capabilities"], c["name"]
    assert "[exit code 0]" in (llm_server.chat_requests[1].json or {})["messages"][-1]["content"]


def test_the_common_path_costs_at_most_six_api_writes_per_task(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(tool_call("submit", {"answer": "ok"}))
    k8s.create(secret())
    with run_operator(OPERATOR, env=operator_env(llm_server)):
        k8s.requests.clear()
        for i in range(3):
            k8s.create(task(f"w{i}"))
        for i in range(3):
            assert wait_phase(k8s, f"w{i}", TERMINAL)["phase"] == "Succeeded"
    # The test's own creates bypass HTTP; everything left but the kubelet is the operator.
    writes = k8s.requests.writes(exclude_user_agent="test-kubelet")
    per_namespace = [w for w in writes if w.resource == "networkpolicies"]
    per_task = [w for w in writes if w.resource != "networkpolicies"]
    assert len(per_namespace) <= 3
    assert len(per_task) / 3 <= 6, sorted((w.verb, w.resource) for w in per_task)


def test_max_running_tasks_caps_concurrent_pods_and_all_tasks_finish(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(answer_after_tool("done", "sleep 0.5; echo slept"))
    k8s.create(secret())
    names = [f"q{i}" for i in range(6)]
    env = operator_env(llm_server, LLMSANDBOX_MAX_RUNNING_TASKS="2")
    with run_operator(OPERATOR, env=env), max_active_pods(k8s) as peak:
        for name in names:
            k8s.create(task(name))
        # While two run, the others wait in the queue with a position.
        k8s.wait_for(
            lambda: any(status(k8s, n).get("phase") == "Queued" for n in names), timeout=30
        )
        queued = [status(k8s, n) for n in names if status(k8s, n).get("phase") == "Queued"]
        assert all(q.get("queuePosition", 0) >= 1 for q in queued)
        for name in names:
            assert wait_phase(k8s, name, TERMINAL, timeout=120)["phase"] == "Succeeded"
    assert peak[0] <= 2
    assert all(len(pods_of(k8s, n)) == 1 for n in names)


def test_queue_positions_follow_the_queue(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(answer_after_tool("done", "sleep 0.5"))
    k8s.create(secret())
    env = operator_env(
        llm_server, LLMSANDBOX_MAX_RUNNING_TASKS="1", LLMSANDBOX_QUEUE_REFRESH_SECONDS="0.2"
    )
    with run_operator(OPERATOR, env=env):
        k8s.create(task("p0"))
        wait_phase(k8s, "p0", {"Pending", "Running"})
        for i in (1, 2, 3):
            k8s.create(task(f"p{i}"))
            time.sleep(0.05)
        k8s.wait_for(lambda: status(k8s, "p3").get("queuePosition") == 3, timeout=20)
        wait_phase(k8s, "p1", {"Pending", "Running", "Succeeded"})
        # p1 left the queue: p3 moves up without anything else happening to it.
        k8s.wait_for(lambda: status(k8s, "p3").get("queuePosition") in (1, 2), timeout=20)
        for i in (1, 2, 3):
            assert wait_phase(k8s, f"p{i}", TERMINAL)["phase"] == "Succeeded"
    assert "queuePosition" not in status(k8s, "p3")


def test_a_higher_priority_task_is_admitted_before_older_ones(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(answer_after_tool("done", "sleep 0.3"))
    k8s.create(secret())
    with run_operator(OPERATOR, env=operator_env(llm_server, LLMSANDBOX_MAX_RUNNING_TASKS="1")):
        k8s.create(task("first"))
        wait_phase(k8s, "first", {"Pending", "Running"})
        k8s.create(task("low"))
        time.sleep(0.05)
        k8s.create(task("high", priority=100))
        wait_phase(k8s, "high", TERMINAL, timeout=60)
        assert status(k8s, "low").get("phase") in {"Queued", "Pending", "Running"}
        wait_phase(k8s, "low", TERMINAL, timeout=60)
    assert status(k8s, "high")["startTime"] <= status(k8s, "low")["startTime"]


def test_an_operator_restart_mid_task_creates_no_second_pod_and_the_task_finishes(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(
        lambda req: (
            tool_call("submit", {"answer": "survived"})
            if req["messages"][-1]["role"] == "tool"
            else slow(2, tool_call("execute_bash", {"command": "echo hi"}))
        )
    )
    k8s.create(secret())
    env = operator_env(llm_server, LLMSANDBOX_MAX_RUNNING_TASKS="1")
    with run_operator(OPERATOR, env=env):
        k8s.create(task("r1"))
        k8s.create(task("r2"))
        wait_phase(k8s, "r1", {"Running"})
    # The operator is gone while r1's pod runs; a new one takes over.
    with run_operator(OPERATOR, env=env):
        assert wait_phase(k8s, "r1", TERMINAL)["answer"] == "survived"
        assert wait_phase(k8s, "r2", TERMINAL)["answer"] == "survived"
    assert len(pods_of(k8s, "r1")) == 1
    assert len(pods_of(k8s, "r2")) == 1


def test_deleting_a_task_removes_its_pod_and_frees_its_slot(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(
        lambda req: (
            slow(30, text("thinking"))
            if "doomed" in str(req["messages"][1])
            else tool_call("submit", {"answer": "next"})
        )
    )
    k8s.create(secret())
    with run_operator(OPERATOR, env=operator_env(llm_server, LLMSANDBOX_MAX_RUNNING_TASKS="1")):
        k8s.create(task("doomed", prompt="doomed task"))
        wait_phase(k8s, "doomed", {"Running"})
        k8s.create(task("waiting", prompt="next task"))
        assert wait_phase(k8s, "waiting", {"Queued"})["queuePosition"] == 1
        k8s.delete("sandboxtasks", "doomed")
        k8s.wait_for(
            lambda: not k8s.list("pods", "default", label_selector="llmsandbox.io/task=doomed"),
            timeout=20,
        )
        assert wait_phase(k8s, "waiting", TERMINAL)["phase"] == "Succeeded"


def test_a_pod_deleted_under_a_running_task_is_retried_then_fails(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    # The deleted pod takes a while to terminate (the kubelet honours the grace period): the
    # retry's pod must wait for it to be gone, never run beside it.
    history = TaskHistory().attach(k8s)
    llm_server.set_default(slow(30, text("thinking")))
    k8s.create(secret())
    with run_operator(OPERATOR, env=operator_env(llm_server)):
        k8s.create(task("fragile", retries=1))
        for attempt in (1, 2):

            def running(a: int = attempt) -> bool:
                return bool(
                    status(k8s, "fragile").get("attempt") == a
                    and status(k8s, "fragile").get("phase") == "Running"
                )

            k8s.wait_for(running, timeout=30)
            k8s.delete("pods", status(k8s, "fragile")["podName"])
        st = wait_phase(k8s, "fragile", TERMINAL)
    assert st["phase"] == "Failed"
    assert st["exitReason"] == "pod_lost"
    assert st["attempt"] == 2
    assert "deleted" in st["message"]
    assert history.violations == []
    assert [attempt for _, attempt in history.tasks[st_uid(k8s, "fragile")].pods_created] == [
        "1",
        "2",
    ]


def test_an_evicted_pod_is_retried_and_the_retry_succeeds(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(answer_after_tool("second time lucky", "sleep 1"))
    kubelet.inject(
        lambda pod: pod["metadata"]["labels"].get("llmsandbox.io/attempt") == "1", Evict(after=0.3)
    )
    k8s.create(secret())
    with run_operator(OPERATOR, env=operator_env(llm_server)):
        k8s.create(task("evictee", retries=1))
        st = wait_phase(k8s, "evictee", TERMINAL)
    assert st["phase"] == "Succeeded", st
    assert st["attempt"] == 2
    assert len(pods_of(k8s, "evictee")) == 2


@pytest.mark.parametrize(
    ("fault", "exit_reason", "reason", "words"),
    [
        (
            ImagePullFailure(container="sandbox"),
            "image_pull_error",
            "ImagePullFailed",
            ["llm-sandbox/sandbox-python:test", "spec.sandbox.image"],
        ),
        (
            OOMKill("sandbox", after=0.5),
            "oom_killed",
            "OOMKilled",
            ["ran out of memory", "limits.memory"],
        ),
        (Evict(after=0.3), "evicted", "Evicted", ["evicted"]),
    ],
    ids=["image-pull", "oom", "evicted-no-retries"],
)
def test_named_pod_failures_end_the_task_with_their_reason(
    k8s: EmulatedApiServer,
    kubelet: TestKubelet,
    run_operator: Any,
    llm_server: ScriptedLLMServer,
    fault: Any,
    exit_reason: str,
    reason: str,
    words: list[str],
) -> None:
    llm_server.set_default(slow(20, text("thinking")))
    kubelet.inject(lambda pod: True, fault)
    k8s.create(secret())
    with run_operator(OPERATOR, env=operator_env(llm_server)):
        k8s.create(task("broken", retries=0))
        st = wait_phase(k8s, "broken", TERMINAL)
        # A pod that can never run does not keep its slot.
        k8s.wait_for(
            lambda: all(
                (p.get("status") or {}).get("phase") not in ACTIVE_POD_PHASES
                for p in pods_of(k8s, "broken")
            ),
            timeout=20,
        )
    assert st["phase"] == "Failed"
    assert st["exitReason"] == exit_reason
    complete = {c["type"]: c for c in st["conditions"]}["Complete"]
    assert complete["reason"] == reason
    for word in words:
        assert word in st["message"]


def test_a_pod_that_is_never_scheduled_fails_after_the_start_timeout_and_frees_its_slot(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    # Kubernetes' activeDeadlineSeconds never starts for an unscheduled pod: without the
    # operator's start timeout this task would hold the only run slot forever.
    kubelet.inject(
        lambda pod: pod["metadata"]["labels"]["llmsandbox.io/task"] == "huge", NeverStart()
    )
    # The next task's pod completes at once: with a 2 s start timeout for every pod, one that
    # really starts could itself time out on a loaded machine.
    kubelet.instant_complete(
        {"phase": "Succeeded", "exitReason": "submitted", "answer": "next"},
        match=lambda pod: pod["metadata"]["labels"]["llmsandbox.io/task"] == "waiting",
    )
    k8s.create(secret())
    env = operator_env(
        llm_server,
        LLMSANDBOX_MAX_RUNNING_TASKS="1",
        LLMSANDBOX_POD_START_TIMEOUT_SECONDS="2",
        LLMSANDBOX_QUEUE_REFRESH_SECONDS="0.5",
    )
    with run_operator(OPERATOR, env=env):
        k8s.create(task("huge"))
        k8s.wait_for(lambda: status(k8s, "huge").get("phase") == "Pending", timeout=20)
        k8s.create(task("waiting"))
        st = wait_phase(k8s, "huge", TERMINAL)
        after = wait_phase(k8s, "waiting", TERMINAL)
        k8s.wait_for(lambda: pods_of(k8s, "huge") == [], timeout=20)
    assert (st["phase"], st["exitReason"]) == ("Failed", "start_timeout")
    assert "did not start within 2s" in st["message"]
    assert "Insufficient cpu" in st["message"]
    assert {c["type"]: c for c in st["conditions"]}["Complete"]["reason"] == "StartTimeout"
    assert after["phase"] == "Succeeded", after
    assert after["answer"] == "next"


def test_a_missing_api_key_secret_is_named(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    with run_operator(OPERATOR, env=operator_env(llm_server)):
        k8s.create(task("nokey"))
        st = wait_phase(k8s, "nokey", TERMINAL)
    assert st["exitReason"] == "config_error"
    assert 'secret "llm-key" not found' in st["message"]
    assert llm_server.chat_requests == []


def test_a_missing_input_configmap_is_named_at_once(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    k8s.create(secret())
    k8s.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "docs", "namespace": "default"},
            "data": {"a.txt": "A"},
        }
    )
    with run_operator(OPERATOR, env=operator_env(llm_server)):
        k8s.create(task("nocm", inputs=[{"path": "d", "configMapRef": {"name": "absent"}}]))
        k8s.create(
            task(
                "nokey",
                inputs=[{"path": "b.txt", "configMapRef": {"name": "docs", "key": "b.txt"}}],
            )
        )
        nocm = wait_phase(k8s, "nocm", TERMINAL)
        nokey = wait_phase(k8s, "nokey", TERMINAL)
    assert nocm["exitReason"] == "config_error"
    assert 'spec.inputs[0].configMapRef: configmap "absent" not found' in nocm["message"]
    assert "has no key 'b.txt'" in nokey["message"]
    assert pods_of(k8s, "nocm") == []


def test_inputs_from_a_configmap_reach_the_sandbox(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(answer_after_tool("read", "cat input/docs/a.txt input/single.txt"))
    k8s.create(secret())
    k8s.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "docs", "namespace": "default"},
            "data": {"a.txt": "from-a", "b.txt": "from-b"},
        }
    )
    with run_operator(OPERATOR, env=operator_env(llm_server)):
        k8s.create(
            task(
                "withcm",
                inputs=[
                    {"path": "docs", "configMapRef": {"name": "docs"}},
                    {"path": "single.txt", "configMapRef": {"name": "docs", "key": "b.txt"}},
                ],
            )
        )
        st = wait_phase(k8s, "withcm", TERMINAL)
    pods = pods_of(k8s, "withcm")
    assert st["phase"] == "Succeeded", kubelet.read_log(
        "default", pods[0]["metadata"]["name"], "sandbox"
    )
    observation = (llm_server.chat_requests[1].json or {})["messages"][-1]["content"]
    assert "from-afrom-b" in observation.replace("\n", "").replace("\n", "")


def test_the_wall_clock_deadline_stops_the_task(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(slow(30, text("thinking")))
    k8s.create(secret())
    with run_operator(
        OPERATOR, env=operator_env(llm_server, LLMSANDBOX_DEADLINE_GRACE_SECONDS="0")
    ):
        k8s.create(task("slowpoke", limits={"activeDeadlineSeconds": 2}))
        st = wait_phase(k8s, "slowpoke", TERMINAL, timeout=40)
    assert st["exitReason"] == "deadline"
    assert "activeDeadlineSeconds" in st["message"]


def test_an_unreachable_endpoint_is_named(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    k8s.create(secret())
    with run_operator(
        OPERATOR, env=operator_env(llm_server, LLMSANDBOX_DEFAULT_BASE_URL="http://127.0.0.1:9/v1")
    ):
        k8s.create(task("offline"))
        st = wait_phase(k8s, "offline", TERMINAL)
    assert st["exitReason"] == "llm_error"
    assert "http://127.0.0.1:9/v1" in st["message"]
    complete = {c["type"]: c for c in st["conditions"]}["Complete"]
    assert complete["reason"] == "EndpointUnreachable"


def test_an_exec_server_that_never_starts_is_named(
    k8s: EmulatedApiServer, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    import sys

    # The sandbox image "has no python3": its command cannot start.
    with TestKubelet(
        k8s, command_map={"python": sys.executable, "python3": "/nonexistent/python3"}
    ):
        k8s.create(secret())
        with run_operator(
            OPERATOR, env=operator_env(llm_server, LLMSANDBOX_EXECD_READY_TIMEOUT_SECONDS="2")
        ):
            k8s.create(task("nopython"))
            st = wait_phase(k8s, "nopython", TERMINAL, timeout=40)
    assert st["exitReason"] == "sandbox_error"
    assert "not ready" in st["message"]
    complete = {c["type"]: c for c in st["conditions"]}["Complete"]
    assert complete["reason"] == "ExecServerNotReady"


def test_an_invalid_spec_ends_invalid_spec_with_the_field_path_and_the_operator_keeps_serving(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(tool_call("submit", {"answer": "fine"}))
    k8s.create(secret())
    with run_operator(OPERATOR, env=operator_env(llm_server)):
        # Passes the CRD schema (which cannot express either rule) but not the operator's checks.
        k8s.create(
            task("bad1", inputs=[{"path": "a.txt", "content": "x", "configMapRef": {"name": "cm"}}])
        )
        k8s.create(task("bad2", inputs=[{"path": "local.txt", "file": "local.txt"}]))
        k8s.create(task("good"))
        bad1 = wait_phase(k8s, "bad1", TERMINAL)
        bad2 = wait_phase(k8s, "bad2", TERMINAL)
        good = wait_phase(k8s, "good", TERMINAL)
    assert bad1["exitReason"] == "invalid_spec"
    assert "spec.inputs[0]" in bad1["message"]
    assert bad2["exitReason"] == "invalid_spec"
    assert "spec.inputs[0].file" in bad2["message"]
    assert pods_of(k8s, "bad1") == []
    assert good["phase"] == "Succeeded"


def test_a_result_too_large_for_the_termination_message_arrives_through_the_log(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    big = "line of a long answer\n" * 400
    llm_server.script(
        tool_call("execute_bash", {"command": "echo a"}),
        tool_call("execute_bash", {"command": "echo b"}),
        tool_call("submit", {"answer": big}),
    )
    k8s.create(secret())
    with run_operator(OPERATOR, env=operator_env(llm_server)):
        k8s.create(task("verbose"))
        st = wait_phase(k8s, "verbose", TERMINAL)
    assert st["phase"] == "Succeeded"
    assert st["answerTruncated"] is True
    assert st["answer"] == big.strip()[:1024]
    # Tool counts are left out of a cut termination message: these came from the log line.
    assert st["toolCalls"] == {"execute_bash": 2, "submit": 1}
    assert k8s.requests.counts(verb="get", resource="pods/log")
