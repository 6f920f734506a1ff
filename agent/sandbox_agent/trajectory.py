"""The full record of a run (every message, tool call, observation, timing, usage) as JSON."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

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

    def write(self, path: Path) -> None:
        """Atomic, so a reader never sees half a file even if the run is killed mid-write."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".trajectory-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.model_dump(mode="json", by_alias=True), fh, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
