"""Scoring a finished run: the task's grader applied to its result after the loop, where the run
ends (the local runner, the pod's agent). The expected answer reaches the sandbox only here, for
a `command` verifier, once the model can no longer act."""

from __future__ import annotations

import re
import shlex

from .errors import SandboxError
from .execclient import ExecClient
from .graders import CommandGrader, Grade, Grading, MathGrader, grade
from .math_grading import MathWorker
from .result import ExitReason, TaskResult, is_scored

GRADING_DIR = ".llmsandbox-grading"
ANSWER_FILE_VAR = "LLMSANDBOX_ANSWER_FILE"
EXPECTED_FILE_VAR = "LLMSANDBOX_EXPECTED_FILE"
# A verifier's output is read only for its score: a little is plenty.
VERIFIER_OUTPUT_BYTES = 4096
# A grade's message rides in the pod's 4 KiB termination message beside the answer.
MAX_GRADE_MESSAGE = 300
_LAST_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")

_math_worker: MathWorker | None = None


def math_worker() -> MathWorker:
    """The process's one maths worker (started on first use)."""
    global _math_worker
    if _math_worker is None:
        _math_worker = MathWorker()
    return _math_worker


async def score_result(
    result: TaskResult, grading: Grading, client: ExecClient | None, workspace: str
) -> TaskResult:
    """`result` with score, grader and gradeMessage set: graded when the model's own ending
    (submitted, or out of steps/tokens/time: 0 unless a verifier finds its work good); left
    unscored for infrastructure failures and cancellations. `client` is the run's exec server,
    for a command verifier (None when the sandbox is gone: the verifier cannot run)."""
    if not is_scored(result.exit_reason):
        return result
    spec = grading.grader
    if isinstance(spec, CommandGrader):
        if client is None:
            found = Grade(0.0, "the sandbox was gone before the verifier could run")
        else:
            found = await run_verifier(client, workspace, spec, result.answer, grading.expected)
    elif result.exit_reason is not ExitReason.SUBMITTED:
        found = Grade(0.0, f"no answer ({result.exit_reason})")
    elif isinstance(spec, MathGrader):
        found = await math_worker().grade(
            result.answer or "", grading.expected, spec.timeout_seconds
        )
    else:
        found = grade(result.answer, grading.expected, spec)
    message = found.message[:MAX_GRADE_MESSAGE] or None
    return result.model_copy(
        update={"score": found.score, "grader": spec.type, "grade_message": message}
    )


def verifier_command(spec: CommandGrader, workspace: str) -> str:
    """The verifier as the exec server runs it: in the workspace, in a fresh non-login bash (not
    the model's session, its functions and aliases), with the two files named."""
    where = f"{workspace}/{GRADING_DIR}"
    return (
        f"cd {shlex.quote(workspace)} && "
        f"{ANSWER_FILE_VAR}={shlex.quote(where + '/answer.txt')} "
        f"{EXPECTED_FILE_VAR}={shlex.quote(where + '/expected.txt')} "
        f"/bin/bash --noprofile --norc -c {shlex.quote(spec.command)}"
    )


async def run_verifier(
    client: ExecClient, workspace: str, spec: CommandGrader, answer: str | None, expected: str
) -> Grade:
    """Write the answer and (only now) the expected text into the sandbox and run the verifier."""
    try:
        await client.write_bytes(f"{GRADING_DIR}/answer.txt", (answer or "").encode())
        await client.write_bytes(f"{GRADING_DIR}/expected.txt", expected.encode())
        ran = await client.exec(
            verifier_command(spec, workspace), spec.timeout_seconds, VERIFIER_OUTPUT_BYTES
        )
    except SandboxError as exc:
        return Grade(0.0, f"the verifier could not run: {exc}")
    if ran.timed_out:
        return Grade(0.0, f"the verifier ran longer than {spec.timeout_seconds}s")
    return verifier_grade(ran.exit_code, ran.stdout)


def verifier_grade(exit_code: int, stdout: str) -> Grade:
    """A number in [0, 1] on the verifier's last output line is the score; otherwise exit code 0
    is 1 and any other 0. The output is the sandbox's: a number outside [0, 1] is refused."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if _LAST_NUMBER.fullmatch(last):
        value = float(last)
        if 0.0 <= value <= 1.0:
            return Grade(value, "" if value == 1.0 else f"the verifier scored {value:g}")
        return Grade(0.0, f"the verifier printed {last[:40]!r}, outside 0 to 1")
    if exit_code == 0:
        return Grade(1.0)
    return Grade(0.0, f"the verifier exited with {exit_code}")
