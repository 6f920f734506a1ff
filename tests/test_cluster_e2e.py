"""End to end on a real cluster (e.g. kind): the CRD, the operator, one example task.

Runs only where KUBECONFIG reaches a cluster and LLMSANDBOX_E2E_BASE_URL names an inference
endpoint the cluster's pods can reach (plus LLMSANDBOX_E2E_MODEL and, optionally,
LLMSANDBOX_E2E_API_KEY); the agent and sandbox images must be loadable by the cluster
(`kind load docker-image ...`). Skipped everywhere else, including CI here.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sandbox_operator.kube import KubeClient, KubeError

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).parent.parent
NAMESPACE = os.environ.get("LLMSANDBOX_E2E_NAMESPACE", "default")


def cluster_reachable() -> bool:
    async def probe() -> bool:
        try:
            client = KubeClient.from_environment()
        except KubeError:
            return False
        try:
            await asyncio.wait_for(client.list("namespaces", None), timeout=5)
            return True
        except Exception:
            return False
        finally:
            await client.close()

    return asyncio.run(probe())


needs_cluster = pytest.mark.skipif(
    not os.environ.get("LLMSANDBOX_E2E_BASE_URL") or not cluster_reachable(),
    reason="no reachable cluster, or LLMSANDBOX_E2E_BASE_URL unset",
)


def kubectl(
    *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", *args], input=stdin, capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip


@needs_cluster
def test_an_example_task_succeeds_on_a_real_cluster(tmp_path: Path) -> None:
    for crd in ("crd.yaml", "crd-taskset.yaml"):
        assert kubectl("apply", "-f", str(ROOT / "manifests" / crd)).returncode == 0
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "llm-e2e-key",
            "namespace": NAMESPACE,
            "labels": {"llmsandbox.io/api-key": "true"},
        },
        "stringData": {"apiKey": os.environ.get("LLMSANDBOX_E2E_API_KEY", "EMPTY")},
    }
    assert kubectl("apply", "-f", "-", stdin=yaml.safe_dump(secret)).returncode == 0
    env = {
        **os.environ,
        "LLMSANDBOX_DEFAULT_BASE_URL": os.environ["LLMSANDBOX_E2E_BASE_URL"],
        "LLMSANDBOX_DEFAULT_MODEL": os.environ.get("LLMSANDBOX_E2E_MODEL", "default"),
        "LLMSANDBOX_DEFAULT_API_KEY_SECRET": "llm-e2e-key",
        "LLMSANDBOX_WATCHED_NAMESPACES": f'["{NAMESPACE}"]',
        "LLMSANDBOX_METRICS_PORT": "0",
    }
    operator = subprocess.Popen([sys.executable, "-m", "sandbox_operator"], env=env)
    try:
        kubectl("delete", "sandboxtask", "maths-by-code", "-n", NAMESPACE, "--ignore-not-found")
        submit = subprocess.run(
            [sys.executable, "-m", "sandbox_agent.cli", "submit", str(ROOT / "examples" / "maths-by-code.yaml"), "-n", NAMESPACE],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stderr
        deadline = time.monotonic() + 900
        wait = subprocess.run(
            [sys.executable, "-m", "sandbox_agent.cli", "wait", "maths-by-code", "-n", NAMESPACE, "--timeout", str(int(deadline - time.monotonic()))],
            capture_output=True, text=True, timeout=960, check=False,
        )  # fmt: skip
        assert wait.returncode == 0, wait.stdout + wait.stderr
        # The example set: its six tasks created as earlier ones finish, then Succeeded.
        kubectl("delete", "sandboxtaskset", "maths-mini", "-n", NAMESPACE, "--ignore-not-found")
        example = str(ROOT / "examples" / "taskset-maths.yaml")
        assert kubectl("apply", "-n", NAMESPACE, "-f", example).returncode == 0
        left = max(60, int(deadline - time.monotonic()))
        done = kubectl(
            "wait", "sandboxtaskset/maths-mini", "-n", NAMESPACE, f"--timeout={left}s",
            "--for=jsonpath={.status.phase}=Succeeded", timeout=left + 60,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        status = json.loads(
            kubectl("get", "stset", "maths-mini", "-n", NAMESPACE, "-o", "json").stdout
        )["status"]
        assert status["finished"] == 6
    finally:
        operator.terminate()
        operator.wait(timeout=30)
