"""The Secrets a task pod's images are pulled with: the operator's own
(LLMSANDBOX_TASK_IMAGE_PULL_SECRETS), then those the task names in spec.sandbox.imagePullSecrets,
each of which must be one the operator lets tasks use. SpecError names the entry."""

from __future__ import annotations

from typing import Any

from sandbox_agent.task import SandboxTask

from .errors import SpecError
from .settings import OperatorSettings

FIELD = "spec.sandbox.imagePullSecrets"


def operator_pull_secrets(settings: OperatorSettings) -> list[str]:
    """The operator's own, each once: on every task pod and the canary."""
    return list(dict.fromkeys(ref.name for ref in settings.task_image_pull_secrets))


def image_pull_secrets(task: SandboxTask, settings: OperatorSettings) -> list[str]:
    """The names, the operator's first, each once. A pull secret is a registry credential: a
    task may add only those of LLMSANDBOX_ALLOWED_IMAGE_PULL_SECRETS (or the operator's own)."""
    names = operator_pull_secrets(settings)
    allowed = settings.allowed_image_pull_secrets
    for i, ref in enumerate(task.spec.sandbox.image_pull_secrets):
        if ref.name in names:
            continue
        if ref.name not in allowed:
            lets = f"only {', '.join(allowed)}" if allowed else "none"
            raise SpecError(
                f"{FIELD}[{i}].name",
                f"{ref.name!r} is not a pull secret tasks may use on this cluster: the operator "
                f"lets them add {lets} (LLMSANDBOX_ALLOWED_IMAGE_PULL_SECRETS)",
            )
        names.append(ref.name)
    return names


def pull_secret_refs(names: list[str]) -> list[dict[str, Any]]:
    """The pod spec's imagePullSecrets for `names`."""
    return [{"name": name} for name in names]
