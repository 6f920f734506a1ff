"""The operator's refusal of a task: valid by the schema, but it cannot run on this cluster."""

from __future__ import annotations

from sandbox_agent.errors import TaskSpecError


class SpecError(TaskSpecError):
    """A task is valid by the schema but cannot run on this cluster; names the field path."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field_path = field_path
        self.message = message
