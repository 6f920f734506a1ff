"""The production install guide (docs/production.md) as it is written: each of its values blocks,
alone and all together, renders with Helm's own engine into objects Kubernetes 1.29-1.33 accepts
and into settings the operator accepts, does what the guide says it does to task pods, and its
manifests are valid objects too. The blocks are read from the page, so the page cannot drift."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from sandbox_agent.task import SandboxTask, parse_task
from sandbox_operator.canary import Target, canary_pod
from sandbox_operator.errors import SpecError
from sandbox_operator.pod_builder import build_pod
from sandbox_operator.settings import OperatorSettings, load_settings

if TYPE_CHECKING:
    from helm_python import Chart

helm = pytest.importorskip("helm_python", reason="needs helm-python-sdk")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "llm-sandbox"
GUIDE = ROOT / "docs" / "production.md"
KUBE_VERSIONS = ("1.29", "1.30", "1.31", "1.32", "1.33")
# A fenced block the guide marks as one to check: `# production values: NAME` or `manifest`.
_BLOCK = re.compile(r"```yaml\n# production (values|manifest): ([a-z0-9-]+)\n(.*?)```", re.DOTALL)


def guide_blocks(kind: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for block_kind, name, text in _BLOCK.findall(GUIDE.read_text()):
        if block_kind == kind:
            assert name not in found, f"two {kind} blocks named {name}"
            found[name] = yaml.safe_load(text)
    return found


VALUES = guide_blocks("values")
MANIFESTS = guide_blocks("manifest")


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on `base` as `helm -f base -f over` does: maps merged key by key, the rest replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def variant(name: str) -> dict[str, Any]:
    """A block alone, or `all`: every block in the guide's order, as its helm command has them."""
    if name != "all":
        return dict(VALUES[name])
    out: dict[str, Any] = {}
    for values in VALUES.values():
        out = merged(out, values)
    return out


VARIANTS = [*VALUES, "all"]


@pytest.fixture(scope="module")
def chart() -> Iterator[Chart]:
    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded


def render(chart: Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = chart.render(values, name="llm-sandbox", namespace="llm-sandbox", is_install=True)
    return [
        doc
        for path, text in rendered.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def operator_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"]}


def settings_of(
    chart: Chart, values: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> OperatorSettings:
    """The operator's settings from the environment the chart gives it with `values`."""
    for name, value in operator_env(render(chart, values)).items():
        monkeypatch.setenv(name, value)
    return load_settings()


def a_task(**spec: Any) -> SandboxTask:
    return parse_task(
        {
            "apiVersion": "llmsandbox.io/v1alpha1",
            "kind": "SandboxTask",
            "metadata": {"name": "aime-07"},
            "spec": {"prompt": "Find the number.", **spec},
        }
    )


def task_pod(settings: OperatorSettings, task: SandboxTask | None = None) -> dict[str, Any]:
    return build_pod(
        task or a_task(), namespace="team-a", uid="uid-1", attempt=1, settings=settings
    )


def test_the_guide_has_the_blocks_its_sections_promise() -> None:
    assert list(VALUES) == [
        "base",
        "private-registry",
        "gvisor",
        "placement",
        "kueue",
        "s3-artifacts",
        "netpol-canary",
        "endpoint-limits",
    ]
    assert list(MANIFESTS) == ["runtimeclass-gvisor", "priorityclass-batch"]
    # The helm command at the top names a file per block, in the same order.
    command = GUIDE.read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    assert re.findall(r"-f (\S+)\.yaml", command) == list(VALUES)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_passes_the_values_schema_and_helm_lint(chart: Chart, name: str) -> None:
    chart.validate_schema(variant(name))
    report = helm.lint(str(CHART), variant(name), strict=True, namespace="llm-sandbox")
    assert not [m for m in report["messages"] if m["severity"] >= 2], report
    assert not report["errors"], report


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_renders_objects_kubernetes_accepts(
    chart: Chart, name: str, version: str
) -> None:
    for obj in render(chart, variant(name)):
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # Prometheus Operator CRDs: their shape is tests/test_chart.py's
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", list(MANIFESTS))
def test_every_manifest_of_the_guide_is_valid(name: str, version: str) -> None:
    kubernetes_validate.validate(MANIFESTS[name], version, strict=True)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_reaches_the_operator_as_settings_it_accepts(
    chart: Chart, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(chart, variant(name), monkeypatch)
    if name in ("base", "all"):
        # With an endpoint, a model and a key, a task pod can be built and Kubernetes takes it.
        pod = task_pod(settings)
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(pod, version, strict=True)


def test_the_gvisor_variant_puts_every_task_pod_and_the_canary_under_gvisor(
    chart: Chart, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(chart, merged(VALUES["base"], VALUES["gvisor"]), monkeypatch)
    assert task_pod(settings)["spec"]["runtimeClassName"] == "gvisor"
    canary = canary_pod("team-a", Target("10.96.0.1", 443), settings)
    assert (
        canary["spec"]["runtimeClassName"] == MANIFESTS["runtimeclass-gvisor"]["metadata"]["name"]
    )
    with pytest.raises(SpecError, match=r"^spec\.sandbox\.runtimeClassName: 'runc' is not allowed"):
        task_pod(settings, a_task(sandbox={"runtimeClassName": "runc"}))


def test_the_registry_variant_pulls_every_image_from_the_registry_with_its_secret(
    chart: Chart, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = merged(VALUES["base"], VALUES["private-registry"])
    (deployment,) = [o for o in render(chart, values) if o["kind"] == "Deployment"]
    operator_pod = deployment["spec"]["template"]["spec"]
    assert operator_pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert operator_pod["containers"][0]["image"].startswith("registry.example.com/")
    settings = settings_of(chart, values, monkeypatch)
    spec = task_pod(settings)["spec"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    for container in spec["initContainers"] + spec["containers"]:
        assert container["image"].startswith("registry.example.com/llm-sandbox/"), container
    for container in spec["initContainers"] + spec["containers"][1:]:
        assert container["imagePullPolicy"] == "IfNotPresent"
    own = a_task(sandbox={"image": "registry.example.com/team-a/sandbox:v3", "imagePullSecrets": [{"name": "team-a-registry"}]})  # fmt: skip
    assert task_pod(settings, own)["spec"]["imagePullSecrets"] == [
        {"name": "regcred"},
        {"name": "team-a-registry"},
    ]
    other = a_task(sandbox={"imagePullSecrets": [{"name": "prod-registry"}]})
    with pytest.raises(SpecError) as info:
        task_pod(settings, other)
    assert str(info.value).startswith(
        "spec.sandbox.imagePullSecrets[0].name: 'prod-registry' is not a pull secret tasks may use "
        "on this cluster"
    )


def test_the_placement_variant_keeps_task_pods_on_the_sandbox_pool(
    chart: Chart, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(chart, merged(VALUES["base"], VALUES["placement"]), monkeypatch)
    spec = task_pod(settings, a_task(scheduling={"nodeSelector": {"disk": "ssd"}}))["spec"]
    assert spec["nodeSelector"] == {"llmsandbox.io/pool": "sandbox", "disk": "ssd"}
    assert spec["tolerations"] == VALUES["placement"]["taskPods"]["tolerations"]
    assert spec["priorityClassName"] == MANIFESTS["priorityclass-batch"]["metadata"]["name"]
    # The spread constraint selects task pods by the labels they carry.
    (spread,) = spec["topologySpreadConstraints"]
    labels = task_pod(settings)["metadata"]["labels"]
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()
    with pytest.raises(SpecError, match=r"^spec\.scheduling\.nodeSelector\.llmsandbox\.io/pool"):
        task_pod(settings, a_task(scheduling={"nodeSelector": {"llmsandbox.io/pool": "gpu"}}))
    with pytest.raises(SpecError, match=r"^spec\.scheduling\.tolerations: tasks may not set it"):
        task_pod(settings, a_task(scheduling={"tolerations": [{"operator": "Exists"}]}))


def test_the_kueue_variant_queues_every_task_and_leaves_the_cap_to_kueue(
    chart: Chart, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(chart, merged(VALUES["base"], VALUES["kueue"]), monkeypatch)
    assert settings.default_queue_name == "llm-sandbox"
    assert settings.max_running_tasks == 0


def test_the_s3_variant_gives_the_store_credentials_to_the_agent_alone(
    chart: Chart, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(chart, merged(VALUES["base"], VALUES["s3-artifacts"]), monkeypatch)
    assert settings.artifacts_url == "s3://eval-runs/cluster-a"
    sandbox, agent = task_pod(settings)["spec"]["containers"]
    assert agent["envFrom"] == [{"secretRef": {"name": "artifact-store"}}]
    assert "envFrom" not in sandbox
    assert [rule.ports for rule in settings.artifacts_egress] == [[9000]]


def test_the_canary_variant_runs_the_canary_in_a_watched_namespace(
    chart: Chart, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(chart, variant("all"), monkeypatch)
    assert settings.netpol_canary is True
    assert settings.canary_namespace in settings.watched_namespaces
    pod = canary_pod(settings.canary_namespace, Target("10.96.0.1", 443), settings)
    # The canary runs where task pods run, pulled as they are.
    assert pod["spec"]["nodeSelector"] == {"llmsandbox.io/pool": "sandbox"}
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)


def test_the_endpoint_limits_variant_caps_the_endpoint_and_its_model(
    chart: Chart, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(chart, variant("endpoint-limits"), monkeypatch)
    assert [(r.model, r.max_running) for r in settings.endpoint_limits] == [
        (None, 64),
        ("Qwen/Qwen3-Coder-30B-A3B-Instruct", 48),
    ]
    assert settings.adaptive_admission is True
