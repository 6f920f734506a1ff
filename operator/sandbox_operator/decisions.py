"""The operator's decisions as pure functions: what is known of a task in, the next actions out.

Each function takes a `TaskRecord` (spec and status, parsed), the pods the caller found for it,
the clock and the settings, and returns a list of actions: data that says what to write,
create or delete, and which metric to count once a write lands. Nothing here calls the API
or reads the clock; `controller.Operator` gathers the facts and carries the actions out in
order (see its docstring for the crash-safety rules the order keeps).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pydantic import ValidationError

from sandbox_agent.result import (
    TERMINAL_PHASES,
    ExitReason,
    Phase,
    TaskResult,
    phase_for,
)

from .agent_report import ResultError, parse_log_result, parse_termination_message
from .cluster_checks import validate_for_cluster
from .errors import SpecError
from .failures import PodState, PodVerdict, assess_pod, start_timed_out
from .kueue import KueueStop, gated, kueue_gates, local_queue, managed, stopped
from .ownership import foreign_pod_problem
from .pod_builder import build_pod, pod_name
from .records import PodBody, TaskRecord, pod_may_run, pod_phase
from .settings import OperatorSettings, cost_usd
from .status import (
    ConditionType,
    Reason,
    TaskStatus,
    answer_for_status,
    answer_short,
    parse_rfc3339,
    rfc3339,
    set_condition,
)

ACTIVE = frozenset({Phase.PENDING, Phase.RUNNING})

# The Complete condition's reason by exit reason, for a result that names no cause; the rest
# (max_steps, token_budget, agent_crashed, ...) are Failed. A pod's failure verdict carries its
# own reason, the same as this table's (tests/test_decisions.py holds them to it).
_COMPLETE_REASONS = {
    ExitReason.SUBMITTED: Reason.SUCCEEDED,
    ExitReason.INVALID_SPEC: Reason.INVALID_SPEC,
    ExitReason.IMAGE_PULL_ERROR: Reason.IMAGE_PULL_FAILED,
    ExitReason.CONFIG_ERROR: Reason.CONFIG_MISSING,
    ExitReason.OOM_KILLED: Reason.OOM_KILLED,
    ExitReason.EVICTED: Reason.EVICTED,
    ExitReason.DEADLINE: Reason.DEADLINE_EXCEEDED,
    ExitReason.POD_LOST: Reason.POD_DELETED,
    ExitReason.START_TIMEOUT: Reason.START_TIMEOUT,
    ExitReason.CANCELLED: Reason.CANCELLED,
    ExitReason.PREEMPTED: Reason.PREEMPTED,
}
# Causes named by the agent or the operator that become the Complete condition's reason as is.
_CAUSE_REASONS = {
    r.value: r
    for r in (
        Reason.ENDPOINT_UNREACHABLE,
        Reason.EXEC_SERVER_NOT_READY,
        Reason.SANDBOX_STOPPED,
        Reason.FOREIGN_OBJECT,
        Reason.SECRET_NOT_ALLOWED,
    )
}


# -- what is counted once a write lands -------------------------------------------------------


@dataclass(frozen=True)
class Admitted:
    queued_seconds: float


@dataclass(frozen=True)
class Started:
    startup_seconds: float


@dataclass(frozen=True)
class Retried:
    exit_reason: ExitReason


@dataclass(frozen=True)
class Completed:
    result: TaskResult
    model: str
    cost_usd: float | None
    run_seconds: float | None


Tally = Admitted | Started | Retried | Completed


# -- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteStatus:
    """Merge-patch the status; `clear` names fields to remove. The tallies are counted only
    when the write lands, by this process. A write that finds the task gone ends the plan."""

    status: TaskStatus
    clear: tuple[str, ...] = ()
    tallies: tuple[Tally, ...] = ()


@dataclass(frozen=True)
class DeletePod:
    name: str


@dataclass(frozen=True)
class StartAttempt:
    """Check what the attempt's pod will reference (its input ConfigMaps, its API-key Secret),
    write `status` (None when it is already written: a restart resuming the attempt), then,
    once no earlier pod of the task may still run, create its policy, ConfigMap and pod.

    With `after_pod` (the first attempt) `status` is written once the pod exists, with its
    uid: one write where a retry, whose status must say at once that the attempt it replaces
    is over, needs two (the status first, the pod's uid after the create). The pod is then the
    only record of a start cut short between the two; `follow_pod` adopts it."""

    attempt: int
    status: TaskStatus | None
    tallies: tuple[Tally, ...] = ()
    after_pod: bool = False


@dataclass(frozen=True)
class ReadReportFromLog:
    """The agent's result did not fit its termination message: read it from the pod's log,
    then decide with `report_from_log`."""

    pod: PodBody


@dataclass(frozen=True)
class Enqueue:
    """A new valid task: admit it if a slot is free and nobody waits ahead, else queue it
    (`admit_now` or `queued_status`, with the admission state only the operator holds)."""


@dataclass(frozen=True)
class Reconcile:
    """Look up the task's current pod again (the API, when the watch has not shown it), then
    decide with `reconcile`."""


Action = WriteStatus | DeletePod | StartAttempt | ReadReportFromLog | Enqueue | Reconcile


# -- the decisions ----------------------------------------------------------------------------


def reconcile(
    rec: TaskRecord, current_pod: PodBody | None, now: datetime, settings: OperatorSettings
) -> list[Action]:
    """The task changed (or the operator restarted): what its status and its current
    attempt's pod (`current_pod`, looked up by the caller, None when there is none) call for."""
    status = rec.status
    if status.phase in TERMINAL_PHASES:
        return []
    if status.phase in (None, Phase.QUEUED) and current_pod is not None:
        # A first attempt's pod made by an operator that stopped before it wrote the status.
        return follow_pod(
            rec, current_pod, deleted=False, pods=[current_pod], now=now, settings=settings
        )
    if status.phase is None:
        problem = spec_problem(rec, settings)
        if problem is not None:
            return [finish_without_run(rec, ExitReason.INVALID_SPEC, problem, now, settings)]
        return [Enqueue()]
    if status.phase not in ACTIVE:
        return []  # queued: admission's business
    if current_pod is not None:
        return follow_pod(
            rec, current_pod, deleted=False, pods=[current_pod], now=now, settings=settings
        )
    if status.phase is Phase.PENDING and status.pod_uid is None:
        # Admitted, but the operator stopped before the pod was created.
        return [StartAttempt(status.attempt or 1, None)]
    return pod_lost(rec, "the pod is gone", now, settings)


def spec_problem(rec: TaskRecord, settings: OperatorSettings) -> str | None:
    """Why the task cannot run here: its spec does not parse, or fails the cluster's checks."""
    if rec.task is None:
        return rec.why_no_spec
    try:
        validate_for_cluster(rec.task, settings)
    except SpecError as exc:
        return str(exc)
    return None


def follow_pod(
    rec: TaskRecord,
    pod: PodBody,
    *,
    deleted: bool,
    pods: list[PodBody],
    now: datetime,
    settings: OperatorSettings,
) -> list[Action]:
    """A pod of the task (claimed by it) changed or was deleted; `pods` are all the task's
    pods the operator knows of."""
    status = rec.status
    meta = pod["metadata"]
    if status.phase in (None, Phase.QUEUED):
        return _unrecorded_first_pod(rec, pod, deleted=deleted, now=now, settings=settings)
    if status.phase not in ACTIVE:
        return []  # the task already ended
    if meta["name"] != status.pod_name:
        return _old_attempts_pod(rec, pod, deleted=deleted, pods=pods)
    actions: list[Action] = []
    if status.pod_uid is None:
        # Created but not recorded (the operator stopped in between): verify it first.
        if deleted:
            return []
        write, adopted = adopt_pod(rec, pod, None, now, settings)
        if not adopted:
            return [write]
        actions = [write]
        rec = rec.with_status(write.status)
    elif meta["uid"] != status.pod_uid:
        return []  # not the pod the operator created, whatever its name and labels
    return actions + _current_pod(rec, pod, deleted=deleted, now=now, settings=settings)


def _unrecorded_first_pod(
    rec: TaskRecord, pod: PodBody, *, deleted: bool, now: datetime, settings: OperatorSettings
) -> list[Action]:
    """A pod of a task not admitted as far as its status says: the first attempt's pod, created
    by an operator that stopped before writing the status that records it (`StartAttempt`'s
    `after_pod`). Verified, it is adopted, admitted as it was, and followed."""
    if deleted or pod["metadata"]["name"] != pod_name(rec.name, 1):
        return []
    write, adopted = adopt_pod(rec, pod, None, now, settings, start=admit_now(rec, now))
    if not adopted:
        return [write]
    return [
        write,
        *_current_pod(
            rec.with_status(write.status), pod, deleted=False, now=now, settings=settings
        ),
    ]


def _old_attempts_pod(
    rec: TaskRecord, pod: PodBody, *, deleted: bool, pods: list[PodBody]
) -> list[Action]:
    """An earlier attempt's pod. Once it can no longer run, the current attempt's pod, held back
    while it shut down (StartAttempt), may be created."""
    status = rec.status
    if (
        status.phase is Phase.PENDING
        and (deleted or not pod_may_run(pod))
        and not any(p["metadata"]["name"] == status.pod_name for p in pods)
    ):
        return [Reconcile()]
    return []


def _current_pod(
    rec: TaskRecord, pod: PodBody, *, deleted: bool, now: datetime, settings: OperatorSettings
) -> list[Action]:
    """The recorded pod of the current attempt changed or went."""
    stop = stopped(pod)
    if deleted:
        if stop is not None:
            return stopped_by_kueue(rec, stop, now, settings, None)
        return pod_lost(rec, "the pod was deleted", now, settings)
    verdict = assess_pod(pod, _sandbox_memory_limit(pod))
    if stop is not None and verdict.state is not PodState.FINISHED:
        # Kueue marks the pod before it deletes it: whatever the pod shows from then on is how
        # it is being stopped (a report is weighed in `_reported`).
        return stopped_by_kueue(rec, stop, now, settings, pod)
    if pod["metadata"].get("deletionTimestamp") and verdict.state is not PodState.FINISHED:
        # Being deleted: whatever the kubelet reports while killing it, the pod is lost.
        return pod_lost(rec, "the pod was deleted", now, settings)
    if verdict.state is PodState.STARTING:
        return kueue_hold(rec, pod, now)
    if verdict.state is PodState.RUNNING and rec.status.phase is Phase.PENDING:
        return [running(rec, verdict, now)]
    if verdict.state is PodState.FINISHED:
        return report(rec, pod, verdict, now, settings)
    if verdict.state is PodState.FAILED:
        return failure(rec, verdict, now, settings, pod)
    return []


def running(rec: TaskRecord, verdict: PodVerdict, now: datetime) -> WriteStatus:
    status = rec.status.model_copy(deep=True)
    status.phase = Phase.RUNNING
    status.start_time = status.start_time or verdict.started_at or rfc3339(now)
    status.conditions = set_condition(
        status.conditions,
        ConditionType.READY,
        "True",
        Reason.RUNNING,
        f"pod {status.pod_name} is running",
        now,
    )
    status.conditions = set_condition(
        status.conditions, ConditionType.POD_SCHEDULED, "True", Reason.SCHEDULED, "", now
    )
    status.message = None
    tallies: tuple[Tally, ...] = ()
    created = parse_rfc3339(rec.created)
    if created is not None:
        startup = (now - created).total_seconds() - (status.queued_seconds or 0.0)
        tallies = (Started(max(0.0, startup)),)
    return WriteStatus(status, clear=("message",), tallies=tallies)


def kueue_hold(rec: TaskRecord, pod: PodBody, now: datetime) -> list[Action]:
    """A pod not started yet. While Kueue's gates hold it the task says so (WaitingForKueue);
    once Kueue has released it, the task records when that was first seen (status.ungatedTime),
    from which its start timeout counts. Each is written once."""
    status = rec.status
    scheduled = next(
        (c for c in status.conditions if c.type == ConditionType.POD_SCHEDULED.value), None
    )
    if gated(pod):
        message = waiting_for_kueue(rec, pod)
        if scheduled is not None and (scheduled.reason, scheduled.message) == (
            Reason.WAITING_FOR_KUEUE.value,
            message,
        ):
            return []
        return [_pod_not_scheduled(rec, Reason.WAITING_FOR_KUEUE, message, now)]
    if not managed(pod) or status.ungated_time is not None:
        return []
    message = f"Kueue admitted pod {status.pod_name}; the scheduler places it next"
    write = _pod_not_scheduled(rec, Reason.ADMITTED_BY_KUEUE, message, now)
    write.status.ungated_time = rfc3339(now)
    return [write]


def waiting_for_kueue(rec: TaskRecord, pod: PodBody) -> str:
    """What the task says while Kueue holds its pod."""
    queue = local_queue(pod)
    where = f"LocalQueue {queue!r}" if queue else "its LocalQueue"
    gates = kueue_gates(pod)
    return (
        f"pod {rec.status.pod_name} waits for Kueue to admit it in {where} (scheduling "
        f"gate{'s' if len(gates) > 1 else ''} {', '.join(gates)}); `kubectl get workloads -n "
        f"{rec.namespace}` shows why it waits"
    )


def _pod_not_scheduled(rec: TaskRecord, reason: Reason, message: str, now: datetime) -> WriteStatus:
    status = rec.status.model_copy(deep=True)
    status.conditions = set_condition(
        status.conditions, ConditionType.POD_SCHEDULED, "False", reason, message, now
    )
    return WriteStatus(status)


def report(
    rec: TaskRecord, pod: PodBody, verdict: PodVerdict, now: datetime, settings: OperatorSettings
) -> list[Action]:
    """The agent ended and left its report in the termination message."""
    assert verdict.termination_message is not None
    try:
        result, in_log = parse_termination_message(verdict.termination_message)
    except ResultError as exc:
        return unreadable_report(rec, pod, str(exc), now, settings)
    if in_log:
        return [ReadReportFromLog(pod)]
    return _reported(rec, pod, result, now, settings)


def report_from_log(
    rec: TaskRecord, pod: PodBody, log: str, now: datetime, settings: OperatorSettings
) -> list[Action]:
    try:
        result = parse_log_result(log)
    except ResultError as exc:
        return unreadable_report(rec, pod, str(exc), now, settings)
    return _reported(rec, pod, result, now, settings)


def _reported(
    rec: TaskRecord, pod: PodBody, result: TaskResult, now: datetime, settings: OperatorSettings
) -> list[Action]:
    """The agent's result ends the task, unless Kueue stopped the pod and the result is not an
    answer: then it only tells how the stop ended the run (the sandbox killed under it)."""
    stop = stopped(pod)
    if stop is not None and result.phase is not Phase.SUCCEEDED:
        return stopped_by_kueue(rec, stop, now, settings, pod)
    return [finish(rec, result, now, settings, pod=pod), *done_with(pod, settings)]


def expiry(rec: TaskRecord, settings: OperatorSettings) -> datetime | None:
    """When a finished task is to be deleted: completionTime plus its ttlSecondsAfterFinished,
    else the operator's LLMSANDBOX_TASK_TTL_SECONDS; None while it runs, or with no TTL."""
    if rec.phase not in TERMINAL_PHASES:
        return None
    ttl = rec.ttl_seconds if rec.ttl_seconds is not None else settings.task_ttl_seconds
    done = parse_rfc3339(rec.completion_time)
    if ttl is None or done is None:
        return None
    return done + timedelta(seconds=ttl)


def done_with(pod: PodBody | None, settings: OperatorSettings) -> list[Action]:
    """The ended pod of a task whose terminal status is written: its result has been read, so
    it goes (LLMSANDBOX_KEEP_FINISHED_PODS keeps it, for debugging)."""
    if pod is None or settings.keep_finished_pods or pod["metadata"].get("deletionTimestamp"):
        return []
    return [DeletePod(pod["metadata"]["name"])]


def unreadable_report(
    rec: TaskRecord, pod: PodBody, why: str, now: datetime, settings: OperatorSettings
) -> list[Action]:
    stop = stopped(pod)
    if stop is not None:
        return stopped_by_kueue(rec, stop, now, settings, pod)
    verdict = PodVerdict(
        PodState.FAILED,
        ExitReason.AGENT_CRASHED,
        f"cannot read the agent's result: {why}",
        reason=Reason.FAILED,
        retryable=True,
    )
    return failure(rec, verdict, now, settings, pod)


def pod_lost(rec: TaskRecord, why: str, now: datetime, settings: OperatorSettings) -> list[Action]:
    verdict = PodVerdict(
        PodState.FAILED,
        ExitReason.POD_LOST,
        f"{why} before the agent reported",
        reason=Reason.POD_DELETED,
        retryable=True,
    )
    return failure(rec, verdict, now, settings, None)


def failure(
    rec: TaskRecord,
    verdict: PodVerdict,
    now: datetime,
    settings: OperatorSettings,
    pod: PodBody | None,
) -> list[Action]:
    """A named failure of the current attempt (`pod` None: the pod is gone): retry it when it
    is retryable and attempts are left (attempts Kueue stopped do not count, see
    `stopped_by_kueue`), else end the task. A pod still pending or running is deleted."""
    assert verdict.exit_reason is not None
    status = rec.status
    attempt = status.attempt or 1
    delete = _delete_stuck(pod)
    if verdict.retryable and attempt - (status.preemptions or 0) <= rec.retries:
        # The delete comes first: the next attempt's pod waits until this one is gone. A crash
        # after it leaves the task active with its pod gone or going: the restart sees a lost pod.
        note = f"attempt {attempt} failed ({verdict.message}); starting attempt {attempt + 1}"
        return [
            *delete,
            StartAttempt(
                attempt + 1,
                attempt_status(rec, attempt + 1, now, retry_note=note),
                tallies=(Retried(verdict.exit_reason),),
            ),
        ]
    result = TaskResult(
        phase=phase_for(verdict.exit_reason),
        exit_reason=verdict.exit_reason,
        message=verdict.message,
    )
    if verdict.termination_message:
        # The agent may still have reported steps and usage before the pod failed.
        try:
            reported, _ = parse_termination_message(verdict.termination_message)
            result = reported.model_copy(
                update={
                    "phase": result.phase,
                    "exit_reason": result.exit_reason,
                    "message": result.message,
                    "cause": None,
                }
            )
        except ResultError:
            pass
    # The terminal write comes before the delete: deleting first, a crash in between would leave
    # the task Pending without its pod, and the restart would run the attempt again. A crash
    # after the write leaves the pod to `reap`.
    ended = finish(rec, result, now, settings, pod=pod, pod_ended=True, reason=verdict.reason)
    return [ended, *(delete or done_with(pod, settings))]


def stopped_by_kueue(
    rec: TaskRecord, stop: KueueStop, now: datetime, settings: OperatorSettings, pod: PodBody | None
) -> list[Action]:
    """Kueue stopped the current attempt's pod (kueue.py; `pod` None: it is gone): not the
    task's failure. The pod is made again as the next attempt, counted in status.preemptions
    and not against spec.retries, at most LLMSANDBOX_MAX_PREEMPTIONS times; after that, or when
    Kueue was told not to run the Workload at all (deactivated), the task ends."""
    status = rec.status
    attempt = status.attempt or 1
    done = status.preemptions or 0
    most = settings.max_preemptions
    what = f"Kueue stopped pod {status.pod_name} ({stop})"
    if stop.deactivated:
        message = f"{what}: its Workload was deactivated, so the task is not run again"
        cancelled = PodVerdict(
            PodState.FAILED, ExitReason.CANCELLED, message, reason=Reason.CANCELLED
        )
        return failure(rec, cancelled, now, settings, pod)
    if done >= most:
        message = (
            f"{what}, after {done} earlier stops; the operator makes a task's pod again at most "
            f"{most} times (LLMSANDBOX_MAX_PREEMPTIONS)"
        )
        preempted = PodVerdict(
            PodState.FAILED, ExitReason.PREEMPTED, message, reason=Reason.PREEMPTED
        )
        return failure(rec, preempted, now, settings, pod)
    note = (
        f"attempt {attempt}: {what}; starting attempt {attempt + 1} (Kueue's stop {done + 1} of "
        f"at most {most}, not counted against spec.retries)"
    )
    again = attempt_status(rec, attempt + 1, now, retry_note=note, retry_reason=Reason.PREEMPTED)
    again.preemptions = done + 1
    # As for a failure retried: the pod is deleted first (Kueue deletes it too), and the next
    # attempt's pod waits until it is gone.
    return [
        *_delete_stuck(pod),
        StartAttempt(attempt + 1, again, tallies=(Retried(ExitReason.PREEMPTED),)),
    ]


def _delete_stuck(pod: PodBody | None) -> list[Action]:
    """Delete a pod still pending or running (and not being deleted already): stuck pulling or
    misconfigured, or stopped, it would hold its slot (and its node) forever."""
    if (
        pod is None
        or pod_phase(pod) not in ("Pending", "Running")
        or pod["metadata"].get("deletionTimestamp")
    ):
        return []
    return [DeletePod(pod["metadata"]["name"])]


def finish_without_run(
    rec: TaskRecord,
    exit_reason: ExitReason,
    message: str,
    now: datetime,
    settings: OperatorSettings,
    cause: Reason | None = None,
) -> WriteStatus:
    """End the task without (another) pod: refused spec, missing references, foreign objects."""
    result = TaskResult(
        phase=phase_for(exit_reason),
        exit_reason=exit_reason,
        message=message,
        cause=cause.value if cause else None,
    )
    return finish(rec, result, now, settings)


def finish(
    rec: TaskRecord,
    result: TaskResult,
    now: datetime,
    settings: OperatorSettings,
    *,
    pod: PodBody | None = None,
    pod_ended: bool | None = None,
    reason: Reason | None = None,
) -> WriteStatus:
    """The terminal status for `result`, counted as completed once written. `pod_ended`
    (default: a pod is given) adds Ready=False; `reason` overrides the one the result implies."""
    status = rec.status.model_copy(deep=True)
    model = model_name(rec, settings)
    cost = cost_usd(settings, model, result.usage.prompt_tokens, result.usage.completion_tokens)
    answer, cut = answer_for_status(result.answer)
    status.phase = result.phase
    status.exit_reason = result.exit_reason
    status.answer = answer
    status.answer_truncated = cut or result.answer_truncated or None
    status.answer_short = answer_short(answer)
    status.steps = result.steps
    status.usage = result.usage.model_copy(update={"cost_usd": cost})
    status.tool_calls = result.tool_calls
    status.outputs = result.outputs
    status.artifacts_url = result.artifacts_url
    status.artifacts_error = result.artifacts_error
    status.message = result.message or None
    graded = result.counted_score is not None
    status.score = result.score if graded else None
    status.grader = result.grader if graded else None
    status.grade_message = (result.grade_message or None) if graded else None
    status.completion_time = rfc3339(now)
    status.queue_position = None
    if status.start_time is None and pod is not None:
        # A quick pod can finish before the watch ever showed it Running.
        status.start_time = _first_start(pod)
    run = _seconds_between(status.start_time, now)
    status.run_seconds = run
    why = reason or complete_reason(result)
    status.conditions = set_condition(
        status.conditions,
        ConditionType.COMPLETE,
        "True",
        why,
        result.message or "the model submitted an answer",
        now,
    )
    if pod_ended if pod_ended is not None else pod is not None:
        status.conditions = set_condition(
            status.conditions, ConditionType.READY, "False", why, "the pod has ended", now
        )
    return WriteStatus(
        status,
        clear=("queuePosition",),
        tallies=(Completed(result, model, cost, run),),
    )


def complete_reason(result: TaskResult) -> Reason:
    """The Complete condition's reason for a result: the cause it names, else its exit reason's."""
    if result.cause in _CAUSE_REASONS:
        return _CAUSE_REASONS[str(result.cause)]
    return _COMPLETE_REASONS.get(result.exit_reason, Reason.FAILED)


def model_name(rec: TaskRecord, settings: OperatorSettings) -> str:
    name = rec.task.spec.model.name if rec.task is not None else None
    return str(name or settings.default_model or "unknown")


@dataclass(frozen=True)
class Waiting:
    """Why a task waits: every run slot of the global cap is taken, or (`group` set) its
    endpoint group has its limit of tasks running (endpoint_admission.py)."""

    cap: int
    group: str | None = None
    limit: int = 0
    running: int = 0


def queued_status(place: int, why: Waiting, now: datetime) -> WriteStatus:
    status = TaskStatus(phase=Phase.QUEUED, queue_position=place)
    if why.group is not None:
        text = (
            f"waiting for endpoint {why.group}: {why.running} of its {why.limit} tasks "
            f"running (position {place})"
        )
    else:
        text = f"waiting for one of {why.cap} run slots (position {place})"
    status.conditions = set_condition([], ConditionType.ADMITTED, "False", Reason.QUEUED, text, now)
    return WriteStatus(status)


def admit_now(rec: TaskRecord, now: datetime) -> StartAttempt:
    """The task got a run slot: its first attempt, the wait since creation counted, its status
    written once the pod exists."""
    queued = _seconds_between(rec.created, now)
    return StartAttempt(
        1,
        attempt_status(rec, 1, now, queued_seconds=queued),
        tallies=(Admitted(max(0.0, queued)),) if queued is not None else (),
        after_pod=True,
    )


def attempt_status(
    rec: TaskRecord,
    attempt: int,
    now: datetime,
    *,
    queued_seconds: float | None = None,
    retry_note: str = "",
    retry_reason: Reason = Reason.RETRYING,
) -> TaskStatus:
    """The status of an attempt: a retry's is written before its pod is created, without a
    podUID (only the pod created next, for this attempt, may report); the first attempt's once
    its pod exists, with its uid (`record_pod`). A retry's note goes in the Complete condition
    (False, `retry_reason`) and the message."""
    old = rec.status
    status = TaskStatus(
        phase=Phase.PENDING,
        pod_name=pod_name(rec.name, attempt),
        attempt=attempt,
        preemptions=old.preemptions,
        queued_seconds=queued_seconds if queued_seconds is not None else old.queued_seconds,
        start_time=old.start_time,
        observed_generation=rec.generation,
    )
    conditions = set_condition(
        old.conditions, ConditionType.ADMITTED, "True", Reason.ADMITTED, "run slot granted", now
    )
    if retry_note:
        conditions = set_condition(
            conditions, ConditionType.COMPLETE, "False", retry_reason, retry_note, now
        )
        status.message = retry_note
    status.conditions = conditions
    return status


ATTEMPT_CLEARS = ("queuePosition", "podUID", "ungatedTime")
"""Fields an attempt's status write removes (the queue place, the previous attempt's pod and
when Kueue released it)."""


def record_pod(rec: TaskRecord, pod: PodBody, start: StartAttempt | None = None) -> WriteStatus:
    """The attempt's pod exists: from now on only it may report for the task. `start` is the
    attempt whose status is written once its pod exists (`after_pod`, the first attempt's): its
    status, clears and tallies go with the pod's uid; else the task's own status is used."""
    if start is None or start.status is None:
        recorded = rec.status.model_copy()
        recorded.pod_uid = str(pod["metadata"]["uid"])
        return WriteStatus(recorded)
    recorded = start.status.model_copy()
    recorded.pod_uid = str(pod["metadata"]["uid"])
    return WriteStatus(recorded, clear=ATTEMPT_CLEARS, tallies=start.tallies)


def adopt_pod(
    rec: TaskRecord,
    found: PodBody,
    desired: PodBody | None,
    now: datetime,
    settings: OperatorSettings,
    *,
    start: StartAttempt | None = None,
) -> tuple[WriteStatus, bool]:
    """A pod found under the attempt's pod name: record it (with `start`, see `record_pod`) if
    it is the pod the operator would create (`desired`, built here when None), else fail the
    task naming what differs. The write, and whether it adopts the pod."""
    if desired is None:
        if rec.task is None:
            write = finish_without_run(rec, ExitReason.INVALID_SPEC, rec.why_no_spec, now, settings)
            return write, False
        try:
            desired = build_pod(
                rec.task,
                namespace=rec.namespace,
                uid=rec.uid,
                attempt=start.attempt if start is not None else rec.status.attempt or 1,
                settings=settings,
            )
        except (SpecError, ValidationError) as exc:
            return finish_without_run(rec, ExitReason.INVALID_SPEC, str(exc), now, settings), False
    problem = foreign_pod_problem(found, desired, rec.uid)
    if problem is not None:
        return foreign(rec, problem, now, settings), False
    return record_pod(rec, found, start), True


def foreign(
    rec: TaskRecord, problem: str, now: datetime, settings: OperatorSettings
) -> WriteStatus:
    """An object in the way that the operator did not make for this task: never adopted."""
    return finish_without_run(
        rec,
        ExitReason.CONFIG_ERROR,
        f"{problem}; delete it, then create the task again",
        now,
        settings,
        cause=Reason.FOREIGN_OBJECT,
    )


def start_timeout(
    rec: TaskRecord, pod: PodBody, now: datetime, settings: OperatorSettings
) -> list[Action]:
    """For the periodic check: fail a Pending task whose recorded pod has stayed Pending past
    the start timeout (see `failures.start_timed_out`)."""
    timeout = settings.pod_start_timeout_seconds
    meta = pod["metadata"]
    if (
        timeout <= 0
        or rec.status.phase is not Phase.PENDING
        or not rec.status.pod_uid
        or meta.get("uid") != rec.status.pod_uid
        or meta.get("deletionTimestamp")
    ):
        return []
    since, after_kueue = _start_counted_from(rec, pod)
    if since is None:
        return []
    verdict = start_timed_out(pod, (now - since).total_seconds(), timeout, after_kueue=after_kueue)
    return failure(rec, verdict, now, settings, pod) if verdict is not None else []


def _start_counted_from(rec: TaskRecord, pod: PodBody) -> tuple[datetime | None, bool]:
    """When the pod's start timeout began, and whether that was Kueue's admission. A pod Kueue
    manages waits for Kueue first, which is no failure to start: its timeout counts from the
    moment the operator first saw it released (status.ungatedTime; None while it is held or not
    yet seen released). Any other pod's counts from its creation."""
    if gated(pod):
        return None, True
    if managed(pod):
        return parse_rfc3339(rec.status.ungated_time), True
    return parse_rfc3339(pod["metadata"].get("creationTimestamp")), False


def reap(pod: PodBody) -> list[Action]:
    """A pod under a terminal task that may still run: delete it.

    `failure` writes the terminal status before it deletes a stuck pod; an operator killed in
    between leaves the pod behind, and the restarted operator, which never touches a terminal
    task again, finds it through the watch (every pod is listed on start)."""
    if pod_phase(pod) in ("Pending", "Running", "Unknown") and not pod["metadata"].get(
        "deletionTimestamp"
    ):
        return [DeletePod(pod["metadata"]["name"])]
    return []


# -- small pure helpers -----------------------------------------------------------------------


def _seconds_between(start: str | None, end: datetime) -> float | None:
    begun = parse_rfc3339(start)
    return round((end - begun).total_seconds(), 3) if begun else None


def _sandbox_memory_limit(pod: PodBody) -> str | None:
    """The sandbox container's memory limit as the pod has it (the task's, or the default)."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") == "sandbox":
            limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
            return str(limit) if limit else None
    return None


def _first_start(pod: PodBody) -> str | None:
    starts = [
        str(term["startedAt"])
        for cs in (pod.get("status") or {}).get("containerStatuses") or []
        if (term := (cs.get("state") or {}).get("terminated")) and term.get("startedAt")
    ]
    return min(starts) if starts else None
