"""The Python API on a cluster: submit a SandboxTask or SandboxTaskSet (the pydantic models), wait
for it, and stream a set's finished tasks as they finish (for eval and RL code)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from sandbox_agent.result import TERMINAL_PHASES
from sandbox_agent.task import SandboxTask
from sandbox_agent.taskset import SandboxTaskSet

from .kube import TASKS, TASKSETS, KubeClient
from .taskset_children import ANNOTATION_ITEM_ID, LABEL_SAMPLE, LABEL_SET, owning_set_uid
from .taskset_status import TERMINAL_SET_PHASES


@dataclass(frozen=True)
class FinishedTask:
    """One finished task of a set, as its status tells it."""

    name: str
    item_id: str
    sample: int
    phase: str
    exit_reason: str | None
    answer: str | None
    score: float | None
    artifacts_url: str | None

    @classmethod
    def of(cls, body: dict[str, Any]) -> FinishedTask:
        meta, status = body["metadata"], body.get("status") or {}
        return cls(
            name=meta["name"],
            item_id=str((meta.get("annotations") or {}).get(ANNOTATION_ITEM_ID, "")),
            sample=int((meta.get("labels") or {}).get(LABEL_SAMPLE, 0)),
            phase=str(status.get("phase")),
            exit_reason=status.get("exitReason"),
            answer=status.get("answer"),
            score=status.get("score"),
            artifacts_url=status.get("artifactsURL"),
        )


class ClusterClient:
    """`async with ClusterClient.connect() as client:` (service account, else KUBECONFIG)."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube

    @classmethod
    def connect(cls) -> ClusterClient:
        return cls(KubeClient.from_environment())

    async def __aenter__(self) -> ClusterClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.kube.close()

    async def submit_task(self, task: SandboxTask, namespace: str) -> str:
        return await self._submit(
            TASKS, task.model_dump(mode="json", by_alias=True, exclude_none=True), namespace
        )

    async def submit_set(self, taskset: SandboxTaskSet, namespace: str) -> str:
        body = taskset.model_dump(mode="json", by_alias=True, exclude_none=True)
        return await self._submit(TASKSETS, body, namespace)

    async def _submit(self, resource: str, body: dict[str, Any], namespace: str) -> str:
        body.pop("status", None)
        body["metadata"] = {**body.get("metadata", {}), "namespace": namespace}
        created = await self.kube.create(resource, namespace, body)
        return str(created["metadata"]["name"])

    async def task_status(self, name: str, namespace: str) -> dict[str, Any]:
        return await self._status(TASKS, name, namespace)

    async def set_status(self, name: str, namespace: str) -> dict[str, Any]:
        return await self._status(TASKSETS, name, namespace)

    async def _status(self, resource: str, name: str, namespace: str) -> dict[str, Any]:
        found = await self.kube.get(resource, namespace, name)
        if found is None:
            raise LookupError(f"{resource} {namespace}/{name} not found")
        return dict(found.get("status") or {})

    async def wait_task(
        self, name: str, namespace: str, poll_seconds: float = 2.0
    ) -> dict[str, Any]:
        """The task's status once it is terminal."""
        return await self._wait(TASKS, name, namespace, TERMINAL_PHASES, poll_seconds)

    async def stream_results(
        self, set_name: str, namespace: str, poll_seconds: float = 2.0
    ) -> AsyncIterator[FinishedTask]:
        """Each finished task of the set, once, as it finishes; ends when the set has finished.
        Tasks deleted before they were seen (a short template TTL) are not yielded."""
        seen: set[str] = set()
        while True:
            found = await self.kube.get(TASKSETS, namespace, set_name)
            if found is None:
                raise LookupError(f"sandboxtaskset {namespace}/{set_name} not found")
            done = (found.get("status") or {}).get("phase") in TERMINAL_SET_PHASES
            uid = found["metadata"]["uid"]
            for body in await self.kube.list(TASKS, namespace, {LABEL_SET: set_name}):
                name = body["metadata"]["name"]
                phase = (body.get("status") or {}).get("phase")
                if name in seen or owning_set_uid(body) != uid or phase not in TERMINAL_PHASES:
                    continue
                seen.add(name)
                yield FinishedTask.of(body)
            if done:
                return
            await asyncio.sleep(poll_seconds)

    async def wait_set(
        self, name: str, namespace: str, poll_seconds: float = 2.0
    ) -> dict[str, Any]:
        """The set's status once it is terminal."""
        return await self._wait(TASKSETS, name, namespace, TERMINAL_SET_PHASES, poll_seconds)

    async def _wait(
        self,
        resource: str,
        name: str,
        namespace: str,
        terminal: Collection[str],
        poll_seconds: float,
    ) -> dict[str, Any]:
        while True:
            status = await self._status(resource, name, namespace)
            if status.get("phase") in terminal:
                return status
            await asyncio.sleep(poll_seconds)
