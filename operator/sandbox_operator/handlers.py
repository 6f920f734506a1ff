"""kopf wiring: thin handlers that hand watch events to the Operator (see controller.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from typing import Any

import kopf

from sandbox_agent.wire import API_GROUP, API_VERSION

from .canary import Verdict, run_canary
from .controller import Operator
from .kube import TASKS, TASKSETS, KubeClient
from .metadata import MANAGED_SELECTOR
from .settings import load_settings
from .taskset_controller import TaskSetController

log = logging.getLogger("sandbox_operator")


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    # Only watch events are handled: no finalizers, no progress annotations, no extra writes.
    settings.persistence.finalizer = "llmsandbox.io/unused"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # kopf keeps a worker (its queue, its last event) per object for this long after the
    # object's last event: 5 s by default, a quarter of the operator's memory under load.
    settings.queueing.idle_timeout = 1.0
    config = load_settings()
    kube = KubeClient.from_environment()
    operator = Operator(config, kube)
    await operator.prime(config.watched_namespaces)
    sets = TaskSetController(kube, operator.metrics)
    await sets.prime(config.watched_namespaces)
    memo["sets"] = sets
    if config.metrics_port:
        operator.metrics.serve(config.metrics_port)
    memo["operator"] = operator
    memo["queue_refresher"] = asyncio.create_task(_refresh_queue(operator, sets))
    memo["expirer"] = asyncio.create_task(_delete_expired(operator))
    if config.netpol_canary:
        memo["canary"] = asyncio.create_task(run_canary(operator))
    # Everything made so far (modules, settings, the primed cache) lives as long as the process:
    # moved out of the collector's generations, it is not scanned again by every full collection.
    gc.collect()
    gc.freeze()
    log.info(
        "llm-sandbox operator started: maxRunningTasks=%d, %d tasks known",
        config.max_running_tasks,
        len(operator.tasks),
    )


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    for name in ("queue_refresher", "expirer"):
        timer: asyncio.Task[None] | None = memo.get(name)
        if timer is not None:
            timer.cancel()
    canary: asyncio.Task[Verdict] | None = memo.get("canary")
    if canary is not None and not canary.done():
        canary.cancel()
        # Its clean-up deletes the canary pod.
        await asyncio.gather(canary, return_exceptions=True)
    operator: Operator | None = memo.get("operator")
    if operator is not None:
        await operator.kube.close()


async def _refresh_queue(operator: Operator, sets: TaskSetController) -> None:
    """The operator's only timer: queue positions, pods that never start, the shared
    NetworkPolicies of namespaces with active tasks, and sets whose last plan was cut short."""
    while True:
        await asyncio.sleep(operator.settings.queue_refresh_seconds)
        try:
            await operator.refresh_queue_positions()
            await operator.fail_pods_that_never_start()
            await operator.reconcile_policies()
            await sets.resync()
        except Exception:
            # A failed round (API hiccup) is retried on the next one; it must not stop them.
            log.exception("the periodic queue, start-timeout and policy round failed")


async def _delete_expired(operator: Operator) -> None:
    """Finished tasks deleted as their TTLs pass: asleep until the next one is due, or until a
    task finishes with an earlier one."""
    while True:
        operator.expiry_changed.clear()
        try:
            wait = await operator.delete_expired()
        except Exception:
            log.exception("deleting finished tasks failed; retrying in a minute")
            wait = 60.0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(operator.expiry_changed.wait(), wait)


# The handlers take the event's object as parsed from the watch stream (kopf's raw event, made
# afresh for each event), not a copy of kopf's Body view: the operator parses it into typed
# records at once and never mutates what it is given.


@kopf.on.event(API_GROUP, API_VERSION, TASKS)
async def task_event(type: str | None, event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    operator: Operator = memo["operator"]
    body = dict(event["object"])
    await operator.on_task(type, body)
    sets: TaskSetController = memo["sets"]
    await sets.on_task(type, body)


@kopf.on.event(API_GROUP, API_VERSION, TASKSETS)
async def taskset_event(type: str | None, event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    sets: TaskSetController = memo["sets"]
    await sets.on_set(type, dict(event["object"]))


@kopf.on.event("", "v1", "pods", labels=MANAGED_SELECTOR)
async def pod_event(type: str | None, event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    operator: Operator = memo["operator"]
    await operator.on_pod(type, dict(event["object"]))
