"""The artifact store on a cluster: the real operator on the emulated API server, real pods from
the test kubelet, and a real S3 API (moto's server). The agent container writes the store, with
credentials from a Secret only it gets; the status points to where; a store that fails costs the
task nothing but an artifactsError."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from k8s.emulator import EmulatedApiServer
from k8s.kubelet import TestKubelet
from llmserver import ScriptedLLMServer, tool_call
from s3server import S3Server, s3_server
from test_cluster_cli import sandboxctl
from test_operator import OPERATOR, TERMINAL, operator_env, pods_of, secret, task, wait_phase

__all__ = ["s3_server"]

STORE_SECRET = "store-creds"


def store_secret(s3: S3Server) -> dict[str, Any]:
    """The store's credentials and endpoint as the agent container's environment."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": STORE_SECRET, "namespace": "default"},
        "stringData": s3.env,
    }


def store_env(server: ScriptedLLMServer, url: str) -> dict[str, str]:
    return operator_env(
        server,
        LLMSANDBOX_ARTIFACTS_URL=url,
        LLMSANDBOX_ARTIFACTS_CREDENTIALS_SECRET=STORE_SECRET,
    )


def test_a_task_leaves_its_whole_answer_trajectory_and_outputs_in_the_store(
    k8s: EmulatedApiServer,
    kubelet: TestKubelet,
    run_operator: Any,
    llm_server: ScriptedLLMServer,
    s3_server: S3Server,
    tmp_path: Path,
) -> None:
    big = "a line of a long answer\n" * 200
    llm_server.script(
        # What the sandbox can see of the store's credentials: nothing.
        tool_call("execute_bash", {"command": "env; cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'"}),
        tool_call("execute_bash", {"command": "echo 42 > output/answer.txt"}),
        tool_call("submit", {"answer": big}),
    )  # fmt: skip
    bucket = s3_server.new_bucket()
    k8s.create(secret())
    k8s.create(store_secret(s3_server))
    with run_operator(OPERATOR, env=store_env(llm_server, f"s3://{bucket}/cluster")):
        k8s.create(task("t1", artifacts={"prefix": "sweep-1"}))
        st = wait_phase(k8s, "t1", TERMINAL)
    assert st["phase"] == "Succeeded", st
    assert st["answerTruncated"] is True
    assert st["artifactsURL"] == f"s3://{bucket}/cluster/default/sweep-1/t1/1"
    assert "artifactsError" not in st
    run = "cluster/default/sweep-1/t1/1/"
    stored = s3_server.objects(bucket, run)
    assert sorted(k.removeprefix(run) for k in stored) == [
        "output/answer.txt", "result.json", "trajectory.json",
    ]  # fmt: skip
    # The whole answer is in result.json, where the status has it cut.
    assert json.loads(stored[run + "result.json"])["answer"] == big.strip()
    assert stored[run + "output/answer.txt"] == b"42\n"
    assert len(json.loads(stored[run + "trajectory.json"])["steps"]) == 3
    # The Secret went to the agent container alone; the sandbox saw none of it.
    (pod,) = pods_of(k8s, "t1")
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert containers["agent"]["envFrom"] == [{"secretRef": {"name": STORE_SECRET}}]
    assert "envFrom" not in containers["sandbox"]
    seen = b"".join(r.body for r in llm_server.chat_requests)
    assert s3_server.secret_key.encode() not in seen
    assert s3_server.access_key.encode() not in seen
    assert s3_server.secret_key.encode() not in b"".join(stored.values())
    # Nor is it in either container's log.
    for which in ("agent", "sandbox"):
        logs = sandboxctl("logs", "t1", "-c", which, env=k8s.env(), cwd=tmp_path)
        assert logs.returncode == 0, logs.stderr
        assert s3_server.secret_key not in logs.stdout
    # A user fetches it all by the task's name, with this machine's credentials.
    fetched = sandboxctl(
        "artifacts", "t1", "-o", "got", env={**k8s.env(), **s3_server.env}, cwd=tmp_path
    )
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.startswith("fetched 3 files (")
    assert fetched.stdout.rstrip().endswith(
        f"from s3://{bucket}/cluster/default/sweep-1/t1/1 into got"
    )
    assert json.loads((tmp_path / "got" / "result.json").read_text())["answer"] == big.strip()
    assert (tmp_path / "got" / "output" / "answer.txt").read_text() == "42\n"


def test_a_store_that_fails_costs_the_task_nothing_but_an_artifacts_error(
    k8s: EmulatedApiServer,
    kubelet: TestKubelet,
    run_operator: Any,
    llm_server: ScriptedLLMServer,
    s3_server: S3Server,
) -> None:
    llm_server.script(tool_call("submit", {"answer": "42"}))
    k8s.create(secret())
    k8s.create(store_secret(s3_server))
    with run_operator(OPERATOR, env=store_env(llm_server, "s3://no-such-bucket-anywhere")):
        k8s.create(task("t2"))
        st = wait_phase(k8s, "t2", TERMINAL)
    assert st["phase"] == "Succeeded", st
    assert st["answer"] == "42"
    assert st["artifactsURL"] == "s3://no-such-bucket-anywhere/default/t2/1"
    assert "NoSuchBucket" in st["artifactsError"]


def test_a_file_store_on_a_claim_keeps_the_same_layout(
    k8s: EmulatedApiServer,
    kubelet: TestKubelet,
    run_operator: Any,
    llm_server: ScriptedLLMServer,
    tmp_path: Path,
) -> None:
    llm_server.script(
        tool_call("execute_bash", {"command": "echo 7 > output/answer.txt"}),
        tool_call("submit", {"answer": "7"}),
    )
    claim = tmp_path / "claim"  # the PersistentVolume the claim is bound to
    claim.mkdir(mode=0o777)
    claim.chmod(0o777)
    kubelet.claims["default", "shared-runs"] = claim
    k8s.create(secret())
    env = operator_env(
        llm_server,
        LLMSANDBOX_ARTIFACTS_URL="file:///var/artifacts",
        LLMSANDBOX_ARTIFACTS_PVC="shared-runs",
    )
    with run_operator(OPERATOR, env=env):
        k8s.create(task("t3"))
        st = wait_phase(k8s, "t3", TERMINAL)
    assert st["phase"] == "Succeeded", st
    assert st["artifactsURL"] == "file:///var/artifacts/default/t3/1"
    run = claim / "default" / "t3" / "1"
    found = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert found == ["output/answer.txt", "result.json", "trajectory.json"]
    assert json.loads((run / "result.json").read_text())["answer"] == "7"
    (pod,) = pods_of(k8s, "t3")
    sandbox = {c["name"]: c for c in pod["spec"]["containers"]}["sandbox"]
    assert all(m["name"] != "artifacts" for m in sandbox["volumeMounts"])
