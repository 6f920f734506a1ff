"""Keep a secret out of this process's /proc/PID/environ, which other processes of its user read."""

from __future__ import annotations

import contextlib
import ctypes
import sys


def hide_from_environ(name: str) -> bool:
    """Blank `name`'s value in this process's original environment block, the bytes
    /proc/PID/environ (and `ps e`) show to every process of the same user, such as a command in
    the process backend. os.environ keeps its copy. True if a value was blanked."""
    if sys.platform != "linux":
        return False
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        # Fields 50 and 51 of /proc/PID/stat (env_start, env_end); the split starts at field 3.
        start, end = int(fields[47]), int(fields[48])
    except (OSError, IndexError, ValueError):
        return False
    if not 0 < start < end:
        return False
    block = ctypes.string_at(start, end - start)
    prefix = name.encode() + b"="
    found = False
    pos = 0
    for entry in block.split(b"\0"):
        if entry.startswith(prefix) and len(entry) > len(prefix):
            with contextlib.suppress(OSError, ValueError):
                ctypes.memset(start + pos + len(prefix), ord("x"), len(entry) - len(prefix))
                found = True
        pos += len(entry) + 1
    return found
