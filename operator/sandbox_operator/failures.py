"""What a pod's status says about its task: still starting, running, finished, or a named failure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sandbox_agent.result import ExitReason

from .status import Reason

_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
_CONFIG_REASONS = {"CreateContainerConfigError", "CreateContainerError"}


class PodState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    FINISHED = "finished"  # the agent reported; the result is in its termination message
    FAILED = "failed"  # a named failure; see exit_reason


@dataclass(frozen=True)
class PodVerdict:
    state: PodState
    exit_reason: ExitReason | None = None
    message: str = ""
    reason: Reason | None = None
    """For a failure: the reason its Complete (and Ready) condition carries."""
    retryable: bool = False
    termination_message: str | None = None
    started_at: str | None = None


def _statuses(pod: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    return list((pod.get("status") or {}).get(key) or [])


def _images(pod: Mapping[str, Any]) -> dict[str, str]:
    spec = pod.get("spec") or {}
    return {
        c["name"]: c.get("image", "")
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])
    }


def _waiting_failure(pod: Mapping[str, Any]) -> PodVerdict | None:
    images = _images(pod)
    for cs in _statuses(pod, "initContainerStatuses") + _statuses(pod, "containerStatuses"):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason", "")
        detail = waiting.get("message", "") or reason
        name = cs.get("name", "?")
        if reason in _PULL_REASONS:
            image = cs.get("image") or images.get(name, "?")
            which = "spec.sandbox.image" if name == "sandbox" else "the operator's agentImage"
            return PodVerdict(
                PodState.FAILED,
                ExitReason.IMAGE_PULL_ERROR,
                f"cannot pull image {image!r} for container {name} ({reason}: {detail}); "
                f"check {which} and the registry's pull secret",
                reason=Reason.IMAGE_PULL_FAILED,
            )
        if reason in _CONFIG_REASONS:
            return PodVerdict(
                PodState.FAILED,
                ExitReason.CONFIG_ERROR,
                f"container {name} cannot start: {detail}; create it, or fix the reference "
                "(spec.model.apiKeySecretRef, spec.inputs[].configMapRef)",
                reason=Reason.CONFIG_MISSING,
            )
    return None


def _terminated(pod: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    for cs in _statuses(pod, "containerStatuses"):
        if cs.get("name") == name:
            term = (cs.get("state") or {}).get("terminated")
            return dict(term) if term else None
    return None


def _started_at(pod: Mapping[str, Any]) -> str | None:
    for cs in _statuses(pod, "containerStatuses"):
        running = (cs.get("state") or {}).get("running")
        if running and running.get("startedAt"):
            return str(running["startedAt"])
    return (pod.get("status") or {}).get("startTime")


def _not_started_because(pod: Mapping[str, Any]) -> str:
    """What the scheduler or the kubelet last said about a pod that has not started."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return f"not scheduled: {cond.get('message') or cond.get('reason') or 'no reason'}"
    for cs in _statuses(pod, "initContainerStatuses") + _statuses(pod, "containerStatuses"):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting:
            detail = waiting.get("message") or ""
            return f"container {cs.get('name', '?')} {waiting.get('reason', 'waiting')} {detail}"
    return "no reason given by the cluster"


def start_timed_out(
    pod: Mapping[str, Any], age_seconds: float, timeout: int, *, after_kueue: bool = False
) -> PodVerdict | None:
    """Pure: a failure verdict when a pod is still Pending `timeout` seconds after the moment
    its start began to count (`age_seconds` since then): its creation, or for a pod Kueue held,
    Kueue's admission (`after_kueue`).

    Kubernetes counts activeDeadlineSeconds only from the moment a node takes the pod, so an
    unschedulable pod would otherwise hold its task's run slot forever."""
    phase = (pod.get("status") or {}).get("phase", "Pending")
    if timeout <= 0 or phase != "Pending" or age_seconds < timeout:
        return None
    since = " of Kueue admitting it" if after_kueue else ""
    return PodVerdict(
        PodState.FAILED,
        ExitReason.START_TIMEOUT,
        f"the pod did not start within {timeout}s{since} ({_not_started_because(pod).strip()}); "
        "check spec.sandbox.resources against the nodes, or raise the operator's "
        "LLMSANDBOX_POD_START_TIMEOUT_SECONDS",
        reason=Reason.START_TIMEOUT,
    )


def assess_pod(pod: Mapping[str, Any], memory_limit: str | None = None) -> PodVerdict:
    """Pure: the verdict for one task pod, from its status alone."""
    status = pod.get("status") or {}
    phase = status.get("phase", "Pending")
    if phase in ("Pending", "Running", "Unknown"):
        failure = _waiting_failure(pod)
        if failure is not None:
            return failure
        if phase == "Running":
            return PodVerdict(PodState.RUNNING, started_at=_started_at(pod))
        return PodVerdict(PodState.STARTING)
    if status.get("reason") == "Evicted":
        return PodVerdict(
            PodState.FAILED,
            ExitReason.EVICTED,
            f"the node evicted the pod: {status.get('message', 'no message')}",
            retryable=True,
            reason=Reason.EVICTED,
        )
    if status.get("reason") == "DeadlineExceeded":
        return PodVerdict(
            PodState.FAILED,
            ExitReason.DEADLINE,
            "the pod ran past its activeDeadlineSeconds (limits.activeDeadlineSeconds plus the "
            "operator's grace period) and was stopped",
            reason=Reason.DEADLINE_EXCEEDED,
        )
    sandbox = _terminated(pod, "sandbox") or {}
    agent = _terminated(pod, "agent") or {}
    if sandbox.get("reason") == "OOMKilled":
        limit = f" ({memory_limit})" if memory_limit else ""
        return PodVerdict(
            PodState.FAILED,
            ExitReason.OOM_KILLED,
            f"the sandbox container ran out of memory{limit}; raise "
            "spec.sandbox.resources.limits.memory or make the task use less",
            termination_message=agent.get("message") or None,
            reason=Reason.OOM_KILLED,
        )
    if agent.get("reason") == "OOMKilled":
        return PodVerdict(
            PodState.FAILED,
            ExitReason.OOM_KILLED,
            "the agent container ran out of memory; raise the operator's agentResources",
            reason=Reason.OOM_KILLED,
        )
    if agent.get("message"):
        return PodVerdict(PodState.FINISHED, termination_message=str(agent["message"]))
    if agent:
        return PodVerdict(
            PodState.FAILED,
            ExitReason.AGENT_CRASHED,
            f"the agent container exited with code {agent.get('exitCode')} "
            f"({agent.get('reason', 'no reason')}) without reporting a result; see its log",
            retryable=True,
            reason=Reason.FAILED,
        )
    return PodVerdict(
        PodState.FAILED,
        ExitReason.POD_LOST,
        f"the pod ended ({phase}: {status.get('reason', '')} {status.get('message', '')}) "
        "before the agent reported",
        retryable=True,
        reason=Reason.POD_DELETED,
    )
