"""One agent run against an exec server: what `sandboxctl run` and the pod's agent share.

Both record the run from its start, make output/, place the inputs, run the loop with a model
client of their own, collect the outputs and write the trajectory; the laptop adds its sandbox
and result.json (runner.py), the pod its wait for the sandbox container and its report
(pod_entrypoint.py)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .artifacts import ArtifactWriter
from .backends.base import ExecEndpoint
from .errors import SandboxError
from .events import EventSink, Notice, ignore
from .execclient import ExecClient
from .graders import Grading
from .llm import ChatLLM
from .loop import AgentLoop, AgentSettings, ModelOptions
from .outputs import DEFAULT_CAPS, KEEP_FILE, OutputCaps, with_outputs
from .result import ExitReason, TaskResult, phase_for
from .scoring import score_result
from .task import Limits
from .trajectory import Trajectory
from .wire import JOURNAL_FILE, OUTPUT_DIR, TRAJECTORY_FILE

# The first retry of a model call waits about this long, doubling up to a minute (a server's
# Retry-After wins when sent).
DEFAULT_RETRY_BACKOFF_SECONDS = 1.0


@dataclass(frozen=True)
class LLMEndpoint:
    base_url: str
    api_key: str
    model: str


class ModelConfig(ModelOptions, Protocol):
    """A task's model section (ModelSpec locally, PodModelConfig in a pod)."""

    @property
    def request_timeout_seconds(self) -> float: ...


@dataclass(frozen=True)
class AgentTask:
    """What a run needs of its task, wherever the task came from."""

    name: str
    prompt: str
    endpoint: LLMEndpoint
    model: ModelConfig
    limits: Limits
    # Score the result after the loop (spec.grading); the expected answer is the grader's only.
    grading: Grading | None = None

    def settings(self) -> AgentSettings:
        return AgentSettings.of(self.endpoint.model, self.model, self.limits)


# Places the task's inputs under input/ and returns their paths there, to name to the model;
# a SandboxError ends the run, with its message as the result's.
InputStep = Callable[[ExecClient], Awaitable[list[str]]]


def failed(reason: ExitReason, message: str, cause: str | None = None) -> TaskResult:
    """The result of a run that ended before (or instead of) the loop."""
    return TaskResult(phase=phase_for(reason), exit_reason=reason, message=message, cause=cause)


class RunRecord:
    """What a run leaves behind, timed from when it began: the trajectory, and the output files,
    in `directory` (None: nothing is written, outputs are only listed)."""

    def __init__(
        self,
        task: AgentTask,
        directory: Path | None,
        artifacts: ArtifactWriter | None = None,
        caps: OutputCaps = DEFAULT_CAPS,
    ) -> None:
        self.directory = directory
        self.artifacts = artifacts
        self.caps = caps
        self.started = time.monotonic()
        self.trajectory = Trajectory(
            task_name=task.name,
            model=task.endpoint.model,
            base_url=task.endpoint.base_url,
            tool_call_format=str(task.model.tool_call_format),
        )
        if directory is not None:
            self.trajectory.keep_journal(directory / JOURNAL_FILE)
        if artifacts is not None:
            self.trajectory.send_journal_to(artifacts.step)

    @property
    def output_dir(self) -> Path | None:
        return self.directory / OUTPUT_DIR if self.directory is not None else None

    def save(self, result: TaskResult | None) -> None:
        """Time the result and write the trajectory with it; also when the run ended with no
        result (an unexpected error), so that what happened up to then is kept."""
        if result is not None:
            result.duration_seconds = round(time.monotonic() - self.started, 3)
            self.trajectory.result = result
        if self.directory is not None:
            self.trajectory.write(self.directory / TRAJECTORY_FILE)
            (self.directory / JOURNAL_FILE).unlink(missing_ok=True)

    async def store(self, result: TaskResult) -> None:
        """The saved record and the output files copied to the artifact store, if there is one;
        the result then names where (and what failed). Never raises for the store."""
        if self.artifacts is not None and self.directory is not None:
            await self.artifacts.finish(self.directory, self.output_dir, result)


async def run_agent(
    task: AgentTask,
    endpoint: ExecEndpoint,
    inputs: InputStep,
    record: RunRecord,
    on_event: EventSink = ignore,
    *,
    retry_backoff_seconds: float = DEFAULT_RETRY_BACKOFF_SECONDS,
) -> TaskResult:
    """Run the task's loop against the exec server at `endpoint`, collect its outputs into the
    record's directory and score the result (task.grading). The caller saves the record once
    the sandbox is done with."""
    async with ExecClient(endpoint) as client:
        await _make_output_dir(client, on_event)
        try:
            listing = await inputs(client)
        except SandboxError as exc:
            return failed(ExitReason.SANDBOX_ERROR, str(exc))
        llm = _chat_llm(task, on_event, retry_backoff_seconds)
        try:
            loop = AgentLoop(
                llm, client, endpoint.workspace, task.settings(), on_event, record.trajectory
            )
            result = await loop.run(task.prompt, listing)
        finally:
            await llm.aclose()
        result = await with_outputs(result, client, record.output_dir, on_event, record.caps)
        if task.grading is not None:
            result = await score_result(result, task.grading, client, endpoint.workspace)
        return result


async def _make_output_dir(client: ExecClient, on_event: EventSink) -> None:
    """output/ from the start, so the model finds where its files go. Only a convenience: when
    the workspace refuses it the model finds out itself, and the inputs decide whether to go on."""
    try:
        await client.write_bytes(f"{OUTPUT_DIR}/{KEEP_FILE}", b"")
    except SandboxError as exc:
        on_event(Notice(f"{OUTPUT_DIR}/ could not be made in the workspace: {exc}"))


def _chat_llm(task: AgentTask, on_event: EventSink, retry_backoff_seconds: float) -> ChatLLM:
    return ChatLLM(
        task.endpoint.base_url,
        task.endpoint.api_key,
        task.endpoint.model,
        request_timeout=task.model.request_timeout_seconds,
        max_retries=task.limits.max_llm_retries,
        on_event=on_event,
        backoff_base=retry_backoff_seconds,
    )
