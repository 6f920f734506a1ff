"""The Python API on this machine: one task, many tasks at once, and a whole set, scored.

    OPENAI_BASE_URL=http://localhost:8000/v1 OPENAI_MODEL=my-model python examples/python_api.py

With no endpoint configured, `sandboxctl batch examples/taskset-maths.yaml` serves the built-in
model instead; this example needs an endpoint.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from sandbox_agent.api import run, run_many, run_set
from sandbox_agent.graders import Grading, NumericGrader
from sandbox_agent.runner import RunOptions
from sandbox_agent.task import SandboxTaskSpec
from sandbox_agent.taskset import SandboxTaskSet


async def main(out: Path) -> None:
    options = RunOptions(backend="auto", out_dir=out / "one")

    # One task: the outcome holds the result and where the trajectory is.
    outcome = await run("What is 17 * 23? Compute it, then submit the number.", options)
    print("one:", outcome.result.phase, outcome.result.answer, outcome.trajectory_path)

    # Many tasks, 4 at a time, each graded: results arrive as they finish.
    specs = [
        SandboxTaskSpec(
            prompt=f"What is {n} squared? Submit just the number.",
            grading=Grading(grader=NumericGrader(type="numeric"), expected=str(n * n)),
        )
        for n in range(11, 15)
    ]
    many = RunOptions(backend="auto", out_dir=out / "many")
    async for index, done in run_many(specs, many, parallel=4):
        print(f"many[{index}]:", done.result.answer, "score", done.result.score)

    # A whole set (the same file `sandboxctl batch` runs), with a row per finished item-sample.
    taskset = SandboxTaskSet.model_validate(
        {
            "metadata": {"name": "squares"},
            "spec": {
                "template": {"prompt": "What is {{ n }} squared? Submit just the number."},
                "items": [{"id": f"sq{n}", "n": n, "expected": str(n * n)} for n in (3, 4, 5)],
                "samplesPerItem": 2,
                "grader": {"type": "numeric"},
            },
        }
    )
    batch = await run_set(taskset, out / "set", RunOptions(backend="auto"), parallel=6)
    print("set: accuracy", batch.summary.accuracy, "pass@k", batch.summary.pass_at_k)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())))
