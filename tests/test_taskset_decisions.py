"""The SandboxTaskSet controller's decisions as tables: pure, no API server."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sandbox_agent.result import ExitReason, Phase
from sandbox_agent.taskset import SampleResult, SetItem, summarise
from sandbox_operator.taskset_children import ChildState
from sandbox_operator.taskset_decisions import (
    CreateChildren,
    DeleteSet,
    ItemsView,
    SetRecord,
    WriteSetStatus,
    decide,
    one_line,
)
from sandbox_operator.taskset_fold import fold
from sandbox_operator.taskset_status import TaskSetStatus

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def body(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llmsandbox.io/v1alpha1",
        "kind": "SandboxTaskSet",
        "metadata": {"name": "s", "namespace": "default", "uid": "set-uid", "generation": 1},
        "spec": {
            "template": {"prompt": "What is {{ a }} + 1?"},
            "items": [{"id": f"i{i}", "a": i, "expected": str(i + 1)} for i in range(4)],
            "samplesPerItem": 2,
            "parallelism": 3,
            "grader": {"type": "numeric"},
            **spec,
        },
        "status": status or {},
    }


def record(status: dict[str, Any] | None = None, **spec: Any) -> SetRecord:
    return SetRecord.parse(body(status, **spec))


def view(rec: SetRecord) -> ItemsView:
    assert rec.taskset is not None
    assert rec.taskset.spec.items is not None
    return ItemsView.of("s", rec.taskset.spec.items, rec.taskset.spec.samples_per_item)


def written(actions: list[Any]) -> TaskSetStatus:
    writes = [a for a in actions if isinstance(a, WriteSetStatus)]
    assert len(writes) == 1, actions
    return writes[0].status


def created(actions: list[Any]) -> list[str]:
    return [
        b["metadata"]["name"] for a in actions if isinstance(a, CreateChildren) for b in a.bodies
    ]


def ok(item: str, sample: int, score: float = 1.0) -> SampleResult:
    return SampleResult(item, sample, Phase.SUCCEEDED, ExitReason.SUBMITTED, score, 10, 1)


def test_the_first_decision_creates_parallelism_children_in_order_then_records_them() -> None:
    rec = record()
    actions = decide(rec, view(rec), {}, NOW)
    assert created(actions) == ["s-i0-0", "s-i0-1", "s-i1-0"]
    assert isinstance(actions[0], CreateChildren)
    assert isinstance(actions[-1], WriteSetStatus)
    status = written(actions)
    assert (status.phase, status.items, status.tasks, status.progress.created) == (
        "Running",
        4,
        8,
        3,
    )


def test_a_child_carries_the_sets_owner_reference_labels_and_grading() -> None:
    rec = record()
    child = next(a for a in decide(rec, view(rec), {}, NOW) if isinstance(a, CreateChildren))
    first = child.bodies[0]
    assert first["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "llmsandbox.io/v1alpha1",
            "kind": "SandboxTaskSet",
            "name": "s",
            "uid": "set-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    labels = first["metadata"]["labels"]
    assert (labels["llmsandbox.io/taskset-item"], labels["llmsandbox.io/taskset-sample"]) == (
        "0",
        "0",
    )
    assert first["metadata"]["annotations"] == {"llmsandbox.io/item-id": "i0"}
    assert first["spec"]["prompt"] == "What is 0 + 1?"
    assert first["spec"]["grading"] == {
        "grader": {"type": "numeric"} | first["spec"]["grading"]["grader"],
        "expected": "1",
    }


def test_a_finished_child_is_counted_and_the_next_one_created_never_more_than_parallelism() -> None:
    rec = record({"phase": "Running", "items": 4, "tasks": 8, "progress": {"created": 3}})
    running = {n: ChildState(n, f"u-{n}", None) for n in ("s-i0-1", "s-i1-0")}
    known = {"s-i0-0": ChildState("s-i0-0", "u0", ok("i0", 0)), **running}
    actions = decide(rec, view(rec), known, NOW)
    assert created(actions) == ["s-i1-1"]  # 2 still running + 1 new = parallelism
    status = written(actions)
    assert (status.finished, status.progress.folded, status.progress.created) == (1, "0", 4)


def test_deciding_again_over_a_counted_child_counts_it_once() -> None:
    rec = record({"phase": "Running", "items": 4, "tasks": 8, "progress": {"created": 3}})
    known = {
        "s-i0-0": ChildState("s-i0-0", "u0", ok("i0", 0)),
        "s-i0-1": ChildState("s-i0-1", "u1", None),
        "s-i1-0": ChildState("s-i1-0", "u2", None),
    }
    first = decide(rec, view(rec), known, NOW)
    known |= {n: ChildState(n, f"u-{n}", None) for n in created(first)}  # as the executor does
    again = SetRecord.parse(body(written(first).to_api()))
    assert decide(again, view(again), known, NOW) == []


def test_a_created_child_gone_from_the_api_without_a_result_counts_as_cancelled() -> None:
    rec = record({"phase": "Running", "items": 4, "tasks": 8, "progress": {"created": 3}})
    known = {n: ChildState(n, f"u-{n}", None) for n in ("s-i0-1", "s-i1-0")}
    status = written(decide(rec, view(rec), known, NOW))
    assert status.exit_reasons == {"cancelled": 1}
    assert status.infrastructure_failures == 0
    assert status.graded == 0


def test_too_many_infrastructure_failures_fail_the_set_and_create_nothing_more() -> None:
    policy = {"maxInfrastructureFailureFraction": 0.5, "minFinished": 2}
    rec = record(
        {"phase": "Running", "items": 4, "tasks": 8, "progress": {"created": 3}},
        failurePolicy=policy,
    )
    pulled = SampleResult("i0", 0, Phase.FAILED, ExitReason.IMAGE_PULL_ERROR)
    known = {
        "s-i0-0": ChildState("s-i0-0", "u0", pulled),
        "s-i0-1": ChildState(
            "s-i0-1", "u1", SampleResult("i0", 1, Phase.FAILED, ExitReason.EVICTED)
        ),
        "s-i1-0": ChildState("s-i1-0", "u2", None),
    }
    actions = decide(rec, view(rec), known, NOW)
    assert created(actions) == []
    status = written(actions)
    assert status.phase == "Failed"
    assert status.conditions[-1].reason == "TooManyInfrastructureFailures"
    assert status.message is not None
    assert status.message.startswith("2 of 2 finished tasks failed")
    tallies = [t for a in actions if isinstance(a, WriteSetStatus) for t in a.tallies]
    assert [t.phase for t in tallies] == ["Failed"]  # counted once the write lands


def test_below_min_finished_the_failure_policy_waits() -> None:
    rec = record({"phase": "Running", "items": 4, "tasks": 8, "progress": {"created": 3}})
    pulled = SampleResult("i0", 0, Phase.FAILED, ExitReason.IMAGE_PULL_ERROR)
    known = {"s-i0-0": ChildState("s-i0-0", "u0", pulled)}
    known |= {n: ChildState(n, f"u-{n}", None) for n in ("s-i0-1", "s-i1-0")}
    assert written(decide(rec, view(rec), known, NOW)).phase == "Running"


def test_folding_results_in_any_order_equals_summarise() -> None:
    rng = random.Random(7)
    samples = 4
    items = [SetItem(id=f"i{i}", prompt="p", expected="1") for i in range(12)]
    reasons = [ExitReason.SUBMITTED] * 6 + [
        ExitReason.MAX_STEPS,
        ExitReason.EVICTED,
        ExitReason.CANCELLED,
    ]
    results = []
    for i in range(len(items)):
        for s in range(samples):
            reason = rng.choice(reasons)
            phase = Phase.SUCCEEDED if reason is ExitReason.SUBMITTED else Phase.FAILED
            score = (
                rng.choice([0.0, 1.0, 0.5])
                if reason in (ExitReason.SUBMITTED, ExitReason.MAX_STEPS)
                else None
            )
            results.append(
                (i * samples + s, i, SampleResult(f"i{i}", s, phase, reason, score, 7, 3, 0.001))
            )
    want = summarise([r for _, _, r in results], tasks=len(results), samples=samples)
    for _ in range(3):
        rng.shuffle(results)
        status = TaskSetStatus()
        for ordinal, item, result in results[: len(results) // 2]:
            fold(status, ordinal, item, result, samples)
        # Half-way, too, the status is the summary of what is counted.
        half = summarise([r for _, _, r in results[: len(results) // 2]], len(results), samples)
        assert (status.accuracy, status.pass_at_k) == (half.accuracy, half.pass_at_k)
        for ordinal, item, result in results[len(results) // 2 :]:
            fold(status, ordinal, item, result, samples)
        assert status.finished == want.finished
        assert status.phases == want.phases
        assert status.exit_reasons == want.exit_reasons
        assert (status.graded, status.accuracy) == (want.graded, want.accuracy)
        assert status.pass_at_k == want.pass_at_k
        assert status.infrastructure_failures == want.infrastructure_failures
        assert status.usage.total_tokens == want.usage.total_tokens
        assert status.usage.cost_usd == want.usage.cost_usd
        assert status.progress.open_items == []
        assert status.progress.folded == f"0-{len(results) - 1}"


def test_every_child_counted_ends_the_set_succeeded() -> None:
    rec = record(
        {
            "phase": "Running",
            "items": 4,
            "tasks": 8,
            "progress": {"created": 8, "folded": "0-6"},
            "finished": 7,
        }
    )
    known = {"s-i3-1": ChildState("s-i3-1", "u7", ok("i3", 1))}
    status = written(decide(rec, view(rec), known, NOW))
    assert status.phase == "Succeeded"
    assert status.completion_time == "2025-01-01T00:00:00Z"


def test_a_finished_set_is_deleted_once_its_ttl_has_passed() -> None:
    done = {"phase": "Succeeded", "completionTime": "2025-01-01T00:00:00Z"}
    rec = record(done, ttlSecondsAfterFinished=60)
    assert decide(rec, None, {}, NOW + timedelta(seconds=59)) == []
    assert decide(rec, None, {}, NOW + timedelta(seconds=60)) == [DeleteSet()]
    assert decide(record(done), None, {}, NOW + timedelta(days=365)) == []


def test_a_spec_the_model_refuses_fails_the_set_with_one_line() -> None:
    rec = record(parallelism=0)
    status = written(decide(rec, None, {}, NOW))
    assert status.phase == "Failed"
    assert status.message == "spec.parallelism: Input should be greater than or equal to 1"
    assert "\n" not in one_line("a: one\nb: two\nc: three")
    assert one_line("a: one\nb: two\nc: three") == "a: one (and 2 more problems)"


def test_items_that_changed_since_the_set_started_stop_it() -> None:
    rec = record({"phase": "Running", "progress": {"created": 3, "itemsDigest": "0" * 64}})
    status = written(decide(rec, view(rec), {}, NOW))
    assert status.phase == "Failed"
    assert status.conditions[-1].reason == "ItemsChanged"


class _Tasks:
    """Just enough of the API for the set controller: sets and tasks by name, no watch."""

    def __init__(self, sets: list[dict[str, Any]], tasks: list[dict[str, Any]]) -> None:
        self.objects = {"sandboxtasksets": {b["metadata"]["name"]: b for b in sets},
                        "sandboxtasks": {b["metadata"]["name"]: b for b in tasks}}  # fmt: skip
        self.gets: list[str] = []

    async def list(self, resource: str, namespace: str | None) -> list[dict[str, Any]]:
        return list(self.objects[resource].values())

    async def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        self.gets.append(name)
        return self.objects[resource].get(name)

    async def create(self, resource: str, namespace: str, new: dict[str, Any]) -> dict[str, Any]:
        made = {**new, "metadata": {**new["metadata"], "uid": f"u-{new['metadata']['name']}"}}
        self.objects[resource][new["metadata"]["name"]] = made
        return made

    async def patch_status(
        self, resource: str, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        from sandbox_operator.kube import KubeError

        found = self.objects[resource].get(name)
        if found is None:
            raise KubeError(404, "NotFound", f'{resource} "{name}" not found')
        found["status"] = status
        return found

    async def delete(
        self, resource: str, namespace: str, name: str, uid: str | None = None
    ) -> None:
        self.objects[resource].pop(name, None)


def child(name: str) -> dict[str, Any]:
    owner = {"apiVersion": "llmsandbox.io/v1alpha1", "kind": "SandboxTaskSet", "name": "s",
             "uid": "set-uid", "controller": True}  # fmt: skip
    return {"metadata": {"name": name, "namespace": "default", "uid": f"u-{name}",
                         "ownerReferences": [owner]}, "spec": {}, "status": {"phase": "Running"}}  # fmt: skip


async def test_a_child_deleted_before_the_watch_began_is_counted_as_cancelled_by_resync() -> None:
    from sandbox_operator.metrics import Metrics
    from sandbox_operator.taskset_controller import TaskSetController

    running = {"phase": "Running", "items": 4, "tasks": 8, "progress": {"created": 2}}
    api = _Tasks([body(running, parallelism=2)], [child("s-i0-0"), child("s-i0-1")])
    sets = TaskSetController(api, Metrics(dict, 1))  # type: ignore[arg-type]
    await sets.prime(["default"])
    # The watch's first list shows s-i0-0; s-i0-1 was deleted in between: no event ever comes.
    del api.objects["sandboxtasks"]["s-i0-1"]
    await sets.on_task("ADDED", child("s-i0-0"))
    await sets.resync()
    assert api.gets == ["s-i0-1"]
    status = api.objects["sandboxtasksets"]["s"]["status"]
    assert status["exitReasons"] == {"cancelled": 1}
    assert status["progress"]["created"] == 3  # and the next child took its place


async def test_without_the_set_crd_the_operator_starts_and_says_what_to_apply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from sandbox_operator.kube import KubeError
    from sandbox_operator.metrics import Metrics
    from sandbox_operator.taskset_controller import TaskSetController

    class NoSets(_Tasks):
        async def list(self, resource: str, namespace: str | None) -> list[dict[str, Any]]:
            if resource == "sandboxtasksets":
                raise KubeError(404, "NotFound", "the server could not find the requested resource")
            return await super().list(resource, namespace)

    sets = TaskSetController(NoSets([], []), Metrics(dict, 1))  # type: ignore[arg-type]
    await sets.prime(["default"])
    assert sets.sets == {}
    assert (
        "the SandboxTaskSet CRD is not installed (kubectl apply -f manifests/crd-taskset.yaml)"
        in caplog.text
    )


async def test_a_stale_event_of_a_set_the_operator_deleted_creates_nothing() -> None:
    """Events written before the TTL deleted the set may still be queued (the watch is behind):
    one of them, Running with children to create, must not bring the set back to life."""
    from sandbox_operator.metrics import Metrics
    from sandbox_operator.taskset_controller import TaskSetController

    done = {"phase": "Succeeded", "completionTime": "2025-01-01T00:00:00Z", "finished": 8,
            "items": 4, "tasks": 8, "progress": {"created": 8, "folded": "0-7"}}  # fmt: skip
    api = _Tasks([body(done, ttlSecondsAfterFinished=0)], [])
    sets = TaskSetController(api, Metrics(dict, 1))  # type: ignore[arg-type]
    await sets.prime(["default"])
    await sets.resync()
    assert api.objects["sandboxtasksets"] == {}, "the TTL has passed: the set is deleted"
    stale = body({"phase": "Running", "items": 4, "tasks": 8, "progress": {"created": 2}})
    await sets.on_set("MODIFIED", stale)
    assert api.objects["sandboxtasks"] == {}
    assert sets.sets == {}
    # Its DELETED event ends the matter; a new set of the same name (a new uid) runs.
    await sets.on_set("DELETED", stale)
    again = body()
    again["metadata"]["uid"] = "second-uid"
    api.objects["sandboxtasksets"]["s"] = again
    await sets.on_set("ADDED", again)
    assert sorted(api.objects["sandboxtasks"]) == ["s-i0-0", "s-i0-1", "s-i1-0"]
