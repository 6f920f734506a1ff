"""Admission that respects the inference endpoint, end to end: the real operator on the emulated
API server, real pods (the real agent and exec server) and the scripted LLM server serving only
a few requests at once, answering 429 beyond that, as a busy inference server does."""

from __future__ import annotations

import json
import time
from typing import Any

from k8s.emulator import EmulatedApiServer
from k8s.kubelet import TestKubelet
from llmserver import ScriptedLLMServer, slow, tool_call
from test_operator import (
    OPERATOR,
    TERMINAL,
    max_active_pods,
    operator_env,
    secret,
    status,
    task,
    wait_phase,
)
from test_operator_metrics import free_port, scrape, value

CAPACITY = 3  # chat requests the endpoint serves at once
TASKS = 24
CALL_SECONDS = 1.0  # each answered call: the model's time dominates a task's, as it does


def three_calls(request: dict[str, Any]) -> Any:
    """Two commands, then the answer; every answer after CALL_SECONDS."""
    done = sum(1 for m in request["messages"] if m["role"] == "assistant")
    if done < 2:
        return slow(CALL_SECONDS, tool_call("execute_bash", {"command": "echo working"}))
    return slow(CALL_SECONDS, tool_call("submit", {"answer": "done"}))


def endpoint_task(name: str) -> dict[str, Any]:
    # Retries enough to outlast the 429s: every task must end with its answer.
    return task(name, limits={"maxLlmRetries": 100, "activeDeadlineSeconds": 300})


def statuses(k8s: EmulatedApiServer) -> list[dict[str, Any]]:
    return [dict(t.get("status") or {}) for t in k8s.list("sandboxtasks", "default")]


def test_the_operator_learns_the_endpoints_capacity_from_429s_and_admits_near_it(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(three_calls)
    llm_server.throttle(CAPACITY, retry_after_ms=500)
    k8s.create(secret())
    port = free_port()
    env = operator_env(
        llm_server, LLMSANDBOX_MAX_RUNNING_TASKS="12", LLMSANDBOX_METRICS_PORT=str(port)
    )
    with run_operator(OPERATOR, env=env):
        for i in range(TASKS):
            k8s.create(endpoint_task(f"e{i:02d}"))
        k8s.wait_for(
            lambda: (
                all(s.get("phase") in TERMINAL for s in statuses(k8s))
                and len(statuses(k8s)) == TASKS
            ),
            timeout=240,
            message="every task to finish",
        )
        families = scrape(port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not families.get(
            "llmsandbox_endpoint_admission_limit"
        ):
            time.sleep(0.1)
            families = scrape(port)
    done = statuses(k8s)
    assert {s["phase"] for s in done} == {"Succeeded"}, [s.get("message") for s in done]
    # Every 429 the endpoint gave is in the tasks' statuses, and in the metric.
    reported = sum(s["usage"].get("llmThrottled", 0) for s in done)
    assert llm_server.throttled > 0, "the first wave of 12 tasks must have been throttled"
    assert reported == llm_server.throttled
    model = {"model": "scripted-model"}
    assert value(
        families["llmsandbox_llm_throttled"], "llmsandbox_llm_throttled_total", **model
    ) == (reported)
    # The limit learnt for the endpoint: from 12 down near what it serves at once (a task
    # spends part of its time starting and running commands, so a little above CAPACITY).
    endpoint = f"scripted-model @ {llm_server.base_url}"
    limits = families["llmsandbox_endpoint_admission_limit"]
    learnt = value(limits, "llmsandbox_endpoint_admission_limit", endpoint=endpoint)
    assert 1 <= learnt <= 2 * CAPACITY, learnt
    assert all(s["usage"]["llmSeconds"] > 0 for s in done)


def test_an_endpoint_cap_holds_its_tasks_and_says_so_while_others_run(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    """Four tasks for an endpoint capped at 1 (adaptation off), and one task for another model
    queued after them: the capped ones run one at a time, show why they wait, and do not hold
    back the other model's task."""
    llm_server.set_default(lambda request: slow(0.5, tool_call("submit", {"answer": "done"})))
    k8s.create(secret())
    capped = [{"base_url": llm_server.base_url, "model": "scripted-model", "max_running": 1}]
    env = operator_env(
        llm_server,
        LLMSANDBOX_ENDPOINT_LIMITS=json.dumps(capped),
        LLMSANDBOX_ADAPTIVE_ADMISSION="false",
        LLMSANDBOX_ALLOWED_BASE_URLS=json.dumps([llm_server.base_url]),
    )
    messages: set[str] = set()
    with run_operator(OPERATOR, env=env), max_active_pods(k8s) as peak:
        for i in range(4):
            k8s.create(task(f"c{i}"))
        k8s.create(task("other", model={"name": "other-model"}))
        k8s.wait_for(lambda: status(k8s, "other").get("phase") == "Succeeded", timeout=60)
        # The other model's task finished while capped ones still waited behind the first.
        left = [n for n in ("c1", "c2", "c3") if status(k8s, n).get("phase") != "Succeeded"]
        assert left, "the capped endpoint's tasks ran all at once"
        for name in ("c1", "c2", "c3"):
            for cond in status(k8s, name).get("conditions") or []:
                messages.add(str(cond.get("message")))
        for i in range(4):
            assert wait_phase(k8s, f"c{i}", TERMINAL, timeout=120)["phase"] == "Succeeded"
    group = f"scripted-model @ {llm_server.base_url}"
    assert any(
        m.startswith(f"waiting for endpoint {group}: 1 of its 1 tasks running") for m in messages
    ), messages
    assert peak[0] <= 2  # one capped task and the other model's
