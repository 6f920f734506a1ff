"""The task pod and its ConfigMap: what the operator asks Kubernetes to run, checked without a cluster."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import kubernetes_validate
import pytest

from conftest import settings_refusal
from sandbox_agent.podconfig import PodTaskConfig
from sandbox_agent.scheduling import SCHEDULING_FIELDS, Scheduling
from sandbox_agent.task import LocalObjectReference, Resources, SandboxTask, parse_task
from sandbox_operator.agent_config import resolve_model
from sandbox_operator.cluster_checks import validate_for_cluster
from sandbox_operator.errors import SpecError
from sandbox_operator.metadata import task_configmap_name
from sandbox_operator.pod_builder import build_attempt, build_pod, pod_name
from sandbox_operator.settings import OperatorSettings, SettingsError, cost_usd, load_settings
from sandbox_operator.task_configmap import build_task_configmap

KUBERNETES_VERSIONS = ["1.29", "1.30", "1.31", "1.32", "1.33"]
UID = "5f0c6a1e-3b7d-4c2a-9e8f-1a2b3c4d5e6f"
NAMESPACE = "research"
SETTINGS = OperatorSettings(
    default_model="Qwen/Qwen3-Coder-30B-A3B-Instruct",
    default_base_url="http://vllm.inference:8000/v1",
    default_api_key_secret="llm-default-key",
)
LONG_NAME = "a" * 120 + "." + "b" * 132  # 253 characters, the longest name a task can have


def make_task(name: str | None = "aime-07", **spec: Any) -> SandboxTask:
    metadata = {"name": name} if name is not None else {}
    return parse_task(
        {
            "apiVersion": "llmsandbox.io/v1alpha1",
            "kind": "SandboxTask",
            "metadata": metadata,
            "spec": {"prompt": "Find the number.", **spec},
        }
    )


def pod_for(
    task: SandboxTask, attempt: int = 1, settings: OperatorSettings = SETTINGS
) -> dict[str, Any]:
    return build_pod(task, namespace=NAMESPACE, uid=UID, attempt=attempt, settings=settings)


def configmap_for(task: SandboxTask, settings: OperatorSettings = SETTINGS) -> dict[str, Any]:
    return build_task_configmap(task, namespace=NAMESPACE, uid=UID, settings=settings)


def assert_valid(obj: dict[str, Any]) -> None:
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod["spec"]
    found: list[dict[str, Any]] = [
        c for c in spec["containers"] + spec["initContainers"] if c["name"] == name
    ]
    assert len(found) == 1, name
    return found[0]


def mounts(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in c["volumeMounts"]}


def volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [v for v in pod["spec"]["volumes"] if v["name"] == name]
    assert len(found) == 1, name
    return found[0]


def strings_in(obj: Any) -> Iterator[str]:
    """Every key and string value in a JSON-like object."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield str(key)
            yield from strings_in(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from strings_in(item)
    elif isinstance(obj, str):
        yield obj


FULL_TASK: dict[str, Any] = {
    "inputs": [
        {"path": "paper.txt", "content": "Abstract."},
        {"path": "data/", "configMapRef": {"name": "aime-07-data"}},
        {"path": "tables/results.csv", "configMapRef": {"name": "tables", "key": "results"}},
        {"path": "refs/", "configMapRef": {"name": "refs", "key": "bib.txt"}},
    ],
    "model": {"name": "gpt-x", "apiKeySecretRef": {"name": "llm-key", "key": "token"}},
    "sandbox": {
        "image": "python:3.12-slim",
        "runtimeClassName": "gvisor",
        "resources": {
            "requests": {"cpu": "500m", "memory": "512Mi"},
            "limits": {"cpu": "2", "memory": "2Gi", "ephemeral-storage": "4Gi"},
        },
        "network": {"mode": "allowList", "allow": ["203.0.113.7:443"]},
    },
}


@pytest.fixture
def full_pod() -> dict[str, Any]:
    return pod_for(make_task(**FULL_TASK))


def test_strict_validation_rejects_an_unknown_field() -> None:
    pod = pod_for(make_task())
    pod["spec"]["containers"][0]["privileged"] = True  # belongs in securityContext
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, "1.29", strict=True)


@pytest.mark.parametrize(
    "task",
    [
        make_task(),
        make_task(**FULL_TASK),
        make_task(name=LONG_NAME, inputs=[{"path": "a.txt", "content": "x"}]),
        make_task(sandbox={"network": {"mode": "internet"}}),
        make_task(inputs=[{"path": "data/", "configMapRef": {"name": "only-whole"}}]),
    ],
    ids=["minimal", "everything", "longest-name", "internet", "only-a-whole-configmap"],
)
def test_pod_and_configmap_validate_against_kubernetes_1_29_to_1_33(task: SandboxTask) -> None:
    assert_valid(pod_for(task))
    assert_valid(configmap_for(task))


def test_the_sandbox_container_gets_no_secret_and_no_credential(full_pod: dict[str, Any]) -> None:
    sandbox = container(full_pod, "sandbox")
    assert sandbox["env"] == [{"name": "HOME", "value": "/tmp/home"}]
    assert "envFrom" not in sandbox
    text = list(strings_in(sandbox))
    assert not [s for s in text if "secret" in s.lower() or "OPENAI" in s or s == "token"]
    assert not [v for v in full_pod["spec"]["volumes"] if "secret" in v]


def test_the_api_key_reaches_only_the_agent_from_the_tasks_secret(
    full_pod: dict[str, Any],
) -> None:
    agent = container(full_pod, "agent")
    assert agent["env"] == [
        {
            "name": "OPENAI_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "llm-key", "key": "token"}},
        },
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    holders = [
        c["name"] for c in full_pod["spec"]["containers"] + full_pod["spec"]["initContainers"]
    ]
    holders = [n for n in holders if "secretKeyRef" in json.dumps(container(full_pod, n))]
    assert holders == ["agent"]


def test_the_api_key_falls_back_to_the_operators_default_secret() -> None:
    settings = SETTINGS.model_copy(update={"default_api_key_secret_key": "key"})
    agent = container(pod_for(make_task(), settings=settings), "agent")
    assert agent["env"][0]["valueFrom"] == {
        "secretKeyRef": {"name": "llm-default-key", "key": "key"}
    }


def test_the_pod_holds_no_kubernetes_credential_and_never_restarts() -> None:
    spec = pod_for(make_task())["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert spec["restartPolicy"] == "Never"
    assert spec["terminationGracePeriodSeconds"] == 10


def test_every_container_is_unprivileged_and_seccomp_confined(full_pod: dict[str, Any]) -> None:
    spec = full_pod["spec"]
    assert spec["securityContext"] == {
        "fsGroup": 65534,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    for c in spec["initContainers"] + spec["containers"]:
        ctx = c["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False, c["name"]
        assert ctx["privileged"] is False, c["name"]
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
        assert ctx["capabilities"]["drop"] == ["ALL"], c["name"]
    for name in ("install-execd", "agent"):
        ctx = container(full_pod, name)["securityContext"]
        assert ctx["runAsNonRoot"] is True, name
        assert (ctx["runAsUser"], ctx["runAsGroup"]) == (65532, 65532), name
        assert "add" not in ctx["capabilities"], name


def test_the_exec_server_drops_from_root_and_runs_commands_as_nobody(
    full_pod: dict[str, Any],
) -> None:
    """The sandbox container is root only for the exec server's first instructions: it drops to
    the agent's uid (which owns the private run directory) keeping three capabilities, and every
    command runs as nobody, so no command can signal, trace or impersonate it."""
    sandbox = container(full_pod, "sandbox")
    ctx = sandbox["securityContext"]
    assert (ctx["runAsUser"], ctx["runAsGroup"], ctx["runAsNonRoot"]) == (0, 0, False)
    assert ctx["capabilities"] == {"drop": ["ALL"], "add": ["KILL", "SETGID", "SETUID"]}
    command = sandbox["command"]
    assert command[command.index("--drop-to") + 1] == "65532:65532"
    assert command[command.index("--command-user") + 1] == "65534:65534"


def test_without_the_user_split_every_container_is_nobody_for_pod_security_restricted() -> None:
    """LLMSANDBOX_SANDBOX_USER_SPLIT=false: no root and no added capability anywhere (what the
    Pod Security Standard "restricted" demands); the exec server and the commands share nobody."""
    settings = SETTINGS.model_copy(update={"sandbox_user_split": False})
    pod = pod_for(make_task(**FULL_TASK), settings=settings)
    assert_valid(pod)
    for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
        ctx = c["securityContext"]
        assert (ctx["runAsUser"], ctx["runAsGroup"], ctx["runAsNonRoot"]) == (65534, 65534, True)
        assert ctx["capabilities"] == {"drop": ["ALL"]}, c["name"]
    command = container(pod, "sandbox")["command"]
    assert "--drop-to" not in command
    assert "--command-user" not in command


def test_agent_and_installer_roots_are_read_only_and_the_sandbox_root_is_not(
    full_pod: dict[str, Any],
) -> None:
    assert container(full_pod, "agent")["securityContext"]["readOnlyRootFilesystem"] is True
    assert container(full_pod, "install-execd")["securityContext"]["readOnlyRootFilesystem"] is True
    assert "readOnlyRootFilesystem" not in container(full_pod, "sandbox")["securityContext"]


def test_the_deadline_is_the_tasks_limit_plus_the_operators_grace() -> None:
    settings = SETTINGS.model_copy(update={"deadline_grace_seconds": 45})
    pod = pod_for(make_task(limits={"activeDeadlineSeconds": 600}), settings=settings)
    assert pod["spec"]["activeDeadlineSeconds"] == 645


def test_pod_and_configmap_are_owned_by_the_task() -> None:
    task = make_task()
    expected = [
        {
            "apiVersion": "llmsandbox.io/v1alpha1",
            "kind": "SandboxTask",
            "name": "aime-07",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert pod_for(task)["metadata"]["ownerReferences"] == expected
    assert configmap_for(task)["metadata"]["ownerReferences"] == expected


def test_pod_metadata_names_the_task_the_attempt_and_the_network_mode() -> None:
    pod = pod_for(make_task(sandbox={"network": {"mode": "internet"}}), attempt=3)
    meta = pod["metadata"]
    assert meta["name"] == "aime-07-a3"
    assert meta["namespace"] == NAMESPACE
    assert meta["labels"] == {
        "app.kubernetes.io/name": "llm-sandbox",
        "app.kubernetes.io/component": "task",
        "app.kubernetes.io/managed-by": "llm-sandbox-operator",
        "llmsandbox.io/task-uid": UID,
        "llmsandbox.io/attempt": "3",
        "llmsandbox.io/network": "internet",
        "llmsandbox.io/task": "aime-07",
    }
    assert meta["annotations"]["llmsandbox.io/task-name"] == "aime-07"
    assert meta["annotations"]["kubectl.kubernetes.io/default-container"] == "agent"


@pytest.mark.parametrize(
    ("network", "label"),
    [
        ({"mode": "isolated"}, "isolated"),
        ({"mode": "internet"}, "internet"),
        ({"mode": "allowList", "allow": ["198.51.100.5:8000"]}, "allowlist"),
    ],
)
def test_the_network_label_follows_the_mode(network: dict[str, Any], label: str) -> None:
    task = make_task(sandbox={"network": network})
    assert pod_for(task)["metadata"]["labels"]["llmsandbox.io/network"] == label
    assert configmap_for(task)["metadata"]["labels"]["llmsandbox.io/network"] == label


@pytest.mark.parametrize(
    ("spec", "default", "queue"),
    [
        ({"queueName": "team-a"}, None, "team-a"),
        ({}, "batch", "batch"),
        ({"queueName": "team-a"}, "batch", "team-a"),
        ({}, None, None),
    ],
    ids=["the-tasks-own", "the-operators-default", "the-task-wins", "none"],
)
def test_a_pod_carries_kueues_queue_label_for_the_tasks_local_queue(
    spec: dict[str, Any], default: str | None, queue: str | None
) -> None:
    settings = SETTINGS.model_copy(update={"default_queue_name": default})
    pod = pod_for(make_task(**spec), settings=settings)
    assert pod["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == queue
    # Only the label: Kueue's webhook adds its gate, and the pod spec is unchanged.
    assert "schedulingGates" not in pod["spec"]
    assert pod["spec"] == pod_for(make_task(), settings=SETTINGS)["spec"]
    assert_valid(pod)


def test_the_default_queue_name_must_be_a_local_queue_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    [line] = settings_refusal(monkeypatch, {"LLMSANDBOX_DEFAULT_QUEUE_NAME": "Team A"})
    assert line.startswith("LLMSANDBOX_DEFAULT_QUEUE_NAME: String should match pattern")


def test_a_zero_cap_on_running_tasks_means_none_of_the_operators_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMSANDBOX_MAX_RUNNING_TASKS", "0")
    monkeypatch.setenv("LLMSANDBOX_MAX_PREEMPTIONS", "3")
    settings = load_settings()
    assert (settings.max_running_tasks, settings.max_preemptions) == (0, 3)


def test_configmap_labels_are_the_pods_without_the_attempt() -> None:
    task = make_task()
    pod_labels = dict(pod_for(task)["metadata"]["labels"])
    del pod_labels["llmsandbox.io/attempt"]
    assert configmap_for(task)["metadata"]["labels"] == pod_labels


def test_the_installer_copies_the_exec_server_into_the_shared_volumes(
    full_pod: dict[str, Any],
) -> None:
    install = container(full_pod, "install-execd")
    assert full_pod["spec"]["initContainers"] == [install]
    assert install["image"] == SETTINGS.agent_image
    assert install["command"] == [
        "python", "-m", "sandbox_agent.pod_entrypoint", "install",
        "--execd-dir", "/opt/llmsandbox", "--run-dir", "/run/execd",
    ]  # fmt: skip
    assert mounts(install) == {
        "/opt/llmsandbox": {"name": "execd-bin", "mountPath": "/opt/llmsandbox"},
        "/run/execd": {"name": "execd-run", "mountPath": "/run/execd"},
    }
    assert install["resources"]["limits"]["memory"]


def test_the_sandbox_runs_the_exec_server_from_the_shared_volume(full_pod: dict[str, Any]) -> None:
    sandbox = container(full_pod, "sandbox")
    assert sandbox["image"] == "python:3.12-slim"
    assert sandbox["command"] == [
        "python3", "-I", "-S", "/opt/llmsandbox/execd.py",
        "--root", "/workspace",
        "--drop-to", "65532:65532", "--command-user", "65534:65534",
        "--unix-socket", "/run/execd/private/execd.sock",
        "--token-file", "/run/execd/private/token",
        "--ready-file", "/run/execd/private/ready.json",
    ]  # fmt: skip
    by_path = mounts(sandbox)
    assert by_path["/opt/llmsandbox"] == {
        "name": "execd-bin",
        "mountPath": "/opt/llmsandbox",
        "readOnly": True,
    }
    assert by_path["/run/execd"]["name"] == "execd-run"
    assert by_path["/workspace"]["name"] == "workspace"
    assert by_path["/workspace/input"] == {
        "name": "inputs",
        "mountPath": "/workspace/input",
        "readOnly": True,
    }
    assert by_path["/tmp"]["name"] == "tmp"


def test_the_agent_reads_its_config_and_reports_through_the_termination_log(
    full_pod: dict[str, Any],
) -> None:
    agent = container(full_pod, "agent")
    assert agent["image"] == SETTINGS.agent_image
    assert agent["command"] == [
        "python", "-m", "sandbox_agent.pod_entrypoint", "run",
        "--task", "/etc/llmsandbox/task.json",
        "--run-dir", "/run/execd",
        "--termination-log", "/dev/termination-log",
        "--execd-timeout", str(SETTINGS.execd_ready_timeout_seconds),
    ]  # fmt: skip
    assert agent["terminationMessagePath"] == "/dev/termination-log"
    assert agent["terminationMessagePolicy"] == "File"
    assert mounts(agent) == {
        "/run/execd": {"name": "execd-run", "mountPath": "/run/execd"},
        "/etc/llmsandbox": {"name": "task", "mountPath": "/etc/llmsandbox", "readOnly": True},
        "/tmp": {"name": "agent-tmp", "mountPath": "/tmp"},
    }
    # task.json is the pod's own annotation, projected with the downward API.
    assert volume(full_pod, "task")["downwardAPI"] == {
        "items": [
            {
                "path": "task.json",
                "fieldRef": {"fieldPath": "metadata.annotations['file.llmsandbox.io/task.json']"},
            }
        ]
    }
    annotations = full_pod["metadata"]["annotations"]
    assert (
        annotations["file.llmsandbox.io/task.json"]
        == configmap_for(make_task(**FULL_TASK))["data"]["task.json"]
    )


def test_shared_volumes_are_small_and_the_socket_volume_lives_in_memory(
    full_pod: dict[str, Any],
) -> None:
    assert volume(full_pod, "execd-bin")["emptyDir"] == {"sizeLimit": "16Mi"}
    assert volume(full_pod, "execd-run")["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Mi"}
    assert volume(full_pod, "agent-tmp")["emptyDir"] == {"sizeLimit": "256Mi"}


def test_inline_and_single_key_inputs_are_projected_under_their_paths(
    full_pod: dict[str, Any],
) -> None:
    sources = volume(full_pod, "inputs")["projected"]["sources"]
    field = "metadata.annotations['file.llmsandbox.io/input-0']"
    assert sources == [
        {"downwardAPI": {"items": [{"path": "paper.txt", "fieldRef": {"fieldPath": field}}]}},
        {
            "configMap": {
                "name": "tables",
                "items": [{"key": "results", "path": "tables/results.csv"}],
            }
        },
        # A path ending in '/' is a directory: the key lands inside it under its own name.
        {"configMap": {"name": "refs", "items": [{"key": "bib.txt", "path": "refs/bib.txt"}]}},
    ]
    assert full_pod["metadata"]["annotations"]["file.llmsandbox.io/input-0"] == "Abstract."


def test_task_files_too_large_for_the_pods_annotations_go_into_the_tasks_configmap() -> None:
    small = make_task(inputs=[{"path": "q.txt", "content": "x" * 1000}])
    pod, configmap = build_attempt(
        small, namespace=NAMESPACE, uid=UID, attempt=1, settings=SETTINGS
    )
    assert configmap is None
    big = make_task(inputs=[{"path": "q.txt", "content": "x" * 200_000}])
    pod, configmap = build_attempt(big, namespace=NAMESPACE, uid=UID, attempt=1, settings=SETTINGS)
    assert configmap == configmap_for(big)
    assert configmap["data"]["input-0"] == "x" * 200_000
    assert not [k for k in pod["metadata"]["annotations"] if k.startswith("file.llmsandbox.io/")]
    assert volume(pod, "task")["configMap"] == {
        "name": "aime-07-task",
        "items": [{"key": "task.json", "path": "task.json"}],
    }
    assert volume(pod, "inputs")["projected"]["sources"] == [
        {"configMap": {"name": "aime-07-task", "items": [{"key": "input-0", "path": "q.txt"}]}}
    ]
    for obj in (pod, configmap):
        assert_valid(obj)


def test_a_whole_configmap_is_mounted_at_its_directory_inside_the_inputs(
    full_pod: dict[str, Any],
) -> None:
    assert volume(full_pod, "input-1") == {"name": "input-1", "configMap": {"name": "aime-07-data"}}
    sandbox_mounts = container(full_pod, "sandbox")["volumeMounts"]
    paths = [m["mountPath"] for m in sandbox_mounts]
    assert paths.index("/workspace/input") < paths.index("/workspace/input/data")
    assert mounts(container(full_pod, "sandbox"))["/workspace/input/data"] == {
        "name": "input-1",
        "mountPath": "/workspace/input/data",
        "readOnly": True,
    }


def test_a_whole_configmap_for_the_input_directory_itself_is_projected_without_items() -> None:
    pod = pod_for(make_task(inputs=[{"path": ".", "configMapRef": {"name": "everything"}}]))
    assert volume(pod, "inputs")["projected"]["sources"] == [{"configMap": {"name": "everything"}}]
    assert "/workspace/input" in mounts(container(pod, "sandbox"))


def test_a_task_without_inputs_has_no_inputs_volume_or_mount() -> None:
    pod = pod_for(make_task())
    assert "inputs" not in [v["name"] for v in pod["spec"]["volumes"]]
    assert "/workspace/input" not in mounts(container(pod, "sandbox"))
    assert [k for k in configmap_for(make_task())["data"]] == ["task.json"]


def test_sandbox_resources_are_carried_over_and_bound_the_workspace(
    full_pod: dict[str, Any],
) -> None:
    assert container(full_pod, "sandbox")["resources"] == FULL_TASK["sandbox"]["resources"]
    assert volume(full_pod, "workspace")["emptyDir"] == {"sizeLimit": "4Gi"}
    minimal = pod_for(make_task())
    assert container(minimal, "sandbox")["resources"] == {}
    assert volume(minimal, "workspace")["emptyDir"] == {}


def test_agent_resources_come_from_the_operator_settings() -> None:
    agent = container(pod_for(make_task()), "agent")
    assert agent["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"cpu": "1", "memory": "512Mi"},
    }


def test_the_runtime_class_is_set_only_when_the_task_names_one(full_pod: dict[str, Any]) -> None:
    assert full_pod["spec"]["runtimeClassName"] == "gvisor"
    assert "runtimeClassName" not in pod_for(make_task())["spec"]


def test_the_operators_default_sandbox_image_applies_when_the_task_names_none() -> None:
    settings = SETTINGS.model_copy(update={"default_sandbox_image": "registry.local/sbx:1"})
    assert container(pod_for(make_task(), settings=settings), "sandbox")["image"] == (
        "registry.local/sbx:1"
    )
    named = make_task(sandbox={"image": "python:3.12"})
    assert container(pod_for(named, settings=settings), "sandbox")["image"] == "python:3.12"


@pytest.mark.parametrize(
    "name", [LONG_NAME, "x" * 63, "x" * 59, "a.b.c", "a" * 61 + ".b", "ab-" * 80 + "z"]
)
@pytest.mark.parametrize("attempt", [0, 7, 12345])
def test_pod_names_are_deterministic_dns_labels_even_for_long_names(
    name: str, attempt: int
) -> None:
    made = pod_name(name, attempt)
    assert made == pod_name(name, attempt)
    assert len(made) <= 63
    assert made.endswith(f"-a{attempt}")
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": made}, "spec": {"containers": []}},
        "1.33",
        strict=True,
    )
    assert "." not in made
    assert made[0].isalnum()
    assert all(ch.isalnum() or ch == "-" for ch in made)


def test_short_task_names_keep_their_readable_pod_name() -> None:
    assert pod_name("aime-07", 1) == "aime-07-a1"


def test_long_names_sharing_a_prefix_get_different_pod_and_configmap_names() -> None:
    first, second = "p" * 70 + "-one", "p" * 70 + "-two"
    assert pod_name(first, 1) != pod_name(second, 1)
    first, second = "q" * 252 + "1", "q" * 252 + "2"
    assert task_configmap_name(first) != task_configmap_name(second)


@pytest.mark.parametrize("name", [LONG_NAME, "c" * 250 + ".de", "aime-07"])
def test_configmap_names_are_valid_for_every_task_name(name: str) -> None:
    made = task_configmap_name(name)
    assert len(made) <= 253
    assert made.endswith("-task")
    assert_valid({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": made}})


def test_a_name_too_long_for_a_label_is_kept_in_the_annotation_only() -> None:
    pod = pod_for(make_task(name=LONG_NAME))
    assert "llmsandbox.io/task" not in pod["metadata"]["labels"]
    assert pod["metadata"]["annotations"]["llmsandbox.io/task-name"] == LONG_NAME
    assert pod["metadata"]["ownerReferences"][0]["name"] == LONG_NAME


def test_task_json_is_exactly_what_the_agent_entry_point_parses() -> None:
    task = make_task(
        model={"temperature": 0.7, "topP": 0.9, "toolCallFormat": "hermes"},
        limits={"maxSteps": 7},
    )
    raw = configmap_for(task)["data"]["task.json"]
    config = PodTaskConfig.model_validate_json(raw, by_alias=True, by_name=False)
    assert config.name == "aime-07"
    assert config.prompt == "Find the number."
    assert config.model.name == SETTINGS.default_model
    assert config.model.base_url == SETTINGS.default_base_url
    assert config.model.temperature == 0.7
    assert config.model.top_p == 0.9
    assert config.model.tool_call_format == "hermes"
    assert config.limits == task.spec.limits
    assert set(json.loads(raw)) == {"name", "prompt", "model", "limits"}
    assert set(json.loads(raw)["model"]) == {
        "name",
        "baseURL",
        "temperature",
        "topP",
        "maxTokensPerCall",
        "toolCallFormat",
        "requestTimeoutSeconds",
    }
    assert "apiKey" not in raw


def test_the_tasks_model_and_endpoint_win_over_the_operator_defaults() -> None:
    task = make_task(model={"name": "mine", "baseURL": "https://llm.example/v1"})
    assert resolve_model(task, SETTINGS) == ("mine", "https://llm.example/v1")
    assert resolve_model(make_task(), SETTINGS) == (
        "Qwen/Qwen3-Coder-30B-A3B-Instruct",
        "http://vllm.inference:8000/v1",
    )


BARE = OperatorSettings()


@pytest.mark.parametrize(
    ("task", "settings", "expected"),
    [
        (
            make_task(),
            BARE,
            "spec.model.name: no model given and the operator has no default "
            "(LLMSANDBOX_DEFAULT_MODEL)",
        ),
        (
            make_task(model={"name": "m"}),
            BARE,
            "spec.model.baseURL: no inference endpoint given and the operator has no default "
            "(LLMSANDBOX_DEFAULT_BASE_URL)",
        ),
        (
            make_task(model={"name": "m", "baseURL": "http://h/v1"}),
            BARE,
            "spec.model.apiKeySecretRef: no API key Secret given and the operator has no default "
            "(LLMSANDBOX_DEFAULT_API_KEY_SECRET)",
        ),
        (
            make_task(
                inputs=[
                    {"path": "a", "content": "1"},
                    {"path": "b", "content": "2"},
                    {"path": "c", "content": "3"},
                    {"path": "d", "file": "./d.txt"},
                ]
            ),
            SETTINGS,
            "spec.inputs[3].file: local files only work with sandboxctl run; "
            "use content or configMapRef",
        ),
        (
            make_task(inputs=[{"path": "..notes", "content": "x"}]),
            SETTINGS,
            "spec.inputs[0].path: '..notes' may not start with '..' on a cluster",
        ),
        (
            make_task(
                inputs=[
                    {"path": "refs/", "configMapRef": {"name": "r", "key": "bib.txt"}},
                    {"path": "refs/bib.txt", "content": "x"},
                ]
            ),
            SETTINGS,
            "spec.inputs[1].path: 'refs/bib.txt' is already where spec.inputs[0] is placed",
        ),
        (
            make_task(
                inputs=[
                    {"path": "data/", "configMapRef": {"name": "d"}},
                    {"path": "data/extra.txt", "content": "x"},
                ]
            ),
            SETTINGS,
            "spec.inputs[1].path: 'data/extra.txt' and 'data' overlap, and spec.inputs[0] mounts "
            "a whole ConfigMap there; use separate directories",
        ),
        (make_task(name=None), SETTINGS, "metadata.name: a task on a cluster needs a name"),
    ],
    ids=[
        "no-model",
        "no-base-url",
        "no-api-key",
        "local-file",
        "reserved-dotdot",
        "same-target",
        "inside-whole-configmap",
        "no-name",
    ],
)
def test_cluster_checks_name_the_field_that_is_wrong(
    task: SandboxTask, settings: OperatorSettings, expected: str
) -> None:
    with pytest.raises(SpecError) as info:
        validate_for_cluster(task, settings)
    assert str(info.value).startswith(expected)
    assert info.value.field_path == expected.split(":")[0]


def test_inline_inputs_larger_than_a_configmap_are_refused() -> None:
    big = "x" * 700_000
    task = make_task(inputs=[{"path": "a", "content": big}, {"path": "b", "content": big}])
    with pytest.raises(SpecError, match=r"^spec\.inputs: .* more than the 1 MiB a ConfigMap holds"):
        validate_for_cluster(task, SETTINGS)


def test_the_builders_refuse_a_task_that_fails_the_cluster_checks() -> None:
    task = make_task(inputs=[{"path": "d", "file": "d.txt"}])
    with pytest.raises(SpecError, match=r"spec\.inputs\[0\]\.file"):
        pod_for(task)
    with pytest.raises(SpecError, match=r"spec\.inputs\[0\]\.file"):
        configmap_for(task)
    with pytest.raises(SpecError, match=r"spec\.inputs\[0\]\.file"):
        build_attempt(task, namespace=NAMESPACE, uid=UID, attempt=1, settings=SETTINGS)


def test_an_attempts_objects_are_the_pod_and_configmap_the_builders_make() -> None:
    task = make_task(inputs=[{"path": "q.txt", "content": "six times seven " * 10_000}])
    pod, configmap = build_attempt(task, namespace=NAMESPACE, uid=UID, attempt=2, settings=SETTINGS)
    assert pod == pod_for(task, attempt=2)
    assert configmap == configmap_for(task)


def test_cost_is_priced_per_million_tokens_and_unknown_for_unpriced_models() -> None:
    settings = OperatorSettings.model_validate(
        {"token_prices": {"gpt-x": {"prompt_per_million": 2.0, "completion_per_million": 8.0}}}
    )
    assert cost_usd(settings, "gpt-x", 1_000_000, 500_000) == pytest.approx(6.0)
    assert cost_usd(settings, "other", 10, 10) is None


def test_settings_come_from_llmsandbox_variables_with_json_for_structures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMSANDBOX_MAX_RUNNING_TASKS", "3")
    monkeypatch.setenv("LLMSANDBOX_WATCHED_NAMESPACES", '["research", "ci"]')
    monkeypatch.setenv(
        "LLMSANDBOX_INFERENCE_EGRESS",
        '[{"namespace_selector": {"kubernetes.io/metadata.name": "inference"}, "ports": [8000]}]',
    )
    settings = load_settings()
    assert settings.max_running_tasks == 3
    assert settings.watched_namespaces == ["research", "ci"]
    assert settings.inference_egress[0].ports == [8000]
    assert settings.agent_image == "llm-sandbox/agent:0.1.0"


def test_bad_settings_name_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSANDBOX_MAX_RUNNING_TASKS", "-1")
    monkeypatch.setenv("LLMSANDBOX_AGENT_RESOURCES", '{"limits": {"gpu": "1"}}')
    with pytest.raises(SettingsError) as info:
        load_settings()
    lines = str(info.value).splitlines()
    assert "LLMSANDBOX_MAX_RUNNING_TASKS: Input should be greater than or equal to 0" in lines
    assert any(
        line.startswith("LLMSANDBOX_AGENT_RESOURCES.limits: unknown resource") for line in lines
    )


# -- resources the operator fills in and caps -----------------------------------------------

LIMITED = SETTINGS.model_copy(
    update={
        "sandbox_default_resources": Resources(
            requests={"cpu": "250m", "memory": "512Mi"},
            limits={"cpu": "1", "memory": "1Gi", "ephemeral-storage": "2Gi"},
        ),
        "sandbox_max_limits": {"cpu": "4", "memory": "8Gi", "ephemeral-storage": "20Gi"},
    }
)


def sandbox_of(task: SandboxTask, settings: OperatorSettings = LIMITED) -> dict[str, Any]:
    return container(pod_for(task, settings=settings), "sandbox")


def test_the_sandbox_tmp_is_bounded_by_its_disk_limit_or_the_operators_cap(
    full_pod: dict[str, Any],
) -> None:
    assert volume(full_pod, "tmp")["emptyDir"] == {"sizeLimit": "4Gi"}
    assert volume(pod_for(make_task()), "tmp")["emptyDir"] == {"sizeLimit": "1Gi"}
    small = SETTINGS.model_copy(update={"sandbox_tmp_size_limit": "128Mi"})
    assert volume(pod_for(make_task(), settings=small), "tmp")["emptyDir"] == {"sizeLimit": "128Mi"}


def test_a_task_without_resources_gets_the_operators_defaults() -> None:
    pod = pod_for(make_task(), settings=LIMITED)
    assert container(pod, "sandbox")["resources"] == {
        "requests": {"cpu": "250m", "memory": "512Mi"},
        "limits": {"cpu": "1", "memory": "1Gi", "ephemeral-storage": "2Gi"},
    }
    assert volume(pod, "workspace")["emptyDir"] == {"sizeLimit": "2Gi"}
    assert volume(pod, "tmp")["emptyDir"] == {"sizeLimit": "2Gi"}
    assert_valid(pod)


def test_the_tasks_own_values_win_resource_by_resource() -> None:
    task = make_task(sandbox={"resources": {"limits": {"memory": "4Gi"}}})
    assert sandbox_of(task)["resources"] == {
        "requests": {"cpu": "250m", "memory": "512Mi"},
        "limits": {"cpu": "1", "memory": "4Gi", "ephemeral-storage": "2Gi"},
    }


def test_a_default_request_above_the_tasks_limit_is_lowered_to_it() -> None:
    task = make_task(sandbox={"resources": {"limits": {"memory": "256Mi", "cpu": "100m"}}})
    resources = sandbox_of(task)["resources"]
    assert resources["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert_valid(pod_for(task, settings=LIMITED))


def test_without_a_default_a_missing_limit_is_the_operators_maximum() -> None:
    settings = SETTINGS.model_copy(update={"sandbox_max_limits": {"memory": "8Gi"}})
    assert sandbox_of(make_task(), settings)["resources"] == {"limits": {"memory": "8Gi"}}


@pytest.mark.parametrize(
    ("resources", "field", "message"),
    [
        (
            {"limits": {"memory": "64Gi"}},
            "spec.sandbox.resources.limits.memory",
            "64Gi is above the operator's maximum 8Gi (LLMSANDBOX_SANDBOX_MAX_LIMITS)",
        ),
        (
            {"limits": {"cpu": "4001m"}},
            "spec.sandbox.resources.limits.cpu",
            "4001m is above the operator's maximum 4",
        ),
        (
            {"limits": {"ephemeral-storage": "1Ti"}},
            "spec.sandbox.resources.limits.ephemeral-storage",
            "1Ti is above the operator's maximum 20Gi",
        ),
        (
            {"requests": {"memory": "2Gi"}},
            "spec.sandbox.resources.requests.memory",
            "2Gi is above its limit 1Gi (the operator's default or maximum)",
        ),
        (
            {"requests": {"cpu": "2"}, "limits": {"cpu": "1500m"}},
            "spec.sandbox.resources.requests.cpu",
            "2 is above its limit 1500m",
        ),
    ],
)
def test_resources_beyond_the_operators_bounds_are_refused_naming_the_field(
    resources: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(SpecError) as info:
        validate_for_cluster(make_task(sandbox={"resources": resources}), LIMITED)
    assert info.value.field_path == field
    assert str(info.value).startswith(f"{field}: {message}")


def test_a_required_runtime_class_applies_to_every_pod_and_cannot_be_changed() -> None:
    gvisor = SETTINGS.model_copy(update={"required_runtime_class": "gvisor"})
    assert pod_for(make_task(), settings=gvisor)["spec"]["runtimeClassName"] == "gvisor"
    same = make_task(sandbox={"runtimeClassName": "gvisor"})
    assert pod_for(same, settings=gvisor)["spec"]["runtimeClassName"] == "gvisor"
    with pytest.raises(SpecError) as info:
        validate_for_cluster(make_task(sandbox={"runtimeClassName": "runc"}), gvisor)
    assert str(info.value) == (
        "spec.sandbox.runtimeClassName: 'runc' is not allowed: the operator runs every sandbox "
        "under RuntimeClass 'gvisor' (LLMSANDBOX_REQUIRED_RUNTIME_CLASS)"
    )


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {
                "LLMSANDBOX_SANDBOX_DEFAULT_RESOURCES": '{"limits": {"memory": "16Gi"}}',
                "LLMSANDBOX_SANDBOX_MAX_LIMITS": '{"memory": "8Gi"}',
            },
            "LLMSANDBOX_SANDBOX_DEFAULT_RESOURCES.limits.memory: 16Gi is above "
            "LLMSANDBOX_SANDBOX_MAX_LIMITS.memory 8Gi",
        ),
        (
            {"LLMSANDBOX_SANDBOX_MAX_LIMITS": '{"gpu": "1"}'},
            "LLMSANDBOX_SANDBOX_MAX_LIMITS: unknown resource 'gpu'",
        ),
        (
            {"LLMSANDBOX_SANDBOX_MAX_LIMITS": '{"memory": "lots"}'},
            "LLMSANDBOX_SANDBOX_MAX_LIMITS.memory: String should match pattern",
        ),
        ({"LLMSANDBOX_SANDBOX_TMP_SIZE_LIMIT": "1 GB"}, "LLMSANDBOX_SANDBOX_TMP_SIZE_LIMIT:"),
        ({"LLMSANDBOX_REQUIRED_RUNTIME_CLASS": "gVisor"}, "LLMSANDBOX_REQUIRED_RUNTIME_CLASS:"),
    ],
)
def test_bad_resource_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], line: str
) -> None:
    lines = settings_refusal(monkeypatch, env)
    assert any(text.startswith(line) for text in lines), lines


# -- placement, pull secrets and the agent image's pull policy -------------------------------

PLACED = SETTINGS.model_copy(
    update={
        "agent_image_pull_policy": "Always",
        "task_scheduling": Scheduling.model_validate(
            {
                "nodeSelector": {"llmsandbox.io/pool": "sandbox"},
                "tolerations": [
                    {"key": "llmsandbox.io/sandbox", "operator": "Exists", "effect": "NoSchedule"}
                ],
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {
                                    "matchExpressions": [
                                        {
                                            "key": "kubernetes.io/arch",
                                            "operator": "In",
                                            "values": ["amd64", "arm64"],
                                        }
                                    ]
                                }
                            ]
                        }
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
            }
        ),
        "task_image_pull_secrets": [LocalObjectReference(name="regcred")],
        "allowed_image_pull_secrets": ["team-a-registry"],
        "allowed_scheduling_fields": list(SCHEDULING_FIELDS),
    }
)
EVERY_PLACEMENT: dict[str, Any] = {
    "nodeSelector": {"disk": "ssd"},
    "tolerations": [
        {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute"},
        {"operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
    ],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "cores", "operator": "Gt", "values": ["7"]}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]},
                ]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 20,
                    "preference": {"matchExpressions": [{"key": "gvisor", "operator": "Exists"}]},
                }
            ],
        },
        "podAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "labelSelector": {"matchLabels": {"app": "cache"}},
                        "namespaceSelector": {},
                        "topologyKey": "topology.kubernetes.io/zone",
                        "matchLabelKeys": ["llmsandbox.io/taskset"],
                    },
                }
            ]
        },
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {
                        "matchExpressions": [
                            {"key": "app", "operator": "In", "values": ["db", "queue"]}
                        ]
                    },
                    "namespaces": ["data"],
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        },
    },
    "priorityClassName": "llmsandbox-urgent",
    "topologySpreadConstraints": [
        {
            "maxSkew": 2,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule",
            "minDomains": 3,
            "nodeAffinityPolicy": "Honor",
            "nodeTaintsPolicy": "Ignore",
            "labelSelector": {"matchLabels": {"llmsandbox.io/taskset": "maths"}},
            "matchLabelKeys": ["llmsandbox.io/taskset-item"],
        }
    ],
}
PLACED_TASK = make_task(
    scheduling=EVERY_PLACEMENT,
    sandbox={"imagePullSecrets": [{"name": "team-a-registry"}, {"name": "regcred"}]},
)


@pytest.mark.parametrize(
    ("task", "settings"),
    [
        (PLACED_TASK, PLACED),
        (make_task(), PLACED),
        (PLACED_TASK, PLACED.model_copy(update={"task_scheduling": Scheduling()})),
    ],
    ids=["both", "the-operators-only", "the-tasks-only"],
)
def test_placed_pods_validate_against_kubernetes_1_29_to_1_33(
    task: SandboxTask, settings: OperatorSettings
) -> None:
    assert_valid(pod_for(task, settings=settings))


def test_a_pod_without_placement_settings_has_no_placement_fields() -> None:
    spec = pod_for(make_task())["spec"]
    placement = {*SCHEDULING_FIELDS, "imagePullSecrets"}
    assert not placement & set(spec)
    for name in ("agent", "install-execd"):
        assert "imagePullPolicy" not in container(pod_for(make_task()), name)


def test_the_pod_carries_the_merged_placement_and_pull_secrets() -> None:
    spec = pod_for(PLACED_TASK, settings=PLACED)["spec"]
    assert spec["nodeSelector"] == {"llmsandbox.io/pool": "sandbox", "disk": "ssd"}
    assert [t.get("key") for t in spec["tolerations"]] == ["llmsandbox.io/sandbox", "spot", None]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    arch = {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}
    assert [term["matchExpressions"][0] for term in terms["nodeSelectorTerms"]] == [arch, arch]
    assert spec["priorityClassName"] == "llmsandbox-urgent"
    assert spec["topologySpreadConstraints"] == EVERY_PLACEMENT["topologySpreadConstraints"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}, {"name": "team-a-registry"}]


def test_the_agent_image_is_pulled_by_the_operators_policy_in_both_its_containers() -> None:
    pod = pod_for(make_task(), settings=PLACED)
    for name in ("agent", "install-execd"):
        assert container(pod, name)["imagePullPolicy"] == "Always"
    # The sandbox image is the task's: the kubelet's default for its tag applies.
    assert "imagePullPolicy" not in container(pod, "sandbox")


def test_the_builders_refuse_placement_the_operator_does_not_allow() -> None:
    settings = PLACED.model_copy(update={"allowed_scheduling_fields": ["nodeSelector"]})
    with pytest.raises(SpecError, match=r"^spec\.scheduling\.tolerations: tasks may not set it"):
        pod_for(PLACED_TASK, settings=settings)
    unlisted = make_task(sandbox={"imagePullSecrets": [{"name": "other-team"}]})
    with pytest.raises(
        SpecError, match=r"^spec\.sandbox\.imagePullSecrets\[0\]\.name: 'other-team'"
    ):
        pod_for(unlisted, settings=PLACED)


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"LLMSANDBOX_TASK_SCHEDULING": '{"tolerations": [{"key": "a", "effect": "Never"}]}'},
            "LLMSANDBOX_TASK_SCHEDULING.tolerations[0].effect: Input should be 'NoSchedule', "
            "'PreferNoSchedule' or 'NoExecute'",
        ),
        (
            {"LLMSANDBOX_TASK_SCHEDULING": '{"nodeSelector": {"pool": "a b"}}'},
            "LLMSANDBOX_TASK_SCHEDULING.nodeSelector.pool: String should match pattern",
        ),
        (
            {"LLMSANDBOX_TASK_SCHEDULING": '{"nodeSelektor": {}}'},
            "LLMSANDBOX_TASK_SCHEDULING.nodeSelektor: Extra inputs are not permitted",
        ),
        (
            {"LLMSANDBOX_ALLOWED_SCHEDULING_FIELDS": '["tolerations", "schedulerName"]'},
            "LLMSANDBOX_ALLOWED_SCHEDULING_FIELDS[1]: Input should be 'nodeSelector', "
            "'tolerations', 'affinity', 'priorityClassName' or 'topologySpreadConstraints'",
        ),
        (
            {"LLMSANDBOX_TASK_IMAGE_PULL_SECRETS": '["regcred"]'},
            "LLMSANDBOX_TASK_IMAGE_PULL_SECRETS[0]: Input should be a valid dictionary",
        ),
        (
            {"LLMSANDBOX_ALLOWED_IMAGE_PULL_SECRETS": '["Team_A"]'},
            "LLMSANDBOX_ALLOWED_IMAGE_PULL_SECRETS[0]: String should match pattern",
        ),
        (
            {"LLMSANDBOX_AGENT_IMAGE_PULL_POLICY": "always"},
            "LLMSANDBOX_AGENT_IMAGE_PULL_POLICY: Input should be 'Always', 'IfNotPresent' or "
            "'Never'",
        ),
    ],
    ids=[
        "toleration-effect",
        "node-label-value",
        "unknown-field",
        "allowed-field",
        "pull-secret-shape",
        "allowed-pull-secret",
        "pull-policy",
    ],
)
def test_bad_placement_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], line: str
) -> None:
    lines = settings_refusal(monkeypatch, env)
    assert any(text.startswith(line) for text in lines), lines


def test_placement_settings_come_from_json_in_the_pod_specs_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "LLMSANDBOX_TASK_SCHEDULING",
        json.dumps({"nodeSelector": {"pool": "sandbox"}, "priorityClassName": "batch"}),
    )
    monkeypatch.setenv("LLMSANDBOX_TASK_IMAGE_PULL_SECRETS", '[{"name": "regcred"}]')
    monkeypatch.setenv("LLMSANDBOX_ALLOWED_IMAGE_PULL_SECRETS", '["team-a-registry"]')
    monkeypatch.setenv("LLMSANDBOX_ALLOWED_SCHEDULING_FIELDS", "[]")
    monkeypatch.setenv("LLMSANDBOX_AGENT_IMAGE_PULL_POLICY", "IfNotPresent")
    settings = load_settings()
    assert settings.task_scheduling.pod_fields() == {
        "nodeSelector": {"pool": "sandbox"},
        "priorityClassName": "batch",
    }
    assert [ref.name for ref in settings.task_image_pull_secrets] == ["regcred"]
    assert settings.allowed_image_pull_secrets == ["team-a-registry"]
    assert settings.allowed_scheduling_fields == []
    assert settings.agent_image_pull_policy == "IfNotPresent"
