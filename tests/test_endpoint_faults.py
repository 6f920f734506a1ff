"""Inference endpoint faults, one matrix: every fault the endpoint can throw at the agent, each
served by the scripted server to the real openai client and run through the real agent loop in
a process sandbox.

Every run must end (no hang past its deadline) either with the task submitted or with a named
exitReason whose message names the fault; retries are bounded, counted in usage.llmRetries, and
reach the operator's llmsandbox_llm_retries_total through the result the agent reports.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import task_doc
from llmserver import (
    Reply,
    ScriptedLLMServer,
    empty_choices,
    error,
    malformed_json,
    reset_connection,
    slow,
    tool_call,
)
from sandbox_agent.events import Event, LLMRetrying
from sandbox_agent.llm import ChatLLM
from sandbox_agent.result import ExitReason, TaskResult, termination_message
from sandbox_agent.runner import RunOptions, RunOutcome, run_task
from sandbox_agent.taskfile import load_task_file
from sandbox_operator.agent_report import parse_termination_message
from sandbox_operator.metrics import Metrics

MODEL = "scripted-model"
DEADLINE = 20  # limits.activeDeadlineSeconds of every run here
HANG_GRACE = 30  # a run still going at deadline + this is a hang
MAX_RETRIES = 3
REQUEST_TIMEOUT = 1  # spec.model.requestTimeoutSeconds
TRANSIENT = 2  # how many times a transient fault repeats before the endpoint recovers
SUBMIT = tool_call("submit", {"answer": "recovered"})


@dataclass(frozen=True)
class Fault:
    """One endpoint behaviour. `llm_fault` faults are retried by the client; tool-call faults
    are answered to the model as an error observation instead (nothing to retry)."""

    reply: Reply
    # Text the result message (endpoint faults) or the observation (tool faults) must contain.
    names: tuple[str, ...]
    llm_fault: bool = True
    # The exitReason when the fault never stops.
    persistent_reason: ExitReason = ExitReason.LLM_ERROR


FAULTS: dict[str, Fault] = {
    "429-retry-after": Fault(error(429, headers={"Retry-After": "0.05"}), ("HTTP 429",)),
    "429-retry-after-ms": Fault(error(429, headers={"retry-after-ms": "20"}), ("HTTP 429",)),
    "429-no-retry-after": Fault(error(429), ("HTTP 429",)),
    "500": Fault(error(500, message="internal"), ("HTTP 500",)),
    "503": Fault(error(503, message="overloaded"), ("HTTP 503",)),
    "connection-reset": Fault(reset_connection(), ("cannot reach", "127.0.0.1")),
    "slower-than-client-timeout": Fault(
        slow(REQUEST_TIMEOUT + 2, SUBMIT), ("no reply from", f"within {REQUEST_TIMEOUT}s")
    ),
    "malformed-json": Fault(malformed_json(), ("malformed reply",)),
    "empty-choices": Fault(empty_choices(), ("no choices",)),
    "tool-args-invalid-json": Fault(
        tool_call("execute_bash", '{"command": "echo'),
        ("not valid JSON",),
        llm_fault=False,
        persistent_reason=ExitReason.MAX_STEPS,
    ),
    "unknown-tool": Fault(
        tool_call("launch_rockets", {"target": "moon"}),
        ("unknown tool 'launch_rockets'",),
        llm_fault=False,
        persistent_reason=ExitReason.MAX_STEPS,
    ),
}


@dataclass
class Run:
    outcome: RunOutcome
    events: list[Event]
    seconds: float

    @property
    def result(self) -> TaskResult:
        return self.outcome.result

    @property
    def retry_events(self) -> list[LLMRetrying]:
        return [e for e in self.events if isinstance(e, LLMRetrying)]

    def observations(self) -> list[str]:
        trajectory = json.loads(self.outcome.trajectory_path.read_text())
        return [c["observation"] for s in trajectory["steps"] for c in s["tool_calls"]]


async def run_guarded(
    tmp_path: Path, server: ScriptedLLMServer, doc: dict[str, Any], backoff: float = 0.01
) -> Run:
    """The task through the real runner, under a hang detector of deadline + grace."""
    task_file = tmp_path / "task.yaml"
    task_file.write_text(yaml.safe_dump(doc))
    task = load_task_file(task_file)
    events: list[Event] = []
    options = RunOptions(
        backend="process",
        base_url=server.base_url,
        api_key="test-key",
        out_dir=tmp_path / "run",
        retry_backoff_seconds=backoff,
        env={},
    )
    deadline = doc["spec"]["limits"]["activeDeadlineSeconds"]
    started = time.monotonic()
    outcome = await asyncio.wait_for(
        run_task(task, tmp_path, options, events.append, task_file=task_file),
        timeout=deadline + HANG_GRACE,
    )
    return Run(outcome, events, time.monotonic() - started)


def faulty_task(max_steps: int = 3) -> dict[str, Any]:
    return task_doc(
        model={"requestTimeoutSeconds": REQUEST_TIMEOUT},
        limits={
            "maxLlmRetries": MAX_RETRIES,
            "activeDeadlineSeconds": DEADLINE,
            "maxSteps": max_steps,
        },
    )


def operator_retries_after(result: TaskResult) -> float:
    """Feed the result, as the agent reports it, to the operator's metrics; return how much
    llmsandbox_llm_retries_total grew."""
    metrics = Metrics(lambda: {}, max_running=1)

    def sample() -> float:
        value = metrics.registry.get_sample_value("llmsandbox_llm_retries_total", {"model": MODEL})
        return value or 0.0

    before = sample()
    reported, _ = parse_termination_message(termination_message(result))
    metrics.record_result(MODEL, reported, None)
    return sample() - before


def check_common(run: Run, server: ScriptedLLMServer) -> None:
    """What holds for every run, whatever the fault."""
    result = run.result
    # Ended (run_guarded's wait_for is the hang detector), with a reason that is success or a
    # named failure, and a message for a failure.
    assert result.exit_reason in ExitReason
    if result.exit_reason is not ExitReason.SUBMITTED:
        assert result.message.strip()
    # Retries: each request the server saw is a success, a retry, or the one that gave up.
    gave_up = 1 if result.exit_reason in (ExitReason.LLM_ERROR, ExitReason.DEADLINE) else 0
    requests = len(server.chat_requests)
    assert result.usage.llm_retries == requests - result.usage.llm_calls - gave_up
    assert result.usage.llm_retries == len(run.retry_events)
    assert result.usage.llm_retries <= MAX_RETRIES * (result.usage.llm_calls + 1)
    assert max((e.attempt for e in run.retry_events), default=0) <= MAX_RETRIES
    # ... and visible in the operator's metric.
    assert operator_retries_after(result) == result.usage.llm_retries


@pytest.mark.parametrize("persistent", [False, True], ids=["transient", "persistent"])
@pytest.mark.parametrize("name", list(FAULTS))
async def test_endpoint_fault_matrix(
    name: str, persistent: bool, tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    fault = FAULTS[name]
    if persistent:
        llm_server.set_default(fault.reply)
    else:
        llm_server.script(*[fault.reply] * TRANSIENT, SUBMIT)
    run = await run_guarded(tmp_path, llm_server, faulty_task())
    result = run.result
    check_common(run, llm_server)

    if not persistent:
        assert result.exit_reason is ExitReason.SUBMITTED, result.message
        assert result.answer == "recovered"
        expected_retries = TRANSIENT if fault.llm_fault else 0
        assert result.usage.llm_retries == expected_retries
    else:
        assert result.exit_reason is fault.persistent_reason, result.message
        if fault.llm_fault:
            # Bounded: one first attempt and maxLlmRetries retries, then a named failure.
            assert len(llm_server.chat_requests) == MAX_RETRIES + 1
            assert result.usage.llm_retries == MAX_RETRIES
            assert f"giving up after {MAX_RETRIES + 1} attempts" in result.message
        else:
            assert "limits.maxSteps" in result.message
            assert result.usage.llm_retries == 0

    if fault.llm_fault:
        # Every retry said why, naming the fault; a persistent fault's message names it too.
        assert run.retry_events
        for event in run.retry_events:
            assert all(n in event.reason for n in fault.names), event.reason
        if persistent:
            assert all(n in result.message for n in fault.names), result.message
    else:
        seen = run.observations()
        assert any(all(n in obs for n in fault.names) for obs in seen), seen


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(error(429, headers={"Retry-After": "3600"}), id="retry-after-past-deadline"),
        pytest.param(
            error(503, headers={"Retry-After": "3600"}), id="503-retry-after-past-deadline"
        ),
        pytest.param(slow(60, SUBMIT), id="slow-until-the-deadline"),
    ],
)
async def test_a_fault_outlasting_the_deadline_ends_with_deadline_not_a_hang(
    reply: Reply, tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(reply)
    doc = task_doc(
        model={"requestTimeoutSeconds": 600},
        limits={"maxLlmRetries": 100, "activeDeadlineSeconds": 2},
    )
    run = await run_guarded(tmp_path, llm_server, doc)
    assert run.result.exit_reason is ExitReason.DEADLINE, run.result.message
    assert "activeDeadlineSeconds (2s) passed" in run.result.message
    # The endpoint was not hammered while waiting out the deadline.
    assert len(llm_server.chat_requests) <= 2
    assert operator_retries_after(run.result) == run.result.usage.llm_retries


async def test_a_429_storm_without_retry_after_backs_off_with_bounded_jitter_then_gives_up(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(error(429))
    backoff = 0.05
    retries = 6
    doc = task_doc(limits={"maxLlmRetries": retries, "activeDeadlineSeconds": DEADLINE})
    run = await run_guarded(tmp_path, llm_server, doc, backoff=backoff)
    result = run.result
    assert result.exit_reason is ExitReason.LLM_ERROR, result.message
    assert "HTTP 429" in result.message
    assert f"giving up after {retries + 1} attempts" in result.message
    assert len(llm_server.chat_requests) == retries + 1
    assert result.usage.llm_retries == retries
    assert operator_retries_after(result) == retries
    delays = [e.delay_seconds for e in run.retry_events]
    assert [e.attempt for e in run.retry_events] == list(range(1, retries + 1))
    # Exponential ceilings, each delay jittered within [ceiling / 2, ceiling].
    for attempt, delay in enumerate(delays):
        ceiling = min(60.0, backoff * 2**attempt)
        assert ceiling / 2 <= delay <= ceiling, (attempt, delay)
    assert len(set(delays)) == len(delays), "jittered, not a fixed schedule"
    # The run waited out its backoff (and ended llm_error above, so before its deadline).
    assert sum(delays) <= run.seconds


def test_backoff_is_capped_and_jittered_at_any_attempt() -> None:
    llm = ChatLLM(
        "http://127.0.0.1:9/v1", "k", MODEL, request_timeout=1, max_retries=100, on_event=print
    )
    for attempt in (0, 1, 5, 10, 30, 100):
        samples = {llm._backoff(attempt) for _ in range(50)}
        ceiling = min(60.0, 2**attempt)
        assert all(ceiling / 2 <= s <= ceiling for s in samples)
        assert len(samples) > 1
    asyncio.run(llm.aclose())
