"""The LLM-in-Sandbox paper's own package (`llm-in-sandbox` 0.2.0, arXiv 2601.16206) on the work of
bench/batch_local.py: N items "What is i + 7?", run by its `llm-in-sandbox benchmark` at several
--num_workers values against a scripted model on 127.0.0.1 that answers every call after a fixed
delay, so that its items/s can be set beside `sandboxctl batch`'s.

    python bench/paper_package.py [--items 200] [--delay 0.5] [--workers 1,8,32] [--calls 1]
        [--llm-in-sandbox PATH/TO/llm-in-sandbox] [--image llm-sandbox/base:bookworm]

The package needs its own virtual environment and a local image (its default,
cdx123/llm-in-sandbox:v0.1, is on Docker Hub and would be pulled; this script never lets it):

    python3 -m venv /tmp/lis && /tmp/lis/bin/pip install llm-in-sandbox==0.2.0
    bash images/base/build.sh

How the package is driven (read from its source):
  - items: a task directory (here a temporary one, passed as --task with an absolute path) with a
    config.yaml (dataset "json" + data_files, system_prompt, instance_prompt, working/input/output
    dirs), a reward.py defining compute_score(agent_answer, ground_truth, **item), and the items,
    each {"id", "problem_statement", "ground_truth", "input_files": {name: text}};
  - the answer it grades is the text of /testbed/answer.txt in the container, read after the
    agent stops (input_files land in /testbed/documents; a config.yaml that holds the prompts
    cannot move either); the agent stops on a `submit` tool call or after --max_steps model calls;
  - the model must answer with native tool calls (execute_bash, str_replace_editor, submit);
  - workers are processes (ProcessPoolExecutor); each item gets a fresh container (docker run,
    five docker exec, docker stop with a 5 s grace, docker rm).
With --calls 1 (default) the model's one reply is execute_bash writing the answer to answer.txt
and --max_steps 1 ends the item; with --calls 2 it writes the answer, then calls submit.
The scripted model runs in its own process, as in bench/batch_local.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
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

DEFAULT_IMAGE = "llm-sandbox/base:bookworm"
# Where the package reads answer.txt. With the prompts in config.yaml (as here), its runner ignores
# the config's working_dir/input_dir/output_dir and uses /testbed, /testbed/documents, /testbed.
ANSWER_DIR = "/testbed"

REWARD_PY = '''\
def compute_score(agent_answer, ground_truth, **kwargs):
    """1.0 when answer.txt holds exactly the expected number (surrounding blanks ignored)."""
    return 1.0 if str(agent_answer).strip() == str(ground_truth).strip() else 0.0
'''


def serve(delay: float, calls: int, conn: Connection) -> None:
    """The scripted model: writes the right sum to answer.txt with execute_bash, then (with
    calls=2) submits once it has seen the tool's result; every reply after `delay` seconds."""

    def answer(request: dict[str, Any]) -> Reply:
        messages = request.get("messages") or []
        user = next(str(m.get("content")) for m in messages if m.get("role") == "user")
        a, b = map(int, re.findall(r"What is (\d+) \+ (\d+)", user)[0])
        if calls > 1 and any(m.get("role") == "tool" for m in messages):
            return slow(delay, tool_call("submit", {}))
        command = f"printf '%s\\n' {a + b} > {ANSWER_DIR}/answer.txt"
        return slow(delay, tool_call("execute_bash", {"command": command}))

    with ScriptedLLMServer() as server:
        server.set_default(answer)
        conn.send(server.base_url)
        while conn.recv() == "count":  # anything else: the benchmark is done
            conn.send(len(server.chat_requests))


def write_task(directory: Path, items: int) -> Path:
    """A task directory in the package's format, for `benchmark --task <absolute path>`."""
    directory.mkdir(parents=True)
    rows = [
        {
            "id": f"q{i}",
            "problem_statement": f"What is {i} + 7?",
            "ground_truth": str(i + 7),
            "input_files": {},
        }
        for i in range(items)
    ]
    (directory / "data.json").write_text(json.dumps(rows))
    config = {
        "dataset": "json",
        "data_files": str(directory / "data.json"),
        "split": "train",
        "system_prompt": "Solve the problem. Write only the answer to {output_dir}/answer.txt.",
        "instance_prompt": "<problem>\n{problem_statement}\n</problem>",
    }
    (directory / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    (directory / "reward.py").write_text(REWARD_PY)
    return directory


@dataclass(frozen=True)
class Measured:
    workers: int
    seconds: float  # the package's own elapsed_time_seconds (its pool, not its start-up)
    wall: float  # the whole `llm-in-sandbox benchmark` process
    total: int
    right: int
    errors: int
    chat_calls: int

    @property
    def rate(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else 0.0


def skip_reason(cli: str | None, image: str) -> str | None:
    if cli is None or not os.access(cli, os.X_OK):
        return "the llm-in-sandbox package is not installed (no llm-in-sandbox CLI)"
    try:
        docker = subprocess.run(["docker", "info"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "no Docker engine (docker info failed)"
    if docker.returncode != 0:
        return "no Docker engine (docker info failed)"
    found = subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=20)
    if found.returncode != 0:
        return f"the image {image} is not here (bash images/base/build.sh builds it)"
    return None


def package_version(cli: str) -> str:
    python = Path(cli).parent / "python"
    probe = "import importlib.metadata as m; print(m.version('llm-in-sandbox'))"
    try:
        done = subprocess.run(
            [str(python), "-c", probe], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return done.stdout.strip() or "?"


def run_level(
    cli: str, args: argparse.Namespace, task: Path, out: Path, base_url: str, workers: int
) -> tuple[float, dict[str, Any], list[dict[str, Any]]]:
    """One `llm-in-sandbox benchmark` run: (wall seconds, results.json, trajectory.json rows)."""
    argv = [cli, "benchmark", "--task", str(task), "--llm_name", MODEL_ID,
            "--llm_base_url", base_url, "--api_key", "k", "--docker_image", args.image,
            "--num_workers", str(workers), "--max_steps", str(args.calls),
            "--temperature", "0", "--output_dir", str(out)]  # fmt: skip
    env = dict(
        os.environ,
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # else litellm fetches its price list from GitHub
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(out / "hf"),
        NO_COLOR="1",
        TERM="dumb",
    )
    for key in ("LLM_NAME", "LLM_BASE_URL", "LLM_API_KEY", "LLM_NUM_WORKERS", "LLM_TEMPERATURE"):
        env.pop(key, None)
    per_item = 15.0 + args.calls * args.delay
    timeout = 120.0 + per_item * args.items / workers
    started = time.monotonic()
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"llm-in-sandbox benchmark still running after {timeout:.0f}s") from exc
    wall = time.monotonic() - started
    (out / "benchmark.log").write_text(done.stdout + done.stderr)
    found = sorted(out.rglob("results.json"))
    if done.returncode != 0 or not found:
        tail = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"llm-in-sandbox benchmark exited {done.returncode}: {tail[:200]}")
    results: dict[str, Any] = json.loads(found[-1].read_text())
    trajectories = json.loads((found[-1].parent / "trajectory.json").read_text())
    return wall, results, list(trajectories.values())


def leftover_containers(image: str) -> int:
    prefix = image.replace("/", "-").replace(":", "-") + "-"  # the package's container names
    done = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"name=^{prefix}"], capture_output=True, text=True
    )
    return len(done.stdout.split())


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.5, help="seconds the model takes per call")
    parser.add_argument("--workers", default="1,8,32", help="comma-separated --num_workers values")
    parser.add_argument(
        "--calls", type=int, choices=(1, 2), default=1, help="model calls per item (see above)"
    )
    parser.add_argument("--llm-in-sandbox", dest="cli", default=shutil.which("llm-in-sandbox"))
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="a local image (never pulled)")
    parser.add_argument("--keep", help="keep the outputs in this directory")
    args = parser.parse_args()
    levels = [int(w) for w in args.workers.split(",")]

    reason = skip_reason(args.cli, args.image)
    if reason is not None:
        print(f"paper_package: skipped: {reason}")
        return 0
    cli: str = args.cli
    version = package_version(cli)

    results: list[Measured] = []
    with (
        model_process(serve, args.delay, args.calls) as (base_url, parent),
        tempfile.TemporaryDirectory(prefix="paper-bench-") as tmp,
    ):
        root = Path(args.keep) if args.keep else Path(tmp)
        task = write_task(root / "task", args.items)
        for workers in levels:
            parent.send("count")
            calls_before = parent.recv()
            out = root / f"out-{workers}"
            try:
                wall, found, rows = run_level(cli, args, task, out, base_url, workers)
            except RuntimeError as exc:
                print(f"--num_workers {workers:>3}: failed: {exc}", file=sys.stderr)
                continue
            parent.send("count")
            calls = parent.recv() - calls_before
            right = sum(1 for r in rows if float(r.get("reward") or 0) >= 1.0)
            m = Measured(
                workers,
                float(found["elapsed_time_seconds"]),
                wall,
                int(found["total"]),
                right,
                int(found["num_errors"]),
                calls,
            )
            results.append(m)
            print(
                f"--num_workers {workers:>3}: {m.total} items in {m.seconds:6.1f}s "
                f"(process {m.wall:6.1f}s) = {m.rate:6.2f} items/s, {m.right} right, "
                f"{m.errors} errors, {m.chat_calls} model calls, "
                f"{leftover_containers(args.image)} containers left",
                file=sys.stderr,
                flush=True,
            )
    report(results, args, version)
    return 0


def report(results: list[Measured], args: argparse.Namespace, version: str) -> None:
    if not results:
        return
    base = results[0]
    print(
        f"\nllm-in-sandbox {version} benchmark: {args.items} items, model delay "
        f"{args.delay * 1000:.0f} ms, {args.calls} model call(s) an item, image {args.image}"
    )
    print(
        f"{'workers':>7}  {'seconds':>8}  {'process':>8}  {'items/s':>8}  "
        f"{'vs ' + str(base.workers):>7}  {'right':>6}  errors"
    )
    for m in results:
        print(
            f"{m.workers:>7}  {m.seconds:>8.1f}  {m.wall:>8.1f}  {m.rate:>8.2f}  "
            f"{m.rate / base.rate:>6.1f}x  {m.right:>6}  {m.errors}"
        )
    by_workers = {m.workers: m for m in results}
    if 1 in by_workers and 32 in by_workers:
        ratio = by_workers[32].rate / by_workers[1].rate
        print(f"items/s at --num_workers 32 vs 1: {ratio:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
