"""What the operator exports to Prometheus after real tasks ran."""

from __future__ import annotations

import socket
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from k8s.emulator import EmulatedApiServer
from k8s.kubelet import TestKubelet
from llmserver import ScriptedLLMServer, tool_call
from sandbox_operator.metrics import METRIC_NAMES
from test_operator import OPERATOR, TERMINAL, operator_env, secret, task, wait_phase


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, list[Sample]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    families: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = list(family.samples)
    return families


def completions(families: dict[str, list[Sample]]) -> float:
    samples = families.get("llmsandbox_tasks_completed", [])
    return sum(s.value for s in samples if s.name.endswith("_total"))


def value(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_completions_tokens_cost_and_tools_are_counted_without_task_labels(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.script(
        tool_call("execute_bash", {"command": "true"}, usage=(100, 10)),
        tool_call("submit", {"answer": "1"}, usage=(200, 20)),
    )
    llm_server.set_default(tool_call("submit", {}))
    k8s.create(secret())
    port = free_port()
    with run_operator(OPERATOR, env=operator_env(llm_server, LLMSANDBOX_METRICS_PORT=str(port))):
        k8s.create(task("m1"))
        k8s.create(task("m2"))
        wait_phase(k8s, "m1", TERMINAL)
        wait_phase(k8s, "m2", TERMINAL)
        # The operator counts a completion just after its status write lands: wait for both.
        deadline = time.monotonic() + 10
        families = scrape(port)
        while completions(families) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            families = scrape(port)
    completed = families["llmsandbox_tasks_completed"]
    phases = {s.labels["exit_reason"]: s.value for s in completed if s.name.endswith("_total")}
    assert sum(phases.values()) == 2
    assert set(phases) <= {"submitted", "no_answer"}
    tokens = families["llmsandbox_llm_tokens"]
    assert (
        value(tokens, "llmsandbox_llm_tokens_total", model="scripted-model", direction="prompt")
        >= 300
    )
    assert (
        value(
            families["llmsandbox_llm_requests"],
            "llmsandbox_llm_requests_total",
            model="scripted-model",
        )
        >= 3
    )
    assert (
        value(
            families["llmsandbox_estimated_cost_usd"],
            "llmsandbox_estimated_cost_usd_total",
            model="scripted-model",
        )
        > 0
    )
    assert (
        value(families["llmsandbox_tool_calls"], "llmsandbox_tool_calls_total", tool="execute_bash")
        >= 1
    )
    assert (
        value(families["llmsandbox_queue_wait_seconds"], "llmsandbox_queue_wait_seconds_count") == 2
    )
    assert value(families["llmsandbox_tasks"], "llmsandbox_tasks") == 2
    assert value(families["llmsandbox_build_info"], "llmsandbox_build_info") == 1
    exported = {name.removesuffix("_total") for name in METRIC_NAMES}
    assert exported <= set(families)
    for samples in families.values():
        for sample in samples:
            assert not {"name", "task", "uid", "pod", "namespace"} & set(sample.labels)
