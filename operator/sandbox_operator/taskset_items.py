"""Reading a set's items on a cluster: inline, from a ConfigMap key, or from an artifact-store
URL; every problem one line naming the field (or the line of the JSONL)."""

from __future__ import annotations

import os

from sandbox_agent.artifacts import ArtifactStoreError, StoreOptions, read_object
from sandbox_agent.errors import TaskSpecError
from sandbox_agent.taskset import SandboxTaskSet, SetItem, check_items, parse_items

from .kube import KubeClient, KubeError
from .taskset_decisions import Items, ItemsProblem, ItemsView, one_line
from .taskset_status import SetReason

# A set's items file from a store is read whole into memory: this much at most.
MAX_ITEMS_BYTES = 256 * 1024 * 1024


async def load_items(taskset: SandboxTaskSet, namespace: str, kube: KubeClient) -> Items:
    spec = taskset.spec
    name = taskset.metadata.name or ""
    try:
        items = spec.items if spec.items is not None else await _read_from(taskset, namespace, kube)
        check_items(spec, items)
    except TaskSpecError as exc:
        return ItemsProblem(SetReason.INVALID_SPEC, one_line(str(exc)))
    except _UnavailableError as exc:
        return ItemsProblem(SetReason.ITEMS_UNAVAILABLE, str(exc))
    return ItemsView.of(name, items, spec.samples_per_item)


class _UnavailableError(Exception):
    """itemsFrom names something that cannot be read (now)."""


async def _read_from(taskset: SandboxTaskSet, namespace: str, kube: KubeClient) -> list[SetItem]:
    source = taskset.spec.items_from
    assert source is not None
    if source.file is not None:
        raise TaskSpecError(
            "spec.itemsFrom.file: a local file is read by `sandboxctl batch` only; on a cluster "
            "use itemsFrom.configMapKeyRef or itemsFrom.url"
        )
    if source.config_map_key_ref is not None:
        ref = source.config_map_key_ref
        where = "spec.itemsFrom.configMapKeyRef"
        try:
            found = await kube.get("configmaps", namespace, ref.name)
        except KubeError as exc:
            raise _UnavailableError(
                f"{where}: reading configmap {ref.name!r}: {exc.message}"
            ) from None
        if found is None:
            raise _UnavailableError(
                f'{where}: configmap "{ref.name}" not found in namespace {namespace}'
            )
        text = (found.get("data") or {}).get(ref.key or "")
        if text is None:
            raise _UnavailableError(f'{where}: configmap "{ref.name}" has no key {ref.key!r}')
        return parse_items(text.splitlines(keepends=True), f"{where} ({ref.name}/{ref.key})")
    assert source.url is not None
    where = "spec.itemsFrom.url"
    try:
        # The operator's own credentials (its environment: AWS_*, GOOGLE_*, AZURE_*).
        data = await read_object(source.url, where, StoreOptions(), os.environ, MAX_ITEMS_BYTES)
    except ArtifactStoreError as exc:
        raise _UnavailableError(str(exc)) from None
    text = data.decode("utf-8", "replace")
    return parse_items(text.splitlines(keepends=True), f"{where} ({source.url})")
