"""NetworkPolicies for task pods: shared ones per namespace and network mode, one per allow-list task.

Policies add up, so each one grants only what its mode needs: DNS and the inference endpoint
for every mode, the public internet for `internet`, the listed entries for `allowList`.
"""

from __future__ import annotations

from typing import Any

from sandbox_agent.task import NetworkMode, SandboxTask

from .settings import EgressRule, OperatorSettings
from .taskconfig import (
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_NETWORK,
    LABEL_TASK_UID,
    MANAGED_BY,
    MAX_NAME_LENGTH,
    NETWORK_LABEL_VALUES,
    allow_list,
    bounded_name,
    task_metadata,
    task_name,
)

ISOLATED_POLICY = "llmsandbox-isolated"
INTERNET_POLICY = "llmsandbox-internet"
ALLOWLIST_POLICY = "llmsandbox-allowlist"

# Cluster, private, carrier-grade NAT, loopback and link-local (cloud metadata) ranges.
EXCLUDED_IPV4 = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
]
EXCLUDED_IPV6 = ["fc00::/7", "fe80::/10"]

_SHARED_NAMES = {
    NetworkMode.ISOLATED: ISOLATED_POLICY,
    NetworkMode.INTERNET: INTERNET_POLICY,
}


def dns_rule() -> dict[str, Any]:
    """Egress to the cluster DNS (kube-dns / CoreDNS pods in kube-system) on port 53."""
    return {
        "to": [
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                },
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            }
        ],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }


def egress_rule(rule: EgressRule) -> dict[str, Any]:
    """One configured destination as a NetworkPolicy egress rule (TCP ports; none means all)."""
    peers: list[dict[str, Any]] = [{"ipBlock": {"cidr": cidr}} for cidr in rule.cidrs]
    if rule.namespace_selector is not None or rule.pod_selector is not None:
        peer: dict[str, Any] = {}
        if rule.namespace_selector is not None:
            peer["namespaceSelector"] = {"matchLabels": dict(rule.namespace_selector)}
        if rule.pod_selector is not None:
            peer["podSelector"] = {"matchLabels": dict(rule.pod_selector)}
        peers.append(peer)
    out: dict[str, Any] = {"to": peers}
    if rule.ports:
        out["ports"] = [{"protocol": "TCP", "port": port} for port in rule.ports]
    return out


def base_egress(settings: OperatorSettings) -> list[dict[str, Any]]:
    """What every task pod may reach: DNS (when enabled) and the inference endpoint."""
    rules = [dns_rule()] if settings.dns_egress else []
    return rules + [egress_rule(rule) for rule in settings.inference_egress]


def internet_rule() -> dict[str, Any]:
    return {
        "to": [
            {"ipBlock": {"cidr": "0.0.0.0/0", "except": list(EXCLUDED_IPV4)}},
            {"ipBlock": {"cidr": "::/0", "except": list(EXCLUDED_IPV6)}},
        ]
    }


def _policy(
    metadata: dict[str, Any], selector: dict[str, str], egress: list[dict[str, Any]]
) -> dict[str, Any]:
    # Listing Ingress with no ingress rules denies every inbound connection.
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Ingress", "Egress"],
            "egress": egress,
        },
    }


def _shared(
    name: str, namespace: str, mode: NetworkMode, egress: list[dict[str, Any]]
) -> dict[str, Any]:
    metadata = {
        "name": name,
        "namespace": namespace,
        "labels": {LABEL_NAME: "llm-sandbox", LABEL_MANAGED_BY: MANAGED_BY},
    }
    return _policy(metadata, {LABEL_NETWORK: NETWORK_LABEL_VALUES[mode]}, egress)


def shared_policies(namespace: str, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The namespace's policies for `isolated`, `internet` and the baseline of `allowList` pods.

    The allow-list baseline keeps an allow-list pod isolated whenever its own policy is missing
    (not created yet, or deleted), instead of leaving it unrestricted.
    """
    return [
        _shared(ISOLATED_POLICY, namespace, NetworkMode.ISOLATED, base_egress(settings)),
        _shared(
            INTERNET_POLICY,
            namespace,
            NetworkMode.INTERNET,
            [*base_egress(settings), internet_rule()],
        ),
        _shared(ALLOWLIST_POLICY, namespace, NetworkMode.ALLOW_LIST, base_egress(settings)),
    ]


def policy_name_for(task: SandboxTask) -> str:
    """The policy that opens the task's egress: a shared one, or the task's own for allowList."""
    mode = task.spec.sandbox.network.mode
    if mode is NetworkMode.ALLOW_LIST:
        return bounded_name(task_name(task), "-egress", max_length=MAX_NAME_LENGTH)
    return _SHARED_NAMES[mode]


def task_policy(
    task: SandboxTask, *, namespace: str, uid: str, settings: OperatorSettings
) -> dict[str, Any] | None:
    """The allow-list task's own policy, owned by the task; None for the shared modes."""
    network = task.spec.sandbox.network
    if network.mode is not NetworkMode.ALLOW_LIST:
        return None
    allowed = [
        {"to": [{"ipBlock": {"cidr": cidr}}], "ports": [{"protocol": "TCP", "port": port}]}
        for cidr, port in allow_list(task)
    ]
    metadata = task_metadata(task, name=policy_name_for(task), namespace=namespace, uid=uid)
    return _policy(metadata, {LABEL_TASK_UID: uid}, [*base_egress(settings), *allowed])
