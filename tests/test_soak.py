"""bench/soak.py works: a short soak (40 tasks, every fault kind) passes its own verification."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_short_soak_verifies_every_task_and_reports_memory() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "soak.py"),
            "--tasks",
            "40",
            "--wave",
            "20",
            "--seed",
            "3",
            "--no-memory-verdict",  # two waves of 20: the growth figure is noise
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "verification: " in out, out
    assert "no task with two live pods: OK" in out, out
    assert "memory growth over the second half" in out, out
    assert "Failed image_pull_error" in out or "Failed oom_killed" in out, out
