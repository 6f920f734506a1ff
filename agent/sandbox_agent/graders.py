"""Graders: how an answer is scored against the expected one, as pure functions of the two texts.

A grader is written `grader: {type: NAME, ...options}` in a SandboxTaskSet (or a task's
spec.grading). Every grader here but `command` is a pure function, the same on a laptop and on a
cluster; `command` runs a verifier in the sandbox after the loop (verifier.py). The answer is the
sandbox's (untrusted) text: it is capped before any parsing, and the maths grader parses it in a
worker process with a hard timeout (math_worker.py)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from .apimodel import ApiModel

# An answer is graded on at most its last this many characters (a final answer is at the end).
MAX_GRADED_CHARS = 20_000
MAX_EXPECTED_CHARS = 100_000


class ExactGrader(ApiModel):
    """The answer equals the expected text after normalisation."""

    type: Literal["exact"]
    case_sensitive: bool = False
    # Runs of white space become one space, and the ends are stripped.
    collapse_whitespace: bool = True
    # Punctuation (Unicode category P) is left out on both sides.
    ignore_punctuation: bool = False
    # Compare what \boxed{...} holds when the answer has one.
    extract_boxed: bool = True


class NumericGrader(ApiModel):
    """The last number in the answer is within tolerance of the expected number:
    |answer - expected| <= max(absTolerance, relTolerance * |expected|)."""

    type: Literal["numeric"]
    abs_tolerance: Annotated[float, Field(ge=0)] = 0.0
    rel_tolerance: Annotated[float, Field(ge=0, le=1)] = 1e-6


class RegexGrader(ApiModel):
    """Without `pattern`: the expected text is a regular expression the whole (stripped) answer
    must match. With `pattern`: its first group (or whole match) found in the answer must equal
    the expected text (stripped)."""

    type: Literal["regex"]
    pattern: Annotated[str | None, Field(min_length=1, max_length=2000)] = None
    ignore_case: bool = False

    def compiled(self, text: str) -> re.Pattern[str]:
        return re.compile(text, re.IGNORECASE if self.ignore_case else 0)


class ChoiceGrader(ApiModel):
    """Multiple choice: the letter the answer picks ("B", "(b)", "Answer: (B)", "\\boxed{B}",
    "The answer is B.") equals the expected letter."""

    type: Literal["choice"]
    choices: Annotated[str, Field(min_length=2, max_length=26, pattern=r"^[A-Z]+$")] = "ABCD"


class MathGrader(ApiModel):
    """Mathematical equivalence with math-verify (`pip install 'llm-sandbox-operator[grading]'`):
    \\boxed{} is extracted (nested braces too), and 1/2, \\frac{1}{2} and 0.5 are one answer."""

    type: Literal["math"]
    timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0


class CommandGrader(ApiModel):
    """A verifier run in the sandbox after the model has finished: the answer and the expected
    text are files named by $LLMSANDBOX_ANSWER_FILE and $LLMSANDBOX_EXPECTED_FILE (written only
    then). The score is the number the command prints last (0 to 1), else 1 for exit code 0."""

    type: Literal["command"]
    command: Annotated[str, Field(min_length=1, max_length=8192)]
    timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 60


GraderSpec = Annotated[
    ExactGrader | NumericGrader | RegexGrader | ChoiceGrader | MathGrader | CommandGrader,
    Field(discriminator="type"),
]
GRADER_TYPES = ("exact", "numeric", "regex", "choice", "math", "command")
_GRADER_ADAPTER: TypeAdapter[GraderSpec] = TypeAdapter(GraderSpec)


def parse_grader(data: object) -> GraderSpec:
    """A grader mapping as written; a pydantic ValidationError names the bad field."""
    return _GRADER_ADAPTER.validate_python(data, by_alias=True, by_name=False)


class Grading(ApiModel):
    """A task's grading: the grader and the expected answer, which only the grader sees (never
    the model or the sandbox before the loop has ended)."""

    grader: GraderSpec
    expected: Annotated[str, Field(max_length=MAX_EXPECTED_CHARS)]


@dataclass(frozen=True)
class Grade:
    """A score in [0, 1] and, when it is not 1, a line on why."""

    score: float
    message: str = ""


def _tail(answer: str) -> str:
    return answer[-MAX_GRADED_CHARS:]


def boxed_contents(text: str) -> list[str]:
    """What each \\boxed{...} (or \\fbox{...}) in `text` holds, braces balanced, in order."""
    found: list[str] = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[start:i])
                    break
    return found


def last_boxed(text: str) -> str | None:
    boxed = boxed_contents(text)
    return boxed[-1] if boxed else None


def normalise(text: str, spec: ExactGrader) -> str:
    text = unicodedata.normalize("NFKC", text)
    if spec.ignore_punctuation:
        text = "".join(c for c in text if not unicodedata.category(c).startswith("P"))
    if spec.collapse_whitespace:
        text = " ".join(text.split())
    return text if spec.case_sensitive else text.casefold()


def _shown(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def grade_exact(answer: str, expected: str, spec: ExactGrader) -> Grade:
    got = _tail(answer)
    if spec.extract_boxed:
        got = last_boxed(got) or got
    if normalise(got, spec) == normalise(expected, spec):
        return Grade(1.0)
    return Grade(0.0, f"expected {_shown(expected)}, got {_shown(got)}")


# A number as written in an answer: sign, digits with optional thousands commas, decimals,
# exponent; or a fraction a/b; a trailing % is kept to scale.
_NUMBER = re.compile(
    r"(?<![\w.])([-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
    r"|[-+\u2212]?\.\d+(?:[eE][-+]?\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?(\s*%)?"
)
_LATEX_FRAC = re.compile(r"([-+]?)\\[dt]?frac\s*\{\s*([-+]?[\d.]+)\s*\}\s*\{\s*([-+]?[\d.]+)\s*\}")


def numbers_in(text: str) -> list[float]:
    """Every number in `text`, in order: 1,234.5, -3e-2, 3/4, \\frac{3}{4}, 12% (as 0.12)."""
    text = _LATEX_FRAC.sub(lambda m: f"{m.group(1)}{m.group(2)}/{m.group(3)}", text)
    values: list[float] = []
    for match in _NUMBER.finditer(text):
        raw, denominator, percent = match.groups()
        try:
            value = float(raw.replace(",", "").replace("\u2212", "-"))
            if denominator is not None:
                value /= float(denominator)
        except (ValueError, ZeroDivisionError, OverflowError):
            continue
        values.append(value / 100 if percent else value)
    return values


def within(got: float, want: float, spec: NumericGrader) -> bool:
    return abs(got - want) <= max(spec.abs_tolerance, spec.rel_tolerance * abs(want))


def grade_numeric(answer: str, expected: str, spec: NumericGrader) -> Grade:
    wanted = numbers_in(expected)
    if len(wanted) != 1:
        return Grade(0.0, f"the expected answer {_shown(expected)} is not one number")
    text = _tail(answer)
    got = numbers_in(last_boxed(text) or text)
    if not got:
        return Grade(0.0, f"no number in the answer {_shown(text)}")
    if within(got[-1], wanted[0], spec):
        return Grade(1.0)
    return Grade(0.0, f"expected {wanted[0]:g}, got {got[-1]:g}")


def grade_regex(answer: str, expected: str, spec: RegexGrader) -> Grade:
    text = _tail(answer).strip()
    try:
        if spec.pattern is None:
            ok = spec.compiled(expected).fullmatch(text) is not None
            return Grade(1.0) if ok else Grade(0.0, f"{_shown(text)} does not match {expected!r}")
        found = spec.compiled(spec.pattern).search(text)
    except re.error as exc:
        return Grade(0.0, f"the regular expression does not compile: {exc}")
    if found is None:
        return Grade(0.0, f"the pattern {spec.pattern!r} is not in the answer")
    got = (found.group(1) if found.re.groups else found.group(0)).strip()
    same = (
        got.casefold() == expected.strip().casefold()
        if spec.ignore_case
        else got == expected.strip()
    )
    return Grade(1.0) if same else Grade(0.0, f"expected {_shown(expected)}, got {_shown(got)}")


def chosen_letter(answer: str, choices: str) -> str | None:
    """The letter an answer picks, or None when it picks none (or several, undecided)."""
    letters = re.escape(choices)
    text = _tail(answer)
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    one = re.fullmatch(rf"\s*[(\[]?\s*([{letters}])\s*[)\].:]?\s*", text, re.IGNORECASE)
    if one:
        return one.group(1).upper()
    stated = re.findall(
        rf"(?:answer|option|choice)\s*(?:is|:)?\s*[:\-]?\s*\(?\s*([{letters}])\b\s*\)?",
        text,
        re.IGNORECASE,
    )
    if stated:
        return str(stated[-1]).upper()
    # A letter standing alone: "(B)", "B)", or upper case between word boundaries.
    alone = re.findall(
        rf"\(([{letters}])\)|\b([{letters}])\)|(?<![\w'])([{choices}])(?![\w'])", text
    )
    picked = {str(next(g for g in groups if g)).upper() for groups in alone}
    if len(picked) == 1:
        return str(picked.pop())
    return None


def grade_choice(answer: str, expected: str, spec: ChoiceGrader) -> Grade:
    want = chosen_letter(expected, spec.choices)
    if want is None:
        return Grade(0.0, f"the expected answer {_shown(expected)} is not one of {spec.choices}")
    got = chosen_letter(answer, spec.choices)
    if got is None:
        return Grade(
            0.0, f"the answer {_shown(_tail(answer))} picks no single letter of {spec.choices}"
        )
    return Grade(1.0) if got == want else Grade(0.0, f"expected {want}, got {got}")


class GraderUnavailableError(Exception):
    """A grader needs a package that is not installed; the message says how to install it."""


def grade(answer: str | None, expected: str, spec: GraderSpec) -> Grade:
    """The score of `answer` for one of the pure graders (not `command`: see verifier.py).
    No answer scores 0. The math grader runs math-verify in this process: call it through
    math_worker.MathWorker for untrusted answers."""
    if answer is None or not answer.strip():
        return Grade(0.0, "no answer")
    if isinstance(spec, ExactGrader):
        return grade_exact(answer, expected, spec)
    if isinstance(spec, NumericGrader):
        return grade_numeric(answer, expected, spec)
    if isinstance(spec, RegexGrader):
        return grade_regex(answer, expected, spec)
    if isinstance(spec, ChoiceGrader):
        return grade_choice(answer, expected, spec)
    if isinstance(spec, MathGrader):
        from .math_grading import grade_math

        return grade_math(answer, expected, spec.timeout_seconds)
    raise ValueError(f"the {spec.type} grader runs in the sandbox, not as a function")


__all__ = [
    "GRADER_TYPES",
    "ChoiceGrader",
    "CommandGrader",
    "ExactGrader",
    "Grade",
    "GraderSpec",
    "Grading",
    "MathGrader",
    "NumericGrader",
    "RegexGrader",
    "grade",
    "parse_grader",
]
