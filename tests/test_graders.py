"""The graders as pure functions: the awkward answers a model gives, scored as a person would."""

from __future__ import annotations

import asyncio
import time
from multiprocessing.connection import Connection

import pytest
from pydantic import ValidationError

from sandbox_agent.errors import TaskSpecError
from sandbox_agent.graders import (
    ChoiceGrader,
    ExactGrader,
    MathGrader,
    NumericGrader,
    RegexGrader,
    boxed_contents,
    chosen_letter,
    grade,
    numbers_in,
    parse_grader,
)
from sandbox_agent.math_grading import MathWorker, math_verify_installed
from sandbox_agent.scoring import verifier_grade
from sandbox_agent.taskset import parse_set

needs_math_verify = pytest.mark.skipif(not math_verify_installed(), reason="math-verify missing")


def test_boxed_contents_keep_nested_braces() -> None:
    assert boxed_contents(r"so \boxed{\frac{1}{2}} and \boxed{x^{2}}") == [r"\frac{1}{2}", "x^{2}"]


def test_an_unclosed_box_is_no_box() -> None:
    assert boxed_contents(r"\boxed{\frac{1}{2}") == []


@pytest.mark.parametrize(
    ("answer", "expected", "score"),
    [
        ("Paris", "paris", 1.0),
        ("  New   York ", "new york", 1.0),
        (r"The answer is \boxed{Paris}", "Paris", 1.0),
        ("Paris.", "Paris", 0.0),
        ("Lyon", "Paris", 0.0),
    ],
)
def test_exact_normalises_case_space_and_boxes(answer: str, expected: str, score: float) -> None:
    assert grade(answer, expected, ExactGrader(type="exact")).score == score


def test_exact_can_ignore_punctuation_and_keep_case() -> None:
    spec = ExactGrader(type="exact", ignore_punctuation=True, case_sensitive=True)
    assert grade("Paris.", "Paris", spec).score == 1.0
    assert grade("paris", "Paris", spec).score == 0.0


def test_exact_says_what_it_got() -> None:
    found = grade("Lyon", "Paris", ExactGrader(type="exact"))
    assert found.message == "expected 'Paris', got 'Lyon'"


@pytest.mark.parametrize(
    ("text", "numbers"),
    [
        ("1,234.5 and -3e-2", [1234.5, -0.03]),
        ("3/4", [0.75]),
        (r"\frac{3}{4}", [0.75]),
        ("12%", [0.12]),
        ("x = .5", [0.5]),
        ("\u22122", [-2.0]),
    ],
)
def test_numbers_are_read_as_written(text: str, numbers: list[float]) -> None:
    assert numbers_in(text) == pytest.approx(numbers)


@pytest.mark.parametrize(
    ("answer", "expected", "spec", "score"),
    [
        ("The answer is 42.", "42", NumericGrader(type="numeric"), 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", NumericGrader(type="numeric"), 1.0),
        ("3.14", "3.14159", NumericGrader(type="numeric", abs_tolerance=0.01), 1.0),
        ("3.13", "3.14159", NumericGrader(type="numeric", abs_tolerance=0.01), 0.0),
        # The tolerance edge: exactly abs_tolerance away passes.
        ("1.5", "1", NumericGrader(type="numeric", abs_tolerance=0.5), 1.0),
        ("101", "100", NumericGrader(type="numeric", rel_tolerance=0.01), 1.0),
        ("102", "100", NumericGrader(type="numeric", rel_tolerance=0.01), 0.0),
        ("first 7, finally 8", "8", NumericGrader(type="numeric"), 1.0),
    ],
)
def test_numeric_tolerance(answer: str, expected: str, spec: NumericGrader, score: float) -> None:
    assert grade(answer, expected, spec).score == score


def test_numeric_without_a_number_says_so() -> None:
    found = grade("I do not know", "3", NumericGrader(type="numeric"))
    assert (found.score, found.message) == (0.0, "no number in the answer 'I do not know'")


def test_numeric_refuses_an_expected_answer_that_is_not_one_number() -> None:
    found = grade("3", "3 or 4", NumericGrader(type="numeric"))
    assert found.message == "the expected answer '3 or 4' is not one number"


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("B", "B"),
        ("(b)", "B"),
        ("Answer: (B)", "B"),
        ("The answer is C.", "C"),
        (r"\boxed{D}", "D"),
        ("I think A is wrong, so the answer is (C)", "C"),
        ("A or B", None),
        ("none of them", None),
    ],
)
def test_choice_finds_the_letter(answer: str, letter: str | None) -> None:
    assert chosen_letter(answer, "ABCD") == letter


def test_choice_scores_against_a_written_expected_letter() -> None:
    spec = ChoiceGrader(type="choice")
    assert grade("Answer: (B)", "(B)", spec).score == 1.0
    assert grade("Answer: (B)", "C", spec).message == "expected C, got B"


def test_regex_full_match_and_extraction() -> None:
    assert grade(" 2024-01-05 ", r"\d{4}-\d{2}-\d{2}", RegexGrader(type="regex")).score == 1.0
    spec = RegexGrader(type="regex", pattern=r"FINAL:\s*(\w+)")
    assert grade("work... FINAL: yes", "yes", spec).score == 1.0
    assert (
        grade("no marker", "yes", spec).message
        == "the pattern 'FINAL:\\\\s*(\\\\w+)' is not in the answer"
    )


def test_a_regex_that_does_not_compile_scores_zero_with_the_reason() -> None:
    found = grade("x", "(", RegexGrader(type="regex"))
    assert found.score == 0.0
    assert found.message.startswith("the regular expression does not compile")


def test_no_answer_scores_zero() -> None:
    assert grade(None, "1", ExactGrader(type="exact")).message == "no answer"


def test_an_unknown_grader_type_names_the_choices() -> None:
    with pytest.raises(TaskSpecError) as caught:
        parse_set({"spec": {"items": [{"id": "a", "prompt": "p"}], "grader": {"type": "fuzzy"}}})
    assert str(caught.value) == (
        "spec.grader: Input tag 'fuzzy' found using 'type' does not match any of the expected "
        "tags: 'exact', 'numeric', 'regex', 'choice', 'math', 'command'"
    )


def test_an_unknown_grader_option_is_named_at_its_field() -> None:
    with pytest.raises(TaskSpecError) as caught:
        parse_set(
            {
                "spec": {
                    "items": [{"id": "a", "prompt": "p"}],
                    "grader": {"type": "numeric", "tolerance": 1},
                }
            }
        )
    assert str(caught.value) == "spec.grader.tolerance: unknown field"


def test_a_grader_option_is_checked() -> None:
    with pytest.raises(ValidationError, match="absTolerance"):
        parse_grader({"type": "numeric", "absTolerance": -1})


@needs_math_verify
@pytest.mark.parametrize(
    ("answer", "expected", "score"),
    [
        (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),
        (r"The final answer is \boxed{204}.", "204", 1.0),
        (r"\boxed{205}", "204", 0.0),
        (r"\boxed{x^{2}+2x+1}", "(x+1)^2", 1.0),
    ],
)
def test_math_equivalence(answer: str, expected: str, score: float) -> None:
    assert grade(answer, expected, MathGrader(type="math")).score == score


@needs_math_verify
async def test_the_math_worker_grades_in_its_own_process() -> None:
    worker = MathWorker()
    try:
        found = await worker.grade(r"\boxed{\frac{2}{4}}", "1/2", 5)
        assert found.score == 1.0
        found = await worker.grade(r"\boxed{3}", "1/2", 5)
        assert found.score == 0.0
        assert found.message.startswith("not equivalent")
    finally:
        worker.close()


@needs_math_verify
def _stuck(conn: Connection) -> None:
    """A stand-in worker that starts, then never answers (sympy on a crafted expression)."""
    conn.send(("ready", ""))
    conn.recv()
    time.sleep(3600)


async def test_an_answer_that_keeps_the_worker_busy_scores_zero_and_the_worker_is_replaced() -> (
    None
):
    worker = MathWorker(serve=_stuck)
    try:
        found = await worker.grade(r"\boxed{1}", "1", 0.5)
        assert (found.score, found.message) == (0.0, "grading took longer than 6s")
        assert worker._process is None  # killed; the next answer starts a new one
    finally:
        worker.close()


async def test_a_worker_that_died_is_started_again() -> None:
    worker = MathWorker()
    try:
        await worker.grade("1", "1", 1)
        assert worker._process is not None
        worker._process.kill()  # a worker killed under it (as by a hard timeout) is started again
        await asyncio.sleep(0.1)
        found = await worker.grade(r"\boxed{1}", "1", 1)
        assert found.score == 1.0
    finally:
        worker.close()


@pytest.mark.parametrize(
    ("exit_code", "stdout", "score", "message"),
    [
        (0, "", 1.0, ""),
        (1, "", 0.0, "the verifier exited with 1"),
        (0, "checking...\n0.25\n", 0.25, "the verifier scored 0.25"),
        (3, "1", 1.0, ""),
        (0, "7", 0.0, "the verifier printed '7', outside 0 to 1"),
        (0, "True", 1.0, ""),
    ],
)
def test_a_verifier_scores_by_its_last_number_else_its_exit_code(
    exit_code: int, stdout: str, score: float, message: str
) -> None:
    found = verifier_grade(exit_code, stdout)
    assert (found.score, found.message) == (score, message)


@needs_math_verify
def test_one_worker_serves_one_event_loop_after_another() -> None:
    worker = MathWorker()

    async def two_at_once() -> list[float]:
        found = await asyncio.gather(worker.grade("1/2", "0.5", 5), worker.grade("2", "3", 5))
        return [g.score for g in found]

    try:
        assert asyncio.run(two_at_once()) == [1.0, 0.0]
        assert asyncio.run(two_at_once()) == [1.0, 0.0]  # a second loop, the same worker
    finally:
        worker.close()
