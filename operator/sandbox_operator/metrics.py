"""Prometheus metrics: names as sentences, base units, no task name or UID as a label."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sandbox_agent import __version__
from sandbox_agent.graders import GRADER_TYPES
from sandbox_agent.result import Phase, TaskResult

_DURATION_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 21600)
# Scores lie in [0, 1]; most graders give 0 or 1, partial credit falls in between.
_SCORE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_STARTUP_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class _PhaseCollector(Collector):
    """Tasks by phase, computed at scrape time from the operator's index (no drift to fix)."""

    def __init__(self, count_by_phase: Callable[[], dict[str, int]]) -> None:
        self._count = count_by_phase

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "llmsandbox_tasks", "SandboxTasks the operator knows of, by phase.", labels=["phase"]
        )
        counts = self._count()
        for phase in Phase:
            family.add_metric([phase.value], counts.get(phase.value, 0))
        yield family


EndpointLimits = Callable[[], Sequence[tuple[str, int | None, int]]]
"""Each endpoint group's name, admission limit (None: none of its own) and running tasks."""

MAX_ENDPOINT_SERIES = 50
"""Endpoint groups exported at most (the first by name): every group the operator has seen a
task of, up to endpoint_admission.MAX_GROUPS, would be too many series."""


class _EndpointCollector(Collector):
    """Per endpoint group, its admission limit and running tasks, read at scrape time."""

    def __init__(self, endpoint_limits: EndpointLimits) -> None:
        self._read = endpoint_limits

    def collect(self) -> Iterator[GaugeMetricFamily]:
        limit = GaugeMetricFamily(
            "llmsandbox_endpoint_admission_limit",
            "How many tasks of an endpoint group (base URL, or model @ base URL) may run at "
            "once: its cap or the limit learnt from its agents' 429s and latency, at most "
            "the global cap.",
            labels=["endpoint"],
        )
        running = GaugeMetricFamily(
            "llmsandbox_endpoint_running_tasks",
            "Tasks of an endpoint group admitted and not finished.",
            labels=["endpoint"],
        )
        for name, cap, active in sorted(self._read())[:MAX_ENDPOINT_SERIES]:
            if cap is not None:
                limit.add_metric([name], cap)
            running.add_metric([name], active)
        yield limit
        yield running


class Metrics:
    def __init__(
        self,
        count_by_phase: Callable[[], dict[str, int]],
        max_running: int,
        endpoint_limits: EndpointLimits | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.registry.register(_PhaseCollector(count_by_phase))
        self.registry.register(_EndpointCollector(endpoint_limits or list))
        self.completed = Counter(
            "llmsandbox_tasks_completed_total",
            "Tasks that reached a terminal phase, by phase and exit reason.",
            ["phase", "exit_reason"],
            registry=r,
        )
        self.retries = Counter(
            "llmsandbox_task_retries_total",
            "Task attempts restarted after an infrastructure failure or a Kueue preemption, by exit "
            "reason.",
            ["exit_reason"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "llmsandbox_queue_wait_seconds",
            "Time from a task's creation to its admission.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.pod_startup = Histogram(
            "llmsandbox_pod_startup_seconds",
            "Time from a task's admission to its pod running.",
            buckets=_STARTUP_BUCKETS,
            registry=r,
        )
        self.run_duration = Histogram(
            "llmsandbox_task_run_seconds",
            "Time from a task's pod running to the task's end.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.llm_requests = Counter(
            "llmsandbox_llm_requests_total",
            "Chat-completion requests the agents made, by model.",
            ["model"],
            registry=r,
        )
        self.llm_retries = Counter(
            "llmsandbox_llm_retries_total",
            "Chat-completion requests the agents retried (429, 5xx, timeouts), by model.",
            ["model"],
            registry=r,
        )
        self.llm_throttled = Counter(
            "llmsandbox_llm_throttled_total",
            "429 (Too Many Requests) answers the agents got from their endpoint, by model.",
            ["model"],
            registry=r,
        )
        self.tokens = Counter(
            "llmsandbox_llm_tokens_total",
            "Tokens the agents used, by model and direction (prompt or completion).",
            ["model", "direction"],
            registry=r,
        )
        self.cost = Counter(
            "llmsandbox_estimated_cost_usd_total",
            "Estimated inference cost in US dollars, from the operator's token prices, by model.",
            ["model"],
            registry=r,
        )
        self.tool_calls = Counter(
            "llmsandbox_tool_calls_total",
            "Tool calls the models made, by tool.",
            ["tool"],
            registry=r,
        )
        self.artifact_failures = Counter(
            "llmsandbox_artifact_store_failures_total",
            "Tasks that ended with part of their artifacts not stored (status.artifactsError).",
            registry=r,
        )
        self.task_score = Histogram(
            "llmsandbox_task_score",
            "Scores of graded tasks (0 to 1), by grader type; infrastructure failures are not graded.",
            ["grader"],
            buckets=_SCORE_BUCKETS,
            registry=r,
        )
        self.tasksets_completed = Counter(
            "llmsandbox_tasksets_completed_total",
            "SandboxTaskSets that reached a terminal phase, by result (Succeeded or Failed).",
            ["result"],
            registry=r,
        )
        self.max_running = Gauge(
            "llmsandbox_max_running_tasks",
            "The operator's cap on tasks running at once.",
            registry=r,
        )
        self.max_running.set(max_running)
        self.build_info = Gauge(
            "llmsandbox_build_info",
            "Always 1; the labels say which build is running.",
            ["version"],
            registry=r,
        )
        self.build_info.labels(version=__version__).set(1)
        self.network_policy_enforced = Gauge(
            "llmsandbox_network_policy_enforced",
            "1 when the start-up canary found NetworkPolicy enforced, 0 when a pod under the "
            "isolated policy could connect anyway, -1 when unknown (canary off, or no verdict).",
            registry=r,
        )
        self.network_policy_enforced.set(-1)

    def record_result(self, model: str, result: TaskResult, cost: float | None) -> None:
        usage = result.usage
        self.llm_requests.labels(model=model).inc(usage.llm_calls)
        self.llm_retries.labels(model=model).inc(usage.llm_retries)
        self.llm_throttled.labels(model=model).inc(usage.llm_throttled)
        self.tokens.labels(model=model, direction="prompt").inc(usage.prompt_tokens)
        self.tokens.labels(model=model, direction="completion").inc(usage.completion_tokens)
        if cost:
            self.cost.labels(model=model).inc(cost)
        for tool, n in result.tool_calls.items():
            self.tool_calls.labels(tool=tool).inc(n)
        if result.artifacts_error:
            self.artifact_failures.inc()
        score = result.counted_score
        if score is not None:
            # A bounded label: the known grader types only.
            grader = result.grader if result.grader in GRADER_TYPES else "other"
            self.task_score.labels(grader=grader).observe(score)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)


# Every metric family the operator exports; the dashboard and alerts are checked against it.
METRIC_NAMES = (
    "llmsandbox_tasks",
    "llmsandbox_tasks_completed_total",
    "llmsandbox_task_retries_total",
    "llmsandbox_queue_wait_seconds",
    "llmsandbox_pod_startup_seconds",
    "llmsandbox_task_run_seconds",
    "llmsandbox_llm_requests_total",
    "llmsandbox_llm_retries_total",
    "llmsandbox_llm_throttled_total",
    "llmsandbox_llm_tokens_total",
    "llmsandbox_estimated_cost_usd_total",
    "llmsandbox_tool_calls_total",
    "llmsandbox_artifact_store_failures_total",
    "llmsandbox_task_score",
    "llmsandbox_tasksets_completed_total",
    "llmsandbox_max_running_tasks",
    "llmsandbox_endpoint_admission_limit",
    "llmsandbox_endpoint_running_tasks",
    "llmsandbox_build_info",
    "llmsandbox_network_policy_enforced",
)
