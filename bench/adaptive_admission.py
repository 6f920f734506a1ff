"""Adaptive admission against an endpoint at capacity: the same tasks, the same throttling
endpoint, run twice in one run — with the operator's cap fixed above what the endpoint serves,
and with adaptive admission learning the endpoint's capacity from the 429s its agents report.

    python bench/adaptive_admission.py [--tasks 40] [--capacity 2] [--cap 12] [--call 2.0]

The real operator (a process of its own) on the emulated API server, real pods (the real agent
and exec server, run by the test kubelet) and the scripted LLM server, which serves `--capacity`
chat requests at once and answers 429 (retry-after-ms 500) beyond that. Each task makes three
calls of `--call` seconds (two commands, then its answer).

Printed: wall time, 429s the endpoint gave, LLM retries the agents made, and the ratio of
retries without adaptation to retries with it (target: above 1, fewer with adaptation), with the
limit the operator learnt. Exit status 1 when adaptation did not reduce the retries.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from k8s.emulator import EmulatedApiServer  # noqa: E402
from k8s.kubelet import TestKubelet, bwrap_usable  # noqa: E402
from k8s.process import OperatorProcess, free_port  # noqa: E402
from llmserver import ScriptedLLMServer, slow, tool_call  # noqa: E402
from test_operator import operator_env, secret, task  # noqa: E402
from test_operator_metrics import scrape, value  # noqa: E402

TERMINAL = {"Succeeded", "Failed", "Cancelled"}


@dataclass(frozen=True)
class Run:
    adaptive: bool
    seconds: float
    succeeded: int
    throttled: int  # 429s the endpoint gave
    retries: int  # LLM retries the agents reported
    learnt: float | None  # the operator's limit for the endpoint at the end


def three_calls(seconds: float) -> Any:
    def reply(request: dict[str, Any]) -> Any:
        done = sum(1 for m in request["messages"] if m["role"] == "assistant")
        if done < 2:
            return slow(seconds, tool_call("execute_bash", {"command": "echo working"}))
        return slow(seconds, tool_call("submit", {"answer": "done"}))

    return reply


def run(adaptive: bool, args: argparse.Namespace, log_dir: Path) -> Run:
    with (
        EmulatedApiServer() as k8s,
        TestKubelet(k8s),
        ScriptedLLMServer() as llm,
        (log_dir / f"operator-{adaptive}.log").open("wb") as log,
    ):
        llm.set_default(three_calls(args.call))
        llm.throttle(args.capacity, retry_after_ms=500)
        k8s.create(secret())
        port = free_port()
        env = operator_env(
            llm,
            LLMSANDBOX_MAX_RUNNING_TASKS=str(args.cap),
            LLMSANDBOX_ADAPTIVE_ADMISSION=str(adaptive).lower(),
            LLMSANDBOX_METRICS_PORT=str(port),
        )
        op = OperatorProcess(k8s, env, log).start()
        try:
            started = time.perf_counter()
            for i in range(args.tasks):
                limits = {"maxLlmRetries": 100, "activeDeadlineSeconds": 900}
                k8s.create(task(f"t{i:03d}", limits=limits))
            k8s.wait_for(
                lambda: sum(1 for s in statuses(k8s) if s.get("phase") in TERMINAL) == args.tasks,
                timeout=1800,
                message="every task to finish",
            )
            seconds = time.perf_counter() - started
            families = scrape(port)
        finally:
            op.stop()
        done = statuses(k8s)
        endpoint = f"scripted-model @ {llm.base_url}"
        samples = families.get("llmsandbox_endpoint_admission_limit", [])
        learnt = value(samples, "llmsandbox_endpoint_admission_limit", endpoint=endpoint)
        return Run(
            adaptive=adaptive,
            seconds=seconds,
            succeeded=sum(1 for s in done if s.get("phase") == "Succeeded"),
            throttled=llm.throttled,
            retries=sum(int((s.get("usage") or {}).get("llmRetries", 0)) for s in done),
            learnt=learnt if samples else None,
        )


def statuses(k8s: EmulatedApiServer) -> list[dict[str, Any]]:
    return [dict(t.get("status") or {}) for t in k8s.list("sandboxtasks", "default")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--capacity", type=int, default=2, help="chat requests served at once")
    parser.add_argument("--cap", type=int, default=12, help="the operator's maxRunningTasks")
    parser.add_argument("--call", type=float, default=2.0, help="seconds per answered call")
    args = parser.parse_args()
    if not bwrap_usable():
        print("bubblewrap cannot build the pod sandboxes here", file=sys.stderr)
        return 2
    results: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="adaptive-bench-") as tmp:
        for adaptive in (False, True):
            found = run(adaptive, args, Path(tmp))
            results.append(found)
            print(
                f"adaptive={str(adaptive).lower():5}: {found.succeeded}/{args.tasks} succeeded "
                f"in {found.seconds:.1f}s, {found.throttled} 429s, {found.retries} retries",
                file=sys.stderr,
                flush=True,
            )
    fixed, learning = results
    print(
        f"\n{args.tasks} tasks, 3 calls of {args.call:g}s each, endpoint capacity {args.capacity} "
        f"requests, maxRunningTasks {args.cap}"
    )
    print(f"{'admission':<10} {'seconds':>8} {'succeeded':>10} {'429s':>6} {'retries':>8}  limit")
    for r in results:
        limit = "-" if r.learnt is None else f"{r.learnt:g}"
        name = "adaptive" if r.adaptive else "fixed"
        print(
            f"{name:<10} {r.seconds:>8.1f} {r.succeeded:>10} {r.throttled:>6} {r.retries:>8}  {limit}"
        )
    ratio = fixed.retries / max(1, learning.retries)
    verdict = "fewer with adaptation" if learning.retries < fixed.retries else "NOT fewer"
    print(f"retries fixed / adaptive: {ratio:.1f}x ({verdict})")
    return 0 if learning.retries < fixed.retries else 1


if __name__ == "__main__":
    sys.exit(main())
