"""The per-task ConfigMap the agent reads, and the cluster-only checks a task must pass first.

Also home to the metadata every object of a task shares (names, labels, owner reference), since
the pod, the ConfigMap and the NetworkPolicy all build on it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from pathlib import PurePosixPath
from typing import Any

from sandbox_agent.podconfig import PodModelConfig, PodTaskConfig
from sandbox_agent.task import (
    API_GROUP,
    API_VERSION,
    KIND,
    InputFile,
    NetworkMode,
    SandboxTask,
    SecretKeyRef,
    parse_allow_entry,
)

from .addresses import containing_exclusion
from .endpoints import base_url_problem, is_ip_address, parse_endpoint
from .errors import SpecError
from .resources import runtime_class, sandbox_resources
from .settings import OperatorSettings

TASK_CONFIG_KEY = "task.json"
MANAGED_BY = "llm-sandbox-operator"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_TASK = "llmsandbox.io/task"
LABEL_TASK_UID = "llmsandbox.io/task-uid"
LABEL_ATTEMPT = "llmsandbox.io/attempt"
LABEL_NETWORK = "llmsandbox.io/network"
ANNOTATION_TASK_NAME = "llmsandbox.io/task-name"

NETWORK_LABEL_VALUES = {
    NetworkMode.ISOLATED: "isolated",
    NetworkMode.INTERNET: "internet",
    NetworkMode.ALLOW_LIST: "allowlist",
}

# The API server refuses a ConfigMap whose keys plus values exceed 1 MiB.
MAX_CONFIGMAP_BYTES = 1024 * 1024
MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


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


def inline_input_key(index: int) -> str:
    """The task ConfigMap key that holds the content of spec.inputs[index]."""
    return f"input-{index}"


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


def task_metadata(task: SandboxTask, *, name: str, namespace: str, uid: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": task_labels(task, uid),
        "annotations": {ANNOTATION_TASK_NAME: task_name(task)},
        "ownerReferences": [owner_reference(task, uid)],
    }


def resolve_model(task: SandboxTask, settings: OperatorSettings) -> tuple[str, str]:
    """The model name and base URL the agent uses: the task's, else the operator's default."""
    model = task.spec.model.name or settings.default_model
    if not model:
        raise SpecError(
            "spec.model.name",
            "no model given and the operator has no default (LLMSANDBOX_DEFAULT_MODEL)",
        )
    base_url = task.spec.model.base_url or settings.default_base_url
    if not base_url:
        raise SpecError(
            "spec.model.baseURL",
            "no inference endpoint given and the operator has no default "
            "(LLMSANDBOX_DEFAULT_BASE_URL)",
        )
    return model, base_url


def check_endpoint(task: SandboxTask, settings: OperatorSettings) -> None:
    """A base URL the task names must be one the operator lets it send its API key to."""
    url = task.spec.model.base_url
    if url is None:
        return
    problem = base_url_problem(
        url,
        patterns=settings.allowed_base_urls,
        default_base_url=settings.default_base_url,
        default_key=task.spec.model.api_key_secret_ref is None,
    )
    if problem is not None:
        raise SpecError("spec.model.baseURL", problem)
    isolated = task.spec.sandbox.network.mode is NetworkMode.ISOLATED
    host = parse_endpoint(url).host
    if isolated and not settings.isolated_pods_resolve_names and not is_ip_address(host):
        raise SpecError(
            "spec.model.baseURL",
            f"{host} cannot be resolved: isolated pods get no DNS on this cluster "
            "(LLMSANDBOX_ISOLATED_DNS_EGRESS=false); give the endpoint as an IP address, or use "
            "network mode allowList",
        )


def resolve_api_key_secret(task: SandboxTask, settings: OperatorSettings) -> SecretKeyRef:
    """The Secret key the agent's OPENAI_API_KEY comes from: the task's, else the default."""
    if task.spec.model.api_key_secret_ref is not None:
        return task.spec.model.api_key_secret_ref
    if settings.default_api_key_secret:
        return SecretKeyRef(
            name=settings.default_api_key_secret, key=settings.default_api_key_secret_key
        )
    raise SpecError(
        "spec.model.apiKeySecretRef",
        "no API key Secret given and the operator has no default "
        "(LLMSANDBOX_DEFAULT_API_KEY_SECRET); for an endpoint without auth, "
        "point it at a Secret holding any value",
    )


def input_target(item: InputFile) -> str:
    """Where an input lands below /workspace/input ('.' is the directory itself).

    A ConfigMap key given a path ending in '/' lands inside it under the key's name, the way
    `cp key dir/` would; a whole ConfigMap's path is the directory its keys land in.
    """
    path = str(PurePosixPath(item.path))
    ref = item.config_map_ref
    if ref is not None and ref.key is not None and (item.path.endswith("/") or path == "."):
        return str(PurePosixPath(path) / ref.key)
    return path


def is_whole_configmap(item: InputFile) -> bool:
    return item.config_map_ref is not None and item.config_map_ref.key is None


def _check_inputs(task: SandboxTask) -> None:
    targets: dict[str, int] = {}
    for i, item in enumerate(task.spec.inputs):
        where = f"spec.inputs[{i}]"
        if item.file is not None:
            raise SpecError(
                f"{where}.file",
                "local files only work with sandboxctl run; use content or configMapRef",
            )
        target = input_target(item)
        if target == "." and not is_whole_configmap(item):
            raise SpecError(
                f"{where}.path", f"{item.path!r} names /workspace/input itself; give a file name"
            )
        if target.startswith(".."):
            # Kubernetes reserves names starting with '..' inside ConfigMap volumes.
            raise SpecError(f"{where}.path", f"{item.path!r} may not start with '..' on a cluster")
        if target in targets and target != ".":
            raise SpecError(
                f"{where}.path",
                f"{target!r} is already where spec.inputs[{targets[target]}] is placed",
            )
        targets[target] = i
    mounts = {
        t: i for t, i in targets.items() if t != "." and is_whole_configmap(task.spec.inputs[i])
    }
    for mount, i in mounts.items():
        for target, j in targets.items():
            inside = target.startswith(mount + "/") or mount.startswith(target + "/")
            if j != i and target != "." and inside:
                raise SpecError(
                    f"spec.inputs[{max(i, j)}].path",
                    f"{target!r} and {mount!r} overlap, and spec.inputs[{i}] mounts a whole "
                    "ConfigMap there; use separate directories",
                )


def allow_list(task: SandboxTask, settings: OperatorSettings) -> list[tuple[str, int]]:
    """The task's allow entries as (CIDR, port); SpecError names the entry that is wrong or
    lies inside a range no task may reach (addresses.py)."""
    allowed = []
    for i, entry in enumerate(task.spec.sandbox.network.allow):
        where = f"spec.sandbox.network.allow[{i}]"
        try:
            cidr, port = parse_allow_entry(entry)
        except ValueError as exc:
            raise SpecError(where, str(exc)) from None
        excluded = containing_exclusion(ipaddress.ip_network(cidr), settings.excluded_cidrs)
        if excluded is not None:
            raise SpecError(
                where,
                f"{entry} is inside {excluded}, which no task may reach (cluster, private, "
                "loopback, link-local and cloud metadata ranges, and the operator's "
                "LLMSANDBOX_EXCLUDED_CIDRS); reach cluster services through the operator's "
                "inference egress instead",
            )
        allowed.append((cidr, port))
    return allowed


def _configmap_data(task: SandboxTask, settings: OperatorSettings) -> dict[str, str]:
    model, base_url = resolve_model(task, settings)
    spec = task.spec.model
    config = PodTaskConfig(
        name=task_name(task),
        prompt=task.spec.prompt,
        model=PodModelConfig(
            name=model,
            base_url=base_url,
            temperature=spec.temperature,
            top_p=spec.top_p,
            max_tokens_per_call=spec.max_tokens_per_call,
            tool_call_format=spec.tool_call_format,
            request_timeout_seconds=spec.request_timeout_seconds,
        ),
        limits=task.spec.limits,
    )
    data = {
        TASK_CONFIG_KEY: json.dumps(
            config.model_dump(mode="json", by_alias=True), indent=2, ensure_ascii=False
        )
    }
    for i, item in enumerate(task.spec.inputs):
        if item.content is not None:
            data[inline_input_key(i)] = item.content
    return data


def validate_for_cluster(task: SandboxTask, settings: OperatorSettings) -> None:
    """Every check beyond the schema that a task must pass to run here; SpecError names the field."""
    task_name(task)
    resolve_model(task, settings)
    resolve_api_key_secret(task, settings)
    check_endpoint(task, settings)
    sandbox_resources(task, settings)
    runtime_class(task, settings)
    _check_inputs(task)
    allow_list(task, settings)
    data = _configmap_data(task, settings)
    size = sum(len(k.encode()) + len(v.encode()) for k, v in data.items())
    if size > MAX_CONFIGMAP_BYTES:
        raise SpecError(
            "spec.inputs",
            f"the prompt and inline inputs take {size} bytes, more than the 1 MiB a ConfigMap "
            "holds; move large inputs to a configMapRef",
        )


def build_task_configmap(
    task: SandboxTask, *, namespace: str, uid: str, settings: OperatorSettings
) -> dict[str, Any]:
    """The ConfigMap holding task.json (the resolved agent config) and the inline inputs."""
    validate_for_cluster(task, settings)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": task_metadata(
            task, name=task_configmap_name(task_name(task)), namespace=namespace, uid=uid
        ),
        "data": _configmap_data(task, settings),
    }
