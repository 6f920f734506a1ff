"""What the operator hands the agent container: the resolved task as /etc/llmsandbox/task.json."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from .apimodel import ApiModel
from .graders import Grading
from .outputs import DEFAULT_CAPS, OutputCaps
from .task import (
    BASE_URL,
    MODEL_NAME,
    Limits,
    MaxTokensPerCall,
    RequestTimeoutSeconds,
    Temperature,
    ToolCallFormat,
    TopP,
)


class PodModelConfig(ApiModel):
    """The task's spec.model resolved against the operator's defaults, with the same bounds."""

    name: Annotated[str, MODEL_NAME]
    base_url: Annotated[str, BASE_URL] = Field(alias="baseURL")
    temperature: Temperature = None
    top_p: TopP = None
    max_tokens_per_call: MaxTokensPerCall = 8192
    tool_call_format: ToolCallFormat = ToolCallFormat.AUTO
    request_timeout_seconds: RequestTimeoutSeconds = 600


class PodArtifacts(ApiModel):
    """The operator's artifact store and the caps on what a run's output/ may put there."""

    url: Annotated[str, Field(min_length=1)]
    max_files: Annotated[int, Field(ge=0)] = DEFAULT_CAPS.max_files
    max_file_bytes: Annotated[int, Field(ge=0)] = DEFAULT_CAPS.max_file_bytes
    max_total_bytes: Annotated[int, Field(ge=0)] = DEFAULT_CAPS.max_total_bytes

    @property
    def caps(self) -> OutputCaps:
        return OutputCaps(self.max_files, self.max_file_bytes, self.max_total_bytes)


class PodTaskConfig(ApiModel):
    """Everything the agent needs besides the API key (env) and the exec server (shared volume)."""

    name: str = ""
    prompt: Annotated[str, Field(min_length=1)]
    model: PodModelConfig
    limits: Limits = Field(default_factory=Limits)
    artifacts: PodArtifacts | None = None
    grading: Grading | None = None
