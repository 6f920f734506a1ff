"""The suite refuses to run when child processes would import another copy of the project."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO, checkout_problem, imported_from


def test_child_processes_of_this_run_import_this_checkout() -> None:
    assert imported_from() == [REPO / "agent", REPO / "operator"]
    assert checkout_problem(imported_from()) is None


def test_another_clones_install_is_named_with_the_fix() -> None:
    other = Path("/elsewhere/clone")
    problem = checkout_problem([other / "agent", other / "operator"])
    assert problem is not None
    assert "/elsewhere/clone/agent" in problem
    assert str(REPO) in problem
    assert "pip install -e ." in problem


def test_no_install_at_all_is_named() -> None:
    problem = checkout_problem([])
    assert problem is not None
    assert "it is not installed" in problem
