"""In-memory doubles for the agent loop, as mini-swe-agent's DeterministicModel: a model that
replies from a script and a sandbox whose files live in a dict, so a loop test needs no server,
no process and no wall clock. The real ones (ChatLLM, ExecClient) are tested against real
servers in test_agent_loop.py."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from sandbox_agent.errors import ExecServerError, LLMError
from sandbox_agent.execclient import DirEntry, ExecResult, FileContent, Listing, WrittenFile
from sandbox_agent.protocols import Completion, ToolCallRequest

WORKSPACE = "/workspace"


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def reply(
    content: str = "",
    calls: list[tuple[str, dict[str, Any] | str]] | None = None,
    usage: tuple[int, int] = (100, 20),
    retries: int = 0,
) -> Completion:
    """A completion as ChatLLM makes it; string arguments are sent as they are (broken JSON)."""
    requests = [
        ToolCallRequest(
            id=f"call_{i}", name=name, arguments=args if isinstance(args, str) else json.dumps(args)
        )
        for i, (name, args) in enumerate(calls or [])
    ]
    raw: dict[str, Any] = {"role": "assistant", "content": content}
    if requests:
        raw["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in requests
        ]
    return Completion(
        content=content,
        tool_calls=requests,
        finish_reason="tool_calls" if requests else "stop",
        prompt_tokens=usage[0],
        completion_tokens=usage[1],
        usage_reported=True,
        seconds=0.0,
        retries=retries,
        raw_message=raw,
    )


def tool_call(
    name: str, args: dict[str, Any] | str, usage: tuple[int, int] = (100, 20)
) -> Completion:
    return reply(calls=[(name, args)], usage=usage)


@dataclass(frozen=True)
class Turn:
    """One scripted call: what it returns or raises, how many retries it took, how long."""

    outcome: Completion | LLMError
    retries: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Request:
    """What the loop asked of the model in one call."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    max_tokens: int
    deadline: float


class ScriptedModel:
    """Answers each call with the next Turn (a Completion alone is a Turn); when the script is
    used up, with `default` (or a submit). Keeps every request; each turn moves `clock` on by
    its seconds (give the loop the same clock)."""

    def __init__(
        self,
        *script: Turn | Completion | LLMError,
        default: Turn | Completion | LLMError | None = None,
        clock: FakeClock | None = None,
    ) -> None:
        self.script = [t if isinstance(t, Turn) else Turn(t) for t in script]
        self.default = default
        self.clock = clock or FakeClock()
        self.requests: list[Request] = []
        self.retries = 0
        self.throttled = 0

    def _next(self) -> Turn:
        if self.script:
            return self.script.pop(0)
        turn = self.default or tool_call("submit", {"answer": "out of script"})
        return turn if isinstance(turn, Turn) else Turn(turn)

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
        # A copy: the loop goes on appending to its own list.
        self.requests.append(Request(list(messages), tools, max_tokens, deadline))
        turn = self._next()
        self.retries += turn.retries
        self.clock.advance(turn.seconds)
        if isinstance(turn.outcome, LLMError):
            raise turn.outcome
        return turn.outcome

    def last_seen(self, call: int) -> str:
        """The last message of request `call`: what the model was shown before replying."""
        return str(self.requests[call].messages[-1]["content"])


def shell(stdout: str = "", exit_code: int = 0, stderr: str = "") -> ExecResult:
    return ExecResult(exit_code=exit_code, stdout=stdout, stderr=stderr)


def _not_found(path: str) -> ExecServerError:
    return ExecServerError("not_found", f"{path} does not exist", 404)


@dataclass
class InMemorySandbox:
    """Files by path relative to the workspace; each command answered by `commands` (by the
    exact command text, else an empty success). An exception there is raised, as the exec
    server's client would."""

    files: dict[str, str] = field(default_factory=dict)
    commands: dict[str, ExecResult | Exception] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    timeouts: list[float] = field(default_factory=list)

    @staticmethod
    def _rel(path: str) -> str:
        full = posixpath.normpath(posixpath.join(WORKSPACE, path))
        return posixpath.relpath(full, WORKSPACE)

    def _is_dir(self, rel: str) -> bool:
        return rel == "." or any(p.startswith(rel + "/") for p in self.files)

    async def exec(self, command: str, timeout: float, max_output_bytes: int = 32768) -> ExecResult:
        self.ran.append(command)
        self.timeouts.append(timeout)
        answer = self.commands.get(command, shell())
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def read_text(
        self,
        path: str,
        start_line: int | None = None,
        end_line: int | None = None,
        max_bytes: int | None = None,
    ) -> FileContent:
        rel = self._rel(path)
        if self._is_dir(rel):
            raise ExecServerError("is_directory", f"{path} is a directory", 400)
        if rel not in self.files:
            raise _not_found(path)
        text = self.files[rel]
        if start_line is not None:
            lines = text.split("\n")
            text = "\n".join(lines[start_line - 1 : None if end_line == -1 else end_line])
        data = text.encode()
        cut = data[:max_bytes] if max_bytes is not None else data
        return FileContent(
            path=f"{WORKSPACE}/{rel}",
            content=cut.decode("utf-8", "ignore"),
            encoding="utf-8",
            size=len(data),
            truncated=len(cut) < len(data),
        )

    async def write_text(self, path: str, content: str) -> WrittenFile:
        rel = self._rel(path)
        self.files[rel] = content
        return WrittenFile(path=f"{WORKSPACE}/{rel}", size=len(content.encode()))

    async def list_dir(
        self, path: str, recursive: bool = False, max_entries: int = 1000
    ) -> Listing:
        rel = self._rel(path)
        prefix = "" if rel == "." else rel + "/"
        entries = [
            DirEntry(path=p.removeprefix(prefix), type="file", size=len(text.encode()))
            for p, text in sorted(self.files.items())
            if p.startswith(prefix)
        ]
        where = WORKSPACE if rel == "." else f"{WORKSPACE}/{rel}"
        return Listing(path=where, entries=entries[:max_entries])
