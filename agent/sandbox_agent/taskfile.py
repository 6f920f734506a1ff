"""Reading task files: the one YAML loader for SandboxTask documents."""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import TaskSpecError
from .task import SandboxTask, SandboxTaskSpec, parse_task

MAX_TASK_FILE_BYTES = 8 * 1024 * 1024


def load_task_file(path: Path) -> SandboxTask:
    """Parse and validate one task file; every error names the file and, where it can, the field."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise TaskSpecError(f"{path}: no such task file") from None
    except OSError as exc:
        raise TaskSpecError(f"{path}: cannot read the task file ({exc.strerror})") from None
    if size > MAX_TASK_FILE_BYTES:
        raise TaskSpecError(f"{path}: {size} bytes is too large for a task file")
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except UnicodeDecodeError:
        raise TaskSpecError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise TaskSpecError(f"{path}: invalid YAML: {exc}") from None
    if len(docs) != 1:
        raise TaskSpecError(f"{path}: expected exactly one YAML document, found {len(docs)}")
    try:
        return parse_task(docs[0])
    except TaskSpecError as exc:
        raise TaskSpecError(f"{path}: invalid SandboxTask:\n{exc}") from None


def task_from_prompt(prompt: str) -> SandboxTask:
    return SandboxTask(spec=SandboxTaskSpec(prompt=prompt))
