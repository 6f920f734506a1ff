"""The exec server's command line as every sandbox builds it, read back by the server's own parser."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox_agent import execd
from sandbox_agent.execd_cmdline import Ids, InheritedFds, RunDirFiles, execd_cmdline


@pytest.mark.parametrize(
    ("hand_off", "drop_to", "command_user", "expected"),
    [
        pytest.param(
            InheritedFds(listen=3, token=4, ready=5),
            None,
            None,
            {"listen_fd": 3, "token_fd": 4, "ready_fd": 5, "unix_socket": None},
            id="descriptors-one-uid",
        ),
        pytest.param(
            InheritedFds(listen=7, token=8, ready=9),
            None,
            (1000, 1000),
            {"listen_fd": 7, "command_user": (1000, 1000), "drop_to": None},
            id="descriptors-commands-as-another-uid",
        ),
        pytest.param(
            RunDirFiles("/run/execd/private"),
            (65532, 65532),
            (65534, 65534),
            {
                "unix_socket": "/run/execd/private/execd.sock",
                "token_file": "/run/execd/private/token",
                "ready_file": "/run/execd/private/ready.json",
                "drop_to": (65532, 65532),
                "command_user": (65534, 65534),
                "listen_fd": None,
            },
            id="files-dropping-from-root",
        ),
    ],
)
def test_the_exec_server_reads_back_what_the_command_line_asks_for(
    hand_off: InheritedFds | RunDirFiles,
    drop_to: Ids | None,
    command_user: Ids | None,
    expected: dict[str, Any],
) -> None:
    argv = execd_cmdline(
        ["/opt/execd.py"], "/workspace", hand_off, drop_to=drop_to, command_user=command_user
    )
    assert argv[:4] == ["python3", "-I", "-S", "/opt/execd.py"]
    options = execd.parse_args(argv[4:])
    assert options.root == "/workspace"
    assert {name: getattr(options, name) for name in expected} == expected


def test_a_launcher_program_and_another_interpreter_come_first() -> None:
    argv = execd_cmdline(
        ["-c", "import execd"], "/ws", InheritedFds(3, 4, 5), python="/usr/bin/python3.11"
    )
    assert argv[:5] == ["/usr/bin/python3.11", "-I", "-S", "-c", "import execd"]
    assert execd.parse_args(argv[5:]).root == "/ws"
