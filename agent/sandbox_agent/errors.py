"""Exception types, one per failure class, each mapped to an exit reason by the runner."""

from __future__ import annotations


class SandboxAgentError(Exception):
    """Base class for every error this package raises on purpose."""


class TaskSpecError(SandboxAgentError):
    """The task file or spec is invalid; the message names the field path."""


class SandboxError(SandboxAgentError):
    """The sandbox could not be started, reached, or used."""


class BackendUnavailableError(SandboxError):
    """The requested (or every) sandbox backend is missing on this machine."""


class ExecServerError(SandboxError):
    """The exec server answered a request with an error."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status

    @property
    def model_can_fix(self) -> bool:
        """A refusal of this request (4xx), or a full disk (507) the model can free space on;
        anything else means the exec server itself is in trouble."""
        return self.status < 500 or self.status == 507


class LLMError(SandboxAgentError):
    """The inference endpoint failed in a way retries could not fix."""


class ContextLengthError(LLMError):
    """The request did not fit the model's context window."""


class EndpointUnreachableError(LLMError):
    """Every attempt failed to connect to the endpoint (DNS, refused, reset, TLS)."""


class DeadlineError(LLMError):
    """The task's wall-clock deadline passed while waiting for the endpoint."""
