"""Events the agent loop emits; presentation (CLI progress, logs, metrics) subscribes to them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias


@dataclass(frozen=True)
class StepStarted:
    step: int
    max_steps: int
    total_tokens: int


@dataclass(frozen=True)
class LLMReplied:
    step: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    content: str


@dataclass(frozen=True)
class LLMRetrying:
    attempt: int
    delay_seconds: float
    reason: str


@dataclass(frozen=True)
class ToolCallStarted:
    step: int
    tool: str
    summary: str


@dataclass(frozen=True)
class ToolCallFinished:
    step: int
    tool: str
    ok: bool
    seconds: float
    summary: str


@dataclass(frozen=True)
class Notice:
    """Something a person watching should know that is not an error (e.g. a shrunken max_tokens)."""

    message: str


@dataclass(frozen=True)
class EndpointChosen:
    """Before the first step: where the model is asked (the URL without any userinfo)."""

    base_url: str
    model: str
    # No base URL was given anywhere, so OpenAI's own API is asked.
    default: bool = False
    # The built-in local model, served on this machine for the run.
    local: bool = False


Event: TypeAlias = (
    StepStarted
    | LLMReplied
    | LLMRetrying
    | ToolCallStarted
    | ToolCallFinished
    | Notice
    | EndpointChosen
)
EventSink: TypeAlias = Callable[[Event], None]


def ignore(_: Event) -> None:
    return None
