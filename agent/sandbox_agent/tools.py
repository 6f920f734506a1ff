"""The three tools the model gets (execute_bash, str_replace_editor, submit) and how each runs."""

from __future__ import annotations

import dataclasses
import json
import posixpath
import time
from dataclasses import dataclass
from typing import Any

from .errors import ExecServerError
from .execclient import ExecResult
from .protocols import SandboxAPI

TOOL_NAMES = ("execute_bash", "str_replace_editor", "submit")
# Where the answer is taken from when submit carries none (relative to the workspace).
ANSWER_FILE = "output/answer.txt"
NO_OUTPUT = "(no output)"  # what a command that printed nothing shows
MAX_ANSWER_BYTES = 1024 * 1024
EMPTY_SUBMIT = (
    "Error: nothing was submitted: the answer came out empty (did the command that computes it "
    "fail?). Fix that, then submit the answer itself."
)
# The editor refuses to load more than this into the conversation in one view.
_VIEW_MAX_BYTES = 2 * 1024 * 1024
_SNIPPET_CONTEXT = 4

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "execute_bash",
            "description": (
                "Run a bash command in the sandbox's persistent shell (cd and export carry "
                "over) and return its exit code, stdout and stderr. Long output is cut in the "
                "middle; long-running commands are killed at the timeout."
            ),
            "parameters": {
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The bash command to run."}
                },
                "required": ["command"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "str_replace_editor",
            "description": (
                "View, create and edit files. `view` shows a file with line numbers (optionally "
                "a view_range [start, end], end -1 for the end) or lists a directory; `create` "
                "writes file_text to path (parents are created, an existing file is replaced); "
                "`str_replace` replaces old_str, which must occur exactly once, with new_str; "
                "`insert` inserts new_str after line insert_line (0 for the top)."
            ),
            "parameters": {
                "type": "object",
                "properties": {
                    "command": {
                        "type": "string",
                        "enum": ["view", "create", "str_replace", "insert"],
                    },
                    "path": {"type": "string", "description": "Absolute path of the file."},
                    "file_text": {"type": "string"},
                    "old_str": {"type": "string"},
                    "new_str": {"type": "string"},
                    "insert_line": {"type": "integer"},
                    "view_range": {"type": "array", "items": {"type": "integer"}},
                },
                "required": ["command", "path"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "submit",
            "description": (
                "Finish the task. Pass the final answer; without one, the content of "
                "output/answer.txt in the workspace is the answer."
            ),
            "parameters": {
                "type": "object",
                "properties": {"answer": {"type": "string", "description": "The final answer."}},
                "required": [],
            },
        },
    },
]


class ToolInputError(Exception):
    """The model's arguments are wrong; the message goes back to it as the observation."""


@dataclass(frozen=True)
class Observation:
    text: str
    ok: bool
    submitted: bool = False
    answer: str | None = None
    summary: str = ""


def omitted_marker(cut: int) -> str:
    """The one marker for cut output (the exec server writes the same)."""
    return f"\n[... {cut} bytes omitted ...]\n"


# Room for a marker, however many bytes it reports.
_MARKER_ROOM = len(omitted_marker(10**15).encode())


def repeated_marker(times: int) -> str:
    return f"[... the line above {times} more times ...]"


def collapse_repeats(text: str, least: int = 3) -> str:
    """Each run of `least` or more identical lines as the line once and a marker saying how many
    more there were: a loop printing one error a thousand times costs the model a line, not
    16 KiB it must read (minutes of prompt processing for a small model on a CPU)."""
    lines = text.split("\n")
    if len(lines) < least or len(set(lines)) == len(lines):
        return text
    kept: list[str] = []
    i = 0
    while i < len(lines):
        j = i
        while j + 1 < len(lines) and lines[j + 1] == lines[i]:
            j += 1
        kept.append(lines[i])
        if j - i + 1 >= least:
            kept.append(repeated_marker(j - i))
        else:
            kept.extend(lines[i + 1 : j + 1])
        i = j + 1
    return "\n".join(kept)


def cap_text(text: str, limit: int, already_cut: int = 0) -> str:
    """Keep the head and the tail of text within `limit` bytes (plus one marker), with one marker
    that counts every byte cut. `already_cut`: the exec server already cut that many bytes
    from the middle of `text` and marked the place; that cut and this one become one."""
    marker = omitted_marker(already_cut)
    if already_cut and marker in text:
        head, tail = text.split(marker, 1)
    else:
        head, tail, already_cut = text, "", 0
    hb, tb = head.encode("utf-8"), tail.encode("utf-8")
    if len(hb) + len(tb) <= limit:
        return text
    if not already_cut:
        # One piece: its middle goes.
        hb, tb = hb[: len(hb) // 2], hb[len(hb) // 2 :]
    keep_head = min(len(hb), limit // 2)
    keep_tail = min(len(tb), limit - keep_head)
    keep_head = min(len(hb), limit - keep_tail)
    cut = already_cut + (len(hb) - keep_head) + (len(tb) - keep_tail)
    kept_head = hb[:keep_head].decode("utf-8", "ignore")
    kept_tail = tb[len(tb) - keep_tail :].decode("utf-8", "ignore")
    return kept_head + omitted_marker(cut) + kept_tail


def stream_budgets(avail: int, sizes: tuple[int, int]) -> tuple[int, int]:
    """Bytes for stdout and stderr within `avail`: each what it needs if both fit, else the
    smaller keeps up to half and the larger gets the rest."""
    out, err = sizes
    if out + err <= avail:
        return out, err
    if out <= err:
        small = min(out, avail // 2)
        return small, avail - small
    small = min(err, avail // 2)
    return avail - small, small


def parse_arguments(raw: str) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        args = json.loads(raw)
    except ValueError as exc:
        raise ToolInputError(
            f"the arguments are not valid JSON ({exc}); send a JSON object"
        ) from None
    if not isinstance(args, dict):
        raise ToolInputError("the arguments must be a JSON object")
    return args


def _str_arg(args: dict[str, Any], name: str, required: bool = True) -> str | None:
    value = args.get(name)
    if value is None:
        if required:
            raise ToolInputError(f"missing required argument {name!r}")
        return None
    if not isinstance(value, str):
        raise ToolInputError(f"argument {name!r} must be a string")
    return value


def _int_arg(value: Any, name: str) -> int:
    # Text-parsed calls deliver every parameter as a string.
    if isinstance(value, bool):
        raise ToolInputError(f"argument {name!r} must be an integer")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ToolInputError(f"argument {name!r} must be an integer") from None


def _lines(text: str) -> list[str]:
    # A final newline ends the last line; it does not start an empty one.
    return text.removesuffix("\n").split("\n")


def _numbered(lines: list[str], first: int) -> str:
    return "\n".join(f"{n:6d}\t{line}" for n, line in enumerate(lines, start=first))


async def read_answer_file(client: SandboxAPI) -> str | None:
    """The answer file's text, stripped; None when it is missing, unreadable or empty. A sandbox
    that fails altogether raises (SandboxError)."""
    try:
        found = await client.read_text(ANSWER_FILE, max_bytes=MAX_ANSWER_BYTES)
    except ExecServerError:
        return None
    return found.content.strip() or None


class ToolRunner:
    """Runs tool calls against one exec server; never raises for the model's mistakes."""

    def __init__(
        self,
        client: SandboxAPI,
        workspace: str,
        command_timeout: float,
        max_observation_bytes: int,
    ) -> None:
        self.client = client
        self.workspace = workspace
        self.command_timeout = command_timeout
        self.max_observation_bytes = max_observation_bytes

    def _abs(self, path: str) -> str:
        return path if path.startswith("/") else posixpath.join(self.workspace, path)

    async def run(self, name: str, raw_arguments: str, time_left: float) -> Observation:
        """Run one call; its text is what the model sees, within max_observation_bytes.
        A command's output is fitted stream by stream (`_bash`), so the cut keeps the exec
        server's count; every other text is cut here. SandboxError (the sandbox itself
        failing) propagates; all else is text."""
        obs = await self._run(name, raw_arguments, time_left)
        return dataclasses.replace(obs, text=cap_text(obs.text, self.max_observation_bytes))

    async def _run(self, name: str, raw_arguments: str, time_left: float) -> Observation:
        try:
            args = parse_arguments(raw_arguments)
            if name == "execute_bash":
                return await self._bash(args, time_left)
            if name == "str_replace_editor":
                return await self._editor(args)
            if name == "submit":
                answer = args.get("answer")
                if answer is not None and not isinstance(answer, str):
                    answer = json.dumps(answer)
                if answer is None and args.get("from_answer_file") is True:
                    # The bash format's `submit WORDS`: the words were written to the file.
                    answer = await read_answer_file(self.client)
                    if not answer:
                        return Observation(EMPTY_SUBMIT, ok=False, summary="empty answer")
                return Observation("Submitted.", ok=True, submitted=True, answer=answer)
            raise ToolInputError(f"unknown tool {name!r}; the tools are {', '.join(TOOL_NAMES)}")
        except ToolInputError as exc:
            return Observation(f"Error: {exc}", ok=False, summary=str(exc))
        except ExecServerError as exc:
            if not exc.model_can_fix:
                raise
            return Observation(f"Error: {exc.message}", ok=False, summary=exc.message)

    async def _bash(self, args: dict[str, Any], time_left: float) -> Observation:
        command = _str_arg(args, "command")
        assert command is not None
        if not command.strip():
            raise ToolInputError("argument 'command' is empty")
        timeout = max(1.0, min(self.command_timeout, time_left))
        started = time.monotonic()
        res = await self.client.exec(command, timeout, max_output_bytes=self.max_observation_bytes)
        parts = []
        if res.timed_out:
            parts.append(
                f"[the command was killed after {timeout:.0f}s (timeout); the shell was restarted "
                "with the working directory and exported variables from before this command]"
            )
        elif res.session_restarted:
            parts.append(f"[the shell exited with code {res.exit_code} and was restarted]")
        parts.append(f"[exit code {res.exit_code}]")
        stdout, stderr = self._fit_streams(res, parts)
        if stdout:
            parts.append(stdout)
        if stderr:
            parts.append("[stderr]\n" + stderr)
        if not res.stdout and not res.stderr:
            parts.append(NO_OUTPUT)
        summary = f"exit {res.exit_code} in {time.monotonic() - started:.1f}s"
        if res.timed_out:
            summary = f"timed out after {timeout:.0f}s"
        ok = res.exit_code == 0 and not res.timed_out
        return Observation("\n".join(parts), ok=ok, summary=summary)

    def _fit_streams(self, res: ExecResult, header: list[str]) -> tuple[str, str]:
        """stdout and stderr, runs of one line collapsed, cut so that the whole observation fits,
        each with one marker that counts what the exec server cut and what is cut here."""
        out = collapse_repeats(res.stdout.rstrip("\n"))
        err = collapse_repeats(res.stderr.rstrip("\n"))
        fixed = sum(len(p.encode()) + 1 for p in header) + len("[stderr]\n") + 2 * _MARKER_ROOM
        avail = max(0, self.max_observation_bytes - fixed)
        sizes = (len(out.encode()), len(err.encode()))
        out_room, err_room = stream_budgets(avail, sizes)
        return (
            cap_text(out, out_room, res.stdout_truncated_bytes),
            cap_text(err, err_room, res.stderr_truncated_bytes),
        )

    async def _editor(self, args: dict[str, Any]) -> Observation:
        command = _str_arg(args, "command")
        path = _str_arg(args, "path")
        assert command is not None
        assert path is not None
        path = self._abs(path)
        if command == "view":
            return await self._view(path, args.get("view_range"))
        if command == "create":
            text = _str_arg(args, "file_text")
            assert text is not None
            written = await self.client.write_text(path, text)
            return Observation(f"Wrote {written.size} bytes to {written.path}.", ok=True)
        if command == "str_replace":
            return await self._str_replace(path, args)
        if command == "insert":
            return await self._insert(path, args)
        raise ToolInputError(
            f"unknown editor command {command!r}; use view, create, str_replace or insert"
        )

    async def _read_whole(self, path: str) -> str:
        content = await self.client.read_text(path, max_bytes=_VIEW_MAX_BYTES)
        if content.truncated:
            raise ToolInputError(
                f"{path} is {content.size} bytes, too large to edit here; use a script instead"
            )
        return content.content

    async def _view(self, path: str, view_range: Any) -> Observation:
        try:
            if view_range is None:
                content = await self.client.read_text(path, max_bytes=self.max_observation_bytes)
                body = _numbered(_lines(content.content), 1)
                if content.truncated:
                    body += (
                        f"\n[file is {content.size} bytes; showing the start. "
                        "Use view_range or grep to see the rest]"
                    )
                return Observation(body, ok=True)
            if not isinstance(view_range, list) or len(view_range) != 2:
                raise ToolInputError("view_range must be [start_line, end_line]")
            start, end = (_int_arg(v, "view_range") for v in view_range)
            if start < 1 or (end != -1 and end < start):
                raise ToolInputError("view_range needs 1 <= start <= end, or end = -1")
            content = await self.client.read_text(path, start_line=start, end_line=end)
            return Observation(_numbered(_lines(content.content), start), ok=True)
        except ExecServerError as exc:
            if exc.code != "is_directory":
                raise
        listing = await self.client.list_dir(path, recursive=True, max_entries=500)
        lines = [
            e.path + ("/" if e.type == "dir" else "")
            for e in listing.entries
            if e.path.count("/") < 2 and not any(p.startswith(".") for p in e.path.split("/"))
        ]
        more = "\n[listing truncated]" if listing.truncated else ""
        body = f"{listing.path}/ (two levels, hidden files left out)\n" + "\n".join(lines) + more
        return Observation(body, ok=True)

    async def _str_replace(self, path: str, args: dict[str, Any]) -> Observation:
        old = _str_arg(args, "old_str")
        new = _str_arg(args, "new_str", required=False) or ""
        assert old is not None
        if not old:
            raise ToolInputError("old_str is empty")
        text = await self._read_whole(path)
        count = text.count(old)
        if count == 0:
            raise ToolInputError(f"old_str does not occur in {path}; nothing was replaced")
        if count > 1:
            lines = [n for n, line in enumerate(text.split("\n"), 1) if old.split("\n")[0] in line]
            raise ToolInputError(
                f"old_str occurs {count} times in {path} (lines {lines[:10]}); "
                "include more context so it is unique"
            )
        updated = text.replace(old, new, 1)
        await self.client.write_text(path, updated)
        line = text[: text.index(old)].count("\n") + 1
        return Observation(
            f"Edited {path}.\n" + self._snippet(updated, line, new.count("\n") + 1), ok=True
        )

    async def _insert(self, path: str, args: dict[str, Any]) -> Observation:
        new = _str_arg(args, "new_str")
        assert new is not None
        if "insert_line" not in args:
            raise ToolInputError("missing required argument 'insert_line'")
        at = _int_arg(args["insert_line"], "insert_line")
        text = await self._read_whole(path)
        lines = text.split("\n")
        if not 0 <= at <= len(lines):
            raise ToolInputError(f"insert_line must be between 0 and {len(lines)}")
        new_lines = new.split("\n")
        updated = "\n".join(lines[:at] + new_lines + lines[at:])
        await self.client.write_text(path, updated)
        return Observation(
            f"Inserted into {path}.\n" + self._snippet(updated, at + 1, len(new_lines)), ok=True
        )

    def _snippet(self, text: str, first_line: int, count: int) -> str:
        lines = text.split("\n")
        start = max(1, first_line - _SNIPPET_CONTEXT)
        end = min(len(lines), first_line + count - 1 + _SNIPPET_CONTEXT)
        return _numbered(lines[start - 1 : end], start)
