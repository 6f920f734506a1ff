"""The LLM-in-Sandbox loop: ask the model, run its tool calls in the sandbox, until it submits or a limit ends it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .bashblocks import STOP_AFTER_BLOCK, closed, hint, parse_bash_reply
from .budget import TokenBudget
from .errors import (
    ContextLengthError,
    DeadlineError,
    EndpointUnreachableError,
    ExecServerError,
    LLMError,
    SandboxError,
)
from .events import EventSink, LLMReplied, Notice, StepStarted, ToolCallFinished, ToolCallStarted
from .prompt import continue_message, system_prompt, user_message
from .protocols import Completion, CompletionModel, SandboxAPI, ToolCallRequest
from .result import ExitReason, TaskResult, Usage, phase_for
from .task import Limits, ToolCallFormat
from .textcalls import TextToolCall, parse_text_tool_calls
from .tools import (
    ANSWER_FILE,
    NO_OUTPUT,
    TOOL_NAMES,
    TOOLS,
    Observation,
    ToolRunner,
    read_answer_file,
)
from .trajectory import StepRecord, ToolCallRecord, Trajectory

CANCELLED_MESSAGE = "interrupted before the task finished"
CANCELLED_CALL = "[the run was stopped while this call ran]"
NOT_RUN = "Not run: the task was already submitted."


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


def _no_answer(ending: _Ending, answer: str | None, workspace: str) -> _Ending:
    """A submit that leaves no answer at all is no success."""
    if ending.reason is not ExitReason.SUBMITTED or answer:
        return ending
    return _Ending(
        ExitReason.NO_ANSWER,
        f"the model called submit without an answer and {workspace}/{ANSWER_FILE} is empty or missing",
    )


def _deadline_message(limits: Limits, detail: str = "") -> str:
    text = f"limits.activeDeadlineSeconds ({limits.active_deadline_seconds}s) passed"
    return f"{text}: {detail}" if detail else text


def _llm_ending(exc: LLMError, limits: Limits) -> _Ending:
    """What a failed model call means for the task."""
    if isinstance(exc, DeadlineError):
        return _Ending(ExitReason.DEADLINE, _deadline_message(limits, str(exc)))
    if isinstance(exc, EndpointUnreachableError):
        return _Ending(ExitReason.LLM_ERROR, str(exc), cause="EndpointUnreachable")
    return _Ending(ExitReason.LLM_ERROR, str(exc))


REPEATED_BLOCK = (
    "This is the same block as your previous reply, and it printed the same output again. "
    "Running it once more will not change that: read the output, then change the command."
)


def _text_call(step: int, index: int, parsed: TextToolCall) -> ToolCallRequest:
    """A call read from the reply's text; one that could not be read carries why, and no name."""
    call_id = f"text_{step}_{index}"
    if parsed.error is not None:
        return ToolCallRequest(id=call_id, name="", arguments=parsed.error)
    return ToolCallRequest(id=call_id, name=parsed.name, arguments=parsed.arguments)


def _step_record(
    step: int, reply: Completion, started: float, text_mode: bool, max_tokens: int
) -> StepRecord:
    return StepRecord(
        max_tokens=max_tokens,
        step=step,
        started_at=started,
        llm_seconds=round(reply.seconds, 3),
        llm_retries=reply.retries,
        prompt_tokens=reply.prompt_tokens,
        completion_tokens=reply.completion_tokens,
        usage_reported=reply.usage_reported,
        finish_reason=reply.finish_reason,
        content=reply.content,
        text_tool_calls=text_mode,
    )


def _call_record(call: ToolCallRequest, obs: Observation, seconds: float) -> ToolCallRecord:
    return ToolCallRecord(
        id=call.id,
        name=call.name,
        arguments=call.arguments,
        observation=obs.text,
        ok=obs.ok,
        seconds=round(seconds, 3),
    )


def _command_of(arguments: str) -> str:
    """An execute_bash call's command (its arguments as they came, when they are not JSON)."""
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(arguments).get("command", arguments))
    return arguments


def _summarize(name: str, arguments: str) -> str:
    text = _command_of(arguments) if name == "execute_bash" else arguments
    line = " ".join(text.split())
    return line[:117] + "..." if len(line) > 120 else line


class AgentLoop:
    """One task's conversation. Prints nothing: progress goes out as events, the record as a Trajectory."""

    def __init__(
        self,
        llm: CompletionModel,
        sandbox: SandboxAPI,
        workspace: str,
        settings: AgentSettings,
        on_event: EventSink,
        trajectory: Trajectory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.llm = llm
        self.sandbox = sandbox
        self.workspace = workspace
        self.settings = settings
        self.limits = settings.limits
        self.on_event = on_event
        self.trajectory = trajectory
        # What the deadline is measured on: the model's deadline is a time.monotonic() value.
        self.clock = clock
        self.tools = ToolRunner(
            sandbox,
            workspace,
            command_timeout=self.limits.command_timeout_seconds,
            max_observation_bytes=self.limits.max_observation_bytes,
        )
        fmt = settings.tool_call_format
        self.native_tools = TOOLS if fmt in (ToolCallFormat.NATIVE, ToolCallFormat.AUTO) else None
        # What every call sends besides the messages, recorded once.
        trajectory.tools = self.native_tools
        trajectory.temperature = settings.temperature
        trajectory.top_p = settings.top_p
        self.budget = TokenBudget.of(self.limits)
        self.usage = Usage()
        self.tool_counts: dict[str, int] = {}
        self.steps = 0
        # The last call's prompt + completion tokens: what the context holds.
        self.conversation_tokens = 0
        # max_tokens per call; halved whenever a call does not fit the context window.
        self.call_cap = settings.max_tokens_per_call
        self.messages: list[dict[str, Any]] = []
        self.deadline = 0.0
        # The bash format's last step: its calls and what they printed.
        self._last_exchange: tuple[list[tuple[str, str]], list[str]] | None = None
        # What the sandbox printed that the model has been shown (the bash format's submit).
        self._outputs: list[str] = []

    async def run(self, prompt: str, input_listing: list[str]) -> TaskResult:
        started = self.clock()
        self.deadline = started + self.limits.active_deadline_seconds
        self.messages = self._opening(prompt, input_listing)
        self.trajectory.messages = self.messages
        try:
            ending = await self._conversation()
        except asyncio.CancelledError:
            # Ctrl-C, SIGTERM, a deleted task: what was spent and done so far is kept.
            cancelled = _Ending(ExitReason.CANCELLED, CANCELLED_MESSAGE)
            self.trajectory.result = self._result(cancelled, None, started)
            raise
        answer = ending.answer or await self._answer_file()
        result = self._result(_no_answer(ending, answer, self.workspace), answer, started)
        self.trajectory.result = result
        return result

    def _opening(self, prompt: str, input_listing: list[str]) -> list[dict[str, Any]]:
        fmt = self.settings.tool_call_format
        text_tools = TOOLS if fmt is ToolCallFormat.HERMES else None
        system = system_prompt(
            self.workspace,
            self.limits.command_timeout_seconds,
            text_tools,
            bash_blocks=fmt is ToolCallFormat.BASH,
        )
        return [
            {"role": "system", "content": system},
            {"role": "user", "content": user_message(prompt, self.workspace, input_listing)},
        ]

    def _result(self, ending: _Ending, answer: str | None, started: float) -> TaskResult:
        return TaskResult(
            phase=phase_for(ending.reason),
            exit_reason=ending.reason,
            message=ending.message,
            cause=ending.cause,
            answer=answer,
            steps=self.steps,
            usage=self.usage,
            tool_calls=self.tool_counts,
            duration_seconds=round(self.clock() - started, 3),
        )

    async def _answer_file(self) -> str | None:
        # At the end a sandbox that has failed altogether simply has no answer to give.
        try:
            return await read_answer_file(self.sandbox)
        except SandboxError:
            return None

    async def _conversation(self) -> _Ending:
        """Steps until one ends the task, or the steps run out; a failing sandbox ends it too."""
        try:
            while self.steps < self.limits.max_steps:
                ending = await self._step()
                if ending is not None:
                    return ending
        except SandboxError as exc:
            return _Ending(ExitReason.SANDBOX_ERROR, f"the sandbox failed: {exc}")
        return _Ending(
            ExitReason.MAX_STEPS,
            f"the model used all {self.limits.max_steps} steps (limits.maxSteps) without submitting",
        )

    async def _step(self) -> _Ending | None:
        """Ask the model once and act on its reply; an _Ending stops the loop."""
        spent = self.usage.total_tokens
        max_tokens = self.budget.next_call(self.call_cap, self.conversation_tokens, spent)
        if max_tokens is None:
            return self._budget_ending()
        self.on_event(StepStarted(self.steps + 1, self.limits.max_steps, spent))
        step_started = time.time()
        reply = await self._ask(max_tokens)
        if not isinstance(reply, Completion):
            return reply  # the ending the failure means, or None: ask again with less
        self._count(reply)
        ending = await self._act(reply, step_started, max_tokens)
        return ending if ending is not None else self._limit_reached()

    async def _ask(self, max_tokens: int) -> Completion | _Ending | None:
        """The model's reply; else the ending its failure means, or None after a shrink."""
        retries_before, throttled_before = self.llm.retries, self.llm.throttled
        try:
            return await self.llm.complete(
                self.messages,
                tools=self.native_tools,
                max_tokens=max_tokens,
                temperature=self.settings.temperature,
                top_p=self.settings.top_p,
                deadline=self.deadline,
                stop=STOP_AFTER_BLOCK
                if self.settings.tool_call_format is ToolCallFormat.BASH
                else None,
            )
        except ContextLengthError as exc:
            return self._shrink(max_tokens, exc)
        except LLMError as exc:
            return _llm_ending(exc, self.limits)
        finally:
            # Retries count whether the call then succeeded or gave up (the llmRetries metric).
            self.usage.llm_retries += self.llm.retries - retries_before
            self.usage.llm_throttled += self.llm.throttled - throttled_before

    def _shrink(self, max_tokens: int, exc: ContextLengthError) -> _Ending | None:
        shrunk = self.budget.shrunk(max_tokens)
        if shrunk is None:
            return _Ending(
                ExitReason.TOKEN_BUDGET,
                f"the conversation no longer fits the model's context window ({exc})",
            )
        self.call_cap = shrunk
        self.on_event(Notice(f"context window exceeded; max tokens per call now {shrunk}"))
        return None

    def _count(self, reply: Completion) -> None:
        self.steps += 1
        self.usage.add(reply.prompt_tokens, reply.completion_tokens)
        self.usage.llm_seconds = round(self.usage.llm_seconds + reply.seconds, 3)
        self.conversation_tokens = reply.prompt_tokens + reply.completion_tokens
        self.on_event(
            LLMReplied(
                self.steps,
                reply.prompt_tokens,
                reply.completion_tokens,
                reply.seconds,
                reply.content,
            )
        )

    def _limit_reached(self) -> _Ending | None:
        """After a step: a spent budget or a passed deadline ends the task."""
        if self.budget.spent(self.conversation_tokens, self.usage.total_tokens):
            return self._budget_ending()
        if self.clock() >= self.deadline:
            return _Ending(ExitReason.DEADLINE, _deadline_message(self.limits))
        return None

    def _budget_ending(self) -> _Ending:
        return _Ending(ExitReason.TOKEN_BUDGET, self.budget.spent_message(self.usage.total_tokens))

    async def _act(self, reply: Completion, step_started: float, max_tokens: int) -> _Ending | None:
        """Record the reply, run its tool calls, append their results; an _Ending stops the loop."""
        calls, text_mode, correction = self._tool_calls(reply)
        message = reply.raw_message
        if self.settings.tool_call_format is ToolCallFormat.BASH and message.get("content"):
            message = {**message, "content": closed(str(message["content"]))}
        self.messages.append(message)
        record = _step_record(self.steps, reply, step_started, text_mode, max_tokens)
        self.trajectory.steps.append(record)
        if calls:
            ending = await self._run_calls(calls, record, text_mode)
        else:
            self.messages.append({"role": "user", "content": correction})
            ending = None
        self.trajectory.step_done(record)
        return ending

    def _shown_before(self, answer: str) -> bool:
        """Whether `answer` stood alone (not inside a longer word or number) in an output the
        model has already been shown."""
        if not answer or len(answer) > 1000:
            return False
        alone = re.compile(rf"(?<![\w.]){re.escape(answer)}(?![\w]|\.\w)")
        return any(alone.search(text) for text in self._outputs)

    def _last_line(self) -> str | None:
        """What the previous block printed, when it was one command that succeeded and printed
        one short line (a bare submit hands it in)."""
        if self._last_exchange is None:
            return None
        calls, responses = self._last_exchange
        if len(calls) != 1 or calls[0][0] != "execute_bash" or len(responses) != 1:
            return None
        head, _, line = responses[0].partition("\n")
        line = line.strip()
        if head != "[exit code 0]" or not line or "\n" in line or len(line) > 200:
            return None
        return None if line == NO_OUTPUT else line

    def _tool_calls(self, reply: Completion) -> tuple[list[ToolCallRequest], bool, str]:
        """The reply's tool calls, whether they were read from its text, and what the model is
        told when there are none."""
        fmt = self.settings.tool_call_format
        if fmt is ToolCallFormat.BASH:
            blocks = parse_bash_reply(
                reply.content, self.workspace, self._shown_before, self._last_line()
            )
            calls = [_text_call(self.steps, i, p) for i, p in enumerate(blocks.calls)]
            return calls, True, blocks.correction or ""
        nudge = continue_message(self.workspace)
        if reply.tool_calls or fmt is ToolCallFormat.NATIVE or not reply.content:
            return reply.tool_calls, False, nudge
        parsed = parse_text_tool_calls(reply.content, frozenset(TOOL_NAMES))
        calls = [_text_call(self.steps, i, p) for i, p in enumerate(parsed)]
        return calls, bool(calls), nudge

    async def _run_calls(
        self, calls: list[ToolCallRequest], record: StepRecord, text_mode: bool
    ) -> _Ending | None:
        """Each call's observation back to the model; calls after a submit are not run."""
        ending: _Ending | None = None
        responses: list[str] = []
        hints: list[str] = []
        for call in calls:
            obs = await self._observe(call, record, text_mode, submitted=ending is not None)
            if self.settings.tool_call_format is ToolCallFormat.BASH:
                responses.append(obs.text)
                if call.name == "execute_bash" and (
                    line := hint(_command_of(call.arguments), obs.text)
                ):
                    hints.append(line)
            elif text_mode:
                responses.append(f"<tool_response>\n{obs.text}\n</tool_response>")
            else:
                self.messages.append({"role": "tool", "tool_call_id": call.id, "content": obs.text})
            if obs.submitted:
                ending = _Ending(ExitReason.SUBMITTED, answer=(obs.answer or "").strip() or None)
        if self.settings.tool_call_format is ToolCallFormat.BASH:
            self._outputs.extend(responses)
            # A small model at temperature 0 resends a failing block for ever unless told.
            exchange = ([(c.name, c.arguments) for c in calls], list(responses))
            self._last_exchange, repeated = exchange, exchange == self._last_exchange
            responses += hints
            if ending is None and repeated:
                responses.append(REPEATED_BLOCK)
        if text_mode:
            self.messages.append({"role": "user", "content": "\n".join(responses)})
        return ending

    async def _observe(
        self, call: ToolCallRequest, record: StepRecord, text_mode: bool, submitted: bool
    ) -> Observation:
        """Run one call (or say why not) and record it with its time."""
        started = self.clock()
        if submitted:
            obs = Observation(NOT_RUN, ok=False)
        elif text_mode and not call.name:
            obs = Observation(f"Error: {call.arguments}", ok=False)
        else:
            try:
                obs = await self._run_tool(call)
            except asyncio.CancelledError:
                # The call in flight when the run was stopped stays in the record.
                stopped = Observation(CANCELLED_CALL, ok=False)
                record.tool_calls.append(_call_record(call, stopped, self.clock() - started))
                raise
        record.tool_calls.append(_call_record(call, obs, self.clock() - started))
        return obs

    async def _run_tool(self, call: ToolCallRequest) -> Observation:
        name = call.name or "(missing name)"
        self.tool_counts[name] = self.tool_counts.get(name, 0) + 1
        summary = _summarize(call.name, call.arguments)
        self.on_event(ToolCallStarted(self.steps, name, summary))
        started = self.clock()
        try:
            obs = await self.tools.run(call.name, call.arguments, self.deadline - started)
        except ExecServerError as exc:
            raise SandboxError(f"exec server error during {name}: {exc}") from exc
        seconds = self.clock() - started
        self.on_event(ToolCallFinished(self.steps, name, obs.ok, seconds, obs.summary or summary))
        return obs
