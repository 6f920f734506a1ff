"""The `bash` tool-call format: no tools are sent; every reply holds exactly one fenced code
block (```bash, or ```python, run with python3), which runs in the persistent shell, and a
block holding only `submit ANSWER` ends the task (submitted beside other commands, an answer
would be a guess at output not yet seen; `submit` alone hands in the answer file, else the one
line the previous block printed). It needs no function calling at all, which
is what small models served without a tool-call parser manage best (the mini-swe-agent style).

Pure: a reply becomes the tool calls it stands for (execute_bash, submit), or the short
correction the model gets instead. Of several blocks only the first runs, and the model is told.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

from .textcalls import TextToolCall

_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
# A command written on the fence line itself ("```bash grep x file"): moved to a line of its own.
_ON_FENCE_LINE = re.compile(
    r"```(bash|sh|shell|console|python3?|py)[ \t]+(?=[^\s`])", re.IGNORECASE
)
_SHELL = {"bash", "sh", "shell", "console"}
_PYTHON = {"python", "python3", "py"}
_SUBMIT = re.compile(r"^\s*submit(?:\s+(.*?))?\s*$")
# The heredoc word a python block is fed to python3 with; a block holding it is refused.
_PY_END = "LLMSANDBOX_PY_END"


# Asked of the endpoint in this format: the reply ends at the first block's closing fence, so
# a small model does not go on to write the output it imagines, or a second block.
STOP_AFTER_BLOCK = ["\n```\n"]


@dataclass(frozen=True)
class BashReply:
    calls: list[TextToolCall] = field(default_factory=list)
    correction: str | None = None


def _blocks(content: str) -> list[tuple[str, str]]:
    """The runnable blocks, as (language, code); other fences (output, text) are left alone."""
    found = []
    for lang, code in _FENCE.findall(_ON_FENCE_LINE.sub(lambda m: f"```{m[1]}\n", content)):
        lang = lang.lower()
        if lang in _SHELL or lang in _PYTHON:
            found.append(("python" if lang in _PYTHON else "bash", code.rstrip("\n")))
    return found


# What a line of commands written without a fence starts with (small models drop the fence,
# most of all for `submit 115` or a one-line grep); prose never starts with these in lower case.
_BARE_COMMANDS = frozenset(
    {
        "submit",
        "python3",
        "python",
        "grep",
        "egrep",
        "cat",
        "ls",
        "head",
        "tail",
        "awk",
        "sed",
        "echo",
        "printf",
        "wc",
        "sort",
        "uniq",
        "find",
        "cut",
        "tr",
        "bc",
        "cd",
        "pip",
        "pip3",
        "mkdir",
        "cp",
        "mv",
        "touch",
        "expr",
        "seq",
        "date",
        "pwd",
        "which",
        "file",
        "du",
        "diff",
        "tee",
        "xargs",
        "nl",
        "rev",
        "factor",
        "test",
        "export",
    }
)


def bare_commands(content: str) -> str | None:
    """The lines of a reply without any fenced block that are commands (their first word a
    common command's), as a block; None when no line is. Prose lines around them are dropped,
    and so are stray fence lines (a closing fence with no opening one)."""
    lines = []
    for line in content.splitlines():
        text = line.strip().removeprefix("$ ")
        if text.startswith("```"):
            continue
        if text.split(" ", 1)[0] in _BARE_COMMANDS:
            lines.append(text)
    return "\n".join(lines) if lines else None


def closed(content: str) -> str:
    """The reply as the conversation keeps it: a block cut at STOP_AFTER_BLOCK gets back its
    closing fence, so that the model's own earlier replies show the format it is asked for."""
    if content.count("```") % 2 == 1:
        return content.rstrip("\n") + "\n```"
    return content


def never_seen(answer: str) -> bool:
    return False


def parse_bash_reply(
    content: str,
    workspace: str,
    seen: Callable[[str], bool] = never_seen,
    last_line: str | None = None,
) -> BashReply:
    """The calls `content` stands for; `seen(answer)` tells whether an answer submitted beside
    other commands was already in an output the model has been shown (then it is no guess);
    `last_line` is what the previous block printed when that was one line, which a bare
    `submit` hands in unless the model wrote the answer file itself."""
    blocks = _blocks(content)
    if not blocks:
        bare = bare_commands(content)
        if bare is None:
            return BashReply(correction=NO_BLOCK)
        return _block_calls("bash", bare, workspace, seen, last_line)
    first = _block_calls(*blocks[0], workspace, seen, last_line)
    if len(blocks) > 1:
        # Refusing them all would make a model at temperature 0 send the same reply again.
        first.calls.append(TextToolCall("", "", SEVERAL_BLOCKS.format(n=len(blocks))))
    return first


def _block_calls(
    lang: str, code: str, workspace: str, seen: Callable[[str], bool], last_line: str | None
) -> BashReply:
    if lang == "python" and _SUBMIT.match(code.strip()) and "\n" not in code.strip():
        lang = "bash"  # submit, fenced as python: it is still the submit command
    first, _, rest = code.strip("\n").partition("\n")
    if lang == "bash" and first.strip() in {"python", "python3"} and rest.strip():
        # A script under a line naming its interpreter: in bash that line would read stdin.
        lang, code = "python", rest
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
        if any(_is_command(line) for line in lines[:i]):
            # An answer submitted before its command's output was seen is a guess, unless an
            # earlier output already showed it (small models resend the command beside it).
            if not words or not seen(words.strip().strip("'\"")):
                return BashReply([_bash(before), TextToolCall("", "", SUBMIT_NOT_ALONE)])
            calls.append(_bash(before))
        answer_file = f"{workspace}/output/answer.txt"
        if words:
            # The answer as the shell reads the words (quotes, $(...)), into the answer file the
            # submit then takes it from.
            calls.append(_bash(f'set -- {words}; printf "%s\\n" "$*" > {answer_file}'))
        elif last_line is not None and not calls:
            # Bare: what the model wrote to the answer file, else the line it was just shown.
            quoted = shlex.quote(last_line)
            calls.append(_bash(f"[ -s {answer_file} ] || printf '%s\\n' {quoted} > {answer_file}"))
        calls.append(TextToolCall("submit", '{"from_answer_file": true}'))
        return BashReply(calls)
    return BashReply([_bash(code)])


_PYTHON_C = re.compile(r"\bpython3?\s+-c\b")
_NOT_FOUND = re.compile(r"line \d+: ([\w.-]+): command not found")


def hint(command: str, output: str) -> str | None:
    """A line for the model after a command that failed in a way small models repeat; None
    when there is nothing to add."""
    if _PYTHON_C.search(command) and "SyntaxError" in output:
        return PYTHON_C_HINT
    if missing := _NOT_FOUND.search(output):
        if missing[1] in {"python", "pip"}:
            return NO_BARE_PYTHON
        return NOT_A_COMMAND.format(name=missing[1][:40])
    return None


def _is_command(line: str) -> bool:
    text = line.strip()
    return bool(text) and not text.startswith("#")


def _bash(command: str) -> TextToolCall:
    return TextToolCall("execute_bash", json.dumps({"command": command}, ensure_ascii=False))


NO_BLOCK = (
    "Your reply had no ```bash block, so nothing ran. Reply with one ```bash block holding the "
    "commands to run next; once a command's output has shown you the answer, submit it in a "
    "block of its own."
)
SUBMIT_NOT_ALONE = (
    "nothing was submitted: submit must be the only command of its block, sent once you have "
    "seen the output that gives the answer. The commands above it ran; their output is above."
)
SEVERAL_BLOCKS = (
    "only the first of your {n} code blocks ran (its output is above); send one block per "
    "reply, and decide the next one from what this one printed."
)
PYTHON_C_HINT = (
    "python3 -c takes a one-line program: with, for, if and def cannot follow a semicolon "
    "there. Write the script as a ```python block instead."
)
NOT_A_COMMAND = (
    "{name} is not a command on this computer: define it first, or write the script as a "
    "```python block."
)
NO_BARE_PYTHON = (
    "There is no python or pip command on this computer: write python3 (and python3 -m pip), "
    "or put the script in a ```python block."
)
