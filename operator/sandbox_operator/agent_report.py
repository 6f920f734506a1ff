"""Reading what the agent reported: its termination message, or the last log line when that was too small."""

from __future__ import annotations

import json

from pydantic import ValidationError

from sandbox_agent.result import RESULT_LOG_PREFIX, TaskResult


class ResultError(Exception):
    """The agent's report could not be read; the message says what was wrong."""


def parse_termination_message(text: str) -> tuple[TaskResult, bool]:
    """The result, and whether the whole result must be read from the log instead."""
    try:
        data = json.loads(text)
    except ValueError:
        raise ResultError(f"the agent's termination message is not JSON: {text[:200]!r}") from None
    if not isinstance(data, dict):
        raise ResultError("the agent's termination message is not a JSON object")
    in_log = bool(data.pop("resultInLog", False))
    try:
        return TaskResult.model_validate(data), in_log
    except ValidationError as exc:
        raise ResultError(f"the agent's termination message is not a result: {exc}") from None


def parse_log_result(log: str) -> TaskResult:
    """The last `LLMSANDBOX_RESULT {...}` line of the agent's log.

    Lines end at `\n` only: `str.splitlines` also breaks at U+2028, U+2029, U+0085 and other
    separators that a model's answer may hold, which would cut the result line apart."""
    for line in reversed(log.split("\n")):
        if line.startswith(RESULT_LOG_PREFIX):
            try:
                return TaskResult.model_validate_json(line.removeprefix(RESULT_LOG_PREFIX))
            except ValidationError as exc:
                raise ResultError(f"the result line in the agent's log is invalid: {exc}") from None
    raise ResultError("the agent's log has no result line")
