"""Counting one finished child task into a set's status, with taskset.summarise's rules: the
status then equals the summary of every counted result, without keeping the results."""

from __future__ import annotations

from sandbox_agent.taskset import SampleResult, k_values, pass_at_k, summarise

from .taskset_status import ItemTally, TaskSetStatus, format_ranges, parse_ranges, with_ordinal


def fold(
    status: TaskSetStatus, ordinal: int, item: int, result: SampleResult, samples: int
) -> None:
    """Count `result` (the child at `ordinal`, of item `item`) into `status`, in place. The
    caller checks the ordinal is not counted yet (`progress.folded`)."""
    one = summarise([result], tasks=1, samples=samples)
    status.finished += 1
    for phase, n in one.phases.items():
        status.phases[phase] = status.phases.get(phase, 0) + n
    for reason, n in one.exit_reasons.items():
        status.exit_reasons[reason] = status.exit_reasons.get(reason, 0) + n
    status.infrastructure_failures += one.infrastructure_failures
    usage, progress = status.usage, status.progress
    usage.prompt_tokens += one.usage.prompt_tokens
    usage.completion_tokens += one.usage.completion_tokens
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    if result.cost_usd is not None:
        progress.cost_usd = (progress.cost_usd or 0.0) + result.cost_usd
        usage.cost_usd = round(progress.cost_usd, 6)
    scored = one.graded == 1 and result.score is not None
    if scored:
        status.graded += 1
        progress.score_sum += float(result.score or 0.0)
    progress.folded = format_ranges(with_ordinal(parse_ranges(progress.folded), ordinal))
    _count_sample(status, item, scored, scored and float(result.score or 0.0) >= 1.0, samples)
    _derive(status, samples)


def _count_sample(
    status: TaskSetStatus, item: int, scored: bool, passed: bool, samples: int
) -> None:
    progress = status.progress
    tally = next((t for t in progress.open_items if t.index == item), None)
    if tally is None:
        tally = ItemTally(index=item)
        progress.open_items.append(tally)
    tally.finished += 1
    tally.scored += int(scored)
    tally.passed += int(passed)
    if tally.finished < samples:
        return
    # Every sample of the item is counted: its pass@k joins the sums and it leaves the list.
    progress.open_items = [t for t in progress.open_items if t.index != item]
    if samples > 1:
        for k in k_values(samples):
            if tally.scored >= k:
                key = str(k)
                value = pass_at_k(tally.scored, tally.passed, k)
                progress.pass_at_k_sums[key] = progress.pass_at_k_sums.get(key, 0.0) + value
                progress.pass_at_k_items[key] = progress.pass_at_k_items.get(key, 0) + 1


def _derive(status: TaskSetStatus, samples: int) -> None:
    """accuracy and pass@k from the sums: the completed items' and the open ones' so far, as
    summarise counts an item with at least k scored samples whether or not all have finished."""
    progress = status.progress
    if status.graded:
        status.accuracy = round(progress.score_sum / status.graded, 6)
    if samples <= 1:
        return
    for k in k_values(samples):
        key = str(k)
        total = progress.pass_at_k_sums.get(key, 0.0)
        items = progress.pass_at_k_items.get(key, 0)
        for tally in progress.open_items:
            if tally.scored >= k:
                total += pass_at_k(tally.scored, tally.passed, k)
                items += 1
        if items:
            status.pass_at_k[key] = round(total / items, 6)
