"""A set's child tasks as objects: the SandboxTask built for one item-sample (names, labels, owner
reference), the proof that a task found under such a name is the set's, and what a child's body
says of its result."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sandbox_agent.result import TERMINAL_PHASES, ExitReason, Phase
from sandbox_agent.taskset import Child, SampleResult, SandboxTaskSetSpec, SetItem, child_spec
from sandbox_agent.wire import (
    API_GROUP,
    API_VERSION,
    KIND,
    LABEL_MANAGED_BY,
    MANAGED_BY,
)

SET_KIND = "SandboxTaskSet"
LABEL_SET = f"{API_GROUP}/taskset"
"""The set's name (at most 40 characters, so always a valid label value)."""
LABEL_SET_UID = f"{API_GROUP}/taskset-uid"
LABEL_ITEM_INDEX = f"{API_GROUP}/taskset-item"
"""The item's 0-based index in the set (a number: never an unbounded string)."""
LABEL_SAMPLE = f"{API_GROUP}/taskset-sample"
ANNOTATION_ITEM_ID = f"{API_GROUP}/item-id"
"""The item's id, which may be any text: an annotation, not a label."""


@dataclass(frozen=True)
class SetRef:
    """The set a child belongs to: what its owner reference and labels name."""

    uid: str
    namespace: str
    name: str


@dataclass(frozen=True)
class ChildState:
    """What the set controller keeps of a child not yet counted: its uid, and once it has
    finished (or was deleted) its result."""

    name: str
    uid: str
    result: SampleResult | None


def child_body(
    ref: SetRef, spec: SandboxTaskSetSpec, item: SetItem, child: Child
) -> dict[str, Any]:
    """The SandboxTask of one item-sample, owned by the set (deleted with it)."""
    task_spec = child_spec(spec, item, child.index)
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {
            "name": child.name,
            "namespace": ref.namespace,
            "labels": {
                LABEL_MANAGED_BY: MANAGED_BY,
                LABEL_SET: ref.name,
                LABEL_SET_UID: ref.uid,
                LABEL_ITEM_INDEX: str(child.index),
                LABEL_SAMPLE: str(child.sample),
            },
            "annotations": {ANNOTATION_ITEM_ID: child.item_id},
            "ownerReferences": [owner_reference(ref)],
        },
        "spec": task_spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


def owner_reference(ref: SetRef) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": SET_KIND,
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owning_set_uid(body: Mapping[str, Any]) -> str | None:
    """The uid of the SandboxTaskSet that is the task's controller owner, if one is."""
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == SET_KIND and ref.get("controller") and ref.get("uid"):
            return str(ref["uid"])
    return None


def foreign_child_problem(found: Mapping[str, Any], ref: SetRef) -> str | None:
    """Why a task found under a child's name is not the set's (None: it is, adopt it)."""
    meta = found.get("metadata", {})
    where = f'sandboxtask "{meta.get("name")}"'
    if meta.get("namespace", ref.namespace) != ref.namespace:
        return f"{where} is in namespace {meta.get('namespace')}, not {ref.namespace}"
    if owning_set_uid(found) != ref.uid:
        return f"{where} exists and is not this set's task (no controller owner reference to it)"
    return None


def child_result(body: Mapping[str, Any], deleted: bool) -> SampleResult | None:
    """A child's result from its body: its terminal status; a child deleted before it finished
    counts as cancelled; None while it runs."""
    status = body.get("status") or {}
    item_id = str((body.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_ITEM_ID, ""))
    sample = _int((body.get("metadata", {}).get("labels") or {}).get(LABEL_SAMPLE))
    phase = _phase(status.get("phase"))
    if phase not in TERMINAL_PHASES:
        if not deleted:
            return None
        return SampleResult(item_id, sample, Phase.CANCELLED, ExitReason.CANCELLED)
    assert phase is not None
    usage = status.get("usage") or {}
    score = status.get("score")
    cost = usage.get("costUSD")
    return SampleResult(
        item_id=item_id,
        sample=sample,
        phase=phase,
        exit_reason=_reason(status.get("exitReason"), phase),
        score=float(score)
        if isinstance(score, int | float) and not isinstance(score, bool)
        else None,
        prompt_tokens=_int(usage.get("promptTokens")),
        completion_tokens=_int(usage.get("completionTokens")),
        cost_usd=float(cost) if isinstance(cost, int | float) else None,
    )


def _int(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def _phase(value: Any) -> Phase | None:
    try:
        return Phase(value)
    except ValueError:
        return None


def _reason(value: Any, phase: Phase) -> ExitReason:
    try:
        return ExitReason(value)
    except ValueError:
        # A terminal task always names one; a status edited by hand is counted as the phase says.
        return ExitReason.SUBMITTED if phase is Phase.SUCCEEDED else ExitReason.CANCELLED
