"""SandboxTaskSet status as the operator writes it: the model, its condition vocabulary, and the
compact record of which child tasks are already counted (so the status alone survives restarts)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

from .status import _TIMESTAMP, Condition, StatusModel


class SetPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


TERMINAL_SET_PHASES = frozenset({SetPhase.SUCCEEDED, SetPhase.FAILED})


class SetConditionType(StrEnum):
    """The conditions a SandboxTaskSet carries; each is set by the operator only."""

    COMPLETE = "Complete"
    """False (Running) while the set's tasks are being created and followed; True once the set
    is terminal, its reason naming the outcome."""


class SetReason(StrEnum):
    """CamelCase reasons for a set's conditions."""

    RUNNING = "Running"
    """The operator creates the set's tasks as earlier ones finish, parallelism at a time."""
    ALL_TASKS_FINISHED = "AllTasksFinished"
    """Every item-sample ran to a terminal phase and is counted; the set Succeeded whatever its
    tasks' answers (accuracy says how good they were)."""
    INVALID_SPEC = "InvalidSpec"
    """The spec or its items failed the operator's validation; the message names the field or
    the line. No task was created."""
    ITEMS_UNAVAILABLE = "ItemsUnavailable"
    """itemsFrom could not be read: the ConfigMap or its key is missing, or the store refused."""
    ITEMS_CHANGED = "ItemsChanged"
    """The items read now differ from those the set started with (itemsDigest): counting on
    would mix two sets' results, so the set stops."""
    TOO_MANY_INFRASTRUCTURE_FAILURES = "TooManyInfrastructureFailures"
    """More than failurePolicy.maxInfrastructureFailureFraction of at least minFinished finished
    tasks failed for infrastructure reasons; no more tasks are created."""
    FOREIGN_OBJECT = "ForeignObject"
    """A SandboxTask already exists under the name of one of the set's tasks, and it is not
    the set's (no controller owner reference to this set); the set stops rather than count it."""


class ItemTally(StatusModel):
    """An item some of whose samples are counted: how many, how many were scored, and how many
    of those passed (score 1); kept only until all its samples are counted, for pass@k."""

    index: int
    finished: int = 0
    scored: int = 0
    passed: int = 0


class SetProgress(StatusModel):
    """The operator's bookkeeping: enough to go on after a restart without the finished tasks."""

    created: int = Field(
        default=0,
        description=(
            "Tasks created so far, in order (item by item, an item's samples together): every "
            "task below this ordinal was created once."
        ),
    )
    folded: str = Field(
        default="",
        description='Ordinals of the tasks counted in this status, as ranges ("0-41,43").',
    )
    items_digest: str | None = Field(
        default=None, description="sha256 of the items the set started with."
    )
    score_sum: float = Field(default=0.0, description="Sum of the scores counted in accuracy.")
    cost_usd: float | None = Field(default=None, alias="costUSD", description="Unrounded cost.")
    open_items: list[ItemTally] = Field(
        default_factory=list, description="Items with samples still to count (for pass@k)."
    )
    pass_at_k_sums: dict[str, float] = Field(
        default_factory=dict, description="Per k: the sum of pass@k over the completed items."
    )
    pass_at_k_items: dict[str, int] = Field(
        default_factory=dict, description="Per k: how many completed items that sum is over."
    )


class SetUsage(StatusModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float | None = Field(default=None, alias="costUSD")


class TaskSetStatus(StatusModel):
    """Observed state of a SandboxTaskSet, written by the operator."""

    phase: SetPhase | None = Field(default=None, description="Pending, Running, Succeeded, Failed.")
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    message: str | None = Field(default=None, description="What happened, for a person.")
    items: int | None = Field(default=None, description="Items in the set.")
    tasks: int | None = Field(default=None, description="Items times samplesPerItem.")
    finished: int = Field(default=0, description="Tasks finished and counted here.")
    phases: dict[str, int] = Field(default_factory=dict, description="Finished tasks by phase.")
    exit_reasons: dict[str, int] = Field(
        default_factory=dict, description="Finished tasks by exitReason."
    )
    graded: int = Field(default=0, description="Finished tasks with a score (the model's own).")
    accuracy: float | None = Field(default=None, description="Mean score of the graded tasks.")
    pass_at_k: dict[str, float] = Field(
        default_factory=dict,
        alias="passAtK",
        description="Unbiased pass@k by k, over items with at least k graded samples.",
    )
    infrastructure_failures: int = Field(
        default=0,
        description="Finished tasks that failed for reasons not the model's; never graded.",
    )
    usage: SetUsage = Field(default_factory=SetUsage, description="Tokens and cost, summed.")
    start_time: str | None = Field(default=None, json_schema_extra=_TIMESTAMP)
    completion_time: str | None = Field(default=None, json_schema_extra=_TIMESTAMP)
    observed_generation: int | None = None
    progress: SetProgress = Field(default_factory=SetProgress)

    def to_api(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# -- ordinals as ranges -------------------------------------------------------------------------


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """ "0-41,43" as [(0, 41), (43, 43)]; a malformed part is skipped (the status is ours)."""
    ranges: list[tuple[int, int]] = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        try:
            ranges.append((int(first), int(last or first)))
        except ValueError:
            continue
    return sorted(ranges)


def format_ranges(ranges: list[tuple[int, int]]) -> str:
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def with_ordinal(ranges: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The ranges with `n` added, adjacent ranges merged."""
    points = [*ranges, (n, n)]
    points.sort()
    merged: list[tuple[int, int]] = []
    for a, b in points:
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def contains(ranges: list[tuple[int, int]], n: int) -> bool:
    return any(a <= n <= b for a, b in ranges)


def count(ranges: list[tuple[int, int]]) -> int:
    return sum(b - a + 1 for a, b in ranges)
