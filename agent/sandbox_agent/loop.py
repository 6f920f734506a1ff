"""The LLM-in-Sandbox loop: ask the model, run its tool calls in the sandbox, until it submits or a limit ends it."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import ExecServerError, LLMError, SandboxError
from .events import EventSink, LLMReplied, Notice, StepStarted, ToolCallFinished, ToolCallStarted
from .execclient import ExecClient
from .llm import (
    ChatLLM,
    Completion,
    ContextLengthError,
    DeadlineError,
    EndpointUnreachableError,
    ToolCallRequest,
)
from .prompt import continue_message, system_prompt, user_message
from .result import ExitReason, TaskResult, Usage, phase_for
from .task import Limits, ToolCallFormat
from .textcalls import parse_text_tool_calls
from .tools import TOOLS, Observation, ToolRunner, cap_text
from .trajectory import StepRecord, ToolCallRecord, Trajectory

# Below this many completion tokens a call cannot do useful work; the budget is spent.
_MIN_CALL_TOKENS = 64
ANSWER_FILE = "output/answer.txt"
MAX_ANSWER_BYTES = 1024 * 1024


class ModelOptions(Protocol):
    """The sampling options a task's model section carries (ModelSpec, PodModelConfig)."""

    @property
    def tool_call_format(self) -> ToolCallFormat: ...
    @property
    def max_tokens_per_call(self) -> int: ...
    @property
    def temperature(self) -> float | None: ...
    @property
    def top_p(self) -> float | None: ...


@dataclass(frozen=True)
class AgentSettings:
    model: str
    tool_call_format: ToolCallFormat
    max_tokens_per_call: int
    temperature: float | None
    top_p: float | None
    limits: Limits

    @classmethod
    def of(cls, model: str, options: ModelOptions, limits: Limits) -> AgentSettings:
        return cls(
            model=model,
            tool_call_format=options.tool_call_format,
            max_tokens_per_call=options.max_tokens_per_call,
            temperature=options.temperature,
            top_p=options.top_p,
            limits=limits,
        )


@dataclass
class _Ending:
    reason: ExitReason
    message: str = ""
    answer: str | None = None
    cause: str | None = None


def _summarize(name: str, arguments: str) -> str:
    text = arguments
    if name == "execute_bash":
        with contextlib.suppress(ValueError, AttributeError):
            text = str(json.loads(arguments).get("command", arguments))
    line = " ".join(text.split())
    return line[:117] + "..." if len(line) > 120 else line


class AgentLoop:
    """One task's conversation. Prints nothing: progress goes out as events, the record as a Trajectory."""

    def __init__(
        self,
        llm: ChatLLM,
        client: ExecClient,
        workspace: str,
        settings: AgentSettings,
        on_event: EventSink,
        trajectory: Trajectory,
    ) -> None:
        self.llm = llm
        self.client = client
        self.workspace = workspace
        self.settings = settings
        self.limits = settings.limits
        self.on_event = on_event
        self.trajectory = trajectory
        self.tools = ToolRunner(
            client,
            workspace,
            command_timeout=self.limits.command_timeout_seconds,
            max_observation_bytes=self.limits.max_observation_bytes,
        )
        self.usage = Usage()
        self.tool_counts: dict[str, int] = {}
        self.steps = 0

    async def run(self, prompt: str, input_listing: list[str]) -> TaskResult:
        started = time.monotonic()
        deadline = started + self.limits.active_deadline_seconds
        fmt = self.settings.tool_call_format
        text_tools = TOOLS if fmt is ToolCallFormat.HERMES else None
        messages: list[dict[str, Any]] = [
            {
                "role": "system",
                "content": system_prompt(
                    self.workspace, self.limits.command_timeout_seconds, text_tools
                ),
            },
            {"role": "user", "content": user_message(prompt, self.workspace, input_listing)},
        ]
        self.trajectory.messages = messages
        try:
            ending = await self._converse(messages, deadline)
        except SandboxError as exc:
            ending = _Ending(ExitReason.SANDBOX_ERROR, f"the sandbox failed: {exc}")
        answer = ending.answer
        if not answer:
            answer = await self._answer_file()
        if ending.reason is ExitReason.SUBMITTED and not answer:
            ending = _Ending(
                ExitReason.NO_ANSWER,
                f"the model called submit without an answer and {self.workspace}/{ANSWER_FILE} "
                "does not exist",
            )
        result = TaskResult(
            phase=phase_for(ending.reason),
            exit_reason=ending.reason,
            message=ending.message,
            cause=ending.cause,
            answer=answer,
            steps=self.steps,
            usage=self.usage,
            tool_calls=self.tool_counts,
            duration_seconds=round(time.monotonic() - started, 3),
        )
        self.trajectory.result = result
        return result

    async def _answer_file(self) -> str | None:
        try:
            content = await self.client.read_text(ANSWER_FILE, max_bytes=MAX_ANSWER_BYTES)
        except SandboxError:
            return None
        return content.content.strip() or None

    async def _converse(self, messages: list[dict[str, Any]], deadline: float) -> _Ending:
        limits = self.limits
        fmt = self.settings.tool_call_format
        native_tools = TOOLS if fmt in (ToolCallFormat.NATIVE, ToolCallFormat.AUTO) else None
        call_max_tokens = self.settings.max_tokens_per_call
        conversation_tokens = 0
        while self.steps < limits.max_steps:
            budget_left = limits.max_tokens - conversation_tokens
            if limits.max_total_tokens is not None:
                budget_left = min(budget_left, limits.max_total_tokens - self.usage.total_tokens)
            max_tokens = min(call_max_tokens, budget_left)
            if max_tokens < _MIN_CALL_TOKENS:
                return self._budget_ending()
            self.on_event(StepStarted(self.steps + 1, limits.max_steps, self.usage.total_tokens))
            step_started = time.time()
            retries_before = self.llm.retries
            try:
                reply = await self.llm.complete(
                    messages,
                    tools=native_tools,
                    max_tokens=max_tokens,
                    temperature=self.settings.temperature,
                    top_p=self.settings.top_p,
                    deadline=deadline,
                )
            except ContextLengthError as exc:
                call_max_tokens = max_tokens // 2
                if call_max_tokens < _MIN_CALL_TOKENS:
                    return _Ending(
                        ExitReason.TOKEN_BUDGET,
                        f"the conversation no longer fits the model's context window ({exc})",
                    )
                self.on_event(
                    Notice(f"context window exceeded; max tokens per call now {call_max_tokens}")
                )
                continue
            except DeadlineError as exc:
                return _Ending(ExitReason.DEADLINE, self._deadline_message(str(exc)))
            except EndpointUnreachableError as exc:
                return _Ending(ExitReason.LLM_ERROR, str(exc), cause="EndpointUnreachable")
            except LLMError as exc:
                return _Ending(ExitReason.LLM_ERROR, str(exc))
            finally:
                # Retries count whether the call then succeeded or gave up (the llmRetries metric).
                self.usage.llm_retries += self.llm.retries - retries_before
            self.steps += 1
            self.usage.add(reply.prompt_tokens, reply.completion_tokens)
            conversation_tokens = reply.prompt_tokens + reply.completion_tokens
            self.on_event(
                LLMReplied(
                    self.steps,
                    reply.prompt_tokens,
                    reply.completion_tokens,
                    reply.seconds,
                    reply.content,
                )
            )
            ending = await self._act(messages, reply, step_started, deadline)
            if ending is not None:
                return ending
            if conversation_tokens >= limits.max_tokens or (
                limits.max_total_tokens is not None
                and self.usage.total_tokens >= limits.max_total_tokens
            ):
                return self._budget_ending()
            if time.monotonic() >= deadline:
                return _Ending(ExitReason.DEADLINE, self._deadline_message())
        return _Ending(
            ExitReason.MAX_STEPS,
            f"the model used all {limits.max_steps} steps (limits.maxSteps) without submitting",
        )

    def _budget_ending(self) -> _Ending:
        limits = self.limits
        if (
            limits.max_total_tokens is not None
            and self.usage.total_tokens >= limits.max_total_tokens - _MIN_CALL_TOKENS
        ):
            return _Ending(
                ExitReason.TOKEN_BUDGET,
                f"{self.usage.total_tokens} tokens spent of limits.maxTotalTokens "
                f"({limits.max_total_tokens})",
            )
        return _Ending(
            ExitReason.TOKEN_BUDGET,
            f"the conversation reached limits.maxTokens ({limits.max_tokens} tokens)",
        )

    def _deadline_message(self, detail: str = "") -> str:
        text = f"limits.activeDeadlineSeconds ({self.limits.active_deadline_seconds}s) passed"
        return f"{text}: {detail}" if detail else text

    async def _act(
        self,
        messages: list[dict[str, Any]],
        reply: Completion,
        step_started: float,
        deadline: float,
    ) -> _Ending | None:
        """Record the reply, run its tool calls, append their results; an _Ending stops the loop."""
        fmt = self.settings.tool_call_format
        calls = reply.tool_calls
        text_mode = False
        if not calls and fmt is not ToolCallFormat.NATIVE and reply.content:
            parsed = parse_text_tool_calls(reply.content)
            calls = [
                ToolCallRequest(id=f"text_{self.steps}_{i}", name=p.name, arguments=p.arguments)
                if p.error is None
                else ToolCallRequest(id=f"text_{self.steps}_{i}", name="", arguments=p.error)
                for i, p in enumerate(parsed)
            ]
            text_mode = bool(calls)
        messages.append(reply.raw_message)
        record = StepRecord(
            step=self.steps,
            started_at=step_started,
            llm_seconds=round(reply.seconds, 3),
            llm_retries=reply.retries,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            usage_reported=reply.usage_reported,
            finish_reason=reply.finish_reason,
            content=reply.content,
            text_tool_calls=text_mode,
        )
        self.trajectory.steps.append(record)
        if not calls:
            messages.append({"role": "user", "content": continue_message(self.workspace)})
            return None
        responses: list[str] = []
        ending: _Ending | None = None
        for call in calls:
            tool_started = time.monotonic()
            if ending is not None:
                obs = Observation("Not run: the task was already submitted.", ok=False)
            elif text_mode and not call.name:
                obs = Observation(f"Error: {call.arguments}", ok=False)
            else:
                obs = await self._run_tool(call, deadline)
            seconds = time.monotonic() - tool_started
            record.tool_calls.append(
                ToolCallRecord(
                    id=call.id,
                    name=call.name,
                    arguments=call.arguments,
                    observation=obs.text,
                    ok=obs.ok,
                    seconds=round(seconds, 3),
                )
            )
            if text_mode:
                responses.append(f"<tool_response>\n{obs.text}\n</tool_response>")
            else:
                messages.append({"role": "tool", "tool_call_id": call.id, "content": obs.text})
            if obs.submitted and ending is None:
                ending = _Ending(ExitReason.SUBMITTED, answer=(obs.answer or "").strip() or None)
        if text_mode:
            messages.append({"role": "user", "content": "\n".join(responses)})
        return ending

    async def _run_tool(self, call: ToolCallRequest, deadline: float) -> Observation:
        name = call.name or "(missing name)"
        self.tool_counts[name] = self.tool_counts.get(name, 0) + 1
        summary = _summarize(call.name, call.arguments)
        self.on_event(ToolCallStarted(self.steps, name, summary))
        started = time.monotonic()
        time_left = deadline - started
        try:
            obs = await self.tools.run(call.name, call.arguments, time_left)
        except ExecServerError as exc:
            raise SandboxError(f"exec server error during {name}: {exc}") from exc
        self.on_event(
            ToolCallFinished(
                self.steps, name, obs.ok, time.monotonic() - started, obs.summary or summary
            )
        )
        return Observation(
            cap_text(obs.text, self.limits.max_observation_bytes),
            obs.ok,
            obs.submitted,
            obs.answer,
            obs.summary,
        )
