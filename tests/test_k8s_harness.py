"""The test harness itself: the emulated API server, the test kubelet running real processes,
and a real kopf operator against them."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import kmock
import pytest

from k8s.emulator import EmulatedApiServer, KubernetesError, json_patch, parse_label_selector
from k8s.fixtures import arun_operator, k8s, kubelet, run_operator
from k8s.kubelet import (
    DelayStart,
    Evict,
    ImagePullFailure,
    NeverStart,
    OOMKill,
    PodMatch,
    TestKubelet,
    process_group_alive,
)

__all__ = ["arun_operator", "k8s", "kubelet", "run_operator"]  # the fixtures used below

JSON = dict[str, Any]
FINISHED = ("Succeeded", "Failed")
T = TypeVar("T")


def container(name: str, code: str, **extra: Any) -> JSON:
    return {"name": name, "image": "python:3.11-slim", "command": ["python", "-c", code], **extra}


def pod(name: str, containers: list[JSON], **spec: Any) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "harness"}},
        "spec": {"restartPolicy": "Never", "containers": containers, **spec},
    }


def phase_of(api: EmulatedApiServer, name: str) -> str | None:
    obj = api.get("pods", name)
    return obj["status"].get("phase") if obj else None


def until(
    api: EmulatedApiServer,
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    message: str = "",
) -> T:
    """``api.wait_for`` for a predicate that returns None until its value is there."""
    value = api.wait_for(predicate, timeout=timeout, message=message)
    assert value is not None  # wait_for returns only a truthy value
    return value


def existing(api: EmulatedApiServer, resource: str, name: str) -> JSON:
    """An object the test knows is there."""
    obj = api.get(resource, name)
    assert obj is not None, f"{resource}/{name} does not exist"
    return obj


def wait_phase(
    api: EmulatedApiServer, name: str, phases: tuple[str, ...], timeout: float = 15
) -> JSON:
    return until(
        api,
        lambda: (
            obj if (obj := api.get("pods", name)) and obj["status"].get("phase") in phases else None
        ),
        timeout=timeout,
        message=f"pod {name} never reached {phases}: {api.get('pods', name)}",
    )


def statuses(obj: JSON) -> dict[str, JSON]:
    status = obj["status"]
    items = status.get("initContainerStatuses", []) + status.get("containerStatuses", [])
    return {s["name"]: s for s in items}


def http_get(api: EmulatedApiServer, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(api.base_url + path, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --- pods run by the kubelet ------------------------------------------------------------------


def test_init_container_fills_empty_dir_and_main_reports_termination_message(
    k8s: EmulatedApiServer, kubelet: TestKubelet
) -> None:
    writer = container(
        "fetch",
        "open('/workspace/input.txt', 'w').write('42'); print('fetched')",
        volumeMounts=[{"name": "work", "mountPath": "/workspace"}],
    )
    reader = container(
        "solve",
        "import os; data = open('/workspace/input.txt').read(); "
        "open('/dev/termination-log', 'w').write(f'answer={data} cwd={os.getcwd()}')",
        volumeMounts=[{"name": "work", "mountPath": "/workspace", "readOnly": True}],
        workingDir="/workspace",
    )
    k8s.create(
        pod("p1", [reader], initContainers=[writer], volumes=[{"name": "work", "emptyDir": {}}])
    )

    done = wait_phase(k8s, "p1", FINISHED)

    assert done["status"]["phase"] == "Succeeded"
    assert done["spec"]["nodeName"] == kubelet.node_name
    states = statuses(done)
    assert states["fetch"]["state"]["terminated"]["reason"] == "Completed"
    terminated = states["solve"]["state"]["terminated"]
    assert terminated["exitCode"] == 0
    assert terminated["message"] == "answer=42 cwd=/workspace"
    assert {"startedAt", "finishedAt"} <= set(terminated)
    conditions = {c["type"]: c["status"] for c in done["status"]["conditions"]}
    assert conditions["PodScheduled"] == "True"
    assert conditions["Initialized"] == "True"


def test_failing_init_container_fails_the_pod_and_main_never_starts(
    k8s: EmulatedApiServer, kubelet: TestKubelet
) -> None:
    k8s.create(
        pod(
            "p2",
            [container("main", "print('never')")],
            initContainers=[container("init", "raise SystemExit(3)")],
        )
    )
    done = wait_phase(k8s, "p2", FINISHED)
    assert done["status"]["phase"] == "Failed"
    states = statuses(done)
    assert states["init"]["state"]["terminated"]["exitCode"] == 3
    assert states["init"]["state"]["terminated"]["reason"] == "Error"
    assert "waiting" in states["main"]["state"]


def test_configmap_volume_and_secret_env_reach_the_container(
    k8s: EmulatedApiServer, kubelet: TestKubelet
) -> None:
    k8s.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "inputs"},
            "data": {"task.json": '{"q": 1}', "other": "x"},
        }
    )
    k8s.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "llm-key"},
            "stringData": {"apiKey": "s3cret"},
        }
    )
    code = """
import os
def read(path):
    return open(path).read()
try:
    open('/rootfs-probe', 'w')
    root = 'writable'
except OSError:
    root = 'read-only'
open('/tmp/scratch', 'w').write('ok')
parts = [read('/etc/task/spec.json'), os.environ['API_KEY'], os.environ['MODE'],
         str(sorted(os.listdir('/etc/task'))), read('/var/run/bundle/key'),
         read('/var/run/bundle/data/other'), read('/var/run/bundle/name'), root,
         str(sorted(k for k in os.environ if k not in ('PATH', 'HOSTNAME', 'PWD', 'LC_CTYPE')))]
open('/dev/termination-log', 'w').write('|'.join(parts))
"""
    main = container(
        "agent",
        code,
        env=[
            {
                "name": "API_KEY",
                "valueFrom": {"secretKeyRef": {"name": "llm-key", "key": "apiKey"}},
            },
            {"name": "MODE", "value": "key-$(API_KEY)"},
        ],
        volumeMounts=[
            {"name": "task", "mountPath": "/etc/task", "readOnly": True},
            {"name": "bundle", "mountPath": "/var/run/bundle", "readOnly": True},
        ],
        securityContext={"readOnlyRootFilesystem": True},
    )
    task_volume = {
        "name": "task",
        "configMap": {"name": "inputs", "items": [{"key": "task.json", "path": "spec.json"}]},
    }
    bundle = {
        "name": "bundle",
        "projected": {
            "sources": [
                {"secret": {"name": "llm-key", "items": [{"key": "apiKey", "path": "key"}]}},
                {
                    "configMap": {
                        "name": "inputs",
                        "items": [{"key": "other", "path": "data/other"}],
                    }
                },
                {
                    "downwardAPI": {
                        "items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]
                    }
                },
            ]
        },
    }
    k8s.create(pod("p3", [main], volumes=[task_volume, bundle]))

    done = wait_phase(k8s, "p3", FINISHED)

    assert done["status"]["phase"] == "Succeeded", done["status"]
    message = statuses(done)["agent"]["state"]["terminated"]["message"]
    assert message.split("|") == [
        '{"q": 1}',
        "s3cret",
        "key-s3cret",
        "['spec.json']",
        "s3cret",
        "x",
        "p3",
        "read-only",
        "['API_KEY', 'MODE']",
    ]


def test_missing_secret_is_create_container_config_error_until_it_exists(
    k8s: EmulatedApiServer, kubelet: TestKubelet
) -> None:
    main = container(
        "agent",
        "import os; open('/dev/termination-log','w').write(os.environ['K'])",
        env=[{"name": "K", "valueFrom": {"secretKeyRef": {"name": "late", "key": "k"}}}],
    )
    k8s.create(pod("p4", [main]))

    def waiting() -> JSON | None:
        obj = k8s.get("pods", "p4")
        state = statuses(obj).get("agent", {}).get("state", {}) if obj else {}
        return (
            state.get("waiting")
            if state.get("waiting", {}).get("reason") == ("CreateContainerConfigError")
            else None
        )

    state = until(k8s, waiting)
    assert state["message"] == 'secret "late" not found'
    assert phase_of(k8s, "p4") == "Pending"

    k8s.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "late"},
            "stringData": {"k": "now"},
        }
    )
    done = wait_phase(k8s, "p4", FINISHED)
    assert statuses(done)["agent"]["state"]["terminated"]["message"] == "now"


def test_active_deadline_fails_the_pod_and_kills_the_process(
    k8s: EmulatedApiServer, kubelet: TestKubelet
) -> None:
    k8s.create(
        pod("p5", [container("sleeper", "import time; time.sleep(60)")], activeDeadlineSeconds=1)
    )
    wait_phase(k8s, "p5", ("Running",))
    groups = kubelet.process_groups("default", "p5")
    assert process_group_alive(groups["sleeper"])

    done = wait_phase(k8s, "p5", FINISHED)

    assert done["status"]["phase"] == "Failed"
    assert done["status"]["reason"] == "DeadlineExceeded"
    assert "longer than the specified deadline" in done["status"]["message"]
    assert statuses(done)["sleeper"]["state"]["terminated"]["exitCode"] in (137, 143)
    assert not process_group_alive(groups["sleeper"])


def test_deleting_a_pod_kills_its_process_then_the_object_is_gone(
    k8s: EmulatedApiServer, kubelet: TestKubelet
) -> None:
    k8s.create(pod("p6", [container("sleeper", "import time; time.sleep(60)")]))
    wait_phase(k8s, "p6", ("Running",))
    group = kubelet.process_groups("default", "p6")["sleeper"]

    deleted = k8s.delete("pods", "p6")

    assert deleted["metadata"]["deletionTimestamp"]  # bound pods terminate gracefully
    k8s.wait_for(lambda: k8s.get("pods", "p6") is None)
    assert not process_group_alive(group)


def test_pod_log_with_tail_lines_and_container(
    k8s: EmulatedApiServer, kubelet: TestKubelet
) -> None:
    code = "import sys\nfor i in range(5): print(f'line {i}', flush=True)\nprint('oops', file=sys.stderr)"
    k8s.create(pod("p7", [container("a", code), container("b", "print('only b')")]))
    wait_phase(k8s, "p7", FINISHED)

    base = "/api/v1/namespaces/default/pods/p7/log"
    assert http_get(k8s, f"{base}?container=a&tailLines=2") == (200, b"line 4\noops\n")
    assert http_get(k8s, f"{base}?container=b") == (200, b"only b\n")
    status, body = http_get(k8s, base)  # two containers: the name is required
    assert status == 400
    assert b"a container name must be specified" in body


# --- API semantics ----------------------------------------------------------------------------


def owned_by(owner: JSON) -> list[JSON]:
    meta = owner["metadata"]
    return [
        {
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
        }
    ]


def test_owner_reference_garbage_collection_is_recursive_and_honours_orphan(
    k8s: EmulatedApiServer,
) -> None:
    def configmap(name: str, owner: JSON | None = None) -> JSON:
        meta: JSON = {"name": name, **({"ownerReferences": owned_by(owner)} if owner else {})}
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}

    task = k8s.create(
        {
            "apiVersion": "llmsandbox.io/v1alpha1",
            "kind": "SandboxTask",
            "metadata": {"name": "t"},
            "spec": {"prompt": "p"},
        }
    )
    child = k8s.create(configmap("child", task))
    k8s.create(configmap("grandchild", child))
    k8s.create(configmap("other"))
    orphaner = k8s.create(configmap("orphaner"))
    k8s.create(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "np", "ownerReferences": owned_by(orphaner)},
            "spec": {"podSelector": {}},
        }
    )

    k8s.delete("configmaps", "orphaner", propagation="Orphan")
    assert "ownerReferences" not in existing(k8s, "networkpolicies", "np")["metadata"]
    k8s.delete("sandboxtasks", "t")

    assert k8s.get("configmaps", "child") is None
    assert k8s.get("configmaps", "grandchild") is None
    assert k8s.get("configmaps", "other") is not None
    assert k8s.get("networkpolicies", "np") is not None


def test_label_and_field_selectors_and_increasing_resource_versions(k8s: EmulatedApiServer) -> None:
    versions = []
    for name, labels in (("a", {"app": "x", "tier": "1"}), ("b", {"app": "y"}), ("c", {})):
        obj = k8s.create(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}}
        )
        versions.append(int(obj["metadata"]["resourceVersion"]))
    patched = k8s.patch("configmaps", "a", {"data": {"k": "v"}})
    versions.append(int(patched["metadata"]["resourceVersion"]))
    assert versions == sorted(set(versions))

    def names(query: str) -> list[str]:
        status, body = http_get(k8s, f"/api/v1/namespaces/default/configmaps?{query}")
        assert status == 200
        listing = json.loads(body)
        assert int(listing["metadata"]["resourceVersion"]) >= versions[-1]
        return [item["metadata"]["name"] for item in listing["items"]]

    assert names("labelSelector=app%3Dx") == ["a"]
    assert names("labelSelector=app") == ["a", "b"]
    assert names("labelSelector=app,tier%3D1") == ["a"]
    assert names("labelSelector=!app") == ["c"]
    assert names("labelSelector=app%20in%20(x,y)") == ["a", "b"]
    assert names("labelSelector=app!%3Dx") == ["b", "c"]
    assert names("fieldSelector=metadata.name%3Db") == ["b"]
    assert names("limit=2") == ["a", "b"]
    assert [o["metadata"]["name"] for o in k8s.list("configmaps", label_selector={"app": "y"})] == [
        "b"
    ]
    assert parse_label_selector("a in (x, y),!b")[0].values == frozenset({"x", "y"})


def test_status_subresource_json_patch_conflicts_and_finalizers(k8s: EmulatedApiServer) -> None:
    task = k8s.create(
        {
            "apiVersion": "llmsandbox.io/v1alpha1",
            "kind": "SandboxTask",
            "metadata": {"name": "t"},
            "spec": {"prompt": "p"},
            "status": {"phase": "Ignored"},
        }
    )
    assert "status" not in task  # status is dropped on create, as by the real API server
    main = k8s.patch("sandboxtasks", "t", {"spec": {"prompt": "q"}, "status": {"phase": "X"}})
    assert "status" not in main
    assert main["metadata"]["generation"] == 2
    status = k8s.patch(
        "sandboxtasks",
        "t",
        {"spec": {"prompt": "z"}, "status": {"phase": "Y"}},
        subresource="status",
    )
    assert status["status"] == {"phase": "Y"}
    assert status["spec"]["prompt"] == "q"

    stale = [
        {
            "op": "test",
            "path": "/metadata/resourceVersion",
            "value": task["metadata"]["resourceVersion"],
        },
        {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]},
    ]
    with pytest.raises(KubernetesError) as error:
        k8s.patch("sandboxtasks", "t", stale, patch_type="application/json-patch+json")
    assert error.value.status == 422
    stale[0]["value"] = status["metadata"]["resourceVersion"]
    k8s.patch("sandboxtasks", "t", stale, patch_type="application/json-patch+json")

    terminating = k8s.delete("sandboxtasks", "t")
    assert terminating["metadata"]["deletionTimestamp"]
    k8s.patch("sandboxtasks", "t", {"metadata": {"finalizers": None}})
    assert k8s.get("sandboxtasks", "t") is None
    assert json_patch({"a": [1]}, [{"op": "add", "path": "/a/-", "value": 2}]) == {"a": [1, 2]}


def test_a_status_patch_naming_another_uid_is_refused(k8s: EmulatedApiServer) -> None:
    # A kubelet sends its pod's uid with each status patch: a pod that replaced it under the
    # same name must not get the old pod's status.
    first = k8s.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}})
    k8s.delete("pods", "p", grace_seconds=0)
    k8s.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}})
    stale = {"metadata": {"uid": first["metadata"]["uid"]}, "status": {"phase": "Running"}}
    with pytest.raises(KubernetesError) as error:
        k8s.patch("pods", "p", stale, subresource="status")
    assert error.value.status == 409
    assert "Precondition failed: UID in precondition" in str(error.value)
    assert (k8s.get("pods", "p") or {})["status"]["phase"] == "Pending"


async def test_watch_resumes_from_resource_version_and_filters_by_label(
    k8s: EmulatedApiServer,
) -> None:
    first = k8s.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "w1", "labels": {"w": "yes"}},
        }
    )
    since = first["metadata"]["resourceVersion"]
    k8s.create(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "w2", "labels": {"w": "no"}}}
    )
    k8s.patch("configmaps", "w2", {"metadata": {"labels": {"w": "yes"}}})
    k8s.delete("configmaps", "w1")
    params = {"watch": "true", "resourceVersion": since, "labelSelector": "w=yes"}
    events = []
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{k8s.base_url}/api/v1/configmaps", params=params) as response,
    ):
        async for line in response.content:
            event = json.loads(line)
            events.append((event["type"], event["object"]["metadata"]["name"]))
            if len(events) == 2:
                break
    assert events == [("ADDED", "w2"), ("DELETED", "w1")]


# --- fault injection --------------------------------------------------------------------------


def test_kmock_reactions_inject_api_errors_and_the_kubelet_retries(
    k8s: EmulatedApiServer, kubelet: TestKubelet
) -> None:
    pods = kmock.resource(group="", version="v1", plural="pods")
    assert k8s.handler is not None  # the server is started
    failing = k8s.handler["patch", pods, kmock.subresource("status")][:2] << 503
    k8s.create(pod("flaky", [container("main", "print('fine')")]))
    done = wait_phase(k8s, "flaky", FINISHED)
    assert done["status"]["phase"] == "Succeeded"
    assert len(list(failing)) == 2  # the two failed writes changed nothing and were retried


def named(name: str) -> PodMatch:
    return lambda obj: obj["metadata"]["name"] == name


def test_image_pull_failure_keeps_the_pod_pending_in_back_off(
    k8s: EmulatedApiServer, kubelet: TestKubelet
) -> None:
    kubelet.inject(named("pull"), ImagePullFailure())
    k8s.create(pod("pull", [container("main", "print(1)")]))

    def backoff() -> JSON | None:
        obj = k8s.get("pods", "pull")
        waiting = statuses(obj).get("main", {}).get("state", {}).get("waiting", {}) if obj else {}
        return waiting if waiting.get("reason") == "ImagePullBackOff" else None

    waiting = until(k8s, backoff)
    assert waiting["message"] == 'Back-off pulling image "python:3.11-slim"'
    assert phase_of(k8s, "pull") == "Pending"


def test_oom_killed_container(k8s: EmulatedApiServer, kubelet: TestKubelet) -> None:
    kubelet.inject(named("oom"), OOMKill("main", after=0.2))
    k8s.create(pod("oom", [container("main", "import time; time.sleep(60)")]))
    done = wait_phase(k8s, "oom", FINISHED)
    assert done["status"]["phase"] == "Failed"
    terminated = statuses(done)["main"]["state"]["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137)


def test_evicted_pod(k8s: EmulatedApiServer, kubelet: TestKubelet) -> None:
    kubelet.inject(named("ev"), Evict(after=0.2))
    k8s.create(pod("ev", [container("main", "import time; time.sleep(60)")]))
    done = wait_phase(k8s, "ev", FINISHED)
    assert (done["status"]["phase"], done["status"]["reason"]) == ("Failed", "Evicted")
    assert done["status"]["message"] == "The node was low on resource: memory."


def test_never_started_pod_stays_unschedulable(
    k8s: EmulatedApiServer, kubelet: TestKubelet
) -> None:
    kubelet.inject(named("stuck"), NeverStart())
    k8s.create(pod("stuck", [container("main", "print(1)")]))
    obj = until(
        k8s,
        lambda: p if (p := k8s.get("pods", "stuck")) and p["status"].get("conditions") else None,
    )
    scheduled = obj["status"]["conditions"][0]
    assert (scheduled["type"], scheduled["status"], scheduled["reason"]) == (
        "PodScheduled",
        "False",
        "Unschedulable",
    )
    time.sleep(0.3)
    assert phase_of(k8s, "stuck") == "Pending"
    assert "nodeName" not in existing(k8s, "pods", "stuck")["spec"]


def test_delayed_start_and_instant_completion(k8s: EmulatedApiServer, kubelet: TestKubelet) -> None:
    kubelet.inject(named("slow"), DelayStart(0.5))
    kubelet.instant_complete({"phase": "Succeeded", "answer": "204"}, match=named("fast"))
    started = time.monotonic()
    k8s.create(pod("slow", [container("main", "print(1)")]))
    k8s.create(
        pod(
            "fast",
            [
                container("agent", "raise SystemExit(1)"),
                container("sandbox", "raise SystemExit(1)"),
            ],
        )
    )

    fast = wait_phase(k8s, "fast", FINISHED)
    assert fast["status"]["phase"] == "Succeeded"
    message = statuses(fast)["agent"]["state"]["terminated"]["message"]
    assert json.loads(message) == {"phase": "Succeeded", "answer": "204"}
    wait_phase(k8s, "slow", ("Succeeded",))
    assert time.monotonic() - started >= 0.5


# --- a real kopf operator ---------------------------------------------------------------------


OPERATOR = '''
"""A minimal operator: a ConfigMap per SandboxTask (owned by it) and a status."""
import os

import aiohttp
import kopf

API = os.environ["K8S_EMULATOR_URL"]


@kopf.on.create("llmsandbox.io", "v1alpha1", "sandboxtasks")
async def created(body, spec, name, namespace, patch, **_):
    configmap = {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": f"{name}-prompt"}, "data": {"prompt": spec["prompt"]}}
    kopf.adopt(configmap, owner=body)
    async with aiohttp.ClientSession() as session:
        url = f"{API}/api/v1/namespaces/{namespace}/configmaps"
        async with session.post(url, json=configmap) as response:
            response.raise_for_status()
    patch.status["phase"] = "Running"
    patch.status["greeting"] = os.environ["GREETING"]


@kopf.on.delete("llmsandbox.io", "v1alpha1", "sandboxtasks")
def deleted(name, logger, **_):
    logger.info(f"cleaning up {name}")
'''


def task(name: str) -> JSON:
    return {
        "apiVersion": "llmsandbox.io/v1alpha1",
        "kind": "SandboxTask",
        "metadata": {"name": name},
        "spec": {"prompt": "What is 6 x 7?"},
    }


def test_kopf_operator_reacts_to_a_sandbox_task(
    k8s: EmulatedApiServer, run_operator: Callable[..., AbstractContextManager[Any]], tmp_path: Path
) -> None:
    module = tmp_path / "harness_operator.py"
    module.write_text(textwrap.dedent(OPERATOR))

    with run_operator(module, env={"GREETING": "hello"}, wait_watching=["sandboxtasks"]) as op:
        k8s.create(task("t1"))
        running = until(
            k8s,
            lambda: (
                t
                if (t := k8s.get("sandboxtasks", "t1"))
                and t.get("status", {}).get("phase") == "Running"
                else None
            ),
        )
        assert running["status"]["greeting"] == "hello"
        assert running["metadata"]["finalizers"]  # kopf's, for the delete handler
        owned = existing(k8s, "configmaps", "t1-prompt")
        assert owned["data"] == {"prompt": "What is 6 x 7?"}
        assert owned["metadata"]["ownerReferences"][0]["uid"] == running["metadata"]["uid"]

        k8s.delete("sandboxtasks", "t1")
        k8s.wait_for(lambda: k8s.get("sandboxtasks", "t1") is None)
        assert k8s.get("configmaps", "t1-prompt") is None  # garbage-collected
        kopf_writes = k8s.requests.writes(user_agent="kopf/")
        assert kopf_writes, "the operator's writes are in the request log"

    assert op.exit_code == 0
    assert "cleaning up t1" in op.output


async def test_kopf_operator_as_a_task_of_the_test_loop(
    k8s: EmulatedApiServer,
    arun_operator: Callable[..., AbstractAsyncContextManager[Any]],
    tmp_path: Path,
) -> None:
    module = tmp_path / "harness_operator_async.py"
    module.write_text(textwrap.dedent(OPERATOR))
    async with arun_operator(module, env={"GREETING": "from a task"}):
        await k8s.acreate(task("t2"))
        done = await k8s.await_for(
            lambda: (t := k8s.get("sandboxtasks", "t2")) and t.get("status", {}).get("greeting")
        )
        assert done == "from a task"
        await asyncio.sleep(0)


def test_kubelet_stop_leaves_no_process_behind(k8s: EmulatedApiServer) -> None:
    node = TestKubelet(k8s).start()
    try:
        k8s.create(
            pod(
                "left",
                [
                    container("a", "import time; time.sleep(60)"),
                    container(
                        "b",
                        "import subprocess, time; "
                        "subprocess.Popen(['sleep', '60']); time.sleep(60)",
                    ),
                ],
            )
        )
        wait_phase(k8s, "left", ("Running",))
        groups = node.process_groups("default", "left")
        assert all(process_group_alive(g) for g in groups.values())
    finally:
        node.stop()
    assert not any(process_group_alive(g) for g in groups.values())
