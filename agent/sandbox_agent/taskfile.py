"""Reading task files: the one YAML loader for SandboxTask documents."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml

from .errors import TaskSpecError
from .task import SandboxTask, SandboxTaskSpec, parse_task

MAX_TASK_FILE_BYTES = 8 * 1024 * 1024
T = TypeVar("T")


def load_task_file(path: Path) -> SandboxTask:
    """Parse and validate one task file; every error names the file and, where it can, the field."""
    return load_file(path, parse_task, "task", "SandboxTask")


def load_file(path: Path, parse: Callable[[object], T], what: str, kind: str) -> T:
    """One `what` file (a task, a set) read and parsed as `kind`; errors name the file."""
    return parse_read(path, read_document(path, what), parse, kind)


def parse_read(path: Path, document: object, parse: Callable[[object], T], kind: str) -> T:
    """The document read from `path` parsed as `kind`; errors name the file."""
    try:
        return parse(document)
    except TaskSpecError as exc:
        raise TaskSpecError(f"{path}: invalid {kind}:\n{exc}") from None


def read_document(path: Path, what: str) -> object:
    """The one YAML document of a task (or set) file; errors name the file."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise TaskSpecError(f"{path}: no such {what} file") from None
    except OSError as exc:
        raise TaskSpecError(f"{path}: cannot read the {what} file ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise TaskSpecError(f"{path}: is a directory; give the {what}'s YAML file")
    if info.st_size > MAX_TASK_FILE_BYTES:
        raise TaskSpecError(f"{path}: {info.st_size} bytes is too large for a {what} file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TaskSpecError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise TaskSpecError(f"{path}: cannot read the {what} file ({exc.strerror})") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise TaskSpecError(f"{path}: invalid YAML: {exc}") from None
    if len(docs) != 1:
        raise TaskSpecError(f"{path}: expected exactly one YAML document, found {len(docs)}")
    return docs[0]


def task_from_prompt(prompt: str) -> SandboxTask:
    return SandboxTask(spec=SandboxTaskSpec(prompt=prompt))


def input_source(task_dir: Path, file: str) -> Path:
    """Where a `file:` input is read from: relative to the task file, `~` expanded."""
    return (task_dir / file).expanduser()


def missing_input_files(task: SandboxTask, task_dir: Path) -> list[str]:
    """One line for each `file:` input that does not exist."""
    return [
        f"spec.inputs[{i}].file: {input_source(task_dir, item.file)} does not exist"
        for i, item in enumerate(task.spec.inputs)
        if item.file is not None and not input_source(task_dir, item.file).exists()
    ]
