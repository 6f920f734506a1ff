"""The pure readings the decisions build on: admission order, pod verdicts, the agent's report."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sandbox_agent.result import RESULT_LOG_PREFIX, ExitReason, TaskResult, termination_message
from sandbox_operator.admission import Candidate, positions, queue_order, to_admit_within
from sandbox_operator.agent_report import ResultError, parse_log_result, parse_termination_message
from sandbox_operator.failures import PodState, assess_pod, start_timed_out


def cand(name: str, priority: int = 0, created: str = "2026-01-01T00:00:00Z") -> Candidate:
    return Candidate(
        uid=f"uid-{name}", namespace="default", name=name, priority=priority, created=created
    )


def test_the_queue_is_ordered_by_priority_then_age() -> None:
    old = cand("old", created="2026-01-01T00:00:00Z")
    new = cand("new", created="2026-01-02T00:00:00Z")
    urgent = cand("urgent", priority=10, created="2026-01-03T00:00:00Z")
    assert [c.name for c in queue_order([new, old, urgent])] == ["urgent", "old", "new"]
    assert positions([new, old, urgent]) == {"uid-urgent": 1, "uid-old": 2, "uid-new": 3}


def test_admission_fills_only_free_slots() -> None:
    waiting = [cand(f"t{i}", created=f"2026-01-01T00:00:0{i}Z") for i in range(5)]

    def one_group(c: Candidate) -> str:
        return "all"

    assert [c.name for c in to_admit_within(waiting, 2, one_group, {})] == ["t0", "t1"]
    assert to_admit_within(waiting, 0, one_group, {}) == []
    assert len(to_admit_within(waiting, None, one_group, {})) == 5  # no global cap


def pod(
    phase: str, *, containers: list[dict[str, Any]] | None = None, **status: Any
) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {
            "containers": [
                {"name": "sandbox", "image": "img:1"},
                {"name": "agent", "image": "agent:1"},
            ]
        },
        "status": {"phase": phase, "containerStatuses": containers or [], **status},
    }


def waiting(name: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"name": name, "state": {"waiting": {"reason": reason, "message": message}}}


def terminated(
    name: str, code: int = 0, reason: str = "Completed", message: str | None = None
) -> dict[str, Any]:
    term: dict[str, Any] = {"exitCode": code, "reason": reason}
    if message is not None:
        term["message"] = message
    return {"name": name, "state": {"terminated": term}}


def test_an_image_pull_failure_names_the_image_and_the_field() -> None:
    v = assess_pod(
        pod(
            "Pending",
            containers=[waiting("sandbox", "ImagePullBackOff", 'Back-off pulling image "img:1"')],
        )
    )
    assert v.state is PodState.FAILED
    assert v.exit_reason is ExitReason.IMAGE_PULL_ERROR
    assert "'img:1'" in v.message
    assert "spec.sandbox.image" in v.message
    assert not v.retryable


def test_a_missing_secret_is_a_config_error_with_the_kubelet_message() -> None:
    v = assess_pod(
        pod(
            "Pending",
            containers=[
                waiting("agent", "CreateContainerConfigError", 'secret "llm-key" not found')
            ],
        )
    )
    assert v.exit_reason is ExitReason.CONFIG_ERROR
    assert 'secret "llm-key" not found' in v.message
    assert "apiKeySecretRef" in v.message


def test_oom_in_the_sandbox_names_the_memory_limit() -> None:
    v = assess_pod(
        pod(
            "Failed",
            containers=[
                terminated("sandbox", 137, "OOMKilled"),
                terminated("agent", 0, message='{"phase":"Failed","exitReason":"sandbox_error"}'),
            ],
        ),
        memory_limit="512Mi",
    )
    assert v.exit_reason is ExitReason.OOM_KILLED
    assert "(512Mi)" in v.message
    assert "spec.sandbox.resources.limits.memory" in v.message
    assert v.termination_message is not None


def test_eviction_is_retryable_and_deadline_is_not() -> None:
    evicted = assess_pod(
        pod("Failed", reason="Evicted", message="The node was low on resource: memory.")
    )
    assert evicted.exit_reason is ExitReason.EVICTED
    assert evicted.retryable
    assert "low on resource" in evicted.message
    deadline = assess_pod(pod("Failed", reason="DeadlineExceeded"))
    assert deadline.exit_reason is ExitReason.DEADLINE
    assert not deadline.retryable


def test_a_pod_pending_past_the_start_timeout_fails_quoting_the_scheduler() -> None:
    unschedulable = pod("Pending")
    unschedulable["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient memory.",
        }
    ]
    assert start_timed_out(unschedulable, age_seconds=899, timeout=900) is None
    v = start_timed_out(unschedulable, age_seconds=901, timeout=900)
    assert v is not None
    assert v.exit_reason is ExitReason.START_TIMEOUT
    assert not v.retryable
    assert "within 900s" in v.message
    assert "not scheduled: 0/3 nodes are available: 3 Insufficient memory." in v.message
    assert "LLMSANDBOX_POD_START_TIMEOUT_SECONDS" in v.message
    creating = pod("Pending", containers=[waiting("sandbox", "ContainerCreating", "")])
    v = start_timed_out(creating, age_seconds=10, timeout=5)
    assert v is not None
    assert "container sandbox ContainerCreating" in v.message
    # Started pods, and a timeout of 0, never time out.
    assert start_timed_out(pod("Running"), age_seconds=10_000, timeout=5) is None
    assert start_timed_out(unschedulable, age_seconds=10_000, timeout=0) is None


def test_a_finished_agent_hands_over_its_termination_message() -> None:
    v = assess_pod(
        pod("Succeeded", containers=[terminated("sandbox"), terminated("agent", message='{"x":1}')])
    )
    assert v.state is PodState.FINISHED
    assert v.termination_message == '{"x":1}'


def test_an_agent_that_crashed_without_a_report_is_retryable() -> None:
    v = assess_pod(
        pod("Failed", containers=[terminated("sandbox"), terminated("agent", 1, "Error")])
    )
    assert v.exit_reason is ExitReason.AGENT_CRASHED
    assert v.retryable
    assert "exited with code 1" in v.message


def test_running_and_starting() -> None:
    running = assess_pod(
        pod(
            "Running",
            containers=[
                {"name": "agent", "state": {"running": {"startedAt": "2026-01-01T00:00:05Z"}}}
            ],
        )
    )
    assert running.state is PodState.RUNNING
    assert running.started_at == "2026-01-01T00:00:05Z"
    assert assess_pod(pod("Pending")).state is PodState.STARTING


def test_results_round_trip_through_the_termination_message_and_the_log() -> None:
    result = TaskResult.model_validate(
        {"phase": "Succeeded", "exitReason": "submitted", "answer": "42", "steps": 3}
    )
    parsed, in_log = parse_termination_message(termination_message(result))
    assert parsed == result
    assert not in_log
    big = result.model_copy(update={"answer": "x" * 20_000})
    cut, in_log = parse_termination_message(termination_message(big))
    assert in_log
    assert cut.answer is not None
    assert len(cut.answer) < 4096
    log = "noise\n" + RESULT_LOG_PREFIX + big.to_json() + "\n"
    assert parse_log_result(log).answer == "x" * 20_000


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("not json", "not JSON"),
        ("[1]", "not a JSON object"),
        (json.dumps({"phase": "Nope"}), "not a result"),
    ],
)
def test_an_unreadable_termination_message_says_why(text: str, error: str) -> None:
    with pytest.raises(ResultError, match=error):
        parse_termination_message(text)


def test_a_log_without_a_result_line_says_so() -> None:
    with pytest.raises(ResultError, match="no result line"):
        parse_log_result("just\nlogs\n")


# U+2028, U+2029 and U+0085 end a line for str.splitlines, and JSON may carry them raw.
LINE_BREAKERS = "one\u2028two\u2029three\x85four\x1cfive\x0bsix\r\nseven"


def test_the_result_log_line_is_ascii_whatever_the_answer_holds() -> None:
    result = TaskResult.model_validate(
        {"phase": "Succeeded", "exitReason": "submitted", "answer": LINE_BREAKERS + " ü ∑ 𝔸"}
    )
    line = RESULT_LOG_PREFIX + result.to_json()
    assert line.isascii()
    assert line.splitlines() == [line]
    assert TaskResult.model_validate_json(result.to_json()) == result


def test_a_result_line_with_unicode_line_separators_is_read_whole() -> None:
    result = TaskResult.model_validate(
        {"phase": "Succeeded", "exitReason": "submitted", "answer": LINE_BREAKERS, "steps": 2}
    )
    # As an agent that does not escape them writes it: the separators raw inside the JSON.
    raw = result.model_dump_json(by_alias=True, exclude_none=True, ensure_ascii=False)
    assert "\u2028" in raw
    for line in (raw, result.to_json()):
        log = "noise\u2028more noise\n" + RESULT_LOG_PREFIX + line + "\n"
        parsed = parse_log_result(log)
        assert parsed.answer == LINE_BREAKERS
        assert parsed.steps == 2
