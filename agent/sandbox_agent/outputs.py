"""Copy the sandbox's /workspace/output to a host directory without trusting the exec server.

The listing and every byte come from inside the sandbox, where model-written code may have
replaced the exec server. So each path must be a plain relative path (no `..`, no absolute
path, no empty or control-character component), each file is created beneath the destination
through directory file descriptors with O_NOFOLLOW (a symlink or a rename race cannot redirect
a write), never over an existing file, and the count, per-file and total sizes are capped here,
whatever the server claims. A path no honest exec server would send ends the collection with
UnsafeOutputError: the sandbox is then treated as compromised.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .errors import ExecServerError, SandboxError
from .events import Event, EventSink, Notice, ignore
from .result import ExitReason, OutputFile, Phase, TaskResult
from .wire import OUTPUT_DIR

if TYPE_CHECKING:  # the operator imports the caps from here, and needs no HTTP client
    from .execclient import ExecClient

MIB = 1024 * 1024
# The result names at most this many of the files it skipped (over a cap, unreadable).
MAX_NOTED_SKIPS = 50
# Written by the agent so that output/ exists from the start; never collected.
KEEP_FILE = ".keep"
_MAX_PATH_BYTES = 4096
_MAX_NAME_BYTES = 255
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class OutputCaps:
    """How much of a sandbox's output a run keeps."""

    max_files: int = 1000
    max_file_bytes: int = 64 * MIB
    max_total_bytes: int = 256 * MIB


DEFAULT_CAPS = OutputCaps()


class UnsafeOutputError(SandboxError):
    """The exec server named an output path that could leave the output directory."""


# TaskResult.cause when the sandbox showed it no longer runs our exec server.
SANDBOX_COMPROMISED = "SandboxCompromised"


def compromised(result: TaskResult, exc: UnsafeOutputError) -> TaskResult:
    """The run's result once its sandbox proved hostile: failed, whatever it answered, since a
    replaced exec server may also have faked what the model saw."""
    return result.model_copy(
        update={
            "phase": Phase.FAILED,
            "exit_reason": ExitReason.SANDBOX_ERROR,
            "cause": SANDBOX_COMPROMISED,
            "message": str(exc),
        }
    )


def checked_path(name: str) -> PurePosixPath:
    """`name` as a relative path of plain components; UnsafeOutputError otherwise."""

    def refuse(why: str) -> UnsafeOutputError:
        return UnsafeOutputError(
            f"the sandbox's exec server named the output file {name!r}, which {why}; no honest "
            "exec server does, so the sandbox is treated as compromised and nothing more is "
            "collected from it"
        )

    if not name:
        raise refuse("is empty")
    if len(name.encode("utf-8", "surrogateescape")) > _MAX_PATH_BYTES:
        raise refuse(f"is longer than {_MAX_PATH_BYTES} bytes")
    if name.startswith("/"):
        raise refuse("is absolute")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise refuse("is not a plain relative path (empty, '.' or '..' component)")
        if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in part):
            raise refuse("contains control characters")
        if len(part.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
            raise refuse(f"has a component longer than {_MAX_NAME_BYTES} bytes")
    return PurePosixPath(*parts)


class ConfinedDir:
    """Creates files beneath one directory, refusing anything that would resolve elsewhere."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self._root_fd = os.open(root, _DIR_FLAGS)
        self.root = root

    def close(self) -> None:
        os.close(self._root_fd)

    def __enter__(self) -> ConfinedDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write_new(self, rel: PurePosixPath, data: bytes) -> None:
        """Create `rel` (parents as needed) holding `data`; never follows or replaces anything."""
        *dirs, name = rel.parts
        with self._parent(dirs, rel) as parent:
            try:
                fd = os.open(name, _FILE_FLAGS, 0o644, dir_fd=parent)
            except FileExistsError:
                raise UnsafeOutputError(
                    f"the sandbox's exec server listed the output file {str(rel)!r} twice "
                    "(or as both a file and a directory); the sandbox is treated as compromised"
                ) from None
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)

    @contextlib.contextmanager
    def _parent(self, dirs: list[str], rel: PurePosixPath) -> Iterator[int]:
        fds: list[int] = []
        current = self._root_fd
        try:
            for part in dirs:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=current)
                try:
                    current = os.open(part, _DIR_FLAGS, dir_fd=current)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafeOutputError(
                            f"the sandbox's exec server listed {str(rel)!r} below something that "
                            "is not a directory; the sandbox is treated as compromised"
                        ) from None
                    raise
                fds.append(current)
            yield current
        finally:
            for fd in fds:
                os.close(fd)


async def collect_outputs(
    client: ExecClient,
    dest: Path | None,
    caps: OutputCaps = DEFAULT_CAPS,
    on_event: EventSink = ignore,
) -> list[OutputFile]:
    """The files in the sandbox's output/, copied beneath `dest` (or only listed when None).

    Raises UnsafeOutputError on a path no honest exec server sends, SandboxError when the
    sandbox cannot be read; files over a cap are skipped with a Notice.
    """
    listing = await client.list_dir(OUTPUT_DIR, recursive=True, max_entries=caps.max_files + 1)
    files = [(checked_path(e.path), e.size) for e in listing.entries if e.type == "file"]
    files = [(rel, size) for rel, size in files if str(rel) != KEEP_FILE]
    if len(files) > caps.max_files or listing.truncated:
        on_event(Notice(f"output/ holds more than {caps.max_files} files; only the first are kept"))
        files = files[: caps.max_files]
    if dest is None:
        return [OutputFile(path=str(rel), bytes=size) for rel, size in files]
    outputs: list[OutputFile] = []
    total = 0
    with ConfinedDir(dest) as out:
        for rel, claimed in files:
            budget = min(caps.max_file_bytes, caps.max_total_bytes - total)
            if budget <= 0 or claimed > budget:
                on_event(Notice(_skipped(rel, claimed, caps, total)))
                continue
            try:
                got = await client.read_bytes(f"{OUTPUT_DIR}/{rel}", budget)
            except ExecServerError as exc:
                if not exc.model_can_fix:
                    raise
                # Removed, or unreadable, between the listing and the read.
                on_event(Notice(f"output/{rel} not collected: {exc.message}"))
                continue
            if got.truncated:
                on_event(Notice(_skipped(rel, max(got.size, budget + 1), caps, total)))
                continue
            out.write_new(rel, got.data)
            total += len(got.data)
            outputs.append(OutputFile(path=str(rel), bytes=len(got.data)))
    return outputs


async def with_outputs(
    result: TaskResult,
    client: ExecClient,
    dest: Path | None,
    on_event: EventSink = ignore,
    caps: OutputCaps = DEFAULT_CAPS,
) -> TaskResult:
    """`result` with the sandbox's output files collected into `dest`: failed as compromised
    when the exec server names an unsafe path, as it was (with a Notice) when the sandbox can no
    longer be read."""
    not_collected: list[str] = []

    def note(event: Event) -> None:
        if isinstance(event, Notice) and len(not_collected) < MAX_NOTED_SKIPS:
            not_collected.append(event.message)
        on_event(event)

    try:
        result.outputs = await collect_outputs(client, dest, caps, note)
        result.outputs_not_collected = not_collected
    except UnsafeOutputError as exc:
        return compromised(result, exc)
    except SandboxError as exc:
        on_event(Notice(f"collecting output files failed: {exc}"))
    return result


def _skipped(rel: PurePosixPath, size: int, caps: OutputCaps, total: int) -> str:
    if size > caps.max_file_bytes:
        return (
            f"output/{rel} not collected: {size} bytes, over the {caps.max_file_bytes}-byte "
            "limit per file"
        )
    return (
        f"output/{rel} not collected: {size} bytes would pass the {caps.max_total_bytes}-byte "
        f"limit for all outputs ({total} bytes kept so far)"
    )
