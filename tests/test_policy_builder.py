"""NetworkPolicies for task pods: which pods each one selects and where it lets them connect."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from pydantic import ValidationError

from sandbox_agent.errors import TaskSpecError
from sandbox_agent.task import SandboxTask, parse_task
from sandbox_operator.addresses import EXCLUDED_IPV4, EXCLUDED_IPV6
from sandbox_operator.cluster_checks import validate_for_cluster
from sandbox_operator.errors import SpecError
from sandbox_operator.pod_builder import build_pod
from sandbox_operator.policy import policy_name_for, shared_policies, task_policy
from sandbox_operator.settings import EgressRule, OperatorSettings, SettingsError, load_settings

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
    "allow": ["203.0.113.7:443", "192.0.2.0/25:5432", "2001:db8::5:8080"],
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
        "0.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "192.0.0.0/24",
        "168.63.129.16/32",
    }
    assert set(EXCLUDED_IPV6) == {
        "::1/128",
        "::ffff:0:0/96",
        "64:ff9b::/96",
        "64:ff9b:1::/48",
        "fc00::/7",
        "fe80::/10",
    }


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
            "to": [{"ipBlock": {"cidr": "192.0.2.0/25"}}],
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


def test_the_clusters_own_ranges_are_kept_out_of_the_internet_policy_too() -> None:
    # Pod, service and node ranges outside the private ones (public IPv4, global IPv6).
    settings = OperatorSettings(
        excluded_cidrs=["203.0.113.0/24", "2001:db8:42::/48", "10.96.0.0/12"]
    )
    internet = by_name(shared_policies(NAMESPACE, settings))["llmsandbox-internet"]
    ipv4, ipv6 = (peer["ipBlock"] for peer in internet["spec"]["egress"][-1]["to"])
    assert ipv4["except"] == [*EXCLUDED_IPV4, "203.0.113.0/24"]
    # 10.96.0.0/12 is inside 10.0.0.0/8 already.
    assert ipv6["except"] == [*EXCLUDED_IPV6, "2001:db8:42::/48"]
    kubernetes_validate.validate(internet, "1.33", strict=True)


@pytest.mark.parametrize(
    ("entry", "inside"),
    [
        ("169.254.169.254:80", "169.254.0.0/16"),
        ("168.63.129.16:80", "168.63.129.16/32"),
        ("10.96.0.1:443", "10.0.0.0/8"),
        ("127.0.0.1:8080", "127.0.0.0/8"),
        ("fd00:ec2::254:80", "fc00::/7"),
        ("::ffff:169.254.169.254:80", "::ffff:0:0/96"),
        ("64:ff9b::a9fe:a9fe:80", "64:ff9b::/96"),
        ("203.0.113.9:443", "203.0.113.0/24"),
    ],
)
def test_an_allow_list_entry_inside_an_excluded_range_is_refused_naming_it(
    entry: str, inside: str
) -> None:
    settings = SETTINGS.model_copy(update={"excluded_cidrs": ["203.0.113.0/24"]})
    task = make_task(mode="allowList", allow=["198.18.0.1:443", entry])
    with pytest.raises(SpecError) as info:
        validate_for_cluster(task, settings)
    assert info.value.field_path == "spec.sandbox.network.allow[1]"
    assert str(info.value).startswith(f"spec.sandbox.network.allow[1]: {entry} is inside {inside}")


def test_a_wide_allow_list_entry_keeps_the_excluded_ranges_out() -> None:
    policy = own_policy(make_task(mode="allowList", allow=["0.0.0.0/0:443", "100.0.0.0/8:80"]))
    assert policy is not None
    wide, narrower = policy["spec"]["egress"][-2:]
    assert wide["to"] == [{"ipBlock": {"cidr": "0.0.0.0/0", "except": EXCLUDED_IPV4}}]
    assert narrower["to"] == [{"ipBlock": {"cidr": "100.0.0.0/8", "except": ["100.64.0.0/10"]}}]
    kubernetes_validate.validate(policy, "1.33", strict=True)


def test_isolated_pods_can_go_without_dns_while_the_other_modes_keep_it() -> None:
    settings = SETTINGS.model_copy(
        update={"isolated_dns_egress": False, "default_base_url": "http://10.0.0.7:8000/v1"}
    )
    policies = by_name(shared_policies(NAMESPACE, settings))
    assert policies["llmsandbox-isolated"]["spec"]["egress"] == INFERENCE_RULES
    assert policies["llmsandbox-allowlist"]["spec"]["egress"][0] == DNS_RULE
    assert policies["llmsandbox-internet"]["spec"]["egress"][0] == DNS_RULE


def test_without_dns_an_isolated_task_must_name_its_endpoint_by_address() -> None:
    settings = OperatorSettings(
        isolated_dns_egress=False,
        default_base_url="http://10.0.0.7:8000/v1",
        default_model="m",
        default_api_key_secret="llm-key",
        allowed_base_urls=["*"],
    )
    own_key = {"apiKeySecretRef": {"name": "k", "key": "k"}}
    validate_for_cluster(make_task(), settings)
    by_name_task = parse_task(
        {
            "apiVersion": "llmsandbox.io/v1alpha1",
            "kind": "SandboxTask",
            "metadata": {"name": "t"},
            "spec": {"prompt": "p", "model": {**own_key, "baseURL": "http://vllm.inference/v1"}},
        }
    )
    with pytest.raises(
        SpecError, match=r"^spec\.model\.baseURL: vllm\.inference cannot be resolved"
    ):
        validate_for_cluster(by_name_task, settings)


def test_turning_dns_off_with_a_default_endpoint_known_by_name_stops_the_operator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMSANDBOX_ISOLATED_DNS_EGRESS", "false")
    monkeypatch.setenv("LLMSANDBOX_DEFAULT_BASE_URL", "http://vllm.inference:8000/v1")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert str(info.value).startswith(
        "LLMSANDBOX_ISOLATED_DNS_EGRESS=false with LLMSANDBOX_DEFAULT_BASE_URL="
        "http://vllm.inference:8000/v1: isolated pods get no DNS"
    )
    monkeypatch.setenv("LLMSANDBOX_EXCLUDED_CIDRS", '["10.0.0.0/8", "fd00::1/8"]')
    monkeypatch.setenv("LLMSANDBOX_DEFAULT_BASE_URL", "http://10.0.0.7:8000/v1")
    with pytest.raises(
        SettingsError, match=r"LLMSANDBOX_EXCLUDED_CIDRS\[1\]: 'fd00::1/8' is not a CIDR"
    ):
        load_settings()
