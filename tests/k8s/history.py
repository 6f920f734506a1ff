"""A complete record of what happened to every SandboxTask and task pod, checked as it happens.

``TaskHistory`` is an ``ObjectStore.on_write`` hook: it sees every stored change (each is one
watch event) in order, with the client that made it (``current_request()``: the operator's
User-Agent names its process). It keeps per-task aggregates only, so a 1,000-task soak stays
small, and records a violation the moment an invariant breaks:

- a task's status changes after it reached a terminal phase (a second terminal write, or going
  back to a non-terminal phase);
- ``status.attempt`` goes down;
- a pod of a task is created while another pod of the same task is still live (not Succeeded or
  Failed, not deleted), or the same attempt's pod is created a second time.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .emulator import ResourceDef, current_request

__all__ = ["OPERATOR_AGENT", "TERMINAL", "TaskHistory", "TaskRecord", "operator_pid"]

TERMINAL = frozenset({"Succeeded", "Failed", "Cancelled"})
OPERATOR_AGENT = "llm-sandbox-operator/"
TASK_UID_LABEL = "llmsandbox.io/task-uid"
ATTEMPT_LABEL = "llmsandbox.io/attempt"
_PID = re.compile(r"pid (\d+)")


def operator_pid(user_agent: str) -> int | None:
    """The operator process a request came from (its User-Agent), None for other clients."""
    if not user_agent.startswith(OPERATOR_AGENT):
        return None
    match = _PID.search(user_agent)
    return int(match[1]) if match else None


@dataclass
class TaskRecord:
    name: str
    phases: list[str | None] = field(default_factory=list)  # each distinct phase, in order
    attempt: int = 0
    terminal: dict[str, Any] | None = None  # phase, exitReason, attempt, message
    terminal_writes: int = 0
    terminal_writer: int | None = None  # operator pid
    writes_after_terminal: int = 0
    pods_created: list[tuple[str, str]] = field(default_factory=list)  # (name, attempt label)
    live_pods: set[str] = field(default_factory=set)
    max_live_pods: int = 0
    deleted: bool = False


class TaskHistory:
    """Hook into ``api.store.on_write`` (``history.attach(api)``); thread-safe to read."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tasks: dict[str, TaskRecord] = {}
        self.violations: list[str] = []
        self.operator_writes: collections.Counter[int] = collections.Counter()  # by pid
        self.terminal_by_pid: collections.Counter[int] = collections.Counter()
        # (pid, phase, exitReason) -> transitions into a terminal phase written by that process
        self.terminal_by_pid_reason: collections.Counter[tuple[int, str, str]] = (
            collections.Counter()
        )
        self.retries_by_pid: collections.Counter[int] = collections.Counter()
        self.admissions_by_pid: collections.Counter[int] = collections.Counter()
        # Called (under the store's lock, right after the write landed, before the writer gets
        # its response) with the pid of the operator process that made a write.
        self.on_operator_write: Callable[[int], None] | None = None
        self.changed = threading.Condition(self.lock)

    def attach(self, api: Any) -> TaskHistory:
        api.store.on_write.append(self)
        return self

    # -- the hook ----------------------------------------------------------------------------

    def __call__(self, res: ResourceDef, type_: str, obj: dict[str, Any]) -> None:
        request = current_request()
        pid = operator_pid(request.user_agent) if request is not None else None
        with self.lock:
            if pid is not None:
                self.operator_writes[pid] += 1
            if res.plural == "sandboxtasks":
                self._task(type_, obj, pid)
            elif res.plural == "pods" and TASK_UID_LABEL in (obj["metadata"].get("labels") or {}):
                self._pod(type_, obj)
            self.changed.notify_all()
        if pid is not None and self.on_operator_write is not None:
            self.on_operator_write(pid)

    def _record(self, uid: str, name: str) -> TaskRecord:
        record = self.tasks.get(uid)
        if record is None:
            record = self.tasks[uid] = TaskRecord(name)
        return record

    def _task(self, type_: str, obj: dict[str, Any], pid: int | None) -> None:
        meta = obj["metadata"]
        record = self._record(meta["uid"], meta["name"])
        if type_ == "DELETED":
            record.deleted = True
            return
        status = obj.get("status") or {}
        phase = status.get("phase")
        if record.terminal is not None:
            record.writes_after_terminal += 1
            self.violations.append(
                f"{record.name}: status written after it was {record.terminal['phase']} "
                f"(now {phase}, by pid {pid})"
            )
            return
        if not record.phases or record.phases[-1] != phase:
            record.phases.append(phase)
        attempt = int(status.get("attempt") or 0)
        if attempt < record.attempt:
            self.violations.append(
                f"{record.name}: attempt went from {record.attempt} to {attempt}"
            )
        elif attempt > record.attempt and pid is not None:
            if attempt == 1:
                self.admissions_by_pid[pid] += 1
            else:
                self.retries_by_pid[pid] += attempt - max(record.attempt, 1)
        record.attempt = max(record.attempt, attempt)
        if phase in TERMINAL:
            reason = str(status.get("exitReason"))
            record.terminal = {
                "phase": phase,
                "exitReason": reason,
                "attempt": attempt,
                "message": status.get("message"),
            }
            record.terminal_writes += 1
            record.terminal_writer = pid
            if pid is not None:
                self.terminal_by_pid[pid] += 1
                self.terminal_by_pid_reason[pid, phase, reason] += 1

    def _pod(self, type_: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        labels = meta.get("labels") or {}
        record = self._record(labels[TASK_UID_LABEL], labels.get("llmsandbox.io/task", "?"))
        name = meta["name"]
        if type_ == "ADDED":
            if any(created == name for created, _ in record.pods_created):
                self.violations.append(f"{record.name}: pod {name} created a second time")
            others = record.live_pods - {name}
            if others:
                self.violations.append(
                    f"{record.name}: pod {name} created while {sorted(others)} still live"
                )
            record.pods_created.append((name, str(labels.get(ATTEMPT_LABEL))))
            record.live_pods.add(name)
            record.max_live_pods = max(record.max_live_pods, len(record.live_pods))
        elif type_ == "DELETED" or (obj.get("status") or {}).get("phase") in (
            "Succeeded",
            "Failed",
        ):
            record.live_pods.discard(name)

    # -- queries -----------------------------------------------------------------------------

    def terminal_count(self) -> int:
        with self.lock:
            return sum(1 for r in self.tasks.values() if r.terminal is not None)

    def live_pod_count(self) -> int:
        with self.lock:
            return sum(len(r.live_pods) for r in self.tasks.values())

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Until ``predicate()`` (called without the lock) holds; False on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self.lock:
                self.changed.wait(min(remaining, 0.1))
        return True


class KillAfterWrites:
    """SIGKILLs an operator process right after its Nth write lands (before it hears the answer):
    `kill = KillAfterWrites(history)`, then `kill.arm(pid, writes)` for each incarnation."""

    def __init__(self, history: TaskHistory) -> None:
        self.history = history
        self._lock = threading.Lock()
        self._armed: tuple[int, int] | None = None  # (pid, writes)
        history.on_operator_write = self._maybe_kill

    def arm(self, pid: int, writes: int) -> None:
        """Kill `pid` once it has made `writes` writes in all (now, if it already has)."""
        with self._lock:
            self._armed = (pid, writes)
        self._maybe_kill(pid)

    def _maybe_kill(self, pid: int) -> None:
        # Runs in the API server, right after `pid`'s write was applied, before it is answered.
        with self._lock:
            armed = self._armed
            if (
                armed is not None
                and armed[0] == pid
                and self.history.operator_writes[pid] >= armed[1]
            ):
                os.kill(pid, signal.SIGKILL)
                self._armed = None
