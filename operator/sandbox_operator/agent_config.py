"""What the agent container reads: task.json (the resolved prompt, model and limits) and the inline
inputs, the task's files; where they are kept; and where each input lands below /workspace/input.

The files travel in the pod itself, as annotations projected into the containers with the
downward API, when they are small (the common case: no other object to create, nothing to clean
up). Larger ones, up to the 1 MiB a ConfigMap holds, go into the task's ConfigMap."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

from sandbox_agent.podconfig import PodArtifacts, PodModelConfig, PodTaskConfig
from sandbox_agent.task import InputFile, SandboxTask

from .errors import SpecError
from .metadata import FILE_ANNOTATION_PREFIX, task_name
from .settings import OperatorSettings

TASK_CONFIG_KEY = "task.json"
# The API server refuses a ConfigMap whose keys plus values exceed 1 MiB.
MAX_CONFIGMAP_BYTES = 1024 * 1024
# The API server refuses a pod whose annotations exceed 256 KiB together; the task's files take
# at most half of that (the rest is for the annotations others add), else they need a ConfigMap.
MAX_POD_FILES_BYTES = 128 * 1024


def inline_input_key(index: int) -> str:
    """The task ConfigMap key that holds the content of spec.inputs[index]."""
    return f"input-{index}"


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


def pod_artifacts(settings: OperatorSettings) -> PodArtifacts | None:
    if settings.artifacts_url is None:
        return None
    return PodArtifacts(
        url=settings.artifacts_url,
        max_files=settings.artifacts_max_files,
        max_file_bytes=settings.artifacts_max_file_bytes,
        max_total_bytes=settings.artifacts_max_total_bytes,
    )


def file_annotation(key: str) -> str:
    """The pod annotation that holds the task file `key` (see `files_fit_in_pod`)."""
    return FILE_ANNOTATION_PREFIX + key


def file_field(key: str) -> str:
    """The downward API field path of that annotation."""
    return f"metadata.annotations['{file_annotation(key)}']"


def files_size(files: dict[str, str], key_prefix: str = "") -> int:
    """The bytes the API server counts for the files: their keys (with `key_prefix`) and values."""
    return sum(len((key_prefix + k).encode()) + len(v.encode()) for k, v in files.items())


def files_fit_in_pod(files: dict[str, str]) -> bool:
    """Whether the task's files go into the pod's annotations (else into its ConfigMap)."""
    return files_size(files, FILE_ANNOTATION_PREFIX) <= MAX_POD_FILES_BYTES


def task_files(task: SandboxTask, settings: OperatorSettings) -> dict[str, str]:
    """task.json and the inline inputs, by key."""
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
        artifacts=pod_artifacts(settings),
        grading=task.spec.grading,
    )
    data = {
        TASK_CONFIG_KEY: json.dumps(
            # Without a store the agent's config has no artifacts key at all.
            config.model_dump(
                mode="json",
                by_alias=True,
                exclude={n for n in ("artifacts", "grading") if getattr(config, n) is None},
            ),
            indent=2,
            ensure_ascii=False,
        )
    }
    for i, item in enumerate(task.spec.inputs):
        if item.content is not None:
            data[inline_input_key(i)] = item.content
    return data
