"""The controller's own rules, against an in-memory API: run slots without an admission lock,
old watch events ignored, and the API-key Secret's verdict remembered only briefly and only
when it allows. (test_operator*.py run the same controller against the emulated API server.)"""

from __future__ import annotations

import asyncio
import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conftest import operator_settings
from k8s.workload import SUCCESS, short_task
from sandbox_operator import controller, decisions
from sandbox_operator.controller import Operator
from sandbox_operator.kube import KubeError, ObjectMetadata
from sandbox_operator.pod_builder import build_pod

LABELLED = {"llmsandbox.io/api-key": "true"}


class MemoryKube:
    """The few calls the controller makes, on dicts; the replies are copies, as off the wire.
    `pause` makes every status patch wait one loop turn, so concurrent events interleave."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.secret_labels: dict[str, dict[str, str]] = {"llm-key": dict(LABELLED)}
        self.secret_reads = 0
        self.uids = 0
        self.versions = 0
        self.calls = 0
        self.fail_next_patch: KubeError | None = None
        self.fail_next_delete: KubeError | None = None

    async def list(self, resource: str, namespace: Any, labels: Any = None) -> list[Any]:
        return [copy.deepcopy(o) for (r, _), o in self.objects.items() if r == resource]

    async def get(self, resource: str, namespace: str, name: str) -> Any:
        found = self.objects.get((resource, name))
        return copy.deepcopy(found) if found is not None else None

    async def get_metadata(self, resource: str, namespace: str, name: str) -> Any:
        self.secret_reads += 1
        labels = self.secret_labels.get(name)
        if labels is None:
            return None
        return ObjectMetadata.model_validate({"name": name, "labels": labels})

    def _version(self, obj: dict[str, Any]) -> None:
        self.versions += 1
        obj["metadata"]["resourceVersion"] = str(self.versions)

    async def create(self, resource: str, namespace: str, body: dict[str, Any]) -> Any:
        self.uids += 1
        self.calls += 1
        made = copy.deepcopy(body)
        made["metadata"].update(uid=f"{resource}-{self.uids}", creationTimestamp=_NOW)
        self._version(made)
        self.objects[resource, body["metadata"]["name"]] = made
        return copy.deepcopy(made)

    async def patch_status(
        self, resource: str, namespace: str, name: str, status: dict[str, Any]
    ) -> Any:
        await asyncio.sleep(0)
        self.calls += 1
        if self.fail_next_patch is not None:
            error, self.fail_next_patch = self.fail_next_patch, None
            raise error
        if (resource, name) not in self.objects:
            raise KubeError(404, "NotFound", f"{name} not found")
        obj = self.objects[resource, name]
        merged = {**(obj.get("status") or {}), **status}
        obj["status"] = {k: v for k, v in merged.items() if v is not None}
        self._version(obj)
        return copy.deepcopy(obj)

    async def delete(
        self, resource: str, namespace: str, name: str, *, uid: str | None = None
    ) -> bool:
        if self.fail_next_delete is not None:
            error, self.fail_next_delete = self.fail_next_delete, None
            raise error
        found = self.objects.get((resource, name))
        if found is None or (uid is not None and found["metadata"]["uid"] != uid):
            return False
        del self.objects[resource, name]
        return True

    async def replace(self, resource: str, namespace: str, name: str, body: Any) -> Any:
        self.objects[resource, name] = copy.deepcopy(body)
        return body

    def add_task(self, name: str, **spec: Any) -> dict[str, Any]:
        body = short_task(name, **spec)
        body["metadata"].update(uid=f"uid-{name}", generation=1, creationTimestamp=_NOW)
        self._version(body)
        self.objects["sandboxtasks", name] = body
        return copy.deepcopy(body)

    def task(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.objects["sandboxtasks", name])

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.objects["sandboxtasks", name].get("status") or {})


_NOW = "2026-03-01T12:00:00Z"


def operator(kube: MemoryKube, **settings: Any) -> Operator:
    return Operator(operator_settings(**settings), kube)  # type: ignore[arg-type]


async def finish(op: Operator, kube: MemoryKube, name: str) -> None:
    """The task's pod ends with the agent's report."""
    pod = copy.deepcopy(kube.objects["pods", kube.status(name)["podName"]])
    done = {"exitCode": 0, "reason": "Completed", "startedAt": _NOW}
    pod["status"] = {
        "phase": "Succeeded",
        "containerStatuses": [
            {"name": "sandbox", "state": {"terminated": done}},
            {"name": "agent", "state": {"terminated": {**done, "message": json.dumps(SUCCESS)}}},
        ],
    }
    await op.on_pod("MODIFIED", pod)


async def test_tasks_arriving_together_never_take_more_slots_than_there_are() -> None:
    kube = MemoryKube()
    op = operator(kube, max_running_tasks=2)
    bodies = [kube.add_task(f"t{i}") for i in range(5)]
    # The events are handled concurrently, each status write yielding to the others.
    await asyncio.gather(*(op.on_task("ADDED", body) for body in bodies))
    phases = sorted(str(kube.status(f"t{i}").get("phase")) for i in range(5))
    assert phases == ["Pending", "Pending", "Queued", "Queued", "Queued"]
    assert len([k for k in kube.objects if k[0] == "pods"]) == 2
    assert [kube.status(f"t{i}").get("queuePosition") for i in (2, 3, 4)] == [1, 2, 3]
    # A slot freed admits the head of the queue, and only it.
    await finish(op, kube, "t0")
    assert kube.status("t0")["phase"] == "Succeeded"
    assert kube.status("t2")["phase"] == "Pending"
    assert [kube.status(f"t{i}")["phase"] for i in (3, 4)] == ["Queued", "Queued"]


async def test_an_old_event_arriving_after_the_operators_own_write_changes_nothing() -> None:
    kube = MemoryKube()
    op = operator(kube)
    created = kube.add_task("t")
    await op.on_task("ADDED", created)
    assert kube.status("t")["phase"] == "Pending"
    calls_before = kube.uids
    # The watch delivers the ADDED body (no status) again, after the operator's writes landed.
    await op.on_task("MODIFIED", created)
    assert kube.uids == calls_before  # no second ConfigMap or pod
    assert kube.status("t")["attempt"] == 1


async def test_the_echo_of_the_operators_last_write_is_not_decided_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decided: list[str] = []
    reconcile = decisions.reconcile

    def counting(rec: Any, *args: Any) -> Any:
        decided.append(rec.resource_version)
        return reconcile(rec, *args)

    monkeypatch.setattr(decisions, "reconcile", counting)
    kube = MemoryKube()
    op = operator(kube)
    await op.on_task("ADDED", kube.add_task("t"))
    assert kube.status("t").get("podUID")
    assert len(decided) == 1
    await op.on_task("MODIFIED", kube.task("t"))  # the watch brings the last write back
    assert len(decided) == 1
    edited = kube.task("t")
    edited["metadata"]["resourceVersion"] = "another"  # e.g. a label added by someone
    await op.on_task("MODIFIED", edited)
    assert decided[-1] == "another"


async def test_a_pod_event_first_never_makes_the_tasks_listed_version_look_decided() -> None:
    # On start the operator lists tasks and pods; a pod event handled before the task's own
    # ADDED event (the same version as the list) must not let that event be skipped.
    kube = MemoryKube()
    body = kube.add_task("t")
    op = operator(kube)
    await op.prime([])
    rec = op.tasks["uid-t"]
    assert rec.task is not None
    old = build_pod(rec.task, namespace="default", uid="uid-t", attempt=1, settings=op.settings)
    old["metadata"].update(uid="old-pod", creationTimestamp=_NOW)
    old["status"] = {"phase": "Succeeded"}
    await op.on_pod("ADDED", old)
    await op.on_task("ADDED", body)
    assert kube.status("t")["phase"] == "Pending"


async def test_a_first_pod_whose_status_write_failed_holds_its_slot_and_is_adopted() -> None:
    kube = MemoryKube()
    op = operator(kube, max_running_tasks=1)
    body = kube.add_task("t")
    # The pod is created, then the status write that records it fails (API hiccup).
    kube.fail_next_patch = KubeError(500, "InternalError", "etcd timeout")
    with pytest.raises(KubeError):
        await op.on_task("ADDED", body)
    assert "phase" not in kube.status("t")
    pod = kube.objects["pods", "t-a1"]
    # Its pod runs, so it holds the only slot: the next task waits.
    await op.on_task("ADDED", kube.add_task("u"))
    assert kube.status("u")["phase"] == "Queued"
    await op.on_pod("ADDED", pod)  # the watch brings the pod: verified, adopted
    status = kube.status("t")
    assert (status["phase"], status["attempt"]) == ("Pending", 1)
    assert status["podUID"] == pod["metadata"]["uid"]
    assert [k for k in kube.objects if k[0] == "pods"] == [("pods", "t-a1")]
    assert kube.status("u")["phase"] == "Queued"


async def test_a_burst_with_one_key_reads_the_secret_once() -> None:
    kube = MemoryKube()
    op = operator(kube)
    for i in range(4):
        await op.on_task("ADDED", kube.add_task(f"t{i}"))
    assert kube.secret_reads == 1
    assert {kube.status(f"t{i}")["phase"] for i in range(4)} == {"Pending"}


async def test_a_label_removed_holds_back_new_pods_once_the_verdict_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(controller, "SECRET_VERDICT_SECONDS", 0.0)
    kube = MemoryKube()
    op = operator(kube)
    await op.on_task("ADDED", kube.add_task("before"))
    kube.secret_labels["llm-key"] = {}
    await op.on_task("ADDED", kube.add_task("after"))
    assert kube.status("before")["phase"] == "Pending"
    after = kube.status("after")
    assert (after["phase"], after["exitReason"]) == ("Failed", "config_error")
    assert "lacks label llmsandbox.io/api-key=true" in after["message"]


async def test_a_missing_secret_is_not_remembered() -> None:
    kube = MemoryKube()
    del kube.secret_labels["llm-key"]
    op = operator(kube)
    await op.on_task("ADDED", kube.add_task("early"))
    assert kube.status("early")["exitReason"] == "config_error"
    kube.secret_labels["llm-key"] = dict(LABELLED)
    await op.on_task("ADDED", kube.add_task("later"))
    assert kube.status("later")["phase"] == "Pending"


async def test_a_task_deleted_while_queued_frees_nothing_and_is_forgotten() -> None:
    kube = MemoryKube()
    op = operator(kube, max_running_tasks=1)
    await op.on_task("ADDED", kube.add_task("runs"))
    await op.on_task("ADDED", kube.add_task("waits"))
    assert kube.status("waits")["phase"] == "Queued"
    body = kube.task("waits")
    del kube.objects["sandboxtasks", "waits"]
    await op.on_task("DELETED", body)
    assert "uid-waits" not in op.tasks
    await finish(op, kube, "runs")
    assert kube.status("runs")["phase"] == "Succeeded"


async def test_a_finished_task_whose_delete_fails_is_deleted_on_a_later_try() -> None:
    kube = MemoryKube()
    op = operator(kube, task_ttl_seconds=0)
    await op.on_task("ADDED", kube.add_task("t"))
    await finish(op, kube, "t")
    assert kube.status("t")["phase"] == "Succeeded"
    kube.fail_next_delete = KubeError(500, "InternalError", "etcdserver: request timed out")
    now = datetime.now(UTC)
    wait = await op.delete_expired(now)
    assert ("sandboxtasks", "t") in kube.objects
    assert wait == 60.0  # tried again a minute later, not forgotten
    assert await op.delete_expired(now + timedelta(seconds=61)) is None
    assert ("sandboxtasks", "t") not in kube.objects


async def test_finished_tasks_are_deleted_a_few_at_a_time_not_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kube = MemoryKube()
    op = operator(kube, task_ttl_seconds=0, max_running_tasks=20)
    for i in range(20):
        await op.on_task("ADDED", kube.add_task(f"t{i}"))
        await finish(op, kube, f"t{i}")
    in_flight, most = 0, 0
    original = kube.delete

    async def slow_delete(*args: Any, **kwargs: Any) -> bool:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return await original(*args, **kwargs)

    monkeypatch.setattr(kube, "delete", slow_delete)
    assert await op.delete_expired(datetime.now(UTC)) is None
    assert not [k for k in kube.objects if k[0] == "sandboxtasks"]
    assert most == controller._EXPIRY_CONCURRENCY


async def test_a_task_recreated_under_the_name_of_an_expired_one_is_not_deleted() -> None:
    kube = MemoryKube()
    op = operator(kube, task_ttl_seconds=0)
    await op.on_task("ADDED", kube.add_task("t"))
    await finish(op, kube, "t")
    # Deleted and made again by a user before the operator's timer ran: another uid.
    kube.objects["sandboxtasks", "t"]["metadata"]["uid"] = "uid-new"
    await op.delete_expired(datetime.now(UTC))
    assert ("sandboxtasks", "t") in kube.objects
