"""What sandboxctl's cluster commands (crd, submit, get, wait, logs) do; their command lines are
cluster_commands.py's, which imports this module only when one of them runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from sandbox_agent.artifacts import (
    ArtifactStoreError,
    fetch_run,
    open_store,
    store_options_from,
)
from sandbox_agent.cli import Command
from sandbox_agent.display import for_terminal
from sandbox_agent.errors import TaskSpecError
from sandbox_agent.result import TERMINAL_PHASES
from sandbox_agent.task import SandboxTask
from sandbox_agent.taskfile import load_task_file
from sandbox_agent.wire import API_GROUP, API_VERSION

from .crd import crd_yaml, set_crd_yaml
from .kube import TASKS, KubeClient, KubeError
from .status import TaskStatus, parse_rfc3339

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
# Larger local files belong in a ConfigMap (spec.inputs[].configMapRef), not inline in the task.
MAX_INLINED_FILE_BYTES = 256 * 1024


def kubeconfig_problem(text: str) -> str | None:
    """Pure: what is wrong with a kubeconfig's text for connecting, or None. Checks what the
    client needs: YAML, a mapping, a current context that names a cluster and a user that exist."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        return f"not valid YAML{where}"
    if not isinstance(doc, dict):
        return "not a kubeconfig (a YAML mapping with clusters, users and contexts)"

    def named(key: str) -> dict[str, Any]:
        entries = doc.get(key) or []
        if not isinstance(entries, list):
            return {}
        return {str(e.get("name")): e for e in entries if isinstance(e, dict) and e.get("name")}

    current = doc.get("current-context")
    if not current:
        return "no current-context; pick one with kubectl config use-context"
    context = named("contexts").get(str(current))
    if context is None:
        return f"current-context {current!r} is not among its contexts"
    body = context.get("context") if isinstance(context.get("context"), dict) else {}
    cluster, user = body.get("cluster"), body.get("user")
    if not cluster or str(cluster) not in named("clusters"):
        return f"context {current!r} names cluster {cluster!r}, which is not among its clusters"
    if user and str(user) not in named("users"):
        return f"context {current!r} names user {user!r}, which is not among its users"
    return None


def _kubeconfig_paths() -> list[Path]:
    configured = os.environ.get("KUBECONFIG")
    if configured:
        return [Path(p).expanduser() for p in configured.split(os.pathsep) if p]
    return [Path("~/.kube/config").expanduser()]


def _check_kubeconfig() -> None:
    """Name what is wrong with the kubeconfig before the client library trips over it."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return  # in a pod: the service account is used
    paths = _kubeconfig_paths()
    existing = [p for p in paths if p.is_file()]
    if not existing:
        which = (
            "KUBECONFIG=" + os.environ["KUBECONFIG"]
            if "KUBECONFIG" in os.environ
            else str(paths[0])
        )
        raise TaskSpecError(
            f"no kubeconfig at {which}; set KUBECONFIG to your cluster's config file"
        )
    first = existing[0]
    try:
        text = first.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskSpecError(f"kubeconfig {first}: cannot read it ({exc})") from None
    problem = kubeconfig_problem(text)
    if problem is not None:
        raise TaskSpecError(f"kubeconfig {first}: {problem}")


def _client(args: argparse.Namespace) -> KubeClient:
    _check_kubeconfig()
    try:
        return KubeClient.from_environment()
    except KubeError as exc:
        raise TaskSpecError(f"cannot reach a cluster: {exc.message} (set KUBECONFIG)") from None
    except Exception as exc:  # the client library's own parse errors, whatever their type
        raise TaskSpecError(f"cannot load the kubeconfig: {type(exc).__name__}: {exc}") from None


def _namespace(args: argparse.Namespace, client: KubeClient) -> str:
    return str(args.namespace or client.info.default_namespace or "default")


def _with_client(
    fn: Callable[[argparse.Namespace, KubeClient], Awaitable[int]],
    prepare: Callable[[argparse.Namespace], None] | None = None,
) -> Command:
    """A cluster command: `prepare` (local checks, e.g. the task file) first, then the
    kubeconfig, then `fn` with a client. An API server that cannot be reached is one line."""

    def run(args: argparse.Namespace) -> int:
        if prepare is not None:
            prepare(args)

        async def go() -> int:
            client = _client(args)
            try:
                return await fn(args, client)
            except KubeError as exc:
                print(for_terminal(f"sandboxctl {args.command}: {exc}"), file=sys.stderr)
                return EXIT_FAILED
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
                print(
                    for_terminal(
                        f"sandboxctl {args.command}: cannot reach the API server at "
                        f"{client.server} ({reason}); check that the cluster runs and the "
                        "kubeconfig's server"
                    ),
                    file=sys.stderr,
                )
                return EXIT_USAGE
            finally:
                await client.close()

        return asyncio.run(go())

    return run


def inline_local_inputs(task: SandboxTask, task_dir: Path) -> SandboxTask:
    """`file:` inputs become inline content, so a local task file can be submitted as it is."""
    inputs = []
    for i, item in enumerate(task.spec.inputs):
        if item.file is None:
            inputs.append(item)
            continue
        source = task_dir / item.file
        where = f"spec.inputs[{i}].file"
        if not source.is_file():
            raise TaskSpecError(f"{where}: {source} is not a file (directories need a ConfigMap)")
        if source.stat().st_size > MAX_INLINED_FILE_BYTES:
            raise TaskSpecError(
                f"{where}: {source} is larger than {MAX_INLINED_FILE_BYTES} bytes; put it in a "
                "ConfigMap and use configMapRef"
            )
        try:
            content = source.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise TaskSpecError(f"{where}: {source} is not UTF-8 text; use a ConfigMap") from None
        inputs.append(item.model_copy(update={"file": None, "content": content}))
    return task.model_copy(update={"spec": task.spec.model_copy(update={"inputs": inputs})})


def task_manifest(task: SandboxTask, fallback_name: str) -> dict[str, Any]:
    body = task.model_dump(mode="json", by_alias=True, exclude_none=True)
    body.pop("status", None)
    meta = body.setdefault("metadata", {})
    for empty in ("labels", "annotations"):
        if not meta.get(empty):
            meta.pop(empty, None)
    if not meta.get("name"):
        meta["generateName"] = f"{fallback_name}-"
    return body


def _load_for_submit(args: argparse.Namespace) -> None:
    """The task file is checked before any cluster is asked (its errors name the field)."""
    path: Path = args.task
    args.loaded_task = inline_local_inputs(load_task_file(path), path.resolve().parent)


async def _submit(args: argparse.Namespace, client: KubeClient) -> int:
    path: Path = args.task
    task: SandboxTask = args.loaded_task
    namespace = _namespace(args, client)
    body = task_manifest(task, path.stem.lower().replace("_", "-"))
    body["metadata"].pop("namespace", None)
    created = await client.create(TASKS, namespace, body)
    print(f"sandboxtask/{created['metadata']['name']} created in namespace {namespace}")
    return EXIT_OK


def _age(created: str | None) -> str:
    then = parse_rfc3339(created)
    if then is None:
        return "?"
    seconds = int((datetime.now(UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def table(items: list[dict[str, Any]], all_namespaces: bool) -> str:
    headers = ["NAME", "PHASE", "STEPS", "TOKENS", "ANSWER", "REASON", "AGE"]
    if all_namespaces:
        headers.insert(0, "NAMESPACE")
    rows = [headers]
    for body in items:
        st = TaskStatus.model_validate(body.get("status") or {})
        row = [
            body["metadata"]["name"],
            str(st.phase or "Pending"),
            "" if st.steps is None else str(st.steps),
            "" if st.usage is None else str(st.usage.total_tokens),
            st.answer_short or "",
            str(st.exit_reason or ""),
            _age(body["metadata"].get("creationTimestamp")),
        ]
        if all_namespaces:
            row.insert(0, body["metadata"].get("namespace", ""))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


async def _get(args: argparse.Namespace, client: KubeClient) -> int:
    if args.name:
        body = await client.get(TASKS, _namespace(args, client), args.name)
        if body is None:
            print(f"sandboxctl get: sandboxtask {args.name!r} not found", file=sys.stderr)
            return EXIT_FAILED
        if args.output == "json":
            print(json.dumps(body, indent=2))
            return EXIT_OK
        items = [body]
    else:
        items = await client.list(TASKS, None if args.all_namespaces else _namespace(args, client))
        if args.output == "json":
            print(json.dumps({"items": items}, indent=2))
            return EXIT_OK
    print(for_terminal(table(items, args.all_namespaces)))
    return EXIT_OK


def describe(body: dict[str, Any]) -> str:
    st = TaskStatus.model_validate(body.get("status") or {})
    lines = [
        f"name:        {body['metadata']['name']}",
        f"phase:       {st.phase}",
        f"exitReason:  {st.exit_reason}",
    ]
    if st.message:
        lines.append(f"message:     {st.message}")
    lines.append(f"answer:      {st.answer if st.answer is not None else '(none)'}")
    if st.answer_truncated:
        where = "result.json in the artifact store" if st.artifacts_url else "the agent's log"
        lines.append(f"             (cut; the full answer is in {where})")
    lines.append(f"steps:       {st.steps}")
    if st.usage is not None:
        cost = f", ~${st.usage.cost_usd:.4f}" if st.usage.cost_usd is not None else ""
        lines.append(
            f"usage:       {st.usage.prompt_tokens} prompt + {st.usage.completion_tokens} "
            f"completion = {st.usage.total_tokens} tokens{cost}"
        )
    lines.append(f"pod:         {st.pod_name} (attempt {st.attempt})")
    if st.artifacts_url:
        lines.append(f"artifacts:   {st.artifacts_url}")
    if st.artifacts_error:
        lines.append(f"             not all stored: {st.artifacts_error}")
    return "\n".join(lines)


async def _named_task(
    args: argparse.Namespace, client: KubeClient, namespace: str
) -> dict[str, Any] | None:
    """The task the command names; None, with one line saying so, when it does not exist."""
    body = await client.get(TASKS, namespace, args.name)
    if body is None:
        print(
            f"sandboxctl {args.command}: sandboxtask {args.name!r} not found in {namespace}",
            file=sys.stderr,
        )
    return body


async def _wait(args: argparse.Namespace, client: KubeClient) -> int:
    namespace = _namespace(args, client)
    deadline = time.monotonic() + args.timeout
    while True:
        body = await _named_task(args, client, namespace)
        if body is None:
            return EXIT_FAILED
        phase = (body.get("status") or {}).get("phase")
        if phase in TERMINAL_PHASES:
            print(for_terminal(describe(body)))
            return EXIT_OK if phase == "Succeeded" else EXIT_FAILED
        if time.monotonic() >= deadline:
            print(
                f"sandboxctl wait: {args.name} is still {phase or 'Pending'} after {args.timeout:.0f}s",
                file=sys.stderr,
            )
            return EXIT_TIMEOUT
        await asyncio.sleep(args.interval)


async def _logs(args: argparse.Namespace, client: KubeClient) -> int:
    namespace = _namespace(args, client)
    body = await _named_task(args, client, namespace)
    if body is None:
        return EXIT_FAILED
    pod = (body.get("status") or {}).get("podName")
    if not pod:
        print(
            f"sandboxctl logs: {args.name} has no pod yet (phase {(body.get('status') or {}).get('phase', 'Pending')})",
            file=sys.stderr,
        )
        return EXIT_FAILED
    try:
        text = await client.pod_log(namespace, pod, args.container, args.tail)
    except KubeError as exc:
        status = body.get("status") or {}
        if exc.status != 404 or status.get("phase") not in TERMINAL_PHASES:
            raise
        where = status.get("artifactsURL")
        print(
            f"sandboxctl logs: {args.name} has finished and its pod {pod} is gone (the operator "
            "deletes it once the result is read; LLMSANDBOX_KEEP_FINISHED_PODS=true keeps it)"
            + (
                f"; its trajectory is at {where} (sandboxctl artifacts {args.name})"
                if where
                else ""
            ),
            file=sys.stderr,
        )
        return EXIT_FAILED
    # The sandbox container's log, and the model's words in the agent's, are untrusted.
    sys.stdout.write(for_terminal(text))
    return EXIT_OK


def _artifacts(args: argparse.Namespace) -> int:
    """`--url` needs no cluster; a task name is looked up for its status.artifactsURL."""
    if (args.url is None) == (args.name is None):
        raise TaskSpecError("give a task name, or --url URL (not both)")
    if args.url is not None:
        return asyncio.run(fetch_artifacts(args, args.url))
    return _with_client(_task_artifacts)(args)


async def _task_artifacts(args: argparse.Namespace, client: KubeClient) -> int:
    namespace = _namespace(args, client)
    body = await _named_task(args, client, namespace)
    if body is None:
        return EXIT_FAILED
    url = (body.get("status") or {}).get("artifactsURL")
    if not url:
        phase = (body.get("status") or {}).get("phase", "Pending")
        print(
            f"sandboxctl artifacts: {args.name} has no artifactsURL (phase {phase}): the "
            "operator has no store (LLMSANDBOX_ARTIFACTS_URL), or the task has not ended",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return await fetch_artifacts(args, str(url))


async def fetch_artifacts(args: argparse.Namespace, url: str) -> int:
    where = "--url" if args.url is not None else "status.artifactsURL"
    try:
        store = open_store(url, where, store_options_from(args), os.environ)
    except ArtifactStoreError as exc:
        raise TaskSpecError(str(exc)) from None
    dest = args.output_dir or Path(args.name or url.rstrip("/").rsplit("/", 1)[-1])
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise TaskSpecError(f"-o {dest}: exists and is not an empty directory; give a new one")
    try:
        got = await fetch_run(store, dest)
    except ArtifactStoreError as exc:
        print(for_terminal(f"sandboxctl artifacts: {exc}"), file=sys.stderr)
        return EXIT_FAILED
    note = " (no trajectory.json: the run's steps are joined in trajectory.jsonl)"
    print(
        for_terminal(
            f"fetched {got.files} files ({got.bytes} bytes) from {url} into {dest}"
            + (note if got.journal_only else "")
        )
    )
    return EXIT_OK


def _crd(args: argparse.Namespace) -> int:
    sys.stdout.write(set_crd_yaml() if args.kind == "SandboxTaskSet" else crd_yaml())
    return EXIT_OK


# What each cluster command runs, by name (cluster_commands.py defines their command lines).
COMMANDS: dict[str, Command] = {
    "crd": _crd,
    "submit": _with_client(_submit, prepare=_load_for_submit),
    "get": _with_client(_get),
    "wait": _with_client(_wait),
    "logs": _with_client(_logs),
    "artifacts": _artifacts,
}


__all__ = ["API_GROUP", "API_VERSION", "COMMANDS"]
