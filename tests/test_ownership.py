"""Which objects found in the API the operator takes as its own: a table of pods, ConfigMaps and
NetworkPolicies that differ from what it would make, each with the sentence that says how."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from sandbox_agent.scheduling import Scheduling
from sandbox_agent.task import LocalObjectReference, parse_task
from sandbox_operator.ownership import (
    claim_problem,
    foreign_configmap_problem,
    foreign_pod_problem,
    policy_drift,
)
from sandbox_operator.pod_builder import build_pod
from sandbox_operator.policy import shared_policies, task_policy
from sandbox_operator.settings import OperatorSettings
from sandbox_operator.task_configmap import build_task_configmap

UID = "0b9c1f0e-1111-4d2a-9e8f-1a2b3c4d5e6f"
SETTINGS = OperatorSettings(
    default_model="m", default_base_url="http://vllm.inference:8000/v1", default_api_key_secret="k"
)
TASK = parse_task(
    {
        "apiVersion": "llmsandbox.io/v1alpha1",
        "kind": "SandboxTask",
        "metadata": {"name": "t"},
        "spec": {"prompt": "p", "inputs": [{"path": "a.txt", "content": "A"}]},
    }
)
DESIRED_POD = build_pod(TASK, namespace="ns", uid=UID, attempt=1, settings=SETTINGS)
DESIRED_CONFIGMAP = build_task_configmap(TASK, namespace="ns", uid=UID, settings=SETTINGS)

Edit = Callable[[dict[str, Any]], None]


def as_stored(obj: dict[str, Any]) -> dict[str, Any]:
    """The object as the API server returns it after creating, admitting and scheduling it."""
    stored = copy.deepcopy(obj)
    stored["metadata"].update(uid="pod-uid", resourceVersion="7", creationTimestamp="2026-01-01")
    spec = stored["spec"]
    spec.update(
        dnsPolicy="ClusterFirst",
        schedulerName="default-scheduler",
        serviceAccountName="default",
        serviceAccount="default",
        nodeName="node-1",
        priority=0,
        tolerations=[{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}],
    )
    for container in spec["containers"] + spec["initContainers"]:
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        container["imagePullPolicy"] = "IfNotPresent"
    for volume in spec["volumes"]:
        for source in ("configMap", "projected", "downwardAPI"):
            if source in volume:
                volume[source]["defaultMode"] = 420
        # The downward API's field references get their default apiVersion, wherever they are.
        sources = [volume, *volume.get("projected", {}).get("sources", [])]
        for item in [i for s in sources for i in s.get("downwardAPI", {}).get("items", [])]:
            item["fieldRef"]["apiVersion"] = "v1"
    # A LimitRange filled in a resource the operator left open.
    spec["containers"][0]["resources"].setdefault("limits", {})["ephemeral-storage"] = "1Gi"
    stored["status"] = {"phase": "Running"}
    return stored


def test_the_operators_own_pod_as_the_api_returns_it_is_adopted() -> None:
    assert foreign_pod_problem(as_stored(DESIRED_POD), DESIRED_POD, UID) is None


def test_quantities_the_api_server_wrote_in_canonical_form_still_match() -> None:
    task = parse_task(
        {
            "apiVersion": "llmsandbox.io/v1alpha1",
            "kind": "SandboxTask",
            "metadata": {"name": "t"},
            "spec": {
                "prompt": "p",
                "sandbox": {
                    "resources": {
                        "requests": {"cpu": "0.5"},
                        "limits": {"memory": "1024Mi", "ephemeral-storage": "2048Mi"},
                    }
                },
            },
        }
    )
    desired = build_pod(task, namespace="ns", uid=UID, attempt=1, settings=SETTINGS)
    stored = as_stored(desired)
    sandbox = stored["spec"]["containers"][0]
    sandbox["resources"] = {
        "requests": {"cpu": "500m"},
        "limits": {"memory": "1Gi", "ephemeral-storage": "2Gi"},
    }
    workspace = next(v for v in stored["spec"]["volumes"] if v["name"] == "workspace")
    workspace["emptyDir"]["sizeLimit"] = "2Gi"
    assert foreign_pod_problem(stored, desired, UID) is None
    sandbox["resources"]["limits"]["memory"] = "2Gi"
    problem = foreign_pod_problem(stored, desired, UID)
    assert problem is not None
    assert "spec.containers[0].resources.limits.memory is '2Gi', not '1024Mi'" in problem


def _at(obj: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        obj = obj[part]
    return obj


def _set(*path_and_value: Any) -> Edit:
    """Set the value at a path of keys and list indexes (keys may hold dots)."""
    *path, leaf, value = path_and_value

    def edit(obj: dict[str, Any]) -> None:
        _at(obj, tuple(path))[leaf] = value

    return edit


def _append(*path_and_value: Any) -> Edit:
    *path, value = path_and_value

    def edit(obj: dict[str, Any]) -> None:
        _at(obj, tuple(path)).append(value)

    return edit


POD_CASES: list[tuple[str, Edit, str]] = [
    ("namespace", _set("metadata", "namespace", "attacker"), "it is in namespace 'attacker'"),
    (
        "no-owner",
        _set("metadata", "ownerReferences", []),
        "it has no controller owner reference to the task",
    ),
    (
        "owner-not-controller",
        _set("metadata", "ownerReferences", 0, "controller", False),
        "no controller owner reference",
    ),
    (
        "owner-other-task",
        _set("metadata", "ownerReferences", 0, "uid", "other-uid"),
        "its controller owner reference is to uid other-uid, not to the task",
    ),
    (
        "network-label",
        _set("metadata", "labels", "llmsandbox.io/network", "internet"),
        "label llmsandbox.io/network is 'internet', not 'isolated'",
    ),
    (
        "sidecar",
        _append("spec", "containers", {"name": "spy", "image": "spy"}),
        "spec.containers has 3 entries, not 2",
    ),
    (
        "agent-image",
        _set("spec", "containers", 1, "image", "evil/agent"),
        "spec.containers[1].image is 'evil/agent', not 'llm-sandbox/agent:0.1.0'",
    ),
    (
        "agent-args",
        _set("spec", "containers", 1, "args", ["--x"]),
        "spec.containers[1].args is set",
    ),
    (
        "post-start-hook",
        _set("spec", "containers", 1, "lifecycle", {"postStart": {"exec": {"command": ["sh"]}}}),
        "spec.containers[1].lifecycle is set",
    ),
    (
        "sandbox-env",
        _append("spec", "containers", 0, "env", {"name": "X", "value": "1"}),
        "spec.containers[0].env has 2 entries, not 1",
    ),
    (
        "key-from-another-secret",
        _set("spec", "containers", 1, "env", 0, "valueFrom", "secretKeyRef", "name", "other"),
        "spec.containers[1].env[0].valueFrom.secretKeyRef.name is 'other', not 'k'",
    ),
    (
        "privileged-sandbox",
        _set("spec", "containers", 0, "securityContext", "privileged", True),
        "spec.containers[0].securityContext.privileged is True, not False",
    ),
    (
        "service-account-token",
        _set("spec", "automountServiceAccountToken", True),
        "spec.automountServiceAccountToken is True, not False",
    ),
    (
        "shared-process-namespace",
        _set("spec", "shareProcessNamespace", True),
        "spec.shareProcessNamespace is set",
    ),
    (
        "host-aliases",
        _set("spec", "hostAliases", [{"ip": "6.6.6.6", "hostnames": ["vllm.inference"]}]),
        "spec.hostAliases is set",
    ),
    ("dns-policy", _set("spec", "dnsPolicy", "None"), "spec.dnsPolicy is set ('None')"),
    ("host-network", _set("spec", "hostNetwork", True), "spec.hostNetwork is set"),
    (
        "host-path-workspace",
        _set("spec", "volumes", 2, {"name": "workspace", "hostPath": {"path": "/"}}),
        "spec.volumes[2].emptyDir is missing",
    ),
    (
        "other-volume-default-mode",
        _set("spec", "volumes", 5, "downwardAPI", "defaultMode", 0o777),
        "spec.volumes[5].downwardAPI.defaultMode is set (511)",
    ),
    (
        "other-task-json",
        _set("metadata", "annotations", "file.llmsandbox.io/task.json", '{"prompt": "leak"}'),
        "annotation file.llmsandbox.io/task.json differs from the task's",
    ),
    (
        "other-input",
        _set("metadata", "annotations", "file.llmsandbox.io/input-0", "B"),
        "annotation file.llmsandbox.io/input-0 differs from the task's",
    ),
    (
        "extra-task-file",
        _set("metadata", "annotations", "file.llmsandbox.io/input-9", "C"),
        "annotation file.llmsandbox.io/input-9 differs from the task's",
    ),
    (
        "file-from-another-annotation",
        _set(
            "spec",
            "volumes",
            5,
            "downwardAPI",
            "items",
            0,
            "fieldRef",
            "fieldPath",
            "metadata.annotations['notes']",
        ),
        "spec.volumes[5].downwardAPI.items[0].fieldRef.fieldPath",
    ),
]


def test_the_operators_placed_pod_is_adopted_whatever_admission_added_to_its_placement() -> None:
    placed = SETTINGS.model_copy(
        update={
            "task_scheduling": Scheduling.model_validate(
                {
                    "nodeSelector": {"pool": "sandbox"},
                    "tolerations": [{"key": "sandbox", "operator": "Exists"}],
                    "priorityClassName": "batch",
                }
            ),
            "task_image_pull_secrets": [LocalObjectReference(name="regcred")],
        }
    )
    desired = build_pod(TASK, namespace="ns", uid=UID, attempt=1, settings=placed)
    stored = as_stored(desired)  # DefaultTolerationSeconds' tolerations replace the operator's
    spec = stored["spec"]
    spec["nodeSelector"]["kueue.x-k8s.io/flavor"] = "spot"  # a RuntimeClass's or Kueue's
    spec["priority"] = 1000
    assert desired["spec"]["tolerations"] != spec["tolerations"]
    assert foreign_pod_problem(stored, desired, UID) is None


@pytest.mark.parametrize(("edit", "why"), [c[1:] for c in POD_CASES], ids=[c[0] for c in POD_CASES])
def test_a_pod_that_differs_from_the_operators_is_not_adopted(edit: Edit, why: str) -> None:
    found = as_stored(DESIRED_POD)
    edit(found)
    problem = foreign_pod_problem(found, DESIRED_POD, UID)
    assert problem is not None
    assert problem.startswith("pod ns/t-a1 was not created by the operator: ")
    assert why in problem


def test_a_claim_needs_the_namespace_and_the_controller_owner() -> None:
    assert claim_problem(DESIRED_POD, namespace="ns", task_uid=UID) is None
    assert claim_problem(DESIRED_POD, namespace="other", task_uid=UID) is not None
    assert claim_problem(DESIRED_POD, namespace="ns", task_uid="another") is not None


def test_the_operators_own_configmap_is_adopted() -> None:
    stored = copy.deepcopy(DESIRED_CONFIGMAP)
    stored["metadata"].update(uid="cm-uid", resourceVersion="3")
    assert foreign_configmap_problem(stored, DESIRED_CONFIGMAP, UID) is None


CONFIGMAP_CASES: list[tuple[str, Edit, str]] = [
    ("no-owner", _set("metadata", "ownerReferences", []), "it has no controller owner reference"),
    (
        "other-task-json",
        _set("data", "task.json", '{"model": {"baseURL": "http://evil/v1"}}'),
        "its data differs from the task's at key 'task.json'",
    ),
    ("extra-key", _set("data", "extra", "x"), "its data differs from the task's at key 'extra'"),
    ("binary-data", _set("binaryData", {"input-0": "QQ=="}), "it has binaryData"),
    (
        "task-label",
        _set("metadata", "labels", "llmsandbox.io/task-uid", "x"),
        "label llmsandbox.io/task-uid is 'x'",
    ),
]


@pytest.mark.parametrize(
    ("edit", "why"), [c[1:] for c in CONFIGMAP_CASES], ids=[c[0] for c in CONFIGMAP_CASES]
)
def test_a_configmap_that_differs_from_the_operators_is_not_adopted(edit: Edit, why: str) -> None:
    found = copy.deepcopy(DESIRED_CONFIGMAP)
    edit(found)
    problem = foreign_configmap_problem(found, DESIRED_CONFIGMAP, UID)
    assert problem is not None
    assert problem.startswith("configmap ns/t-task was not created by the operator for this task")
    assert why in problem


def test_a_policy_needs_no_update_only_when_spec_labels_and_owner_are_the_operators() -> None:
    (isolated, *_) = shared_policies("ns", SETTINGS)
    assert policy_drift(copy.deepcopy(isolated), isolated) is None
    opened = copy.deepcopy(isolated)
    opened["spec"]["podSelector"] = {}
    assert policy_drift(opened, isolated) == "its spec differs"
    unlabelled = copy.deepcopy(isolated)
    unlabelled["metadata"]["labels"] = {}
    assert policy_drift(unlabelled, isolated) == (
        "label app.kubernetes.io/name is None, not 'llm-sandbox'"
    )
    allow = parse_task(
        {
            "apiVersion": "llmsandbox.io/v1alpha1",
            "kind": "SandboxTask",
            "metadata": {"name": "t"},
            "spec": {
                "prompt": "p",
                "sandbox": {"network": {"mode": "allowList", "allow": ["1.1.1.1:443"]}},
            },
        }
    )
    own = task_policy(allow, namespace="ns", uid=UID, settings=SETTINGS)
    assert own is not None
    orphan = copy.deepcopy(own)
    orphan["metadata"]["ownerReferences"] = []
    assert policy_drift(orphan, own) == "its owner references differ"
