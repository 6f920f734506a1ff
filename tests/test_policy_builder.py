"""NetworkPolicies for task pods: which pods each one selects and where it lets them connect."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from pydantic import ValidationError

from sandbox_agent.errors import TaskSpecError
from sandbox_agent.task import SandboxTask, parse_task
from sandbox_operator.pod import build_pod
from sandbox_operator.policy import (
    EXCLUDED_IPV4,
    EXCLUDED_IPV6,
    policy_name_for,
    shared_policies,
    task_policy,
)
from sandbox_operator.settings import EgressRule, OperatorSettings

KUBERNETES_VERSIONS = ["1.29", "1.30", "1.31", "1.32", "1.33"]
UID = "0b7c2f4e-8d1a-4e3b-a5c6-d7e8f9a0b1c2"
NAMESPACE = "research"
INFERENCE = EgressRule(
    namespace_selector={"kubernetes.io/metadata.name": "inference"},
    pod_selector={"app": "vllm"},
    ports=[8000],
)
SETTINGS = OperatorSettings(
    default_model="m",
    default_base_url="http://vllm.inference:8000/v1",
    default_api_key_secret="llm-key",
    inference_egress=[INFERENCE, EgressRule(cidrs=["198.51.100.0/24"], ports=[443])],
)
DNS_RULE = {
    "to": [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ],
    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
}
INFERENCE_RULES = [
    {
        "to": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "inference"}},
                "podSelector": {"matchLabels": {"app": "vllm"}},
            }
        ],
        "ports": [{"protocol": "TCP", "port": 8000}],
    },
    {"to": [{"ipBlock": {"cidr": "198.51.100.0/24"}}], "ports": [{"protocol": "TCP", "port": 443}]},
]
ALLOW_LIST: dict[str, Any] = {
    "mode": "allowList",
    "allow": ["203.0.113.7:443", "10.20.0.0/16:5432", "2001:db8::5:8080"],
}


def make_task(name: str = "aime-07", **network: Any) -> SandboxTask:
    spec: dict[str, Any] = {"prompt": "p"}
    if network:
        spec["sandbox"] = {"network": network}
    return parse_task(
        {
            "apiVersion": "llmsandbox.io/v1alpha1",
            "kind": "SandboxTask",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def by_name(policies: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in policies}


def selects(policy: dict[str, Any], pod: dict[str, Any]) -> bool:
    wanted: dict[str, str] = policy["spec"]["podSelector"]["matchLabels"]
    labels: dict[str, str] = pod["metadata"]["labels"]
    same_namespace: bool = policy["metadata"]["namespace"] == pod["metadata"]["namespace"]
    return same_namespace and wanted.items() <= labels.items()


def pod_for(task: SandboxTask) -> dict[str, Any]:
    return build_pod(task, namespace=NAMESPACE, uid=UID, attempt=1, settings=SETTINGS)


def own_policy(task: SandboxTask, settings: OperatorSettings = SETTINGS) -> dict[str, Any] | None:
    return task_policy(task, namespace=NAMESPACE, uid=UID, settings=settings)


def test_every_policy_validates_against_kubernetes_1_29_to_1_33() -> None:
    policies = [*shared_policies(NAMESPACE, SETTINGS), own_policy(make_task(**ALLOW_LIST))]
    policies += shared_policies(NAMESPACE, OperatorSettings(dns_egress=False))
    for policy in policies:
        assert policy is not None
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(policy, version, strict=True)


def test_shared_policies_are_named_labelled_and_select_by_network_mode() -> None:
    policies = by_name(shared_policies(NAMESPACE, SETTINGS))
    assert sorted(policies) == [
        "llmsandbox-allowlist",
        "llmsandbox-internet",
        "llmsandbox-isolated",
    ]
    for name, policy in policies.items():
        assert policy["metadata"]["namespace"] == NAMESPACE
        assert (
            policy["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "llm-sandbox-operator"
        )
        assert "ownerReferences" not in policy["metadata"]
        mode = name.removeprefix("llmsandbox-")
        assert policy["spec"]["podSelector"] == {"matchLabels": {"llmsandbox.io/network": mode}}


@pytest.mark.parametrize(
    ("network", "expected"),
    [
        ({}, {"llmsandbox-isolated"}),
        ({"mode": "internet"}, {"llmsandbox-internet"}),
        (ALLOW_LIST, {"llmsandbox-allowlist", "aime-07-egress"}),
    ],
)
def test_each_pod_is_selected_by_exactly_the_policies_of_its_mode(
    network: dict[str, Any], expected: set[str]
) -> None:
    task = make_task(**network)
    pod = pod_for(task)
    policies = shared_policies(NAMESPACE, SETTINGS)
    own = own_policy(task)
    if own is not None:
        policies.append(own)
    assert {p["metadata"]["name"] for p in policies if selects(p, pod)} == expected
    assert policy_name_for(task) in expected


def test_every_policy_denies_all_ingress() -> None:
    for policy in [*shared_policies(NAMESPACE, SETTINGS), own_policy(make_task(**ALLOW_LIST))]:
        assert policy is not None
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        assert "ingress" not in policy["spec"]


def test_isolated_pods_reach_only_dns_and_the_inference_endpoint() -> None:
    isolated = by_name(shared_policies(NAMESPACE, SETTINGS))["llmsandbox-isolated"]
    assert isolated["spec"]["egress"] == [DNS_RULE, *INFERENCE_RULES]


def test_allow_list_pods_without_their_own_policy_stay_isolated() -> None:
    baseline = by_name(shared_policies(NAMESPACE, SETTINGS))["llmsandbox-allowlist"]
    assert baseline["spec"]["egress"] == [DNS_RULE, *INFERENCE_RULES]


def test_dns_egress_can_be_turned_off() -> None:
    settings = OperatorSettings(dns_egress=False)
    isolated = by_name(shared_policies(NAMESPACE, settings))["llmsandbox-isolated"]
    assert isolated["spec"]["egress"] == []


def test_internet_pods_reach_public_addresses_but_not_cluster_private_or_link_local() -> None:
    internet = by_name(shared_policies(NAMESPACE, SETTINGS))["llmsandbox-internet"]
    *base, public = internet["spec"]["egress"]
    assert base == [DNS_RULE, *INFERENCE_RULES]
    assert "ports" not in public
    assert public["to"] == [
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": EXCLUDED_IPV4}},
        {"ipBlock": {"cidr": "::/0", "except": EXCLUDED_IPV6}},
    ]
    assert set(EXCLUDED_IPV4) == {
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "100.64.0.0/10",
        "127.0.0.0/8",
    }
    assert set(EXCLUDED_IPV6) == {"fc00::/7", "fe80::/10"}


def test_an_allow_list_task_gets_its_own_policy_for_exactly_its_entries() -> None:
    task = make_task(**ALLOW_LIST)
    policy = own_policy(task)
    assert policy is not None
    assert policy["metadata"]["name"] == "aime-07-egress" == policy_name_for(task)
    assert policy["spec"]["podSelector"] == {"matchLabels": {"llmsandbox.io/task-uid": UID}}
    assert policy["spec"]["egress"] == [
        DNS_RULE,
        *INFERENCE_RULES,
        {
            "to": [{"ipBlock": {"cidr": "203.0.113.7/32"}}],
            "ports": [{"protocol": "TCP", "port": 443}],
        },
        {
            "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
            "ports": [{"protocol": "TCP", "port": 5432}],
        },
        {
            "to": [{"ipBlock": {"cidr": "2001:db8::5/128"}}],
            "ports": [{"protocol": "TCP", "port": 8080}],
        },
    ]


def test_the_allow_list_policy_is_owned_by_and_labelled_for_its_task() -> None:
    policy = own_policy(make_task(**ALLOW_LIST))
    assert policy is not None
    assert policy["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "llmsandbox.io/v1alpha1",
            "kind": "SandboxTask",
            "name": "aime-07",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert policy["metadata"]["labels"]["llmsandbox.io/task-uid"] == UID
    assert policy["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "llm-sandbox-operator"


@pytest.mark.parametrize("network", [{}, {"mode": "isolated"}, {"mode": "internet"}])
def test_shared_modes_need_no_policy_of_their_own(network: dict[str, Any]) -> None:
    assert own_policy(make_task(**network)) is None


def test_long_task_names_give_valid_distinct_policy_names() -> None:
    first = make_task(name="n" * 252 + "1", **ALLOW_LIST)
    second = make_task(name="n" * 252 + "2", **ALLOW_LIST)
    names = {policy_name_for(first), policy_name_for(second)}
    assert len(names) == 2
    for task in (first, second):
        policy = own_policy(task)
        assert policy is not None
        assert len(policy["metadata"]["name"]) <= 253
        assert policy["metadata"]["name"].endswith("-egress")
        kubernetes_validate.validate(policy, "1.33", strict=True)


def test_a_bad_allow_entry_is_refused_by_the_model_naming_its_index() -> None:
    with pytest.raises(TaskSpecError, match=r"spec\.sandbox\.network\.allow\[1\]: .*host bits set"):
        make_task(mode="allowList", allow=["10.0.0.5:443", "10.0.0.5/8:443"])


def test_an_egress_rule_without_a_destination_is_refused() -> None:
    with pytest.raises(ValidationError, match="would allow every address"):
        EgressRule(ports=[8000])


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"cidrs": ["10.0.0.1/8"]}, "host bits set"),
        ({"cidrs": ["vllm.inference"]}, "is not a CIDR"),
        ({"cidrs": ["10.0.0.0/8"], "ports": [0]}, "greater than or equal to 1"),
        ({"pod_selector": {"app": "bad value"}}, "not a valid label selector"),
        ({"cidrs": ["10.0.0.0/8"], "protocol": "UDP"}, "Extra inputs are not permitted"),
    ],
)
def test_egress_rule_errors_say_what_is_wrong(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        EgressRule.model_validate(rule)


def test_a_rule_without_ports_allows_every_port_of_its_destination() -> None:
    settings = OperatorSettings(inference_egress=[EgressRule(cidrs=["10.1.2.3/32"])])
    isolated = by_name(shared_policies(NAMESPACE, settings))["llmsandbox-isolated"]
    assert isolated["spec"]["egress"][-1] == {"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}]}
