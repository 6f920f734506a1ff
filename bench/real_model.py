"""Our tool-call formats against the LLM-in-Sandbox package on a real model: the problems of
bench/real_model_problems.py (20: code-needing arithmetic and counting, a fact in a long input
file, a strict output format), each run with a local model served by llama.cpp on this machine,
through `sandboxctl run` in each format asked for and, when given, through the package's own
`llm-in-sandbox run` (Docker), against the same server, in one run.

    python bench/real_model.py [--model NAME] [--formats bash,auto] [--max-steps 10]
        [--llm-in-sandbox PATH/TO/llm-in-sandbox] [--problems ID,ID] [--json FILE]
    python bench/real_model.py --check   # every expected answer against its reference solution

Each run is graded strictly (bench/real_model_problems.py: normalise) and its ending is reported
as it was: our exitReason, or for the package "answered", "completed, no answer" (it says
"Agent completed" and exits 0 whether or not it answered: counted as a failure), its exit code
or a timeout. Tokens are counted by a proxy in front of the model server, the same way for every
runner. Target (issue 12): our best format solves at least twice as many problems as the package.
The package needs its own virtual environment and the base image:

    python3 -m venv /tmp/lis && /tmp/lis/bin/pip install llm-in-sandbox==0.2.0
    bash images/base/build.sh
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from real_model_problems import PROBLEMS, Problem, check_problems, is_right
from sandbox_agent.local_model import LocalModelServer, xllamacpp_installed
from sandbox_agent.models import CATALOGUE, DEFAULT_MODEL, ModelCache, cache_dir

PEER_IMAGE = "llm-sandbox/base:bookworm"
MAX_TOKENS_PER_CALL = 1024
CONTEXT = 16384
RUN_TIMEOUT = 300.0


@dataclass
class Run:
    runner: str
    problem: str
    right: bool
    answer: str | None
    ending: str
    steps: int | None  # None: not known (a run killed before it wrote its record)
    seconds: float
    prompt_tokens: int
    completion_tokens: int


class CountingProxy:
    """An HTTP proxy on 127.0.0.1 to the model server that adds up the usage of every reply,
    so that tokens are counted the same way whoever asks."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.usage = [0, 0]
        self.lock = threading.Lock()
        self.busy = 0  # requests in flight upstream
        self.idle = threading.Condition(self.lock)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                path = self.path.removeprefix("/v1")
                upstream = http.client.HTTPConnection(proxy.host, proxy.port, timeout=RUN_TIMEOUT)
                headers = {"Content-Type": self.headers.get("Content-Type", "application/json")}
                with proxy.lock:
                    proxy.busy += 1
                try:
                    upstream.request(self.command, proxy.prefix + path, body, headers)
                    reply = upstream.getresponse()
                    data = reply.read()
                finally:
                    upstream.close()
                    with proxy.lock:
                        proxy.busy -= 1
                        proxy.idle.notify_all()
                proxy.count(data)
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.getheader("Content-Type") or "")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(OSError):  # a client killed on its timeout
                    self.wfile.write(data)

            def do_GET(self) -> None:
                self._forward()

            def do_POST(self) -> None:
                self._forward()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self, data: bytes) -> None:
        try:
            usage = json.loads(data).get("usage") or {}
        except (ValueError, AttributeError):
            return
        with self.lock:
            self.usage[0] += int(usage.get("prompt_tokens") or 0)
            self.usage[1] += int(usage.get("completion_tokens") or 0)

    def take(self) -> tuple[int, int]:
        """The usage since the last take, once no request is in flight: a run killed on its
        timeout leaves the server generating a reply nobody reads, which must neither count
        for the next run nor take its time."""
        with self.lock:
            self.idle.wait_for(lambda: self.busy == 0, timeout=RUN_TIMEOUT)
            taken = (self.usage[0], self.usage[1])
            self.usage = [0, 0]
        return taken

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_inputs(problem: Problem, directory: Path) -> Path:
    inputs = directory / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    for name, text in problem.files.items():
        (inputs / name).write_text(text)
    return inputs


def task_yaml(problem: Problem, fmt: str, model: str, max_steps: int) -> str:
    task = {
        "apiVersion": "llmsandbox.io/v1alpha1",
        "kind": "SandboxTask",
        "metadata": {"name": problem.id},
        "spec": {
            "prompt": problem.prompt,
            "inputs": [{"path": name, "file": f"input/{name}"} for name in problem.files],
            "model": {
                "name": model,
                "temperature": 0,
                "maxTokensPerCall": MAX_TOKENS_PER_CALL,
                "toolCallFormat": fmt,
            },
            "limits": {
                "maxSteps": max_steps,
                "maxTokens": CONTEXT,
                "commandTimeoutSeconds": 30,
                "activeDeadlineSeconds": int(RUN_TIMEOUT) - 20,
            },
        },
    }
    return json.dumps(task, indent=2)  # JSON is YAML


def run_ours(problem: Problem, fmt: str, model: str, url: str, max_steps: int, work: Path) -> Run:
    here = work / f"{fmt}-{problem.id}"
    write_inputs(problem, here)
    (here / "task.yaml").write_text(task_yaml(problem, fmt, model, max_steps))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["OPENAI_API_KEY"] = "k"
    argv = [sys.executable, "-m", "sandbox_agent.cli", "run", "task.yaml", "--json", "--quiet",
            "--out", "out", "--base-url", url]  # fmt: skip
    started = time.monotonic()
    try:
        done = subprocess.run(
            argv, cwd=here, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT + 60
        )
    except subprocess.TimeoutExpired:
        return Run(fmt, problem.id, False, None, "timeout", None, time.monotonic() - started, 0, 0)
    seconds = time.monotonic() - started
    try:
        result = json.loads(done.stdout)["result"]
    except (ValueError, KeyError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:120]
        return Run(
            fmt, problem.id, False, None, f"exit {done.returncode}: {tail}", None, seconds, 0, 0
        )
    answer = result.get("answer")
    return Run(fmt, problem.id, is_right(problem, answer), answer, str(result["exitReason"]),
               int(result.get("steps") or 0), seconds, 0, 0)  # fmt: skip


def run_peer(
    problem: Problem, command: str, model: str, url: str, max_steps: int, work: Path
) -> Run:
    here = work / f"peer-{problem.id}"
    inputs = write_inputs(problem, here)
    out = here / "out"
    argv = [command, "run", problem.prompt, "--llm_name", model, "--llm_base_url", url,
            "--api_key", "k", "--docker_image", PEER_IMAGE, "--max_steps", str(max_steps),
            "--temperature", "0", "--max_tokens_per_call", str(MAX_TOKENS_PER_CALL),
            "--max_token_limit", str(CONTEXT), "--output_dir", str(out)]  # fmt: skip
    if problem.files:
        argv += ["--input_dir", str(inputs)]
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", NO_COLOR="1")
    started = time.monotonic()
    try:
        done = subprocess.run(
            argv, cwd=here, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
        )
        code: int | None = done.returncode
        said_completed = "Agent completed" in done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        code, said_completed = None, False
    seconds = time.monotonic() - started
    answers = sorted(out.glob("*/files/answer.txt"))
    answer = answers[-1].read_text(errors="replace").strip() if answers else None
    steps: int | None = None
    for trajectory in sorted(out.glob("*/trajectory.json"))[-1:]:
        with contextlib.suppress(ValueError):
            steps = len(json.loads(trajectory.read_text()).get("steps") or [])
    if code is None:
        ending = "timeout"
    elif answer:
        ending = "answered"
    elif code == 0 and said_completed:
        ending = "completed, no answer"
    else:
        ending = f"exit {code}, no answer"
    return Run("llm-in-sandbox", problem.id, is_right(problem, answer), answer or None, ending,
               steps, seconds, 0, 0)  # fmt: skip


def _steps(run: Run) -> str:
    return "?" if run.steps is None else str(run.steps)


def _mean_steps(runs: list[Run]) -> str:
    """The mean over the runs whose steps are known, and how many are not."""
    known = [r.steps for r in runs if r.steps is not None]
    mean = f"{sum(known) / len(known):.1f}" if known else "?"
    return mean if len(known) == len(runs) else f"{mean}*"


def summary(runs: list[Run], runners: list[str], problems: list[Problem]) -> list[str]:
    lines = [f"{'runner':<16} {'solved':>8} {'steps':>6} {'wall':>8} {'tokens':>10}  endings"]
    for runner in runners:
        mine = [r for r in runs if r.runner == runner]
        endings: dict[str, int] = {}
        for r in mine:
            endings[r.ending] = endings.get(r.ending, 0) + 1
        solved = sum(r.right for r in mine)
        shown = ", ".join(f"{k} {v}" for k, v in sorted(endings.items(), key=lambda kv: -kv[1]))
        lines.append(
            f"{runner:<16} {solved:>3}/{len(mine):<4} {_mean_steps(mine):>6}"
            f" {sum(r.seconds for r in mine):>7.0f}s"
            f" {sum(r.prompt_tokens + r.completion_tokens for r in mine):>10}  {shown}"
        )
    if any(r.steps is None for r in runs):
        lines.append("* steps: the mean of the runs that left a record (a killed one leaves none)")
    lines.append("")
    lines.append(f"{'problem':<24} " + " ".join(f"{r:>16}" for r in runners))
    for problem in problems:
        cells = []
        for runner in runners:
            found = [r for r in runs if r.runner == runner and r.problem == problem.id]
            cells.append(
                f"{('right' if found[0].right else 'wrong') + f' ({_steps(found[0])})':>16}"
                if found
                else f"{'-':>16}"
            )
        lines.append(f"{problem.id:<24} " + " ".join(cells))
    return lines


def run_all(
    args: argparse.Namespace, problems: list[Problem], runners: list[str], model: str, file: Path
) -> list[Run]:
    """Every problem through every runner, one server and one counting proxy for all."""
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="real-model-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        server = LocalModelServer(file, model, log_path=work / "server.log",
                                  context=CONTEXT)  # fmt: skip
        server.start()
        proxy = CountingProxy(server.url)
        total = len(problems) * len(runners)
        try:
            for problem in problems:
                for runner in runners:
                    proxy.take()
                    if runner == "llm-in-sandbox":
                        run = run_peer(problem, args.llm_in_sandbox, model, proxy.url,
                                       args.max_steps, work)  # fmt: skip
                    else:
                        run = run_ours(problem, runner, model, proxy.url, args.max_steps, work)
                    run.prompt_tokens, run.completion_tokens = proxy.take()
                    runs.append(run)
                    print(
                        f"[{len(runs)}/{total}] {runner} {problem.id}: "
                        f"{'right' if run.right else 'wrong'} ({run.ending}, {_steps(run)} steps, "
                        f"{run.seconds:.0f}s) answer={run.answer!r:.60}",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            proxy.close()
            server.stop()
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(CATALOGUE))
    parser.add_argument("--formats", default="bash,auto", help="our toolCallFormats, in order")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--llm-in-sandbox", metavar="PATH", help="the package's command")
    parser.add_argument("--problems", help="only these problem ids, comma-separated")
    parser.add_argument("--json", type=Path, help="write every run here too")
    parser.add_argument("--keep", type=Path, help="keep every run's directory under this one")
    parser.add_argument("--check", action="store_true", help="check the problems and stop")
    args = parser.parse_args()
    wrong = check_problems()
    if wrong or args.check:
        print("\n".join(wrong) or f"{len(PROBLEMS)} problems: every expected answer checks out")
        return 1 if wrong else 0
    problems = PROBLEMS
    if args.problems:
        wanted = set(args.problems.split(","))
        problems = [p for p in PROBLEMS if p.id in wanted]
        if unknown := wanted - {p.id for p in problems}:
            parser.error(f"--problems: no problem {sorted(unknown)[0]!r}")
    if not xllamacpp_installed():
        parser.error("the local model needs xllamacpp: pip install 'llm-sandbox-operator[local]'")
    model = CATALOGUE[args.model]
    model_file = ModelCache(cache_dir()).pull(model)
    runners = [f for f in args.formats.split(",") if f]
    if args.llm_in_sandbox:
        runners.append("llm-in-sandbox")
    runs = run_all(args, problems, runners, model.name, model_file)
    print(f"model: {model.name}, temperature 0, at most {args.max_steps} steps, "
          f"{MAX_TOKENS_PER_CALL} tokens a reply")  # fmt: skip
    print("\n".join(summary(runs, runners, problems)))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1) + "\n")
    ours = {
        r: sum(x.right for x in runs if x.runner == r) for r in runners if r != "llm-in-sandbox"
    }
    best = max(ours, key=lambda r: ours[r]) if ours else None
    if args.llm_in_sandbox and best is not None:
        peer = sum(x.right for x in runs if x.runner == "llm-in-sandbox")
        met = ours[best] >= 2 * peer and ours[best] > 0
        print(
            f"\nbest format: {best}, {ours[best]} solved; llm-in-sandbox {peer}: target "
            f"(at least twice as many) {'PASS' if met else 'FAIL'}"
        )
        return 0 if met else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
