"""NetworkPolicies for task pods: shared ones per namespace and network mode, one per allow-list task.

Policies add up, so each one grants only what its mode needs: DNS and the inference endpoint
for every mode, the public internet for `internet`, the listed entries for `allowList`.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from sandbox_agent.task import NetworkMode, SandboxTask
from sandbox_agent.wire import (
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_NETWORK,
    LABEL_TASK_UID,
    MANAGED_BY,
    MAX_NAME_LENGTH,
)

from .addresses import excluded_by_family, exclusions_inside
from .cluster_checks import allow_list
from .metadata import NETWORK_LABEL_VALUES, bounded_name, task_metadata, task_name
from .settings import EgressRule, OperatorSettings

ISOLATED_POLICY = "llmsandbox-isolated"
INTERNET_POLICY = "llmsandbox-internet"
ALLOWLIST_POLICY = "llmsandbox-allowlist"

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


def base_egress(settings: OperatorSettings, mode: NetworkMode) -> list[dict[str, Any]]:
    """What every task pod of `mode` may reach: DNS (when enabled; isolated pods may go without,
    since DNS queries can carry data out), the inference endpoint and the artifact store."""
    dns = settings.dns_egress and (mode is not NetworkMode.ISOLATED or settings.isolated_dns_egress)
    rules = [dns_rule()] if dns else []
    reachable = [*settings.inference_egress, *settings.artifacts_egress]
    return rules + [egress_rule(rule) for rule in reachable]


def internet_rule(settings: OperatorSettings) -> dict[str, Any]:
    """Every address but the excluded ranges (addresses.py and LLMSANDBOX_EXCLUDED_CIDRS)."""
    ipv4, ipv6 = excluded_by_family(settings.excluded_cidrs)
    return {
        "to": [
            {"ipBlock": {"cidr": "0.0.0.0/0", "except": ipv4}},
            {"ipBlock": {"cidr": "::/0", "except": ipv6}},
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
    isolated, internet, allow = NetworkMode.ISOLATED, NetworkMode.INTERNET, NetworkMode.ALLOW_LIST
    return [
        _shared(ISOLATED_POLICY, namespace, isolated, base_egress(settings, isolated)),
        _shared(
            INTERNET_POLICY,
            namespace,
            internet,
            [*base_egress(settings, internet), internet_rule(settings)],
        ),
        _shared(ALLOWLIST_POLICY, namespace, allow, base_egress(settings, allow)),
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
        {"to": [_ip_block(cidr, settings)], "ports": [{"protocol": "TCP", "port": port}]}
        for cidr, port in allow_list(task, settings)
    ]
    metadata = task_metadata(task, name=policy_name_for(task), namespace=namespace, uid=uid)
    egress = [*base_egress(settings, NetworkMode.ALLOW_LIST), *allowed]
    return _policy(metadata, {LABEL_TASK_UID: uid}, egress)


def _ip_block(cidr: str, settings: OperatorSettings) -> dict[str, Any]:
    """An allow-list entry; one wider than an excluded range (0.0.0.0/0:443) keeps it out."""
    inside = exclusions_inside(ipaddress.ip_network(cidr), settings.excluded_cidrs)
    block: dict[str, Any] = {"cidr": cidr}
    if inside:
        block["except"] = inside
    return {"ipBlock": block}
