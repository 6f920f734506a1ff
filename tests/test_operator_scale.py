"""bench/operator_scale.py works: a short run of both modes verifies every task, counts the
writes of each path, and prints the memory table (the 10,000-task figures are in
docs/benchmarks.md; at this size the memory figures are noise, so they are not judged)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.emulator


def test_a_short_scale_run_verifies_every_task_and_holds_the_writes_target() -> None:
    argv = [
        sys.executable, str(REPO / "bench" / "operator_scale.py"),
        "--tasks", "120", "--backlog", "40", "--max-running", "10",
        "--warmup", "40", "--sample-every", "20", "--no-memory-verdict",
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "verification: every task Succeeded exactly once with one pod in ttl0, keep: OK" in out
    # Admitted at once: pod, Pending, Succeeded (+ the TTL delete); queued first: + Queued.
    assert "admitted at once      10 tasks, mean 4.00 (4: 10 tasks)" in out, out
    assert "admitted at once      10 tasks, mean 3.00 (3: 10 tasks)" in out, out
    assert "PASS  ttl0: writes per task on the path 5.00 at most <= 4 + 1 delete" in out, out
    assert "PASS  keep: writes per task on the path 4.00 at most <= 4" in out, out
    assert "----  ttl0: operator RSS after 120 tasks" in out, out
    assert "RSS (MiB) by finished tasks:" in out
