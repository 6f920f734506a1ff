"""Operator load: N SandboxTasks through the real operator, against the emulated API server.

    python bench/operator_load.py [--tasks 300] [--max-running 50] [--rounds 1]
                                  [--profile operator.prof]

The operator runs as a subprocess (`python -m sandbox_operator`, KUBECONFIG -> the emulator); the
test kubelet completes every pod at once (`instant_complete`: no processes, the agent container
ends with a valid result JSON as its termination message). From one run it prints:

- the operator's API requests per task by verb and resource (the emulator's request log without
  the kubelet's), the per-namespace NetworkPolicy writes as a one-off (their reads, before every
  pod, count per task), the periodic queue-position refreshes apart, and the target "at most 4
  writes per task in the common path" as PASS/FAIL;
- the operator's CPU seconds per task (from /proc/<pid>/stat, the drain only: the start-up is
  reported apart) and its peak RSS (VmHWM), read just before it is stopped with SIGTERM;
- the baseline, measured in the same run: a no-op kopf operator (one `@kopf.on.event` handler
  each for sandboxtasks and the managed pods), started the same way and fed the same watch
  events (the operator run's task and pod events, replayed at their recorded pace), and the
  ratio "operator CPU per task / no-op kopf CPU per task";
- the wall time to drain all N tasks, as context only: the emulator (same process as this
  script, one GIL, linear scans) dominates it;
- a check that every task reached Succeeded exactly once, with one pod;
- with `--rounds K`, the whole run K times and the CPU ratio of each round as a table with its
  median: on a noisy machine one round's ratio moves by 0.1 or more.

Exits 1 when a task did not finish Succeeded exactly once or the writes target failed, 2 when
an operator did not start. Both operators bind their liveness endpoint on a free port.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import logging
import os
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the emulator and the test kubelet live in tests/k8s

from k8s.emulator import ApiRequest, EmulatedApiServer, KubernetesError, ResourceDef  # noqa: E402
from k8s.fixtures import wait_for_operator_watches  # noqa: E402
from k8s.kubelet import TestKubelet  # noqa: E402
from k8s.process import CLOCK_TICKS, ProcSample, free_port  # noqa: E402
from k8s.process import proc_sample as sample  # noqa: E402
from k8s.workload import SUCCESS, api_key_secret, short_task  # noqa: E402

WRITES_TARGET = 4
KUBELET_AGENT = "test-kubelet"
WATCHED = ("sandboxtasks", "pods")
TERMINAL = {"Succeeded", "Failed", "Cancelled"}

# The baseline: kopf with no-op handlers on the operator's watches and its kopf settings.
NOOP_OPERATOR = '''\
"""A no-op kopf operator: the floor of receiving the operator's watch events."""
import logging
import os

import kopf


@kopf.on.startup()
async def startup(settings, **_):
    settings.persistence.finalizer = "llmsandbox.io/unused"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.queueing.idle_timeout = 1.0


@kopf.on.event("llmsandbox.io", "v1alpha1", "sandboxtasks")
async def task_event(**_):
    pass


@kopf.on.event("", "v1", "pods", labels={"app.kubernetes.io/managed-by": "llm-sandbox-operator"})
async def pod_event(**_):
    pass


kopf.run(standalone=True, clusterwide=True, liveness_endpoint=os.environ["NOOP_LIVENESS"])
'''


def operator_env(max_running: int) -> dict[str, str]:
    return {
        "LLMSANDBOX_DEFAULT_BASE_URL": "http://127.0.0.1:9/v1",
        "LLMSANDBOX_DEFAULT_MODEL": "bench-model",
        "LLMSANDBOX_DEFAULT_API_KEY_SECRET": "llm-key",
        "LLMSANDBOX_MAX_RUNNING_TASKS": str(max_running),
        "LLMSANDBOX_METRICS_PORT": "0",
        "LLMSANDBOX_HEALTH_PORT": str(free_port()),
        "LLMSANDBOX_TOKEN_PRICES": '{"bench-model": {"prompt_per_million": 1.0, "completion_per_million": 2.0}}',
    }


# -- the operator process ---------------------------------------------------------------------


def settled(pid: int, quiet_seconds: float = 0.5, cap_seconds: float = 10.0) -> ProcSample:
    """A sample once the process has stopped burning CPU (its trailing events handled)."""
    last = sample(pid)
    deadline = time.monotonic() + cap_seconds
    while time.monotonic() < deadline:
        time.sleep(quiet_seconds)
        now = sample(pid)
        if now.cpu_seconds - last.cpu_seconds <= 1.0 / CLOCK_TICKS:
            return now
        last = now
    return last


class StartError(Exception):
    """The operator process did not start watching; the message holds its log."""


@contextlib.contextmanager
def subprocess_operator(
    api: EmulatedApiServer, argv: list[str], env: dict[str, str], log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Start an operator process against `api`; SIGTERM it (then wait) on exit."""
    # This checkout's packages first (an editable install may point at another clone).
    path = os.pathsep.join(
        [str(REPO / "operator"), str(REPO / "agent"), os.environ.get("PYTHONPATH", "")]
    )
    full_env = {**os.environ, **api.env(), **env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    since = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_for_operator_watches(
                    api, WATCHED, since=since, timeout=60, alive=lambda: proc.poll() is None
                )
            except (RuntimeError, TimeoutError) as exc:
                raise StartError(f"{argv}: {exc}\n{log_path.read_text(errors='replace')}") from None
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- recording and replaying watch events ----------------------------------------------------


@dataclass(frozen=True)
class Event:
    at: float
    resource: str  # plural
    type: str
    obj: dict[str, Any]  # the stored dict; the store never mutates it in place


@dataclass
class Recorder:
    """The store's writes to the watched resources, in order (hooked into ObjectStore.on_write),
    and how many tasks have reached a terminal phase."""

    events: list[Event] = field(default_factory=list)
    on: bool = False
    terminal: set[str] = field(default_factory=set)
    all_terminal: threading.Event = field(default_factory=threading.Event)
    expected: int = 0

    def __call__(self, res: ResourceDef, type_: str, obj: dict[str, Any]) -> None:
        if not self.on or res.plural not in WATCHED:
            return
        self.events.append(Event(time.monotonic(), res.plural, type_, obj))
        if res.plural == "sandboxtasks" and (obj.get("status") or {}).get("phase") in TERMINAL:
            self.terminal.add(obj["metadata"]["name"])
            if len(self.terminal) >= self.expected:
                self.all_terminal.set()


_SERVER_FIELDS = ("resourceVersion", "generation", "managedFields")


def queue_refreshes(events: list[Event]) -> collections.Counter[str]:
    """Per task, its status changes that only moved queuePosition: the operator's periodic
    refresh (at most 100 tasks a round), apart from the writes of the task's own path."""
    refreshes: collections.Counter[str] = collections.Counter()
    last: dict[str, dict[str, Any]] = {}
    for ev in events:
        if ev.resource != "sandboxtasks":
            continue
        name = ev.obj["metadata"]["name"]
        status = ev.obj.get("status") or {}
        before = last.get(name)
        if ev.type == "MODIFIED" and before is not None:
            moved = {k for k in status.keys() | before.keys() if status.get(k) != before.get(k)}
            if moved == {"queuePosition"}:
                refreshes[name] += 1
        last[name] = status
    return refreshes


def merge_diff(old: Any, new: Any) -> Any:
    """The RFC 7386 merge patch that turns `old` into `new` (None: nothing to change)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None if old == new else new
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            sub = merge_diff(old[key], value)
            patch[key] = value if sub is None else sub
    return patch or None


def replay(api: EmulatedApiServer, events: list[Event], start: float) -> None:
    """Write the recorded events again through the store helpers, at their recorded pace.

    Status changes go to the status subresource, the rest (the kubelet's binding) to the object.
    """
    t0 = events[0].at if events else 0.0
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for ev in events:
        delay = start + (ev.at - t0) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        meta = ev.obj["metadata"]
        key = (ev.resource, meta["name"])
        ns = meta.get("namespace", "default")
        if ev.type == "ADDED":
            body = copy.deepcopy(ev.obj)
            for name in _SERVER_FIELDS:
                body["metadata"].pop(name, None)
            api.create(body)
        elif ev.type == "DELETED":
            with contextlib.suppress(KubernetesError):  # already gone (garbage-collected)
                api.delete(ev.resource, meta["name"], ns)
        else:
            old = last[key]
            status = merge_diff(old.get("status"), ev.obj.get("status"))
            rest_old = {k: v for k, v in old.items() if k != "status"}
            rest_new = {k: v for k, v in ev.obj.items() if k != "status"}
            for part in (rest_old, rest_new):
                part["metadata"] = {
                    k: v for k, v in part["metadata"].items() if k not in _SERVER_FIELDS
                }
            rest = merge_diff(rest_old, rest_new)
            if rest is not None:
                api.patch(ev.resource, meta["name"], rest, ns)
            if status is not None:
                api.patch(ev.resource, meta["name"], {"status": status}, ns, subresource="status")
        last[key] = ev.obj


# -- one measured run ------------------------------------------------------------------------


@dataclass
class RunResult:
    ready: ProcSample
    done: ProcSample
    drain_seconds: float
    bench_cpu_seconds: float  # this process (emulator + kubelet + driver) during the drain
    events: list[Event]
    requests: collections.Counter[tuple[str, str]]
    startup_requests: collections.Counter[tuple[str, str]]
    status_patches_by_task: collections.Counter[str]
    errors: collections.Counter[tuple[str, str, int]]
    kubelet_requests: int
    final_tasks: list[dict[str, Any]]
    pods_by_task_uid: collections.Counter[str]
    returncode: int | None
    log_tail: str

    @property
    def drain_cpu(self) -> float:
        return self.done.cpu_seconds - self.ready.cpu_seconds


def status_patches(operator_log: list[ApiRequest]) -> collections.Counter[str]:
    """Status patches per task name, from the operator's entries of the request log."""
    return collections.Counter(
        r.name or "?"
        for r in operator_log
        if (r.verb, r.resource) == ("patch", "sandboxtasks/status")
    )


def print_problems(problems: list[str], ok: str) -> None:
    """The verification's verdict: up to 50 problems, else `ok`."""
    if problems:
        print(f"\nverification FAILED ({len(problems)} problems):")
        for line in problems[:50]:
            print(f"  {line}")
    else:
        print(f"\nverification: {ok}: OK")


def trim_raw_requests(api: EmulatedApiServer, keep: int = 32) -> None:
    """Drop all but the newest entries of kmock's raw request record, on the emulator's loop.

    kmock keeps every request it served (`keep_requests=False`, meant for load runs, fails each
    request with HTTP 500 instead); a long run would hold them all in this process, and the
    reactions whose views are not plain filters still scan them. Our RequestLog is not affected.
    """
    handler, loop = api.handler, api._loop
    if handler is None or loop is None:
        return

    def trim() -> None:
        del handler._requests[:-keep]

    loop.call_soon_threadsafe(trim)


def wait_drained(api: EmulatedApiServer, recorder: Recorder, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not recorder.all_terminal.wait(0.05):
        if time.monotonic() > deadline:
            return False
        trim_raw_requests(api)
    return True


def measured_run(
    argv: list[str],
    env: dict[str, str],
    n: int,
    timeout: float,
    work_dir: Path,
    label: str,
    feed: Callable[[EmulatedApiServer, float], None],
) -> RunResult:
    """Start the operator, feed the cluster, wait until every task is terminal, sample /proc.

    The test kubelet runs only for the real operator; the replay brings its writes itself.
    """
    recorder = Recorder(expected=n)
    with EmulatedApiServer(history_limit=20 * n + 1000) as api:
        api.store.on_write.append(recorder)
        api.create(api_key_secret("sk-bench"))
        with contextlib.ExitStack() as stack:
            if label == "operator":
                node = stack.enter_context(TestKubelet(api))
                node.instant_complete(SUCCESS)
            log_path = work_dir / f"{label}.log"
            proc = stack.enter_context(subprocess_operator(api, argv, env, log_path))
            time.sleep(1.0)  # start-up work after the watches opened (priming, first lists)
            ready = settled(proc.pid)
            startup_requests = api.requests.counts(exclude_user_agent=KUBELET_AGENT)
            api.requests.clear()
            recorder.on = True
            bench_cpu = time.process_time()
            start = time.monotonic()
            feed(api, start)
            finished = wait_drained(api, recorder, timeout)
            drain = time.monotonic() - start
            bench_cpu = time.process_time() - bench_cpu
            done = settled(proc.pid) if proc.poll() is None else ready
            recorder.on = False
            if not finished:
                print(f"  {label}: not all tasks finished within {timeout:.0f}s", file=sys.stderr)
        returncode = proc.returncode
        log_tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        operator_log = api.requests.entries(exclude_user_agent=KUBELET_AGENT)
        pods = api.list("pods", "default")
        return RunResult(
            ready=ready,
            done=done,
            drain_seconds=drain,
            bench_cpu_seconds=bench_cpu,
            events=recorder.events,
            requests=collections.Counter((r.verb, r.resource) for r in operator_log),
            startup_requests=startup_requests,
            status_patches_by_task=status_patches(operator_log),
            errors=collections.Counter(
                (r.verb, r.resource, r.status)
                for r in operator_log
                if r.status is not None and r.status >= 400 and r.verb != "watch"
            ),
            kubelet_requests=len(api.requests.entries(user_agent=KUBELET_AGENT)),
            final_tasks=api.list("sandboxtasks", "default"),
            pods_by_task_uid=collections.Counter(
                (p["metadata"].get("labels") or {}).get("llmsandbox.io/task-uid", "?") for p in pods
            ),
            returncode=returncode,
            log_tail=log_tail,
        )


# -- report ----------------------------------------------------------------------------------


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def verify(result: RunResult, n: int) -> list[str]:
    """Every task Succeeded, reached Succeeded exactly once, and had exactly one pod."""
    problems = []
    transitions: collections.Counter[str] = collections.Counter()
    pod_creates: collections.Counter[str] = collections.Counter()
    phase: dict[str, str | None] = {}
    for ev in result.events:
        name = ev.obj["metadata"]["name"]
        if ev.resource == "sandboxtasks":
            now = (ev.obj.get("status") or {}).get("phase")
            if now == "Succeeded" and phase.get(name) != "Succeeded":
                transitions[name] += 1
            phase[name] = now
        elif ev.type == "ADDED":
            uid = (ev.obj["metadata"].get("labels") or {}).get("llmsandbox.io/task-uid", "?")
            pod_creates[uid] += 1
    if len(result.final_tasks) != n:
        problems.append(f"{len(result.final_tasks)} tasks exist, expected {n}")
    phases = collections.Counter(
        str((body.get("status") or {}).get("phase")) for body in result.final_tasks
    )
    if phases != {"Succeeded": n}:
        problems.append(f"final phases: {dict(phases)}")
    for body in result.final_tasks:
        name, uid = body["metadata"]["name"], body["metadata"]["uid"]
        st = body.get("status") or {}
        if st.get("phase") != "Succeeded" or st.get("answer") != SUCCESS["answer"]:
            problems.append(
                f"{name}: phase {st.get('phase')}, exitReason {st.get('exitReason')}, "
                f"answer {st.get('answer')!r}, message {st.get('message')!r}"
            )
        if transitions[name] != 1:
            problems.append(f"{name}: reached Succeeded {transitions[name]} times")
        # One pod made; it is gone by now unless finished pods are kept.
        if result.pods_by_task_uid[uid] > 1 or pod_creates[uid] != 1:
            problems.append(
                f"{name}: {result.pods_by_task_uid[uid]} pods now, {pod_creates[uid]} created"
            )
    return problems


def report_requests(result: RunResult, n: int) -> bool:
    """Print the operator's requests per task; True when the writes target is met."""
    print(f"\nAPI requests by the operator during the drain (User-Agent not {KUBELET_AGENT}):")
    print(f"  {'verb':<8} {'resource':<24} {'total':>7} {'per task':>9}")
    # Policy writes happen once per namespace (and when a policy drifted); the reads, before
    # every pod, are per task.
    one_off = {
        k: v for k, v in result.requests.items() if k[1] == "networkpolicies" and k[0] != "get"
    }
    per_task = {k: v for k, v in result.requests.items() if k not in one_off}
    for (verb, resource), count in sorted(per_task.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {verb:<8} {resource:<24} {count:>7} {count / n:>9.2f}")
    for (verb, resource), count in sorted(one_off.items()):
        print(f"  {verb:<8} {resource:<24} {count:>7}   (one-off per namespace)")
    # The finished pod's delete (LLMSANDBOX_KEEP_FINISHED_PODS=false) is clean-up, not the path.
    cleanup = per_task.get(("delete", "pods"), 0)
    writes = {
        k: v
        for k, v in per_task.items()
        if k[0] not in ("get", "list", "watch") and k != ("delete", "pods")
    }
    # The periodic queue-position refreshes are apart too: at most 100 a round, whatever N is.
    refreshes = queue_refreshes(result.events)
    own = collections.Counter(
        {name: count - refreshes[name] for name, count in result.status_patches_by_task.items()}
    )
    total_writes = sum(writes.values()) - refreshes.total()
    creates = sum(v for k, v in writes.items() if k[0] == "create")
    patches_hist = collections.Counter(own.values())
    worst = max(own.values(), default=0) + creates / n
    others = total_writes - creates - own.total()
    print(
        "  status patches per task (refreshes apart): "
        + ", ".join(f"{k} patches: {v} tasks" for k, v in sorted(patches_hist.items()))
    )
    print(f"  queue-position refreshes (periodic, apart): {refreshes.total()} status patches")
    if result.startup_requests:
        startup = ", ".join(
            f"{v} {k[0]} {k[1]}" for k, v in sorted(result.startup_requests.items())
        )
        print(f"  at start-up (not counted above): {startup}")
    print(f"  kubelet requests (excluded): {result.kubelet_requests}")
    if result.errors:
        errors = ", ".join(f"{v}x {k[0]} {k[1]} -> {k[2]}" for k, v in result.errors.items())
        print(f"  error responses: {errors}")
    ok = total_writes / n <= WRITES_TARGET and worst + others / n <= WRITES_TARGET
    print(f"  clean-up: {cleanup / n:.2f} pod deletes per task (finished pods, after their result)")
    print(
        f"writes per task (common path, NetworkPolicies apart): {total_writes / n:.2f} average, "
        f"{worst + others / n:.2f} for the task with the most status patches; "
        f"target <= {WRITES_TARGET}: {'PASS' if ok else 'FAIL'}"
    )
    return ok


def print_profile(path: Path, top: int = 25) -> None:
    print(f"\noperator profile ({path}), top {top} by own time:")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(top)


def run_both(
    n: int, max_running: int, timeout: float, profile: Path | None
) -> tuple[RunResult, RunResult]:
    """The operator with N tasks, then the no-op kopf operator fed the same watch events."""
    operator_argv = [sys.executable, "-m", "sandbox_operator"]
    if profile is not None:
        operator_argv[1:1] = ["-m", "cProfile", "-o", str(profile)]

    def create_tasks(api: EmulatedApiServer, _start: float) -> None:
        for i in range(n):
            api.create(
                short_task(
                    f"load-{i:05d}",
                    inputs=[{"path": "q.txt", "content": "six times seven"}],
                    limits={"maxSteps": 8, "activeDeadlineSeconds": 600},
                    sandbox={"image": "llm-sandbox/sandbox-python:test"},
                )
            )

    with tempfile.TemporaryDirectory(prefix="operator-load-") as tmp:
        work = Path(tmp)
        op = measured_run(
            operator_argv, operator_env(max_running), n, timeout, work, "operator", create_tasks
        )
        noop_script = work / "noop_operator.py"
        noop_script.write_text(NOOP_OPERATOR)
        noop = measured_run(
            [sys.executable, str(noop_script)],
            {"NOOP_LIVENESS": f"http://127.0.0.1:{free_port()}/healthz"},
            n,
            timeout,
            work,
            "noop",
            lambda api, start: replay(api, op.events, start),
        )
    return op, noop


def print_rounds(pairs: list[tuple[RunResult, RunResult]], n: int) -> None:
    print("\nper round: operator and no-op kopf CPU per task (drain), and their ratio")
    print("  round  operator   no-op kopf  ratio")
    ratios = []
    for i, (op, noop) in enumerate(pairs, start=1):
        ratio = op.drain_cpu / noop.drain_cpu if noop.drain_cpu > 0 else float("nan")
        ratios.append(ratio)
        print(
            f"  {i:>5}  {1000 * op.drain_cpu / n:6.2f} ms  {1000 * noop.drain_cpu / n:6.2f} ms"
            f"  {ratio:5.2f}x"
        )
    print(
        f"median operator CPU per task / no-op kopf CPU per task: {statistics.median(ratios):.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=300, help="how many tasks (default 300)")
    parser.add_argument(
        "--max-running", type=int, default=50, help="LLMSANDBOX_MAX_RUNNING_TASKS (default 50)"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds to drain (default 60 + 0.5 per task)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the operator and the no-op baseline this many times and print the median "
        "CPU ratio (default 1; the first round's full report is printed)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="also run the operator under cProfile, write the stats here and print the top "
        "functions (CPU figures are then inflated by the profiler)",
    )
    args = parser.parse_args(argv)
    n: int = args.tasks
    timeout = args.timeout or 60 + 0.5 * n
    logging.getLogger("aiohttp").setLevel(logging.ERROR)
    rounds = max(1, args.rounds)
    print(
        f"== operator load: {n} tasks, maxRunningTasks {args.max_running}, "
        f"{'one run' if rounds == 1 else f'{rounds} rounds'} =="
    )
    try:
        op, noop = run_both(n, args.max_running, timeout, args.profile)
        more = [run_both(n, args.max_running, timeout, None) for _ in range(rounds - 1)]
    except StartError as exc:
        print(f"an operator did not start: {exc}", file=sys.stderr)
        return 2
    problems = verify(op, n)
    for extra, _ in more:
        problems += verify(extra, n)
    if op.returncode not in (0, None):
        problems.append(f"the operator exited with {op.returncode}:\n{op.log_tail}")

    writes_ok = report_requests(op, n)
    by_kind = collections.Counter((e.resource, e.type) for e in op.events)
    by_kind_noop = collections.Counter((e.resource, e.type) for e in noop.events)
    print(
        f"\nwatch events during the drain: {len(op.events)} "
        f"({', '.join(f'{v} {k[0]} {k[1]}' for k, v in sorted(by_kind.items()))}); "
        f"replayed to the no-op operator: {len(noop.events)}"
        + ("" if by_kind == by_kind_noop else f" ({dict(by_kind_noop)})")
    )
    print(
        f"\nwall time to drain {n} tasks: {op.drain_seconds:.1f} s ({n / op.drain_seconds:.1f} "
        f"tasks/s) - context only: this process (emulator + kubelet) used "
        f"{op.bench_cpu_seconds:.1f} s CPU in that time, the operator {op.drain_cpu:.1f} s"
    )
    print("\nCPU and memory (from /proc, just before SIGTERM):")
    for label, run in (("operator", op), ("no-op kopf", noop)):
        print(
            f"  {label:<11} start-up {run.ready.cpu_seconds:5.2f} s CPU, "
            f"drain {run.drain_cpu:6.2f} s CPU = {1000 * run.drain_cpu / n:6.2f} ms/task; "
            f"RSS ready {mib(run.ready.rss_bytes)}, peak (VmHWM) {mib(run.done.hwm_bytes)}"
        )
    if noop.drain_cpu > 0:
        ratio = op.drain_cpu / noop.drain_cpu
        print(f"operator CPU per task / no-op kopf CPU per task: {ratio:.2f}x")
    growth = [(run.done.rss_bytes - run.ready.rss_bytes) / n / 1024 for run in (op, noop)]
    print(
        f"RSS growth over the drain: operator {growth[0]:.0f} KiB per task, "
        f"no-op kopf {growth[1]:.0f} KiB per task"
    )
    if more:
        print_rounds([(op, noop), *more], n)
    if args.profile:
        print_profile(args.profile)

    print_problems(problems, f"{n}/{n} tasks Succeeded exactly once, each with one pod")
    return 0 if writes_ok and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
