"""What the operator hands the agent container: the resolved task as /etc/llmsandbox/task.json."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from .task import ApiModel, Limits, ToolCallFormat


class PodModelConfig(ApiModel):
    name: Annotated[str, Field(min_length=1)]
    base_url: Annotated[str, Field(min_length=1)] = Field(alias="baseURL")
    temperature: float | None = None
    top_p: float | None = None
    max_tokens_per_call: int = 8192
    tool_call_format: ToolCallFormat = ToolCallFormat.AUTO
    request_timeout_seconds: float = 600


class PodTaskConfig(ApiModel):
    """Everything the agent needs besides the API key (env) and the exec server (shared volume)."""

    name: str = ""
    prompt: Annotated[str, Field(min_length=1)]
    model: PodModelConfig
    limits: Limits = Field(default_factory=Limits)
