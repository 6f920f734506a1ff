"""The token budget's arithmetic, as a table: what the next call may ask for, and when it is spent."""

from __future__ import annotations

import pytest

from sandbox_agent.budget import TokenBudget
from sandbox_agent.task import Limits

CONVERSATION = TokenBudget(max_tokens=2000)
CAPPED = TokenBudget(max_tokens=2000, max_total_tokens=5000)


@pytest.mark.parametrize(
    ("budget", "call_cap", "conversation", "spent", "expected"),
    [
        pytest.param(CONVERSATION, 4096, 0, 0, 2000, id="first-call-gets-the-whole-budget"),
        pytest.param(CONVERSATION, 1024, 0, 0, 1024, id="never-more-than-the-per-call-cap"),
        pytest.param(CONVERSATION, 4096, 600, 600, 1400, id="what-the-conversation-left"),
        pytest.param(CONVERSATION, 4096, 1936, 9000, 64, id="64-left-is-still-a-call"),
        pytest.param(CONVERSATION, 4096, 1937, 0, None, id="63-left-is-spent"),
        pytest.param(CONVERSATION, 4096, 2500, 0, None, id="overdrawn-is-spent"),
        pytest.param(CAPPED, 4096, 600, 4200, 800, id="the-spend-cap-leaves-less"),
        pytest.param(CAPPED, 4096, 1500, 1500, 500, id="the-conversation-leaves-less"),
        pytest.param(CAPPED, 4096, 100, 4950, None, id="the-spend-cap-is-spent"),
    ],
)
def test_the_next_call_asks_for_what_both_budgets_leave(
    budget: TokenBudget, call_cap: int, conversation: int, spent: int, expected: int | None
) -> None:
    assert budget.next_call(call_cap, conversation, spent) == expected


@pytest.mark.parametrize(
    ("max_tokens", "expected"),
    [(4096, 2048), (129, 64), (128, 64), (127, None), (64, None)],
)
def test_a_call_that_did_not_fit_is_halved_until_too_small(
    max_tokens: int, expected: int | None
) -> None:
    assert TokenBudget.shrunk(max_tokens) == expected


@pytest.mark.parametrize(
    ("budget", "conversation", "spent", "expected"),
    [
        (CONVERSATION, 1999, 100_000, False),
        (CONVERSATION, 2000, 2000, True),
        (CAPPED, 1000, 4999, False),
        (CAPPED, 1000, 5000, True),
        (CAPPED, 2000, 2000, True),
    ],
)
def test_a_reply_spends_the_budget_when_either_is_reached(
    budget: TokenBudget, conversation: int, spent: int, expected: bool
) -> None:
    assert budget.spent(conversation, spent) is expected


@pytest.mark.parametrize(
    ("budget", "spent", "expected"),
    [
        (CONVERSATION, 100_000, "the conversation reached limits.maxTokens (2000 tokens)"),
        (CAPPED, 4935, "the conversation reached limits.maxTokens (2000 tokens)"),
        (CAPPED, 4936, "4936 tokens spent of limits.maxTotalTokens (5000)"),
        (CAPPED, 5100, "5100 tokens spent of limits.maxTotalTokens (5000)"),
    ],
)
def test_the_message_names_the_budget_that_ended_the_task(
    budget: TokenBudget, spent: int, expected: str
) -> None:
    assert budget.spent_message(spent) == expected


def test_the_budget_is_the_tasks_two_limits() -> None:
    limits = Limits.model_validate({"maxTokens": 3000, "maxTotalTokens": 9000})
    assert TokenBudget.of(limits) == TokenBudget(3000, 9000)
    assert TokenBudget.of(Limits()) == TokenBudget(131_072, None)
