"""Kueue's pod integration as a task pod meets it, played on the emulated cluster.

`FakeKueue(api).install()` stands in for Kueue's pod webhook: a pod created with the label
`kueue.x-k8s.io/queue-name` gets the label `kueue.x-k8s.io/managed=true` and the scheduling gate
`kueue.x-k8s.io/admission` (the test kubelet leaves a gated pod unscheduled). The test then plays
Kueue's controllers: `admit` removes the gate (the Workload was admitted), `preempt` does what
Kueue's pod controller does to a pod whose Workload is evicted: the `TerminationTarget` condition
(reason `WorkloadEvictedDueTo<reason>`), then a delete. Kueue's finalizer
(`kueue.x-k8s.io/managed`) is left out: it only holds the deleted pod until Kueue has seen it
end, and the emulator's graceful deletion shows the operator the same events (the mark, the
deletionTimestamp, the final status, DELETED).
"""

from __future__ import annotations

from typing import Any

from .emulator import JSON, EmulatedApiServer, ResourceDef, now_rfc3339

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MANAGED_LABEL = "kueue.x-k8s.io/managed"
ADMISSION_GATE = "kueue.x-k8s.io/admission"
PODS = ("", "v1", "pods")


class FakeKueue:
    __test__ = False

    def __init__(self, api: EmulatedApiServer) -> None:
        self.api = api

    def install(self) -> FakeKueue:
        self.api.store.on_create.append(self._webhook)
        return self

    def uninstall(self) -> None:
        self.api.store.on_create.remove(self._webhook)

    def _webhook(self, res: ResourceDef, obj: JSON) -> None:
        labels = obj.get("metadata", {}).get("labels") or {}
        if res.key != PODS or not labels.get(QUEUE_LABEL):
            return
        labels[MANAGED_LABEL] = "true"
        spec = obj.setdefault("spec", {})
        spec["schedulingGates"] = [*(spec.get("schedulingGates") or []), {"name": ADMISSION_GATE}]

    def admit(self, name: str, namespace: str = "default") -> JSON:
        """The pod's Workload is admitted: its admission gate goes (other gates stay)."""
        pod = self.api.get("pods", name, namespace)
        assert pod is not None, f"pod {namespace}/{name} does not exist"
        gates = [g for g in pod["spec"].get("schedulingGates") or [] if g["name"] != ADMISSION_GATE]
        return self.api.patch("pods", name, {"spec": {"schedulingGates": gates or None}}, namespace)

    def preempt(
        self,
        name: str,
        namespace: str = "default",
        *,
        reason: str = "Preempted",
        message: str = "Preempted to accommodate a workload (UID: w-high) due to prioritization "
        "in the ClusterQueue",
    ) -> None:
        """Kueue evicts the pod's Workload (`reason`, as the Workload's Evicted condition has
        it): the pod is marked, then deleted."""
        condition: dict[str, Any] = {
            "type": "TerminationTarget",
            "status": "True",
            "reason": f"WorkloadEvictedDueTo{reason}",
            "message": message,
            "lastTransitionTime": now_rfc3339(),
        }
        self.api.patch(
            "pods", name, {"status": {"conditions": [condition]}}, namespace, subresource="status"
        )
        self.api.delete("pods", name, namespace)
