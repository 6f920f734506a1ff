"""The pod for one attempt of a task: the sandbox container, the agent container, and what they share."""

from __future__ import annotations

from typing import Any

from sandbox_agent.artifacts import parse_store_url, run_prefix
from sandbox_agent.execd_cmdline import execd_command
from sandbox_agent.task import SandboxTask
from sandbox_agent.wire import INPUT_PATH, LABEL_ATTEMPT, MAX_LABEL_LENGTH, WORKSPACE

from .agent_config import (
    TASK_CONFIG_KEY,
    file_annotation,
    file_field,
    files_fit_in_pod,
    inline_input_key,
    input_target,
    task_files,
)
from .cluster_checks import resolve_api_key_secret, validate_for_cluster
from .kueue import QUEUE_LABEL, queue_name
from .metadata import bounded_name, task_configmap_name, task_metadata, task_name
from .placement import task_scheduling
from .pull_secrets import image_pull_secrets, pull_secret_refs
from .resources import runtime_class, sandbox_resources
from .settings import OperatorSettings
from .task_configmap import configmap_manifest

EXECD_DIR = "/opt/llmsandbox"
RUN_DIR = "/run/execd"
TASK_DIR = "/etc/llmsandbox"
TERMINATION_LOG = "/dev/termination-log"
# The model's commands run as nobody; the agent (and the exec server, which drops to it so that
# the private run directory is theirs alone) as another unprivileged uid.
NOBODY = 65534
AGENT_UID = 65532
# What the exec server keeps after dropping from root: start commands as nobody, and kill them.
EXECD_CAPABILITIES = ["KILL", "SETGID", "SETUID"]

SANDBOX_CONTAINER = "sandbox"
AGENT_CONTAINER = "agent"
INSTALL_CONTAINER = "install-execd"

AGENT_TMP_SIZE_LIMIT = "256Mi"
# The init container only copies one file and writes a token.
INSTALL_REQUESTS = {"cpu": "50m", "memory": "64Mi"}
INSTALL_LIMITS = {"cpu": "500m", "memory": "128Mi"}


def pod_name(task_name: str, attempt: int) -> str:
    """`<task>-a<attempt>`, shortened with a hash of the task name to fit a DNS label."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0 (got {attempt})")
    return bounded_name(task_name, f"-a{attempt}", max_length=MAX_LABEL_LENGTH, dns_label=True)


def hardened_security_context(*, read_only_root: bool, uid: int = AGENT_UID) -> dict[str, Any]:
    context: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "privileged": False,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if read_only_root:
        context["readOnlyRootFilesystem"] = True
    return context


def agent_uid(settings: OperatorSettings) -> int:
    """The agent's uid, which owns the private run directory and which the exec server takes on;
    without the user split every container is nobody."""
    return AGENT_UID if settings.sandbox_user_split else NOBODY


def sandbox_security_context(settings: OperatorSettings) -> dict[str, Any]:
    """With the user split, root with three capabilities, for the exec server's first
    instructions only: it drops to AGENT_UID at once and runs every command as NOBODY with no
    capability at all. Without it, nobody like the other containers."""
    if not settings.sandbox_user_split:
        return hardened_security_context(read_only_root=False, uid=NOBODY)
    context = hardened_security_context(read_only_root=False, uid=0)
    context["runAsNonRoot"] = False
    context["capabilities"] = {"drop": ["ALL"], "add": list(EXECD_CAPABILITIES)}
    return context


def execd_users(settings: OperatorSettings) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(the exec server's uid, the commands') with the user split; None: one uid for both."""
    if not settings.sandbox_user_split:
        return None
    return (AGENT_UID, AGENT_UID), (NOBODY, NOBODY)


def _resources(requests: dict[str, str], limits: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = dict(requests)
    if limits:
        out["limits"] = dict(limits)
    return out


def _task_file_source(
    task: SandboxTask, files_in_pod: bool, items: list[tuple[str, str]]
) -> dict[str, Any]:
    """A volume source of task files, (key, path) each: the pod's own annotations through the
    downward API, or the task's ConfigMap (see agent_config.py)."""
    if files_in_pod:
        return {
            "downwardAPI": {
                "items": [
                    {"path": path, "fieldRef": {"fieldPath": file_field(key)}}
                    for key, path in items
                ]
            }
        }
    return {
        "configMap": {
            "name": task_configmap_name(task_name(task)),
            "items": [{"key": key, "path": path} for key, path in items],
        }
    }


def _input_volumes(
    task: SandboxTask, files_in_pod: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The volumes and sandbox mounts that place spec.inputs under /workspace/input.

    One projected volume holds every input with a known file path (inline content from the
    task's files, single ConfigMap keys) plus whole ConfigMaps meant for /workspace/input itself. A
    whole ConfigMap for a subdirectory cannot be projected there without knowing its keys, so it
    gets its own volume mounted at that subdirectory; the kubelet creates the mount point inside
    the read-only projected volume.
    """
    inputs = task.spec.inputs
    if not inputs:
        return [], []
    inline_items = [
        (inline_input_key(i), input_target(item))
        for i, item in enumerate(inputs)
        if item.content is not None
    ]
    sources: list[dict[str, Any]] = []
    if inline_items:
        sources.append(_task_file_source(task, files_in_pod, inline_items))
    volumes: list[dict[str, Any]] = []
    nested_mounts: list[dict[str, Any]] = []
    for i, item in enumerate(inputs):
        ref = item.config_map_ref
        if ref is None:
            continue
        target = input_target(item)
        if ref.key is not None:
            sources.append(
                {"configMap": {"name": ref.name, "items": [{"key": ref.key, "path": target}]}}
            )
        elif target == ".":
            sources.append({"configMap": {"name": ref.name}})
        else:
            volumes.append({"name": f"input-{i}", "configMap": {"name": ref.name}})
            nested_mounts.append(
                {"name": f"input-{i}", "mountPath": f"{INPUT_PATH}/{target}", "readOnly": True}
            )
    projected = {"name": "inputs", "projected": {"sources": sources}}
    mounts = [{"name": "inputs", "mountPath": INPUT_PATH, "readOnly": True}, *nested_mounts]
    return [projected, *volumes], mounts


def _volumes(
    task: SandboxTask,
    settings: OperatorSettings,
    input_volumes: list[dict[str, Any]],
    files_in_pod: bool,
) -> list[dict[str, Any]]:
    workspace: dict[str, Any] = {}
    disk = sandbox_resources(task, settings).limits.get("ephemeral-storage")
    if disk:
        workspace["sizeLimit"] = disk
    # /tmp is the sandbox's too: bounded by its disk limit, else by the operator's own cap.
    tmp = {"sizeLimit": disk or settings.sandbox_tmp_size_limit}
    return [
        {"name": "execd-bin", "emptyDir": {"sizeLimit": "16Mi"}},
        {"name": "execd-run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {"name": "workspace", "emptyDir": workspace},
        {"name": "tmp", "emptyDir": tmp},
        # The agent writes nothing large to /tmp; bounded so a bug cannot fill the node's disk.
        {"name": "agent-tmp", "emptyDir": {"sizeLimit": agent_tmp_size(settings)}},
        {
            "name": "task",
            **_task_file_source(task, files_in_pod, [(TASK_CONFIG_KEY, TASK_CONFIG_KEY)]),
        },
        *input_volumes,
        *_store_volume(settings)[0],
    ]


def agent_image(settings: OperatorSettings) -> dict[str, str]:
    """The image fields of every container that runs the agent image: the image and, when the
    operator sets one, its pull policy."""
    fields = {"image": settings.agent_image}
    if settings.agent_image_pull_policy is not None:
        fields["imagePullPolicy"] = settings.agent_image_pull_policy
    return fields


def _install_container(settings: OperatorSettings) -> dict[str, Any]:
    return {
        "name": INSTALL_CONTAINER,
        **agent_image(settings),
        "command": [
            "python",
            "-m",
            "sandbox_agent.pod_entrypoint",
            "install",
            "--execd-dir",
            EXECD_DIR,
            "--run-dir",
            RUN_DIR,
        ],
        "volumeMounts": [
            {"name": "execd-bin", "mountPath": EXECD_DIR},
            {"name": "execd-run", "mountPath": RUN_DIR},
        ],
        "resources": _resources(INSTALL_REQUESTS, INSTALL_LIMITS),
        "securityContext": hardened_security_context(read_only_root=True, uid=agent_uid(settings)),
    }


def _sandbox_container(
    task: SandboxTask, settings: OperatorSettings, input_mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    sandbox = task.spec.sandbox
    resources = sandbox_resources(task, settings)
    # The model fills in its own default image; the operator's configured default wins over that.
    image = sandbox.image if "image" in sandbox.model_fields_set else settings.default_sandbox_image
    return {
        "name": SANDBOX_CONTAINER,
        "image": image,
        "command": execd_command(
            f"{EXECD_DIR}/execd.py", RUN_DIR, WORKSPACE, users=execd_users(settings)
        ),
        # Only HOME: whatever runs here is model-written code, so it gets no credential at all.
        "env": [{"name": "HOME", "value": "/tmp/home"}],
        "volumeMounts": [
            {"name": "execd-bin", "mountPath": EXECD_DIR, "readOnly": True},
            {"name": "execd-run", "mountPath": RUN_DIR},
            {"name": "workspace", "mountPath": WORKSPACE},
            *input_mounts,
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "resources": _resources(resources.requests, resources.limits),
        # Writable root: sandbox images write caches and scratch files where they like.
        "securityContext": sandbox_security_context(settings),
    }


def _artifacts_args(task: SandboxTask, namespace: str, attempt: int) -> list[str]:
    prefix = run_prefix(namespace, task_name(task), str(attempt), task.spec.artifacts.prefix)
    return ["--artifacts-prefix", prefix]


def _store_volume(settings: OperatorSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A file:// store's PersistentVolumeClaim, mounted at the URL's path in the agent only."""
    if settings.artifacts_pvc is None or settings.artifacts_url is None:
        return [], []
    path = parse_store_url(settings.artifacts_url, "artifacts_url").root
    volume = {"name": "artifacts", "persistentVolumeClaim": {"claimName": settings.artifacts_pvc}}
    return [volume], [{"name": "artifacts", "mountPath": path}]


def agent_tmp_size(settings: OperatorSettings) -> str:
    """The agent's /tmp: room for the output files it uploads when a store is configured."""
    if settings.artifacts_url is None:
        return AGENT_TMP_SIZE_LIMIT
    mib = 256 + -(-settings.artifacts_max_total_bytes // (1024 * 1024))
    return f"{mib}Mi"


def _agent_container(
    task: SandboxTask, settings: OperatorSettings, namespace: str, attempt: int
) -> dict[str, Any]:
    secret = resolve_api_key_secret(task, settings)
    stored = settings.artifacts_url is not None
    _, store_mounts = _store_volume(settings)
    container: dict[str, Any] = {
        "name": AGENT_CONTAINER,
        **agent_image(settings),
        "command": [
            "python",
            "-m",
            "sandbox_agent.pod_entrypoint",
            "run",
            "--task",
            f"{TASK_DIR}/{TASK_CONFIG_KEY}",
            "--run-dir",
            RUN_DIR,
            "--termination-log",
            TERMINATION_LOG,
            "--execd-timeout",
            str(settings.execd_ready_timeout_seconds),
            *(_artifacts_args(task, namespace, attempt) if stored else []),
        ],
        "env": [
            {
                "name": "OPENAI_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}},
            },
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "volumeMounts": [
            {"name": "execd-run", "mountPath": RUN_DIR},
            {"name": "task", "mountPath": TASK_DIR, "readOnly": True},
            {"name": "agent-tmp", "mountPath": "/tmp"},
            *store_mounts,
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "resources": _resources(settings.agent_resources.requests, settings.agent_resources.limits),
        "securityContext": hardened_security_context(read_only_root=True, uid=agent_uid(settings)),
    }
    if stored and settings.artifacts_credentials_secret is not None:
        # The store's credentials: this container's environment only, never the sandbox's.
        container["envFrom"] = [{"secretRef": {"name": settings.artifacts_credentials_secret}}]
    return container


def build_pod(
    task: SandboxTask, *, namespace: str, uid: str, attempt: int, settings: OperatorSettings
) -> dict[str, Any]:
    """The pod manifest for one attempt; SpecError when the task cannot run on this cluster."""
    return build_attempt(task, namespace=namespace, uid=uid, attempt=attempt, settings=settings)[0]


def build_attempt(
    task: SandboxTask, *, namespace: str, uid: str, attempt: int, settings: OperatorSettings
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The pod of one attempt, and the task's ConfigMap when its files do not fit in the pod
    (else None); SpecError when the task cannot run on this cluster."""
    validate_for_cluster(task, settings)
    files = task_files(task, settings)
    in_pod = files_fit_in_pod(files)
    pod = _pod_manifest(
        task,
        namespace=namespace,
        uid=uid,
        attempt=attempt,
        settings=settings,
        files=files if in_pod else None,
    )
    if in_pod:
        return pod, None
    configmap = configmap_manifest(
        task, namespace=namespace, uid=uid, settings=settings, files=files
    )
    return pod, configmap


def _pod_manifest(
    task: SandboxTask,
    *,
    namespace: str,
    uid: str,
    attempt: int,
    settings: OperatorSettings,
    files: dict[str, str] | None,
) -> dict[str, Any]:
    """`files`: the task's files to carry as annotations; None when they are in its ConfigMap."""
    name = task_name(task)
    metadata = task_metadata(task, name=pod_name(name, attempt), namespace=namespace, uid=uid)
    metadata["labels"][LABEL_ATTEMPT] = str(attempt)
    queue = queue_name(task, settings)
    if queue:
        # Kueue's pod integration queues the pod there (its webhook adds the admission gate).
        metadata["labels"][QUEUE_LABEL] = queue
    # `kubectl logs <pod>` then shows the agent, whose last line is the result.
    metadata["annotations"]["kubectl.kubernetes.io/default-container"] = AGENT_CONTAINER
    for key, content in (files or {}).items():
        metadata["annotations"][file_annotation(key)] = content
    input_volumes, input_mounts = _input_volumes(task, files is not None)
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": (
            task.spec.limits.active_deadline_seconds + settings.deadline_grace_seconds
        ),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 10,
        # Users are per container (see sandbox_security_context); the volumes belong to the
        # commands' group, so that they can write /workspace and /tmp.
        "securityContext": {
            "fsGroup": NOBODY,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": _volumes(task, settings, input_volumes, files is not None),
        "initContainers": [_install_container(settings)],
        "containers": [
            _sandbox_container(task, settings, input_mounts),
            _agent_container(task, settings, namespace, attempt),
        ],
    }
    runtime = runtime_class(task, settings)
    if runtime:
        spec["runtimeClassName"] = runtime
    spec.update(task_scheduling(task, settings).pod_fields())
    pull_secrets = image_pull_secrets(task, settings)
    if pull_secrets:
        spec["imagePullSecrets"] = pull_secret_refs(pull_secrets)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
