"""The operator's one settings object, read from `LLMSANDBOX_*` environment variables."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from sandbox_agent.artifacts import ArtifactStoreError, parse_store_url
from sandbox_agent.outputs import DEFAULT_CAPS
from sandbox_agent.quantity import parse_quantity
from sandbox_agent.scheduling import Scheduling, SchedulingField
from sandbox_agent.task import LocalObjectReference, Resources
from sandbox_agent.wire import (
    DEFAULT_SANDBOX_IMAGE,
    LABEL_KEY_PATTERN,
    LABEL_VALUE_PATTERN,
    NAME_PATTERN,
    QUANTITY_PATTERN,
)

from .endpoints import (
    canonical_base_url,
    is_ip_address,
    parse_endpoint,
    parse_label,
    valid_pattern,
)

ENV_PREFIX = "LLMSANDBOX_"

Port = Annotated[int, Field(ge=1, le=65_535)]
Quantity = Annotated[str, Field(pattern=QUANTITY_PATTERN)]
LIMITED_RESOURCES = ("cpu", "memory", "ephemeral-storage")
# Label keys and values as Kubernetes accepts them (prefix/name = value).
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)
_LABEL_VALUE = re.compile(LABEL_VALUE_PATTERN)


def _valid_label(text: str) -> str:
    """`key=value` as Kubernetes labels allow, or "" (no label required)."""
    if not text:
        return text
    key, value = parse_label(text)
    if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
        raise ValueError(f"{text!r} is not a valid label key=value")
    return text


def _valid_store_url(url: str | None) -> str | None:
    if url:
        try:
            parse_store_url(url, "artifacts store")
        except ArtifactStoreError as exc:
            raise ValueError(str(exc).removeprefix("artifacts store: ")) from None
    return url or None


def _valid_base_url(url: str | None) -> str | None:
    if url is not None:
        parse_endpoint(url)
    return url


def parse_address_port(text: str) -> tuple[str, int]:
    """`ADDRESS:PORT` with an IP address (IPv6 with or without brackets) as (address, port)."""
    address, _, port_text = text.rpartition(":")
    try:
        host = str(ipaddress.ip_address(address.strip("[]")))
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r} is not ADDRESS:PORT with an IP address") from None
    if not 1 <= port <= 65_535:
        raise ValueError(f"port {port} is outside 1-65535")
    return host, port


def _valid_address_port(text: str | None) -> str | None:
    if text is not None:
        parse_address_port(text)
    return text


class SettingsError(ValueError):
    """The operator's environment is invalid; one line per variable, named as it is set."""


def _canonical_cidr(cidr: str) -> str:
    try:
        return str(ipaddress.ip_network(cidr, strict=True))
    except ValueError as exc:
        raise ValueError(f"{cidr!r} is not a CIDR such as 10.0.0.0/8: {exc}") from None


class EgressRule(BaseModel):
    """Where task pods may connect besides DNS: how they reach the inference endpoint."""

    model_config = ConfigDict(extra="forbid")

    cidrs: list[str] = Field(default_factory=list)
    namespace_selector: dict[str, str] | None = None
    pod_selector: dict[str, str] | None = None
    ports: list[Port] = Field(default_factory=list)

    @field_validator("cidrs")
    @classmethod
    def _canonical_cidrs(cls, cidrs: list[str]) -> list[str]:
        return [_canonical_cidr(cidr) for cidr in cidrs]

    @field_validator("namespace_selector", "pod_selector")
    @classmethod
    def _valid_labels(cls, selector: dict[str, str] | None) -> dict[str, str] | None:
        for key, value in (selector or {}).items():
            if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
                raise ValueError(f"{key}={value!r} is not a valid label selector")
        return selector

    @model_validator(mode="after")
    def _names_a_destination(self) -> EgressRule:
        # A NetworkPolicy egress rule without `to` matches every destination.
        if not self.cidrs and self.namespace_selector is None and self.pod_selector is None:
            raise ValueError(
                "set cidrs, namespace_selector or pod_selector: a rule without a destination "
                "would allow every address"
            )
        return self


class TokenPrice(BaseModel):
    """USD per million tokens of one model, for the cost metric and status.usage.costUSD."""

    model_config = ConfigDict(extra="forbid")

    prompt_per_million: Annotated[float, Field(ge=0)]
    completion_per_million: Annotated[float, Field(ge=0)]


class EndpointLimit(BaseModel):
    """A cap on the tasks running at once against one inference endpoint: every model at
    `base_url` together, or only `model` there. Adaptive admission stays within it."""

    model_config = ConfigDict(extra="forbid")

    base_url: Annotated[str, Field(pattern=r"^https?://[^\s]+$"), AfterValidator(_valid_base_url)]
    model: Annotated[str | None, Field(min_length=1)] = None
    max_running: Annotated[int, Field(ge=1)]
    # A task whose answered calls took longer than this on average is a sign of an overloaded
    # endpoint, as a 429 is (adaptive admission); None: latency is not judged.
    latency_target_seconds: Annotated[float | None, Field(gt=0, le=3600)] = None


def _narrowing_fields() -> list[SchedulingField]:
    """The scheduling fields that can only narrow where a pod may run."""
    return ["nodeSelector", "affinity", "topologySpreadConstraints"]


def _default_agent_resources() -> Resources:
    return Resources(
        requests={"cpu": "100m", "memory": "256Mi"},
        limits={"cpu": "1", "memory": "512Mi"},
    )


class OperatorSettings(BaseSettings):
    """Defaults for tasks, the agent container, network policy, admission and metrics.

    Lists, dicts and models are JSON in the environment, e.g.
    `LLMSANDBOX_INFERENCE_EGRESS='[{"namespace_selector": {"kubernetes.io/metadata.name": "inference"}, "ports": [8000]}]'`.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    default_base_url: Annotated[
        str | None, Field(pattern=r"^https?://[^\s]+$"), AfterValidator(_valid_base_url)
    ] = None
    default_model: Annotated[str | None, Field(min_length=1)] = None
    default_api_key_secret: Annotated[str | None, Field(max_length=253, pattern=NAME_PATTERN)] = (
        None
    )
    default_api_key_secret_key: Annotated[str, Field(min_length=1, max_length=253)] = "apiKey"  # noqa: S105 - a key name
    # Patterns (syntax in endpoints.py) a task's own spec.model.baseURL must match; the default
    # base URL is always allowed. Empty: tasks may name no endpoint but the default.
    allowed_base_urls: list[Annotated[str, AfterValidator(valid_pattern)]] = Field(
        default_factory=list
    )
    # The label (key=value) a Secret must carry to be a task's API key; "" requires none.
    api_key_secret_label: Annotated[str, AfterValidator(_valid_label)] = (
        "llmsandbox.io/api-key=true"  # noqa: S105 - a label, not a secret
    )
    agent_image: Annotated[str, Field(min_length=1, pattern=r"^[^\s]+$")] = (
        "llm-sandbox/agent:0.1.0"
    )
    # When the kubelet pulls the agent image (the agent and install-execd containers, the
    # canary); None: Kubernetes' default for the tag (Always for :latest, else IfNotPresent).
    agent_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    default_sandbox_image: Annotated[str, Field(min_length=1, pattern=r"^[^\s]+$")] = (
        DEFAULT_SANDBOX_IMAGE
    )
    agent_resources: Resources = Field(default_factory=_default_agent_resources)
    # Requests and limits of the sandbox container where the task gives none, per resource.
    sandbox_default_resources: Resources = Field(default_factory=Resources)
    # The most a task's sandbox may ask for as limits; a task without a limit gets the maximum.
    sandbox_max_limits: dict[str, Quantity] = Field(default_factory=dict)
    # sizeLimit of the sandbox's /tmp volume when it has no ephemeral-storage limit (which
    # bounds /tmp and /workspace otherwise).
    sandbox_tmp_size_limit: Quantity = "1Gi"
    # True: the sandbox container starts as root with KILL, SETGID and SETUID only, the exec
    # server drops to the agent's uid and runs commands as nobody (they cannot signal, trace or
    # impersonate it). False, for namespaces that enforce Pod Security "restricted": every
    # container runs as nobody, and the exec server is guarded only by being non-dumpable.
    sandbox_user_split: bool = True
    # A RuntimeClass (gVisor, Kata) every task pod runs under; a task may not name another.
    required_runtime_class: Annotated[str | None, Field(pattern=NAME_PATTERN, max_length=253)] = (
        None
    )
    # Where every task pod (and the canary) may run, in the pod spec's names; a task's own
    # spec.scheduling is merged in by the rule of placement.py.
    task_scheduling: Scheduling = Field(default_factory=Scheduling)
    # The spec.scheduling fields a task may set; a task setting another ends invalid_spec. By
    # default those that only narrow where its pod may run: tolerations open tainted nodes to
    # it and a priority class lets it preempt, so an admin grants those.
    allowed_scheduling_fields: list[SchedulingField] = Field(default_factory=_narrowing_fields)
    # Secrets (in each task namespace) every task pod's images are pulled with.
    task_image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list)
    # The Secrets a task may add to its pod's (spec.sandbox.imagePullSecrets): a pull secret is
    # a registry credential, and a task should not borrow another team's.
    allowed_image_pull_secrets: list[
        Annotated[str, Field(pattern=NAME_PATTERN, max_length=253)]
    ] = Field(default_factory=list)
    inference_egress: list[EgressRule] = Field(default_factory=list)
    dns_egress: bool = True
    # False: pods of network mode isolated get no DNS (a channel out through the cluster's
    # resolvers); their inference endpoint must then be an IP address.
    isolated_dns_egress: bool = True
    # The cluster's own ranges (pod, service and node CIDRs, IPv4 and IPv6), kept out of the
    # internet policy and refused in allow lists, besides the built-in ones (addresses.py).
    excluded_cidrs: list[Annotated[str, AfterValidator(_canonical_cidr)]] = Field(
        default_factory=list
    )
    # The artifact store every task's result, trajectory and outputs go to (s3://, gs://,
    # az://, or file:// on the PVC below, mounted into the agent container only); empty: none.
    artifacts_url: Annotated[str | None, AfterValidator(_valid_store_url)] = None
    # A Secret whose keys become the agent container's environment (AWS_ACCESS_KEY_ID,
    # AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION, GOOGLE_SERVICE_ACCOUNT, ...).
    artifacts_credentials_secret: Annotated[
        str | None, Field(max_length=253, pattern=NAME_PATTERN)
    ] = None
    artifacts_pvc: Annotated[str | None, Field(max_length=253, pattern=NAME_PATTERN)] = None
    # What task pods may reach besides the inference endpoint: the store (its pods or CIDR).
    artifacts_egress: list[EgressRule] = Field(default_factory=list)
    artifacts_max_files: Annotated[int, Field(ge=0, le=100_000)] = DEFAULT_CAPS.max_files
    artifacts_max_file_bytes: Annotated[int, Field(ge=0)] = DEFAULT_CAPS.max_file_bytes
    artifacts_max_total_bytes: Annotated[int, Field(ge=0, le=8 * 1024**3)] = (
        DEFAULT_CAPS.max_total_bytes
    )
    # Tasks running at once, cluster-wide; 0: no cap of the operator's own (with Kueue in
    # charge of quotas, its ClusterQueues decide who runs).
    max_running_tasks: Annotated[int, Field(ge=0)] = 10
    # The Kueue LocalQueue (label kueue.x-k8s.io/queue-name) of tasks that name none in
    # spec.queueName; None: such pods carry no queue label.
    default_queue_name: Annotated[str | None, Field(max_length=63, pattern=NAME_PATTERN)] = None
    # How often Kueue may stop (preempt, evict) a task's pod and have it made again as a new
    # attempt, apart from spec.retries; once more fails the task (exitReason preempted).
    max_preemptions: Annotated[int, Field(ge=0, le=100)] = 10
    # Per-endpoint caps (besides max_running_tasks), and whether the operator learns each
    # endpoint's capacity from the 429s and latency its agents report (docs/operator.md).
    endpoint_limits: list[EndpointLimit] = Field(default_factory=list)
    adaptive_admission: bool = True
    # Seconds after completionTime a finished task is deleted (with its pod and ConfigMap),
    # for tasks without spec.ttlSecondsAfterFinished; None: kept until someone deletes them.
    task_ttl_seconds: Annotated[int | None, Field(ge=0, le=365 * 86_400)] = None
    # Keep the pods of finished tasks (for `sandboxctl logs`, debugging); False: each is
    # deleted once its result has been read.
    keep_finished_pods: bool = False
    watched_namespaces: list[Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]] = Field(
        default_factory=list, description="Namespaces to watch; empty means all."
    )
    # 0 turns the metrics endpoint off (tests read the registry directly).
    metrics_port: Annotated[int, Field(ge=0, le=65_535)] = 9090
    # kopf's liveness endpoint (GET /healthz); the chart's probes use 8080. 0 turns it off.
    health_port: Annotated[int, Field(ge=0, le=65_535)] = 8080
    token_prices: dict[str, TokenPrice] = Field(default_factory=dict)
    deadline_grace_seconds: Annotated[int, Field(ge=0, le=3600)] = 60
    # How often queued tasks' status.queuePosition is brought up to date.
    queue_refresh_seconds: Annotated[float, Field(gt=0, le=3600)] = 30
    # How long the agent waits for the sandbox container's exec server before giving up.
    execd_ready_timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 120
    # A pod not started this long after its creation (unschedulable, stuck creating) fails the
    # task: Kubernetes' activeDeadlineSeconds only counts once a node has taken the pod. 0: never.
    pod_start_timeout_seconds: Annotated[int, Field(ge=0, le=86_400)] = 900
    # At start, run one pod under the isolated policy to learn whether the network plugin
    # enforces NetworkPolicy (canary.py); off by default: it needs a pod and an image pull.
    netpol_canary: bool = False
    # Where the canary runs: default the first watched namespace, else "default".
    netpol_canary_namespace: Annotated[str | None, Field(pattern=NAME_PATTERN, max_length=63)] = (
        None
    )
    # ADDRESS:PORT the canary tries to reach; default the API server the operator talks to.
    netpol_canary_target: Annotated[str | None, AfterValidator(_valid_address_port)] = None

    @property
    def canary_namespace(self) -> str:
        if self.netpol_canary_namespace:
            return self.netpol_canary_namespace
        return self.watched_namespaces[0] if self.watched_namespaces else "default"

    @field_validator("netpol_canary_namespace")
    @classmethod
    def _canary_in_a_watched_namespace(cls, value: str | None, info: ValidationInfo) -> str | None:
        watched = info.data.get("watched_namespaces") or []
        if value and watched and value not in watched:
            raise ValueError(
                f"{value!r} is not one of LLMSANDBOX_WATCHED_NAMESPACES, where the operator may "
                "create pods"
            )
        return value

    @field_validator("sandbox_max_limits")
    @classmethod
    def _known_resources(cls, maxima: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(maxima) - set(LIMITED_RESOURCES))
        if unknown:
            raise ValueError(
                f"unknown resource {unknown[0]!r}: use cpu, memory or ephemeral-storage"
            )
        return maxima

    @model_validator(mode="after")
    def _one_limit_per_endpoint(self) -> OperatorSettings:
        seen: set[tuple[str, str | None]] = set()
        for i, limit in enumerate(self.endpoint_limits):
            key = (canonical_base_url(limit.base_url), limit.model)
            if key in seen:
                model = f" and model {limit.model}" if limit.model else ""
                raise ValueError(
                    f"endpoint_limits[{i}]: a second limit for {limit.base_url}{model}"
                )
            seen.add(key)
        return self

    @model_validator(mode="after")
    def _a_file_store_is_a_volume(self) -> OperatorSettings:
        url = self.artifacts_url
        is_file = url is not None and parse_store_url(url, "artifacts_url").scheme == "file"
        if is_file and self.artifacts_pvc is None:
            raise ValueError(
                f"{ENV_PREFIX}ARTIFACTS_URL={self.artifacts_url}: a file:// store on a cluster "
                f"is a volume: name its PersistentVolumeClaim in {ENV_PREFIX}ARTIFACTS_PVC (it "
                "is mounted at the URL's path, into the agent container only)"
            )
        if self.artifacts_pvc is not None and not is_file:
            raise ValueError(
                f"{ENV_PREFIX}ARTIFACTS_PVC={self.artifacts_pvc}: only used with a file:// "
                f"{ENV_PREFIX}ARTIFACTS_URL"
            )
        return self

    @model_validator(mode="after")
    def _defaults_within_the_maxima(self) -> OperatorSettings:
        for name, most in self.sandbox_max_limits.items():
            for kind in ("requests", "limits"):
                value = getattr(self.sandbox_default_resources, kind).get(name)
                if value is not None and parse_quantity(value) > parse_quantity(most):
                    raise ValueError(
                        f"{ENV_PREFIX}SANDBOX_DEFAULT_RESOURCES.{kind}.{name}: {value} is above "
                        f"{ENV_PREFIX}SANDBOX_MAX_LIMITS.{name} {most}"
                    )
        return self

    @property
    def isolated_pods_resolve_names(self) -> bool:
        return self.dns_egress and self.isolated_dns_egress

    @model_validator(mode="after")
    def _isolated_pods_can_reach_the_default_endpoint(self) -> OperatorSettings:
        if self.default_base_url and not self.isolated_pods_resolve_names:
            host = parse_endpoint(self.default_base_url).host
            if not is_ip_address(host):
                variable = "DNS_EGRESS" if not self.dns_egress else "ISOLATED_DNS_EGRESS"
                raise ValueError(
                    f"{ENV_PREFIX}{variable}=false with {ENV_PREFIX}DEFAULT_BASE_URL="
                    f"{self.default_base_url}: isolated pods get no DNS, so they cannot resolve "
                    f"{host}; give the default base URL as an IP address"
                )
        return self


def _env_name(loc: tuple[int | str, ...]) -> str:
    if not loc:
        return ""  # a rule across variables: its message names them
    head, *rest = loc
    name = f"{ENV_PREFIX}{str(head).upper()}"
    for part in rest:
        name += f"[{part}]" if isinstance(part, int) else f".{part}"
    return name


def load_settings() -> OperatorSettings:
    """Read the environment once at start-up; SettingsError names each bad variable."""
    try:
        return OperatorSettings()
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = _env_name(tuple(err["loc"]))
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"{name}: {message}" if name else message)
        raise SettingsError("\n".join(lines)) from None


def cost_usd(
    settings: OperatorSettings, model: str, prompt_tokens: int, completion_tokens: int
) -> float | None:
    """Estimated cost of the tokens, or None when the operator has no price for the model."""
    price = settings.token_prices.get(model)
    if price is None:
        return None
    return (
        prompt_tokens * price.prompt_per_million + completion_tokens * price.completion_per_million
    ) / 1_000_000
