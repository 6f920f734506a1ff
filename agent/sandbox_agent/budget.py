"""The token budget as arithmetic: what is left of limits.maxTokens (what the conversation holds)
and of limits.maxTotalTokens (the spend over all calls), the next call's max_tokens, and when
the budget is spent. Pure; the loop keeps the counts."""

from __future__ import annotations

from dataclasses import dataclass

from .task import Limits

# Below this many completion tokens a call cannot do useful work; the budget is spent.
MIN_CALL_TOKENS = 64


@dataclass(frozen=True)
class TokenBudget:
    max_tokens: int
    max_total_tokens: int | None = None

    @classmethod
    def of(cls, limits: Limits) -> TokenBudget:
        return cls(limits.max_tokens, limits.max_total_tokens)

    def left(self, conversation: int, spent: int) -> int:
        """Tokens left of the conversation budget and of the spend cap, whichever is less;
        `conversation` is the last call's prompt + completion, `spent` the sum over all calls."""
        left = self.max_tokens - conversation
        if self.max_total_tokens is not None:
            left = min(left, self.max_total_tokens - spent)
        return left

    def next_call(self, call_cap: int, conversation: int, spent: int) -> int | None:
        """The next call's max_tokens: the per-call cap, never more than is left; None when too
        little is left for a useful call."""
        max_tokens = min(call_cap, self.left(conversation, spent))
        return max_tokens if max_tokens >= MIN_CALL_TOKENS else None

    @staticmethod
    def shrunk(max_tokens: int) -> int | None:
        """The per-call cap after a call asking for `max_tokens` did not fit the model's context
        window: half as much, or None when that is too little for a useful call."""
        half = max_tokens // 2
        return half if half >= MIN_CALL_TOKENS else None

    def spent(self, conversation: int, spent: int) -> bool:
        """Whether the last reply used up the conversation budget or the spend cap."""
        if conversation >= self.max_tokens:
            return True
        return self.max_total_tokens is not None and spent >= self.max_total_tokens

    def spent_message(self, spent: int) -> str:
        """Which budget ended the task: the spend cap once (nearly) all of it is spent."""
        cap = self.max_total_tokens
        if cap is not None and spent >= cap - MIN_CALL_TOKENS:
            return f"{spent} tokens spent of limits.maxTotalTokens ({cap})"
        return f"the conversation reached limits.maxTokens ({self.max_tokens} tokens)"
