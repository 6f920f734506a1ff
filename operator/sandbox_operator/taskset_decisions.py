"""A SandboxTaskSet's decisions as one pure function: the set, its items, its children not yet
counted and the clock in; actions out (create these tasks, write this status, delete the set).

Crash safety is the order of the actions: children are created before the status records them
(`progress.created`), and a child is counted in the same write that records it as counted
(`progress.folded`). A restarted operator recreates what the status does not record (a 409
adopts a child that exists and is the set's) and counts only what the status does not count.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from sandbox_agent.result import ExitReason, Phase
from sandbox_agent.task import format_validation_error
from sandbox_agent.taskset import Child, SampleResult, SandboxTaskSet, SetItem, children

from .records import typed_view
from .status import parse_rfc3339, rfc3339, set_condition
from .taskset_children import ChildState, SetRef, child_body
from .taskset_fold import fold
from .taskset_status import (
    TERMINAL_SET_PHASES,
    SetConditionType,
    SetPhase,
    SetReason,
    TaskSetStatus,
    contains,
    count,
    parse_ranges,
)

# -- what is known ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SetRecord:
    """A set as the operator holds it: the body parsed once."""

    ref: SetRef
    generation: int | None
    resource_version: str
    taskset: SandboxTaskSet | None
    spec_error: str | None
    status: TaskSetStatus

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> SetRecord:
        meta = body["metadata"]
        ref = SetRef(str(meta["uid"]), str(meta.get("namespace", "default")), str(meta["name"]))
        try:
            status = TaskSetStatus.model_validate(body.get("status") or {})
        except ValidationError:
            status = TaskSetStatus()
        taskset: SandboxTaskSet | None = None
        error: str | None = None
        try:
            taskset = SandboxTaskSet.model_validate(typed_view(body), by_alias=True, by_name=False)
        except ValidationError as exc:
            error = one_line(format_validation_error(exc))
        generation = meta.get("generation")
        return cls(
            ref=ref,
            generation=generation if isinstance(generation, int) else None,
            resource_version=str(meta.get("resourceVersion") or ""),
            taskset=taskset,
            spec_error=error,
            status=status,
        )

    @property
    def terminal(self) -> bool:
        return self.status.phase in TERMINAL_SET_PHASES


def progress(status: TaskSetStatus) -> tuple[int, int, int]:
    """How far a set has come; the operator's writes only move it forward (stale events)."""
    return (int(status.phase in TERMINAL_SET_PHASES), status.finished, status.progress.created)


@dataclass(frozen=True)
class ItemsView:
    """A set's items as read, and its children in the order they run (by ordinal)."""

    items: list[SetItem]
    plan: list[Child]
    by_name: dict[str, int] = field(repr=False)
    digest: str

    @classmethod
    def of(cls, set_name: str, items: list[SetItem], samples: int) -> ItemsView:
        plan = list(children(set_name, items, samples))
        return cls(items, plan, {c.name: i for i, c in enumerate(plan)}, items_digest(items))


@dataclass(frozen=True)
class ItemsProblem:
    """The items could not be read or are not valid: one line naming the field or line."""

    reason: SetReason
    message: str


Items = ItemsView | ItemsProblem


def items_digest(items: list[SetItem]) -> str:
    text = json.dumps(
        [i.model_dump(mode="json", by_alias=True, exclude_none=True) for i in items],
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode()).hexdigest()


def one_line(text: str) -> str:
    """A multi-line problem list as one line: the first problem, and how many more there are."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) <= 1:
        return text.strip()
    more = [ln for ln in lines[1:] if not ln.startswith("(")]
    return f"{lines[0]} (and {len(more)} more problem{'s' if len(more) != 1 else ''})"


# -- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetFinished:
    """Counted (llmsandbox_tasksets_completed_total) once the terminal write lands."""

    phase: SetPhase


@dataclass(frozen=True)
class WriteSetStatus:
    status: TaskSetStatus
    tallies: tuple[SetFinished, ...] = ()


@dataclass(frozen=True)
class CreateChildren:
    """Create these tasks (a 409 adopts one that is the set's; another is a ForeignObject)."""

    bodies: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class DeleteSet:
    """Its TTL has passed: delete the set; owner references take its tasks."""


SetAction = WriteSetStatus | CreateChildren | DeleteSet


# -- the decision ----------------------------------------------------------------------------


def decide(
    rec: SetRecord,
    items: Items | None,
    known: Mapping[str, ChildState],
    now: datetime,
) -> list[SetAction]:
    """The next actions for the set. `known`: its children not yet counted, by name, as the
    watch (or the start-up list) showed them; a child created but in neither is gone."""
    if rec.terminal:
        when = expiry(rec)
        return [DeleteSet()] if when is not None and when <= now else []
    if rec.taskset is None:
        return [fail(rec, SetReason.INVALID_SPEC, rec.spec_error or "the spec is missing", now)]
    if items is None:
        return []
    if isinstance(items, ItemsProblem):
        return [fail(rec, items.reason, items.message, now)]
    digest = rec.status.progress.items_digest
    if digest is not None and digest != items.digest:
        message = "the items differ from those the set started with; create a new set to run them"
        return [fail(rec, SetReason.ITEMS_CHANGED, message, now)]
    spec = rec.taskset.spec
    status = started(rec, items, now)
    fold_known(status, items, known, spec.samples_per_item)
    stop = policy_violation(status, rec.taskset)
    if stop is not None:
        return [
            finish(status, SetPhase.FAILED, SetReason.TOO_MANY_INFRASTRUCTURE_FAILURES, stop, now)
        ]
    if status.finished >= len(items.plan):
        done = f"{status.finished} tasks finished"
        return [finish(status, SetPhase.SUCCEEDED, SetReason.ALL_TASKS_FINISHED, done, now)]
    actions: list[SetAction] = []
    bodies = next_children(rec, items, status)
    if bodies:
        actions.append(CreateChildren(tuple(bodies)))
        status.progress.created += len(bodies)
    if status.to_api() != rec.status.to_api():
        actions.append(WriteSetStatus(status))
    return actions


def started(rec: SetRecord, items: ItemsView, now: datetime) -> TaskSetStatus:
    """A copy of the status, Running from the first decision on."""
    status = rec.status.model_copy(deep=True)
    if status.phase is None or status.phase is SetPhase.PENDING:
        status.phase = SetPhase.RUNNING
        status.start_time = status.start_time or rfc3339(now)
        status.items = len(items.items)
        status.tasks = len(items.plan)
        status.progress.items_digest = items.digest
        status.observed_generation = rec.generation
        status.conditions = set_condition(
            status.conditions,
            SetConditionType.COMPLETE,
            "False",
            SetReason.RUNNING,
            "creating tasks as earlier ones finish",
            now,
        )
    return status


def fold_known(
    status: TaskSetStatus, items: ItemsView, known: Mapping[str, ChildState], samples: int
) -> None:
    """Count every finished child not counted yet, and every created child that is gone from
    the API without a result (deleted while no operator watched) as cancelled."""
    folded = parse_ranges(status.progress.folded)
    seen: set[int] = set()
    for name, child in known.items():
        ordinal = items.by_name.get(name)
        if ordinal is None:
            continue
        seen.add(ordinal)
        if child.result is not None and not contains(folded, ordinal):
            fold(status, ordinal, items.plan[ordinal].index, child.result, samples)
            folded = parse_ranges(status.progress.folded)
    for ordinal in range(status.progress.created):
        if ordinal in seen or contains(folded, ordinal):
            continue
        plan = items.plan[ordinal]
        lost = SampleResult(plan.item_id, plan.sample, Phase.CANCELLED, ExitReason.CANCELLED)
        fold(status, ordinal, plan.index, lost, samples)
        folded = parse_ranges(status.progress.folded)


def policy_violation(status: TaskSetStatus, taskset: SandboxTaskSet) -> str | None:
    """Why the failure policy stops the set, or None."""
    policy = taskset.spec.failure_policy
    if status.finished < policy.min_finished or status.finished == 0:
        return None
    fraction = status.infrastructure_failures / status.finished
    if fraction <= policy.max_infrastructure_failure_fraction:
        return None
    return (
        f"{status.infrastructure_failures} of {status.finished} finished tasks failed for "
        f"infrastructure reasons, more than failurePolicy.maxInfrastructureFailureFraction "
        f"{policy.max_infrastructure_failure_fraction:g}; no more tasks are created"
    )


def next_children(rec: SetRecord, items: ItemsView, status: TaskSetStatus) -> list[dict[str, Any]]:
    """The children to create now: the next ones in order while fewer than `parallelism` are
    created and not counted. No buffer beyond it: a finished child is counted and the next one
    created by the same decision, so creating ahead would only run more than parallelism."""
    assert rec.taskset is not None
    spec = rec.taskset.spec
    counted = count(parse_ranges(status.progress.folded))
    end = min(len(items.plan), counted + spec.parallelism)
    return [
        child_body(rec.ref, spec, items.items[items.plan[o].index], items.plan[o])
        for o in range(status.progress.created, end)
    ]


def finish(
    status: TaskSetStatus, phase: SetPhase, reason: SetReason, message: str, now: datetime
) -> WriteSetStatus:
    status.phase = phase
    status.message = message
    status.completion_time = rfc3339(now)
    status.conditions = set_condition(
        status.conditions, SetConditionType.COMPLETE, "True", reason, message, now
    )
    return WriteSetStatus(status, tallies=(SetFinished(phase),))


def fail(rec: SetRecord, reason: SetReason, message: str, now: datetime) -> WriteSetStatus:
    status = rec.status.model_copy(deep=True)
    status.start_time = status.start_time or rfc3339(now)
    status.observed_generation = rec.generation
    return finish(status, SetPhase.FAILED, reason, message, now)


def expiry(rec: SetRecord) -> datetime | None:
    """When a finished set is deleted (spec.ttlSecondsAfterFinished), None when never."""
    if rec.taskset is None or rec.taskset.spec.ttl_seconds_after_finished is None:
        return None
    done = parse_rfc3339(rec.status.completion_time)
    if done is None:
        return None
    return done + timedelta(seconds=rec.taskset.spec.ttl_seconds_after_finished)
