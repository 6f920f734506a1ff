"""The operator killed (SIGKILL) at random points and restarted while 60 tasks run.

The operator runs as a subprocess (`python -m sandbox_operator`, as in production and in
bench/operator_load.py), so a kill is abrupt: no cleanup handler, no graceful shutdown, requests
in flight are cut. Each kill lands right after a randomly chosen API write of the current
process has been applied by the API server, before the process sees the response: the worst
moment, since the process dies not knowing whether its write happened. The random choices come
from a seeded generator (`RESTART_TEST_SEED`, printed), so a failing run can be repeated.

The test kubelet completes pods instantly, with faults mixed in: evictions (retried), image pull
failures and OOM kills (terminal failures), delayed starts (pods pending across a kill), and
agents reporting an inference-endpoint failure (`llm_error`).

Checked on the emulator's complete write history (k8s/history.py), not by sampling:

- every task reaches a terminal phase exactly once, and its status never changes after that;
- no task ever has two live pods, and no attempt's pod is created twice;
- at the end nothing is Queued, Pending or Running, and no pod is left pending or running;
- each task ends as its fault dictates (an eviction costs exactly one retry);
- metrics: each operator process counts only the transitions its own writes made (the writes
  are attributed by the User-Agent, which names the process). Every scrape of a process shows
  no more completions, retries or admissions than it wrote; the last process, stopped only once
  it is idle, shows exactly as many; and the last scrapes of all processes sum to at most one
  completion per task. A restarted operator that counted the terminal tasks it finds at start
  would fail the exact check.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from conftest import operator_settings
from k8s.emulator import EmulatedApiServer
from k8s.history import KillAfterWrites, TaskHistory
from k8s.process import OperatorProcess, free_port
from k8s.workload import EXPECTED, faulty_kubelet, short_task

if TYPE_CHECKING:
    from sandbox_operator.controller import Operator

SEED = int(os.environ.get("RESTART_TEST_SEED", "5021"))
N_TASKS = 60
WAVES = 3  # tasks arrive in waves, with the first three operator processes
KILLS = 6
MAX_RUNNING = 8
# Each task makes at least 4 operator writes (Pending status, ConfigMap, pod, terminal status),
# so 60 tasks make >= 240: kills after at most 30 writes each all happen before the work ends.
MAX_WRITES_BEFORE_KILL = 30

KIND_WEIGHTS = {"ok": 5, "slow": 2, "evicted": 2, "pull": 1, "oom": 1, "llm": 1}


def operator_env(metrics_port: int) -> dict[str, str]:
    return {
        "LLMSANDBOX_DEFAULT_BASE_URL": "http://127.0.0.1:9/v1",
        "LLMSANDBOX_DEFAULT_MODEL": "restart-model",
        "LLMSANDBOX_DEFAULT_API_KEY_SECRET": "llm-key",
        "LLMSANDBOX_MAX_RUNNING_TASKS": str(MAX_RUNNING),
        "LLMSANDBOX_METRICS_PORT": str(metrics_port),
    }


# -- metrics ---------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """The counters this test checks, summed over their labels, plus the phase gauge."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    out: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "llmsandbox_tasks_completed_total":
                out["completed"] += s.value
                out[f"completed:{s.labels['phase']}:{s.labels['exit_reason']}"] += s.value
            elif s.name == "llmsandbox_task_retries_total":
                out["retries"] += s.value
            elif s.name == "llmsandbox_queue_wait_seconds_count":
                out["admitted"] += s.value
            elif s.name == "llmsandbox_tasks":
                out[f"tasks:{s.labels['phase']}"] += s.value
    return dict(out)


class Scraper:
    """Scrapes the current operator process every 50 ms; keeps every scrape, by pid."""

    def __init__(self) -> None:
        self.target: tuple[int, int] | None = None  # (pid, port)
        self.scrapes: dict[int, list[dict[str, float]]] = collections.defaultdict(list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            target = self.target
            if target is None:
                continue
            with contextlib.suppress(OSError, urllib.error.URLError):
                self.scrapes[target[0]].append(scrape(target[1]))

    @contextlib.contextmanager
    def running(self) -> Iterator[Scraper]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


# -- the test --------------------------------------------------------------------------------


def test_operator_killed_at_random_points_and_restarted_finishes_every_task_exactly_once(  # noqa: C901, PLR0915 - one scenario with its checks
    k8s: EmulatedApiServer, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    print(f"RESTART_TEST_SEED={SEED}")
    kinds = list(KIND_WEIGHTS)
    names = [
        f"{kind}-{i:03d}"
        for i, kind in enumerate(
            rng.choices(kinds, weights=[KIND_WEIGHTS[k] for k in kinds], k=N_TASKS)
        )
    ]
    waves = [names[i::WAVES] for i in range(WAVES)]
    kill_after = [rng.randint(1, MAX_WRITES_BEFORE_KILL) for _ in range(KILLS)]
    print(f"kill after writes: {kill_after}")

    history = TaskHistory().attach(k8s)
    kill = KillAfterWrites(history)
    k8s.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": "llm-key",
                "namespace": "default",
                "labels": {"llmsandbox.io/api-key": "true"},
            },
            "stringData": {"apiKey": "sk-test"},
        }
    )
    pids: list[int] = []
    ports: dict[int, int] = {}
    log_path = tmp_path / "operator.log"
    with (
        faulty_kubelet(k8s, slow_seconds=0.4),
        Scraper().running() as scraper,
        log_path.open("wb") as log,
    ):
        for incarnation in range(KILLS + 1):
            port = free_port()
            op = OperatorProcess(k8s, operator_env(port), log).start()
            pids.append(op.pid)
            ports[op.pid] = port
            scraper.target = (op.pid, port)
            if incarnation < WAVES:
                for name in waves[incarnation]:
                    k8s.create(short_task(name))
            if incarnation < KILLS:
                kill.arm(op.pid, kill_after[incarnation])
                try:
                    code = op.proc.wait(timeout=60) if op.proc else None
                except Exception:
                    op.kill()
                    raise AssertionError(
                        f"operator {incarnation} (pid {op.pid}) was never killed: it made "
                        f"{history.operator_writes[op.pid]} writes, the kill was due after "
                        f"{kill_after[incarnation]} (seed {SEED})"
                    ) from None
                assert code == -9, f"operator {incarnation} exited with {code}, not by SIGKILL"
                continue
            # The last process: let it finish everything, then compare its counters exactly.
            finished = history.wait(
                lambda: history.terminal_count() == N_TASKS and history.live_pod_count() == 0,
                timeout=60,
            )
            final = op.pid

            def settled(pid: int = final) -> bool:
                last = scraper.scrapes[pid][-1] if scraper.scrapes[pid] else {}
                with history.lock:
                    wanted = (
                        history.terminal_by_pid[pid],
                        history.retries_by_pid[pid],
                        history.admissions_by_pid[pid],
                    )
                return (
                    last.get("completed", 0),
                    last.get("retries", 0),
                    last.get("admitted", 0),
                ) >= wanted

            history.wait(settled, timeout=20)
            scraper.target = None
            final_scrape = scrape(port)
            assert op.stop() == 0
    log_text = log_path.read_text(errors="replace")
    assert "Traceback" not in log_text, log_text[-5000:]

    # -- the record --------------------------------------------------------------------------
    assert len(pids) == KILLS + 1
    records = {r.name: r for r in history.tasks.values()}
    assert finished, f"not all tasks finished (seed {SEED}): " + str(
        {n: (r.phases, r.live_pods) for n, r in records.items() if r.terminal is None}
    )
    assert history.violations == [], f"seed {SEED}: {history.violations}"
    assert sorted(records) == sorted(names)
    for name, record in records.items():
        assert record.terminal_writes == 1, (name, record)
        assert record.writes_after_terminal == 0, (name, record)
        assert record.max_live_pods == 1, (name, record)
        phase, reason, attempts = EXPECTED[name.split("-")[0]]
        assert record.terminal is not None
        assert (
            record.terminal["phase"],
            record.terminal["exitReason"],
            record.terminal["attempt"],
        ) == (phase, reason, attempts), (name, record, SEED)
        assert [a for _, a in record.pods_created] == [str(i + 1) for i in range(attempts)]
    # No terminal status came from anything but an operator process, and the writes are
    # spread over several of them (the kills did interrupt the work).
    assert sum(history.terminal_by_pid.values()) == N_TASKS
    assert set(history.terminal_by_pid) <= set(pids)
    assert len(history.terminal_by_pid) >= 2
    # In the API: all terminal, no pod pending or running.
    phases = collections.Counter(
        (t.get("status") or {}).get("phase") for t in k8s.list("sandboxtasks", "default")
    )
    assert set(phases) <= {"Succeeded", "Failed"}, phases
    assert sum(phases.values()) == N_TASKS, phases
    pods = k8s.list("pods", "default")
    assert not [p for p in pods if p["status"].get("phase") in ("Pending", "Running")]

    # -- the counters ------------------------------------------------------------------------
    # Every scrape of every process: at most what that process wrote.
    for pid in pids:
        for sample in scraper.scrapes[pid]:
            assert sample.get("completed", 0) <= history.terminal_by_pid[pid], (pid, sample)
            assert sample.get("retries", 0) <= history.retries_by_pid[pid], (pid, sample)
            assert sample.get("admitted", 0) <= history.admissions_by_pid[pid], (pid, sample)
            for (p, ph, reason), n in history.terminal_by_pid_reason.items():
                if p == pid:
                    assert sample.get(f"completed:{ph}:{reason}", 0) <= n
    # The last process, idle: exactly the transitions it wrote, by phase and reason; the tasks
    # that were already terminal when it started are not counted again.
    assert final_scrape.get("completed", 0) == history.terminal_by_pid[final]
    for (p, ph, reason), n in history.terminal_by_pid_reason.items():
        if p == final:
            assert final_scrape.get(f"completed:{ph}:{reason}", 0) == n
    assert final_scrape.get("retries", 0) == history.retries_by_pid[final]
    assert final_scrape.get("admitted", 0) == history.admissions_by_pid[final]
    assert final_scrape.get("tasks:Succeeded", 0) + final_scrape.get("tasks:Failed", 0) == N_TASKS
    for phase in ("Queued", "Pending", "Running"):
        assert final_scrape.get(f"tasks:{phase}", 0) == 0
    # Over all processes (the killed ones at their last scrape): never more than one per task.
    total = sum(
        (scraper.scrapes[pid][-1].get("completed", 0) if scraper.scrapes[pid] else 0)
        for pid in pids[:-1]
    )
    assert total + final_scrape.get("completed", 0) <= N_TASKS


# -- the crash-ordering decisions, one by one (a fake API client records the calls) ----------


class FakeKube:
    """Just enough of KubeClient: objects by (resource, name), every call in order."""

    def __init__(self, *objects: tuple[str, dict[str, Any]]) -> None:
        self.objects = {(res, obj["metadata"]["name"]): obj for res, obj in objects}
        self.calls: list[tuple[str, str, str]] = []
        self.fail_status: Exception | None = None

    async def list(self, resource: str, namespace: Any, labels: Any = None) -> list[Any]:
        return [o for (r, _), o in self.objects.items() if r == resource]

    async def get(self, resource: str, namespace: Any, name: str) -> Any:
        self.calls.append(("get", resource, name))
        return self.objects.get((resource, name))

    async def create(self, resource: str, namespace: str, body: dict[str, Any]) -> Any:
        self.calls.append(("create", resource, body["metadata"]["name"]))
        self.objects[resource, body["metadata"]["name"]] = body
        return body

    async def patch_status(
        self, resource: str, namespace: str, name: str, status: dict[str, Any]
    ) -> Any:
        self.calls.append(("patch_status", str(status.get("phase")), name))
        if self.fail_status is not None:
            raise self.fail_status
        obj = self.objects[resource, name]
        merged = {k: v for k, v in {**(obj.get("status") or {}), **status}.items() if v is not None}
        obj = {**obj, "status": merged}
        self.objects[resource, name] = obj
        return obj

    async def delete(self, resource: str, namespace: str, name: str) -> bool:
        self.calls.append(("delete", resource, name))
        return self.objects.pop((resource, name), None) is not None

    async def close(self) -> None:
        pass


def _operator(kube: FakeKube) -> Any:
    from sandbox_operator.controller import Operator

    return Operator(operator_settings(), kube)  # type: ignore[arg-type]


def _task_body(phase: str, **status: Any) -> dict[str, Any]:
    body = short_task("t")
    body["metadata"].update(uid="uid-t", resourceVersion="5", generation=1)
    body["status"] = {
        "phase": phase,
        "attempt": 1,
        "podName": "t-a1",
        "podUID": "pod-uid",
        **status,
    }
    return body


def _stuck_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "t-a1",
            "namespace": "default",
            "uid": "pod-uid",
            "labels": {"llmsandbox.io/task-uid": "uid-t", "llmsandbox.io/attempt": "1"},
            "ownerReferences": [{"kind": "SandboxTask", "uid": "uid-t", "controller": True}],
        },
        "spec": {"containers": [{"name": "sandbox", "image": "nope:1"}, {"name": "agent"}]},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {"name": "sandbox", "state": {"waiting": {"reason": "ErrImagePull"}}}
            ],
        },
    }


def _completed(operator: Operator) -> float:
    return sum(
        s.value
        for family in operator.metrics.registry.collect()
        for s in family.samples
        if s.name == "llmsandbox_tasks_completed_total"
    )


async def test_a_stuck_pod_is_deleted_only_after_the_terminal_status_is_written() -> None:
    # Deleting first, a crash in between would leave the task Pending without its pod, and the
    # restarted operator would create the attempt's pod again.
    kube = FakeKube(("sandboxtasks", _task_body("Pending")), ("pods", _stuck_pod()))
    operator = _operator(kube)
    await operator.prime([])
    await operator.on_pod("MODIFIED", _stuck_pod())
    assert kube.calls == [
        ("patch_status", "Failed", "t"),
        ("delete", "pods", "t-a1"),
    ]
    assert _completed(operator) == 1


async def test_a_restarted_operator_reaps_a_terminal_tasks_stuck_pod_and_counts_nothing() -> None:
    # The previous operator died between the terminal write and the delete.
    done = _task_body("Failed", exitReason="image_pull_error")
    kube = FakeKube(("sandboxtasks", done), ("pods", _stuck_pod()))
    operator = _operator(kube)
    await operator.prime([])
    await operator.on_task("ADDED", done)
    await operator.on_pod("ADDED", _stuck_pod())
    assert kube.calls == [("delete", "pods", "t-a1")]
    assert _completed(operator) == 0


async def test_a_completion_is_counted_only_when_its_status_write_lands() -> None:
    from sandbox_operator.kube import KubeError

    for error in (KubeError(404, "NotFound", "gone"), KubeError(500, "InternalError", "boom")):
        kube = FakeKube(("sandboxtasks", _task_body("Pending")), ("pods", _stuck_pod()))
        kube.fail_status = error
        operator = _operator(kube)
        await operator.prime([])
        with contextlib.suppress(KubeError):
            await operator.on_pod("MODIFIED", _stuck_pod())
        assert _completed(operator) == 0
