"""The chart's monitoring against the real thing: `promtool check rules` and `promtool test
rules` (a series that should fire each alert fires it, one that should not stays quiet), and a
real Prometheus scraping the operator during an emulator run, through which every query of the
shipped dashboard returns data. Debian's `prometheus` package brings both (scripts/test.sh
installs it); without it these tests skip, saying so."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8s.emulator import EmulatedApiServer
from k8s.kubelet import Evict, TestKubelet
from llmserver import ScriptedLLMServer, error, tool_call
from s3server import S3Server, s3_server
from test_chart import CHART, by_kind, chart, custom_objects
from test_operator import OPERATOR, TERMINAL, secret, task, wait_phase
from test_operator_artifacts import store_env, store_secret
from test_operator_metrics import free_port

__all__ = ["chart", "custom_objects", "s3_server"]
DASHBOARD = CHART / "dashboards" / "llm-sandbox.json"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found (apt-get install prometheus)"
)
SEL = 'job="llm-sandbox-metrics",namespace="llm-sandbox"'


def rule_groups(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (rule,) = by_kind(objects, "PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def alert_names(groups: dict[str, Any]) -> list[str]:
    return [r["alert"] for g in groups["groups"] for r in g["rules"] if "alert" in r]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@needs_promtool
def test_the_alert_rules_pass_promtool_check(
    custom_objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups(custom_objects)))
    checked = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def series(name: str, labels: str, values: str) -> dict[str, str]:
    inner = SEL + ("," + labels if labels else "")
    return {"series": f"{name}{{{inner}}}", "values": values}


# Each alert: series that fire it, the time it is checked at, and series that leave it quiet.
# Counters grow per minute (promtool's "a+bxN" notation: start a, add b, N more samples).
ALERT_CASES: dict[str, tuple[list[dict[str, str]], str, list[dict[str, str]]]] = {
    "LLMSandboxOperatorDown": (
        [{"series": f"up{{{SEL}}}", "values": "0x20"}],
        "10m",
        [
            {"series": f"up{{{SEL}}}", "values": "1x20"},
            series("llmsandbox_build_info", 'version="0.1.0"', "1x20"),
        ],
    ),
    "LLMSandboxTaskFailureRatioHigh": (
        [
            series(
                "llmsandbox_tasks_completed_total",
                'phase="Failed",exit_reason="max_steps"',
                "0+5x60",
            ),
            series(
                "llmsandbox_tasks_completed_total",
                'phase="Succeeded",exit_reason="submitted"',
                "0+5x60",
            ),
        ],
        "50m",
        [
            series(
                "llmsandbox_tasks_completed_total",
                'phase="Failed",exit_reason="max_steps"',
                "0+1x60",
            ),
            series(
                "llmsandbox_tasks_completed_total",
                'phase="Succeeded",exit_reason="submitted"',
                "0+9x60",
            ),
        ],
    ),
    "LLMSandboxQueueNotDraining": (
        [
            series("llmsandbox_tasks", 'phase="Queued"', "3x60"),
            series(
                "llmsandbox_tasks_completed_total",
                'phase="Succeeded",exit_reason="submitted"',
                "7x60",
            ),
        ],
        "40m",
        [
            series("llmsandbox_tasks", 'phase="Queued"', "3x60"),
            series(
                "llmsandbox_tasks_completed_total",
                'phase="Succeeded",exit_reason="submitted"',
                "0+1x60",
            ),
        ],
    ),
    "LLMSandboxLLMErrorRatioHigh": (
        [
            series(
                "llmsandbox_tasks_completed_total",
                'phase="Failed",exit_reason="llm_error"',
                "0+3x60",
            ),
            series(
                "llmsandbox_tasks_completed_total",
                'phase="Succeeded",exit_reason="submitted"',
                "0+7x60",
            ),
        ],
        "40m",
        [
            series(
                "llmsandbox_tasks_completed_total",
                'phase="Failed",exit_reason="llm_error"',
                "0+0x60",
            ),
            series(
                "llmsandbox_tasks_completed_total",
                'phase="Succeeded",exit_reason="submitted"',
                "0+7x60",
            ),
        ],
    ),
    "LLMSandboxNetworkPolicyNotEnforced": (
        [series("llmsandbox_network_policy_enforced", "", "0x10")],
        "5m",
        [series("llmsandbox_network_policy_enforced", "", "-1x10")],
    ),
    "LLMSandboxLLMRetriesHigh": (
        [
            series("llmsandbox_llm_retries_total", 'model="m"', "0+30x60"),
            series("llmsandbox_llm_requests_total", 'model="m"', "0+100x60"),
        ],
        "40m",
        [
            series("llmsandbox_llm_retries_total", 'model="m"', "0+1x60"),
            series("llmsandbox_llm_requests_total", 'model="m"', "0+100x60"),
        ],
    ),
    "LLMSandboxArtifactStoreFailing": (
        [series("llmsandbox_artifact_store_failures_total", "", "0+2x60")],
        "40m",
        [series("llmsandbox_artifact_store_failures_total", "", "5x60")],
    ),
}


@needs_promtool
def test_every_alert_fires_on_its_series_and_stays_quiet_otherwise(
    custom_objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    groups = rule_groups(custom_objects)
    assert sorted(alert_names(groups)) == sorted(ALERT_CASES), "an alert without a unit test"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    tests = []
    for alert, (firing, at, quiet) in ALERT_CASES.items():
        tests.append({
            "interval": "1m",
            "input_series": firing,
            "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": [{
                "exp_labels": _labels_of(alert, groups),
                "exp_annotations": _annotations_of(alert, groups),
            }]}],
        })  # fmt: skip
        tests.append({
            "interval": "1m",
            "input_series": quiet,
            "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": []}],
        })  # fmt: skip
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yaml"], "tests": tests})
    )
    ran = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr


# What each firing alert's description says of its value, for the series above.
VALUES = {
    "LLMSandboxTaskFailureRatioHigh": "50%",  # 5 failed and 5 succeeded a minute
    "LLMSandboxQueueNotDraining": "3",
    "LLMSandboxLLMErrorRatioHigh": "30%",
    "LLMSandboxLLMRetriesHigh": "30%",
    "LLMSandboxArtifactStoreFailing": "30",  # 2 a minute over 15 minutes
}


def _rule(alert: str, groups: dict[str, Any]) -> dict[str, Any]:
    (rule,) = [r for g in groups["groups"] for r in g["rules"] if r.get("alert") == alert]
    return dict(rule)


def _annotations_of(alert: str, groups: dict[str, Any]) -> dict[str, str]:
    """The rule's annotations as Prometheus renders them for the firing series."""
    out = {}
    for key, text in (_rule(alert, groups).get("annotations") or {}).items():
        for template in ("{{ $value | humanizePercentage }}", "{{ $value }}"):
            text = text.replace(template, VALUES.get(alert, "?"))
        out[key] = text.replace("{{ $labels.model }}", "m")
    return out


def _labels_of(alert: str, groups: dict[str, Any]) -> dict[str, str]:
    """The labels the firing alert carries: its rule's, and the model for the per-model one."""
    labels = dict(_rule(alert, groups).get("labels") or {})
    if alert == "LLMSandboxLLMRetriesHigh":
        labels["model"] = "m"
    if alert == "LLMSandboxOperatorDown":
        labels.update(job="llm-sandbox-metrics", namespace="llm-sandbox")
    return labels


def test_the_alert_cases_name_only_exported_metrics() -> None:
    from sandbox_operator.metrics import METRIC_NAMES

    for firing, _, quiet in ALERT_CASES.values():
        for s in firing + quiet:
            name = s["series"].split("{", 1)[0]
            assert name == "up" or name in METRIC_NAMES, name


PROMETHEUS = shutil.which("prometheus")


class Prometheus:
    """A real Prometheus on 127.0.0.1 scraping one target every second."""

    def __init__(self, target_port: int, workdir: Path) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "llm-sandbox-metrics",
                    "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        assert PROMETHEUS is not None
        self._log = (workdir / "prometheus.log").open("w")
        self._proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("prometheus did not become ready in 60 s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        params = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", (expr, body)
        return list(body["data"]["result"])

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()


def graded_set(name: str) -> dict[str, Any]:
    """A SandboxTaskSet of one item whose expected answer is the scripted model's."""
    template = task("template")["spec"]
    del template["prompt"]
    return {
        "apiVersion": "llmsandbox.io/v1alpha1",
        "kind": "SandboxTaskSet",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "template": template,
            "items": [{"id": "q1", "prompt": "What is six times seven?", "expected": "42"}],
            "grader": {"type": "exact"},
        },
    }


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of the shipped dashboard, with its variables as
    Grafana fills them: every job, and a rate window that covers the whole test run."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$job", ".*").replace("$__rate_interval", "10m")
            found.append((panel["title"], expr))
    return found


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not found (apt-get install prometheus)")
def test_every_dashboard_query_returns_data_from_a_real_prometheus_scraping_the_operator(
    k8s: EmulatedApiServer,
    kubelet: TestKubelet,
    run_operator: Any,
    llm_server: ScriptedLLMServer,
    s3_server: S3Server,
    tmp_path: Path,
) -> None:
    # A run that moves every series: answers with tool calls (tokens, cost, tools, latencies),
    # an evicted attempt (retries), an endpoint that fails (llm_error, LLM retries), a store
    # without its bucket (artifact failures) and a one-item set (scores, sets completed).
    def model(request: dict[str, Any]) -> Any:
        if "endpoint down" in json.dumps(request["messages"][:2]):
            return error(503, message="overloaded")
        if request["messages"][-1]["role"] == "tool":
            return tool_call("submit", {"answer": "42"}, usage=(300, 30))
        return tool_call("execute_bash", {"command": "echo 42"}, usage=(200, 20))

    llm_server.set_default(model)
    kubelet.inject(lambda pod: pod["metadata"]["name"].startswith("evicted-a1"), Evict(after=0.3))
    k8s.create(secret())
    k8s.create(store_secret(s3_server))
    metrics_port = free_port()
    env = store_env(llm_server, "s3://no-bucket-for-metrics")
    env["LLMSANDBOX_METRICS_PORT"] = str(metrics_port)
    prometheus: Prometheus | None = None
    try:
        with run_operator(OPERATOR, env=env):
            prometheus = Prometheus(metrics_port, tmp_path)
            k8s.create(task("answers"))
            k8s.create(task("evicted", retries=1))
            k8s.create(task("down", "The endpoint down case.", limits={"maxLlmRetries": 1}))
            k8s.create(graded_set("graded"))
            ended = {
                name: wait_phase(k8s, name, TERMINAL) for name in ("answers", "evicted", "down")
            }
            k8s.wait_for(
                lambda: (
                    ((k8s.get("sandboxtasksets", "graded") or {}).get("status") or {}).get("phase")
                    in ("Succeeded", "Failed")
                ),
                timeout=60,
                message="set graded to finish",
            )
            # A rate needs two scrapes of a series after it first appears; on a loaded machine
            # scrapes come late, so wait (up to a minute) until the queries have them.
            give_up = time.monotonic() + 60
            while True:
                empty = [(title, expr) for title, expr in dashboard_queries()
                         if not prometheus.query(expr)]  # fmt: skip
                if not empty or time.monotonic() > give_up:
                    break
                time.sleep(1)
            up = prometheus.query('up{job="llm-sandbox-metrics"}')
    finally:
        if prometheus is not None:
            prometheus.stop()
    assert [up[0]["value"][1]] == ["1"]
    assert (ended["evicted"]["attempt"], ended["down"]["exitReason"]) == (2, "llm_error")
    assert "NoSuchBucket" in ended["answers"]["artifactsError"]
    assert empty == [], f"dashboard queries that return no data: {empty}"
