"""The names, labels and owner reference every object of a task carries (pod, ConfigMap,
NetworkPolicy), so that the operator finds them again and Kubernetes collects them with the task."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from sandbox_agent.task import NetworkMode, SandboxTask
from sandbox_agent.wire import (
    ANNOTATION_TASK_NAME,
    API_GROUP,
    API_VERSION,
    KIND,
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_NETWORK,
    LABEL_TASK,
    LABEL_TASK_UID,
    LABEL_VALUE_PATTERN,
    MANAGED_BY,
    MAX_LABEL_LENGTH,
    MAX_NAME_LENGTH,
)

from .errors import SpecError

NETWORK_LABEL_VALUES = {
    NetworkMode.ISOLATED: "isolated",
    NetworkMode.INTERNET: "internet",
    NetworkMode.ALLOW_LIST: "allowlist",
}
# What selects every object the operator made (the watch and the start-up listing use it).
MANAGED_SELECTOR = {LABEL_MANAGED_BY: MANAGED_BY}
_LABEL_VALUE = re.compile(LABEL_VALUE_PATTERN)


def bounded_name(base: str, suffix: str, *, max_length: int, dns_label: bool = False) -> str:
    """`base + suffix` when that is a valid name of max_length, else a shortened base with a hash.

    The hash is of the full base, so two long names that share a prefix still differ.
    """
    candidate = base + suffix
    if len(candidate) <= max_length and not (dns_label and "." in candidate):
        return candidate
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    stem = base.replace(".", "-") if dns_label else base
    room = max_length - len(suffix) - len(digest) - 1
    # A cut may end on '-' or '.', which no DNS name may end a segment with.
    stem = stem[:room].rstrip("-.")
    return f"{stem}-{digest}{suffix}" if stem else f"{digest}{suffix}"


def task_name(task: SandboxTask) -> str:
    if not task.metadata.name:
        raise SpecError("metadata.name", "a task on a cluster needs a name")
    return task.metadata.name


def task_configmap_name(task_name: str) -> str:
    return bounded_name(task_name, "-task", max_length=MAX_NAME_LENGTH)


def network_label(task: SandboxTask) -> str:
    return NETWORK_LABEL_VALUES[task.spec.sandbox.network.mode]


def task_labels(task: SandboxTask, uid: str) -> dict[str, str]:
    """Labels on every object of a task; the pod adds its attempt."""
    name = task_name(task)
    labels = {
        LABEL_NAME: "llm-sandbox",
        LABEL_COMPONENT: "task",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_TASK_UID: uid,
        LABEL_NETWORK: network_label(task),
    }
    # Task names may be 253 characters, label values only 63; the UID label always selects.
    if len(name) <= MAX_LABEL_LENGTH and _LABEL_VALUE.match(name):
        labels[LABEL_TASK] = name
    return labels


def owner_reference(task: SandboxTask, uid: str) -> dict[str, Any]:
    """Makes the object garbage with its task, and lets kopf route its events to the task."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": task_name(task),
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


# The task's files (task.json, inline inputs) as pod annotations, one per file under this prefix,
# projected into the containers with the downward API (agent_config.py).
FILE_ANNOTATION_PREFIX = "file.llmsandbox.io/"


def task_metadata(task: SandboxTask, *, name: str, namespace: str, uid: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": task_labels(task, uid),
        "annotations": {ANNOTATION_TASK_NAME: task_name(task)},
        "ownerReferences": [owner_reference(task, uid)],
    }
