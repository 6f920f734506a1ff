"""The operator's decisions over time: validate, admit, create the pod, follow it, write the result.

kopf watches SandboxTasks and their pods and calls `Operator.on_task` / `Operator.on_pod`; all
writes go through KubeClient. Every step may run twice (a restart, a repeated watch event): pods
and ConfigMaps have deterministic names, so a second create is a 409, and the object found is
adopted only once it is verified to be the one the operator would make (ownership.py).

Trust: a pod's report counts for a task only when the pod is in the task's namespace, has a
controller owner reference to the task, and has the uid recorded in `status.podUID` when the
operator created it. Anyone who can create pods can copy a task pod's labels; nobody else can
make the API server hand out a uid the operator recorded.

Crash safety (the operator may be killed between any two API calls):

- The status is written before the step it records is acted on (the attempt before its pod, the
  terminal phase before a stuck pod is deleted), so a restarted operator re-derives from the API
  what is left to do and never re-runs a step whose effect it cannot see.
- A terminal phase is final: nothing writes a task's status again once it is terminal.
- Metrics count transitions, and only the process whose status write made the transition counts
  it, after the write succeeded. A restarted operator that finds a task already queued, running
  or terminal counts nothing for it. So counters summed over operator processes never exceed the
  transitions in the API; a kill between a write and its count loses that count (Prometheus
  counters restart from zero with the process anyway), it never doubles one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from sandbox_agent.result import TERMINAL_PHASES, ExitReason, Phase, TaskResult, phase_for
from sandbox_agent.task import SandboxTask, format_validation_error
from sandbox_agent.wire import LABEL_TASK_UID

from .admission import Candidate, positions, to_admit
from .agent_report import ResultError, parse_log_result, parse_termination_message
from .cluster_checks import resolve_api_key_secret, validate_for_cluster
from .endpoints import secret_label_problem
from .errors import SpecError
from .failures import PodState, PodVerdict, assess_pod, start_timed_out
from .kube import TASKS, ConflictError, KubeClient, KubeError
from .metadata import MANAGED_SELECTOR
from .metrics import Metrics
from .ownership import claim_problem, foreign_configmap_problem, foreign_pod_problem, policy_drift
from .pod_builder import build_pod, pod_name
from .policy import shared_policies, task_policy
from .settings import OperatorSettings, cost_usd
from .status import (
    ConditionType,
    Reason,
    TaskStatus,
    answer_for_status,
    answer_short,
    rfc3339,
    set_condition,
)
from .task_configmap import build_task_configmap

log = logging.getLogger("sandbox_operator")

ACTIVE = {Phase.PENDING, Phase.RUNNING}
# Reason for the Complete condition per exit reason, where it differs from Failed.
_COMPLETE_REASONS = {
    ExitReason.SUBMITTED: Reason.SUCCEEDED,
    ExitReason.INVALID_SPEC: Reason.INVALID_SPEC,
    ExitReason.IMAGE_PULL_ERROR: Reason.IMAGE_PULL_FAILED,
    ExitReason.CONFIG_ERROR: Reason.CONFIG_MISSING,
    ExitReason.OOM_KILLED: Reason.OOM_KILLED,
    ExitReason.EVICTED: Reason.EVICTED,
    ExitReason.DEADLINE: Reason.DEADLINE_EXCEEDED,
    ExitReason.POD_LOST: Reason.POD_DELETED,
    ExitReason.START_TIMEOUT: Reason.START_TIMEOUT,
    ExitReason.CANCELLED: Reason.CANCELLED,
}
# Causes named by the agent or the operator that become the Complete condition's reason as is.
_CAUSE_REASONS = {
    Reason.ENDPOINT_UNREACHABLE.value,
    Reason.EXEC_SERVER_NOT_READY.value,
    Reason.FOREIGN_OBJECT.value,
    Reason.SECRET_NOT_ALLOWED.value,
}
_LOG_TAIL_LINES = 20
# Replacing a NetworkPolicy that changes between our read and our write is tried this often.
_POLICY_WRITE_ATTEMPTS = 3


def _now() -> datetime:
    return datetime.now(UTC)


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _seconds_between(start: str | None, end: datetime) -> float | None:
    begun = _parse_time(start)
    return round((end - begun).total_seconds(), 3) if begun else None


def _status_of(body: dict[str, Any]) -> TaskStatus:
    try:
        return TaskStatus.model_validate(body.get("status") or {})
    except ValidationError:
        # A status we cannot read (hand-edited, or older) is treated as empty: the task restarts.
        return TaskStatus()


def _key(body: dict[str, Any]) -> tuple[str, str, str]:
    meta = body["metadata"]
    return meta["uid"], meta.get("namespace", "default"), meta["name"]


def _complete_reason(result: TaskResult) -> str:
    if result.cause in _CAUSE_REASONS:
        return str(result.cause)
    return _COMPLETE_REASONS.get(result.exit_reason, Reason.FAILED).value


class Operator:
    """All state is a cache of the API; losing it (a restart) loses nothing."""

    def __init__(self, settings: OperatorSettings, kube: KubeClient) -> None:
        self.settings = settings
        self.kube = kube
        self.tasks: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}  # by pod uid
        self._locks: dict[str, asyncio.Lock] = {}
        self._admission = asyncio.Lock()
        # When each namespace's shared policies were last read and, if need be, corrected.
        self._policies_checked: dict[str, float] = {}
        # Pods refused as not their task's, by uid: each is logged once, not at every event.
        self._refused_pods: set[str] = set()
        self._active: set[str] = set()
        self._queued: set[str] = set()
        self.metrics = Metrics(self.count_by_phase, settings.max_running_tasks)

    # -- index -------------------------------------------------------------------------------

    def count_by_phase(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for body in self.tasks.values():
            phase = (body.get("status") or {}).get("phase")
            counts[phase or Phase.PENDING.value] += 1
        return dict(counts)

    def _lock(self, uid: str) -> asyncio.Lock:
        return self._locks.setdefault(uid, asyncio.Lock())

    def _phase(self, uid: str) -> Phase | None:
        phase = (self.tasks.get(uid, {}).get("status") or {}).get("phase")
        return Phase(phase) if phase else None

    async def prime(self, namespaces: list[str]) -> None:
        """Read every task and managed pod once, so admission counts right from the first event."""
        scopes: list[str | None] = list(namespaces) or [None]
        for ns in scopes:
            for body in await self.kube.list(TASKS, ns):
                self._remember(body)
            for pod in await self.kube.list("pods", ns, MANAGED_SELECTOR):
                if self._claimed(pod):
                    self.pods[pod["metadata"]["uid"]] = pod

    # -- events ------------------------------------------------------------------------------

    async def on_task(self, event_type: str | None, body: dict[str, Any]) -> None:
        uid, namespace, _ = _key(body)
        if event_type == "DELETED":
            self._forget(uid)
            self._locks.pop(uid, None)
            # Owner references garbage-collect the pod too; deleting it now frees the slot sooner.
            for pod in self._pods_of(uid):
                await self._delete_pod(namespace, pod["metadata"]["name"])
        else:
            known = self.tasks.get(uid)
            if known is None or _newer(body, known):
                self._remember(body)
            async with self._lock(uid):
                await self._reconcile(uid)
        await self.admit()

    def _claimed(self, pod: dict[str, Any]) -> bool:
        """Whether the pod belongs to the task its label names: same namespace, and the task as
        its controller owner. Labels alone prove nothing (anyone can copy them)."""
        uid = _task_uid(pod)
        body = self.tasks.get(uid) if uid else None
        if body is None:
            return False
        problem = claim_problem(pod, namespace=_key(body)[1], task_uid=uid)
        if problem is not None:
            meta = pod["metadata"]
            if meta["uid"] in self._refused_pods:
                return False
            self._refused_pods.add(meta["uid"])
            log.warning(
                "ignoring pod %s/%s that claims task %s/%s: %s",
                meta.get("namespace"),
                meta.get("name"),
                _key(body)[1],
                _key(body)[2],
                problem,
            )
            return False
        return True

    async def on_pod(self, event_type: str | None, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = _task_uid(pod)
        if not self._claimed(pod):
            self.pods.pop(meta["uid"], None)
            if event_type == "DELETED":
                self._refused_pods.discard(meta["uid"])
            return
        if event_type == "DELETED" or self._phase(uid) in TERMINAL_PHASES:
            self.pods.pop(meta["uid"], None)
        else:
            self.pods[meta["uid"]] = pod
        async with self._lock(uid):
            if event_type != "DELETED" and self._phase(uid) in TERMINAL_PHASES:
                await self._reap_pod_of_finished_task(pod)
            else:
                await self._follow_pod(uid, pod, deleted=event_type == "DELETED")
        await self.admit()

    async def _reap_pod_of_finished_task(self, pod: dict[str, Any]) -> None:
        """Delete a pod still pending or running under a terminal task.

        `_fail_from_pod` writes the terminal status before it deletes a stuck pod; an operator
        killed in between leaves the pod behind, and the restarted operator, which never touches
        a terminal task again, finds it here through the watch (every pod is listed on start)."""
        meta = pod["metadata"]
        phase = (pod.get("status") or {}).get("phase", "Pending")
        if phase in ("Pending", "Running", "Unknown") and not meta.get("deletionTimestamp"):
            await self._delete_pod(meta.get("namespace", "default"), meta["name"])

    # -- decisions ---------------------------------------------------------------------------

    async def _reconcile(self, uid: str) -> None:
        body = self.tasks.get(uid)
        if body is None:
            return
        status = _status_of(body)
        if status.phase in TERMINAL_PHASES:
            return
        if status.phase is None:
            task = await self._validate(body)
            if task is not None:
                await self._enqueue(uid)
            return
        if status.phase in ACTIVE:
            pod = await self._current_pod(uid, body, status)
            if pod is None:
                if status.phase is Phase.PENDING and status.pod_uid is None:
                    # Admitted, but the operator stopped before the pod was created.
                    await self._start_attempt(uid, status.attempt or 1, resume=True)
                else:
                    await self._pod_lost(uid, "the pod is gone")
            else:
                await self._follow_pod(uid, pod, deleted=False)

    async def _validate(self, body: dict[str, Any]) -> SandboxTask | None:
        uid = body["metadata"]["uid"]
        try:
            task = _task(body)
            validate_for_cluster(task, self.settings)
        except ValidationError as exc:
            await self._finish_without_run(
                uid, ExitReason.INVALID_SPEC, format_validation_error(exc).replace("\n", "; ")
            )
            return None
        except SpecError as exc:
            await self._finish_without_run(uid, ExitReason.INVALID_SPEC, str(exc))
            return None
        return task

    def _remember(self, body: dict[str, Any]) -> None:
        """Cache a task and keep the admission sets in step, so admission costs O(queue)."""
        uid = body["metadata"]["uid"]
        self.tasks[uid] = body
        phase = (body.get("status") or {}).get("phase")
        self._active.discard(uid)
        self._queued.discard(uid)
        if phase in (Phase.PENDING.value, Phase.RUNNING.value):
            self._active.add(uid)
        elif phase == Phase.QUEUED.value:
            self._queued.add(uid)
        elif phase in TERMINAL_PHASES:
            # A finished task's pods are never looked at again.
            for pod_uid in [k for k, p in self.pods.items() if _task_uid(p) == uid]:
                del self.pods[pod_uid]

    def _forget(self, uid: str) -> None:
        self.tasks.pop(uid, None)
        self._active.discard(uid)
        self._queued.discard(uid)

    def _waiting(self) -> list[Candidate]:
        return [_candidate(self.tasks[uid]) for uid in self._queued]

    def _running_count(self) -> int:
        return len(self._active)

    async def _enqueue(self, uid: str) -> None:
        """A new valid task: straight to a slot when one is free and nobody waits ahead."""
        async with self._admission:
            body = self.tasks[uid]
            me = _candidate(body)
            chosen = to_admit(
                [*self._waiting(), me], self._running_count(), self.settings.max_running_tasks
            )
            if me in chosen:
                await self._admit_one(uid, from_new=True)
                return
            place = positions([*self._waiting(), me])[uid]
            now = _now()
            status = TaskStatus(phase=Phase.QUEUED, queue_position=place)
            status.conditions = set_condition(
                [],
                ConditionType.ADMITTED,
                "False",
                Reason.QUEUED,
                f"waiting for one of {self.settings.max_running_tasks} run slots "
                f"(position {place})",
                now,
            )
            await self._write_status(uid, status)

    async def refresh_queue_positions(self, head: int = 100) -> int:
        """Rewrite queuePosition where the queue has moved; only the first `head` places, so a
        long queue costs at most `head` writes per refresh. Returns how many were written."""
        written = 0
        for uid, place in positions(self._waiting()).items():
            if place > head:
                continue
            async with self._lock(uid):
                status = _status_of(self.tasks.get(uid, {}))
                if status.phase is not Phase.QUEUED or status.queue_position == place:
                    continue
                status.queue_position = place
                await self._write_status(uid, status)
                written += 1
        return written

    async def fail_pods_that_never_start(self) -> int:
        """Fail active tasks whose pod has been Pending past the start timeout (see
        `start_timed_out`); called periodically. Returns how many were failed."""
        timeout = self.settings.pod_start_timeout_seconds
        if timeout <= 0:
            return 0
        failed = 0
        for uid in list(self._active):
            async with self._lock(uid):
                status = _status_of(self.tasks.get(uid, {}))
                if status.phase is not Phase.PENDING:
                    continue
                pod = next(
                    (
                        p
                        for p in self._pods_of(uid)
                        if p["metadata"]["uid"] == status.pod_uid and status.pod_uid
                    ),
                    None,
                )
                created = _parse_time(pod["metadata"].get("creationTimestamp")) if pod else None
                if pod is None or created is None or pod["metadata"].get("deletionTimestamp"):
                    continue
                age = (_now() - created).total_seconds()
                verdict = start_timed_out(pod, age, timeout)
                if verdict is not None:
                    await self._fail_from_pod(uid, pod, verdict)
                    failed += 1
        if failed:
            await self.admit()
        return failed

    async def admit(self) -> None:
        """Fill free slots from the queue (priority, then age)."""
        if not self._queued or self._running_count() >= self.settings.max_running_tasks:
            return
        async with self._admission:
            for cand in to_admit(
                self._waiting(), self._running_count(), self.settings.max_running_tasks
            ):
                async with self._lock(cand.uid):
                    if self._phase(cand.uid) is Phase.QUEUED:
                        await self._admit_one(cand.uid, from_new=False)

    async def _admit_one(self, uid: str, from_new: bool) -> None:
        body = self.tasks[uid]
        now = _now()
        created = body["metadata"].get("creationTimestamp")
        queued = _seconds_between(created, now)
        written = await self._start_attempt(uid, 1, resume=False, queued_seconds=queued)
        if written and queued is not None:
            self.metrics.queue_wait.observe(max(0.0, queued))

    async def _start_attempt(
        self,
        uid: str,
        attempt: int,
        *,
        resume: bool,
        queued_seconds: float | None = None,
        retry_note: str = "",
    ) -> bool:
        """Record the attempt in status first (it holds the slot), then create what it needs.

        True when this call wrote the attempt's status (never for `resume`): the caller counts
        the admission or retry only then."""
        body = self.tasks[uid]
        _, namespace, name = _key(body)
        task = _task(body)
        missing = await self._missing_config_map(task, namespace)
        if missing:
            await self._finish_without_run(uid, ExitReason.CONFIG_ERROR, missing)
            return False
        try:
            pod = build_pod(
                task, namespace=namespace, uid=uid, attempt=attempt, settings=self.settings
            )
            configmap = build_task_configmap(
                task, namespace=namespace, uid=uid, settings=self.settings
            )
        except SpecError as exc:
            # Valid at admission, but the operator's settings changed before this attempt.
            await self._finish_without_run(uid, ExitReason.INVALID_SPEC, str(exc))
            return False
        refused = await self._api_key_secret_problem(task, namespace)
        if refused is not None:
            await self._finish_without_run(uid, ExitReason.CONFIG_ERROR, *refused)
            return False
        if not resume:
            now = _now()
            old = _status_of(body)
            status = TaskStatus(
                phase=Phase.PENDING,
                pod_name=pod["metadata"]["name"],
                attempt=attempt,
                queued_seconds=queued_seconds if queued_seconds is not None else old.queued_seconds,
                start_time=old.start_time,
                observed_generation=body["metadata"].get("generation"),
            )
            conditions = set_condition(
                old.conditions,
                ConditionType.ADMITTED,
                "True",
                Reason.ADMITTED,
                "run slot granted",
                now,
            )
            if retry_note:
                conditions = set_condition(
                    conditions, ConditionType.COMPLETE, "False", Reason.RETRYING, retry_note, now
                )
                status.message = retry_note
            status.conditions = conditions
            # podUID goes: only the pod created next, for this attempt, may report.
            if not await self._write_status(uid, status, clear=["queuePosition", "podUID"]):
                return False  # the task was deleted meanwhile: nothing to run
        if self._other_live_pods(uid, pod["metadata"]["name"]):
            # The previous attempt's pod is still shutting down (a deleted pod keeps running for
            # its grace period). Its DELETED event brings `_follow_pod` back here, so one task
            # never has two pods running at once.
            return not resume
        try:
            await self._ensure_policies(task, namespace, uid)
            if not await self._ensure_task_configmap(uid, configmap):
                return not resume
            await self._create_pod(uid, pod)
        except KubeError as exc:
            log.warning("creating the pod for %s/%s failed: %s", namespace, name, exc)
            await self._finish_without_run(
                uid,
                ExitReason.CONFIG_ERROR,
                f"the operator could not create the pod: {exc.message}",
            )
        return not resume

    async def _missing_config_map(self, task: SandboxTask, namespace: str) -> str | None:
        """A pod whose ConfigMap volume is missing would wait in ContainerCreating until its
        deadline with no status to show why; checking first names the problem at once."""
        for i, item in enumerate(task.spec.inputs):
            ref = item.config_map_ref
            if ref is None:
                continue
            found = await self.kube.get("configmaps", namespace, ref.name)
            where = f"spec.inputs[{i}].configMapRef"
            if found is None:
                return f'{where}: configmap "{ref.name}" not found in namespace {namespace}; create it before the task'
            if ref.key is not None and ref.key not in (found.get("data") or {}) | (
                found.get("binaryData") or {}
            ):
                return f'{where}: configmap "{ref.name}" has no key {ref.key!r}'
        return None

    async def _api_key_secret_problem(
        self, task: SandboxTask, namespace: str
    ) -> tuple[str, Reason] | None:
        """Why the task's API-key Secret may not go into its pod: missing, or without the
        operator's API-key label. Only its metadata is read (never its data)."""
        ref = resolve_api_key_secret(task, self.settings)
        where = (
            "spec.model.apiKeySecretRef"
            if task.spec.model.api_key_secret_ref is not None
            else "the operator's default API key (LLMSANDBOX_DEFAULT_API_KEY_SECRET)"
        )
        found = await self.kube.get_metadata("secrets", namespace, ref.name)
        if found is None:
            return (
                f'{where}: secret "{ref.name}" not found in namespace {namespace}; create it '
                "before the task",
                Reason.CONFIG_MISSING,
            )
        problem = secret_label_problem(found, self.settings.api_key_secret_label)
        if problem is not None:
            return f"{where}: {problem}", Reason.SECRET_NOT_ALLOWED
        return None

    async def _create(
        self, resource: str, namespace: str, obj: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The created object, or None when one of that name exists (to verify, then adopt)."""
        try:
            return await self.kube.create(resource, namespace, obj)
        except ConflictError:
            return None

    async def _create_pod(self, uid: str, pod: dict[str, Any]) -> None:
        """Create the attempt's pod and record its uid; or, when a pod of that name exists (ours
        from a run cut short, or someone else's), verify it and adopt it or fail the task."""
        meta = pod["metadata"]
        for _ in range(2):  # a second round only when the pod in the way vanished meanwhile
            created = await self._create("pods", meta["namespace"], pod)
            if created is not None:
                # Known now, so a status event that outruns the pod's ADDED needs no API read.
                self.pods[created["metadata"]["uid"]] = created
                await self._record_pod_uid(uid, created)
                return
            found = await self.kube.get("pods", meta["namespace"], meta["name"])
            if found is not None:
                await self._adopt_pod(uid, found, pod)
                return

    async def _record_pod_uid(self, uid: str, pod: dict[str, Any]) -> bool:
        status = _status_of(self.tasks[uid])
        status.pod_uid = pod["metadata"]["uid"]
        return await self._write_status(uid, status)

    async def _adopt_pod(
        self, uid: str, found: dict[str, Any], desired: dict[str, Any] | None = None
    ) -> bool:
        """Take a pod found under the attempt's pod name as the task's, if it is the pod the
        operator would create; otherwise fail the task naming what differs. True if adopted."""
        if desired is None:
            body = self.tasks[uid]
            status = _status_of(body)
            try:
                desired = build_pod(
                    _task(body),
                    namespace=_key(body)[1],
                    uid=uid,
                    attempt=status.attempt or 1,
                    settings=self.settings,
                )
            except (SpecError, ValidationError) as exc:
                await self._finish_without_run(uid, ExitReason.INVALID_SPEC, str(exc))
                return False
        problem = foreign_pod_problem(found, desired, uid)
        if problem is not None:
            await self._fail_foreign(uid, problem)
            return False
        if self._claimed(found):
            self.pods[found["metadata"]["uid"]] = found
        return await self._record_pod_uid(uid, found)

    async def _ensure_task_configmap(self, uid: str, configmap: dict[str, Any]) -> bool:
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
        problem = foreign_configmap_problem(found, configmap, uid)
        if problem is None:
            return True
        await self._fail_foreign(uid, problem)
        return False

    async def _fail_foreign(self, uid: str, problem: str) -> None:
        log.warning("refusing to adopt: %s", problem)
        await self._finish_without_run(
            uid,
            ExitReason.CONFIG_ERROR,
            f"{problem}; delete it, then create the task again",
            cause=Reason.FOREIGN_OBJECT,
        )

    async def _ensure_policies(self, task: SandboxTask, namespace: str, uid: str) -> None:
        """Bring the namespace's shared policies, and the task's own, to their desired spec.

        Never created once and trusted: a policy made beforehand under a shared name (selecting
        nothing, allowing everything) or edited since would leave task pods open, since policies
        only add up. They are read before a namespace's first pod and then at most once per
        refresh period (`reconcile_policies` runs every period too), which costs no API call
        per task in a busy namespace."""
        await self._ensure_shared_policies(namespace)
        own = task_policy(task, namespace=namespace, uid=uid, settings=self.settings)
        if own is not None:
            await self.ensure_policy(own)

    async def ensure_policy(self, desired: dict[str, Any]) -> None:
        """Create a NetworkPolicy, or replace the one of its name when it differs."""
        meta = desired["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        for _ in range(_POLICY_WRITE_ATTEMPTS):
            found = await self.kube.get("networkpolicies", namespace, name)
            if found is None:
                if await self._create("networkpolicies", namespace, desired) is not None:
                    return
                continue  # created meanwhile: read it and compare
            drift = policy_drift(found, desired)
            if drift is None:
                return
            log.warning(
                "NetworkPolicy %s/%s is not the operator's (%s): replacing it",
                namespace,
                name,
                drift,
            )
            body = {
                **desired,
                "metadata": {**meta, "resourceVersion": found["metadata"].get("resourceVersion")},
            }
            try:
                await self.kube.replace("networkpolicies", namespace, name, body)
                return
            except ConflictError:
                continue  # changed between the read and the write: read it again
        raise KubeError(
            409, "Conflict", f"NetworkPolicy {namespace}/{name} keeps changing; cannot set it"
        )

    async def reconcile_policies(self) -> int:
        """Bring the shared policies of every namespace with active tasks back to their desired
        spec (called periodically): a policy edited while a task runs is corrected within a
        period, not only when the next task starts. Returns how many namespaces were checked."""
        namespaces = sorted({_key(self.tasks[uid])[1] for uid in self._active if uid in self.tasks})
        for namespace in namespaces:
            await self._ensure_shared_policies(namespace, force=True)
        return len(namespaces)

    async def _ensure_shared_policies(self, namespace: str, *, force: bool = False) -> None:
        now = asyncio.get_running_loop().time()
        last = self._policies_checked.get(namespace)
        if not force and last is not None and now - last < self.settings.queue_refresh_seconds:
            return
        for policy in shared_policies(namespace, self.settings):
            await self.ensure_policy(policy)
        self._policies_checked[namespace] = now

    def _pods_of(self, uid: str) -> list[dict[str, Any]]:
        return [
            p for p in self.pods.values()
            if (p["metadata"].get("labels") or {}).get(LABEL_TASK_UID) == uid
        ]  # fmt: skip

    def _other_live_pods(self, uid: str, name: str) -> list[str]:
        """This task's pods other than `name` that may still run containers: not yet Succeeded
        or Failed, including those being deleted."""
        return [
            p["metadata"]["name"]
            for p in self._pods_of(uid)
            if p["metadata"]["name"] != name and _pod_may_run(p)
        ]

    async def _current_pod(
        self, uid: str, body: dict[str, Any], status: TaskStatus
    ) -> dict[str, Any] | None:
        """The current attempt's pod: its name, claimed by the task, and once recorded its uid.
        A pod that took the name of the recorded one after it was deleted is not it."""
        name = status.pod_name
        if not name:
            return None
        pod = next((p for p in self._pods_of(uid) if p["metadata"]["name"] == name), None)
        if pod is None:
            # Not seen by the watch (yet): ask the API before concluding anything.
            pod = await self.kube.get("pods", _key(body)[1], name)
            if pod is None or not self._claimed(pod):
                return None
        if status.pod_uid is not None and pod["metadata"]["uid"] != status.pod_uid:
            return None
        return pod

    async def _follow_pod(self, uid: str, pod: dict[str, Any], deleted: bool) -> None:
        body = self.tasks.get(uid)
        if body is None:
            return
        status = _status_of(body)
        if status.phase not in ACTIVE:
            return  # the task already ended
        if pod["metadata"]["name"] != status.pod_name:
            # An old attempt's pod. Once it can no longer run, the current attempt's pod, held
            # back while it shut down (`_start_attempt`), may be created.
            if (
                status.phase is Phase.PENDING
                and (deleted or not _pod_may_run(pod))
                and not any(p["metadata"]["name"] == status.pod_name for p in self._pods_of(uid))
            ):
                await self._reconcile(uid)
            return
        if status.pod_uid is None:
            # Created but not recorded (the operator stopped in between): verify it first.
            if deleted or not await self._adopt_pod(uid, pod):
                return
            status = _status_of(self.tasks[uid])
        elif pod["metadata"]["uid"] != status.pod_uid:
            return  # not the pod the operator created, whatever its name and labels
        if deleted:
            await self._pod_lost(uid, "the pod was deleted")
            return
        verdict = assess_pod(pod, _sandbox_memory_limit(pod))
        if pod["metadata"].get("deletionTimestamp") and verdict.state is not PodState.FINISHED:
            # Being deleted: whatever the kubelet reports while killing it, the pod is lost.
            await self._pod_lost(uid, "the pod was deleted")
            return
        if verdict.state is PodState.RUNNING and status.phase is Phase.PENDING:
            now = _now()
            status.phase = Phase.RUNNING
            status.start_time = status.start_time or verdict.started_at or rfc3339(now)
            status.conditions = set_condition(
                status.conditions,
                ConditionType.READY,
                "True",
                Reason.RUNNING,
                f"pod {status.pod_name} is running",
                now,
            )
            status.conditions = set_condition(
                status.conditions, ConditionType.POD_SCHEDULED, "True", Reason.SCHEDULED, "", now
            )
            status.message = None
            if await self._write_status(uid, status, clear=["message"]):
                created = _parse_time(body["metadata"].get("creationTimestamp"))
                if created is not None:
                    startup = (now - created).total_seconds() - (status.queued_seconds or 0.0)
                    self.metrics.pod_startup.observe(max(0.0, startup))
        elif verdict.state is PodState.FINISHED:
            await self._finish_from_pod(uid, pod, verdict)
        elif verdict.state is PodState.FAILED:
            await self._fail_from_pod(uid, pod, verdict)

    async def _finish_from_pod(self, uid: str, pod: dict[str, Any], verdict: PodVerdict) -> None:
        assert verdict.termination_message is not None
        meta = pod["metadata"]
        try:
            result, in_log = parse_termination_message(verdict.termination_message)
            if in_log:
                text = await self.kube.pod_log(
                    meta["namespace"], meta["name"], "agent", _LOG_TAIL_LINES
                )
                result = parse_log_result(text)
        except (ResultError, KubeError) as exc:
            await self._fail_from_pod(
                uid,
                pod,
                PodVerdict(
                    PodState.FAILED,
                    ExitReason.AGENT_CRASHED,
                    f"cannot read the agent's result: {exc}",
                    retryable=True,
                ),
            )
            return
        await self._finish(uid, result, pod)

    async def _fail_from_pod(self, uid: str, pod: dict[str, Any], verdict: PodVerdict) -> None:
        assert verdict.exit_reason is not None
        body = self.tasks[uid]
        status = _status_of(body)
        retries = int((body.get("spec") or {}).get("retries", 1))
        attempt = status.attempt or 1
        # A pod stuck pulling or misconfigured would hold its slot (and its node) forever.
        stuck = pod.get("status", {}).get("phase") in ("Pending", "Running")
        if verdict.retryable and attempt <= retries:
            if stuck:
                # Gone before the next attempt's pod exists. A crash after this delete leaves the
                # task active with its pod gone or going: the restart sees that as a lost pod.
                await self._delete_pod(pod["metadata"]["namespace"], pod["metadata"]["name"])
            note = f"attempt {attempt} failed ({verdict.message}); starting attempt {attempt + 1}"
            if await self._start_attempt(uid, attempt + 1, resume=False, retry_note=note):
                self.metrics.retries.labels(exit_reason=verdict.exit_reason.value).inc()
            return
        result = TaskResult(
            phase=phase_for(verdict.exit_reason),
            exit_reason=verdict.exit_reason,
            message=verdict.message,
        )
        if verdict.termination_message:
            # The agent may still have reported steps and usage before the pod failed.
            try:
                reported, _ = parse_termination_message(verdict.termination_message)
                result = reported.model_copy(
                    update={
                        "phase": result.phase,
                        "exit_reason": result.exit_reason,
                        "message": result.message,
                        "cause": None,
                    }
                )
            except ResultError:
                pass
        await self._finish(uid, result, pod)
        if stuck:
            # Only after the terminal write: deleting first, a crash in between would leave the
            # task Pending without its pod, and the restart would run the attempt again. A crash
            # after the write leaves the pod to `_reap_pod_of_finished_task`.
            await self._delete_pod(pod["metadata"]["namespace"], pod["metadata"]["name"])

    async def _pod_lost(self, uid: str, why: str) -> None:
        body = self.tasks[uid]
        fake_pod = {
            "metadata": {
                "name": _status_of(body).pod_name or "",
                "namespace": body["metadata"].get("namespace", "default"),
            },
            "status": {"phase": "Failed"},
        }
        await self._fail_from_pod(
            uid,
            fake_pod,
            PodVerdict(
                PodState.FAILED,
                ExitReason.POD_LOST,
                f"{why} before the agent reported",
                retryable=True,
            ),
        )

    async def _finish_without_run(
        self, uid: str, reason: ExitReason, message: str, cause: Reason | None = None
    ) -> None:
        result = TaskResult(
            phase=phase_for(reason),
            exit_reason=reason,
            message=message,
            cause=cause.value if cause else None,
        )
        await self._finish(uid, result, None)

    async def _finish(self, uid: str, result: TaskResult, pod: dict[str, Any] | None) -> None:
        body = self.tasks[uid]
        status = _status_of(body)
        now = _now()
        model = _model_name(body, self.settings)
        cost = cost_usd(
            self.settings, model, result.usage.prompt_tokens, result.usage.completion_tokens
        )
        usage = result.usage.model_copy(update={"cost_usd": cost})
        answer, cut = answer_for_status(result.answer)
        status.phase = result.phase
        status.exit_reason = result.exit_reason
        status.answer = answer
        status.answer_truncated = cut or result.answer_truncated or None
        status.answer_short = answer_short(answer)
        status.steps = result.steps
        status.usage = usage
        status.tool_calls = result.tool_calls
        status.outputs = result.outputs
        status.message = result.message or None
        status.completion_time = rfc3339(now)
        status.queue_position = None
        if status.start_time is None and pod is not None:
            # A quick pod can finish before the watch ever showed it Running.
            status.start_time = _first_start(pod)
        run = _seconds_between(status.start_time, now)
        status.run_seconds = run
        status.conditions = set_condition(
            status.conditions,
            ConditionType.COMPLETE,
            "True",
            _complete_reason(result),
            result.message or "the model submitted an answer",
            now,
        )
        if pod is not None:
            status.conditions = set_condition(
                status.conditions,
                ConditionType.READY,
                "False",
                _complete_reason(result),
                "the pod has ended",
                now,
            )
        if not await self._write_status(uid, status, clear=["queuePosition"]):
            return  # the task is gone: nothing completed
        # Counted here only, by the process whose write made the task terminal (see the module
        # docstring); `_reconcile` and `_follow_pod` never reach here for a terminal task.
        self.metrics.completed.labels(
            phase=result.phase.value, exit_reason=result.exit_reason.value
        ).inc()
        if run is not None:
            self.metrics.run_duration.observe(max(0.0, run))
        self.metrics.record_result(model, result, cost)

    async def _delete_pod(self, namespace: str, name: str) -> None:
        try:
            await self.kube.delete("pods", namespace, name)
        except KubeError as exc:
            log.warning("deleting pod %s/%s failed: %s", namespace, name, exc)

    async def _write_status(
        self,
        uid: str,
        status: TaskStatus,
        clear: list[str] | None = None,
    ) -> bool:
        """Merge-patch the status; False when the task no longer exists."""
        body = self.tasks[uid]
        _, namespace, name = _key(body)
        patch: dict[str, Any] = status.to_api()
        for field in clear or []:
            patch.setdefault(field, None)
        try:
            updated = await self.kube.patch_status(TASKS, namespace, name, patch)
        except KubeError as exc:
            if exc.status == 404:
                self._forget(uid)
                return False
            raise
        # The watch will bring this too; caching it now keeps admission counts exact.
        self._remember(updated)
        return True


def _pod_may_run(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase", "Pending") not in ("Succeeded", "Failed")


def _sandbox_memory_limit(pod: dict[str, Any]) -> str | None:
    """The sandbox container's memory limit as the pod has it (the task's, or the default)."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") == "sandbox":
            limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
            return str(limit) if limit else None
    return None


def _task_uid(pod: dict[str, Any]) -> str:
    return str((pod["metadata"].get("labels") or {}).get(LABEL_TASK_UID, ""))


def _first_start(pod: dict[str, Any]) -> str | None:
    starts = [
        str(term["startedAt"])
        for cs in (pod.get("status") or {}).get("containerStatuses") or []
        if (term := (cs.get("state") or {}).get("terminated")) and term.get("startedAt")
    ]
    return min(starts) if starts else None


def _newer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    try:
        return int(a["metadata"].get("resourceVersion", 0)) >= int(
            b["metadata"].get("resourceVersion", 0)
        )
    except (TypeError, ValueError):
        return True


def _candidate(body: dict[str, Any]) -> Candidate:
    uid, namespace, name = _key(body)
    priority = (body.get("spec") or {}).get("priority", 0)
    return Candidate(
        uid=uid,
        namespace=namespace,
        name=name,
        priority=priority if isinstance(priority, int) else 0,
        created=body["metadata"].get("creationTimestamp", ""),
    )


def _model_name(body: dict[str, Any], settings: OperatorSettings) -> str:
    model = ((body.get("spec") or {}).get("model") or {}).get("name")
    return str(model or settings.default_model or "unknown")


def _task(body: dict[str, Any]) -> SandboxTask:
    """The task as the pydantic model sees it; raises ValidationError naming the field."""
    meta = body["metadata"]
    return SandboxTask.model_validate(
        {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "metadata": {"name": meta["name"], "namespace": meta.get("namespace")},
            "spec": body.get("spec"),
        },
        by_alias=True,
        by_name=False,
    )


__all__ = ["Operator", "pod_name"]
