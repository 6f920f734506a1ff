"""The agent loop end to end: the real openai client against the scripted server, real commands in a real sandbox."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from conftest import task_doc
from llmserver import (
    ScriptedLLMServer,
    context_length_error,
    empty_choices,
    error,
    hermes_tool_call,
    html_page,
    malformed_json,
    reset_connection,
    slow,
    text,
    tool_call,
    tool_calls,
    xml_tool_call,
)
from sandbox_agent.result import ExitReason, Phase


def last_observation(request: dict[str, Any]) -> str:
    """What the model was last shown: the final tool result or user message."""
    return str(request["messages"][-1]["content"])


def answer_from_last_output(request: dict[str, Any]) -> Any:
    numbers = re.findall(r"-?\d+", last_observation(request).split("]", 1)[-1])
    return tool_call("submit", {"answer": numbers[-1]})


PRIMES_SCRIPT = (
    "print(sum(p for p in range(2, 1000) if all(p % d for d in range(2, int(p**0.5) + 1))))\n"
)


def test_multi_step_task_writes_a_script_runs_it_and_submits_on_every_backend(
    backend: str, llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.script(
        tool_call("execute_bash", {"command": "ls input && mkdir -p work && cd work"}),
        tool_call(
            "str_replace_editor",
            {"command": "create", "path": "work/primes.py", "file_text": PRIMES_SCRIPT},
        ),
        tool_call("execute_bash", {"command": "python3 primes.py"}),
        answer_from_last_output,
    )
    doc = task_doc(
        "What is the sum of the primes below 1000?",
        inputs=[{"path": "notes.txt", "content": "primes are fun\n"}],
    )
    outcome = run_local(doc, backend=backend)
    result = outcome.result
    assert result.phase is Phase.SUCCEEDED, result.message
    assert result.exit_reason is ExitReason.SUBMITTED
    assert result.answer == "76127"
    assert result.steps == 4
    assert result.tool_calls == {"execute_bash": 2, "str_replace_editor": 1, "submit": 1}
    # The first command saw the uploaded input; the third ran in the directory the first cd'd to.
    requests = llm_server.chat_requests
    assert "notes.txt" in last_observation(requests[1].json or {})
    assert "[exit code 0]" in last_observation(requests[3].json or {})
    trajectory = json.loads(outcome.trajectory_path.read_text())
    assert trajectory["result"]["answer"] == "76127"
    assert [s["step"] for s in trajectory["steps"]] == [1, 2, 3, 4]
    assert trajectory["steps"][2]["tool_calls"][0]["observation"].endswith("76127")


def test_cwd_and_exported_variables_persist_between_commands(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.script(
        tool_call("execute_bash", {"command": "mkdir -p a/b && cd a/b && export GREETING=hello"}),
        tool_call("execute_bash", {"command": 'echo "$(basename $(pwd)) $GREETING"'}),
        tool_call("submit", {"answer": "done"}),
    )
    run_local(task_doc())
    assert last_observation(llm_server.chat_requests[2].json or {}).endswith("b hello")


def test_a_command_timeout_kills_the_command_and_the_session_keeps_working(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.script(
        tool_call("execute_bash", {"command": "cd /tmp && export KEEP=yes"}),
        tool_call("execute_bash", {"command": "sleep 60 & sleep 60"}),
        tool_call("execute_bash", {"command": "echo $KEEP $(pwd)"}),
        tool_call("submit", {"answer": "ok"}),
    )
    outcome = run_local(task_doc(limits={"commandTimeoutSeconds": 1}))
    assert outcome.result.phase is Phase.SUCCEEDED
    timed_out = last_observation(llm_server.chat_requests[2].json or {})
    assert "killed after 1s (timeout)" in timed_out
    assert last_observation(llm_server.chat_requests[3].json or {}).endswith("yes /tmp")


def test_huge_output_is_capped_with_a_marker(llm_server: ScriptedLLMServer, run_local: Any) -> None:
    llm_server.script(
        tool_call("execute_bash", {"command": "python3 -c \"print('x' * 3_000_000)\"; echo END"}),
        tool_call("submit", {"answer": "ok"}),
    )
    run_local(task_doc(limits={"maxObservationBytes": 4096}))
    seen = last_observation(llm_server.chat_requests[1].json or {})
    assert len(seen.encode()) < 4096 + 200
    assert "bytes omitted" in seen
    assert seen.endswith("END")


def test_the_editor_cannot_reach_outside_the_workspace(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.script(
        tool_call("str_replace_editor", {"command": "view", "path": "/etc/passwd"}),
        tool_call(
            "str_replace_editor",
            {"command": "create", "path": "../escape.txt", "file_text": "x"},
        ),
        tool_call("submit", {"answer": "ok"}),
    )
    run_local(task_doc())
    for i in (1, 2):
        seen = last_observation(llm_server.chat_requests[i].json or {})
        assert seen.startswith("Error:")
        assert "outside" in seen


def test_editor_views_with_line_numbers_replaces_and_inserts(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.script(
        tool_call(
            "str_replace_editor",
            {"command": "create", "path": "f.txt", "file_text": "one\ntwo\nthree"},
        ),
        tool_call(
            "str_replace_editor",
            {"command": "str_replace", "path": "f.txt", "old_str": "two", "new_str": "TWO"},
        ),
        tool_call(
            "str_replace_editor",
            {"command": "insert", "path": "f.txt", "insert_line": 0, "new_str": "zero"},
        ),
        tool_call("str_replace_editor", {"command": "view", "path": "f.txt", "view_range": [2, 3]}),
        tool_call(
            "str_replace_editor",
            {"command": "str_replace", "path": "f.txt", "old_str": "absent", "new_str": ""},
        ),
        tool_call("str_replace_editor", {"command": "view", "path": "."}),
        tool_call("submit", {"answer": "ok"}),
    )
    run_local(task_doc())
    seen = [last_observation(r.json or {}) for r in llm_server.chat_requests]
    assert seen[4] == "     2\tone\n     3\tTWO"
    assert seen[5].startswith("Error: old_str does not occur")
    assert "f.txt" in seen[6]


def test_hermes_text_tool_calls_work_without_native_tools(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.script(
        hermes_tool_call("execute_bash", {"command": "echo $((6 * 7))"}, before="Let me compute."),
        hermes_tool_call("submit", {"answer": "42"}),
    )
    outcome = run_local(task_doc(model={"toolCallFormat": "hermes"}))
    assert outcome.result.answer == "42"
    first = llm_server.chat_requests[0].json or {}
    assert "tools" not in first
    assert "<tools>" in first["messages"][0]["content"]
    second = last_observation(llm_server.chat_requests[1].json or {})
    assert second.startswith("<tool_response>")
    assert "42" in second


def test_auto_mode_parses_xml_tool_calls_from_text(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.script(
        xml_tool_call("execute_bash", {"command": "echo parsed"}),
        xml_tool_call("submit", {"answer": "parsed"}),
    )
    outcome = run_local(task_doc(model={"toolCallFormat": "auto"}))
    assert outcome.result.answer == "parsed"
    assert "tools" in (llm_server.chat_requests[0].json or {})
    assert "parsed" in last_observation(llm_server.chat_requests[1].json or {})


def test_a_reply_without_a_tool_call_gets_a_continue_message(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.script(text("I think the answer is 5."), tool_call("submit", {"answer": "5"}))
    outcome = run_local(task_doc())
    assert outcome.result.answer == "5"
    nudge = (llm_server.chat_requests[1].json or {})["messages"][-1]
    assert nudge["role"] == "user"
    assert "no tool call" in nudge["content"]


def test_bad_tool_calls_come_back_as_errors_the_model_can_fix(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.script(
        tool_call("execute_bash", '{"command": "echo'),
        tool_call("launch_rockets", {}),
        tool_call("execute_bash", {}),
        tool_call("submit", {"answer": "ok"}),
    )
    outcome = run_local(task_doc())
    assert outcome.result.phase is Phase.SUCCEEDED
    seen = [last_observation(r.json or {}) for r in llm_server.chat_requests[1:4]]
    assert "not valid JSON" in seen[0]
    assert "unknown tool 'launch_rockets'" in seen[1]
    assert "missing required argument 'command'" in seen[2]


def test_max_steps_ends_the_task(llm_server: ScriptedLLMServer, run_local: Any) -> None:
    llm_server.set_default(tool_call("execute_bash", {"command": "echo again"}))
    outcome = run_local(task_doc(limits={"maxSteps": 3}))
    assert outcome.result.phase is Phase.FAILED
    assert outcome.result.exit_reason is ExitReason.MAX_STEPS
    assert outcome.result.steps == 3
    assert "limits.maxSteps" in outcome.result.message


def test_the_conversation_token_budget_ends_the_task(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.set_default(tool_call("execute_bash", {"command": "true"}, usage=(700, 400)))
    outcome = run_local(task_doc(limits={"maxTokens": 1000}))
    assert outcome.result.exit_reason is ExitReason.TOKEN_BUDGET
    assert outcome.result.steps == 1
    assert "limits.maxTokens" in outcome.result.message


def test_the_total_token_spend_cap_ends_the_task(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.set_default(tool_call("execute_bash", {"command": "true"}, usage=(300, 100)))
    outcome = run_local(task_doc(limits={"maxTotalTokens": 1000}))
    assert outcome.result.exit_reason is ExitReason.TOKEN_BUDGET
    assert outcome.result.usage.total_tokens >= 1000 - 64
    assert "limits.maxTotalTokens" in outcome.result.message


def test_max_tokens_per_call_never_exceeds_the_remaining_budget(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.script(
        tool_call("execute_bash", {"command": "true"}, usage=(500, 100)),
        tool_call("submit", {"answer": "ok"}, usage=(650, 10)),
    )
    run_local(task_doc(model={"maxTokensPerCall": 4096}, limits={"maxTokens": 2000}))
    asked = [(r.json or {})["max_tokens"] for r in llm_server.chat_requests]
    assert asked == [2000, 1400]


def test_retries_after_429_honouring_retry_after_and_after_500(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.script(
        error(429, headers={"Retry-After": "0.2"}),
        error(500),
        error(503),
        tool_call("submit", {"answer": "patient"}),
    )
    outcome = run_local(task_doc(limits={"maxLlmRetries": 5}))
    assert outcome.result.answer == "patient"
    assert outcome.result.usage.llm_retries == 3
    assert len(llm_server.chat_requests) == 4


def test_retries_are_bounded(llm_server: ScriptedLLMServer, run_local: Any) -> None:
    llm_server.set_default(error(503, message="overloaded"))
    outcome = run_local(task_doc(limits={"maxLlmRetries": 2}))
    assert outcome.result.exit_reason is ExitReason.LLM_ERROR
    assert len(llm_server.chat_requests) == 3
    assert "giving up after 3 attempts" in outcome.result.message
    assert "503" in outcome.result.message


def test_a_refused_api_key_is_an_llm_error_without_retries(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.script(error(401, message="bad key"))
    outcome = run_local(task_doc())
    assert outcome.result.exit_reason is ExitReason.LLM_ERROR
    assert "refused the API key" in outcome.result.message
    # The real ways to give a key (there is no --api-key flag).
    assert "OPENAI_API_KEY" in outcome.result.message
    assert "spec.model.apiKeySecretRef" in outcome.result.message
    assert "--api-key" not in outcome.result.message
    assert len(llm_server.chat_requests) == 1


def test_an_endpoint_that_answers_a_web_page_ends_at_once_naming_it(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    # A proxy's login page, or a web UI on the wrong port, answering 200 with HTML.
    llm_server.set_default(html_page())
    outcome = run_local(task_doc(limits={"maxLlmRetries": 5}))
    assert outcome.result.exit_reason is ExitReason.LLM_ERROR
    assert outcome.result.message == (
        f"the endpoint at {llm_server.base_url} answered text/html, not an OpenAI-compatible "
        "JSON response: check the base URL (it usually ends in /v1) and that it is the "
        "inference server, not a proxy or web page"
    )
    assert len(llm_server.chat_requests) == 1  # not retried: asking again changes nothing
    assert json.loads((outcome.run_dir / "result.json").read_text())["exitReason"] == "llm_error"
    assert outcome.trajectory_path.is_file()


def test_an_unreachable_endpoint_is_an_llm_error_naming_the_url(run_local: Any) -> None:
    url = "http://127.0.0.1:9/v1"
    outcome = run_local(task_doc(limits={"maxLlmRetries": 1}), base_url=url)
    assert outcome.result.phase is Phase.FAILED
    assert outcome.result.exit_reason is ExitReason.LLM_ERROR
    assert url in outcome.result.message


def test_a_context_length_error_shrinks_max_tokens_then_continues(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.script(context_length_error(), tool_call("submit", {"answer": "fits"}))
    outcome = run_local(task_doc(model={"maxTokensPerCall": 4096}))
    assert outcome.result.answer == "fits"
    asked = [(r.json or {})["max_tokens"] for r in llm_server.chat_requests]
    assert asked == [4096, 2048]


def test_repeated_context_length_errors_end_with_token_budget(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.set_default(context_length_error())
    outcome = run_local(task_doc(model={"maxTokensPerCall": 1024}))
    assert outcome.result.exit_reason is ExitReason.TOKEN_BUDGET
    assert "context window" in outcome.result.message


def test_the_wall_clock_deadline_ends_a_slow_task(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.set_default(slow(5, tool_call("execute_bash", {"command": "true"})))
    outcome = run_local(task_doc(limits={"activeDeadlineSeconds": 1}))
    assert outcome.result.exit_reason is ExitReason.DEADLINE
    assert "activeDeadlineSeconds" in outcome.result.message
    assert outcome.result.duration_seconds < 5


def test_a_long_input_document_is_read_through_files(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    filler = "".join(f"line {i}: nothing to see here\n" for i in range(15_000))
    document = filler + "the secret code is 8675309\n" + filler
    llm_server.script(
        tool_call(
            "execute_bash", {"command": "wc -c input/doc.txt; grep -n 'secret code' input/doc.txt"}
        ),
        answer_from_last_output,
    )
    outcome = run_local(
        task_doc("Find the secret code.", inputs=[{"path": "doc.txt", "content": document}])
    )
    assert outcome.result.answer == "8675309"
    seen = last_observation(llm_server.chat_requests[1].json or {})
    assert f"{len(document.encode())} input/doc.txt" in seen
    first_prompt = (llm_server.chat_requests[0].json or {})["messages"][1]["content"]
    assert "input/doc.txt" in first_prompt
    assert len(first_prompt) < 1000


def test_input_files_from_disk_and_outputs_are_collected(
    llm_server: ScriptedLLMServer, run_local: Any, tmp_path: Any
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("x\n1\n2\n")
    (tmp_path / "data" / "sub").mkdir()
    (tmp_path / "data" / "sub" / "b.bin").write_bytes(bytes(range(256)))
    llm_server.script(
        tool_call(
            "execute_bash",
            {
                "command": "cmp input/d/sub/b.bin <(python3 -c 'import sys; sys.stdout.buffer.write(bytes(range(256)))') && mkdir -p output/plots && echo img > output/plots/p.txt && echo 3 > output/answer.txt"
            },
        ),
        tool_call("submit", {}),
    )
    outcome = run_local(task_doc(inputs=[{"path": "d", "file": "data"}]))
    assert outcome.result.exit_reason is ExitReason.SUBMITTED, outcome.result.message
    assert "[exit code 0]" in last_observation(llm_server.chat_requests[1].json or {})
    # submit without an answer falls back to output/answer.txt
    assert outcome.result.answer == "3"
    paths = sorted(o.path for o in outcome.result.outputs)
    assert paths == ["answer.txt", "plots/p.txt"]
    assert (outcome.output_dir / "plots" / "p.txt").read_text() == "img\n"


def test_submit_without_any_answer_is_no_answer(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.script(tool_call("submit", {}))
    outcome = run_local(task_doc())
    assert outcome.result.phase is Phase.FAILED
    assert outcome.result.exit_reason is ExitReason.NO_ANSWER
    assert "answer.txt" in outcome.result.message


def test_calls_after_submit_in_the_same_reply_are_not_run(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.script(
        tool_calls([("submit", {"answer": "first"}), ("execute_bash", {"command": "touch x"})])
    )
    outcome = run_local(task_doc())
    assert outcome.result.answer == "first"
    trajectory = json.loads(outcome.trajectory_path.read_text())
    assert trajectory["steps"][0]["tool_calls"][1]["observation"].startswith("Not run")


def test_the_sandbox_dying_is_a_sandbox_error(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    # In the process backend the shell's parent is the exec server itself.
    llm_server.script(
        tool_call("execute_bash", {"command": "kill -9 $PPID"}),
        tool_call("execute_bash", {"command": "echo unreachable"}),
    )
    outcome = run_local(task_doc())
    assert outcome.result.exit_reason is ExitReason.SANDBOX_ERROR
    assert "sandbox" in outcome.result.message


def test_the_api_key_never_reaches_the_sandbox_or_the_trajectory(
    llm_server: ScriptedLLMServer, run_local: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "sk-test-very-secret-key-123"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    llm_server.script(
        tool_call("execute_bash", {"command": "env; cat /proc/$PPID/environ | tr '\\0' '\\n'"}),
        tool_call("submit", {"answer": "ok"}),
    )
    outcome = run_local(task_doc(), api_key=secret)
    assert llm_server.chat_requests[0].headers["authorization"] == f"Bearer {secret}"
    seen = last_observation(llm_server.chat_requests[1].json or {})
    assert "PATH=" in seen
    assert secret not in seen
    assert secret not in outcome.trajectory_path.read_text()
    assert secret not in (outcome.run_dir / "result.json").read_text()


def test_malformed_replies_empty_choices_and_resets_are_retried(
    llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    llm_server.script(
        malformed_json(),
        empty_choices(),
        reset_connection(),
        tool_call("submit", {"answer": "robust"}),
    )
    outcome = run_local(task_doc(limits={"maxLlmRetries": 5}))
    assert outcome.result.answer == "robust"
    assert outcome.result.usage.llm_retries == 3


def test_https_endpoints_share_one_verifying_tls_context() -> None:
    import ssl

    from sandbox_agent.llm import verified_context

    first, second = verified_context(), verified_context()
    assert first is second  # the CA bundle is loaded once per process, not once per run
    assert first.verify_mode is ssl.CERT_REQUIRED
    assert first.check_hostname
