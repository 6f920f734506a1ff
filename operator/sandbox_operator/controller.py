"""The operator's state and the executor of its decisions (decisions.py).

kopf watches SandboxTasks and their pods and calls `Operator.on_task` / `Operator.on_pod`. The
operator keeps what the API told it (`TaskRecord`s, the tasks' pods), gathers the facts a
decision needs (a pod the watch has not shown yet, a Secret's labels), calls a pure function
in decisions.py, and carries out the actions it returns, in order. All writes go through
KubeClient. Every step may run twice (a restart, a repeated watch event): pods and ConfigMaps
have deterministic names, so a second create is a 409, and the object found is adopted only once
it is verified to be the one the operator would make (ownership.py).

Trust: a pod's report counts for a task only when the pod is in the task's namespace, has a
controller owner reference to the task, and has the uid recorded in `status.podUID` when the
operator created it. Anyone who can create pods can copy a task pod's labels; nobody else can
make the API server hand out a uid the operator recorded.

Crash safety (the operator may be killed between any two API calls). The decisions put their
actions in this order, and `_carry_out` keeps it, stopping at a write that finds the task gone:

- The status is written before the step it records is acted on (a retry's attempt before its
  pod, the terminal phase before a stuck pod is deleted), so a restarted operator re-derives from
  the API what is left to do and never re-runs a step whose effect it cannot see. The one step
  recorded after it is acted on is the first attempt: its pod is created, then the status names
  it (one write instead of two on every task's path). The pod, with its deterministic name and
  its owner reference, is itself the record: a task still new or Queued with a pod of its first
  attempt holds a run slot (`_store`) and has that pod adopted (`decide.follow_pod`).
- A terminal phase is final: nothing writes a task's status again once it is terminal.
- Metrics count transitions, and only the process whose status write made the transition counts
  it, after the write succeeded (a `WriteStatus`'s tallies). A restarted operator that finds a
  task already queued, running or terminal counts nothing for it. So counters summed over
  operator processes never exceed the transitions in the API; a kill between a write and its
  count loses that count (Prometheus counters restart from zero with the process anyway), it
  never doubles one.

Locks. Each task has an asyncio.Lock, held while its events are handled and its actions
carried out, so one task's decisions never interleave; a coroutine holds at most one task lock
at a time. Each namespace has a policy lock (policy_keeper.py), the innermost: taken with a
task lock held or none, and nothing is taken while it is held. Run slots need no lock: a slot
is reserved (`_reserve`) in the same synchronous step that finds it free, with no await in
between, and the event loop runs one step at a time; the reservation counts as running until
the attempt's status write lands (or fails), whatever the watch brings meanwhile. A task that
must wait holds its queue place the same way while its Queued write is in flight, so the next
task's position counts it.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from sandbox_agent.result import TERMINAL_PHASES, ExitReason, Phase

from . import decisions as decide
from .admission import Candidate, positions, to_admit_within
from .cluster_checks import resolve_api_key_secret
from .decisions import (
    Action,
    Admitted,
    Completed,
    DeletePod,
    Enqueue,
    ReadReportFromLog,
    Reconcile,
    Retried,
    StartAttempt,
    Started,
    Tally,
    WriteStatus,
)
from .endpoint_admission import EndpointAdmission
from .endpoints import secret_label_problem
from .errors import SpecError
from .kube import TASKS, ConflictError, KubeClient, KubeError
from .metadata import MANAGED_SELECTOR
from .metrics import Metrics
from .ownership import claim_problem, foreign_configmap_problem
from .pod_builder import build_attempt, pod_name
from .policy_keeper import PolicyKeeper
from .records import PodBody, TaskRecord, is_stale, pod_may_run, pod_task_uid
from .settings import OperatorSettings
from .status import Reason

log = logging.getLogger("sandbox_operator")

_LOG_TAIL_LINES = 20
# A finished task whose delete failed (an API hiccup, RBAC) is tried again this much later.
_EXPIRY_RETRY_SECONDS = 60
# Finished tasks deleted at once, at most (see `Operator.delete_expired`).
_EXPIRY_CONCURRENCY = 8
# How long an API-key Secret found labelled is trusted without being read again.
SECRET_VERDICT_SECONDS = 5.0


def _now() -> datetime:
    return datetime.now(UTC)


class Operator:
    """All state is a cache of the API; losing it (a restart) loses nothing."""

    def __init__(self, settings: OperatorSettings, kube: KubeClient) -> None:
        self.settings = settings
        self.kube = kube
        self.tasks: dict[str, TaskRecord] = {}
        self.pods: dict[str, PodBody] = {}  # by pod uid
        self._pods_by_task: dict[str, set[str]] = {}  # task uid -> pod uids
        self._locks: dict[str, asyncio.Lock] = {}
        self.policies = PolicyKeeper(settings, kube)
        # API-key Secrets found labelled as allowed: (namespace, name) -> until when (loop time).
        self._allowed_secrets: dict[tuple[str, str], float] = {}
        # Pods refused as not their task's, by uid: each is logged once, not at every event.
        self._refused_pods: set[str] = set()
        # Per task: the resourceVersion a finished plan left (see `_settle`).
        self._settled: dict[str, str] = {}
        self._written: dict[str, str] = {}  # the version each task's last status write returned
        # Admission state, kept in step with `tasks` by `_remember` (see the module docstring).
        self._active: set[str] = set()
        self._queued: set[str] = set()
        self._reserved: set[str] = set()  # slots held by starts in flight
        self._joining: set[str] = set()  # queue places held by Queued writes in flight
        # Limits per endpoint group (endpoint_admission.py), and when this process admitted
        # each active task (monotonic): what a finished task teaches depends on it.
        self.endpoints = EndpointAdmission(settings.endpoint_limits, settings.adaptive_admission)
        self._admitted_at: dict[str, float] = {}
        # Finished tasks with a TTL: (when, uid) in a heap, and each one's latest `when`.
        self._expiring: list[tuple[datetime, str]] = []
        self._expiry_of: dict[str, datetime] = {}
        self.expiry_changed = asyncio.Event()
        self.metrics = Metrics(
            self.count_by_phase, settings.max_running_tasks, endpoint_limits=self.endpoint_limits
        )

    # -- the cache ---------------------------------------------------------------------------

    def count_by_phase(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for rec in self.tasks.values():
            counts[(rec.phase or Phase.PENDING).value] += 1
        return dict(counts)

    def _lock(self, uid: str) -> asyncio.Lock:
        return self._locks.setdefault(uid, asyncio.Lock())

    def _phase(self, uid: str) -> Phase | None:
        rec = self.tasks.get(uid)
        return rec.phase if rec is not None else None

    async def prime(self, namespaces: list[str]) -> None:
        """Read every task and managed pod once, so admission counts right from the first event."""
        scopes: list[str | None] = list(namespaces) or [None]
        for ns in scopes:
            for body in await self.kube.list(TASKS, ns):
                self._remember(body)
            for pod in await self.kube.list("pods", ns, MANAGED_SELECTOR):
                if self._claimed(pod):
                    self._keep_pod(pod)

    def _remember(self, body: dict[str, Any]) -> TaskRecord:
        """Cache a task, parsed, and keep the admission sets in step (O(1) per change)."""
        rec = TaskRecord.parse(body, self.tasks.get(body["metadata"]["uid"]))
        self._store(rec)
        return rec

    def _store(self, rec: TaskRecord) -> None:
        uid = rec.uid
        self.tasks[uid] = rec
        self._active.discard(uid)
        self._queued.discard(uid)
        if uid in self._reserved or rec.phase in decide.ACTIVE or self._unrecorded_pod(rec):
            self._active.add(uid)
        elif uid in self._joining or rec.phase is Phase.QUEUED:
            self._queued.add(uid)
        elif rec.phase in TERMINAL_PHASES:
            self._admitted_at.pop(uid, None)
            # A finished task's pods are never looked at again.
            for pod_uid in self._pods_by_task.pop(uid, set()):
                self.pods.pop(pod_uid, None)
            self._schedule_expiry(rec)

    def _unrecorded_pod(self, rec: TaskRecord) -> bool:
        """Whether a task not admitted by its status has a pod: a first attempt's pod made by a
        start cut short before its status write (see the module docstring). It runs, so it
        holds a slot until it is adopted."""
        return rec.phase in (None, Phase.QUEUED) and rec.uid in self._pods_by_task

    def _schedule_expiry(self, rec: TaskRecord) -> None:
        when = decide.expiry(rec, self.settings)
        if when is None or self._expiry_of.get(rec.uid) == when:
            return
        self._expiry_of[rec.uid] = when
        heapq.heappush(self._expiring, (when, rec.uid))
        self.expiry_changed.set()

    async def delete_expired(self, now: datetime | None = None) -> float | None:
        """Delete the finished tasks whose TTL has passed (owner references take their pods
        and ConfigMaps), a few at a time; the seconds until the next one is due, None when none
        is waiting. One by one, deletes would fall behind a cluster finishing tasks faster than
        the API server answers one, and the finished tasks waiting would pile up."""
        now = now or _now()
        due: list[TaskRecord] = []
        while self._expiring and self._expiring[0][0] <= now:
            when, uid = heapq.heappop(self._expiring)
            rec = self.tasks.get(uid)
            if rec is not None and self._expiry_of.get(uid) == when:
                due.append(rec)  # else gone already, or due at another time now
        gate = asyncio.Semaphore(_EXPIRY_CONCURRENCY)

        async def delete(rec: TaskRecord) -> None:
            async with gate:
                try:
                    await self.kube.delete(TASKS, rec.namespace, rec.name, uid=rec.uid)
                except KubeError as exc:
                    log.warning(
                        "deleting finished task %s/%s failed (tried again in %d s): %s",
                        rec.namespace, rec.name, _EXPIRY_RETRY_SECONDS, exc,
                    )  # fmt: skip
                    again = now + timedelta(seconds=_EXPIRY_RETRY_SECONDS)
                    self._expiry_of[rec.uid] = again
                    heapq.heappush(self._expiring, (again, rec.uid))
                    return
                self._expiry_of.pop(rec.uid, None)

        await asyncio.gather(*(delete(rec) for rec in due))
        if not self._expiring:
            return None
        return max(0.0, (self._expiring[0][0] - now).total_seconds())

    def _forget(self, uid: str) -> None:
        self.tasks.pop(uid, None)
        self._expiry_of.pop(uid, None)
        self._active.discard(uid)
        self._queued.discard(uid)
        self._reserved.discard(uid)
        self._joining.discard(uid)
        self._settled.pop(uid, None)
        self._written.pop(uid, None)
        self._admitted_at.pop(uid, None)

    def _keep_pod(self, pod: PodBody) -> None:
        pod_uid = str(pod["metadata"]["uid"])
        uid = pod_task_uid(pod)
        self.pods[pod_uid] = pod
        first = uid not in self._pods_by_task
        self._pods_by_task.setdefault(uid, set()).add(pod_uid)
        self._recount(uid, first)

    def _drop_pod(self, pod: PodBody) -> None:
        pod_uid = str(pod["metadata"]["uid"])
        uid = pod_task_uid(pod)
        self.pods.pop(pod_uid, None)
        owned = self._pods_by_task.get(uid)
        if owned is not None:
            owned.discard(pod_uid)
            if not owned:
                del self._pods_by_task[uid]
                self._recount(uid, True)

    def _recount(self, uid: str, changed: bool) -> None:
        """Count a task not admitted by its status again when it gained its first pod or lost
        its last (`_unrecorded_pod`)."""
        rec = self.tasks.get(uid)
        if changed and rec is not None and rec.phase in (None, Phase.QUEUED):
            self._store(rec)

    def _pods_of(self, uid: str) -> list[PodBody]:
        return [self.pods[p] for p in self._pods_by_task.get(uid, ()) if p in self.pods]

    def _known_pod(self, uid: str, name: str) -> PodBody | None:
        """The task's pod of that name, if the watch has shown it."""
        return next((p for p in self._pods_of(uid) if p["metadata"]["name"] == name), None)

    def _claimed(self, pod: PodBody) -> bool:
        """Whether the pod belongs to the task its label names: same namespace, and the task as
        its controller owner. Labels alone prove nothing (anyone can copy them)."""
        uid = pod_task_uid(pod)
        rec = self.tasks.get(uid) if uid else None
        if rec is None:
            return False
        problem = claim_problem(pod, namespace=rec.namespace, task_uid=uid)
        if problem is None:
            return True
        meta = pod["metadata"]
        if meta["uid"] not in self._refused_pods:
            self._refused_pods.add(meta["uid"])
            log.warning(
                "ignoring pod %s/%s that claims task %s/%s: %s",
                meta.get("namespace"),
                meta.get("name"),
                rec.namespace,
                rec.name,
                problem,
            )
        return False

    # -- events ------------------------------------------------------------------------------

    async def on_task(self, event_type: str | None, body: dict[str, Any]) -> None:
        uid = body["metadata"]["uid"]
        if event_type == "DELETED":
            namespace = body["metadata"].get("namespace", "default")
            pods = self._pods_of(uid)
            self._forget(uid)
            self._locks.pop(uid, None)
            # Owner references garbage-collect the pod too; deleting it now frees the slot sooner.
            for pod in pods:
                await self._delete_pod(namespace, pod["metadata"]["name"])
        elif not _settled_version(self._settled.get(uid), body):
            known = self.tasks.get(uid)
            incoming = TaskRecord.parse(body, known)
            if known is None or not is_stale(incoming, known):
                self._store(incoming)
            async with self._lock(uid):
                await self._reconcile(uid)
                self._settle(uid)
        await self.admit()

    async def on_pod(self, event_type: str | None, pod: dict[str, Any]) -> None:
        deleted = event_type == "DELETED"
        if not self._claimed(pod):
            self._drop_pod(pod)
            if deleted:
                self._refused_pods.discard(pod["metadata"]["uid"])
            return
        uid = pod_task_uid(pod)
        finished = self._phase(uid) in TERMINAL_PHASES
        if deleted or finished:
            self._drop_pod(pod)
        else:
            self._keep_pod(pod)
        async with self._lock(uid):
            rec = self.tasks.get(uid)
            if rec is not None and not deleted and rec.phase in TERMINAL_PHASES:
                await self._carry_out(uid, decide.reap(pod))
            elif rec is not None:
                actions = decide.follow_pod(
                    rec,
                    pod,
                    deleted=deleted,
                    pods=self._pods_of(uid),
                    now=_now(),
                    settings=self.settings,
                )
                await self._carry_out(uid, actions)
            self._settle(uid)
        await self.admit()

    def _settle(self, uid: str) -> None:
        """A plan for the task ran to its end: the version its last status write made needs no
        decision again.

        Most task events are the echoes of the operator's own status writes, and the plan that
        wrote one went on with all it knew, so an event carrying exactly that version
        (resourceVersion compared for equality, nothing more) is skipped. Only a version the
        operator's own write returned counts: one read from a list or an event was never
        decided over by a plan that knew it. A plan cut short by an error settles nothing: the
        echo of its last write decides again, which is how a failed step is retried. A
        restarted operator has settled nothing."""
        rec = self.tasks.get(uid)
        written = self._written.get(uid)
        if rec is not None and written and rec.resource_version == written:
            self._settled[uid] = written

    # -- gathering facts, then deciding ------------------------------------------------------

    async def _reconcile(self, uid: str) -> None:
        rec = self.tasks.get(uid)
        if rec is None:
            return
        if rec.phase in decide.ACTIVE:
            pod = await self._current_pod(rec)
        else:
            # A first attempt's pod the status does not record yet, if the watch has shown one.
            pod = self._known_pod(uid, pod_name(rec.name, 1))
        await self._carry_out(uid, decide.reconcile(rec, pod, _now(), self.settings))

    async def _current_pod(self, rec: TaskRecord) -> PodBody | None:
        """The current attempt's pod: its name, claimed by the task, and once recorded its uid.
        A pod that took the name of the recorded one after it was deleted is not it."""
        name = rec.status.pod_name
        if not name:
            return None
        pod = self._known_pod(rec.uid, name)
        if pod is None:
            # Not seen by the watch (yet): ask the API before concluding anything.
            pod = await self.kube.get("pods", rec.namespace, name)
            if pod is None or not self._claimed(pod):
                return None
        if rec.status.pod_uid is not None and pod["metadata"]["uid"] != rec.status.pod_uid:
            return None
        return pod

    # -- admission ---------------------------------------------------------------------------

    def _waiting(self) -> list[Candidate]:
        return [self.tasks[uid].candidate for uid in self._queued]

    def _group(self, cand: Candidate) -> str:
        """The endpoint group of a task (its base URL and model, the operator's by default)."""
        base_url = cand.base_url or self.settings.default_base_url or ""
        return self.endpoints.group_of(base_url, cand.model or self.settings.default_model or "")

    def _running_by_group(self) -> Counter[str]:
        running: Counter[str] = Counter()
        for uid in self._active:
            rec = self.tasks.get(uid)
            if rec is not None and rec.queue_entry is not None:
                running[self._group(rec.queue_entry)] += 1
        return running

    def endpoint_limits(self) -> list[tuple[str, int | None, int]]:
        """Each endpoint group's limit (its own or the global cap, the lower; None: neither)
        and running tasks, for the metrics."""
        running = self._running_by_group()
        cap = self.settings.max_running_tasks or None
        found = []
        for name, limit in self.endpoints.limits():
            if cap is not None:
                limit = cap if limit is None else min(limit, cap)
            found.append((name, limit, running.get(name, 0)))
        return found

    def _choose(self, waiting: list[Candidate]) -> list[Candidate]:
        """Who of `waiting` to admit now: within the global cap (0: none) and each endpoint
        group's limit."""
        cap = self.settings.max_running_tasks
        slots = max(0, cap - len(self._active)) if cap > 0 else None
        room = self.endpoints.free(self._running_by_group())
        return to_admit_within(waiting, slots, self._group, room)

    def _why_waiting(self, cand: Candidate, chosen: list[Candidate]) -> decide.Waiting:
        """What a task not chosen waits for: a global run slot, else its endpoint group."""
        cap = self.settings.max_running_tasks
        if cap > 0 and len(chosen) >= cap - len(self._active):
            return decide.Waiting(cap)
        group = self._group(cand)
        limit = self.endpoints.limit(group)
        if limit is None:
            return decide.Waiting(cap)
        return decide.Waiting(cap, group, limit, self._running_by_group().get(group, 0))

    def _reserve(self, uid: str) -> None:
        """Hold a run slot for `uid` until `_release`; synchronous, see the module docstring."""
        self._admitted_at.setdefault(uid, time.monotonic())
        self._reserved.add(uid)
        self._queued.discard(uid)
        self._active.add(uid)

    def _join_queue(self, uid: str) -> None:
        """Hold a place in the queue for `uid` until `_release`, so that the next task's
        position counts it while its Queued write is in flight."""
        self._joining.add(uid)
        self._queued.add(uid)

    def _release(self, uid: str, hold: set[str]) -> None:
        """End a hold (`_reserved` or `_joining`) and count the task by its phase again (a task
        forgotten meanwhile was taken out of every set by `_forget`)."""
        hold.discard(uid)
        rec = self.tasks.get(uid)
        if rec is not None:
            self._store(rec)

    def _enqueue(self, rec: TaskRecord) -> tuple[list[Action], set[str]]:
        """A new valid task: straight to a slot when one is free and nobody waits ahead, else
        queued. Either way its slot or its queue place is held at once: the actions, and the
        hold to release after them."""
        me = rec.candidate
        waiting = [*self._waiting(), me]
        chosen = self._choose(waiting)
        now = _now()
        if me in chosen:
            self._reserve(rec.uid)
            return [decide.admit_now(rec, now)], self._reserved
        place = positions(waiting)[rec.uid]
        self._join_queue(rec.uid)
        return [decide.queued_status(place, self._why_waiting(me, chosen), now)], self._joining

    async def admit(self) -> None:
        """Fill free slots from the queue (priority, then age)."""
        limit = self.settings.max_running_tasks
        if not self._queued or 0 < limit <= len(self._active):
            return
        chosen = self._choose(self._waiting())
        for cand in chosen:
            self._reserve(cand.uid)
        for cand in chosen:
            try:
                async with self._lock(cand.uid):
                    rec = self.tasks.get(cand.uid)
                    if rec is not None and rec.phase is Phase.QUEUED:
                        await self._carry_out(cand.uid, [decide.admit_now(rec, _now())])
                        self._settle(cand.uid)
            finally:
                self._release(cand.uid, self._reserved)

    async def refresh_queue_positions(self, head: int = 100) -> int:
        """Rewrite queuePosition where the queue has moved; only the first `head` places, so a
        long queue costs at most `head` writes per refresh. Returns how many were written."""
        written = 0
        for uid, place in positions(self._waiting()).items():
            if place > head:
                continue
            async with self._lock(uid):
                rec = self.tasks.get(uid)
                if rec is None or rec.phase is not Phase.QUEUED:
                    continue
                if rec.status.queue_position == place:
                    continue
                status = rec.status.model_copy(update={"queue_position": place})
                if await self._carry_out(uid, [WriteStatus(status)]):
                    written += 1
        return written

    async def fail_pods_that_never_start(self) -> int:
        """Fail active tasks whose pod has been Pending past the start timeout; called
        periodically. Returns how many were failed."""
        if self.settings.pod_start_timeout_seconds <= 0:
            return 0
        failed = 0
        for uid in list(self._active):
            async with self._lock(uid):
                rec = self.tasks.get(uid)
                if rec is None:
                    continue
                for pod in self._pods_of(uid):
                    actions = decide.start_timeout(rec, pod, _now(), self.settings)
                    if actions:
                        await self._carry_out(uid, actions)
                        failed += 1
                        break
        if failed:
            await self.admit()
        return failed

    # -- the executor ------------------------------------------------------------------------

    async def _carry_out(self, uid: str, actions: list[Action]) -> bool:
        """Carry out the actions in order; False when a write found the task gone (the rest is
        then left undone: nothing is left to act for)."""
        for action in actions:
            rec = self.tasks.get(uid)
            if rec is None:
                return False
            if isinstance(action, WriteStatus):
                if not await self._write_status(rec, action):
                    return False
            elif isinstance(action, DeletePod):
                await self._delete_pod(rec.namespace, action.name)
            elif isinstance(action, StartAttempt):
                if not await self._start_attempt(rec, action):
                    return False
            elif isinstance(action, ReadReportFromLog):
                await self._carry_out(uid, await self._report_from_log(rec, action.pod))
            elif isinstance(action, Enqueue):
                if uid in self._queued or uid in self._active:
                    continue  # already waiting or starting (a repeated event)
                plan, hold = self._enqueue(rec)
                try:
                    await self._carry_out(uid, plan)
                finally:
                    self._release(uid, hold)
            elif isinstance(action, Reconcile):
                await self._reconcile(uid)
        return True

    def _count(self, tally: Tally, learn: tuple[str, int, float] | None = None) -> None:
        """Count a transition; a finished task's usage also teaches its endpoint group
        (`learn`: the group, how many of it were active, itself included, and when the task
        was admitted)."""
        m = self.metrics
        if isinstance(tally, Admitted):
            m.queue_wait.observe(tally.queued_seconds)
        elif isinstance(tally, Started):
            m.pod_startup.observe(tally.startup_seconds)
        elif isinstance(tally, Retried):
            m.retries.labels(exit_reason=tally.exit_reason.value).inc()
        elif isinstance(tally, Completed):
            result = tally.result
            m.completed.labels(phase=result.phase.value, exit_reason=result.exit_reason.value).inc()
            if tally.run_seconds is not None:
                m.run_duration.observe(max(0.0, tally.run_seconds))
            m.record_result(tally.model, result, tally.cost_usd)
            if learn is not None:
                group, running, admitted = learn
                if self.endpoints.observe(group, result.usage, admitted, running, time.monotonic()):
                    log.info(
                        "endpoint %s: admission limit now %s (its agents reported %d 429s)",
                        group, self.endpoints.limit(group), result.usage.llm_throttled,
                    )  # fmt: skip

    async def _write_status(self, rec: TaskRecord, action: WriteStatus) -> bool:
        """Merge-patch the status; False when the task no longer exists."""
        patch: dict[str, Any] = action.status.to_api()
        for name in action.clear:
            patch.setdefault(name, None)
        learn: tuple[str, int, float] | None = None
        if rec.queue_entry is not None and any(isinstance(t, Completed) for t in action.tallies):
            # Taken before the write: a terminal record is out of the active set and the queue.
            # A task admitted by an earlier operator process counts as admitted long ago.
            group = self._group(rec.queue_entry)
            running = max(1, self._running_by_group().get(group, 0))
            learn = (group, running, self._admitted_at.get(rec.uid, 0.0))
        try:
            updated = await self.kube.patch_status(TASKS, rec.namespace, rec.name, patch)
        except KubeError as exc:
            if exc.status == 404:
                self._forget(rec.uid)
                return False
            raise
        # The watch will bring this too; caching it now keeps admission counts exact.
        self._written[rec.uid] = self._remember(updated).resource_version
        for tally in action.tallies:
            self._count(tally, learn)
        return True

    async def _finish(
        self, rec: TaskRecord, reason: ExitReason, message: str, cause: Reason | None = None
    ) -> None:
        write = decide.finish_without_run(rec, reason, message, _now(), self.settings, cause)
        await self._carry_out(rec.uid, [write])

    async def _report_from_log(self, rec: TaskRecord, pod: PodBody) -> list[Action]:
        meta = pod["metadata"]
        try:
            text = await self.kube.pod_log(
                meta["namespace"], meta["name"], "agent", _LOG_TAIL_LINES
            )
        except KubeError as exc:
            return decide.unreadable_report(rec, pod, str(exc), _now(), self.settings)
        return decide.report_from_log(rec, pod, text, _now(), self.settings)

    async def _start_attempt(self, rec: TaskRecord, action: StartAttempt) -> bool:
        """Carry out a StartAttempt (see its docstring). False when the task is gone."""
        task = rec.task
        if task is None:  # a spec that stopped parsing since admission
            await self._finish(rec, ExitReason.INVALID_SPEC, rec.why_no_spec)
            return True
        missing = await self._missing_config_map(rec)
        if missing:
            await self._finish(rec, ExitReason.CONFIG_ERROR, missing)
            return True
        try:
            pod, configmap = build_attempt(
                task,
                namespace=rec.namespace,
                uid=rec.uid,
                attempt=action.attempt,
                settings=self.settings,
            )
        except SpecError as exc:
            # Valid at admission, but the operator's settings changed before this attempt.
            await self._finish(rec, ExitReason.INVALID_SPEC, str(exc))
            return True
        refused = await self._api_key_secret_problem(rec)
        if refused is not None:
            await self._finish(rec, ExitReason.CONFIG_ERROR, *refused)
            return True
        if action.status is not None and not action.after_pod:
            write = WriteStatus(action.status, clear=decide.ATTEMPT_CLEARS, tallies=action.tallies)
            if not await self._write_status(rec, write):
                return False  # the task was deleted meanwhile: nothing to run
            rec = self.tasks[rec.uid]
        name = pod["metadata"]["name"]
        if any(p["metadata"]["name"] != name and pod_may_run(p) for p in self._pods_of(rec.uid)):
            # The previous attempt's pod is still shutting down (a deleted pod keeps running for
            # its grace period). Its DELETED event brings `follow_pod` back here (Reconcile), so
            # one task never has two pods running at once.
            return True
        try:
            await self.policies.for_task(task, rec.namespace, rec.uid)
            if configmap is not None and not await self._ensure_task_configmap(rec, configmap):
                return True
            placed = await self._place_pod(pod)
        except KubeError as exc:
            log.warning("creating the pod for %s/%s failed: %s", rec.namespace, rec.name, exc)
            await self._finish(
                rec,
                ExitReason.CONFIG_ERROR,
                f"the operator could not create the pod: {exc.message}",
            )
            return True
        if placed is not None:
            # A failed write here propagates: the pod exists, and its next event adopts it.
            await self._record_pod(rec.uid, pod, *placed, action if action.after_pod else None)
        return True

    async def _missing_config_map(self, rec: TaskRecord) -> str | None:
        """A pod whose ConfigMap volume is missing would wait in ContainerCreating until its
        deadline with no status to show why; checking first names the problem at once."""
        assert rec.task is not None
        for i, item in enumerate(rec.task.spec.inputs):
            ref = item.config_map_ref
            if ref is None:
                continue
            found = await self.kube.get("configmaps", rec.namespace, ref.name)
            where = f"spec.inputs[{i}].configMapRef"
            if found is None:
                return (
                    f'{where}: configmap "{ref.name}" not found in namespace {rec.namespace}; '
                    "create it before the task"
                )
            if ref.key is not None and ref.key not in (found.get("data") or {}) | (
                found.get("binaryData") or {}
            ):
                return f'{where}: configmap "{ref.name}" has no key {ref.key!r}'
        return None

    async def _api_key_secret_problem(self, rec: TaskRecord) -> tuple[str, Reason] | None:
        """Why the task's API-key Secret may not go into its pod: missing, or without the
        operator's API-key label. Only its metadata is read (never its data)."""
        assert rec.task is not None
        ref = resolve_api_key_secret(rec.task, self.settings)
        where = (
            "spec.model.apiKeySecretRef"
            if rec.task.spec.model.api_key_secret_ref is not None
            else "the operator's default API key (LLMSANDBOX_DEFAULT_API_KEY_SECRET)"
        )
        key = (rec.namespace, ref.name)
        now = asyncio.get_running_loop().time()
        if self._allowed_secrets.get(key, 0.0) > now:
            return None
        found = await self.kube.get_metadata("secrets", rec.namespace, ref.name)
        if found is None:
            return (
                f'{where}: secret "{ref.name}" not found in namespace {rec.namespace}; create it '
                "before the task",
                Reason.CONFIG_MISSING,
            )
        problem = secret_label_problem(found, self.settings.api_key_secret_label)
        if problem is not None:
            return f"{where}: {problem}", Reason.SECRET_NOT_ALLOWED
        # Only a Secret found allowed is remembered, and only briefly: a burst of tasks with one
        # key reads it once, a label removed holds back new pods within seconds.
        self._allowed_secrets[key] = now + SECRET_VERDICT_SECONDS
        return None

    async def _create(
        self, resource: str, namespace: str, obj: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The created object, or None when one of that name exists (to verify, then adopt)."""
        try:
            return await self.kube.create(resource, namespace, obj)
        except ConflictError:
            return None

    async def _place_pod(self, pod: dict[str, Any]) -> tuple[PodBody, bool] | None:
        """Create the attempt's pod: the pod and True; or the one found under its name (ours
        from a run cut short, or someone else's, to verify) and False; None when the one in the
        way vanished twice."""
        meta = pod["metadata"]
        for _ in range(2):  # a second round only when the pod in the way vanished meanwhile
            created = await self._create("pods", meta["namespace"], pod)
            if created is not None:
                return created, True
            found = await self.kube.get("pods", meta["namespace"], meta["name"])
            if found is not None:
                return found, False
        return None

    async def _record_pod(
        self,
        uid: str,
        desired: PodBody,
        pod: PodBody,
        created: bool,
        start: StartAttempt | None,
    ) -> None:
        """Record the attempt's pod uid (with `start`'s status when it is written after the pod,
        see `StartAttempt`). A pod found instead of created is verified, then adopted and
        followed, or the task fails naming what differs."""
        current = self.tasks.get(uid)
        if current is None:
            return  # the task was deleted meanwhile; its pod goes with it (owner reference)
        if created:
            # Known now, so a status event that outruns the pod's ADDED needs no API read.
            self._keep_pod(pod)
            await self._carry_out(uid, [decide.record_pod(current, pod, start)])
            return
        write, adopted = decide.adopt_pod(current, pod, desired, _now(), self.settings, start=start)
        if not adopted:
            await self._carry_out(uid, [write])
            return
        if self._claimed(pod):
            self._keep_pod(pod)
        if not await self._carry_out(uid, [write]):
            return
        # It may have run, even ended, before this process knew it: follow it now.
        follow = decide.follow_pod(
            self.tasks[uid],
            pod,
            deleted=False,
            pods=self._pods_of(uid),
            now=_now(),
            settings=self.settings,
        )
        await self._carry_out(uid, follow)

    async def _ensure_task_configmap(self, rec: TaskRecord, configmap: dict[str, Any]) -> bool:
        """Create the task's ConfigMap, or verify the one found under its name; False when the
        task failed because the one found is not the operator's."""
        namespace = configmap["metadata"]["namespace"]
        if await self._create("configmaps", namespace, configmap) is not None:
            return True
        found = await self.kube.get("configmaps", namespace, configmap["metadata"]["name"])
        if found is None:
            # Deleted between the create and the read: make it again.
            await self.kube.create("configmaps", namespace, configmap)
            return True
        problem = foreign_configmap_problem(found, configmap, rec.uid)
        if problem is None:
            return True
        log.warning("refusing to adopt: %s", problem)
        await self._carry_out(rec.uid, [decide.foreign(rec, problem, _now(), self.settings)])
        return False

    async def reconcile_policies(self) -> int:
        """Bring the shared policies of every namespace with active tasks back to their desired
        spec (called periodically): a policy edited while a task runs is corrected within a
        period, not only when the next task starts. Returns how many namespaces were checked."""
        namespaces = sorted(
            {self.tasks[uid].namespace for uid in self._active if uid in self.tasks}
        )
        for namespace in namespaces:
            await self.policies.shared(namespace, force=True)
        return len(namespaces)

    async def _delete_pod(self, namespace: str, name: str) -> None:
        try:
            await self.kube.delete("pods", namespace, name)
        except KubeError as exc:
            log.warning("deleting pod %s/%s failed: %s", namespace, name, exc)


def _settled_version(settled: str | None, body: dict[str, Any]) -> bool:
    """Whether the body is the very version a finished plan left (see `Operator._settle`)."""
    version = body["metadata"].get("resourceVersion")
    return bool(version) and version == settled
