"""The network-policy canary: does this cluster enforce the NetworkPolicies task pods rely on?

Kubernetes stores NetworkPolicies whether or not the network plugin enforces them, and nothing
in the API tells. So at start (LLMSANDBOX_NETPOL_CANARY) the operator runs one tiny pod under
the `llmsandbox-isolated` policy that tries a TCP connection to an address isolated pods may not
reach: by default the Kubernetes API server the operator itself talks to, which every pod can
reach unless a policy stops it. Its exit code is the verdict: connected (0) means the policy is
not enforced, refused or timed out (3) means it is, anything else is unknown. The result is the
gauge `llmsandbox_network_policy_enforced` (1, 0, -1 for unknown) and one log line.

Pure builders and judges first; `run_canary` is the I/O.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sandbox_agent.wire import (
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_NETWORK,
    MANAGED_BY,
)

from .kube import KubeClient, KubeError
from .pod_builder import agent_image, hardened_security_context
from .policy import ISOLATED_POLICY, shared_policies
from .pull_secrets import operator_pull_secrets, pull_secret_refs
from .settings import OperatorSettings, parse_address_port

if TYPE_CHECKING:
    from .controller import Operator

log = logging.getLogger("sandbox_operator")

CANARY_CONTAINER = "canary"
CANARY_COMPONENT = "netpol-canary"
CONNECTED = 0  # the connection was made: nothing stopped it
BLOCKED = 3  # refused, unreachable or timed out
CONNECT_TIMEOUT_SECONDS = 10
# How long the operator waits for the canary pod to finish (an image pull included).
WAIT_SECONDS = 300.0
POLL_SECONDS = 1.0

# Runs in the agent image (any python3 would do): one connection attempt, judged by exit code.
CANARY_SCRIPT = f"""\
import socket, sys
from sandbox_agent.wire import LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_NAME, LABEL_NETWORK, MANAGED_BY
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout={CONNECT_TIMEOUT_SECONDS}).close()
except OSError as exc:
    print(f"blocked: {{exc}}")
    sys.exit({BLOCKED})
print("connected")
"""


class Enforcement(IntEnum):
    """The value of llmsandbox_network_policy_enforced."""

    ENFORCED = 1
    NOT_ENFORCED = 0
    UNKNOWN = -1


@dataclass(frozen=True)
class Verdict:
    enforcement: Enforcement
    detail: str


@dataclass(frozen=True)
class Target:
    host: str  # an IP address
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def api_server_target(server: str) -> tuple[str, int]:
    """The host and port of the API server URL the operator uses (the default target)."""
    parts = urlsplit(server)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "", port


def target_problem(target: Target, settings: OperatorSettings) -> str | None:
    """Why a connection to `target` would prove nothing: the isolated policy allows it."""
    address = ipaddress.ip_address(target.host)
    for i, rule in enumerate(settings.inference_egress):
        for cidr in rule.cidrs:
            network = ipaddress.ip_network(cidr)
            if address.version == network.version and address in network:
                return (
                    f"the canary target {target} is inside {cidr} of "
                    f"LLMSANDBOX_INFERENCE_EGRESS[{i}], which isolated pods may reach; set "
                    "LLMSANDBOX_NETPOL_CANARY_TARGET to an address they may not"
                )
    return None


def canary_pod(namespace: str, target: Target, settings: OperatorSettings) -> dict[str, Any]:
    """A pod under the namespace's isolated policy that tries to reach `target` once."""
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": int(WAIT_SECONDS),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 1,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65534,
            "runAsGroup": 65534,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": CANARY_CONTAINER,
                **agent_image(settings),
                "command": ["python", "-c", CANARY_SCRIPT, target.host, str(target.port)],
                "resources": {
                    "requests": {"cpu": "10m", "memory": "32Mi"},
                    "limits": {"cpu": "200m", "memory": "64Mi"},
                },
                "securityContext": hardened_security_context(read_only_root=True),
            }
        ],
    }
    if settings.required_runtime_class:
        # Under the same runtime as task pods: what it can reach, they can.
        spec["runtimeClassName"] = settings.required_runtime_class
    # On the nodes task pods run on (their network plugin may differ), pulled as they are.
    spec.update(settings.task_scheduling.pod_fields())
    pull_secrets = operator_pull_secrets(settings)
    if pull_secrets:
        spec["imagePullSecrets"] = pull_secret_refs(pull_secrets)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "llmsandbox-netpol-canary-",
            "namespace": namespace,
            "labels": {
                LABEL_NAME: "llm-sandbox",
                LABEL_COMPONENT: CANARY_COMPONENT,
                LABEL_MANAGED_BY: MANAGED_BY,
                LABEL_NETWORK: "isolated",
            },
        },
        "spec": spec,
    }


def judge(pod: dict[str, Any] | None, target: Target) -> Verdict | None:
    """The verdict from the canary pod's status; None while it has not finished."""
    if pod is None:
        return Verdict(Enforcement.UNKNOWN, "the canary pod disappeared before it finished")
    status = pod.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if cs.get("name") != CANARY_CONTAINER or not term:
            continue
        code = term.get("exitCode")
        if code == CONNECTED:
            return Verdict(
                Enforcement.NOT_ENFORCED,
                f"a pod under NetworkPolicy {ISOLATED_POLICY} connected to {target}: this "
                "cluster's network plugin does not enforce NetworkPolicy, so task pods are NOT "
                "isolated (they can reach other pods, the cloud metadata service and the internet)",
            )
        if code == BLOCKED:
            return Verdict(
                Enforcement.ENFORCED,
                f"a pod under NetworkPolicy {ISOLATED_POLICY} could not connect to {target}",
            )
        return Verdict(
            Enforcement.UNKNOWN,
            f"the canary exited with code {code} ({term.get('reason', 'no reason')}): no verdict",
        )
    if status.get("phase") in ("Succeeded", "Failed"):
        reason = status.get("reason") or status.get("message") or "no reason"
        return Verdict(Enforcement.UNKNOWN, f"the canary pod ended without running ({reason})")
    return None


async def resolve_target(settings: OperatorSettings, kube: KubeClient) -> Target:
    """The configured target, else the API server's address (resolved when it is a name)."""
    if settings.netpol_canary_target:
        return Target(*parse_address_port(settings.netpol_canary_target))
    host, port = api_server_target(kube.server)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return Target(str(ipaddress.ip_address(infos[0][4][0])), port)


async def run_canary(operator: Operator) -> Verdict:
    """Run the canary once, set the gauge and log the verdict; the pod is deleted after."""
    settings, kube = operator.settings, operator.kube
    namespace = settings.canary_namespace
    verdict = Verdict(Enforcement.UNKNOWN, "the canary did not run")
    name: str | None = None
    try:
        target = await resolve_target(settings, kube)
        problem = target_problem(target, settings)
        if problem is not None:
            verdict = Verdict(Enforcement.UNKNOWN, problem)
            return verdict
        (isolated,) = [
            p
            for p in shared_policies(namespace, settings)
            if p["metadata"]["name"] == ISOLATED_POLICY
        ]
        await operator.policies.ensure(isolated)
        created = await kube.create("pods", namespace, canary_pod(namespace, target, settings))
        name = created["metadata"]["name"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_SECONDS
        while True:
            found = judge(await kube.get("pods", namespace, name), target)
            if found is not None:
                verdict = found
                break
            if loop.time() >= deadline:
                verdict = Verdict(
                    Enforcement.UNKNOWN, f"the canary pod did not finish within {WAIT_SECONDS:.0f}s"
                )
                break
            await asyncio.sleep(POLL_SECONDS)
        return verdict
    except (KubeError, OSError, ValueError) as exc:
        verdict = Verdict(Enforcement.UNKNOWN, f"the canary could not run: {exc}")
        return verdict
    finally:
        operator.metrics.network_policy_enforced.set(verdict.enforcement.value)
        level = logging.INFO if verdict.enforcement is Enforcement.ENFORCED else logging.WARNING
        log.log(
            level,
            "network policy enforcement in namespace %s: %s: %s",
            namespace,
            verdict.enforcement.name.lower().replace("_", " "),
            verdict.detail,
        )
        if name is not None:
            try:
                await kube.delete("pods", namespace, name)
            except KubeError as exc:
                log.warning("deleting the canary pod %s/%s failed: %s", namespace, name, exc)
