"""The `bash` tool-call format: no tools are sent; every reply holds exactly one fenced code
block (```bash, or ```python, run with python3), which runs in the persistent shell, and
`submit ANSWER` on a line of its own ends the task. It needs no function calling at all, which
is what small models served without a tool-call parser manage best (the mini-swe-agent style).

Pure: a reply becomes the tool calls it stands for (execute_bash, submit), or the short
correction the model gets instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .textcalls import TextToolCall

_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
_SHELL = {"bash", "sh", "shell", "console"}
_PYTHON = {"python", "python3", "py"}
_SUBMIT = re.compile(r"^\s*submit(?:\s+(.*?))?\s*$")
# The heredoc word a python block is fed to python3 with; a block holding it is refused.
_PY_END = "LLMSANDBOX_PY_END"


@dataclass(frozen=True)
class BashReply:
    calls: list[TextToolCall] = field(default_factory=list)
    correction: str | None = None


def _blocks(content: str) -> list[tuple[str, str]]:
    """The runnable blocks, as (language, code); other fences (output, text) are left alone."""
    found = []
    for lang, code in _FENCE.findall(content):
        lang = lang.lower()
        if lang in _SHELL or lang in _PYTHON:
            found.append(("python" if lang in _PYTHON else "bash", code.rstrip("\n")))
    return found


def parse_bash_reply(content: str, workspace: str) -> BashReply:
    blocks = _blocks(content)
    if not blocks:
        return BashReply(correction=NO_BLOCK)
    if len(blocks) > 1:
        return BashReply(correction=SEVERAL_BLOCKS.format(n=len(blocks)))
    lang, code = blocks[0]
    if lang == "python":
        if _PY_END in code:
            return BashReply(correction=f"Your python block contains {_PY_END}; nothing ran.")
        return BashReply([_bash(f"python3 - <<'{_PY_END}'\n{code}\n{_PY_END}")])
    lines = code.split("\n")
    for i, line in enumerate(lines):
        found = _SUBMIT.match(line)
        if found is None:
            continue
        before = "\n".join(lines[:i]).strip()
        words = found.group(1)
        calls = []
        if words:
            # The answer as the shell reads the words (quotes, $(...)), into the answer file the
            # run's answer is taken from when submit carries none.
            write = f'set -- {words}; printf "%s\\n" "$*" > {workspace}/output/answer.txt'
            before = f"{before}\n{write}" if before else write
        if before:
            calls.append(_bash(before))
        calls.append(TextToolCall("submit", "{}"))
        return BashReply(calls)
    return BashReply([_bash(code)])


def _bash(command: str) -> TextToolCall:
    return TextToolCall("execute_bash", json.dumps({"command": command}, ensure_ascii=False))


NO_BLOCK = (
    "Your reply had no ```bash block, so nothing ran. Reply with exactly one ```bash block "
    "holding the commands to run next; once you have the final answer, run submit followed "
    "by it."
)
SEVERAL_BLOCKS = (
    "Your reply had {n} code blocks, so none of them ran. Put everything to run next into "
    "one ```bash block."
)
