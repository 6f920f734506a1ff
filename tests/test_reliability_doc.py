"""docs/reliability.md (fault -> behaviour -> test) and docs/security.md (attack -> what happens
-> test) are tables whose every row names tests; every test they name must exist.

The suite itself shows that the named tests pass; this keeps the tables from pointing at tests
that were renamed or removed, and every row from going without a test.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Each document, the first header cell of the tables to check, and how many rows they hold.
DOCS = [("docs/reliability.md", "Fault", 40), ("docs/security.md", "Attack", 30)]
# `tests/test_x.py::test_name` or `tests/test_x.py::test_name[param-id]`
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[[^\]`]+\])?`")


def table_rows(text: str, header: str = "Fault") -> list[list[str]]:
    """The body rows, as lists of cells, of every Markdown table whose first header cell is
    `header` (other tables are left out)."""
    rows = []
    current: str | None = None  # the first header cell of the table being read
    for line in text.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if all(set(c) <= set("-: ") for c in cells):
            continue
        if current is None:
            current = cells[0]
        elif current == header:
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


@pytest.mark.parametrize(("doc", "header", "at_least"), DOCS)
def test_every_row_names_a_fault_a_behaviour_and_existing_tests(
    doc: str, header: str, at_least: int
) -> None:
    rows = table_rows((REPO / doc).read_text(), header)
    assert len(rows) >= at_least, "the table lost its rows"
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


def test_reliability_links_to_the_threat_model() -> None:
    assert "docs/security.md" in (REPO / "docs" / "reliability.md").read_text()


def test_the_checker_notices_a_missing_test(tmp_path: Path) -> None:
    rows = table_rows(
        "| Fault | Behaviour | Test |\n|---|---|---|\n"
        "| a | b | `tests/test_reliability_doc.py::test_no_such_test` |\n"
    )
    assert rows == [["a", "b", "`tests/test_reliability_doc.py::test_no_such_test`"]]
    (file, name) = REFERENCE.findall(rows[0][2])[0]
    assert name not in defined_tests(REPO / file)


def test_the_checker_reads_only_the_tables_it_is_asked_for() -> None:
    text = (
        "| | trusted | untrusted |\n|---|---|---|\n| code | ours | theirs |\n\n"
        "| Attack | Now | Test |\n|---|---|---|\n| x | y | `tests/a.py::test_b` |\n"
    )
    assert table_rows(text, "Attack") == [["x", "y", "`tests/a.py::test_b`"]]
