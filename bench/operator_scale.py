"""Operator scale: 10,000 SandboxTasks through the operator, clean-up on and off, memory measured.

    python bench/operator_scale.py [--tasks 10000] [--backlog 200] [--max-running 50]
                                   [--warmup 1000] [--modes ttl0,keep] [--no-memory-verdict]

Each mode runs the real operator (`python -m sandbox_operator`, a subprocess) against the
emulated API server with the test kubelet completing every pod at once, the way
bench/operator_load.py does, but fed steadily as a cluster in long use is: a new task is
created whenever fewer than `--backlog` tasks are unfinished, until N were created. Modes:

- `ttl0`: LLMSANDBOX_TASK_TTL_SECONDS=0, finished tasks are deleted at once (clean-up on);
- `keep`: no TTL, all N finished tasks stay (the operator keeps a compact record of each).

Finished pods are deleted once their result is read in both (the operator's default). Then the
no-op kopf operator of bench/operator_load.py (one `@kopf.on.event` handler each for
sandboxtasks and the managed pods) is started the same way and fed the same watch events,
replayed at their recorded pace: the floor of receiving that traffic with kopf.

Every `--sample-every` finished tasks both processes' RSS is read from /proc. Printed:

- per mode, the operator's and the no-op's RSS when ready, after the warm-up (`--warmup`
  finished tasks), at the end (settled, just before SIGTERM) and the peak (VmHWM), as a table,
  and the RSS curve (finished tasks vs MiB);
- RSS growth per task after the warm-up, operator against no-op kopf;
- the operator's writes per task: the path of a task admitted at once and of a task that
  waited in the queue, each counted from the API request log and the watch events (status
  patches, pod and ConfigMap creates, the TTL delete), apart from the periodic queue-position
  refreshes and the finished pods' deletes;
- the targets as PASS/FAIL: RSS at most 100 MiB after N tasks with clean-up on; growth per task
  after the warm-up at most 1.5x the no-op's in each mode (a no-op growth under 1 KiB per task
  is taken as 1 KiB: below that both figures are the allocator's noise); at most 4 writes per
  task on the common path, plus the delete with a TTL;
- a check that every task reached Succeeded exactly once with one pod, and with TTL 0 that
  every task was deleted.

Exits 1 when a check or a target failed, 2 when an operator did not start.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the emulator and the test kubelet live in tests/k8s
sys.path.insert(0, str(REPO / "bench"))

import operator_load as load  # noqa: E402
from k8s.emulator import EmulatedApiServer, ResourceDef  # noqa: E402
from k8s.kubelet import TestKubelet  # noqa: E402
from k8s.process import ProcSample, free_port  # noqa: E402
from k8s.process import proc_sample as sample  # noqa: E402
from k8s.workload import SUCCESS, api_key_secret, short_task  # noqa: E402

RSS_TARGET_MIB = 100
GROWTH_RATIO_TARGET = 1.5
GROWTH_FLOOR_KIB = 1.0
WRITES_TARGET = 4
MODES = ("ttl0", "keep")
# Watch events a reconnecting watch may resume from: a few minutes of this traffic.
HISTORY = 200_000


@dataclass
class ScaleRecorder(load.Recorder):
    """Also counts deleted tasks, and wakes the feeder when a task finishes or goes."""

    deleted: set[str] = field(default_factory=set)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, res: ResourceDef, type_: str, obj: dict[str, Any]) -> None:
        super().__call__(res, type_, obj)
        if self.on and res.plural == "sandboxtasks":
            if type_ == "DELETED":
                self.deleted.add(obj["metadata"]["name"])
            with self.changed:
                self.changed.notify_all()


@dataclass
class ScaleRun:
    label: str
    ready: ProcSample
    done: ProcSample
    curve: list[tuple[int, ProcSample]]  # (finished tasks, sample)
    drain_seconds: float
    finished: bool
    events: list[load.Event]
    requests: collections.Counter[tuple[str, str]]
    status_patches_by_task: collections.Counter[str]
    final_tasks: list[dict[str, Any]]
    returncode: int | None
    log_tail: str

    def rss_at(self, finished: int) -> ProcSample:
        """The first sample taken with at least `finished` tasks done (the last one if none)."""
        for count, point in self.curve:
            if count >= finished:
                return point
        return self.curve[-1][1] if self.curve else self.ready


def task_name(i: int) -> str:
    return f"scale-{i:05d}"


def pods_created(events: list[load.Event]) -> collections.Counter[str]:
    """Pods created per task name (their ADDED events)."""
    return collections.Counter(
        (ev.obj["metadata"].get("labels") or {}).get("llmsandbox.io/task", "?")
        for ev in events
        if ev.resource == "pods" and ev.type == "ADDED"
    )


def task_body(i: int) -> dict[str, Any]:
    return short_task(
        task_name(i),
        inputs=[{"path": "q.txt", "content": "six times seven"}],
        limits={"maxSteps": 8, "activeDeadlineSeconds": 600},
        sandbox={"image": "llm-sandbox/sandbox-python:test"},
    )


def _room(recorder: ScaleRecorder, made: int, backlog: int) -> bool:
    return made - len(recorder.terminal) < backlog


def replay_feed(api: EmulatedApiServer, _recorder: ScaleRecorder, events: list[load.Event]) -> None:
    load.replay(api, events, time.monotonic())


def steady_feed(api: EmulatedApiServer, recorder: ScaleRecorder, n: int, backlog: int) -> None:
    """Create tasks one by one, keeping at most `backlog` of them unfinished."""
    for i in range(n):
        with recorder.changed:
            recorder.changed.wait_for(functools.partial(_room, recorder, i, backlog), 60)
        api.create(task_body(i))


def measured(
    label: str,
    argv: list[str],
    env: dict[str, str],
    *,
    n: int,
    expect_deleted: bool,
    sample_every: int,
    timeout: float,
    work_dir: Path,
    feed: Callable[[EmulatedApiServer, ScaleRecorder], None],
    kubelet: bool,
) -> ScaleRun:
    recorder = ScaleRecorder(expected=n)
    with EmulatedApiServer(history_limit=HISTORY) as api:
        api.store.on_write.append(recorder)
        api.create(api_key_secret("sk-bench"))
        with contextlib.ExitStack() as stack:
            if kubelet:
                node = stack.enter_context(TestKubelet(api))
                node.instant_complete(SUCCESS)
            log_path = work_dir / f"{label}.log"
            proc = stack.enter_context(load.subprocess_operator(api, argv, env, log_path))
            time.sleep(1.0)
            ready = load.settled(proc.pid)
            api.requests.clear()
            recorder.on = True
            curve: list[tuple[int, ProcSample]] = []
            stop = threading.Event()

            def sampler() -> None:
                next_at = sample_every
                while not stop.wait(0.05):
                    load.trim_raw_requests(api)
                    if len(recorder.terminal) >= next_at:
                        curve.append((len(recorder.terminal), sample(proc.pid)))
                        next_at += sample_every

            watcher = threading.Thread(target=sampler, daemon=True)
            watcher.start()
            start = time.monotonic()
            feed(api, recorder)
            deadline = start + timeout
            while time.monotonic() < deadline and not (
                len(recorder.terminal) >= n and (not expect_deleted or len(recorder.deleted) >= n)
            ):
                time.sleep(0.05)
            drain = time.monotonic() - start
            finished = len(recorder.terminal) >= n and (
                not expect_deleted or len(recorder.deleted) >= n
            )
            stop.set()
            watcher.join()
            done = load.settled(proc.pid) if proc.poll() is None else ready
            recorder.on = False
        log_tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        operator_log = api.requests.entries(exclude_user_agent=load.KUBELET_AGENT)
        return ScaleRun(
            label=label,
            ready=ready,
            done=done,
            curve=curve,
            drain_seconds=drain,
            finished=finished,
            events=recorder.events,
            requests=collections.Counter((r.verb, r.resource) for r in operator_log),
            status_patches_by_task=load.status_patches(operator_log),
            final_tasks=api.list("sandboxtasks", "default"),
            returncode=proc.returncode,
            log_tail=log_tail,
        )


# -- writes ------------------------------------------------------------------------------------


@dataclass
class Writes:
    """The operator's writes, per task path, from the request log and the watch events."""

    direct: list[float]  # per task admitted at once: its writes
    queued: list[float]  # per task that waited in the queue
    refreshes: int  # status patches that only moved queuePosition
    pod_deletes: int
    one_off: dict[tuple[str, str], int]


def count_writes(run: ScaleRun, n: int) -> Writes:
    queued_names = {
        ev.obj["metadata"]["name"]
        for ev in run.events
        if ev.resource == "sandboxtasks" and (ev.obj.get("status") or {}).get("phase") == "Queued"
    }
    pods = pods_created(run.events)
    refreshes = load.queue_refreshes(run.events)
    creates_other = sum(
        v
        for (verb, res), v in run.requests.items()
        if verb == "create" and res not in ("pods", "networkpolicies")
    )
    per_task_other = creates_other / n  # the task ConfigMaps, where there are any
    task_deletes = run.requests.get(("delete", "sandboxtasks"), 0) / n
    direct: list[float] = []
    queued: list[float] = []
    for i in range(n):
        name = task_name(i)
        writes = (
            run.status_patches_by_task[name]
            - refreshes[name]
            + pods[name]
            + per_task_other
            + task_deletes
        )
        (queued if name in queued_names else direct).append(writes)
    one_off = {k: v for k, v in run.requests.items() if k[1] == "networkpolicies" and k[0] != "get"}
    return Writes(
        direct=direct,
        queued=queued,
        refreshes=sum(refreshes.values()),
        pod_deletes=run.requests.get(("delete", "pods"), 0),
        one_off=one_off,
    )


# -- checks ------------------------------------------------------------------------------------


def verify(run: ScaleRun, n: int, expect_deleted: bool) -> list[str]:
    problems: list[str] = []
    if not run.finished:
        problems.append(f"{run.label}: not every task finished (and went) in time")
    if run.returncode not in (0, None):
        problems.append(f"{run.label}: the operator exited with {run.returncode}:\n{run.log_tail}")
    succeeded: collections.Counter[str] = collections.Counter()
    phase: dict[str, str | None] = {}
    answers_wrong = 0
    for ev in run.events:
        if ev.resource == "pods":
            continue
        name = ev.obj["metadata"]["name"]
        status = ev.obj.get("status") or {}
        now = status.get("phase")
        if now == "Succeeded" and phase.get(name) != "Succeeded":
            succeeded[name] += 1
            answers_wrong += status.get("answer") != SUCCESS["answer"]
        phase[name] = now
    names = [task_name(i) for i in range(n)]
    pods = pods_created(run.events)
    twice = [x for x in names if succeeded[x] != 1]
    if twice:
        problems.append(f"{len(twice)} tasks did not reach Succeeded exactly once, e.g. {twice[0]}")
    extra = [x for x in names if pods[x] != 1]
    if extra:
        problems.append(f"{len(extra)} tasks had other than one pod, e.g. {extra[0]}")
    if answers_wrong:
        problems.append(f"{answers_wrong} tasks Succeeded with another answer")
    left = len(run.final_tasks)
    if expect_deleted and left:
        problems.append(f"{left} finished tasks were not deleted (TTL 0)")
    if not expect_deleted and left != n:
        problems.append(f"{left} tasks exist at the end, expected {n}")
    return problems


# -- report ------------------------------------------------------------------------------------


def mib(value: int) -> float:
    return value / 2**20


def growth_kib(run: ScaleRun, warmup: int, n: int) -> float:
    after = run.rss_at(warmup)
    return (run.done.rss_bytes - after.rss_bytes) / max(1, n - warmup) / 1024


def print_curve(runs: list[ScaleRun], n: int, sample_every: int) -> None:
    print("\n  RSS (MiB) by finished tasks:")
    print("  finished " + "".join(f"{r.label:>16}" for r in runs))
    step = max(sample_every, (n // 10) // sample_every * sample_every)
    for at in range(step, n + 1, step):
        cells = "".join(f"{mib(r.rss_at(at).rss_bytes):>16.1f}" for r in runs)
        print(f"  {at:>8} {cells}")


Verdict = tuple[str, bool | None]  # None: printed, not judged (--no-memory-verdict)


def report_mode(
    mode: str,
    op: ScaleRun,
    noop: ScaleRun,
    n: int,
    warmup: int,
    sample_every: int,
    judge_memory: bool,
) -> list[Verdict]:
    verdicts: list[Verdict] = []
    print(
        f"\n== mode {mode}: {n} tasks drained in {op.drain_seconds:.0f} s "
        f"({n / op.drain_seconds:.0f} tasks/s) =="
    )
    print(f"  {'':<12} {'ready':>8} {'warm-up':>8} {'end':>8} {'peak':>8} {'growth/task':>12}")
    for run in (op, noop):
        print(
            f"  {run.label:<12} {mib(run.ready.rss_bytes):>7.1f}M {mib(run.rss_at(warmup).rss_bytes):>7.1f}M "
            f"{mib(run.done.rss_bytes):>7.1f}M {mib(run.done.hwm_bytes):>7.1f}M "
            f"{growth_kib(run, warmup, n):>8.2f} KiB"
        )
    print_curve([op, noop], n, sample_every)
    op_growth, noop_growth = growth_kib(op, warmup, n), growth_kib(noop, warmup, n)
    floor = max(noop_growth, GROWTH_FLOOR_KIB)
    ratio_ok = op_growth <= GROWTH_RATIO_TARGET * floor
    verdicts.append(
        (
            f"{mode}: RSS growth per task after {warmup} tasks {op_growth:.2f} KiB <= "
            f"{GROWTH_RATIO_TARGET}x no-op kopf's {noop_growth:.2f} KiB (floor {GROWTH_FLOOR_KIB:.0f} KiB)",
            ratio_ok if judge_memory else None,
        )
    )
    if mode == "ttl0":
        end = mib(op.done.rss_bytes)
        verdicts.append(
            (
                f"{mode}: operator RSS after {n} tasks {end:.1f} MiB <= {RSS_TARGET_MIB} MiB",
                end <= RSS_TARGET_MIB if judge_memory else None,
            )
        )
    writes = count_writes(op, n)
    print("\n  operator writes per task (common path; refreshes and pod deletes apart):")
    for label, values in (("admitted at once", writes.direct), ("queued first", writes.queued)):
        if values:
            hist = collections.Counter(round(v, 2) for v in values)
            shown = ", ".join(f"{k:g}: {v} tasks" for k, v in sorted(hist.items()))
            print(
                f"    {label:<17} {len(values):>6} tasks, mean {sum(values) / len(values):.2f} ({shown})"
            )
    print(
        f"    queue-position refreshes: {writes.refreshes} patches "
        f"({writes.refreshes / n:.3f} per task; periodic, at most 100 per round)"
    )
    print(f"    finished pods deleted: {writes.pod_deletes / n:.2f} per task")
    if writes.one_off:
        print(f"    one-off per namespace: {dict(writes.one_off)}")
    allowed = WRITES_TARGET + (1 if mode == "ttl0" else 0)
    worst = max([*writes.direct, *writes.queued], default=0.0)
    verdicts.append(
        (
            f"{mode}: writes per task on the path {worst:.2f} at most <= {WRITES_TARGET}"
            + (" + 1 delete" if mode == "ttl0" else ""),
            worst <= allowed,
        )
    )
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks per mode (default 10000)")
    parser.add_argument("--backlog", type=int, default=200, help="unfinished tasks at most (200)")
    parser.add_argument("--max-running", type=int, default=50, help="LLMSANDBOX_MAX_RUNNING_TASKS")
    parser.add_argument("--warmup", type=int, default=1000, help="tasks before growth is counted")
    parser.add_argument("--sample-every", type=int, default=250, help="tasks between RSS samples")
    parser.add_argument("--modes", default=",".join(MODES), help="ttl0,keep (default both)")
    parser.add_argument(
        "--no-memory-verdict",
        action="store_true",
        help="print the memory figures without judging them (short runs: they are noise)",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per run (default 120 + 0.2 per task)"
    )
    args = parser.parse_args(argv)
    n: int = args.tasks
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes: unknown {unknown or modes}; choose from {', '.join(MODES)}")
    if not 0 <= args.warmup < n:
        parser.error("--warmup: must be at least 0 and below --tasks")
    timeout = args.timeout or 120 + 0.2 * n
    logging.getLogger("aiohttp").setLevel(logging.ERROR)
    print(
        f"== operator scale: {n} tasks per mode ({', '.join(modes)}), backlog {args.backlog}, "
        f"maxRunningTasks {args.max_running}, warm-up {args.warmup} =="
    )
    verdicts: list[Verdict] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="operator-scale-") as tmp:
        work = Path(tmp)
        noop_script = work / "noop_operator.py"
        noop_script.write_text(load.NOOP_OPERATOR)
        for mode in modes:
            env = load.operator_env(args.max_running)
            if mode == "ttl0":
                env["LLMSANDBOX_TASK_TTL_SECONDS"] = "0"
            expect_deleted = mode == "ttl0"
            print(f"\n{mode}: the operator ...", flush=True)
            try:
                op = measured(
                    f"operator-{mode}",
                    [sys.executable, "-m", "sandbox_operator"],
                    env,
                    n=n,
                    expect_deleted=expect_deleted,
                    sample_every=args.sample_every,
                    timeout=timeout,
                    work_dir=work,
                    feed=functools.partial(steady_feed, n=n, backlog=args.backlog),
                    kubelet=True,
                )
                print(
                    f"{mode}: the no-op kopf operator, fed the same {len(op.events)} events ...",
                    flush=True,
                )
                noop = measured(
                    f"no-op-{mode}",
                    [sys.executable, str(noop_script)],
                    {"NOOP_LIVENESS": f"http://127.0.0.1:{free_port()}/healthz"},
                    n=n,
                    expect_deleted=expect_deleted,
                    sample_every=args.sample_every,
                    timeout=timeout,
                    work_dir=work,
                    feed=functools.partial(replay_feed, events=op.events),
                    kubelet=False,
                )
            except load.StartError as exc:
                print(f"an operator did not start: {exc}", file=sys.stderr)
                return 2
            problems += verify(op, n, expect_deleted)
            verdicts += report_mode(
                mode, op, noop, n, args.warmup, args.sample_every, not args.no_memory_verdict
            )
    print("\ntargets:")
    for text, ok in verdicts:
        print(f"  {'----' if ok is None else 'PASS' if ok else 'FAIL'}  {text}")
    load.print_problems(
        problems, f"every task Succeeded exactly once with one pod in {', '.join(modes)}"
    )
    return 0 if not problems and all(ok is not False for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
