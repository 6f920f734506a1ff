"""The SandboxTaskSet controller: a cache of sets and of their children not yet counted, and the
executor of `taskset_decisions.decide`'s actions. Children are ordinary SandboxTasks: the task
controller runs them (admission included); this one creates them and counts their results.

State is a cache of the API. The set's status records what was created and counted
(taskset_status.SetProgress), so a restarted operator lists the sets and their children once
(`prime`) and goes on; each set's events and its children's are handled under the set's lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .kube import TASKS, TASKSETS, ConflictError, KubeClient, KubeError
from .metrics import Metrics
from .taskset_children import (
    ChildState,
    child_result,
    foreign_child_problem,
    owning_set_uid,
)
from .taskset_decisions import (
    CreateChildren,
    DeleteSet,
    Items,
    ItemsView,
    SetAction,
    SetRecord,
    WriteSetStatus,
    decide,
    expiry,
    fail,
    progress,
)
from .taskset_items import load_items
from .taskset_status import SetReason, contains, parse_ranges

log = logging.getLogger("sandbox_operator")

_DELETED_KEPT = 10_000
"""Deleted sets' uids remembered until their DELETED event (a missed one stays till evicted)."""


def _now() -> datetime:
    return datetime.now(UTC)


class TaskSetController:
    def __init__(self, kube: KubeClient, metrics: Metrics) -> None:
        self.kube = kube
        self.metrics = metrics
        self.sets: dict[str, SetRecord] = {}
        # Per set uid: its children not yet counted, by name (finished ones with their result).
        self.children: dict[str, dict[str, ChildState]] = {}
        # Per set uid: its items as read (read again after a restart, checked by digest).
        self._items: dict[str, Items] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._expiry_timers: dict[str, asyncio.TimerHandle] = {}
        self._background: set[asyncio.Task[None]] = set()
        # Per set uid: unfinished children the start-up list showed that no event has shown
        # since. One deleted before the watch began gets no event: resync asks for it.
        self._unconfirmed: dict[str, set[str]] = {}
        # Uids of sets this operator deleted (TTL): events written before the deletion may still
        # be queued behind it, and one of them must not bring the set back (create children of
        # a deleted set). Kept until the set's DELETED event, at most _DELETED_KEPT of them.
        self._deleted: dict[str, None] = {}

    def _lock(self, uid: str) -> asyncio.Lock:
        return self._locks.setdefault(uid, asyncio.Lock())

    async def prime(self, namespaces: list[str]) -> None:
        """Every set and every set's child, read once, so that a child missing from the API is
        known to be gone (and not merely unseen yet)."""
        scopes: list[str | None] = list(namespaces) or [None]
        for ns in scopes:
            try:
                sets = await self.kube.list(TASKSETS, ns)
            except KubeError as exc:
                if exc.status != 404:
                    raise
                # An operator upgraded before its CRDs: tasks run, sets wait for their CRD.
                log.warning(
                    "the SandboxTaskSet CRD is not installed (kubectl apply -f "
                    "manifests/crd-taskset.yaml); task sets are served once it is"
                )
                return
            for body in sets:
                self.sets[body["metadata"]["uid"]] = SetRecord.parse(body)
            for task in await self.kube.list(TASKS, ns):
                set_uid = self._remember_child(task, deleted=False)
                child = self.children.get(set_uid or "", {}).get(task["metadata"]["name"])
                if set_uid is not None and child is not None and child.result is None:
                    self._unconfirmed.setdefault(set_uid, set()).add(child.name)

    # -- events ------------------------------------------------------------------------------

    async def on_set(self, event_type: str | None, body: dict[str, Any]) -> None:
        uid = body["metadata"]["uid"]
        if event_type == "DELETED":
            self._forget(uid)
            self._deleted.pop(uid, None)
            return
        if uid in self._deleted:
            return
        incoming = SetRecord.parse(body)
        known = self.sets.get(uid)
        if known is None or progress(incoming.status) >= progress(known.status):
            self.sets[uid] = incoming
        await self.reconcile(uid)

    async def on_task(self, event_type: str | None, body: dict[str, Any]) -> None:
        """A SandboxTask event: for a set's child, remembered; a finished one is counted."""
        set_uid = self._remember_child(body, deleted=event_type == "DELETED")
        if set_uid is None:
            return
        self._unconfirmed.get(set_uid, set()).discard(body["metadata"]["name"])
        child = self.children.get(set_uid, {}).get(body["metadata"]["name"])
        if child is not None and child.result is not None:
            await self.reconcile(set_uid)

    def _remember_child(self, body: Mapping[str, Any], deleted: bool) -> str | None:
        set_uid = owning_set_uid(body)
        if set_uid is None or set_uid not in self.sets:
            # Sets are listed before their children at start, and children are created only
            # once their set is known: a child of an unknown set is one of a deleted set.
            return None
        meta = body["metadata"]
        known = self.children.setdefault(set_uid, {})
        previous = known.get(meta["name"])
        if previous is not None and previous.uid != meta["uid"] and deleted:
            return set_uid  # an older task of that name went away; the current one stays
        result = child_result(body, deleted)
        if previous is not None and previous.result is not None and result is None:
            return set_uid  # a stale event: the child had already finished
        known[meta["name"]] = ChildState(meta["name"], str(meta["uid"]), result)
        return set_uid

    def _remember_deleted(self, uid: str) -> None:
        self._deleted[uid] = None
        while len(self._deleted) > _DELETED_KEPT:
            del self._deleted[next(iter(self._deleted))]

    def _forget(self, uid: str) -> None:
        self.sets.pop(uid, None)
        self.children.pop(uid, None)
        self._items.pop(uid, None)
        self._unconfirmed.pop(uid, None)
        self._locks.pop(uid, None)
        timer = self._expiry_timers.pop(uid, None)
        if timer is not None:
            timer.cancel()

    async def resync(self) -> None:
        """Decide again for every set (called periodically): a plan cut short by an API error
        (a create refused, a store that did not answer) is retried."""
        await self._confirm_primed()
        for uid in list(self.sets):
            await self.reconcile(uid)

    async def _confirm_primed(self) -> None:
        """Children listed at start-up that no event has shown since (the watch lists what
        exists when it starts): each asked for once; one that is gone is forgotten, and the
        next decision counts it as cancelled (created, not there)."""
        for set_uid, names in list(self._unconfirmed.items()):
            rec = self.sets.get(set_uid)
            known = self.children.get(set_uid, {})
            for name in list(names):
                names.discard(name)
                if rec is None or name not in known:
                    continue
                found = await self.kube.get(TASKS, rec.ref.namespace, name)
                if found is None or found["metadata"].get("uid") != known[name].uid:
                    del known[name]
                else:
                    self._remember_child(found, deleted=False)
            if not names:
                self._unconfirmed.pop(set_uid, None)

    # -- deciding and acting -----------------------------------------------------------------

    async def reconcile(self, uid: str) -> None:
        async with self._lock(uid):
            rec = self.sets.get(uid)
            if rec is None:
                return
            try:
                items = await self._items_of(rec)
                actions = decide(rec, items, self.children.get(uid, {}), _now())
                await self._carry_out(rec, items, actions)
            except KubeError as exc:
                log.warning(
                    "set %s/%s: %s (retried by the next event or resync)",
                    rec.ref.namespace,
                    rec.ref.name,
                    exc,
                )
            else:
                if isinstance(items, ItemsView):
                    self._drop_counted(uid, items)
            self._schedule_expiry(uid)

    async def _items_of(self, rec: SetRecord) -> Items | None:
        if rec.terminal or rec.taskset is None:
            return None
        items = self._items.get(rec.ref.uid)
        if items is None:
            items = await load_items(rec.taskset, rec.ref.namespace, self.kube)
            self._items[rec.ref.uid] = items
        return items

    async def _carry_out(
        self, rec: SetRecord, items: Items | None, actions: list[SetAction]
    ) -> None:
        for action in actions:
            if isinstance(action, CreateChildren):
                problem = await self._create_children(rec, action)
                if problem is not None:
                    log.warning("set %s/%s: %s", rec.ref.namespace, rec.ref.name, problem)
                    await self._write(rec, fail(rec, SetReason.FOREIGN_OBJECT, problem, _now()))
                    return
            elif isinstance(action, WriteSetStatus):
                if not await self._write(rec, action):
                    return
            elif isinstance(action, DeleteSet):
                log.info("set %s/%s: TTL passed, deleting it", rec.ref.namespace, rec.ref.name)
                await self.kube.delete(TASKSETS, rec.ref.namespace, rec.ref.name, uid=rec.ref.uid)
                self._forget(rec.ref.uid)
                self._remember_deleted(rec.ref.uid)

    async def _create_children(self, rec: SetRecord, action: CreateChildren) -> str | None:
        """Create the children, one at a time in order; a 409 adopts the task found when it is
        the set's. The problem with a task in the way that is not the set's, or None."""
        known = self.children.setdefault(rec.ref.uid, {})
        for body in action.bodies:
            name = body["metadata"]["name"]
            try:
                created = await self.kube.create(TASKS, rec.ref.namespace, body)
            except ConflictError:
                found = await self.kube.get(TASKS, rec.ref.namespace, name)
                if found is None:
                    created = await self.kube.create(TASKS, rec.ref.namespace, body)
                else:
                    problem = foreign_child_problem(found, rec.ref)
                    if problem is not None:
                        return problem
                    created = found
            if name not in known or known[name].uid != created["metadata"]["uid"]:
                known[name] = ChildState(
                    name, str(created["metadata"]["uid"]), child_result(created, deleted=False)
                )
        return None

    async def _write(self, rec: SetRecord, action: WriteSetStatus) -> bool:
        try:
            updated = await self.kube.patch_status(
                TASKSETS, rec.ref.namespace, rec.ref.name, action.status.to_api()
            )
        except KubeError as exc:
            if exc.status == 404:
                self._forget(rec.ref.uid)
                self._remember_deleted(rec.ref.uid)
                return False
            raise
        self.sets[rec.ref.uid] = SetRecord.parse(updated)
        for tally in action.tallies:
            self.metrics.tasksets_completed.labels(result=tally.phase.value).inc()
        if self.sets[rec.ref.uid].terminal:
            # Nothing is counted for a finished set again: its children's states go.
            self.children.pop(rec.ref.uid, None)
            self._items.pop(rec.ref.uid, None)
        return True

    def _drop_counted(self, uid: str, items: ItemsView) -> None:
        """Counted children are in the status; their states are not needed any more."""
        rec = self.sets.get(uid)
        known = self.children.get(uid)
        if rec is None or not known:
            return
        folded = parse_ranges(rec.status.progress.folded)
        for name in [n for n in known if contains(folded, items.by_name.get(n, -1))]:
            del known[name]

    def _schedule_expiry(self, uid: str) -> None:
        rec = self.sets.get(uid)
        if rec is None or not rec.terminal or uid in self._expiry_timers:
            return
        when = expiry(rec)
        if when is None:
            return
        delay = max(0.0, (when - _now()).total_seconds())
        loop = asyncio.get_running_loop()

        def due() -> None:
            self._expiry_timers.pop(uid, None)
            task = loop.create_task(self.reconcile(uid))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        self._expiry_timers[uid] = loop.call_later(delay, due)
