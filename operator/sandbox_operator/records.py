"""What the operator knows of a task, parsed once when it is stored: `TaskRecord`.

A task body comes from a watch event or a status write's reply; `TaskRecord.parse` turns it
into typed objects at once (the spec into `SandboxTask`, the status into `TaskStatus`), so no
decision reads a raw dict. A spec already parsed (the same metadata.generation) is not parsed
again: the status changes five times in a task's life, its spec (almost) never. A terminal task
keeps no spec at all, and of its status only its phase (one status object per phase, shared) and
its completion time: a cluster that keeps its finished tasks keeps their records too, so each
costs a few hundred bytes (bench/operator_scale.py measures it).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from sandbox_agent.result import TERMINAL_PHASES, Phase
from sandbox_agent.task import SandboxTask, format_validation_error
from sandbox_agent.wire import LABEL_TASK_UID

from .admission import Candidate
from .status import TaskStatus

PodBody = Mapping[str, Any]
"""A pod as the API sent it. Never mutated: watch events hand the operator kopf's own copy."""

# How far a status has come; the operator's writes only ever move it forward (see `progress`).
_RANK = {None: 0, Phase.QUEUED: 1, Phase.PENDING: 2, Phase.RUNNING: 4}


@dataclass(frozen=True, slots=True)
class TaskRecord:
    uid: str
    namespace: str
    name: str
    created: str
    """metadata.creationTimestamp (RFC3339, sorts as text), "" when absent."""
    generation: int | None
    resource_version: str
    """Opaque: compared for equality only (the same version of the object, or not)."""
    raw_spec: Mapping[str, Any] | None
    task: SandboxTask | None
    """The spec as the API model reads it; None when it does not parse (see `spec_error`),
    and for a terminal task (nothing decides over its spec again)."""
    spec_error: str | None
    status: TaskStatus
    ttl_seconds: int | None = None
    """spec.ttlSecondsAfterFinished, kept (as the one number of the spec) once it is terminal."""
    completion_time: str | None = None
    """status.completionTime of a terminal task (its status is reduced to its phase)."""
    queue_entry: Candidate | None = None
    """Its place in the admission queue, built once; None for a terminal task."""

    @classmethod
    def parse(cls, body: Mapping[str, Any], previous: TaskRecord | None = None) -> TaskRecord:
        meta = body["metadata"]
        spec = body.get("spec")
        status = _parse_status(body.get("status"))
        generation = meta.get("generation")
        generation = generation if isinstance(generation, int) else None
        task: SandboxTask | None = None
        error: str | None = None
        ttl = _ttl(spec)
        completion: str | None = None
        terminal = status.phase in TERMINAL_PHASES
        if terminal:
            # Final: no decision reads the spec again, so it is neither parsed nor kept; of the
            # status, only its phase and when it ended (answer, usage, conditions and outputs
            # are the API's to keep).
            spec = None
            completion = status.completion_time
            status = _final_status(status)
        elif (
            previous is not None
            and previous.uid == meta["uid"]
            and _same_spec(previous, generation, spec)
        ):
            task, error = previous.task, previous.spec_error
        else:
            task, error = _parse_task(body)
        uid, name = meta["uid"], meta["name"]
        # Thousands of records share a few namespaces: one string each.
        namespace = sys.intern(str(meta.get("namespace", "default")))
        created = "" if terminal else str(meta.get("creationTimestamp") or "")
        entry = None
        if not terminal:
            priority = task.spec.priority if task is not None else 0
            base_url = task.spec.model.base_url if task is not None else None
            model = task.spec.model.name if task is not None else None
            entry = previous.queue_entry if previous is not None else None
            if entry is None or (
                entry.uid,
                entry.priority,
                entry.created,
                entry.base_url,
                entry.model,
            ) != (uid, priority, created, base_url, model):
                entry = Candidate(
                    uid=uid,
                    namespace=namespace,
                    name=name,
                    priority=priority,
                    created=created,
                    base_url=base_url,
                    model=model,
                )
        return cls(
            uid=uid,
            namespace=namespace,
            name=name,
            created=created,
            generation=generation,
            resource_version=str(meta.get("resourceVersion") or ""),
            # The API server counts spec changes in metadata.generation; without one (a body
            # built by hand), the spec itself is kept to compare.
            raw_spec=spec if generation is None else None,
            task=task,
            spec_error=error,
            status=status,
            ttl_seconds=ttl,
            completion_time=completion,
            queue_entry=entry,
        )

    def with_status(self, status: TaskStatus) -> TaskRecord:
        return dataclasses.replace(self, status=status)

    @property
    def phase(self) -> Phase | None:
        return self.status.phase

    @property
    def why_no_spec(self) -> str:
        """Why `task` is None, for a task that should have one."""
        return self.spec_error or "the spec is missing"

    @property
    def priority(self) -> int:
        return self.task.spec.priority if self.task is not None else 0

    @property
    def retries(self) -> int:
        return self.task.spec.retries if self.task is not None else 0

    @property
    def candidate(self) -> Candidate:
        """Its place in the admission queue (built once, when the record was parsed)."""
        assert self.queue_entry is not None, "a terminal task is never queued"
        return self.queue_entry


_FINAL_STATUS: dict[Phase, TaskStatus] = {}


def _final_status(status: TaskStatus) -> TaskStatus:
    """A terminal task's status, reduced to its phase: one object per phase, shared by every
    record (nothing changes a record's status in place; decisions copy it)."""
    assert status.phase is not None
    found = _FINAL_STATUS.get(status.phase)
    if found is None:
        found = _FINAL_STATUS[status.phase] = TaskStatus(phase=status.phase)
    return found


def _ttl(spec: Any) -> int | None:
    value = spec.get("ttlSecondsAfterFinished") if isinstance(spec, Mapping) else None
    # bool is an int to Python; the API (and the CRD's schema) never sends one here.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _same_spec(previous: TaskRecord, generation: int | None, spec: Any) -> bool:
    if previous.task is None and previous.spec_error is None:
        return False  # never parsed (it was terminal)
    if generation is not None:
        return previous.generation == generation
    return previous.raw_spec is not None and previous.raw_spec == spec


def typed_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """What of an API object its pydantic model reads: kind, name, namespace and spec (the
    server's metadata and the status are the operator's to read apart)."""
    meta = body["metadata"]
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": meta["name"], "namespace": meta.get("namespace")},
        "spec": body.get("spec"),
    }


def _parse_task(body: Mapping[str, Any]) -> tuple[SandboxTask | None, str | None]:
    try:
        task = SandboxTask.model_validate(typed_view(body), by_alias=True, by_name=False)
    except ValidationError as exc:
        return None, format_validation_error(exc).replace("\n", "; ")
    return task, None


def _parse_status(raw: Any) -> TaskStatus:
    try:
        return TaskStatus.model_validate(raw or {})
    except ValidationError:
        # A status we cannot read (hand-edited, or older) is treated as empty: the task restarts.
        return TaskStatus()


def progress(status: TaskStatus) -> tuple[int, int, int, int, int]:
    """How far a task has come, as an order: terminal last, then attempt, phase, pod recorded,
    and its release by Kueue recorded (an older event must not make it be recorded later).

    resourceVersion is opaque (Kubernetes promises no order on it), so an event older than the
    cached body is told by its status instead: every status write the operator makes moves this
    forward or keeps it (a queue position), never back."""
    terminal = status.phase in TERMINAL_PHASES
    rank = 5 if terminal else _RANK.get(status.phase, 0)
    return (
        int(terminal),
        status.attempt or 0,
        rank,
        int(status.pod_uid is not None),
        int(status.ungated_time is not None),
    )


def is_stale(incoming: TaskRecord, known: TaskRecord) -> bool:
    """Whether a watch event carries an older state of the task than the one already known
    (the reply to the operator's own write can arrive before the events preceding it)."""
    if (
        incoming.generation is not None
        and known.generation is not None
        and incoming.generation < known.generation
    ):
        return True
    return progress(incoming.status) < progress(known.status)


def pod_task_uid(pod: PodBody) -> str:
    """The task uid a pod's label names (a claim, proved by `ownership.claim_problem`)."""
    return str((pod["metadata"].get("labels") or {}).get(LABEL_TASK_UID, ""))


def pod_phase(pod: PodBody) -> str:
    return str((pod.get("status") or {}).get("phase", "Pending"))


def pod_may_run(pod: PodBody) -> bool:
    """Not yet Succeeded or Failed: its containers may still run (also while being deleted)."""
    return pod_phase(pod) not in ("Succeeded", "Failed")
