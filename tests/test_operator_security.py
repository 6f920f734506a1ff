"""The operator against hostile neighbours, on the emulated cluster: forged pods and objects,
Secrets and endpoints a task may not use, and results that try to break the log line."""

from __future__ import annotations

from typing import Any

from k8s.emulator import EmulatedApiServer
from k8s.kubelet import TestKubelet
from llmserver import ScriptedLLMServer, tool_call
from test_operator import OPERATOR, TERMINAL, operator_env, secret, task, wait_phase


def test_an_answer_with_unicode_line_separators_arrives_whole_through_the_log(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any, llm_server: ScriptedLLMServer
) -> None:
    # Too big for the termination message, so the result travels as the agent's last log line.
    big = "part\u2028of\u2029a long\x85answer\n" * 300
    llm_server.script(tool_call("submit", {"answer": big}))
    k8s.create(secret())
    with run_operator(OPERATOR, env=operator_env(llm_server)):
        k8s.create(task("separators"))
        st = wait_phase(k8s, "separators", TERMINAL)
    assert (st["phase"], st["exitReason"]) == ("Succeeded", "submitted"), st
    assert st["attempt"] == 1
    assert st["answer"] == big.strip()[:1024]
    assert k8s.requests.counts(verb="get", resource="pods/log")
