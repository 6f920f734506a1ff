"""bench/real_model.py's problems: every expected answer is what its reference solution computes
from the inputs, and grading is strict (only space, quotes, a final full stop and, for numbers,
thousands separators are forgiven)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from real_model_problems import PROBLEMS, Problem, is_right  # noqa: E402


def test_every_expected_answer_is_what_the_reference_solution_gives() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "real_model.py"), "--check"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"{len(PROBLEMS)} problems: every expected answer checks out"
    assert len(PROBLEMS) >= 20
    assert {p.kind for p in PROBLEMS} == {"compute", "file", "format"}


def by_id(name: str) -> Problem:
    return next(p for p in PROBLEMS if p.id == name)


def test_grading_forgives_only_presentation() -> None:
    number = by_id("fibonacci-90")
    assert is_right(number, " 2,880,067,194,370,816,120. ")
    assert is_right(number, "`2880067194370816120`")
    assert not is_right(number, "The answer is 2880067194370816120")
    assert not is_right(number, None)
    text = by_id("reversed-upper")
    assert is_right(text, '"ROTAREPO-XOBDNAS"')
    assert not is_right(text, "rotarepo-xobdnas")  # the format asked for is the answer
    digits = by_id("last-six-digits")
    assert not is_right(digits, "979,207")  # six digits, not a number with a separator
