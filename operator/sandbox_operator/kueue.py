"""What Kueue's pod integration (kubernetes-sigs/kueue) says on a task's pod, read purely: the
queue label the operator sets, the scheduling gate that holds the pod until Kueue admits it, and
the condition Kueue leaves on a pod it stops (preempted or evicted) before deleting it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sandbox_agent.task import SandboxTask

from .settings import OperatorSettings

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
"""The LocalQueue a pod is submitted to; set by the operator from spec.queueName or its default."""
MANAGED_LABEL = "kueue.x-k8s.io/managed"
"""Set ("true") by Kueue's pod webhook on every pod it manages, together with the gate below:
such a pod was held by Kueue when it was created."""
ADMISSION_GATE = "kueue.x-k8s.io/admission"
"""The scheduling gate Kueue's webhook adds to a pod it manages and removes once the pod's
Workload is admitted; the scheduler does not look at a pod while it has a gate."""
GATE_PREFIX = "kueue.x-k8s.io/"
"""Kueue's scheduling gates: the admission gate, and with topology-aware scheduling
`kueue.x-k8s.io/topology`, which stays a moment longer, until Kueue has placed the pod."""
STOP_CONDITION = "TerminationTarget"
"""The pod condition Kueue sets (True) on a pod it stops, just before it deletes the pod; its
reason says why: `WorkloadEvictedDueTo<eviction reason>` (Preempted, PodsReadyTimeout,
ClusterQueueStopped, ...), `WorkloadDeleted`, `NoMatchingWorkload` or `NotAdmitted`."""
DEACTIVATED_REASONS = frozenset(
    {"WorkloadEvictedDueToDeactivated", "WorkloadEvictedDueToInactiveWorkload"}
)
"""The stops of a Workload deactivated (spec.active false: by hand, or by Kueue after too many
requeues): Kueue was told not to run it, so the task ends rather than run again. The second is
the name Kueue up to v0.10 gave the same eviction."""


@dataclass(frozen=True)
class KueueStop:
    """Kueue stopped the pod: its condition's reason and message."""

    reason: str
    message: str

    @property
    def deactivated(self) -> bool:
        return self.reason in DEACTIVATED_REASONS

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}" if self.message else self.reason


def queue_name(task: SandboxTask, settings: OperatorSettings) -> str | None:
    """The LocalQueue for the task's pod: its own spec.queueName, else the operator's default."""
    return task.spec.queue_name or settings.default_queue_name


def kueue_gates(pod: Mapping[str, Any]) -> list[str]:
    """The names of Kueue's scheduling gates the pod still has: while there are any, Kueue
    holds it."""
    gates = (pod.get("spec") or {}).get("schedulingGates") or []
    return [str(g.get("name")) for g in gates if str(g.get("name", "")).startswith(GATE_PREFIX)]


def gated(pod: Mapping[str, Any]) -> bool:
    """Whether Kueue still holds the pod (one of its scheduling gates is on it)."""
    return bool(kueue_gates(pod))


def managed(pod: Mapping[str, Any]) -> bool:
    """Whether Kueue manages the pod (so it was gated when it was created)."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return labels.get(MANAGED_LABEL) == "true"


def local_queue(pod: Mapping[str, Any]) -> str | None:
    """The LocalQueue the pod is submitted to (Kueue may have filled in `default`)."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    value = labels.get(QUEUE_LABEL)
    return str(value) if value else None


def stopped(pod: Mapping[str, Any]) -> KueueStop | None:
    """How Kueue stopped the pod, when it did (its TerminationTarget condition is True)."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == STOP_CONDITION and cond.get("status") == "True":
            return KueueStop(str(cond.get("reason") or "StoppedByKueue"), cond.get("message") or "")
    return None
