"""The agent loop in memory: a scripted model, a sandbox in a dict and a clock that moves only when
told to. Every way a task ends, and what the model is shown, in milliseconds."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from inmemory import (
    WORKSPACE,
    FakeClock,
    InMemorySandbox,
    ScriptedModel,
    Turn,
    reply,
    shell,
    tool_call,
)
from sandbox_agent.errors import (
    ContextLengthError,
    DeadlineError,
    EndpointUnreachableError,
    ExecServerError,
    LLMError,
    SandboxError,
)
from sandbox_agent.events import Event, Notice
from sandbox_agent.execclient import ExecResult
from sandbox_agent.execd import CappedBuffer
from sandbox_agent.loop import NOT_RUN, AgentLoop, AgentSettings
from sandbox_agent.protocols import Completion
from sandbox_agent.result import ExitReason, Phase, TaskResult
from sandbox_agent.task import Limits, ToolCallFormat
from sandbox_agent.tools import TOOL_NAMES, TOOLS
from sandbox_agent.trajectory import Trajectory


@dataclass
class Run:
    result: TaskResult
    model: ScriptedModel
    sandbox: InMemorySandbox
    trajectory: Trajectory
    events: list[Event]

    def asked_max_tokens(self) -> list[int]:
        return [r.max_tokens for r in self.model.requests]


def run_loop(
    model: ScriptedModel,
    sandbox: InMemorySandbox | None = None,
    *,
    trajectory: Trajectory | None = None,
    fmt: ToolCallFormat = ToolCallFormat.NATIVE,
    max_tokens_per_call: int = 8192,
    **limits: Any,
) -> Run:
    """One loop over the doubles, on the model's clock; `limits` as a task file spells them."""
    sandbox = sandbox or InMemorySandbox()
    settings = AgentSettings(
        model="scripted",
        tool_call_format=fmt,
        max_tokens_per_call=max_tokens_per_call,
        temperature=None,
        top_p=None,
        limits=Limits.model_validate({"maxSteps": 10, **limits}),
    )
    events: list[Event] = []
    trajectory = trajectory or Trajectory()
    loop = AgentLoop(
        model, sandbox, WORKSPACE, settings, events.append, trajectory, clock=model.clock
    )
    result = asyncio.run(loop.run("Solve it.", []))
    return Run(result, model, sandbox, trajectory, events)


BASH = tool_call("execute_bash", {"command": "true"})


@dataclass(frozen=True)
class Ending:
    """A script, the limits it runs under, and how the task must end."""

    script: list[Turn | Completion | LLMError]
    limits: dict[str, Any]
    reason: ExitReason
    message: str
    steps: int
    default: Turn | Completion | LLMError | None = None
    files: dict[str, str] | None = None
    commands: dict[str, ExecResult | Exception] | None = None
    cause: str | None = None


ENDINGS = {
    "submit": Ending(
        [tool_call("submit", {"answer": " 42 "})], {}, ExitReason.SUBMITTED, "", steps=1
    ),
    "submit-falls-back-to-the-answer-file": Ending(
        [tool_call("submit", {})],
        {},
        ExitReason.SUBMITTED,
        "",
        steps=1,
        files={"output/answer.txt": "7\n"},
    ),
    "submit-without-any-answer": Ending(
        [tool_call("submit", {})],
        {},
        ExitReason.NO_ANSWER,
        "the model called submit without an answer and /workspace/output/answer.txt is empty or missing",
        steps=1,
    ),
    "max-steps": Ending(
        [],
        {"maxSteps": 3},
        ExitReason.MAX_STEPS,
        "the model used all 3 steps (limits.maxSteps) without submitting",
        steps=3,
        default=BASH,
    ),
    "conversation-budget": Ending(
        [],
        {"maxTokens": 1000},
        ExitReason.TOKEN_BUDGET,
        "the conversation reached limits.maxTokens (1000 tokens)",
        steps=1,
        default=tool_call("execute_bash", {"command": "true"}, usage=(700, 400)),
    ),
    # 400 spent, then 800 (the second call may ask for the 600 left), then 1200.
    "spend-cap": Ending(
        [],
        {"maxTotalTokens": 1000},
        ExitReason.TOKEN_BUDGET,
        "1200 tokens spent of limits.maxTotalTokens (1000)",
        steps=3,
        default=tool_call("execute_bash", {"command": "true"}, usage=(300, 100)),
    ),
    # 1024, 512, 256, 128, 64: half of that is too little for a call.
    "context-window-never-fits": Ending(
        [],
        {},
        ExitReason.TOKEN_BUDGET,
        "the conversation no longer fits the model's context window (too long)",
        steps=0,
        default=ContextLengthError("too long"),
    ),
    "deadline-while-waiting-for-the-model": Ending(
        [DeadlineError("the task deadline passed while waiting for the model")],
        {"activeDeadlineSeconds": 30},
        ExitReason.DEADLINE,
        "limits.activeDeadlineSeconds (30s) passed: "
        "the task deadline passed while waiting for the model",
        steps=0,
    ),
    "deadline-passed-during-a-step": Ending(
        [Turn(BASH, seconds=31)],
        {"activeDeadlineSeconds": 30},
        ExitReason.DEADLINE,
        "limits.activeDeadlineSeconds (30s) passed",
        steps=1,
    ),
    "llm-error": Ending(
        [LLMError("HTTP 400 from the endpoint: bad request")],
        {},
        ExitReason.LLM_ERROR,
        "HTTP 400 from the endpoint: bad request",
        steps=0,
    ),
    "endpoint-unreachable": Ending(
        [EndpointUnreachableError("giving up after 3 attempts: cannot reach it")],
        {},
        ExitReason.LLM_ERROR,
        "giving up after 3 attempts: cannot reach it",
        steps=0,
        cause="EndpointUnreachable",
    ),
    "exec-server-error": Ending(
        [BASH],
        {},
        ExitReason.SANDBOX_ERROR,
        "the sandbox failed: exec server error during execute_bash: internal: boom",
        steps=1,
        commands={"true": ExecServerError("internal", "boom", 500)},
    ),
    "sandbox-gone": Ending(
        [BASH],
        {},
        ExitReason.SANDBOX_ERROR,
        "the sandbox failed: exec server unreachable for /exec",
        steps=1,
        commands={"true": SandboxError("exec server unreachable for /exec")},
    ),
}


@pytest.mark.parametrize("case", ENDINGS.values(), ids=ENDINGS.keys())
def test_how_a_task_ends(case: Ending) -> None:
    model = ScriptedModel(*case.script, default=case.default)
    sandbox = InMemorySandbox(files=dict(case.files or {}), commands=dict(case.commands or {}))
    run = run_loop(model, sandbox, max_tokens_per_call=1024, **case.limits)
    result = run.result
    assert (result.exit_reason, result.message, result.steps) == (
        case.reason,
        case.message,
        case.steps,
    )
    assert result.cause == case.cause
    assert result.phase is (
        Phase.SUCCEEDED if case.reason is ExitReason.SUBMITTED else Phase.FAILED
    )
    assert run.trajectory.result == result


def test_the_answer_is_the_submitted_one_stripped_else_the_answer_files() -> None:
    submitted = run_loop(ScriptedModel(tool_call("submit", {"answer": " 42 "})))
    from_file = run_loop(
        ScriptedModel(tool_call("submit", {})), InMemorySandbox(files={"output/answer.txt": "7\n"})
    )
    assert (submitted.result.answer, from_file.result.answer) == ("42", "7")


def test_each_call_asks_for_no_more_tokens_than_either_budget_has_left() -> None:
    model = ScriptedModel(
        tool_call("execute_bash", {"command": "true"}, usage=(500, 100)),
        tool_call("submit", {"answer": "ok"}, usage=(650, 10)),
    )
    run = run_loop(model, max_tokens_per_call=4096, maxTokens=2000)
    assert run.asked_max_tokens() == [2000, 1400]
    # The trajectory records what each call was sent.
    assert [s.max_tokens for s in run.trajectory.steps] == [2000, 1400]
    spend = run_loop(
        ScriptedModel(default=tool_call("execute_bash", {"command": "true"}, usage=(300, 100))),
        max_tokens_per_call=4096,
        maxTotalTokens=1000,
    )
    assert spend.asked_max_tokens() == [1000, 600, 200]


def test_the_trajectory_records_the_tools_and_sampling_sent_once_per_run() -> None:
    model = ScriptedModel(tool_call("submit", {"answer": "ok"}))
    run = run_loop(model)
    assert run.trajectory.tools == TOOLS
    assert [t["function"]["name"] for t in run.trajectory.tools or []] == list(TOOL_NAMES)
    assert (run.trajectory.temperature, run.trajectory.top_p) == (None, None)
    assert run.trajectory.format_version == 2
    submit_in_text = reply(
        '<tool_call>{"name": "submit", "arguments": {"answer": "ok"}}</tool_call>'
    )
    text = run_loop(ScriptedModel(submit_in_text), fmt=ToolCallFormat.HERMES)
    assert text.result.answer == "ok"
    assert text.trajectory.tools is None  # described in the system prompt instead


def test_each_finished_step_is_journaled_and_the_journal_reads_back_as_the_record(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "trajectory.jsonl"
    trajectory = Trajectory(task_name="t", model="scripted")
    trajectory.keep_journal(journal)
    model = ScriptedModel(BASH, reply("thinking"), BASH, tool_call("submit", {"answer": "ok"}))
    run = run_loop(model, trajectory=trajectory)
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [line["record"] for line in lines] == ["run", "step", "step", "step", "step"]
    assert [line["step"]["step"] for line in lines[1:]] == [1, 2, 3, 4]
    back = Trajectory.from_journal(journal)
    assert back.task_name == "t"
    assert back.tools == TOOLS
    assert back.steps == run.trajectory.steps
    assert back.messages == run.trajectory.messages
    assert back.result is None  # the journal holds steps; the result is trajectory.json's


def test_a_journal_cut_by_a_kill_keeps_every_whole_line_and_bad_lines_are_named(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "trajectory.jsonl"
    trajectory = Trajectory()
    trajectory.keep_journal(journal)
    run_loop(
        ScriptedModel(BASH, BASH, tool_call("submit", {"answer": "ok"})), trajectory=trajectory
    )
    whole = journal.read_text()
    journal.write_text(whole + '{"record": "step", "step": {"st')
    assert len(Trajectory.from_journal(journal).steps) == 3
    first, *rest = whole.splitlines(keepends=True)
    journal.write_text(first + "not json\n" + "".join(rest))
    with pytest.raises(ValueError, match=r"trajectory.jsonl: line 2 is not a journal record"):
        Trajectory.from_journal(journal)


def test_a_journal_that_cannot_be_written_does_not_end_the_run(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    trajectory = Trajectory()
    trajectory.keep_journal(tmp_path / "file" / "trajectory.jsonl")  # under a file: ENOTDIR
    run = run_loop(
        ScriptedModel(BASH, tool_call("submit", {"answer": "ok"})), trajectory=trajectory
    )
    assert run.result.answer == "ok"
    assert len(run.trajectory.steps) == 2


def test_a_context_length_error_halves_max_tokens_and_asks_again() -> None:
    model = ScriptedModel(ContextLengthError("too long"), tool_call("submit", {"answer": "fits"}))
    run = run_loop(model, max_tokens_per_call=4096)
    assert run.result.answer == "fits"
    assert run.asked_max_tokens() == [4096, 2048]
    assert Notice("context window exceeded; max tokens per call now 2048") in run.events
    # The failed call is not a step.
    assert run.result.steps == 1


def test_repeated_context_length_errors_halve_until_no_useful_call_fits() -> None:
    run = run_loop(ScriptedModel(default=ContextLengthError("too long")), max_tokens_per_call=1024)
    assert run.asked_max_tokens() == [1024, 512, 256, 128, 64]


def test_retries_count_whether_the_call_then_succeeded_or_gave_up() -> None:
    model = ScriptedModel(
        Turn(BASH, retries=2), Turn(LLMError("giving up after 4 attempts"), retries=3)
    )
    run = run_loop(model)
    assert run.result.usage.llm_retries == 5
    assert run.result.usage.llm_calls == 1


def test_the_model_gets_the_deadline_and_tools_get_what_is_left_of_it() -> None:
    model = ScriptedModel(
        Turn(tool_call("execute_bash", {"command": "sleep 1"}), seconds=10),
        tool_call("submit", {"answer": "ok"}),
        clock=FakeClock(500.0),
    )
    run = run_loop(model, activeDeadlineSeconds=60, commandTimeoutSeconds=120)
    assert [r.deadline for r in run.model.requests] == [560.0, 560.0]
    # The model took 10 of the 60 seconds: the command gets the 50 left, not its 120.
    assert run.sandbox.timeouts == [50.0]
    assert run.result.exit_reason is ExitReason.SUBMITTED


def test_a_reply_without_a_tool_call_gets_a_continue_message() -> None:
    model = ScriptedModel(reply("I think the answer is 5."), tool_call("submit", {"answer": "5"}))
    run = run_loop(model)
    nudge = run.model.requests[1].messages[-1]
    assert nudge["role"] == "user"
    assert "no tool call" in nudge["content"]


@pytest.mark.parametrize(
    ("fmt", "native_tools", "text_tools_in_prompt"),
    [
        (ToolCallFormat.HERMES, False, True),
        (ToolCallFormat.AUTO, True, False),
    ],
)
def test_text_tool_calls_are_run_and_answered_in_text(
    fmt: ToolCallFormat, native_tools: bool, text_tools_in_prompt: bool
) -> None:
    sandbox = InMemorySandbox(commands={"echo $((6 * 7))": shell("42\n")})
    model = ScriptedModel(
        reply(
            'Let me compute.\n<tool_call>{"name": "execute_bash", '
            '"arguments": {"command": "echo $((6 * 7))"}}</tool_call>'
        ),
        reply('<tool_call>{"name": "submit", "arguments": {"answer": "42"}}</tool_call>'),
    )
    run = run_loop(model, sandbox, fmt=fmt)
    assert run.result.answer == "42"
    first = run.model.requests[0]
    assert (first.tools is not None) is native_tools
    assert ("<tools>" in first.messages[0]["content"]) is text_tools_in_prompt
    response = run.model.requests[1].messages[-1]
    assert response == {
        "role": "user",
        "content": "<tool_response>\n[exit code 0]\n42\n</tool_response>",
    }
    assert run.trajectory.steps[0].text_tool_calls


def test_auto_runs_a_call_a_small_model_wrote_as_bare_json() -> None:
    # What Qwen2.5-Coder-0.5B writes when the server parses no tool calls (a brace short).
    sandbox = InMemorySandbox(commands={"echo $((6 * 7))": shell("42\n")})
    model = ScriptedModel(
        reply('{"name": "execute_bash", "arguments": {"command": "echo $((6 * 7))"}'),
        reply('```json\n{"name": "submit", "arguments": {"answer": "42"}}\n```'),
    )
    run = run_loop(model, sandbox, fmt=ToolCallFormat.AUTO)
    assert run.result.answer == "42"
    assert run.trajectory.steps[0].text_tool_calls
    assert "[exit code 0]\n42" in str(run.model.requests[1].messages[-1]["content"])


def test_native_mode_takes_no_tool_call_from_the_text() -> None:
    model = ScriptedModel(
        reply('<tool_call>{"name": "submit", "arguments": {"answer": "1"}}</tool_call>'),
        tool_call("submit", {"answer": "2"}),
    )
    run = run_loop(model, fmt=ToolCallFormat.NATIVE)
    assert run.result.answer == "2"
    assert "no tool call" in run.model.last_seen(1)


@pytest.mark.parametrize(
    ("script", "seen"),
    [
        pytest.param(
            tool_call("launch_rockets", {}),
            "Error: unknown tool 'launch_rockets'; the tools are "
            "execute_bash, str_replace_editor, submit",
            id="unknown-tool",
        ),
        pytest.param(
            tool_call("execute_bash", '{"command": "echo'),
            "Error: the arguments are not valid JSON",
            id="arguments-not-json",
        ),
        pytest.param(
            tool_call("execute_bash", {}),
            "Error: missing required argument 'command'",
            id="missing-argument",
        ),
        pytest.param(
            reply("<tool_call>{not json}</tool_call>"),
            "<tool_response>\nError: the tool call is not valid JSON",
            id="unreadable-text-call",
        ),
    ],
)
def test_a_bad_tool_call_is_an_error_the_model_sees_and_the_task_goes_on(
    script: Any, seen: str
) -> None:
    run = run_loop(
        ScriptedModel(script, tool_call("submit", {"answer": "ok"})), fmt=ToolCallFormat.AUTO
    )
    assert run.model.last_seen(1).startswith(seen)
    assert run.result.exit_reason is ExitReason.SUBMITTED


def test_calls_after_submit_in_the_same_reply_are_not_run() -> None:
    model = ScriptedModel(
        reply(calls=[("submit", {"answer": "first"}), ("execute_bash", {"command": "touch x"})])
    )
    run = run_loop(model)
    assert run.result.answer == "first"
    assert run.sandbox.ran == []
    recorded = run.trajectory.steps[0].tool_calls
    assert [(c.name, c.observation, c.ok) for c in recorded] == [
        ("submit", "Submitted.", True),
        ("execute_bash", NOT_RUN, False),
    ]
    assert run.result.tool_calls == {"submit": 1}


def test_an_observation_over_the_cap_is_cut_once_and_says_how_much_was_left_out() -> None:
    out = "".join(f"line {i}\n" for i in range(2000)) + "END"
    sandbox = InMemorySandbox(commands={"cat big": shell(out)})
    model = ScriptedModel(tool_call("execute_bash", {"command": "cat big"}))
    run = run_loop(model, sandbox, maxObservationBytes=1024)
    seen = run.model.last_seen(1)
    full = f"[exit code 0]\n{out}"
    match = re.search(r"\n\[\.\.\. (\d+) bytes omitted \.\.\.\]\n", seen)
    assert match is not None
    head, tail = seen[: match.start()], seen[match.end() :]
    assert full.startswith(head)
    assert full.endswith(tail)
    assert int(match.group(1)) == len(full.encode()) - len(head.encode()) - len(tail.encode())
    assert len(seen.encode()) <= 1024
    assert seen.endswith("END")
    assert run.trajectory.steps[0].tool_calls[0].observation == seen


def as_the_exec_server_returns(stdout: bytes, limit: int) -> ExecResult:
    """The reply for a command that printed `stdout`, cut by the exec server's own buffer."""
    buffer = CappedBuffer(limit)
    buffer.add(stdout)
    text, cut = buffer.render()
    return ExecResult(exit_code=0, stdout=text, stderr="", stdout_truncated_bytes=cut)


@pytest.mark.parametrize("limit", [1024, 16384])
def test_output_cut_by_the_exec_server_and_again_here_carries_one_true_count(limit: int) -> None:
    # `seq 0 49999 | sed 's/.*\(.\)$/\1/'` (no line twice in a row, or the run would be
    # collapsed): the exec server keeps `limit` bytes and marks the rest; the observation must
    # fit too, and its one marker must count everything left out.
    printed = "".join(f"{i % 10}\n" for i in range(50_000)).encode()
    sandbox = InMemorySandbox(commands={"digits": as_the_exec_server_returns(printed, limit)})
    model = ScriptedModel(tool_call("execute_bash", {"command": "digits"}))
    run = run_loop(model, sandbox, maxObservationBytes=limit)
    seen = run.model.last_seen(1)
    markers = re.findall(r"\n\[\.\.\. (\d+) bytes omitted \.\.\.\]\n", seen)
    assert len(markers) == 1
    header = "[exit code 0]\n"
    assert seen.startswith(header)
    shown = seen.removeprefix(header).replace(f"\n[... {markers[0]} bytes omitted ...]\n", "")
    assert set(shown) <= set("0123456789\n")
    assert int(markers[0]) + len(shown.encode()) == len(printed.rstrip(b"\n"))
    assert len(seen.encode()) <= limit


def test_stdout_and_stderr_share_the_room_and_each_says_what_it_lost() -> None:
    out, err = "o" * 5000, "e" * 300
    sandbox = InMemorySandbox(commands={"both": ExecResult(exit_code=1, stdout=out, stderr=err)})
    model = ScriptedModel(tool_call("execute_bash", {"command": "both"}))
    seen = run_loop(model, sandbox, maxObservationBytes=2048).model.last_seen(1)
    assert len(seen.encode()) <= 2048
    assert "[stderr]\n" + err in seen  # the small stream is kept whole
    [cut] = re.findall(r"\n\[\.\.\. (\d+) bytes omitted \.\.\.\]\n", seen)
    shown = seen.split("\n[stderr]\n")[0].removeprefix("[exit code 1]\n")
    shown = shown.replace(f"\n[... {cut} bytes omitted ...]\n", "")
    assert set(shown) == {"o"}
    assert int(cut) + len(shown) == 5000


def test_the_editor_creates_replaces_and_views_files_in_the_sandbox() -> None:
    edit = "str_replace_editor"
    model = ScriptedModel(
        tool_call(edit, {"command": "create", "path": "f.txt", "file_text": "one\ntwo\nthree"}),
        tool_call(
            edit, {"command": "str_replace", "path": "f.txt", "old_str": "two", "new_str": "2"}
        ),
        tool_call(edit, {"command": "view", "path": "/workspace/f.txt", "view_range": [2, 3]}),
    )
    run = run_loop(model)
    assert run.sandbox.files["f.txt"] == "one\n2\nthree"
    assert run.model.last_seen(1) == "Wrote 13 bytes to /workspace/f.txt."
    assert run.model.last_seen(3) == "     2\t2\n     3\tthree"


def test_the_trajectory_holds_every_message_and_step() -> None:
    model = ScriptedModel(
        tool_call("execute_bash", {"command": "ls"}, usage=(120, 30)),
        tool_call("submit", {"answer": "done"}),
    )
    run = run_loop(model, InMemorySandbox(commands={"ls": shell("input\n")}))
    steps = run.trajectory.steps
    assert [(s.step, s.prompt_tokens, s.completion_tokens) for s in steps] == [
        (1, 120, 30),
        (2, 100, 20),
    ]
    assert steps[0].tool_calls[0].observation == "[exit code 0]\ninput"
    roles = [m["role"] for m in run.trajectory.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "tool"]
    assert run.result.usage.total_tokens == 270


def test_yes_cut_by_the_exec_server_is_one_line_a_count_and_the_servers_marker() -> None:
    printed = b"y\n" * 50_000
    sandbox = InMemorySandbox(commands={"yes": as_the_exec_server_returns(printed, 1024)})
    model = ScriptedModel(tool_call("execute_bash", {"command": "yes"}))
    seen = run_loop(model, sandbox, maxObservationBytes=1024).model.last_seen(1)
    assert re.fullmatch(
        r"\[exit code 0\]\ny\n\[\.\.\. the line above \d+ more times \.\.\.\]"
        r"\n\n\[\.\.\. \d+ bytes omitted \.\.\.\]\n"  # the head's own last newline, then it
        r"y\n\[\.\.\. the line above \d+ more times \.\.\.\]",
        seen,
    ), seen


def test_a_line_printed_over_and_over_reaches_the_model_once_with_a_count() -> None:
    # A 1.5B model's loop called a function it never defined 999 times: 16 KiB of one error,
    # which took its server over three minutes to read on this machine's CPU.
    error = "/dev/shm/execd-1/command.sh: line 1: is_prime: command not found"
    sandbox = InMemorySandbox(
        commands={"loop": shell("2\n3\n3\n", stderr=(error + "\n") * 999 + "done\n")}
    )
    model = ScriptedModel(tool_call("execute_bash", {"command": "loop"}))
    run = run_loop(model, sandbox)
    assert run.model.last_seen(1) == (
        f"[exit code 0]\n2\n3\n3\n[stderr]\n{error}\n[... the line above 998 more times ...]\ndone"
    )
