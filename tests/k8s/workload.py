"""A mixed workload of short tasks whose names pick their fault, for runs of many tasks.

Used by tests/test_operator_restart.py, bench/soak.py and bench/operator_load.py. A task named
``<kind>-<n>`` meets the fault of its kind on the :func:`faulty_kubelet` (pods complete at once,
``instant_complete``) and must end as :data:`EXPECTED` says.
"""

from __future__ import annotations

from typing import Any

from .emulator import EmulatedApiServer
from .kubelet import DelayStart, Evict, ImagePullFailure, NeverStart, OOMKill, TestKubelet

__all__ = [
    "EXPECTED",
    "LLM_ERROR",
    "SUCCESS",
    "api_key_secret",
    "attempt_of",
    "faulty_kubelet",
    "kind_of",
    "short_task",
]

# What the agent container reports (its termination message) on a pod that completes.
SUCCESS = {
    "phase": "Succeeded",
    "exitReason": "submitted",
    "answer": "42",
    "steps": 3,
    "usage": {"promptTokens": 1000, "completionTokens": 50, "totalTokens": 1050, "llmCalls": 3},
}
LLM_ERROR = {
    "phase": "Failed",
    "exitReason": "llm_error",
    "message": "the inference endpoint kept failing: HTTP 503 after 5 attempts",
    "steps": 1,
    "usage": {"llmCalls": 5, "llmRetries": 4},
}

# kind -> (phase, exitReason, attempts) the task must end with. "never" needs the operator's
# pod start timeout (LLMSANDBOX_POD_START_TIMEOUT_SECONDS) to end at all.
EXPECTED: dict[str, tuple[str, str, int]] = {
    "ok": ("Succeeded", "submitted", 1),  # the agent reports an answer
    "slow": ("Succeeded", "submitted", 1),  # the pod waits in ContainerCreating first
    "evicted": ("Succeeded", "submitted", 2),  # attempt 1 is evicted, the retry succeeds
    "oom": ("Failed", "oom_killed", 1),  # the sandbox container is OOMKilled
    "pull": ("Failed", "image_pull_error", 1),  # the sandbox image cannot be pulled
    "llm": ("Failed", "llm_error", 1),  # the agent reports the endpoint kept failing
    "never": ("Failed", "start_timeout", 1),  # the pod is never scheduled
}


def api_key_secret(key: str, name: str = "llm-key") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"llmsandbox.io/api-key": "true"},
        },
        "stringData": {"apiKey": key},
    }


def short_task(name: str, **spec: Any) -> dict[str, Any]:
    """A SandboxTask in ``default``: a short prompt, 4 steps, one retry; ``spec`` adds fields."""
    return {
        "apiVersion": "llmsandbox.io/v1alpha1",
        "kind": "SandboxTask",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "prompt": "What is six times seven?",
            "limits": {"maxSteps": 4, "activeDeadlineSeconds": 600},
            "retries": 1,
            **spec,
        },
    }


def kind_of(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["labels"].get("llmsandbox.io/task", "")).split("-")[0]


def attempt_of(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["labels"].get("llmsandbox.io/attempt"))


def faulty_kubelet(api: EmulatedApiServer, slow_seconds: float) -> TestKubelet:
    """Pods complete at once; the task's name (``<kind>-<n>``) picks its fault. Not started."""
    node = TestKubelet(api)
    node.instant_complete(lambda pod: LLM_ERROR if kind_of(pod) == "llm" else SUCCESS)
    node.inject(lambda pod: kind_of(pod) == "slow", DelayStart(slow_seconds))
    node.inject(lambda pod: kind_of(pod) == "evicted" and attempt_of(pod) == "1", Evict())
    node.inject(lambda pod: kind_of(pod) == "oom", OOMKill("sandbox"))
    node.inject(lambda pod: kind_of(pod) == "pull", ImagePullFailure(container="sandbox"))
    node.inject(lambda pod: kind_of(pod) == "never", NeverStart())
    return node
