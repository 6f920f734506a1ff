"""Whether an object found in the API is the one the operator made for a task.

Pods, ConfigMaps and policies have predictable names, and anyone who can create objects in a
namespace can make one first (the operator's create then fails with 409), or make one elsewhere
that carries a task's labels. So nothing is believed for its name or labels alone: a pod counts
for a task only in the task's namespace with a controller owner reference to the task, and an
object adopted after a 409 must also hold what the operator would have put there. Pure
functions: each returns what is wrong in one sentence, or None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sandbox_agent.quantity import parse_quantity

from .metadata import FILE_ANNOTATION_PREFIX

# Pod spec fields the API server, its admission plugins or the scheduler fill in or may set on a
# pod the operator created; any value is accepted, the operator's own placement too (admission
# adds tolerations, a RuntimeClass or Kueue node selectors), since none of them changes what runs
# in the pod or what it may reach (scheduling and image pull credentials only).
_SERVER_SET_POD_FIELDS = frozenset(
    {
        "nodeName",
        "nodeSelector",
        "affinity",
        "tolerations",
        "topologySpreadConstraints",
        "priority",
        "priorityClassName",
        "preemptionPolicy",
        "schedulerName",
        "serviceAccountName",
        "serviceAccount",
        "imagePullSecrets",
        "overhead",
        "schedulingGates",
    }
)
# Defaults the API server writes where the operator set nothing: accepted only with this value.
_POD_DEFAULTS: dict[str, Any] = {"dnsPolicy": "ClusterFirst"}
_CONTAINER_DEFAULTS: dict[str, Any] = {
    "terminationMessagePath": "/dev/termination-log",
    "terminationMessagePolicy": "File",
}
_CONTAINER_SERVER_SET = frozenset({"imagePullPolicy"})
_VOLUME_SOURCE_DEFAULTS: dict[str, Any] = {"defaultMode": 420}


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the object's controller owner reference, if it has one."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid", ""))
    return None


def _describe(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    kind = str(obj.get("kind") or "object").lower()
    return f"{kind} {meta.get('namespace', '?')}/{meta.get('name', '?')}"


def claim_problem(obj: Mapping[str, Any], *, namespace: str, task_uid: str) -> str | None:
    """Why `obj` does not belong to the task `task_uid` in `namespace`, or None when it does."""
    meta = obj.get("metadata") or {}
    if meta.get("namespace", "default") != namespace:
        return f"it is in namespace {meta.get('namespace')!r}, the task in {namespace!r}"
    owner = controller_uid(obj)
    if owner is None:
        return "it has no controller owner reference to the task"
    if owner != task_uid:
        return f"its controller owner reference is to uid {owner}, not to the task ({task_uid})"
    return None


def _labels_problem(found: Mapping[str, Any], desired: Mapping[str, Any]) -> str | None:
    have = (found.get("metadata") or {}).get("labels") or {}
    for key, value in ((desired.get("metadata") or {}).get("labels") or {}).items():
        if have.get(key) != value:
            return f"label {key} is {have.get(key)!r}, not {value!r}"
    return None


def _files_problem(found: Mapping[str, Any], desired: Mapping[str, Any]) -> str | None:
    """The task files a pod carries as annotations (agent_config.py) must be exactly the
    desired ones: they are what the agent runs and what the sandbox gets as inputs."""
    have = (found.get("metadata") or {}).get("annotations") or {}
    want = (desired.get("metadata") or {}).get("annotations") or {}
    keys = {k for k in have.keys() | want.keys() if k.startswith(FILE_ANNOTATION_PREFIX)}
    for key in sorted(keys):
        if have.get(key) != want.get(key):
            return f"annotation {key} differs from the task's"
    return None


def _difference(found: Any, desired: Any, path: str) -> str | None:
    """The first place where `found` differs from `desired`; dicts in `found` may hold only the
    extra keys that the server fills in (see the tables above)."""
    if isinstance(desired, Mapping) and isinstance(found, Mapping):
        for key, want in desired.items():
            if key not in found:
                return f"{path}.{key} is missing"
            problem = _difference(found[key], want, f"{path}.{key}")
            if problem:
                return problem
        for key in found.keys() - desired.keys():
            if not _server_filled(path, key, found[key]):
                return (
                    f"{path}.{key} is set ({_short(found[key])}), the operator sets no such field"
                )
        return None
    if isinstance(desired, list) and isinstance(found, list):
        if len(found) != len(desired):
            return f"{path} has {len(found)} entries, not {len(desired)}"
        for i, (have, want) in enumerate(zip(found, desired, strict=True)):
            problem = _difference(have, want, f"{path}[{i}]")
            if problem:
                return problem
        return None
    if found != desired and not _same_quantity(path, found, desired):
        return f"{path} is {_short(found)}, not {_short(desired)}"
    return None


def _same_quantity(path: str, found: Any, desired: Any) -> bool:
    """The API server stores quantities in canonical form (0.5 -> 500m, 1024Mi -> 1Gi)."""
    if not (isinstance(found, str) and isinstance(desired, str)):
        return False
    if ".resources." not in path and not path.endswith(".sizeLimit"):
        return False
    try:
        return parse_quantity(found) == parse_quantity(desired)
    except ValueError:
        return False


def _server_filled(path: str, key: str, value: Any) -> bool:
    if path == "spec":
        return key in _SERVER_SET_POD_FIELDS or bool(_POD_DEFAULTS.get(key, object()) == value)
    last = path.rsplit(".", 1)[-1]
    if last.startswith(("containers[", "initContainers[")):
        return key in _CONTAINER_SERVER_SET or bool(_CONTAINER_DEFAULTS.get(key, object()) == value)
    if last in ("configMap", "secret", "projected", "downwardAPI") and ".volumes[" in path:
        return bool(_VOLUME_SOURCE_DEFAULTS.get(key, object()) == value)
    if last == "fieldRef":
        return key == "apiVersion" and value == "v1"  # the server's default
    # Admission (a LimitRange) may add requests or limits for resources the operator left open.
    return ".resources." in path + "."


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def foreign_pod_problem(
    found: Mapping[str, Any], desired: Mapping[str, Any], task_uid: str
) -> str | None:
    """Why a pod found under the task's pod name is not the pod the operator would create.

    Besides the claim (namespace, owner), labels and task files, its spec must equal the desired
    spec but for fields the server fills in: the same containers with the same images, commands,
    environment, mounts and security contexts, the same volumes, and nothing added (no extra or
    injected container, no `args`, lifecycle hooks, host namespaces or host aliases)."""
    namespace = str((desired.get("metadata") or {}).get("namespace", "default"))
    problem = (
        claim_problem(found, namespace=namespace, task_uid=task_uid)
        or _labels_problem(found, desired)
        or _files_problem(found, desired)
        or _difference(found.get("spec") or {}, _compared_spec(desired), "spec")
    )
    return f"{_describe(desired)} was not created by the operator: {problem}" if problem else None


def _compared_spec(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The desired pod's spec without the fields the server may set (or add to)."""
    spec: Mapping[str, Any] = pod.get("spec") or {}
    return {key: value for key, value in spec.items() if key not in _SERVER_SET_POD_FIELDS}


def foreign_configmap_problem(
    found: Mapping[str, Any], desired: Mapping[str, Any], task_uid: str
) -> str | None:
    """Why a ConfigMap found under the task's ConfigMap name is not the one the operator makes:
    its claim, labels, or any key of its data."""
    namespace = str((desired.get("metadata") or {}).get("namespace", "default"))
    problem = claim_problem(found, namespace=namespace, task_uid=task_uid) or _labels_problem(
        found, desired
    )
    if problem is None:
        have: Mapping[str, Any] = found.get("data") or {}
        want: Mapping[str, Any] = desired.get("data") or {}
        differing = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
        if differing:
            problem = f"its data differs from the task's at key {differing[0]!r}"
        elif found.get("binaryData"):
            problem = "it has binaryData, which the operator never writes"
    if problem is None:
        return None
    return (
        f"{_describe(desired)} was not created by the operator for this task: {problem} "
        "(or the task's spec changed after it was made)"
    )


def policy_drift(found: Mapping[str, Any], desired: Mapping[str, Any]) -> str | None:
    """How a NetworkPolicy in the API differs from the desired one (spec, labels, owner), or
    None when it needs no update."""
    if found.get("spec") != desired.get("spec"):
        return "its spec differs"
    problem = _labels_problem(found, desired)
    if problem:
        return problem
    want_owners = (desired.get("metadata") or {}).get("ownerReferences")
    if want_owners and (found.get("metadata") or {}).get("ownerReferences") != want_owners:
        return "its owner references differ"
    return None
