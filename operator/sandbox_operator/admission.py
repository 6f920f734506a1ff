"""Who runs next: a global cap on running tasks, the rest queued by priority, then age."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    uid: str
    namespace: str
    name: str
    priority: int
    created: str  # RFC3339; sorts correctly as text


def queue_order(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Higher priority first; among equals the older task; name breaks exact ties deterministically."""
    return sorted(candidates, key=lambda c: (-c.priority, c.created, c.namespace, c.name))


def to_admit(waiting: Iterable[Candidate], running: int, max_running: int) -> list[Candidate]:
    slots = max(0, max_running - running)
    return queue_order(waiting)[:slots]


def positions(waiting: Iterable[Candidate]) -> dict[str, int]:
    """1-based place in the queue for each waiting task's uid."""
    return {c.uid: i for i, c in enumerate(queue_order(waiting), start=1)}
