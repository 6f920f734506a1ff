"""What a finished task reports: phase, exit reason, answer, steps, usage, outputs."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class Phase(StrEnum):
    PENDING = "Pending"
    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


class ExitReason(StrEnum):
    """Why a task ended. Only SUBMITTED is a success."""

    SUBMITTED = "submitted"
    """The model called submit (or wrote /workspace/output/answer.txt) and an answer exists."""
    NO_ANSWER = "no_answer"
    """The model called submit without an answer and wrote no answer file."""
    MAX_STEPS = "max_steps"
    """The model used every step in limits.maxSteps without submitting."""
    TOKEN_BUDGET = "token_budget"
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


class WireModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Usage(WireModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    llm_calls: int = 0
    llm_retries: int = 0
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
    answer: str | None = None
    answer_truncated: bool = False
    steps: int = 0
    usage: Usage = Field(default_factory=Usage)
    tool_calls: dict[str, int] = Field(default_factory=dict)
    outputs: list[OutputFile] = Field(default_factory=list)
    duration_seconds: float = 0.0

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


def phase_for(reason: ExitReason) -> Phase:
    if reason is ExitReason.SUBMITTED:
        return Phase.SUCCEEDED
    if reason is ExitReason.CANCELLED:
        return Phase.CANCELLED
    return Phase.FAILED
