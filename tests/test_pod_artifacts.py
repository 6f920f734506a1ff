"""The artifact store in the task pod (pure): the agent container alone gets the store's
prefix, credentials and volume; the operator's settings refuse a store it could not use."""

from __future__ import annotations

import json

import pytest

from conftest import settings_refusal
from sandbox_agent.podconfig import PodTaskConfig
from sandbox_agent.task import NetworkMode
from sandbox_operator.policy import base_egress
from sandbox_operator.settings import EgressRule
from test_pod_builder import (
    NAMESPACE,
    SETTINGS,
    assert_valid,
    configmap_for,
    container,
    make_task,
    pod_for,
)

S3 = SETTINGS.model_copy(
    update={"artifacts_url": "s3://runs/exp", "artifacts_credentials_secret": "store-creds"}
)
PVC = SETTINGS.model_copy(
    update={"artifacts_url": "file:///var/artifacts", "artifacts_pvc": "shared-runs"}
)


def test_the_agent_alone_gets_the_attempts_prefix_and_the_stores_credentials() -> None:
    pod = pod_for(make_task(artifacts={"prefix": "sweep/3"}), attempt=2, settings=S3)
    agent, sandbox = container(pod, "agent"), container(pod, "sandbox")
    command = agent["command"]
    prefix = command[command.index("--artifacts-prefix") + 1]
    assert prefix == f"{NAMESPACE}/sweep/3/aime-07/2"
    assert agent["envFrom"] == [{"secretRef": {"name": "store-creds"}}]
    assert "envFrom" not in sandbox
    assert "envFrom" not in container(pod, "install-execd")
    # Room in the agent's /tmp for the outputs it uploads.
    tmp = next(v for v in pod["spec"]["volumes"] if v["name"] == "agent-tmp")
    assert tmp["emptyDir"]["sizeLimit"] == "512Mi"
    assert_valid(pod)


def test_the_agent_config_carries_the_store_and_its_caps() -> None:
    raw = configmap_for(make_task(), settings=S3)["data"]["task.json"]
    config = PodTaskConfig.model_validate_json(raw, by_alias=True, by_name=False)
    assert config.artifacts is not None
    assert config.artifacts.url == "s3://runs/exp"
    assert config.artifacts.caps.max_files == S3.artifacts_max_files
    assert "artifacts" not in json.loads(configmap_for(make_task())["data"]["task.json"])


def test_without_a_store_the_pod_has_no_prefix_volume_or_credentials() -> None:
    pod = pod_for(make_task(artifacts={"prefix": "sweep"}))
    agent = container(pod, "agent")
    assert "--artifacts-prefix" not in agent["command"]
    assert "envFrom" not in agent
    assert all(v["name"] != "artifacts" for v in pod["spec"]["volumes"])


def test_a_file_store_is_its_claim_mounted_into_the_agent_only() -> None:
    pod = pod_for(make_task(), settings=PVC)
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "artifacts")
    assert volume == {"name": "artifacts", "persistentVolumeClaim": {"claimName": "shared-runs"}}
    assert {"name": "artifacts", "mountPath": "/var/artifacts"} in container(pod, "agent")[
        "volumeMounts"
    ]
    assert all(m["name"] != "artifacts" for m in container(pod, "sandbox")["volumeMounts"])
    assert_valid(pod)


def test_task_pods_may_reach_the_store() -> None:
    rule = EgressRule(cidrs=["10.20.0.0/16"], ports=[9000])
    settings = S3.model_copy(update={"artifacts_egress": [rule]})
    rules = base_egress(settings, NetworkMode.ISOLATED)
    assert {
        "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
        "ports": [{"protocol": "TCP", "port": 9000}],
    } in rules


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"LLMSANDBOX_ARTIFACTS_URL": "http://minio:9000/runs"},
            "LLMSANDBOX_ARTIFACTS_URL: 'http://minio:9000/runs' is not a store URL (give one "
            "of s3://, gs://, az://, file://)",
        ),
        (
            {"LLMSANDBOX_ARTIFACTS_URL": "file:///var/runs"},
            "LLMSANDBOX_ARTIFACTS_URL=file:///var/runs: a file:// store on a cluster is a volume: "
            "name its PersistentVolumeClaim in LLMSANDBOX_ARTIFACTS_PVC",
        ),
        (
            {"LLMSANDBOX_ARTIFACTS_URL": "s3://runs", "LLMSANDBOX_ARTIFACTS_PVC": "claim"},
            "LLMSANDBOX_ARTIFACTS_PVC=claim: only used with a file:// LLMSANDBOX_ARTIFACTS_URL",
        ),
    ],
)
def test_a_store_the_operator_cannot_use_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], line: str
) -> None:
    lines = settings_refusal(monkeypatch, env)
    assert any(text.startswith(line) for text in lines), lines


@pytest.mark.parametrize("prefix", ["../other-task", "..", "a/../b", "a b", "", "/sweep/7/"])
def test_a_task_sub_prefix_is_plain_names(prefix: str) -> None:
    from sandbox_agent.errors import TaskSpecError
    from sandbox_agent.task import parse_task

    doc = {
        "apiVersion": "llmsandbox.io/v1alpha1",
        "kind": "SandboxTask",
        "metadata": {"name": "t"},
        "spec": {"prompt": "p", "artifacts": {"prefix": prefix}},
    }
    with pytest.raises(TaskSpecError) as info:
        parse_task(doc)
    assert (
        "spec.artifacts.prefix: must be plain names (letters, digits, '.', '_', '-') joined by '/'"
        in str(info.value)
    )
