"""Where a task's pod may run: the operator's scheduling (LLMSANDBOX_TASK_SCHEDULING) with the
task's own spec.scheduling merged in, such that a task narrows where its pod runs but never
leaves the nodes the operator keeps task pods on. SpecError names the field."""

from __future__ import annotations

from sandbox_agent.scheduling import (
    Affinity,
    NodeAffinity,
    NodeSelector,
    NodeSelectorTerm,
    PodAffinity,
    Scheduling,
)
from sandbox_agent.task import SandboxTask

from .errors import SpecError
from .settings import OperatorSettings

FIELD = "spec.scheduling"


def task_scheduling(task: SandboxTask, settings: OperatorSettings) -> Scheduling:
    """The scheduling of the task's pod; SpecError for a field the operator does not let tasks
    set (LLMSANDBOX_ALLOWED_SCHEDULING_FIELDS) or a node label it sets to another value."""
    allowed = settings.allowed_scheduling_fields
    for name in task.spec.scheduling.given():
        if name not in allowed:
            lets = f"only {', '.join(allowed)}" if allowed else "none of spec.scheduling"
            raise SpecError(
                f"{FIELD}.{name}",
                f"tasks may not set it on this cluster: the operator lets them set {lets} "
                "(LLMSANDBOX_ALLOWED_SCHEDULING_FIELDS)",
            )
    return merge_scheduling(settings.task_scheduling, task.spec.scheduling)


def merge_scheduling(operator: Scheduling, task: Scheduling) -> Scheduling:
    """The operator's scheduling with the task's merged in (docs/operator.md, "Task pod
    placement and image pull secrets"):

    - nodeSelector: both, key by key; a key the operator sets keeps its value, and a task
      giving it another is refused (SpecError) rather than run elsewhere than it asked;
    - tolerations: the operator's, then the task's that are not among them;
    - affinity: both hold. A node must match one of the operator's required node terms and one
      of the task's (each pair of terms joined into one); every other list of terms is joined;
    - priorityClassName, topologySpreadConstraints: the task's when it gives them, else the
      operator's (they rank and spread pods, they do not open nodes).
    """
    for key, value in task.node_selector.items():
        theirs = operator.node_selector.get(key)
        if theirs is not None and theirs != value:
            raise SpecError(
                f"{FIELD}.nodeSelector.{key}",
                f"{value!r} is not allowed: the operator runs every task pod on nodes with "
                f"{key}={theirs} (LLMSANDBOX_TASK_SCHEDULING)",
            )
    tolerations = [*operator.tolerations]
    tolerations += [t for t in task.tolerations if t not in operator.tolerations]
    # Copies, not new models: the parts are validated, and input caps do not bound merges.
    return operator.model_copy(
        update={
            "node_selector": {**operator.node_selector, **task.node_selector},
            "tolerations": tolerations,
            "affinity": _both_affinities(operator.affinity, task.affinity),
            "priority_class_name": task.priority_class_name or operator.priority_class_name,
            "topology_spread_constraints": (
                task.topology_spread_constraints or operator.topology_spread_constraints
            ),
        }
    )


def _both_affinities(first: Affinity | None, second: Affinity | None) -> Affinity | None:
    if first is None or second is None:
        return first or second
    return first.model_copy(
        update={
            "node_affinity": _both_node_affinities(first.node_affinity, second.node_affinity),
            "pod_affinity": _both_pod_affinities(first.pod_affinity, second.pod_affinity),
            "pod_anti_affinity": _both_pod_affinities(
                first.pod_anti_affinity, second.pod_anti_affinity
            ),
        }
    )


def _both_node_affinities(
    first: NodeAffinity | None, second: NodeAffinity | None
) -> NodeAffinity | None:
    if first is None or second is None:
        return first or second
    return first.model_copy(
        update={
            "required_during_scheduling_ignored_during_execution": _both_node_selectors(
                first.required_during_scheduling_ignored_during_execution,
                second.required_during_scheduling_ignored_during_execution,
            ),
            "preferred_during_scheduling_ignored_during_execution": [
                *first.preferred_during_scheduling_ignored_during_execution,
                *second.preferred_during_scheduling_ignored_during_execution,
            ],
        }
    )


def _both_node_selectors(
    first: NodeSelector | None, second: NodeSelector | None
) -> NodeSelector | None:
    """Nodes matching both: terms are ORed, so (a1 or a2) and (b1 or b2) is every pair joined."""
    if first is None or second is None:
        return first or second
    terms = [
        NodeSelectorTerm.model_construct(
            match_expressions=[*a.match_expressions, *b.match_expressions],
            match_fields=[*a.match_fields, *b.match_fields],
        )
        for a in first.node_selector_terms
        for b in second.node_selector_terms
    ]
    return first.model_copy(update={"node_selector_terms": terms})


def _both_pod_affinities(
    first: PodAffinity | None, second: PodAffinity | None
) -> PodAffinity | None:
    """Required pod (anti-)affinity terms must all hold, so joining the lists keeps both."""
    if first is None or second is None:
        return first or second
    return first.model_copy(
        update={
            "required_during_scheduling_ignored_during_execution": [
                *first.required_during_scheduling_ignored_during_execution,
                *second.required_during_scheduling_ignored_during_execution,
            ],
            "preferred_during_scheduling_ignored_during_execution": [
                *first.preferred_during_scheduling_ignored_during_execution,
                *second.preferred_during_scheduling_ignored_during_execution,
            ],
        }
    )
