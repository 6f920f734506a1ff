"""Text from a sandbox or a model made safe for a terminal: control characters shown, not obeyed.

Answers, commands, observations and error messages come from model-written code and can carry
escape sequences (OSC 52 writes the clipboard, CSI moves the cursor or clears the screen, OSC 0
sets the window title, a bare carriage return overwrites the line) and bidirectional overrides
that reorder what is shown. Every such character is printed as a visible escape instead; tabs
and newlines are kept.
"""

from __future__ import annotations

import re

# C0 controls but tab and newline, DEL, C1 controls, and the bidirectional formatting characters.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def for_terminal(text: str) -> str:
    """`text` with every character that a terminal would act on spelled out, e.g. ESC as \\x1b."""
    return _UNSAFE.sub(_escape, text)
