"""What a finished task reports: phase, exit reason, answer, steps, usage, outputs."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class Phase(StrEnum):
    PENDING = "Pending"
    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


# Phases a task never leaves.
TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED})


class ExitReason(StrEnum):
    """Why a task ended. Only SUBMITTED is a success."""

    SUBMITTED = "submitted"
    """The model called submit (or wrote /workspace/output/answer.txt) and an answer exists."""
    NO_ANSWER = "no_answer"
    """The model called submit without an answer and wrote no answer file."""
    MAX_STEPS = "max_steps"
    """The model used every step in limits.maxSteps without submitting."""
    TOKEN_BUDGET = "token_budget"  # noqa: S105 - an exit reason
    """The conversation outgrew limits.maxTokens (or the spend cap limits.maxTotalTokens)."""
    DEADLINE = "deadline"
    """limits.activeDeadlineSeconds passed before the model submitted."""
    LLM_ERROR = "llm_error"
    """The inference endpoint kept failing after bounded retries, or refused the request."""
    SANDBOX_ERROR = "sandbox_error"
    """The sandbox could not be started or its exec server stopped answering."""
    INVALID_SPEC = "invalid_spec"
    """The task spec is invalid; the message names the field."""
    CANCELLED = "cancelled"
    """The run was interrupted (Ctrl-C locally, the task deleted on a cluster)."""
    IMAGE_PULL_ERROR = "image_pull_error"
    """A container image could not be pulled (cluster only)."""
    CONFIG_ERROR = "config_error"
    """A Secret or ConfigMap the pod needs does not exist (cluster only)."""
    OOM_KILLED = "oom_killed"
    """A container used more memory than its limit (cluster only)."""
    EVICTED = "evicted"
    """The node evicted the pod, e.g. under memory or disk pressure (cluster only; retried)."""
    POD_LOST = "pod_lost"
    """The pod was deleted or vanished before reporting a result (cluster only; retried)."""
    AGENT_CRASHED = "agent_crashed"
    """The agent container exited without reporting a result (cluster only; retried)."""
    START_TIMEOUT = "start_timeout"
    """The pod did not start in time, e.g. no node can fit it (cluster only)."""
    PREEMPTED = "preempted"
    """Kueue stopped the task's pod (preempted or evicted it) more often than the operator makes
    it again (LLMSANDBOX_MAX_PREEMPTIONS; cluster only)."""


# Endings that say nothing about the model: the platform failed it (the image, the node, the
# endpoint, the task's own configuration) or it was stopped. Never scored: an RL batch must not
# learn from a zero the model did not earn. Counted apart in a set's status.
INFRASTRUCTURE_FAILURES = frozenset(
    {
        ExitReason.LLM_ERROR,
        ExitReason.SANDBOX_ERROR,
        ExitReason.INVALID_SPEC,
        ExitReason.IMAGE_PULL_ERROR,
        ExitReason.CONFIG_ERROR,
        ExitReason.OOM_KILLED,
        ExitReason.EVICTED,
        ExitReason.POD_LOST,
        ExitReason.AGENT_CRASHED,
        ExitReason.START_TIMEOUT,
        ExitReason.PREEMPTED,
    }
)


def is_scored(reason: ExitReason) -> bool:
    """Whether an ending is the model's own (an answer, or a model that ran out of steps, tokens
    or time) and so gets a score; infrastructure failures and cancellations do not."""
    return reason not in INFRASTRUCTURE_FAILURES and reason is not ExitReason.CANCELLED


class WireModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Usage(WireModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    llm_calls: int = 0
    llm_retries: int = 0
    # 429 answers the endpoint gave (retried or not), and the seconds its answered calls took:
    # the operator's adaptive admission reads both (docs/operator.md, "Endpoint admission").
    llm_throttled: int = 0
    llm_seconds: float = 0.0
    cost_usd: float | None = Field(default=None, alias="costUSD")

    def add(self, prompt: int, completion: int) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.total_tokens += prompt + completion
        self.llm_calls += 1


class OutputFile(WireModel):
    path: str
    bytes: int


class TaskResult(WireModel):
    phase: Phase
    exit_reason: ExitReason
    message: str = ""
    # A CamelCase name for the cause when it is known (EndpointUnreachable, ExecServerNotReady).
    cause: str | None = None
    answer: str | None = None
    answer_truncated: bool = False
    steps: int = 0
    usage: Usage = Field(default_factory=Usage)
    tool_calls: dict[str, int] = Field(default_factory=dict)
    outputs: list[OutputFile] = Field(default_factory=list)
    # Why files of output/ were left out (over a cap, unreadable), one line each.
    outputs_not_collected: list[str] = Field(default_factory=list)
    duration_seconds: float = 0.0
    # Where the artifact store keeps this run (result.json there has the whole answer), and
    # the first thing it failed to store.
    artifacts_url: str | None = Field(default=None, alias="artifactsURL")
    artifacts_error: str | None = None
    # The grader's score in [0, 1] (tasks with spec.grading), its type, and why it is not 1.
    score: Annotated[float | None, Field(ge=0, le=1)] = None
    grader: Annotated[str | None, Field(max_length=32)] = None
    grade_message: Annotated[str | None, Field(max_length=1024)] = None

    @property
    def counted_score(self) -> float | None:
        """The score where it counts: an ending that is the model's own (is_scored). A pod that
        failed after the agent graded its answer (OOM, eviction) says nothing about the model."""
        return self.score if is_scored(self.exit_reason) else None

    def to_json(self) -> str:
        # ASCII-escaped: the result is one log line whatever the answer holds (no raw U+2028,
        # U+0085 or other characters that a reader could take for a line break).
        return self.model_dump_json(by_alias=True, exclude_none=True, ensure_ascii=True)


RESULT_LOG_PREFIX = "LLMSANDBOX_RESULT "
# Kubernetes keeps at most this much of a termination message.
TERMINATION_MESSAGE_LIMIT = 4096


def termination_message(result: TaskResult, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """The result as JSON within `limit` bytes. When it does not fit, the answer is cut and
    `resultInLog` says the whole result is the last log line (after RESULT_LOG_PREFIX)."""
    full = result.to_json()
    if len(full.encode()) <= limit:
        return full
    slim = result.model_copy(
        update={"tool_calls": {}, "outputs": result.outputs[:5], "outputs_not_collected": []}
    )
    data = slim.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["resultInLog"] = True
    data["answerTruncated"] = True
    answer = data.pop("answer", None) or ""
    message = data.pop("message", "") or ""
    data["message"] = message[:512]
    room = limit - len(json.dumps(data, ensure_ascii=False).encode()) - 32
    encoded = answer.encode()[: max(0, room)].decode("utf-8", "ignore")
    # JSON escaping can grow the text; shrink until the whole message fits.
    while True:
        data["answer"] = encoded
        text = json.dumps(data, ensure_ascii=False)
        if len(text.encode()) <= limit or not encoded:
            return text
        encoded = encoded[: len(encoded) * 3 // 4]


def phase_for(reason: ExitReason) -> Phase:
    if reason is ExitReason.SUBMITTED:
        return Phase.SUCCEEDED
    if reason is ExitReason.CANCELLED:
        return Phase.CANCELLED
    return Phase.FAILED
