"""The checks a task must pass to run on this cluster, beyond its schema: a name, a model and an
endpoint it may use, an API key Secret, resources within bounds, placement and pull secrets the
operator allows, inputs that fit, and allow-list entries outside the excluded ranges. Each
failure is a SpecError naming the field."""

from __future__ import annotations

import ipaddress

from sandbox_agent.task import NetworkMode, SandboxTask, SecretKeyRef, parse_allow_entry

from .addresses import containing_exclusion
from .agent_config import (
    MAX_CONFIGMAP_BYTES,
    files_size,
    input_target,
    is_whole_configmap,
    resolve_model,
    task_files,
)
from .endpoints import base_url_problem, is_ip_address, parse_endpoint
from .errors import SpecError
from .metadata import task_name
from .placement import task_scheduling
from .pull_secrets import image_pull_secrets
from .resources import runtime_class, sandbox_resources
from .settings import OperatorSettings


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


def validate_for_cluster(task: SandboxTask, settings: OperatorSettings) -> None:
    """Every check beyond the schema that a task must pass to run here; SpecError names the field."""
    task_name(task)
    resolve_model(task, settings)
    resolve_api_key_secret(task, settings)
    check_endpoint(task, settings)
    sandbox_resources(task, settings)
    runtime_class(task, settings)
    task_scheduling(task, settings)
    image_pull_secrets(task, settings)
    _check_inputs(task)
    allow_list(task, settings)
    size = files_size(task_files(task, settings))
    if size > MAX_CONFIGMAP_BYTES:
        raise SpecError(
            "spec.inputs",
            f"the prompt and inline inputs take {size} bytes, more than the 1 MiB a ConfigMap "
            "holds; move large inputs to a configMapRef",
        )
