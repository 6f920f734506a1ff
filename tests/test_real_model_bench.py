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


def test_the_proxy_counts_a_reply_still_in_flight_for_the_run_that_asked_and_waits_for_it() -> None:
    # A run killed on its timeout leaves the server writing a reply nobody reads: the next
    # run must not start while it does, nor be charged for its tokens.
    import http.server
    import json
    import threading
    import urllib.request

    from real_model import CountingProxy

    release = threading.Event()

    class Slow(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return None

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            release.wait(30)
            body = json.dumps({"usage": {"prompt_tokens": 7, "completion_tokens": 5}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    proxy = CountingProxy(f"http://127.0.0.1:{upstream.server_address[1]}/v1")
    try:
        asked = threading.Thread(
            target=lambda: urllib.request.urlopen(
                urllib.request.Request(f"{proxy.url}/chat/completions", b"{}", method="POST"),
                timeout=30,
            ).read()
        )
        asked.start()
        while proxy.busy == 0:
            threading.Event().wait(0.01)
        taken: list[tuple[int, int]] = []
        taker = threading.Thread(target=lambda: taken.append(proxy.take()))
        taker.start()
        taker.join(0.3)
        assert taken == []  # still waiting for the reply in flight
        release.set()
        taker.join(30)
        asked.join(30)
        assert taken == [(7, 5)]
        assert proxy.take() == (0, 0)
    finally:
        proxy.close()
        upstream.shutdown()
        upstream.server_close()


def test_the_summary_says_when_a_runs_steps_are_not_known() -> None:
    from real_model import Run, summary

    runs = [
        Run("llm-in-sandbox", "weekday", False, None, "timeout", None, 300.0, 10, 2),
        Run("llm-in-sandbox", "vault-code", False, None, "completed, no answer", 8, 140.0, 5, 1),
    ]
    lines = summary(runs, ["llm-in-sandbox"], [by_id("weekday"), by_id("vault-code")])
    assert lines[1].split()[:3] == ["llm-in-sandbox", "0/2", "8.0*"]
    assert lines[2].startswith("* steps: the mean of the runs that left a record")
    assert "wrong (?)" in next(line for line in lines if line.startswith("weekday"))
    assert "wrong (8)" in next(line for line in lines if line.startswith("vault-code"))
