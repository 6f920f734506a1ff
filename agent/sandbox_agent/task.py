"""The SandboxTask API: one pydantic model that parses task files locally and generates the CRD."""

from __future__ import annotations

import difflib
import ipaddress
import re
import typing
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from .apimodel import ApiModel
from .errors import TaskSpecError
from .graders import GRADER_TYPES, Grading
from .scheduling import LABEL_KEY_HELP, LABEL_VALUE_HELP, Scheduling
from .wire import (
    DEFAULT_SANDBOX_IMAGE,
    LABEL_KEY_PATTERN,
    LABEL_VALUE_PATTERN,
    NAME_PATTERN,
    QUANTITY_PATTERN,
)

MAX_PROMPT_CHARS = 262_144
MAX_INLINE_INPUT_CHARS = 1_048_576

# A relative path below /workspace/input (no leading slash); `..` segments are refused by a validator.
INPUT_PATH_PATTERN = r"^[^/\x00][^\x00]*$"
# host:port or cidr:port entries of a custom egress allow list.
ALLOW_ENTRY_PATTERN = r"^[0-9a-fA-F.:]+(/[0-9]{1,3})?:[0-9]{1,5}$"


class ToolCallFormat(StrEnum):
    NATIVE = "native"  # the endpoint parses tool calls (OpenAI `tools`)
    HERMES = "hermes"  # tools described in the prompt, calls parsed from the reply text
    AUTO = "auto"  # native, and text-parsed when a reply carries no native call
    BASH = "bash"  # no tools: one ```bash block per reply, `submit ANSWER` ends (bashblocks.py)


class NetworkMode(StrEnum):
    ISOLATED = "isolated"  # the sandbox reaches nothing (on a cluster: only the inference endpoint)
    INTERNET = "internet"  # public internet, never cluster, private or link-local ranges
    ALLOW_LIST = "allowList"  # only the listed cidr:port entries


class SecretKeyRef(ApiModel):
    name: Annotated[str, Field(min_length=1, max_length=253, pattern=NAME_PATTERN)]
    key: Annotated[str, Field(min_length=1, max_length=253)] = "apiKey"


class LocalObjectReference(ApiModel):
    """An object of the task's namespace, by name (an image pull Secret)."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=NAME_PATTERN)]


class ConfigMapKeyRef(ApiModel):
    name: Annotated[str, Field(min_length=1, max_length=253, pattern=NAME_PATTERN)]
    key: Annotated[str | None, Field(min_length=1, max_length=253)] = None


class InputFile(ApiModel):
    """A file placed under /workspace/input: inline content, a local file, or a ConfigMap."""

    path: Annotated[str, Field(min_length=1, max_length=1024, pattern=INPUT_PATH_PATTERN)]
    content: Annotated[str | None, Field(max_length=MAX_INLINE_INPUT_CHARS)] = None
    file: Annotated[str | None, Field(min_length=1, max_length=4096)] = Field(
        default=None,
        description="Local mode only: a file or directory, relative to the task file.",
    )
    config_map_ref: ConfigMapKeyRef | None = None

    @field_validator("path")
    @classmethod
    def _stays_below_input(cls, value: str) -> str:
        if ".." in PurePosixPath(value).parts:
            raise ValueError(f"{value!r} escapes /workspace/input: `..` is not allowed")
        return value

    @model_validator(mode="after")
    def _exactly_one_source(self) -> InputFile:
        sources = [s for s in ("content", "file", "config_map_ref") if getattr(self, s) is not None]
        if len(sources) != 1:
            raise ValueError(
                "set exactly one of content, file or configMapRef "
                f"(got {', '.join(to_camel(s) for s in sources) or 'none'})"
            )
        # A ConfigMap may land in the input directory itself (all keys, or path/key).
        if str(PurePosixPath(self.path)) == "." and self.config_map_ref is None:
            raise ValueError(f"path {self.path!r} names /workspace/input itself; give a file name")
        return self


# The model fields' bounds, shared with what the agent container reads (podconfig.py).
MODEL_NAME = Field(min_length=1, max_length=256)
BASE_URL = Field(pattern=r"^https?://[^\s]+$", max_length=2048)
Temperature = Annotated[float | None, Field(ge=0, le=2)]
TopP = Annotated[float | None, Field(gt=0, le=1)]
MaxTokensPerCall = Annotated[int, Field(ge=16, le=1_048_576)]
RequestTimeoutSeconds = Annotated[float, Field(gt=0, le=3600)]


class ModelSpec(ApiModel):
    name: Annotated[str | None, MODEL_NAME] = Field(
        default=None, description="Model name; defaults to the operator's or OPENAI_MODEL."
    )
    base_url: Annotated[str | None, BASE_URL] = Field(default=None, alias="baseURL")
    api_key_secret_ref: SecretKeyRef | None = None
    temperature: Temperature = None
    top_p: TopP = None
    max_tokens_per_call: MaxTokensPerCall = 8192
    tool_call_format: ToolCallFormat = ToolCallFormat.AUTO
    request_timeout_seconds: RequestTimeoutSeconds = 600


class Limits(ApiModel):
    max_steps: Annotated[int, Field(ge=1, le=10_000)] = 100
    max_tokens: Annotated[int, Field(ge=256, le=10_000_000)] = Field(
        default=131_072,
        description="Conversation budget: the last call's prompt plus completion tokens.",
    )
    max_total_tokens: Annotated[int | None, Field(ge=256, le=1_000_000_000)] = Field(
        default=None, description="Spend cap: prompt plus completion tokens summed over all calls."
    )
    command_timeout_seconds: Annotated[int, Field(ge=1, le=86_400)] = 120
    active_deadline_seconds: Annotated[int, Field(ge=1, le=604_800)] = 1800
    max_observation_bytes: Annotated[int, Field(ge=1024, le=1_048_576)] = Field(
        default=16_384, description="Cap on what one tool result feeds back to the model."
    )
    max_llm_retries: Annotated[int, Field(ge=0, le=100)] = 8


class Resources(ApiModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    requests: dict[str, Annotated[str, Field(pattern=QUANTITY_PATTERN)]] = Field(
        default_factory=dict
    )
    limits: dict[str, Annotated[str, Field(pattern=QUANTITY_PATTERN)]] = Field(default_factory=dict)

    @field_validator("requests", "limits")
    @classmethod
    def _known_resources(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - {"cpu", "memory", "ephemeral-storage"})
        if unknown:
            raise ValueError(
                f"unknown resource {unknown[0]!r}: use cpu, memory or ephemeral-storage"
            )
        return value


def parse_allow_entry(entry: str) -> tuple[str, int]:
    """`ADDRESS[/PREFIX]:PORT` as a canonical CIDR and a port; a bare address is one host."""
    address, _, port_text = entry.rpartition(":")
    try:
        network = ipaddress.ip_network(address, strict=True)
    except ValueError as exc:
        raise ValueError(f"{address!r} is not an IP address or CIDR: {exc}") from None
    port = int(port_text)
    if not 1 <= port <= 65_535:
        raise ValueError(f"port {port} is outside 1-65535")
    return str(network), port


def _valid_allow_entry(entry: str) -> str:
    parse_allow_entry(entry)
    return entry


class Network(ApiModel):
    mode: NetworkMode = NetworkMode.ISOLATED
    allow: list[
        Annotated[str, Field(pattern=ALLOW_ENTRY_PATTERN), AfterValidator(_valid_allow_entry)]
    ] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _allow_only_with_allow_list(self) -> Network:
        if self.mode is NetworkMode.ALLOW_LIST and not self.allow:
            raise ValueError("mode allowList needs at least one entry in allow")
        if self.mode is not NetworkMode.ALLOW_LIST and self.allow:
            raise ValueError(f"allow is only valid with mode allowList (mode is {self.mode})")
        return self


# The image reference grammar of the container tools (distribution/reference): NAME is an
# optional REGISTRY[:PORT]/ and lower-case path components; then :TAG and/or @ALGORITHM:HEX.
# Written so that Python and RE2 (the API server's CEL) read it alike.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REGISTRY = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_IMAGE_NAME = rf"(?:{_REGISTRY}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_REFERENCE = rf"^({_IMAGE_NAME})(?::{_TAG})?(?:@{_DIGEST})?$"
_IMAGE_REFERENCE = re.compile(IMAGE_REFERENCE)
MAX_IMAGE_NAME = 255
IMAGE_REFERENCE_HELP = (
    "not an image reference: expected [REGISTRY[:PORT]/]NAME[:TAG][@DIGEST], NAME in lower "
    "case (for example python:3.12-slim or registry.example.com/team/sandbox:v1)"
)


def valid_image(image: str) -> str:
    """`image` if it is an image reference, else a ValueError that says what one looks like."""
    found = _IMAGE_REFERENCE.match(image)
    if found is None:
        shown = image if len(image) <= 80 else image[:77] + "..."
        raise ValueError(f"{shown!r} is {IMAGE_REFERENCE_HELP}")
    if len(found.group(1)) > MAX_IMAGE_NAME:
        raise ValueError(f"the image name is longer than {MAX_IMAGE_NAME} characters")
    return image


ImageReference = Annotated[
    str,
    Field(
        min_length=1,
        max_length=512,
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": f"self.matches(r'{IMAGE_REFERENCE}')", "message": IMAGE_REFERENCE_HELP}
            ]
        },
    ),
    AfterValidator(valid_image),
]


class SandboxSpec(ApiModel):
    image: ImageReference = DEFAULT_SANDBOX_IMAGE
    resources: Resources = Field(default_factory=Resources)
    runtime_class_name: Annotated[str | None, Field(max_length=253, pattern=NAME_PATTERN)] = None
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "On a cluster: Secrets of the task's namespace the pod's images are pulled with, "
            "besides the operator's; each must be one the operator lets tasks name "
            "(LLMSANDBOX_ALLOWED_IMAGE_PULL_SECRETS). sandboxctl run ignores them."
        ),
    )
    network: Network = Field(default_factory=Network)
    max_processes: Annotated[int, Field(ge=16, le=65_536)] = Field(
        default=1024,
        description=(
            "Process cap of local sandboxes (bwrap and process: a pids cgroup; Docker: "
            "--pids-limit). On a cluster the kubelet's node-wide podPidsLimit applies instead."
        ),
    )


# Plain names joined by '/': a sub-prefix stays inside the task's own part of the store.
ARTIFACTS_PREFIX_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$"


class ArtifactsSpec(ApiModel):
    prefix: Annotated[str | None, Field(max_length=200, pattern=ARTIFACTS_PREFIX_PATTERN)] = Field(
        default=None,
        description=(
            "A sub-prefix for this task's artifacts: STORE/NAMESPACE/PREFIX/TASK/ATTEMPT/. "
            "The store itself is the operator's (or sandboxctl run --artifacts-url)."
        ),
    )


class SandboxTaskSpec(ApiModel):
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    inputs: list[InputFile] = Field(default_factory=list, max_length=256)
    model: ModelSpec = Field(default_factory=ModelSpec)
    limits: Limits = Field(default_factory=Limits)
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec)
    priority: Annotated[int, Field(ge=-1000, le=1000)] = 0
    retries: Annotated[int, Field(ge=0, le=10)] = 1
    # A Kueue LocalQueue name: a DNS-1123 subdomain that also fits a label value (63).
    queue_name: Annotated[str | None, Field(min_length=1, max_length=63, pattern=NAME_PATTERN)] = (
        Field(
            default=None,
            description=(
                "On a cluster with Kueue: the LocalQueue (in the task's namespace) the pod is "
                "submitted to, as the label kueue.x-k8s.io/queue-name; without it the operator's "
                "LLMSANDBOX_DEFAULT_QUEUE_NAME. sandboxctl run ignores it."
            ),
        )
    )
    artifacts: ArtifactsSpec = Field(default_factory=ArtifactsSpec)
    scheduling: Scheduling = Field(
        default_factory=Scheduling,
        description=(
            "On a cluster: where the task's pod may run (nodeSelector, tolerations, affinity, "
            "priorityClassName, topologySpreadConstraints), merged with the operator's; the "
            "operator may forbid some fields. sandboxctl run ignores it."
        ),
    )
    ttl_seconds_after_finished: Annotated[int | None, Field(ge=0, le=365 * 86_400)] = Field(
        default=None,
        description=(
            "On a cluster: delete the task (and its pod and ConfigMap) this long after it "
            "finished, as for a Job; without it the operator's LLMSANDBOX_TASK_TTL_SECONDS."
        ),
    )
    grading: Grading | None = Field(
        default=None,
        description=(
            "Score the answer: a grader and the expected answer. Only the grader sees it; a "
            "command verifier gets it in the sandbox after the model has finished."
        ),
    )

    @field_validator("inputs")
    @classmethod
    def _unique_input_paths(cls, inputs: list[InputFile]) -> list[InputFile]:
        seen: set[str] = set()
        for item in inputs:
            norm = str(PurePosixPath(item.path))
            if norm in seen:
                raise ValueError(f"duplicate input path {item.path!r}")
            seen.add(norm)
        return inputs


class ObjectMeta(ApiModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: Annotated[str | None, Field(max_length=253, pattern=NAME_PATTERN)] = None
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class SandboxTask(ApiModel):
    api_version: Literal["llmsandbox.io/v1alpha1"] = "llmsandbox.io/v1alpha1"
    kind: Literal["SandboxTask"] = "SandboxTask"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: SandboxTaskSpec
    status: dict[str, Any] | None = None


_PATTERN_HINTS = {
    QUANTITY_PATTERN: "must be a Kubernetes quantity such as 500m, 2, 512Mi or 4Gi",
    NAME_PATTERN: "must be a DNS-1123 name: lower-case letters, digits, '-' and '.'",
    INPUT_PATH_PATTERN: "must be a relative path (no leading '/')",
    ALLOW_ENTRY_PATTERN: "must be ADDRESS[/PREFIX]:PORT, e.g. 10.0.0.5:8000 or 10.0.0.0/8:443",
    ARTIFACTS_PREFIX_PATTERN: "must be plain names (letters, digits, '.', '_', '-') joined by '/'",
    LABEL_KEY_PATTERN: f"must be {LABEL_KEY_HELP}",
    LABEL_VALUE_PATTERN: f"must be {LABEL_VALUE_HELP}",
}


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for i, part in enumerate(loc):
        if (
            i and loc[i - 1] == "grader" and part in GRADER_TYPES
        ):  # pydantic puts the tag in the location
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            path += f".{part}" if path else part
        else:
            # pydantic's own location parts (e.g. "function-after[...]") are not fields.
            continue
    return path or "(root)"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (X, X | None, list[X], Annotated[X, ...])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _closest_field(loc: tuple[int | str, ...]) -> str | None:
    """For an unknown key at `loc`: the field name it most likely meant, as written in a task."""
    model: type[BaseModel] | None = SandboxTask
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        model = _model_in(field.annotation) if field is not None else None
    if model is None or not isinstance(loc[-1], str):
        return None
    names = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.6)
    return close[0] if close else None


# The shape of mapping fields a user may mistake for a string, by field path.
_SHAPES = {
    "spec.sandbox.network": "{mode: isolated|internet|allowList, allow: [CIDR:PORT, ...]}",
    "spec.model": "{name: ..., baseURL: ..., apiKeySecretRef: {name: ..., key: ...}}",
    "spec.sandbox": "{image: ..., network: {mode: ...}, resources: {limits: {...}}}",
    "spec.limits": "{maxSteps: ..., maxTokens: ..., activeDeadlineSeconds: ...}",
    "spec.scheduling": "{nodeSelector: {...}, tolerations: [...], affinity: {...}, ...}",
}


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem, each starting with the field path as the user wrote it."""
    lines = []
    for err in exc.errors():
        path = _field_path(tuple(err["loc"]))
        if prefix:
            path = f"{prefix}.{path}" if path != "(root)" else prefix
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            guess = _closest_field(tuple(err["loc"]))
            msg = f"unknown field (did you mean {guess}?)" if guess else "unknown field"
        elif err["type"] in ("model_type", "dict_type", "model_attributes_type"):
            # Not the class name the model happens to have: the shape the field takes.
            shape = _SHAPES.get(path)
            msg = f"must be a mapping{f' {shape}' if shape else ''} (got {err['input']!r})"
        elif err["type"] == "string_pattern_mismatch":
            pattern = str((err.get("ctx") or {}).get("pattern", ""))
            msg = _PATTERN_HINTS.get(pattern, msg)
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{path}: {msg}")
    return "\n".join(lines)


Document = typing.TypeVar("Document", bound=BaseModel)


def parse_document(model: type[Document], data: object, what: str) -> Document:
    """Validate a decoded `what` document (a task, a set) as `model`; errors name the field
    path (spec.limits.maxSteps: ...)."""
    if not isinstance(data, dict):
        raise TaskSpecError(
            f"a {what} file must be a mapping with apiVersion, kind and spec "
            f"(got {type(data).__name__})"
        )
    try:
        return model.model_validate(data, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise TaskSpecError(format_validation_error(exc)) from None


def parse_task(data: object) -> SandboxTask:
    """Validate a decoded task document; errors name the field path."""
    return parse_document(SandboxTask, data, "task")
