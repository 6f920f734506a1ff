"""What the agent loop talks to: a model that completes a conversation, and a sandbox that runs
commands and reads, writes and lists files. ChatLLM and ExecClient are the real ones; the tests
also drive the loop with in-memory doubles (tests/inmemory.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from .execclient import ExecResult, FileContent, Listing, WrittenFile


@dataclass(frozen=True)
class ToolCallRequest:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Completion:
    content: str
    tool_calls: list[ToolCallRequest]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    usage_reported: bool
    seconds: float
    retries: int
    raw_message: dict[str, Any] = field(default_factory=dict)


class CompletionModel(Protocol):
    """A chat model behind bounded retries (ChatLLM)."""

    @property
    def retries(self) -> int:
        """Every retry made so far, whether its call then succeeded or gave up."""

    @property
    def throttled(self) -> int:
        """Every 429 (Too Many Requests) answer so far."""

    async def complete(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None,
        max_tokens: int,
        temperature: float | None,
        top_p: float | None,
        deadline: float,
        stop: list[str] | None = None,
    ) -> Completion:
        """One reply, cut before the first of the `stop` strings; an LLMError subclass when there
        is none (DeadlineError once the time.monotonic() `deadline` has passed,
        ContextLengthError when the request is too long)."""


class SandboxAPI(Protocol):
    """The exec server's API as the loop and its tools use it (ExecClient). Every failure is a
    SandboxError; an ExecServerError the model can fix is one it sees."""

    async def exec(self, command: str, timeout: float, max_output_bytes: int = ...) -> ExecResult:
        """Run `command` in the sandbox's persistent shell."""

    async def read_text(
        self,
        path: str,
        start_line: int | None = None,
        end_line: int | None = None,
        max_bytes: int | None = None,
    ) -> FileContent:
        """A text file, or the lines start_line..end_line of it (end_line -1: to the end)."""

    async def write_text(self, path: str, content: str) -> WrittenFile:
        """Create or replace a file, with its parents."""

    async def list_dir(self, path: str, recursive: bool = False, max_entries: int = ...) -> Listing:
        """A directory's entries, paths relative to it."""
