"""docs/reliability.md is a table of fault -> behaviour -> test; every test it names must exist.

The suite itself shows that the named tests pass; this keeps the table from pointing at tests
that were renamed or removed, and every row from going without a test.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
# `tests/test_x.py::test_name` or `tests/test_x.py::test_name[param-id]`
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[[^\]`]+\])?`")


def table_rows(text: str) -> list[list[str]]:
    """The body rows of every Markdown table in the document, as lists of cells."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if all(set(c) <= set("-: ") for c in cells) or cells[0] == "Fault":
            continue
        rows.append(cells)
    return rows


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_row_names_a_fault_a_behaviour_and_existing_tests() -> None:
    rows = table_rows(DOC.read_text())
    assert len(rows) >= 40, "the table lost its rows"
    problems = []
    for cells in rows:
        if len(cells) != 3 or not all(cells):
            problems.append(f"row without fault, behaviour and test: {cells}")
            continue
        refs = REFERENCE.findall(cells[2])
        if not refs:
            problems.append(f"row names no test: {cells[0]!r}")
        for file, name in refs:
            path = REPO / file
            if not path.is_file():
                problems.append(f"{cells[0]!r}: no file {file}")
            elif name not in defined_tests(path):
                problems.append(f"{cells[0]!r}: no test {name} in {file}")
    assert problems == []


def test_the_checker_notices_a_missing_test(tmp_path: Path) -> None:
    rows = table_rows(
        "| Fault | Behaviour | Test |\n|---|---|---|\n"
        "| a | b | `tests/test_reliability_doc.py::test_no_such_test` |\n"
    )
    assert rows == [["a", "b", "`tests/test_reliability_doc.py::test_no_such_test`"]]
    (file, name) = REFERENCE.findall(rows[0][2])[0]
    assert name not in defined_tests(REPO / file)
