"""The task's ConfigMap: task.json for the agent and the inline inputs (agent_config.py), under the
task's names and owner (metadata.py), for a task that passed the cluster checks and whose files
are too large for the pod's annotations."""

from __future__ import annotations

from typing import Any

from sandbox_agent.task import SandboxTask

from .agent_config import task_files
from .cluster_checks import validate_for_cluster
from .metadata import task_configmap_name, task_metadata, task_name
from .settings import OperatorSettings


def build_task_configmap(
    task: SandboxTask, *, namespace: str, uid: str, settings: OperatorSettings
) -> dict[str, Any]:
    """The ConfigMap holding task.json (the resolved agent config) and the inline inputs;
    SpecError when the task cannot run on this cluster."""
    validate_for_cluster(task, settings)
    return configmap_manifest(task, namespace=namespace, uid=uid, settings=settings)


def configmap_manifest(
    task: SandboxTask,
    *,
    namespace: str,
    uid: str,
    settings: OperatorSettings,
    files: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The ConfigMap of a task already validated for this cluster (`validate_for_cluster`);
    `files` are its `task_files` when the caller has them."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": task_metadata(
            task, name=task_configmap_name(task_name(task)), namespace=namespace, uid=uid
        ),
        "data": files if files is not None else task_files(task, settings),
    }
