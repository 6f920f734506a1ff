"""Keeping the NetworkPolicies a task's pod relies on at their desired spec.

Never created once and trusted: a policy made beforehand under a shared name (selecting
nothing, allowing everything) or edited since would leave task pods open, since policies only
add up. The shared ones are read before a namespace's first pod and then at most once per
refresh period (`Operator.reconcile_policies` runs every period too), which costs no API call
per task in a busy namespace.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sandbox_agent.task import SandboxTask

from .kube import ConflictError, KubeClient, KubeError
from .ownership import policy_drift
from .policy import shared_policies, task_policy
from .settings import OperatorSettings

log = logging.getLogger("sandbox_operator")

# Replacing a NetworkPolicy that changes between our read and our write is tried this often.
_WRITE_ATTEMPTS = 3


class PolicyKeeper:
    def __init__(self, settings: OperatorSettings, kube: KubeClient) -> None:
        self.settings = settings
        self.kube = kube
        # When each namespace's shared policies were last read and, if need be, corrected.
        self._checked: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def for_task(self, task: SandboxTask, namespace: str, uid: str) -> None:
        """The namespace's shared policies and the task's own, before its pod is created."""
        await self.shared(namespace)
        own = task_policy(task, namespace=namespace, uid=uid, settings=self.settings)
        if own is not None:
            await self.ensure(own)

    async def shared(self, namespace: str, *, force: bool = False) -> None:
        """The namespace's three shared policies, unless checked within the refresh period."""
        # The namespace's policy lock: the innermost lock (taken under a task lock or none;
        # nothing is taken under it). Tasks starting together in a namespace then read and
        # write its policies once, not each (and not racing to 409s).
        async with self._locks.setdefault(namespace, asyncio.Lock()):
            now = asyncio.get_running_loop().time()
            last = self._checked.get(namespace)
            if not force and last is not None and now - last < self.settings.queue_refresh_seconds:
                return
            for policy in shared_policies(namespace, self.settings):
                await self.ensure(policy)
            self._checked[namespace] = asyncio.get_running_loop().time()

    async def ensure(self, desired: dict[str, Any]) -> None:
        """Create a NetworkPolicy, or replace the one of its name when it differs."""
        meta = desired["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        for _ in range(_WRITE_ATTEMPTS):
            found = await self.kube.get("networkpolicies", namespace, name)
            if found is None:
                try:
                    await self.kube.create("networkpolicies", namespace, desired)
                    return
                except ConflictError:
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
