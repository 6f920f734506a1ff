"""The SandboxTaskSet model and its pure parts: items, expansion into tasks, the summary."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sandbox_agent.errors import TaskSpecError
from sandbox_agent.result import ExitReason, Phase
from sandbox_agent.taskset import (
    SampleResult,
    SetItem,
    check_items,
    child_spec,
    children,
    item_keys,
    k_values,
    parse_items,
    parse_set,
    pass_at_k,
    summarise,
)


def set_doc(**spec: Any) -> dict[str, Any]:
    spec.setdefault("items", [{"id": "a", "prompt": "What is 1+1?", "expected": "2"}])
    return {"apiVersion": "llmsandbox.io/v1alpha1", "kind": "SandboxTaskSet",
            "metadata": {"name": "s"}, "spec": spec}  # fmt: skip


def test_the_papers_item_shape_is_accepted_as_is() -> None:
    line = {"id": 7, "problem_statement": "Read data.txt", "ground_truth": 12,
            "input_files": {"data.txt": "1 2 3"}, "category": "physics"}  # fmt: skip
    (item,) = parse_items([json.dumps(line)], "items.jsonl")
    assert (item.id, item.prompt, item.expected) == ("7", "Read data.txt", "12")
    assert [(f.path, f.content) for f in item.inputs] == [("data.txt", "1 2 3")]
    assert item.vars == {"category": "physics"}


def test_paper_input_files_as_paths_are_local_files() -> None:
    item = SetItem.model_validate({"id": "x", "prompt": "p", "input_files": ["data/a.csv"]})
    assert [(f.path, f.file) for f in item.inputs] == [("a.csv", "data/a.csv")]


def test_a_jsonl_error_names_the_line_and_field() -> None:
    lines = ['{"id": "a", "prompt": "p"}\n', "\n", '{"prompt": "q"}\n']
    with pytest.raises(TaskSpecError) as caught:
        parse_items(lines, "items.jsonl")
    assert str(caught.value) == "items.jsonl: line 3.id: Field required"


def test_a_line_that_is_not_json_is_named() -> None:
    with pytest.raises(TaskSpecError, match=r"^items.jsonl: line 1: not JSON: "):
        parse_items(["{nope\n"], "items.jsonl")


def test_a_json_list_is_read_too() -> None:
    items = parse_items(['[{"id": "a", "prompt": "p"}, {"id": "b", "prompt": "q"}]'], "f")
    assert [i.id for i in items] == ["a", "b"]


def test_template_fields_are_filled_from_the_item() -> None:
    taskset = parse_set(set_doc(
        template={"prompt": "Solve {{ prompt }} ({{topic}}, item {{ id }})",
                  "inputs": [{"path": "{{ id }}.txt", "content": "topic={{ topic }}"}]},
        items=[{"id": "q1", "prompt": "2+2", "topic": "sums", "expected": "4"}],
        grader={"type": "numeric"},
    ))  # fmt: skip
    assert taskset.spec.items is not None
    spec = child_spec(taskset.spec, taskset.spec.items[0], 0)
    assert spec.prompt == "Solve 2+2 (sums, item q1)"
    assert [(f.path, f.content) for f in spec.inputs] == [("q1.txt", "topic=sums")]
    assert spec.grading is not None
    assert spec.grading.expected == "4"


def test_an_items_own_prompt_replaces_a_template_prompt_without_the_placeholder() -> None:
    taskset = parse_set(
        set_doc(template={"prompt": "generic"}, items=[{"id": "a", "prompt": "own"}])
    )
    assert taskset.spec.items is not None
    assert child_spec(taskset.spec, taskset.spec.items[0], 0).prompt == "own"


def test_a_missing_field_is_refused_naming_it() -> None:
    taskset = parse_set(set_doc(template={"prompt": "{{ topic }}"}, items=[{"id": "a"}]))
    with pytest.raises(TaskSpecError) as caught:
        check_items(taskset.spec, taskset.spec.items or [])
    assert str(caught.value) == (
        "items[0] (a): spec.template.prompt: the item has no field 'topic' (it has id)"
    )


def test_the_expected_answer_is_never_put_in_a_prompt() -> None:
    with pytest.raises(TaskSpecError) as caught:
        parse_set(set_doc(template={"prompt": "answer is {{ expected }}"}))
    assert str(caught.value) == "spec.template: {{ expected }} would show the model the answer"


def test_items_are_checked_all_at_once() -> None:
    taskset = parse_set(set_doc(
        grader={"type": "exact"},
        items=[{"id": "a", "prompt": "p"}, {"id": "a", "prompt": "q", "expected": "x"}],
    ))  # fmt: skip
    with pytest.raises(TaskSpecError) as caught:
        check_items(taskset.spec, taskset.spec.items or [])
    assert str(caught.value).splitlines() == [
        "items[0].expected: the exact grader needs one",
        "items[1].id: 'a' repeats items[0]",
    ]


def test_a_set_needs_exactly_one_source_of_items() -> None:
    with pytest.raises(TaskSpecError, match="spec: set exactly one of items or itemsFrom"):
        parse_set(set_doc(itemsFrom={"file": "items.jsonl"}))


def test_the_template_may_not_grade() -> None:
    doc = set_doc(template={"grading": {"grader": {"type": "exact"}, "expected": "x"}})
    with pytest.raises(TaskSpecError, match="spec.template: grading: the set's grader"):
        parse_set(doc)


def test_child_names_are_deterministic_unique_and_short() -> None:
    items = [SetItem(id=i, prompt="p") for i in ("q7", "q1", "Q1", "a_b", "x" * 200)]
    keys = item_keys("aime", items, 2)
    assert keys[0] == "q7"
    assert keys[1].startswith("q1-")
    assert keys[2].startswith("q1-")
    assert keys[3].startswith("a-b-")
    assert len(set(keys)) == 5
    assert keys == item_keys("aime", items, 2)
    names = [c.name for c in children("aime", items, 2)]
    assert names[:2] == ["aime-q7-0", "aime-q7-1"]
    assert all(len(n) <= 63 for n in names)
    assert len(set(names)) == 10


def test_unbiased_pass_at_k() -> None:
    assert pass_at_k(2, 1, 1) == 0.5
    assert pass_at_k(2, 1, 2) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 0, 3) == 0.0
    assert k_values(1) == [1]
    assert k_values(2) == [1, 2]
    assert k_values(10) == [1, 2, 4, 8, 10]


def r(
    item: str, sample: int, reason: ExitReason, score: float | None, tokens: int = 10
) -> SampleResult:
    phase = Phase.SUCCEEDED if reason is ExitReason.SUBMITTED else Phase.FAILED
    return SampleResult(item, sample, phase, reason, score, tokens, 1, 0.5)


def test_the_summary_leaves_infrastructure_failures_out_of_the_scores() -> None:
    results = [
        r("a", 0, ExitReason.SUBMITTED, 1.0), r("a", 1, ExitReason.SUBMITTED, 0.0),
        r("b", 0, ExitReason.MAX_STEPS, 0.0), r("b", 1, ExitReason.EVICTED, None),
        r("c", 0, ExitReason.SUBMITTED, 1.0), r("c", 1, ExitReason.SUBMITTED, 1.0),
    ]  # fmt: skip
    s = summarise(results, tasks=8, samples=2)
    assert (s.tasks, s.finished, s.graded, s.infrastructure_failures) == (8, 6, 5, 1)
    assert s.accuracy == pytest.approx(3 / 5, abs=1e-6)
    # pass@1 over a (0.5), b (0 from its one scored sample), c (1); pass@2 only a and c.
    assert s.pass_at_k == {"1": 0.5, "2": 1.0}
    assert s.exit_reasons == {"submitted": 4, "max_steps": 1, "evicted": 1}
    assert (s.usage.prompt_tokens, s.usage.completion_tokens, s.usage.cost_usd) == (60, 6, 3.0)
