"""Who runs next: a global cap on running tasks and a limit per endpoint group
(endpoint_admission.py), the rest queued by priority, then age."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    uid: str
    namespace: str
    name: str
    priority: int
    created: str  # RFC3339; sorts correctly as text
    # The endpoint its agent calls, as the spec names it (None: the operator's default).
    base_url: str | None = None
    model: str | None = None


def _order(c: Candidate) -> tuple[int, str, str, str]:
    return (-c.priority, c.created, c.namespace, c.name)


def queue_order(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Higher priority first; among equals the older task; name breaks exact ties deterministically."""
    return sorted(candidates, key=_order)


def to_admit_within(
    waiting: Iterable[Candidate],
    slots: int | None,
    group_of: Callable[[Candidate], str],
    room: Mapping[str, int],
) -> list[Candidate]:
    """What walking the queue in order would admit: each candidate whose group has room left
    (`room`; a group absent from it has no limit of its own) while global `slots` remain (None:
    no global cap). A full group does not hold back the tasks of others behind it. Equal to
    that walk, without sorting the queue: a group's best `room` candidates, then the best
    `slots` of those."""
    unlimited: list[Candidate] = []
    grouped: dict[str, list[Candidate]] = {}
    for cand in waiting:
        group = group_of(cand)
        if group in room:
            grouped.setdefault(group, []).append(cand)
        else:
            unlimited.append(cand)
    pool = unlimited
    for group, cands in grouped.items():
        if room[group] > 0:
            pool.extend(heapq.nsmallest(room[group], cands, key=_order))
    if slots is None:
        return sorted(pool, key=_order)
    return heapq.nsmallest(max(0, slots), pool, key=_order) if slots > 0 else []


def positions(waiting: Iterable[Candidate]) -> dict[str, int]:
    """1-based place in the queue for each waiting task's uid."""
    return {c.uid: i for i, c in enumerate(queue_order(waiting), start=1)}
