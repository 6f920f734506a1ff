"""Admission per inference endpoint: the caps an admin sets, and a limit the operator learns from
what the agents report (additive increase, multiplicative decrease). Pure: the clock is passed in.

What saturates first at scale is rarely the cluster: it is the inference endpoint, which answers
429 (Too Many Requests) or slows down. Every task's result says how many 429s its agent was given
(`usage.llmThrottled`), how many calls it had to retry for any reason (`usage.llmRetries`: 429s,
5xx, timeouts, dropped connections) and how long its answered calls took (`usage.llmSeconds`).
From those:

- A task of a group that was throttled or had to retry (or whose mean call latency is above the
  group's `latency_target_seconds`) multiplies the group's limit by `DECREASE` (at least 1), unless the
  task was admitted before the group's last decrease: it ran under the old limit, which has
  already been answered for, so one overload episode costs one decrease, as in TCP.
- A task that made calls and was not throttled adds 1/limit: about one more task per round of
  `limit` tasks that went well, up to the group's ceiling (its cap, else the global cap).

A group is the first endpoint rule a task matches (a rule for its model at its base URL before
one for the whole base URL); a task no rule matches is a group of its own (base URL, model),
limited only by what it learns. Learnt limits live in memory: a restarted operator starts again
from the ceilings and learns again within a few rounds of tasks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sandbox_agent.result import Usage

from .endpoints import canonical_base_url
from .settings import EndpointLimit

DECREASE = 0.7
"""The factor a throttled round multiplies a limit by: the limit then stays between about 0.7x
and 1x of what the endpoint takes (0.5, TCP's, would leave more capacity unused)."""
MAX_GROUPS = 1_000
"""Groups kept without a rule of their own (the least recently used go: they restart learning)."""


def group_name(base_url: str, model: str | None) -> str:
    """How a group is named in metrics and messages: `model @ base URL` (or the URL alone)."""
    return f"{model} @ {base_url}" if model else base_url


@dataclass
class GroupLimit:
    """One group's state: its fixed ceiling (None: none) and its learnt limit (None: not
    learnt, so the ceiling applies)."""

    name: str
    ceiling: int | None
    latency_target: float | None = None
    learnt: float | None = None
    last_decrease: float = -math.inf
    throttled_tasks: int = 0

    @property
    def limit(self) -> int | None:
        """How many of the group's tasks may run at once (None: no limit of the group's own)."""
        if self.learnt is None:
            return self.ceiling
        learnt = max(1, math.floor(self.learnt))
        return learnt if self.ceiling is None else min(self.ceiling, learnt)

    def congested(self, usage: Usage) -> bool:
        """Whether a task's usage shows an endpoint over its capacity: a 429, another retry
        (a 5xx, a timeout, a dropped connection: what an overloaded server gives too), or
        calls slower than the latency target."""
        if usage.llm_throttled > 0 or usage.llm_retries > 0:
            return True
        if self.latency_target is None or usage.llm_calls == 0:
            return False
        return usage.llm_seconds / usage.llm_calls > self.latency_target

    def observe(self, usage: Usage, admitted_at: float, running: int, now: float) -> bool:
        """Learn from one finished task; `running`: how many of the group's tasks were active as
        it ended, itself included. True when the limit changed."""
        before = self.limit
        if self.congested(usage):
            self.throttled_tasks += 1
            if admitted_at < self.last_decrease:
                return False  # it ran under a limit that has already been cut
            using = max(1, running)
            current = using if self.limit is None else min(self.limit, using)
            self.learnt = max(1.0, current * DECREASE)
            self.last_decrease = now
        elif usage.llm_calls > 0 and self.learnt is not None and running >= (self.limit or 0):
            # Grown only while the limit is in use: an idle group learns nothing about capacity.
            grown = self.learnt + 1.0 / self.learnt
            self.learnt = grown if self.ceiling is None else min(float(self.ceiling), grown)
        return self.limit != before


class EndpointAdmission:
    """Every group's limit: which group a task is in, how many of it may run, and what each
    finished task teaches."""

    def __init__(self, rules: list[EndpointLimit], adaptive: bool) -> None:
        self.adaptive = adaptive
        self.groups: dict[str, GroupLimit] = {}
        for rule in rules:
            name = group_name(canonical_base_url(rule.base_url), rule.model)
            self.groups[name] = GroupLimit(name, rule.max_running, rule.latency_target_seconds)
        self._ruled = set(self.groups)
        self._keys: dict[tuple[str, str], str] = {}

    def group_of(self, base_url: str, model: str) -> str:
        """The group of a task that sends its calls for `model` to `base_url`."""
        key = (base_url, model)
        found = self._keys.get(key)
        if found is not None and found in self.groups:
            return found
        url = canonical_base_url(base_url)
        name = group_name(url, model)
        if name not in self.groups:
            whole = group_name(url, None)
            if whole in self._ruled:
                name = whole
            else:
                self._new_group(name)
        self._keys[key] = name
        return name

    def _new_group(self, name: str) -> None:
        unruled = [n for n in self.groups if n not in self._ruled]
        if len(unruled) >= MAX_GROUPS:
            oldest = unruled[0]
            del self.groups[oldest]
            self._keys = {k: v for k, v in self._keys.items() if v != oldest}
        self.groups[name] = GroupLimit(name, None)

    def limit(self, group: str) -> int | None:
        """How many of the group's tasks may run at once; None: only the global cap applies."""
        state = self.groups.get(group)
        if state is None:
            return None
        return state.limit if self.adaptive else state.ceiling

    def free(self, running: Mapping[str, int]) -> dict[str, int]:
        """Room left in every group that has a limit (groups without one are absent)."""
        room: dict[str, int] = {}
        for name in self.groups:
            limit = self.limit(name)
            if limit is not None:
                room[name] = max(0, limit - running.get(name, 0))
        return room

    def observe(
        self, group: str, usage: Usage, admitted_at: float, running: int, now: float
    ) -> bool:
        """Learn from a finished task of `group`; True when the group's limit changed."""
        state = self.groups.get(group)
        if state is None or not self.adaptive:
            return False
        return state.observe(usage, admitted_at, running, now)

    def limits(self) -> Iterable[tuple[str, int | None]]:
        """Each group's current limit, for the metric."""
        return ((name, self.limit(name)) for name in self.groups)
