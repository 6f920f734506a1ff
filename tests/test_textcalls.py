"""Reading tool calls out of reply text, and capping observations."""

from __future__ import annotations

import json

from sandbox_agent.textcalls import parse_text_tool_calls
from sandbox_agent.tools import TOOL_NAMES, cap_text


def test_hermes_calls_are_found_in_order_with_their_arguments() -> None:
    content = (
        "I'll look.\n<tool_call>\n"
        '{"name": "execute_bash", "arguments": {"command": "ls"}}\n</tool_call>\n'
        '<tool_call>{"name": "submit", "arguments": {"answer": "4"}}</tool_call>'
    )
    calls = parse_text_tool_calls(content)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("execute_bash", {"command": "ls"}),
        ("submit", {"answer": "4"}),
    ]


def test_an_unclosed_last_block_still_counts() -> None:
    calls = parse_text_tool_calls('<tool_call>{"name": "submit", "arguments": {}}')
    assert [c.name for c in calls] == ["submit"]


def test_qwen_xml_calls_keep_multiline_parameters() -> None:
    content = (
        "<tool_call>\n<function=execute_bash>\n<parameter=command>\n"
        "cd /tmp\nls -la\n</parameter>\n</function>\n</tool_call>"
    )
    (call,) = parse_text_tool_calls(content)
    assert call.name == "execute_bash"
    assert json.loads(call.arguments) == {"command": "cd /tmp\nls -la"}


def test_xml_without_the_outer_tag_is_accepted() -> None:
    (call,) = parse_text_tool_calls(
        "<function=submit>\n<parameter=answer>\n7\n</parameter>\n</function>"
    )
    assert json.loads(call.arguments) == {"answer": "7"}


def test_invalid_json_in_a_block_becomes_an_error_for_the_model() -> None:
    (call,) = parse_text_tool_calls("<tool_call>{not json}</tool_call>")
    assert call.error is not None
    assert "not valid JSON" in call.error


def test_plain_text_has_no_calls() -> None:
    assert parse_text_tool_calls("The answer is 42.") == []


NAMES = frozenset(TOOL_NAMES)
# Replies of Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, llama.cpp, temperature 0) given the tools
# natively by a server that parses no tool calls: the call is the reply's text, here a brace short.
CAPTURED_BARE = (
    '{"name": "execute_bash", "arguments": {"command": "python3 -c \'import math; '
    "print(sum(map(int, str(math.pow(2, 100))))'\"}"
)
CAPTURED_SCHEMA_LEAK = (
    '{"name": "execute_bash", "arguments": {"command": "wc -l /workspace/input/data.txt", '
    '"required": ["command"]}}'
)


def test_a_bare_json_call_a_brace_short_is_read_as_the_model_meant_it() -> None:
    (call,) = parse_text_tool_calls(CAPTURED_BARE, NAMES)
    assert call.name == "execute_bash"
    assert json.loads(call.arguments) == {
        "command": "python3 -c 'import math; print(sum(map(int, str(math.pow(2, 100))))'"
    }
    (leak,) = parse_text_tool_calls(CAPTURED_SCHEMA_LEAK, NAMES)
    assert json.loads(leak.arguments)["command"] == "wc -l /workspace/input/data.txt"


def test_json_calls_in_fences_are_found_in_order() -> None:
    content = (
        "First I list the files.\n```json\n"
        '{"name": "execute_bash", "arguments": {"command": "ls"}}\n```\n'
        "Then:\n```\n"
        '{"name": "submit", "parameters": {"answer": "4"}}\n```'
    )
    calls = parse_text_tool_calls(content, NAMES)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("execute_bash", {"command": "ls"}),
        ("submit", {"answer": "4"}),
    ]


def test_json_that_names_no_tool_is_not_a_call() -> None:
    assert parse_text_tool_calls('{"answer": 42, "name": "Ada"}', NAMES) == []
    assert parse_text_tool_calls('```json\n{"result": [1, 2]}\n```', NAMES) == []
    assert parse_text_tool_calls('{"name": "rm_rf", "arguments": {}}', NAMES) == []
    # Code in a python fence is not JSON, and a call needs the caller's tool names.
    assert parse_text_tool_calls("```python\nprint(1)\n```", NAMES) == []
    assert parse_text_tool_calls(CAPTURED_SCHEMA_LEAK) == []


def test_cap_text_keeps_head_and_tail_and_says_how_much_was_cut() -> None:
    text = "A" * 1000 + "B" * 1000
    capped = cap_text(text, 200)
    assert capped.startswith("A" * 100)
    assert capped.endswith("B" * 100)
    assert "[... 1800 bytes omitted ...]" in capped
    assert cap_text("short", 200) == "short"
