"""The operator's decisions as table tests: a task's record and its pods in, actions out.

No emulator and no event loop: decisions.py is pure. The emulator tests (test_operator*.py)
prove that the controller carries these actions out against an API server.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conftest import operator_settings
from k8s.workload import short_task
from sandbox_agent.result import (
    RESULT_LOG_PREFIX,
    ExitReason,
    Phase,
    TaskResult,
    termination_message,
)
from sandbox_operator import decisions as decide
from sandbox_operator.decisions import (
    Action,
    Admitted,
    Completed,
    DeletePod,
    Retried,
    StartAttempt,
    Started,
    WriteStatus,
)
from sandbox_operator.failures import PodState, PodVerdict, assess_pod
from sandbox_operator.pod_builder import build_pod
from sandbox_operator.records import TaskRecord, is_stale, progress
from sandbox_operator.status import Reason, TaskStatus

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
CREATED = "2026-03-01T11:59:00Z"
SETTINGS = operator_settings(pod_start_timeout_seconds=300)
RESULT = TaskResult(phase=Phase.SUCCEEDED, exit_reason=ExitReason.SUBMITTED, answer="42", steps=3)


def record(status: dict[str, Any] | None = None, **spec: Any) -> TaskRecord:
    body = short_task("t", **spec)
    body["metadata"].update(uid="uid-t", generation=1, creationTimestamp=CREATED)
    if status is not None:
        body["status"] = status
    return TaskRecord.parse(body)


def pending(attempt: int = 1, pod_uid: str | None = "pod-uid", **extra: Any) -> dict[str, Any]:
    status = {"phase": "Pending", "attempt": attempt, "podName": f"t-a{attempt}", **extra}
    if pod_uid is not None:
        status["podUID"] = pod_uid
    return status


def task_pod(
    phase: str = "Pending",
    *,
    attempt: int = 1,
    uid: str = "pod-uid",
    containers: list[dict[str, Any]] | None = None,
    **meta: Any,
) -> dict[str, Any]:
    """The pod the operator would create for the attempt, as the API returns it."""
    rec = record()
    assert rec.task is not None
    pod = build_pod(rec.task, namespace="default", uid="uid-t", attempt=attempt, settings=SETTINGS)
    pod["metadata"].update(uid=uid, creationTimestamp=CREATED, **meta)
    pod["status"] = {"phase": phase, "containerStatuses": containers or []}
    return pod


def agent_done(message: str) -> list[dict[str, Any]]:
    done = {"exitCode": 0, "reason": "Completed", "startedAt": "2026-03-01T11:59:30Z"}
    return [
        {"name": "sandbox", "state": {"terminated": done}},
        {"name": "agent", "state": {"terminated": {**done, "message": message}}},
    ]


def pulling() -> list[dict[str, Any]]:
    return [{"name": "sandbox", "state": {"waiting": {"reason": "ErrImagePull"}}}]


def follow(rec: TaskRecord, pod: dict[str, Any], deleted: bool = False) -> list[Action]:
    return decide.follow_pod(rec, pod, deleted=deleted, pods=[pod], now=NOW, settings=SETTINGS)


def shape(actions: list[Action]) -> list[tuple[Any, ...]]:
    """Each action as a short tuple: what it does and the status fields that matter."""
    out: list[tuple[Any, ...]] = []
    for a in actions:
        if isinstance(a, WriteStatus):
            s = a.status
            out.append(("write", s.phase, s.exit_reason, s.attempt, s.pod_uid))
        elif isinstance(a, StartAttempt):
            out.append(("start", a.attempt, a.status.phase if a.status else None))
        elif isinstance(a, DeletePod):
            out.append(("delete", a.name))
        else:
            out.append((type(a).__name__,))
    return out


def condition(status: TaskStatus, type_: str) -> tuple[str, str]:
    found = next(c for c in status.conditions if c.type == type_)
    return found.status, found.reason


# -- reconcile: a task event, or the operator's start ------------------------------------------


@pytest.mark.parametrize(
    ("status", "current_pod", "expected"),
    [
        pytest.param(None, None, [("Enqueue",)], id="new-task-is-enqueued"),
        pytest.param({"phase": "Queued"}, None, [], id="queued-waits-for-admission"),
        pytest.param(
            {"phase": "Succeeded", "exitReason": "submitted"}, None, [], id="terminal-is-final"
        ),
        pytest.param(
            pending(pod_uid=None), None, [("start", 1, None)], id="admitted-without-pod-resumes"
        ),
        pytest.param(
            pending(), None, [("start", 2, Phase.PENDING)], id="recorded-pod-gone-is-retried"
        ),
        pytest.param(
            pending(attempt=2),
            None,
            [("write", Phase.FAILED, ExitReason.POD_LOST, 2, "pod-uid")],
            id="last-attempt-pod-gone-fails",
        ),
    ],
)
def test_reconcile(
    status: dict[str, Any] | None, current_pod: dict[str, Any] | None, expected: list[Any]
) -> None:
    assert shape(decide.reconcile(record(status), current_pod, NOW, SETTINGS)) == expected


def test_an_invalid_spec_ends_the_task_naming_the_field() -> None:
    [write] = decide.reconcile(record(limits={"maxSteps": 0}), None, NOW, SETTINGS)
    assert isinstance(write, WriteStatus)
    assert write.status.exit_reason is ExitReason.INVALID_SPEC
    assert "spec.limits.maxSteps" in (write.status.message or "")
    assert condition(write.status, "Complete") == ("True", "InvalidSpec")
    assert "Ready" not in {c.type for c in write.status.conditions}  # no pod ever ran
    assert [type(t) for t in write.tallies] == [Completed]


def test_a_spec_the_cluster_refuses_ends_the_task_with_the_reason() -> None:
    rec = record(sandbox={"network": {"mode": "allowList", "allow": ["169.254.169.254/32:80"]}})
    [write] = decide.reconcile(rec, None, NOW, SETTINGS)
    assert isinstance(write, WriteStatus)
    assert write.status.exit_reason is ExitReason.INVALID_SPEC
    assert "spec.sandbox.network.allow[0]" in (write.status.message or "")


# -- following the current attempt's pod ----------------------------------------------------


@pytest.mark.parametrize(
    ("status", "pod", "deleted", "expected"),
    [
        pytest.param(
            pending(),
            task_pod("Running"),
            False,
            [("write", Phase.RUNNING, None, 1, "pod-uid")],
            id="running",
        ),
        pytest.param(pending(), task_pod("Pending"), False, [], id="still-starting"),
        pytest.param(
            pending(), task_pod("Running", uid="other"), False, [], id="another-uid-is-ignored"
        ),
        pytest.param(
            pending(),
            task_pod("Succeeded", containers=agent_done(RESULT.to_json())),
            False,
            [("write", Phase.SUCCEEDED, ExitReason.SUBMITTED, 1, "pod-uid"), ("delete", "t-a1")],
            id="finished",
        ),
        pytest.param(
            pending(),
            task_pod("Succeeded", containers=agent_done(termination_message(RESULT, limit=60))),
            False,
            [("ReadReportFromLog",)],
            id="result-in-log",
        ),
        pytest.param(
            pending(),
            task_pod("Succeeded", containers=agent_done("not json")),
            False,
            [("start", 2, Phase.PENDING)],
            id="unreadable-report-is-retried",
        ),
        pytest.param(
            pending(),
            task_pod("Running"),
            True,
            [("start", 2, Phase.PENDING)],
            id="deleted-is-retried",
        ),
        pytest.param(
            pending(),
            task_pod("Running", deletionTimestamp="2026-03-01T11:59:59Z"),
            False,
            [("start", 2, Phase.PENDING)],
            id="being-deleted-is-lost",
        ),
        pytest.param(
            pending(),
            task_pod("Pending", containers=pulling()),
            False,
            [
                ("write", Phase.FAILED, ExitReason.IMAGE_PULL_ERROR, 1, "pod-uid"),
                ("delete", "t-a1"),
            ],
            id="stuck-pod-deleted-after-the-terminal-write",
        ),
        pytest.param(
            {"phase": "Failed", "exitReason": "image_pull_error"},
            task_pod("Running"),
            False,
            [],
            id="ended-task-ignores-its-pod",
        ),
    ],
)
def test_follow_pod(
    status: dict[str, Any], pod: dict[str, Any], deleted: bool, expected: list[Any]
) -> None:
    assert shape(follow(record(status), pod, deleted)) == expected


def test_running_records_the_start_and_counts_the_startup() -> None:
    [write] = follow(record(pending(queuedSeconds=20.0)), task_pod("Running"))
    assert isinstance(write, WriteStatus)
    assert write.status.start_time == "2026-03-01T12:00:00Z"
    assert condition(write.status, "Ready") == ("True", "Running")
    assert condition(write.status, "PodScheduled") == ("True", "Scheduled")
    assert write.clear == ("message",)
    assert write.tallies == (Started(40.0),)  # 60 s since creation, 20 of them queued


def test_a_finished_pod_writes_the_result_and_counts_it_once_written() -> None:
    pod = task_pod("Succeeded", containers=agent_done(RESULT.to_json()))
    # The terminal write first, then the pod goes: its result has been read.
    write, delete = follow(record(pending()), pod)
    assert delete == DeletePod("t-a1")
    assert isinstance(write, WriteStatus)
    s = write.status
    assert (s.answer, s.answer_short, s.steps) == ("42", "42", 3)
    assert s.start_time == "2026-03-01T11:59:30Z"  # never seen Running: the containers' start
    assert s.run_seconds == 30.0
    assert condition(s, "Complete") == ("True", "Succeeded")
    assert condition(s, "Ready") == ("False", "Succeeded")
    assert write.clear == ("queuePosition",)
    [tally] = write.tallies
    assert isinstance(tally, Completed)
    assert (tally.model, tally.run_seconds) == ("m", 30.0)


def test_a_retry_deletes_a_stuck_pod_before_the_next_attempt_and_counts_the_retry() -> None:
    pod = task_pod("Pending", containers=pulling())
    verdict = PodVerdict(
        PodState.FAILED, ExitReason.EVICTED, "node pressure", reason=Reason.EVICTED, retryable=True
    )
    delete, start = decide.failure(record(pending()), verdict, NOW, SETTINGS, pod)
    assert delete == DeletePod("t-a1")
    assert isinstance(start, StartAttempt)
    assert start.status is not None
    assert (start.status.attempt, start.status.pod_name, start.status.pod_uid) == (2, "t-a2", None)
    assert condition(start.status, "Complete") == ("False", "Retrying")
    assert start.status.message == ("attempt 1 failed (node pressure); starting attempt 2")
    assert start.tallies == (Retried(ExitReason.EVICTED),)


def test_a_failed_pods_report_keeps_the_steps_and_usage_under_the_failure() -> None:
    verdict = PodVerdict(
        PodState.FAILED,
        ExitReason.OOM_KILLED,
        "out of memory",
        reason=Reason.OOM_KILLED,
        termination_message=RESULT.to_json(),
    )
    write, delete = decide.failure(record(pending()), verdict, NOW, SETTINGS, task_pod("Failed"))
    assert delete == DeletePod("t-a1")
    assert isinstance(write, WriteStatus)
    s = write.status
    assert (s.phase, s.exit_reason, s.steps, s.message) == (
        Phase.FAILED,
        ExitReason.OOM_KILLED,
        3,
        "out of memory",
    )
    assert condition(s, "Complete") == ("True", "OOMKilled")


def test_a_lost_pod_on_the_last_attempt_fails_as_pod_deleted() -> None:
    [write] = decide.pod_lost(record(pending(attempt=2)), "the pod is gone", NOW, SETTINGS)
    assert isinstance(write, WriteStatus)
    assert write.status.message == "the pod is gone before the agent reported"
    assert condition(write.status, "Complete") == ("True", "PodDeleted")
    assert condition(write.status, "Ready") == ("False", "PodDeleted")


@pytest.mark.parametrize(
    ("old_pod", "deleted", "expected"),
    [
        pytest.param(task_pod("Running"), True, [("Reconcile",)], id="old-pod-deleted"),
        pytest.param(task_pod("Failed"), False, [("Reconcile",)], id="old-pod-ended"),
        pytest.param(task_pod("Running"), False, [], id="old-pod-still-runs"),
    ],
)
def test_the_next_attempt_waits_for_the_old_pod(
    old_pod: dict[str, Any], deleted: bool, expected: list[Any]
) -> None:
    rec = record(pending(attempt=2, pod_uid=None))
    assert shape(follow(rec, old_pod, deleted)) == expected


def test_a_pod_created_but_not_recorded_is_verified_then_followed() -> None:
    rec = record(pending(pod_uid=None))
    assert shape(follow(rec, task_pod("Running"))) == [
        ("write", Phase.PENDING, None, 1, "pod-uid"),
        ("write", Phase.RUNNING, None, 1, "pod-uid"),
    ]
    assert follow(rec, task_pod("Running"), deleted=True) == []


def test_a_pod_not_made_by_the_operator_is_never_adopted() -> None:
    rec = record(pending(pod_uid=None))
    foreign = task_pod("Running")
    foreign["spec"]["containers"][1]["image"] = "attacker/agent:1"
    [write] = follow(rec, foreign)
    assert isinstance(write, WriteStatus)
    assert write.status.exit_reason is ExitReason.CONFIG_ERROR
    assert condition(write.status, "Complete") == ("True", "ForeignObject")
    assert "was not created by the operator" in (write.status.message or "")


# -- the agent's report from its log --------------------------------------------------------


def test_a_result_read_from_the_log_finishes_the_task() -> None:
    log = "noise\n" + RESULT_LOG_PREFIX + RESULT.to_json() + "\n"
    write, delete = decide.report_from_log(
        record(pending()), task_pod("Succeeded"), log, NOW, SETTINGS
    )
    assert isinstance(write, WriteStatus)
    assert (write.status.phase, write.status.answer) == (Phase.SUCCEEDED, "42")
    assert delete == DeletePod("t-a1")


def test_a_finished_pod_is_kept_when_the_operator_is_told_to() -> None:
    keep = operator_settings(keep_finished_pods=True)
    pod = task_pod("Succeeded", containers=agent_done(RESULT.to_json()))
    [write] = decide.follow_pod(
        record(pending()), pod, deleted=False, pods=[pod], now=NOW, settings=keep
    )
    assert isinstance(write, WriteStatus)


def test_a_finished_task_expires_after_its_ttl_else_the_operators() -> None:
    done = record({"phase": "Succeeded", "completionTime": "2026-03-01T12:00:00Z"})
    assert decide.expiry(done, SETTINGS) is None
    assert decide.expiry(done, operator_settings(task_ttl_seconds=60)) == NOW + timedelta(
        seconds=60
    )
    own = record(
        {"phase": "Succeeded", "completionTime": "2026-03-01T12:00:00Z"},
        ttlSecondsAfterFinished=0,
    )
    assert decide.expiry(own, operator_settings(task_ttl_seconds=60)) == NOW
    running = record(pending())
    assert decide.expiry(running, operator_settings(task_ttl_seconds=0)) is None


def test_a_log_without_a_result_is_an_agent_crash_that_is_retried() -> None:
    actions = decide.report_from_log(record(pending()), task_pod("Succeeded"), "x", NOW, SETTINGS)
    [start] = actions
    assert isinstance(start, StartAttempt)
    assert start.status is not None
    assert "the agent's log has no result line" in (start.status.message or "")
    assert start.tallies == (Retried(ExitReason.AGENT_CRASHED),)


# -- admission ------------------------------------------------------------------------------


def test_admission_starts_the_first_attempt_and_counts_the_wait() -> None:
    start = decide.admit_now(record({"phase": "Queued", "queuePosition": 3}), NOW)
    assert start.attempt == 1
    assert start.status is not None
    assert (start.status.phase, start.status.pod_name, start.status.queued_seconds) == (
        Phase.PENDING,
        "t-a1",
        60.0,
    )
    assert condition(start.status, "Admitted") == ("True", "Admitted")
    assert start.tallies == (Admitted(60.0),)
    assert decide.ATTEMPT_CLEARS == ("queuePosition", "podUID", "ungatedTime")


def test_the_first_attempts_status_is_written_once_its_pod_exists_a_retrys_before() -> None:
    assert decide.admit_now(record(), NOW).after_pod
    verdict = PodVerdict(
        PodState.FAILED, ExitReason.EVICTED, "node pressure", reason=Reason.EVICTED, retryable=True
    )
    [start] = decide.failure(record(pending()), verdict, NOW, SETTINGS, None)
    assert isinstance(start, StartAttempt)
    assert not start.after_pod


@pytest.mark.parametrize("status", [None, {"phase": "Queued", "queuePosition": 2}])
def test_a_first_attempts_pod_the_status_does_not_record_is_adopted_and_followed(
    status: dict[str, Any] | None,
) -> None:
    """An operator stopped between the first attempt's pod create and its status write: the
    pod, finished meanwhile, is adopted (admitted, counted once) and its report read."""
    rec = record(status)
    pod = task_pod("Succeeded", containers=agent_done(RESULT.to_json()))
    for actions in (follow(rec, pod), decide.reconcile(rec, pod, NOW, SETTINGS)):
        adopt, done, delete = actions
        assert shape([adopt, done, delete]) == [
            ("write", Phase.PENDING, None, 1, "pod-uid"),
            ("write", Phase.SUCCEEDED, ExitReason.SUBMITTED, 1, "pod-uid"),
            ("delete", "t-a1"),
        ]
        assert isinstance(adopt, WriteStatus)
        assert adopt.status.pod_name == "t-a1"
        assert adopt.status.queued_seconds == 60.0
        assert adopt.clear == decide.ATTEMPT_CLEARS
        assert adopt.tallies == (Admitted(60.0),)


def test_an_unrecorded_pod_that_is_not_the_first_attempts_is_left_alone_or_refused() -> None:
    rec = record({"phase": "Queued", "queuePosition": 1})
    assert follow(rec, task_pod("Running", attempt=2)) == []
    assert follow(rec, task_pod("Running"), deleted=True) == []
    tampered = task_pod("Running")
    tampered["spec"]["containers"][0]["image"] = "evil:latest"
    [write] = follow(rec, tampered)
    assert isinstance(write, WriteStatus)
    assert (write.status.phase, write.status.exit_reason) == (Phase.FAILED, ExitReason.CONFIG_ERROR)
    assert "delete it, then create the task again" in (write.status.message or "")


def test_a_queued_task_is_told_its_place_and_what_it_waits_for() -> None:
    write = decide.queued_status(4, decide.Waiting(10), NOW)
    assert (write.status.phase, write.status.queue_position) == (Phase.QUEUED, 4)
    assert condition(write.status, "Admitted") == ("False", "Queued")
    assert write.status.conditions[0].message == "waiting for one of 10 run slots (position 4)"
    assert write.tallies == ()
    group = "m @ http://vllm:8000/v1"
    write = decide.queued_status(2, decide.Waiting(0, group, limit=3, running=3), NOW)
    assert write.status.conditions[0].message == (
        "waiting for endpoint m @ http://vllm:8000/v1: 3 of its 3 tasks running (position 2)"
    )


# -- the periodic start-timeout check and reaping ----------------------------------------------


@pytest.mark.parametrize(
    ("age", "uid", "expected"),
    [
        pytest.param(
            301,
            "pod-uid",
            [("write", Phase.FAILED, ExitReason.START_TIMEOUT, 1, "pod-uid"), ("delete", "t-a1")],
            id="past-the-timeout",
        ),
        pytest.param(299, "pod-uid", [], id="within-the-timeout"),
        pytest.param(301, "other", [], id="not-the-recorded-pod"),
    ],
)
def test_start_timeout(age: int, uid: str, expected: list[Any]) -> None:
    pod = task_pod("Pending", uid=uid)
    pod["metadata"]["creationTimestamp"] = (NOW - timedelta(seconds=age)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    # Not retried: a pod that cannot be scheduled now will not be scheduled on a retry either.
    rec = record(pending())
    assert shape(decide.start_timeout(rec, pod, NOW, SETTINGS)) == expected


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        (task_pod("Running"), [("delete", "t-a1")]),
        (task_pod("Pending"), [("delete", "t-a1")]),
        (task_pod("Succeeded"), []),
        (task_pod("Running", deletionTimestamp="2026-03-01T12:00:00Z"), []),
    ],
    ids=["running", "pending", "ended", "already-deleting"],
)
def test_a_finished_tasks_pod_that_may_run_is_reaped(
    pod: dict[str, Any], expected: list[Any]
) -> None:
    assert shape(decide.reap(pod)) == expected


# -- one vocabulary -------------------------------------------------------------------------


def verdicts() -> list[PodVerdict]:
    def with_status(phase: str, **status: Any) -> dict[str, Any]:
        pod = task_pod(phase)
        pod["status"].update(status)
        return pod

    oom = [{"name": "sandbox", "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]
    crashed = [{"name": "agent", "state": {"terminated": {"reason": "Error", "exitCode": 1}}}]
    config = [{"name": "agent", "state": {"waiting": {"reason": "CreateContainerConfigError"}}}]
    return [
        assess_pod(task_pod("Pending", containers=pulling())),
        assess_pod(task_pod("Pending", containers=config)),
        assess_pod(with_status("Failed", reason="Evicted")),
        assess_pod(with_status("Failed", reason="DeadlineExceeded")),
        assess_pod(task_pod("Failed", containers=oom)),
        assess_pod(task_pod("Failed", containers=crashed)),
        assess_pod(task_pod("Failed")),
    ]


def test_every_failure_verdict_carries_the_reason_its_exit_reason_implies() -> None:
    found = verdicts()
    assert {v.exit_reason for v in found} == {
        ExitReason.IMAGE_PULL_ERROR,
        ExitReason.CONFIG_ERROR,
        ExitReason.EVICTED,
        ExitReason.DEADLINE,
        ExitReason.OOM_KILLED,
        ExitReason.AGENT_CRASHED,
        ExitReason.POD_LOST,
    }
    for verdict in found:
        assert verdict.state is PodState.FAILED
        assert verdict.exit_reason is not None
        implied = decide.complete_reason(
            TaskResult(phase=Phase.FAILED, exit_reason=verdict.exit_reason)
        )
        assert verdict.reason is implied, verdict


def test_a_cause_the_agent_names_is_the_complete_reason() -> None:
    unreachable = TaskResult(
        phase=Phase.FAILED, exit_reason=ExitReason.LLM_ERROR, cause="EndpointUnreachable"
    )
    assert decide.complete_reason(unreachable) is Reason.ENDPOINT_UNREACHABLE
    unknown = unreachable.model_copy(update={"cause": "SomethingElse"})
    assert decide.complete_reason(unknown) is Reason.FAILED


# -- records: parsed once, stale events told by their status --------------------------------


def test_a_record_parses_its_spec_once_while_the_spec_is_unchanged() -> None:
    body = short_task("t")
    body["metadata"].update(uid="uid-t")
    first = TaskRecord.parse(body)
    again = TaskRecord.parse({**body, "status": {"phase": "Queued"}}, first)
    assert again.task is first.task
    assert again.phase is Phase.QUEUED
    edited = copy.deepcopy(body)
    edited["spec"]["priority"] = 5
    assert TaskRecord.parse(edited, again).priority == 5


def test_a_spec_is_parsed_again_only_when_its_generation_moves() -> None:
    body = short_task("t")
    body["metadata"].update(uid="uid-t", generation=1)
    first = TaskRecord.parse(body)
    assert first.raw_spec is None  # the generation stands for it
    assert TaskRecord.parse(body, first).task is first.task
    edited = copy.deepcopy(body)
    edited["metadata"]["generation"] = 2
    edited["spec"]["retries"] = 3
    assert TaskRecord.parse(edited, first).retries == 3


def test_a_terminal_task_keeps_no_spec_and_of_its_status_its_phase_and_end() -> None:
    status = {**pending(), "phase": "Succeeded", "exitReason": "submitted", "answer": "42"}
    done = record({**status, "completionTime": "2026-03-01T12:00:00Z"})
    assert (done.task, done.raw_spec, done.spec_error) == (None, None, None)
    assert decide.reconcile(done, None, NOW, SETTINGS) == []
    assert done.status == TaskStatus(phase=Phase.SUCCEEDED)
    assert done.completion_time == "2026-03-01T12:00:00Z"
    assert done.queue_entry is None
    # Thousands of finished tasks share one status object per phase, and their namespace.
    other = record({"phase": "Succeeded"})
    assert other.status is done.status
    assert other.namespace is done.namespace


def test_an_unreadable_status_reads_as_a_new_task() -> None:
    assert record({"phase": "Exploded"}).status == TaskStatus()


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        (None, {"phase": "Queued"}),
        ({"phase": "Queued"}, pending(pod_uid=None)),
        (pending(pod_uid=None), pending()),
        (pending(), {**pending(), "phase": "Running"}),
        (pending(), pending(ungatedTime="2026-03-01T11:59:50Z")),
        ({**pending(), "phase": "Running"}, pending(attempt=2, pod_uid=None)),
        (pending(attempt=2), {"phase": "Failed", "attempt": 1}),
    ],
    ids=[
        "queued",
        "admitted",
        "pod-recorded",
        "running",
        "released-by-kueue",
        "retried",
        "terminal",
    ],
)
def test_the_operators_writes_only_move_a_task_forward(
    older: dict[str, Any] | None, newer: dict[str, Any]
) -> None:
    old, new = record(older), record(newer)
    assert progress(old.status) < progress(new.status)
    assert is_stale(old, new)
    assert not is_stale(new, old)


def test_an_equal_progress_or_a_spec_edit_is_not_stale() -> None:
    queued = record({"phase": "Queued", "queuePosition": 3})
    moved = record({"phase": "Queued", "queuePosition": 1})
    assert not is_stale(queued, moved)
    assert not is_stale(moved, queued)
    body = short_task("t")
    body["metadata"].update(uid="uid-t", generation=1)
    later = copy.deepcopy(body)
    later["metadata"]["generation"] = 2
    assert is_stale(TaskRecord.parse(body), TaskRecord.parse(later))


# -- Kueue: a pod held by its admission gate, a pod it stops ---------------------------------

RELEASED = "2026-03-01T11:55:00Z"


def kueue_pod(
    phase: str = "Pending", *, gated: bool = True, stop: str | None = None, **kw: Any
) -> dict[str, Any]:
    """The task's pod as Kueue's webhook leaves it (managed label, admission gate while held),
    with Kueue's TerminationTarget condition when `stop` names its reason."""
    pod = task_pod(phase, **kw)
    pod["metadata"]["labels"].update(
        {"kueue.x-k8s.io/queue-name": "team-a", "kueue.x-k8s.io/managed": "true"}
    )
    pod["metadata"]["finalizers"] = ["kueue.x-k8s.io/managed"]
    if gated:
        pod["spec"]["schedulingGates"] = [{"name": "kueue.x-k8s.io/admission"}]
    if stop is not None:
        pod["status"]["conditions"] = [
            {
                "type": "TerminationTarget",
                "status": "True",
                "reason": stop,
                "message": "Preempted to accommodate a workload (UID: w2) in the ClusterQueue",
            }
        ]
    return pod


def kueue_record(status: dict[str, Any], **spec: Any) -> TaskRecord:
    return record(status, queueName="team-a", **spec)


def scheduled(status: TaskStatus) -> tuple[str, str, str]:
    found = next(c for c in status.conditions if c.type == "PodScheduled")
    return found.status, found.reason, found.message


def test_a_pod_held_by_kueue_shows_waiting_for_kueue_on_the_task_once() -> None:
    rec = kueue_record(pending())
    [write] = follow(rec, kueue_pod())
    assert isinstance(write, WriteStatus)
    assert scheduled(write.status) == (
        "False",
        "WaitingForKueue",
        "pod t-a1 waits for Kueue to admit it in LocalQueue 'team-a' (scheduling gate "
        "kueue.x-k8s.io/admission); `kubectl get workloads -n default` shows why it waits",
    )
    assert write.status.phase is Phase.PENDING
    assert write.status.ungated_time is None
    assert write.tallies == ()
    # The next event of the still-held pod writes nothing.
    assert follow(rec.with_status(write.status), kueue_pod()) == []


def test_a_pod_kueue_released_records_when_that_was_first_seen_once() -> None:
    [held] = follow(kueue_record(pending()), kueue_pod())
    assert isinstance(held, WriteStatus)
    rec = kueue_record(pending()).with_status(held.status)
    [write] = follow(rec, kueue_pod(gated=False))
    assert isinstance(write, WriteStatus)
    assert write.status.ungated_time == "2026-03-01T12:00:00Z"
    assert scheduled(write.status) == (
        "False",
        "AdmittedByKueue",
        "Kueue admitted pod t-a1; the scheduler places it next",
    )
    assert follow(rec.with_status(write.status), kueue_pod(gated=False)) == []


def test_a_pod_without_kueue_writes_nothing_while_it_starts() -> None:
    assert follow(record(pending()), task_pod("Pending")) == []


@pytest.mark.parametrize(
    ("gated", "released", "expected"),
    [
        pytest.param(True, None, [], id="held-by-kueue-never-times-out"),
        pytest.param(False, None, [], id="released-but-not-yet-recorded"),
        pytest.param(False, "2026-03-01T11:55:01Z", [], id="within-the-timeout-of-the-release"),
        pytest.param(
            False,
            "2026-03-01T11:54:59Z",
            [("write", Phase.FAILED, ExitReason.START_TIMEOUT, 1, "pod-uid"), ("delete", "t-a1")],
            id="past-the-timeout-of-the-release",
        ),
    ],
)
def test_the_start_timeout_of_a_kueue_pod_counts_from_its_release(
    gated: bool, released: str | None, expected: list[Any]
) -> None:
    # Created an hour ago: only the time since Kueue released it counts (300 s here).
    pod = kueue_pod(gated=gated)
    pod["metadata"]["creationTimestamp"] = "2026-03-01T11:00:00Z"
    status = pending() if released is None else pending(ungatedTime=released)
    assert shape(decide.start_timeout(kueue_record(status), pod, NOW, SETTINGS)) == expected


def test_a_kueue_pods_start_timeout_says_it_counted_from_kueues_admission() -> None:
    [write, _] = decide.start_timeout(
        kueue_record(pending(ungatedTime="2026-03-01T11:00:00Z")),
        kueue_pod(gated=False),
        NOW,
        SETTINGS,
    )
    assert isinstance(write, WriteStatus)
    assert (write.status.message or "").startswith(
        "the pod did not start within 300s of Kueue admitting it ("
    )


@pytest.mark.parametrize(
    ("pod", "deleted", "expected"),
    [
        pytest.param(
            kueue_pod("Running", gated=False, stop="WorkloadEvictedDueToPreempted"),
            False,
            [("delete", "t-a1"), ("start", 2, Phase.PENDING)],
            id="marked-while-running",
        ),
        pytest.param(
            kueue_pod(
                "Running",
                gated=False,
                stop="WorkloadEvictedDueToPreempted",
                deletionTimestamp="2026-03-01T11:59:59Z",
            ),
            False,
            [("start", 2, Phase.PENDING)],
            id="kueue-deletes-it-already",
        ),
        pytest.param(
            kueue_pod("Failed", gated=False, stop="WorkloadEvictedDueToPodsReadyTimeout"),
            True,
            [("start", 2, Phase.PENDING)],
            id="deleted-after-the-mark",
        ),
        pytest.param(
            kueue_pod(
                "Succeeded",
                gated=False,
                stop="WorkloadEvictedDueToPreempted",
                containers=agent_done(
                    TaskResult(
                        phase=Phase.FAILED, exit_reason=ExitReason.SANDBOX_ERROR, cause="x"
                    ).to_json()
                ),
            ),
            False,
            [("start", 2, Phase.PENDING)],
            id="the-agents-report-of-the-kill-is-not-the-end",
        ),
        pytest.param(
            kueue_pod(
                "Succeeded",
                gated=False,
                stop="WorkloadEvictedDueToPreempted",
                containers=agent_done(RESULT.to_json()),
            ),
            False,
            [("write", Phase.SUCCEEDED, ExitReason.SUBMITTED, 1, "pod-uid"), ("delete", "t-a1")],
            id="an-answer-submitted-before-the-stop-is-kept",
        ),
    ],
)
def test_a_pod_kueue_stops_is_made_again_as_the_next_attempt(
    pod: dict[str, Any], deleted: bool, expected: list[Any]
) -> None:
    # retries=0: a stop by Kueue is no failure, so it needs no retry left.
    rec = kueue_record({**pending(), "phase": "Running"}, retries=0)
    assert shape(follow(rec, pod, deleted)) == expected


def test_kueues_stop_is_counted_apart_from_the_retries_and_said_on_the_task() -> None:
    rec = kueue_record({**pending(), "phase": "Running"}, retries=0)
    pod = kueue_pod("Running", gated=False, stop="WorkloadEvictedDueToPreempted")
    _, start = follow(rec, pod)
    assert isinstance(start, StartAttempt)
    assert start.status is not None
    assert (start.status.attempt, start.status.preemptions, start.status.pod_uid) == (2, 1, None)
    assert condition(start.status, "Complete") == ("False", "Preempted")
    assert start.status.message == (
        "attempt 1: Kueue stopped pod t-a1 (WorkloadEvictedDueToPreempted: Preempted to "
        "accommodate a workload (UID: w2) in the ClusterQueue); starting attempt 2 (Kueue's stop "
        "1 of at most 10, not counted against spec.retries)"
    )
    assert start.tallies == (Retried(ExitReason.PREEMPTED),)
    assert start.after_pod is False  # written before the next pod is made


def test_the_next_attempt_keeps_the_count_of_kueues_stops() -> None:
    rec = kueue_record({**pending(attempt=3), "preemptions": 2}, retries=0)
    status = decide.attempt_status(rec, 4, NOW, retry_note="again")
    assert (status.attempt, status.preemptions, status.ungated_time) == (4, 2, None)


def test_kueues_stops_leave_the_tasks_retries_for_its_failures() -> None:
    # Attempts 1 and 2 were stopped by Kueue: attempt 3 is the first failure, and retries=1.
    rec = kueue_record({**pending(attempt=3), "preemptions": 2}, retries=1)
    assert shape(follow(rec, task_pod("Running", attempt=3), deleted=True)) == [
        ("start", 4, Phase.PENDING)
    ]
    spent = kueue_record({**pending(attempt=4), "preemptions": 2}, retries=1)
    assert shape(follow(spent, task_pod("Running", attempt=4), deleted=True)) == [
        ("write", Phase.FAILED, ExitReason.POD_LOST, 4, "pod-uid")
    ]


def test_a_task_kueue_stops_more_often_than_the_operator_allows_fails_preempted() -> None:
    settings = operator_settings(max_preemptions=2)
    rec = kueue_record({**pending(attempt=3), "phase": "Running", "preemptions": 2})
    pod = kueue_pod("Running", gated=False, stop="WorkloadEvictedDueToPreempted", attempt=3)
    write, delete = decide.follow_pod(
        rec, pod, deleted=False, pods=[pod], now=NOW, settings=settings
    )
    assert delete == DeletePod("t-a3")
    assert isinstance(write, WriteStatus)
    assert (write.status.phase, write.status.exit_reason) == (Phase.FAILED, ExitReason.PREEMPTED)
    assert condition(write.status, "Complete") == ("True", "Preempted")
    assert write.status.message == (
        "Kueue stopped pod t-a3 (WorkloadEvictedDueToPreempted: Preempted to accommodate a "
        "workload (UID: w2) in the ClusterQueue), after 2 earlier stops; the operator makes a "
        "task's pod again at most 2 times (LLMSANDBOX_MAX_PREEMPTIONS)"
    )


@pytest.mark.parametrize(
    "reason", ["WorkloadEvictedDueToDeactivated", "WorkloadEvictedDueToInactiveWorkload"]
)
def test_a_pod_whose_workload_kueue_deactivated_cancels_the_task(reason: str) -> None:
    rec = kueue_record({**pending(), "phase": "Running"})
    write, delete = follow(rec, kueue_pod("Running", gated=False, stop=reason))
    assert delete == DeletePod("t-a1")
    assert isinstance(write, WriteStatus)
    assert (write.status.phase, write.status.exit_reason) == (Phase.CANCELLED, ExitReason.CANCELLED)
    assert condition(write.status, "Complete") == ("True", "Cancelled")
    assert (write.status.message or "").endswith(
        "its Workload was deactivated, so the task is not run again"
    )


def test_kueues_topology_gate_holds_the_pod_too_and_the_task_names_both() -> None:
    pod = kueue_pod()
    pod["spec"]["schedulingGates"].append({"name": "kueue.x-k8s.io/topology"})
    [write] = follow(kueue_record(pending()), pod)
    assert isinstance(write, WriteStatus)
    assert (
        "(scheduling gates kueue.x-k8s.io/admission, kueue.x-k8s.io/topology)"
        in (scheduled(write.status)[2])
    )
    # Admitted, but not yet placed by topology-aware scheduling: still held, no clock running.
    pod["spec"]["schedulingGates"] = [{"name": "kueue.x-k8s.io/topology"}]
    pod["metadata"]["creationTimestamp"] = "2026-03-01T11:00:00Z"
    assert decide.start_timeout(kueue_record(pending()), pod, NOW, SETTINGS) == []


def test_only_a_true_termination_target_is_kueues_stop() -> None:
    pod = kueue_pod("Running", gated=False, stop="WorkloadEvictedDueToPreempted")
    pod["status"]["conditions"][0]["status"] = "False"
    assert follow(kueue_record({**pending(), "phase": "Running"}), pod) == []


def test_a_pod_found_with_what_kueue_adds_is_adopted_as_the_operators() -> None:
    # An operator stopped between creating the pod and recording it: Kueue's webhook had added
    # its label, finalizer and gate, and on admission a flavor's node selector and toleration.
    pod = kueue_pod()
    pod["spec"]["nodeSelector"] = {"llmsandbox.io/pool": "sandbox"}
    pod["spec"]["tolerations"] = [{"key": "sandbox", "operator": "Exists"}]
    pod["metadata"]["annotations"]["kueue.x-k8s.io/role-hash"] = "a1b2c3"
    assert shape(follow(kueue_record(pending(pod_uid=None)), pod)) == [
        ("write", Phase.PENDING, None, 1, "pod-uid"),
        ("write", Phase.PENDING, None, 1, "pod-uid"),
    ]
