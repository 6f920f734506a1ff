"""SandboxTask status as the operator writes it: the model, its condition vocabulary, and pure helpers."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from sandbox_agent.result import ExitReason, OutputFile, Phase, Usage

ANSWER_LIMIT = 1024
ANSWER_SHORT_LIMIT = 40

ConditionStatus = Literal["True", "False", "Unknown"]

# Tells the CRD generator (and kubectl explain) that these strings are RFC3339 timestamps.
_TIMESTAMP: JsonDict = {"format": "date-time"}


class ConditionType(StrEnum):
    """The conditions a SandboxTask carries; each is set by the operator only."""

    ADMITTED = "Admitted"
    """True (Admitted) once the task holds a run slot under maxRunningTasks; False (Queued)
    while it waits. A task refused before admission (invalid spec) never gets it."""
    POD_SCHEDULED = "PodScheduled"
    """True (Scheduled) once the task's pod runs on a node; False (WaitingForKueue) while Kueue's
    admission gate holds the pod, then (AdmittedByKueue) until it runs; absent otherwise."""
    READY = "Ready"
    """True (Running) while the pod's containers run; False once the pod has ended, with the
    reason of the task's outcome (e.g. ExecServerNotReady, ImagePullFailed, OOMKilled)."""
    COMPLETE = "Complete"
    """True when the task reached a terminal phase, its reason naming the outcome; False
    (Retrying) while an infrastructure failure is being retried."""


class Reason(StrEnum):
    """CamelCase reasons for conditions; each names what happened, not where."""

    QUEUED = "Queued"
    """Admission found no free slot; the task waits by priority, then creation time."""
    ADMITTED = "Admitted"
    """Admission gave the task a slot; its pod is about to be created."""
    SCHEDULED = "Scheduled"
    """The pod is bound to a node."""
    RUNNING = "Running"
    """The task's pod runs (its containers have started)."""
    SUCCEEDED = "Succeeded"
    """The model submitted an answer."""
    FAILED = "Failed"
    """The run ended without an answer; exitReason says why (max_steps, token_budget, ...)."""
    CANCELLED = "Cancelled"
    """The task was deleted or interrupted before it finished."""
    INVALID_SPEC = "InvalidSpec"
    """The spec passed the API server's schema but not the operator's validation; the message
    names the field."""
    IMAGE_PULL_FAILED = "ImagePullFailed"
    """A container image could not be pulled (ErrImagePull, ImagePullBackOff, InvalidImageName)."""
    CONFIG_MISSING = "ConfigMissing"
    """A referenced Secret or ConfigMap (API key, input files) does not exist or lacks the key."""
    SECRET_NOT_ALLOWED = "SecretNotAllowed"  # noqa: S105 - a condition reason
    """The API-key Secret (the task's apiKeySecretRef, or the operator's default) exists but lacks
    the label that marks Secrets usable as tasks' API keys (LLMSANDBOX_API_KEY_SECRET_LABEL); the
    task fails with exitReason config_error before any pod is made."""
    FOREIGN_OBJECT = "ForeignObject"
    """An object the task needs (its pod or its ConfigMap) already exists under the name the
    operator gives it, but the operator did not make it for this task: another namespace, no
    controller owner reference to the task, other labels or other content. The task fails
    (exitReason config_error) rather than trust it; the message names the object and what differs."""
    OOM_KILLED = "OOMKilled"
    """A container exceeded its memory limit and was killed."""
    EVICTED = "Evicted"
    """The node evicted the pod (resource pressure, drain, preemption)."""
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    """The pod ran past limits.activeDeadlineSeconds and the kubelet stopped it."""
    EXEC_SERVER_NOT_READY = "ExecServerNotReady"
    """The sandbox container started but its exec server never answered the agent."""
    SANDBOX_STOPPED = "SandboxStopped"
    """The sandbox container stopped during the run; the agent ended the run at once."""
    ENDPOINT_UNREACHABLE = "EndpointUnreachable"
    """The agent could not reach the inference endpoint (DNS, connection, TLS, network policy)."""
    POD_DELETED = "PodDeleted"
    """The task's pod disappeared while the task was running."""
    START_TIMEOUT = "StartTimeout"
    """The pod stayed Pending (unschedulable, pulling) past the operator's start timeout."""
    RETRYING = "Retrying"
    """An infrastructure failure is being retried; attempt counts up to spec.retries + 1."""
    WAITING_FOR_KUEUE = "WaitingForKueue"
    """Kueue's admission gate (kueue.x-k8s.io/admission) holds the task's pod until Kueue admits
    its Workload in the pod's LocalQueue; the start timeout does not count meanwhile."""
    ADMITTED_BY_KUEUE = "AdmittedByKueue"
    """Kueue removed the pod's admission gate; the scheduler places the pod next, and the start
    timeout counts from the moment the operator saw it (status.ungatedTime)."""
    PREEMPTED = "Preempted"
    """Kueue stopped the task's pod (preempted or evicted its Workload). Complete False: the pod
    is made again as the next attempt, without using spec.retries; True (exitReason preempted):
    Kueue stopped it more often than LLMSANDBOX_MAX_PREEMPTIONS."""


class StatusModel(BaseModel):
    # extra="ignore": a status written by a newer operator (or edited by hand) must still parse.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(StatusModel):
    """One observation about the task, in the shape of metav1.Condition."""

    type: str = Field(description="Admitted, PodScheduled, Ready or Complete.")
    status: ConditionStatus
    reason: str = Field(description="CamelCase, machine-readable cause of the last transition.")
    message: str = Field(default="", description="What happened, for a person.")
    last_transition_time: str = Field(
        description="RFC3339 time the status last changed (not when it was last written).",
        json_schema_extra=_TIMESTAMP,
    )


class TaskStatus(StatusModel):
    """Observed state of a SandboxTask, written by the operator."""

    phase: Phase | None = Field(default=None, description="Where the task is in its life.")
    conditions: list[Condition] = Field(
        default_factory=list,
        # metav1.Condition's convention: one entry per type, merged by type on server-side apply.
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    pod_name: str | None = Field(default=None, description="The pod of the current attempt.")
    pod_uid: str | None = Field(
        default=None,
        alias="podUID",
        description=(
            "UID of the current attempt's pod, recorded when the operator created (or verified "
            "and adopted) it; only that pod's reports count for the task."
        ),
    )
    attempt: int | None = Field(default=None, description="1 for the first run, +1 per retry.")
    preemptions: int | None = Field(
        default=None,
        description=(
            "How often Kueue stopped (preempted or evicted) one of the task's pods; each made "
            "the pod again as the next attempt without using spec.retries."
        ),
    )
    ungated_time: str | None = Field(
        default=None,
        description=(
            "When the operator first saw the current attempt's pod released by Kueue (its "
            "admission gate removed); the pod start timeout counts from then."
        ),
        json_schema_extra=_TIMESTAMP,
    )
    start_time: str | None = Field(
        default=None,
        description="When the task's first pod started running.",
        json_schema_extra=_TIMESTAMP,
    )
    completion_time: str | None = Field(
        default=None,
        description="When the task reached a terminal phase.",
        json_schema_extra=_TIMESTAMP,
    )
    queued_seconds: float | None = Field(default=None, description="Creation to admission.")
    run_seconds: float | None = Field(default=None, description="From startTime to completion.")
    exit_reason: ExitReason | None = Field(
        default=None, description="Why the task ended; only submitted is a success."
    )
    answer: str | None = Field(
        default=None, description=f"The submitted answer, cut to {ANSWER_LIMIT} characters."
    )
    answer_truncated: bool | None = Field(default=None, description="True when answer was cut.")
    answer_short: Annotated[str | None, Field(max_length=ANSWER_SHORT_LIMIT)] = Field(
        default=None, description="The answer on one line, for kubectl get's Answer column."
    )
    steps: int | None = Field(default=None, description="Model turns taken.")
    usage: Usage | None = Field(default=None, description="Tokens, LLM calls and estimated cost.")
    tool_calls: dict[str, int] = Field(default_factory=dict, description="Calls per tool name.")
    outputs: list[OutputFile] = Field(
        default_factory=list, description="Files the task left in /workspace/output."
    )
    artifacts_url: str | None = Field(
        default=None,
        alias="artifactsURL",
        description=(
            "Where the artifact store keeps this attempt: result.json (with the whole answer), "
            "trajectory.json, steps/ and output/. `sandboxctl artifacts NAME` fetches it."
        ),
    )
    artifacts_error: str | None = Field(
        default=None, description="What the artifact store failed to keep, when it failed."
    )
    score: float | None = Field(
        default=None,
        description=(
            "The grader's score in [0, 1] (spec.grading); absent when the task was not graded or "
            "ended for a reason that is not the model's (an infrastructure failure)."
        ),
    )
    grader: str | None = Field(default=None, description="The grader's type, when graded.")
    grade_message: str | None = Field(
        default=None, description="Why the score is not 1, from the grader."
    )
    message: str | None = Field(default=None, description="Why, when the task did not succeed.")
    queue_position: int | None = Field(
        default=None, description="1-based place in the admission queue; only while Queued."
    )
    observed_generation: int | None = Field(
        default=None, description="metadata.generation of the spec this status describes."
    )

    def to_api(self) -> dict[str, Any]:
        """The status as the API stores it: camelCase, unset fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def rfc3339(moment: datetime) -> str:
    """Kubernetes' metav1.Time form: UTC, whole seconds, `Z` suffix."""
    if moment.tzinfo is None:
        # A naive time would be read as local time on one machine and UTC on another.
        raise ValueError("rfc3339 needs a timezone-aware datetime")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str | None) -> datetime | None:
    """A metav1.Time (or any ISO 8601 time with an offset) as a datetime; None when absent or
    not a time."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def set_condition(
    conditions: list[Condition],
    type: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: datetime,
) -> list[Condition]:
    """A new list with `type` set; lastTransitionTime moves only when the status flips."""
    updated: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.type != type:
            updated.append(cond)
            continue
        found = True
        changed = cond.status != status
        updated.append(
            cond.model_copy(
                update={
                    "status": status,
                    "reason": reason,
                    "message": message,
                    "last_transition_time": rfc3339(now) if changed else cond.last_transition_time,
                }
            )
        )
    if not found:
        updated.append(
            Condition(
                type=type,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=rfc3339(now),
            )
        )
    return updated


def answer_for_status(answer: str | None, limit: int = ANSWER_LIMIT) -> tuple[str | None, bool]:
    """The answer as stored in status, and whether it was cut; the whole result, answer and all,
    is the last line of the agent container's log (`sandboxctl logs`)."""
    if answer is None or len(answer) <= limit:
        return answer, False
    return answer[:limit], True


def answer_short(answer: str | None, limit: int = ANSWER_SHORT_LIMIT) -> str | None:
    """One line of at most `limit` characters: printer columns cannot truncate or join lines."""
    if answer is None:
        return None
    line = re.sub(r"\s+", " ", answer).strip()
    if len(line) <= limit:
        return line
    return line[: limit - 1].rstrip() + "…"
