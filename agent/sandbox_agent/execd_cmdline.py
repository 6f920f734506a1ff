"""The exec server's command line, built in one place for the bwrap, docker and process backends
and the pod's sandbox container. The options are execd.py's own (see its USAGE)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .wire import WORKSPACE

# uid, gid
Ids = tuple[int, int]

# The exec server's files in a run directory, for sandboxes that hand them over as paths.
SOCKET_FILE = "execd.sock"
TOKEN_FILE = "token"  # noqa: S105 - a file name
READY_FILE = "ready.json"


@dataclass(frozen=True)
class InheritedFds:
    """The listening socket, the token and the ready report as descriptors the server inherits."""

    listen: int
    token: int
    ready: int

    def args(self) -> list[str]:
        return [
            "--listen-fd", str(self.listen),
            "--token-fd", str(self.token),
            "--ready-fd", str(self.ready),
        ]  # fmt: skip


@dataclass(frozen=True)
class RunDirFiles:
    """The socket, the token and the ready report as files in a directory (as the sandbox sees
    it) that the commands cannot enter."""

    directory: str

    def args(self) -> list[str]:
        return [
            "--unix-socket", f"{self.directory}/{SOCKET_FILE}",
            "--token-file", f"{self.directory}/{TOKEN_FILE}",
            "--ready-file", f"{self.directory}/{READY_FILE}",
        ]  # fmt: skip


def execd_cmdline(
    program: Sequence[str],
    root: str,
    hand_off: InheritedFds | RunDirFiles,
    *,
    drop_to: Ids | None = None,
    command_user: Ids | None = None,
    python: str = "python3",
) -> list[str]:
    """`python -I -S PROGRAM --root ROOT [--drop-to] [--command-user] HAND-OFF`.

    `program` is the server's file, or `-c CODE` that imports it; -I -S keep the interpreter from
    reading the environment and site packages. `drop_to` is the uid the server leaves root for,
    `command_user` the one its commands run as."""
    argv = [python, "-I", "-S", *program, "--root", root]
    if drop_to is not None:
        argv += ["--drop-to", _ids(drop_to)]
    if command_user is not None:
        argv += ["--command-user", _ids(command_user)]
    return [*argv, *hand_off.args()]


def _ids(ids: Ids) -> str:
    return f"{ids[0]}:{ids[1]}"


PRIVATE_DIR = "private"
"""The pod's run volume holds the exec server's token, socket and ready file in this folder."""


def execd_command(
    execd: str,
    run_dir: str,
    workspace: str = WORKSPACE,
    users: tuple[Ids, Ids] | None = None,
) -> list[str]:
    """A pod's sandbox container command: the exec server on the private run directory.

    `users` is (server, commands): the container then starts as root, the server drops to the
    first (the agent's uid, which owns private/) and runs commands as the second."""
    server, commands = users if users is not None else (None, None)
    files = RunDirFiles(f"{run_dir}/{PRIVATE_DIR}")
    return execd_cmdline([execd], workspace, files, drop_to=server, command_user=commands)
