"""Tool calls written in a reply's text, for endpoints without a tool-call parser.

The common forms: Hermes (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`), Qwen3-Coder
XML (`<function=NAME><parameter=KEY>VALUE</parameter></function>`), and what small models write
when they are given tools but the server parses none: the call's JSON object in a ```json fence
or as the whole reply, often a closing brace short. That last form counts only when it names a
known tool, so that a JSON answer is never taken for a call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FUNCTION = re.compile(r"<function=([^>\s]+)>\s*(.*?)\s*(?:</function>|$)", re.DOTALL)
_PARAM = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>", re.DOTALL)
_FENCE = re.compile(r"```(?:json|JSON|tool_call)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
# Closing braces a reply may lack and still be read as a call.
_MISSING_BRACES = 2


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
    return TextToolCall(obj["name"], _arguments_text(obj))


def _arguments_text(call: dict[str, object]) -> str:
    """A call's arguments (or "parameters", as some models name them) as JSON text."""
    args = call.get("arguments", call.get("parameters", {}))
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _from_xml(body: str) -> list[TextToolCall]:
    calls = []
    for name, inner in _FUNCTION.findall(body):
        params = {key: value for key, value in _PARAM.findall(inner)}
        calls.append(TextToolCall(name, json.dumps(params, ensure_ascii=False)))
    return calls


def _lenient_object(body: str) -> object:
    """The JSON object `body` starts with, tolerating text after it and up to _MISSING_BRACES
    missing closing braces; None when there is none."""
    decoder = json.JSONDecoder()
    text = body.strip()
    for extra in range(_MISSING_BRACES + 1):
        try:
            obj, _ = decoder.raw_decode(text + "}" * extra)
        except ValueError:
            continue
        return obj
    return None


def _json_calls(content: str, tool_names: frozenset[str]) -> list[TextToolCall]:
    """Calls written as bare JSON objects: each ```json fence, or else the whole reply."""
    fenced = _FENCE.findall(content)
    bodies = fenced or ([content] if content.lstrip().startswith("{") else [])
    calls = []
    for body in bodies:
        obj = _lenient_object(body)
        if not isinstance(obj, dict) or obj.get("name") not in tool_names:
            continue
        calls.append(TextToolCall(str(obj["name"]), _arguments_text(obj)))
    return calls


def parse_text_tool_calls(
    content: str, tool_names: frozenset[str] = frozenset()
) -> list[TextToolCall]:
    """Every tool call in the text, in order; an unclosed last block (a stop sequence cut it)
    counts. Bare JSON calls are looked for only when there are no tagged ones, and count only
    when they name one of `tool_names`."""
    calls: list[TextToolCall] = []
    blocks = _BLOCK.findall(content)
    if not blocks and "<function=" in content:
        blocks = [content]
    if not blocks:
        return _json_calls(content, tool_names)
    for body in blocks:
        if "<function=" in body:
            calls.extend(_from_xml(body))
        else:
            parsed = _from_json(body)
            if parsed is not None:
                calls.append(parsed)
    return calls
