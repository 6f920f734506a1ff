"""Local batch throughput: one SandboxTaskSet of N items run by `sandboxctl batch`'s code (the
Python API's run_set) at several --parallel values, against a scripted model that answers every
call after a fixed delay. The work is waiting on the model, so throughput should grow with the
parallelism until this machine's CPUs are the limit.

    python bench/batch_local.py [--items 200] [--delay 0.5] [--steps 4] [--parallel 1,8,32]
                                [--backend auto]

Each item is a short agentic task: the model runs `--steps - 1` commands in the sandbox (python3
computing the sum), then submits; every call takes `--delay`. `--steps 1` (submit at once) is the
worst case for the sandbox's own cost, which is then paid for a single model call.

Target (issue 14): items/s at --parallel 32 >= 20x items/s at --parallel 1, on a 2-core machine.
The scripted model runs in its own process, so that its threads do not share the batch's GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the scripted LLM server lives with the tests
sys.path.insert(0, str(REPO / "bench"))

from llmserver import MODEL_ID, Reply, ScriptedLLMServer, slow, tool_call  # noqa: E402
from model_process import model_process  # noqa: E402
from sandbox_agent.api import run_set  # noqa: E402
from sandbox_agent.runner import RunOptions  # noqa: E402

TARGET_RATIO = 20.0


def serve(delay: float, steps: int, conn: Connection) -> None:
    """The scripted model: `What is A + B?` computed with python3 in the sandbox (steps - 1
    commands), then submitted right; every call answered after `delay` seconds."""

    def answer(request: dict[str, Any]) -> Reply:
        messages = request["messages"]
        user = next(m["content"] for m in messages if m["role"] == "user")
        a, b = map(int, re.findall(r"What is (\d+) \+ (\d+)", user)[0])
        done = sum(1 for m in messages if m["role"] == "assistant")
        if done < steps - 1:
            command = f"python3 -c 'print({a} + {b})'"
            return slow(delay, tool_call("execute_bash", {"command": command}))
        return slow(delay, tool_call("submit", {"answer": str(a + b)}))

    with ScriptedLLMServer() as server:
        server.set_default(answer)
        conn.send(server.base_url)
        conn.recv()  # until the benchmark is done


def write_set(directory: Path, items: int) -> Path:
    lines = [
        json.dumps({"id": f"q{i}", "problem_statement": f"What is {i} + 7?", "ground_truth": i + 7})
        for i in range(items)
    ]
    (directory / "items.jsonl").write_text("\n".join(lines) + "\n")
    doc = {
        "apiVersion": "llmsandbox.io/v1alpha1",
        "kind": "SandboxTaskSet",
        "metadata": {"name": "bench"},
        "spec": {
            "template": {"limits": {"maxSteps": 20}},
            "itemsFrom": {"file": "items.jsonl"},
            "grader": {"type": "numeric"},
        },
    }
    path = directory / "set.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


@dataclass(frozen=True)
class Measured:
    parallel: int
    seconds: float
    finished: int
    accuracy: float | None

    @property
    def rate(self) -> float:
        return self.finished / self.seconds


async def measure(set_file: Path, out: Path, parallel: int, opts: RunOptions) -> Measured:
    started = time.perf_counter()
    outcome = await run_set(set_file, out, opts, parallel=parallel)
    seconds = time.perf_counter() - started
    return Measured(parallel, seconds, outcome.summary.finished, outcome.summary.accuracy)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.5, help="seconds the model takes per call")
    parser.add_argument(
        "--steps", type=int, default=4, help="model calls per item (the last submits)"
    )
    parser.add_argument("--parallel", default="1,8,32", help="comma-separated --parallel values")
    parser.add_argument("--backend", default="auto", help="bwrap, docker, process or auto")
    args = parser.parse_args()
    levels = [int(p) for p in args.parallel.split(",")]
    results: list[Measured] = []
    with (
        model_process(serve, args.delay, args.steps) as (base_url, _),
        tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp,
    ):
        root = Path(tmp)
        set_file = write_set(root, args.items)
        opts = RunOptions(backend=args.backend, base_url=base_url, model=MODEL_ID, api_key="k")
        for parallel in levels:
            found = asyncio.run(measure(set_file, root / f"out-{parallel}", parallel, opts))
            results.append(found)
            print(
                f"--parallel {parallel:>3}: {found.finished} items in {found.seconds:6.1f}s "
                f"= {found.rate:6.2f} items/s",
                file=sys.stderr,
                flush=True,
            )
    return report(results, args)


def report(results: list[Measured], args: argparse.Namespace) -> int:
    base = results[0]
    print(
        f"\n{args.items} items, {args.steps} model calls each at {args.delay * 1000:.0f} ms, "
        f"backend {args.backend}"
    )
    print(
        f"{'parallel':>8}  {'seconds':>8}  {'items/s':>8}  {'vs ' + str(base.parallel):>8}  accuracy"
    )
    for m in results:
        accuracy = "-" if m.accuracy is None else f"{100 * m.accuracy:.1f}%"
        print(
            f"{m.parallel:>8}  {m.seconds:>8.1f}  {m.rate:>8.2f}  {m.rate / base.rate:>7.1f}x  {accuracy}"
        )
    top = max(results, key=lambda m: m.parallel)
    if base.parallel != 1 or top.parallel < 32:
        return 0
    ratio = top.rate / base.rate
    verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
    print(
        f"target: items/s at --parallel {top.parallel} >= {TARGET_RATIO:.0f}x at 1: {ratio:.1f}x, {verdict}"
    )
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
