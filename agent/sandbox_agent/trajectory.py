"""The full record of a run (every message, tool call, observation, timing, usage) as JSON.

trajectory.json is written when the run ends. While it goes, each finished step is appended to
trajectory.jsonl beside it (a line per step), so that a run killed outright (SIGKILL, the OOM
killer, a lost machine) still leaves every step it finished; `Trajectory.from_journal` reads it
back. The journal is removed once trajectory.json is written."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, PrivateAttr, ValidationError

from .result import TaskResult


class ToolCallRecord(BaseModel):
    id: str
    name: str
    arguments: str
    observation: str
    ok: bool
    seconds: float


class StepRecord(BaseModel):
    step: int
    started_at: float
    llm_seconds: float
    llm_retries: int
    prompt_tokens: int
    completion_tokens: int
    usage_reported: bool
    finish_reason: str
    max_tokens: int | None = None
    """The call's max_tokens (it shrinks as the token budget is spent)."""
    content: str
    tool_calls: list[ToolCallRecord] = Field(default_factory=list)
    text_tool_calls: bool = False


class Trajectory(BaseModel):
    format_version: int = 2
    task_name: str = ""
    model: str = ""
    base_url: str = ""
    tool_call_format: str = ""
    # What every call was sent besides the messages (the same for the whole run); per-call
    # max_tokens is in each step. Version 2 added these.
    tools: list[dict[str, Any]] | None = None
    temperature: float | None = None
    top_p: float | None = None
    started_at: float = Field(default_factory=time.time)
    messages: list[dict[str, Any]] = Field(default_factory=list)
    steps: list[StepRecord] = Field(default_factory=list)
    result: TaskResult | None = None
    _journal: Path | None = PrivateAttr(default=None)
    _journaled_messages: int = PrivateAttr(default=0)
    # Also handed each step's journal lines (the artifact store's copy).
    _journal_sink: Callable[[str], None] | None = PrivateAttr(default=None)

    def keep_journal(self, path: Path) -> None:
        """Append each finished step to `path` from now on (see the module's docstring)."""
        self._journal = path
        self._journaled_messages = 0

    def send_journal_to(self, sink: Callable[[str], None]) -> None:
        """Hand each finished step's journal lines to `sink` too, from now on."""
        self._journal_sink = sink

    def step_done(self, step: StepRecord) -> None:
        """`step` has finished (its tool calls run, their results in the messages)."""
        if self._journal is None and self._journal_sink is None:
            return
        lines: list[dict[str, Any]] = []
        if self._journaled_messages == 0:
            header = self.model_dump(mode="json", exclude={"messages", "steps", "result"})
            lines.append({"record": "run", **header})
        new = self.messages[self._journaled_messages :]
        lines.append({"record": "step", "step": step.model_dump(mode="json"), "messages": new})
        text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        self._journaled_messages = len(self.messages)
        if self._journal_sink is not None:
            self._journal_sink(text)
        if self._journal is None:
            return
        try:
            self._journal.parent.mkdir(parents=True, exist_ok=True)
            with self._journal.open("a", encoding="utf-8") as fh:
                fh.write(text)
        except OSError:
            # The journal is insurance; a full disk must not end the run (trajectory.json,
            # written at the end, reports it).
            self._journal = None

    @classmethod
    def from_journal(cls, path: Path) -> Trajectory:
        """The record a journal holds: every step it finished, with no result. A last line cut
        short by the kill is left out; anything else unreadable is a ValueError naming the line."""
        trajectory = cls()
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                kind = entry.pop("record")
                if kind == "run":
                    trajectory = cls.model_validate(entry)
                elif kind == "step":
                    trajectory.steps.append(StepRecord.model_validate(entry["step"]))
                    trajectory.messages.extend(entry["messages"])
                else:
                    raise ValueError(f"unknown record {kind!r}")
            except (ValueError, KeyError, TypeError, AttributeError, ValidationError) as exc:
                if number == len(lines) and not line.endswith("\n"):
                    break  # the write the kill interrupted
                raise ValueError(f"{path}: line {number} is not a journal record ({exc})") from None
        return trajectory

    def write(self, path: Path) -> None:
        """Atomic, so a reader never sees half a file even if the run is killed mid-write."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".trajectory-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                # dumps, not dump: json.dump streams through the pure-Python encoder.
                fh.write(
                    json.dumps(self.model_dump(mode="json", by_alias=True), ensure_ascii=False)
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
