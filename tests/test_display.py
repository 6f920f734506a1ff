"""Text from a sandbox reaches a terminal with its control characters shown, not obeyed."""

from __future__ import annotations

import pytest

from sandbox_agent.display import for_terminal


@pytest.mark.parametrize(
    ("hostile", "shown"),
    [
        ("\x1b]52;c;cHduZWQ=\x07", "\\x1b]52;c;cHduZWQ=\\x07"),  # OSC 52: write the clipboard
        ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),  # clear the screen, cursor home
        ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),  # window title
        ("42\rfake answer", "42\\x0dfake answer"),  # overwrite the line
        ("\x9b31m", "\\x9b31m"),  # C1 CSI
        ("abc\u202edcba", "abc\\u202edcba"),  # right-to-left override
        ("\x00\x7f\x08", "\\x00\\x7f\\x08"),
    ],
)
def test_control_characters_are_spelled_out(hostile: str, shown: str) -> None:
    assert for_terminal(hostile) == shown


def test_ordinary_text_tabs_newlines_and_other_scripts_pass_unchanged() -> None:
    text = "x = 42\n\tÄnswer: 答え, π ≈ 3.14159 ✓"
    assert for_terminal(text) == text
