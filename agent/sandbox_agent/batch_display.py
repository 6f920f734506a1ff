"""How a batch is shown: a live progress bar on stderr while it runs, a summary table at the end."""

from __future__ import annotations

import time
from typing import TextIO

from .batch import BatchOutcome, BatchProgress

BAR_WIDTH = 24
# Without a terminal (CI logs), a progress line at most this often, or every tenth of the batch.
PLAIN_INTERVAL_SECONDS = 10.0


def human_count(n: int) -> str:
    """1234 -> 1.2k, 1234567 -> 1.2M."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def human_seconds(seconds: float) -> str:
    whole = round(seconds)
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    if whole >= 60:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole}s"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def progress_line(p: BatchProgress, width: int = BAR_WIDTH) -> str:
    filled = width * p.done // p.total if p.total else width
    bar = "#" * filled + "-" * (width - filled)
    parts = [f"[{bar}] {p.done}/{p.total}"]
    if p.failed:
        infra = f" (infra {p.infrastructure_failures})" if p.infrastructure_failures else ""
        parts.append(f"failed {p.failed}{infra}")
    parts.append(f"accuracy {percent(p.accuracy)}")
    parts.append(f"tokens {human_count(p.tokens)}")
    if p.rate > 0:
        parts.append(f"{p.rate:.2f}/s")
    if p.eta_seconds is not None and p.done < p.total:
        parts.append(f"ETA {human_seconds(p.eta_seconds)}")
    return "  ".join(parts)


class ProgressBar:
    """The progress line: redrawn in place on a terminal; on anything else a new line every
    PLAIN_INTERVAL_SECONDS or tenth of the batch, and always the last."""

    def __init__(self, stream: TextIO, quiet: bool = False) -> None:
        self.stream = stream
        self.quiet = quiet
        self.live = stream.isatty()
        self._shown_at = 0.0
        self._shown_tenth = -1

    def __call__(self, progress: BatchProgress) -> None:
        if self.quiet:
            return
        line = progress_line(progress)
        if self.live:
            self.stream.write(f"\r{line}\x1b[K")
            self.stream.flush()
            return
        tenth = 10 * progress.done // max(1, progress.total)
        now = time.monotonic()
        last = progress.done == progress.total
        if last or tenth != self._shown_tenth or now - self._shown_at >= PLAIN_INTERVAL_SECONDS:
            self._shown_at, self._shown_tenth = now, tenth
            print(line, file=self.stream, flush=True)

    def end(self) -> None:
        """Leave the bar's line (the next output starts on a line of its own)."""
        if self.live and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()


def summary_table(outcome: BatchOutcome) -> str:
    """The batch's results as a two-column table, then its exit reasons."""
    s = outcome.summary
    u = s.usage
    ran = len(outcome.rows) - outcome.skipped
    rate = ran / outcome.elapsed_seconds if outcome.elapsed_seconds > 0 else 0.0
    rows = [
        ("tasks", f"{s.finished}/{s.tasks} finished"),
        ("succeeded", str(s.phases.get("Succeeded", 0))),
        ("failed", str(s.phases.get("Failed", 0))),
        ("infrastructure", f"{s.infrastructure_failures} (not scored)"),
        ("graded", str(s.graded)),
        ("accuracy", percent(s.accuracy)),
    ]
    rows += [(f"pass@{k}", percent(v)) for k, v in s.pass_at_k.items()]
    rows += [
        ("tokens", f"{u.total_tokens} ({u.prompt_tokens} prompt + {u.completion_tokens} completion)"),
        ("cost", "-" if u.cost_usd is None else f"${u.cost_usd:.4f}"),
        ("time", f"{human_seconds(outcome.elapsed_seconds)} at --parallel {outcome.parallel} "
                 f"({rate:.2f} tasks/s)"),
        ("results", str(outcome.out_dir / "results.jsonl")),
    ]  # fmt: skip
    if outcome.skipped:
        rows.insert(1, ("resumed", f"{outcome.skipped} finished before, not run again"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    if s.exit_reasons:
        reasons = sorted(s.exit_reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append(f"{'exit reasons':<{width}}  " + ", ".join(f"{r} {n}" for r, n in reasons))
    return "\n".join(lines)
