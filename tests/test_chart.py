"""The Helm chart: renders, validates against Kubernetes 1.29-1.33, grants exactly what the
operator uses, and its dashboard and alerts query only metrics the operator exports."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from sandbox_operator.kube import API_CALLS, resource_path
from sandbox_operator.metrics import METRIC_NAMES
from sandbox_operator.settings import ENV_PREFIX, OperatorSettings

if TYPE_CHECKING:
    from helm_python import Chart

helm = pytest.importorskip("helm_python", reason="needs helm-python-sdk")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "llm-sandbox"
KUBE_VERSIONS = ("1.29", "1.30", "1.31", "1.32", "1.33")
RELEASE = "llm-sandbox"
NAMESPACE = "llm-sandbox"

NON_DEFAULT: dict[str, Any] = {
    "watchedNamespaces": ["team-a", "team-b"],
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True, "folder": "LLM"},
    "inference": {
        "baseURL": "http://vllm.inference:8000/v1",
        "model": "Qwen/Qwen3-Coder-30B-A3B-Instruct",
        "allowedBaseURLs": ["https://api.openai.com/v1", "http://*.inference.svc:*/v1"],
        "apiKeySecretLabel": "example.com/llm-key=yes",
        "apiKeySecret": {"name": "llm-key", "key": "token"},
    },
    "inferenceEgress": [
        {"namespace_selector": {"kubernetes.io/metadata.name": "inference"}, "ports": [8000]}
    ],
    "tokenPrices": {
        "Qwen/Qwen3-Coder-30B-A3B-Instruct": {
            "prompt_per_million": 0.1,
            "completion_per_million": 0.3,
        }
    },
    "maxRunningTasks": 50,
    "kueue": {"defaultQueueName": "team-queue", "maxPreemptions": 3},
    "taskTTLSeconds": 86400,
    "keepFinishedPods": True,
    "artifacts": {
        "url": "s3://eval-runs/cluster-a",
        "credentialsSecret": "store-creds",
        "egress": [{"cidrs": ["10.20.0.0/16"], "ports": [9000]}],
        "maxTotalBytes": 1073741824,
    },
    "excludedCIDRs": ["10.244.0.0/16", "fd00:10:244::/56"],
    "netpolCanary": {"enabled": True, "namespace": "team-a", "target": "10.96.0.1:443"},
    "sandbox": {
        "defaultResources": {
            "requests": {"cpu": "500m", "memory": "512Mi"},
            "limits": {"cpu": "2", "memory": "2Gi", "ephemeral-storage": "4Gi"},
        },
        "maxLimits": {"cpu": "4", "memory": "8Gi", "ephemeral-storage": "20Gi"},
        "tmpSizeLimit": "512Mi",
        "requiredRuntimeClass": "gvisor",
        "userSplit": False,
    },
    "agent": {"image": {"pullPolicy": "Always"}},
    "operator": {
        "imagePullSecrets": [{"name": "regcred"}],
        "nodeSelector": {"node-role.example.com/system": "true"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "system"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}
                            ]
                        }
                    ]
                }
            }
        },
        "priorityClassName": "platform",
    },
    "taskPods": {
        "nodeSelector": {"llmsandbox.io/pool": "sandbox"},
        "tolerations": [
            {"key": "llmsandbox.io/sandbox", "operator": "Exists", "effect": "NoSchedule"}
        ],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 50,
                        "podAffinityTerm": {
                            "labelSelector": {"matchLabels": {"app": "db"}},
                            "topologyKey": "kubernetes.io/hostname",
                        },
                    }
                ]
            }
        },
        "priorityClassName": "llmsandbox-batch",
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "llm-sandbox"}},
            }
        ],
        "allowedSchedulingFields": ["nodeSelector", "tolerations"],
        "imagePullSecrets": [{"name": "regcred"}],
        "allowedImagePullSecrets": ["team-a-registry"],
    },
}

# Verbs and resources kopf itself needs in standalone mode (no peering), beyond API_CALLS.
KOPF_CLUSTER_RULES = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
}
KOPF_CLUSTERWIDE_RULES = {("", "namespaces"): {"list", "watch"}}
# kopf posts its events through the core API; events.k8s.io for newer clients.
KOPF_EVENT_RULES = {("", "events"): {"create"}, ("events.k8s.io", "events"): {"create"}}
# Prometheus' own series that alerts may use besides the operator's metrics.
PROMETHEUS_BUILTINS = {"up"}


@pytest.fixture(scope="module")
def chart() -> Iterator[Chart]:
    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded


def render(chart: Chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in rendered.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


@pytest.fixture(scope="module")
def default_objects(chart: Chart) -> list[dict[str, Any]]:
    return render(chart)


@pytest.fixture(scope="module")
def custom_objects(chart: Chart) -> list[dict[str, Any]]:
    return render(chart, NON_DEFAULT)


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def api_group(resource: str) -> str:
    """The API group of a resource the operator's client uses, from the client's own paths."""
    prefix = resource_path(resource.split("/")[0])
    return "" if prefix.startswith("/api/") else prefix.split("/")[2]


def grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def needed_by_operator() -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for verb, resource in API_CALLS:
        out.setdefault((api_group(resource), resource), set()).add(verb)
    return out


def merge(*parts: dict[tuple[str, str], set[str]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for part in parts:
        for key, verbs in part.items():
            out.setdefault(key, set()).update(verbs)
    return out


# -- rendering and validity ---------------------------------------------------------------------


def test_chart_metadata_names_version_and_app_version(chart: Chart) -> None:
    assert chart.metadata["apiVersion"] == "v2"
    assert chart.version == "0.1.0"
    assert chart.metadata["appVersion"] == "0.1.0"


@pytest.mark.parametrize("values", [None, NON_DEFAULT], ids=["default", "custom"])
def test_helm_lint_reports_no_warnings_or_errors(values: dict[str, Any] | None) -> None:
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems, report
    assert not report["errors"], report


@pytest.mark.parametrize("which", ["default_objects", "custom_objects"])
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_builtin_object_is_valid_for_supported_kubernetes(
    request: pytest.FixtureRequest, which: str, version: str
) -> None:
    for obj in request.getfixturevalue(which):
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # Prometheus Operator CRDs: shape checked below
        kubernetes_validate.validate(obj, version, strict=True)


def test_default_render_has_operator_rbac_and_metrics_service_only(
    default_objects: list[dict[str, Any]],
) -> None:
    kinds = sorted(o["kind"] for o in default_objects)
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ServiceAccount",
    ]


def test_monitoring_objects_have_the_prometheus_operator_shape(
    custom_objects: list[dict[str, Any]],
) -> None:
    (monitor,) = by_kind(custom_objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (service,) = by_kind(custom_objects, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}

    (rule,) = by_kind(custom_objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    for group in rule["spec"]["groups"]:
        assert group["name"]
        assert group["rules"]
        for alert in group["rules"]:
            assert set(alert) <= {"alert", "expr", "for", "labels", "annotations"}
            assert alert["alert"]
            assert isinstance(alert["expr"], str)
            assert re.fullmatch(r"\d+[smh]", alert["for"])
            assert alert["labels"]["severity"] in {"critical", "warning", "info"}
            assert alert["annotations"]["summary"]
            assert alert["annotations"]["description"]


def test_monitoring_objects_are_off_by_default(default_objects: list[dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in default_objects}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "ConfigMap"}


# -- the operator Deployment --------------------------------------------------------------------


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(objects, "Deployment")
    container: dict[str, Any]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_operator_runs_locked_down(default_objects: list[dict[str, Any]]) -> None:
    (deployment,) = by_kind(default_objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    container = operator_container(default_objects)
    assert container["command"] == ["python", "-m", "sandbox_operator"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    assert (
        pod["serviceAccountName"]
        == by_kind(default_objects, "ServiceAccount")[0]["metadata"]["name"]
    )


def test_probes_hit_kopfs_liveness_endpoint(default_objects: list[dict[str, Any]]) -> None:
    container = operator_container(default_objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz"
        assert ports[get["port"]] == 8080


def operator_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in operator_container(objects)["env"]}


@pytest.mark.parametrize("which", ["default_objects", "custom_objects"])
def test_env_is_accepted_by_the_operators_settings(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    env = operator_env(request.getfixturevalue(which))
    assert all(name.startswith(ENV_PREFIX) for name in env)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = OperatorSettings()
    custom = which == "custom_objects"
    assert settings.max_running_tasks == (50 if custom else 10)
    assert settings.default_queue_name == ("team-queue" if custom else None)
    assert settings.max_preemptions == (3 if custom else 10)
    assert settings.task_ttl_seconds == (86400 if custom else None)
    assert settings.keep_finished_pods is custom
    assert settings.artifacts_url == ("s3://eval-runs/cluster-a" if custom else None)
    assert settings.artifacts_credentials_secret == ("store-creds" if custom else None)
    assert settings.artifacts_max_total_bytes == (1073741824 if custom else 256 * 1024 * 1024)
    assert [r.cidrs for r in settings.artifacts_egress] == ([["10.20.0.0/16"]] if custom else [])
    task_pods = NON_DEFAULT["taskPods"]
    placement = {k: v for k, v in task_pods.items() if not k.startswith("allowed")}
    placement.pop("imagePullSecrets")
    assert settings.task_scheduling.pod_fields() == (placement if custom else {})
    assert settings.allowed_scheduling_fields == (
        task_pods["allowedSchedulingFields"]
        if custom
        else ["nodeSelector", "affinity", "topologySpreadConstraints"]
    )
    assert [r.name for r in settings.task_image_pull_secrets] == (["regcred"] if custom else [])
    assert settings.allowed_image_pull_secrets == (["team-a-registry"] if custom else [])
    assert settings.agent_image_pull_policy == ("Always" if custom else "IfNotPresent")


def test_without_task_pod_placement_the_setting_is_an_empty_object(
    default_objects: list[dict[str, Any]],
) -> None:
    assert operator_env(default_objects)["LLMSANDBOX_TASK_SCHEDULING"] == "{}"


def test_the_operator_pod_gets_its_own_placement_and_pull_secrets(
    custom_objects: list[dict[str, Any]],
) -> None:
    (deployment,) = by_kind(custom_objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    for field in ("imagePullSecrets", "nodeSelector", "tolerations", "affinity"):
        assert pod[field] == NON_DEFAULT["operator"][field]
    assert pod["priorityClassName"] == "platform"


def test_custom_values_reach_the_operator_as_json(custom_objects: list[dict[str, Any]]) -> None:
    env = operator_env(custom_objects)
    assert json.loads(env["LLMSANDBOX_WATCHED_NAMESPACES"]) == NON_DEFAULT["watchedNamespaces"]
    assert json.loads(env["LLMSANDBOX_INFERENCE_EGRESS"]) == NON_DEFAULT["inferenceEgress"]
    assert json.loads(env["LLMSANDBOX_TOKEN_PRICES"]) == NON_DEFAULT["tokenPrices"]
    assert env["LLMSANDBOX_DEFAULT_BASE_URL"] == NON_DEFAULT["inference"]["baseURL"]
    assert env["LLMSANDBOX_DEFAULT_API_KEY_SECRET"] == "llm-key"
    assert env["LLMSANDBOX_DEFAULT_API_KEY_SECRET_KEY"] == "token"
    allowed = json.loads(env["LLMSANDBOX_ALLOWED_BASE_URLS"])
    assert allowed == NON_DEFAULT["inference"]["allowedBaseURLs"]
    assert env["LLMSANDBOX_API_KEY_SECRET_LABEL"] == "example.com/llm-key=yes"
    assert json.loads(env["LLMSANDBOX_EXCLUDED_CIDRS"]) == NON_DEFAULT["excludedCIDRs"]
    assert env["LLMSANDBOX_NETPOL_CANARY"] == "true"
    assert env["LLMSANDBOX_NETPOL_CANARY_NAMESPACE"] == "team-a"
    assert env["LLMSANDBOX_NETPOL_CANARY_TARGET"] == "10.96.0.1:443"
    sandbox = NON_DEFAULT["sandbox"]
    assert json.loads(env["LLMSANDBOX_SANDBOX_DEFAULT_RESOURCES"]) == sandbox["defaultResources"]
    assert json.loads(env["LLMSANDBOX_SANDBOX_MAX_LIMITS"]) == sandbox["maxLimits"]
    assert env["LLMSANDBOX_SANDBOX_TMP_SIZE_LIMIT"] == "512Mi"
    assert env["LLMSANDBOX_REQUIRED_RUNTIME_CLASS"] == "gvisor"
    assert env["LLMSANDBOX_SANDBOX_USER_SPLIT"] == "false"


def test_by_default_tasks_may_use_only_the_default_endpoint_and_labelled_secrets(
    default_objects: list[dict[str, Any]],
) -> None:
    env = operator_env(default_objects)
    assert json.loads(env["LLMSANDBOX_ALLOWED_BASE_URLS"]) == []
    assert env["LLMSANDBOX_API_KEY_SECRET_LABEL"] == "llmsandbox.io/api-key=true"


def test_metrics_service_targets_the_metrics_port(default_objects: list[dict[str, Any]]) -> None:
    (service,) = by_kind(default_objects, "Service")
    ports = {p["name"]: p["containerPort"] for p in operator_container(default_objects)["ports"]}
    (port,) = service["spec"]["ports"]
    assert ports[port["targetPort"]] == port["port"]
    assert str(port["port"]) == operator_env(default_objects)["LLMSANDBOX_METRICS_PORT"]


# -- RBAC ---------------------------------------------------------------------------------------


def test_clusterwide_rbac_grants_exactly_api_calls_and_kopfs_needs(
    default_objects: list[dict[str, Any]],
) -> None:
    (role,) = by_kind(default_objects, "ClusterRole")
    expected = merge(
        needed_by_operator(), KOPF_CLUSTER_RULES, KOPF_CLUSTERWIDE_RULES, KOPF_EVENT_RULES
    )
    assert grants(role["rules"]) == expected
    (binding,) = by_kind(default_objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["namespace"] == NAMESPACE


def test_namespaced_rbac_is_a_role_per_watched_namespace(
    custom_objects: list[dict[str, Any]],
) -> None:
    (cluster_role,) = by_kind(custom_objects, "ClusterRole")
    # CRDs are cluster-scoped; namespaces are not watched when kopf has a fixed list.
    assert grants(cluster_role["rules"]) == KOPF_CLUSTER_RULES
    roles = by_kind(custom_objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == NON_DEFAULT["watchedNamespaces"]
    for role in roles:
        assert grants(role["rules"]) == merge(needed_by_operator(), KOPF_EVENT_RULES)
    bindings = by_kind(custom_objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == NON_DEFAULT["watchedNamespaces"]


@pytest.mark.parametrize("which", ["default_objects", "custom_objects"])
def test_rbac_has_no_wildcards_and_reads_secrets_only_by_name(
    request: pytest.FixtureRequest, which: str
) -> None:
    for obj in request.getfixturevalue(which):
        for rule in obj.get("rules", []):
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], rule
            if "secrets" in rule["resources"]:
                # A Secret's labels are checked by name; Secrets are never listed or watched.
                assert rule["resources"] == ["secrets"]
                assert rule["verbs"] == ["get"]


def documented_grants() -> dict[tuple[str, str], set[str]]:
    """The grants table of docs/operator.md ("Permissions (RBAC)")."""
    text = (ROOT / "docs" / "operator.md").read_text()
    section = text.split("## Permissions (RBAC)", 1)[1].split("\n## ", 1)[0]
    out: dict[tuple[str, str], set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        for group, resource in re.findall(r"`([^`]*)` `([^`]*)`", cells[0]):
            out.setdefault((group.strip('"'), resource), set()).update(cells[1].split(", "))
    return out


def test_the_documented_grants_are_the_clusterwide_role(
    default_objects: list[dict[str, Any]],
) -> None:
    (role,) = by_kind(default_objects, "ClusterRole")
    assert documented_grants() == grants(role["rules"])


# -- dashboard and alerts -----------------------------------------------------------------------

_METRIC_TOKEN = re.compile(r"\bllmsandbox_[a-z0-9_]+")
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{")


def family(series: str) -> str:
    """The family a queried series belongs to (`_bucket`, `_sum`, `_count` of histograms)."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = series.removesuffix(suffix)
        if base != series and base in METRIC_NAMES:
            return base
    return series


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var.get("type") == "query":
            exprs.append(var["definition"])
    return exprs


@pytest.fixture(scope="module")
def dashboard(custom_objects: list[dict[str, Any]]) -> dict[str, Any]:
    (configmap,) = by_kind(custom_objects, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    loaded: dict[str, Any] = json.loads(configmap["data"]["llm-sandbox.json"])
    assert loaded == json.loads((CHART / "dashboards" / "llm-sandbox.json").read_text())
    return loaded


def test_dashboard_queries_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    queried = {family(m) for e in dashboard_exprs(dashboard) for m in _METRIC_TOKEN.findall(e)}
    assert queried <= set(METRIC_NAMES), queried - set(METRIC_NAMES)


def test_every_exported_metric_is_on_the_dashboard(dashboard: dict[str, Any]) -> None:
    queried = {family(m) for e in dashboard_exprs(dashboard) for m in _METRIC_TOKEN.findall(e)}
    assert set(METRIC_NAMES) <= queried, set(METRIC_NAMES) - queried


def test_dashboard_shows_latency_quantiles_from_histogram_buckets(
    dashboard: dict[str, Any],
) -> None:
    exprs = "\n".join(dashboard_exprs(dashboard))
    for histogram in (
        "llmsandbox_queue_wait_seconds",
        "llmsandbox_pod_startup_seconds",
        "llmsandbox_task_run_seconds",
    ):
        for q in ("0.5", "0.9", "0.99"):
            assert f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket" in exprs


def test_dashboard_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & mine, panel["title"]
        assert pos["x"] + pos["w"] <= 24
        cells |= mine


def test_alerts_query_only_exported_metrics(custom_objects: list[dict[str, Any]]) -> None:
    (rule,) = by_kind(custom_objects, "PrometheusRule")
    alerts = [a for g in rule["spec"]["groups"] for a in g["rules"]]
    names = {a["alert"] for a in alerts}
    assert {
        "LLMSandboxOperatorDown",
        "LLMSandboxTaskFailureRatioHigh",
        "LLMSandboxQueueNotDraining",
        "LLMSandboxLLMErrorRatioHigh",
        "LLMSandboxNetworkPolicyNotEnforced",
    } <= names
    for alert in alerts:
        metrics = {family(m) for m in _METRIC_TOKEN.findall(alert["expr"])}
        assert metrics, alert["alert"]
        assert metrics <= set(METRIC_NAMES), (alert["alert"], metrics - set(METRIC_NAMES))
        # Every series selector (all carry label matchers) is ours or one Prometheus provides.
        selected = {family(m) for m in _SELECTOR.findall(alert["expr"])}
        assert selected <= set(METRIC_NAMES) | PROMETHEUS_BUILTINS, alert["alert"]


# -- values schema and committed manifests ------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"maxRunningTasks": -1},
        {"kueue": {"defaultQueueName": "Team_Queue"}},
        {"kueue": {"maxPreemptions": -1}},
        {"watchedNamespaces": ["Not_A_Namespace"]},
        {"operator": {"image": {"pullPolicy": "Sometimes"}}},
        {"tokenPrices": {"m": {"prompt_per_million": -1, "completion_per_million": 1}}},
        {"inferenceEgress": [{"ports": [8000]}]},
        {"inference": {"allowedBaseURLs": ["ftp://models.example/v1"]}},
        {"inference": {"allowedBaseURLs": ["https://user@evil.example/v1"]}},
        {"inference": {"apiKeySecretLabel": "no-value-given"}},
        {"excludedCIDRs": ["pods.cluster.local"]},
        {"isolatedDNSEgress": "no"},
        {"netpolCanary": {"target": "kubernetes.default:443"}},
        {"sandbox": {"maxLimits": {"gpu": "1"}}},
        {"sandbox": {"maxLimits": {"memory": "8 GB"}}},
        {"sandbox": {"requiredRuntimeClass": "gVisor"}},
        {"agent": {"image": {"pullPolicy": "always"}}},
        {"taskPods": {"nodeSelector": {"pool": "not a value"}}},
        {"taskPods": {"nodeSelector": {"Not A Key": "x"}}},
        {"taskPods": {"tolerations": [{"key": "a", "operator": "Equals"}]}},
        {"taskPods": {"tolerations": [{"key": "a", "effect": "NoRun"}]}},
        {"taskPods": {"affinity": {"nodeAfinity": {}}}},
        {
            "taskPods": {
                "affinity": {
                    "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{}]}
                }
            }
        },
        {"taskPods": {"priorityClassName": "High"}},
        {
            "taskPods": {
                "topologySpreadConstraints": [
                    {"maxSkew": 0, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}
                ]
            }
        },
        {"taskPods": {"allowedSchedulingFields": ["schedulerName"]}},
        {"taskPods": {"imagePullSecrets": ["regcred"]}},
        {"taskPods": {"allowedImagePullSecrets": ["Team_A"]}},
        {"taskPods": {"nodeSelektor": {}}},
        {"operator": {"tolerations": [{"key": "a", "effect": "Never"}]}},
        {"operator": {"imagePullSecrets": [{"name": "regcred", "namespace": "x"}]}},
        {"unknownKey": True},
    ],
)
def test_values_schema_rejects_bad_values(chart: Chart, bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad)
    with pytest.raises(helm.HelmError):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)


def test_values_schema_accepts_the_custom_values(chart: Chart) -> None:
    chart.validate_schema(NON_DEFAULT)


def test_committed_manifests_equal_a_fresh_render() -> None:
    fresh = subprocess.run(
        ["bash", str(ROOT / "scripts" / "render-manifests.sh"), "-"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    committed = (ROOT / "manifests" / "llm-sandbox.yaml").read_text()
    assert committed == fresh, (
        "manifests/llm-sandbox.yaml is stale: run scripts/render-manifests.sh"
    )


def _kind_up_values() -> dict[str, Any]:
    """The --set values scripts/kind-up.sh passes to helm, with placeholder shell values."""
    script = (Path(__file__).parent.parent / "scripts" / "kind-up.sh").read_text()
    values: dict[str, Any] = {}
    for key, raw in re.findall(r"--set ([\w.]+)=(\S+)", script):
        text = raw.strip('"').replace("${tag}", "0.1.0").replace("$tag", "0.1.0")
        text = text.replace("$OPENAI_BASE_URL", "http://10.0.0.1:8000/v1").replace(
            "$OPENAI_MODEL", "m"
        )
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = text
    return values


def test_the_kind_quickstart_values_render_and_reach_the_operator(chart: Chart) -> None:
    values = _kind_up_values()
    assert values["inference"]["baseURL"] == "http://10.0.0.1:8000/v1"
    objects = render(chart, values)
    env = operator_env(objects)
    assert env["LLMSANDBOX_DEFAULT_BASE_URL"] == "http://10.0.0.1:8000/v1"
    assert env["LLMSANDBOX_AGENT_IMAGE"] == "llm-sandbox/agent:0.1.0"
    assert env["LLMSANDBOX_DEFAULT_API_KEY_SECRET"] == "llm-key"
