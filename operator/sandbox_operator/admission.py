"""Who runs next: a global cap on running tasks, the rest queued by priority, then age."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    uid: str
    namespace: str
    name: str
    priority: int
    created: str  # RFC3339; sorts correctly as text


def _order(c: Candidate) -> tuple[int, str, str, str]:
    return (-c.priority, c.created, c.namespace, c.name)


def queue_order(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Higher priority first; among equals the older task; name breaks exact ties deterministically."""
    return sorted(candidates, key=_order)


def to_admit(waiting: Iterable[Candidate], running: int, max_running: int) -> list[Candidate]:
    """The first free-slots-many of the queue: O(n log slots), no sort of the whole queue."""
    slots = max(0, max_running - running)
    return heapq.nsmallest(slots, waiting, key=_order) if slots else []


def positions(waiting: Iterable[Candidate]) -> dict[str, int]:
    """1-based place in the queue for each waiting task's uid."""
    return {c.uid: i for i, c in enumerate(queue_order(waiting), start=1)}
