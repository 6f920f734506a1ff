"""Tool calls written in a reply's text, for endpoints without a tool-call parser.

Two common forms: Hermes (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) and
Qwen3-Coder XML (`<function=NAME><parameter=KEY>VALUE</parameter></function>`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FUNCTION = re.compile(r"<function=([^>\s]+)>\s*(.*?)\s*(?:</function>|$)", re.DOTALL)
_PARAM = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


@dataclass(frozen=True)
class TextToolCall:
    name: str
    arguments: str  # JSON text, as a native call would carry it
    error: str | None = None  # why the call could not be read, for the model to fix


def _from_json(body: str) -> TextToolCall:
    try:
        obj = json.loads(body)
    except ValueError as exc:
        return TextToolCall("", "", f"the tool call is not valid JSON ({exc})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return TextToolCall("", "", 'a tool call needs {"name": ..., "arguments": {...}}')
    args = obj.get("arguments", obj.get("parameters", {}))
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return TextToolCall(obj["name"], text)


def _from_xml(body: str) -> list[TextToolCall]:
    calls = []
    for name, inner in _FUNCTION.findall(body):
        params = {key: value for key, value in _PARAM.findall(inner)}
        calls.append(TextToolCall(name, json.dumps(params, ensure_ascii=False)))
    return calls


def parse_text_tool_calls(content: str) -> list[TextToolCall]:
    """Every tool call in the text, in order; an unclosed last block (a stop sequence cut it) counts."""
    calls: list[TextToolCall] = []
    blocks = _BLOCK.findall(content)
    if not blocks and "<function=" in content:
        blocks = [content]
    for body in blocks:
        if "<function=" in body:
            calls.extend(_from_xml(body))
        else:
            parsed = _from_json(body)
            if parsed is not None:
                calls.append(parsed)
    return calls
