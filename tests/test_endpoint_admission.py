"""Admission per endpoint group, pure: which group a task is in, the queue walked within each
group's room, and the limit learnt from the agents' 429s and latency (AIMD)."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from conftest import settings_refusal
from sandbox_agent.result import Usage
from sandbox_operator.admission import Candidate, queue_order, to_admit_within
from sandbox_operator.endpoint_admission import DECREASE, EndpointAdmission, GroupLimit
from sandbox_operator.endpoints import canonical_base_url
from sandbox_operator.settings import EndpointLimit, OperatorSettings

VLLM = "http://vllm.inference:8000/v1"


def rule(max_running: int, model: str | None = None, **extra: object) -> EndpointLimit:
    return EndpointLimit.model_validate(
        {"base_url": VLLM, "model": model, "max_running": max_running, **extra}
    )


def ok(calls: int = 3, seconds: float = 1.5) -> Usage:
    return Usage(llm_calls=calls, llm_seconds=seconds)


def throttled(n: int = 2) -> Usage:
    return Usage(llm_calls=3, llm_seconds=1.5, llm_throttled=n)


def test_a_task_is_in_its_models_group_else_its_base_urls_else_a_group_of_its_own() -> None:
    admission = EndpointAdmission([rule(4, model="big"), rule(10)], adaptive=True)
    assert admission.group_of(VLLM, "big") == f"big @ {VLLM}"
    assert admission.group_of("HTTP://VLLM.inference:8000/v1/", "small") == VLLM
    other = admission.group_of("https://api.example.com/v1", "gpt")
    assert other == "gpt @ https://api.example.com/v1"
    assert admission.limit(f"big @ {VLLM}") == 4
    assert admission.limit(VLLM) == 10
    assert admission.limit(other) is None  # only the global cap, until it learns otherwise
    assert canonical_base_url("HTTPS://Api.Example.com/v1/") == "https://api.example.com/v1"


def test_a_throttled_task_cuts_the_limit_and_good_rounds_grow_it_back_to_the_cap() -> None:
    group = GroupLimit("g", ceiling=10)
    assert group.observe(throttled(), admitted_at=1.0, running=10, now=2.0)
    assert group.limit == 7 == int(10 * DECREASE)
    # Tasks admitted before that cut ran under the old limit: their 429s are already answered.
    assert not group.observe(throttled(), admitted_at=1.5, running=9, now=3.0)
    assert group.limit == 7
    # Admitted after it, and throttled again: cut again.
    assert group.observe(throttled(), admitted_at=2.5, running=7, now=4.0)
    assert group.limit == 4
    # Good tasks while the limit is in use add 1/limit each: one more per round of `limit`.
    for _ in range(4):
        group.observe(ok(), admitted_at=5.0, running=4, now=6.0)
    assert group.limit == 5
    for _ in range(200):
        group.observe(ok(), admitted_at=5.0, running=group.limit or 0, now=6.0)
    assert group.limit == 10, "never above the admin's cap"


def test_a_group_learns_nothing_from_good_tasks_while_its_limit_is_not_in_use() -> None:
    group = GroupLimit("g", ceiling=None)
    group.observe(throttled(), admitted_at=1.0, running=10, now=2.0)
    assert group.limit == 7
    for _ in range(50):
        group.observe(ok(), admitted_at=3.0, running=2, now=4.0)
    assert group.limit == 7


def test_without_a_cap_the_first_throttle_starts_from_what_was_running() -> None:
    group = GroupLimit("g", ceiling=None)
    assert group.limit is None
    group.observe(ok(), admitted_at=0.0, running=30, now=1.0)
    assert group.limit is None, "nothing to learn from a good task without a limit"
    group.observe(throttled(), admitted_at=0.0, running=20, now=1.0)
    assert group.limit == 14


@pytest.mark.parametrize(
    ("usage", "congested"),
    [
        (Usage(llm_calls=2, llm_seconds=2.0), False),  # 1 s a call: at the target
        (Usage(llm_calls=2, llm_seconds=2.2), True),  # slower than the target
        (Usage(llm_calls=0, llm_seconds=0.0), False),  # no call answered: no latency to judge
        (Usage(llm_calls=2, llm_seconds=0.2, llm_throttled=1, llm_retries=1), True),
        (Usage(llm_calls=2, llm_seconds=0.2, llm_retries=1), True),  # a 503 or a timeout
    ],
)
def test_429s_retries_and_latency_above_the_target_count_as_congestion(
    usage: Usage, congested: bool
) -> None:
    assert GroupLimit("g", ceiling=8, latency_target=1.0).congested(usage) is congested


def test_never_below_one_and_a_task_without_calls_teaches_nothing() -> None:
    group = GroupLimit("g", ceiling=2)
    for step in range(10):
        group.observe(throttled(), admitted_at=float(step * 2 + 1), running=1, now=step * 2 + 2)
    assert group.limit == 1
    before = group.learnt
    group.observe(Usage(), admitted_at=100.0, running=1, now=101.0)
    assert group.learnt == before


def test_without_adaptive_admission_only_the_caps_apply() -> None:
    admission = EndpointAdmission([rule(6)], adaptive=False)
    group = admission.group_of(VLLM, "m")
    assert not admission.observe(group, throttled(), 1.0, 6, 2.0)
    assert admission.limit(group) == 6
    assert admission.free({group: 4}) == {group: 2}


def cand(name: str, group: str, priority: int = 0, second: int = 0) -> Candidate:
    return Candidate(
        uid=name,
        namespace="default",
        name=name,
        priority=priority,
        created=f"2026-01-01T00:{second // 60:02d}:{second % 60:02d}Z",
        base_url=group,
    )


def walk(waiting: list[Candidate], slots: int | None, room: dict[str, int]) -> list[Candidate]:
    """The specification: the queue in order, each task taken when its group and the global
    slots have room."""
    left = dict(room)
    chosen: list[Candidate] = []
    for c in queue_order(waiting):
        if slots is not None and len(chosen) >= slots:
            break
        group = c.base_url or ""
        if group in left:
            if left[group] <= 0:
                continue
            left[group] -= 1
        chosen.append(c)
    return chosen


def by_url(c: Candidate) -> str:
    return c.base_url or ""


def test_a_full_group_does_not_hold_back_the_tasks_behind_it() -> None:
    waiting = [cand(f"a{i}", "a", second=i) for i in range(5)] + [cand("b0", "b", second=10)]
    chosen = to_admit_within(waiting, 3, by_url, {"a": 1})
    assert [c.name for c in chosen] == ["a0", "b0"]
    assert to_admit_within(waiting, 3, by_url, {"a": 0, "b": 0}) == []


def test_admission_within_groups_equals_walking_the_queue() -> None:
    rng = random.Random(7)
    for _ in range(300):
        waiting = [
            cand(f"t{i}", rng.choice("abcd"), priority=rng.choice([0, 0, 5]), second=rng.randrange(600))
            for i in range(rng.randrange(0, 30))
        ]  # fmt: skip
        room = {g: rng.randrange(0, 4) for g in "abc" if rng.random() < 0.7}
        slots = rng.choice([None, 0, 1, 3, 8, 50])
        got = to_admit_within(waiting, slots, by_url, room)
        assert queue_order(got) == walk(waiting, slots, room)


def test_endpoint_limits_are_read_from_the_environment_and_bad_ones_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "LLMSANDBOX_ENDPOINT_LIMITS",
        f'[{{"base_url": "{VLLM}", "max_running": 8, "latency_target_seconds": 20}}]',
    )
    settings = OperatorSettings()
    assert settings.endpoint_limits == [rule(8, latency_target_seconds=20)]
    assert settings.adaptive_admission is True
    with pytest.raises(ValidationError, match="max_running"):
        rule(0)
    with pytest.raises(ValidationError, match="base_url"):
        EndpointLimit.model_validate({"base_url": "ftp://x", "max_running": 2})
    twice = (
        f'[{{"base_url": "{VLLM}", "max_running": 8}}, {{"base_url": "{VLLM}/", "max_running": 2}}]'
    )
    monkeypatch.setenv("LLMSANDBOX_ENDPOINT_LIMITS", twice)
    with pytest.raises(ValidationError, match=r"endpoint_limits\[1\]: a second limit for"):
        OperatorSettings()


def test_a_bad_endpoint_limit_stops_the_operator_with_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lines = settings_refusal(
        monkeypatch, {"LLMSANDBOX_ENDPOINT_LIMITS": f'[{{"base_url": "{VLLM}", "max_running": 0}}]'}
    )
    assert len(lines) == 1, lines
    assert lines[0].startswith("LLMSANDBOX_ENDPOINT_LIMITS")
    assert "max_running" in lines[0]
