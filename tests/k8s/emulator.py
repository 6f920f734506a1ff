"""An emulated Kubernetes API server for tests.

kmock's ``KubernetesEmulator`` serves discovery, the request DSL (``api.handler[...] << 500`` for
fault injection) and the request record; this module replaces its object semantics with the ones
a controller relies on: a global, increasing ``resourceVersion``; watches that resume from a
resourceVersion (410 Gone when too old) and that filter by namespace, label and field selectors;
list selectors and pagination; status-subresource rules; merge and JSON patches; finalizers and
graceful pod deletion; owner-reference garbage collection;
``pods/log``, ``pods/binding`` and ``pods/eviction``; CRDs that register their resource.

The server runs in a background thread with its own event loop (:class:`EmulatedApiServer`), so
it keeps serving while a test thread blocks, while ``kopf.testing.KopfRunner`` runs the operator
in another thread, or while an operator runs as a task in the test's own loop. The store is
thread-safe: the sync and async helpers call it directly (no HTTP, not in the request log).
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import collections
import contextlib
import contextvars
import copy
import datetime
import inspect
import json
import re
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import dsl, rendering
from kmock._internal.filtering import FnCriteria

JSON = dict[str, Any]
ResKey = tuple[str, str, str]  # (group, version, plural)
ObjKey = tuple[ResKey, str, str]  # (resource, namespace or "", name)
T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CRD_PATH = REPO_ROOT / "manifests" / "crd.yaml"
# Seeded too, with the default CRD: the operator watches SandboxTaskSets as well.
TASKSET_CRD_PATH = REPO_ROOT / "manifests" / "crd-taskset.yaml"
ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

__all__ = [
    "DEFAULT_CRD_PATH",
    "MINIMAL_CRD",
    "ApiRequest",
    "EmulatedApiServer",
    "EmulatorHandler",
    "KubernetesError",
    "LogProvider",
    "ObjectStore",
    "RequestLog",
    "ResourceDef",
    "current_request",
    "json_patch",
    "merge_patch",
    "parse_field_selector",
    "parse_label_selector",
]

KubernetesError = kmock.KubernetesError


def api_error(code: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    """A Kubernetes ``Status`` failure, rendered by kmock as the response body."""
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details)


def now_rfc3339(offset_seconds: float = 0.0) -> str:
    moment = datetime.datetime.now(tz=datetime.UTC) + datetime.timedelta(seconds=offset_seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# Resources


@dataclass(frozen=True)
class ResourceDef:
    """One served resource: what discovery shows and how the store treats it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: frozenset[str] = frozenset()

    @property
    def key(self) -> ResKey:
        return (self.group, self.version, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    def __str__(self) -> str:
        return f"{self.plural}.{self.version}.{self.group}" if self.group else f"{self.plural}"

    def url(self, namespace: str | None = None, name: str | None = None, sub: str = "") -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
            if sub:
                base += f"/{sub}"
        return base


BUILTIN_RESOURCES: tuple[ResourceDef, ...] = (
    ResourceDef(
        "",
        "v1",
        "namespaces",
        "Namespace",
        False,
        "namespace",
        ("ns",),
        subresources=frozenset({"status", "finalize"}),
    ),
    ResourceDef(
        "",
        "v1",
        "pods",
        "Pod",
        True,
        "pod",
        ("po",),
        ("all",),
        frozenset({"status", "log", "binding", "eviction"}),
    ),
    ResourceDef("", "v1", "configmaps", "ConfigMap", True, "configmap", ("cm",)),
    ResourceDef("", "v1", "secrets", "Secret", True, "secret"),
    ResourceDef("", "v1", "events", "Event", True, "event", ("ev",)),
    ResourceDef("", "v1", "serviceaccounts", "ServiceAccount", True, "serviceaccount", ("sa",)),
    ResourceDef(
        "",
        "v1",
        "services",
        "Service",
        True,
        "service",
        ("svc",),
        subresources=frozenset({"status"}),
    ),
    ResourceDef(
        "networking.k8s.io",
        "v1",
        "networkpolicies",
        "NetworkPolicy",
        True,
        "networkpolicy",
        ("netpol",),
    ),
    ResourceDef("events.k8s.io", "v1", "events", "Event", True, "event", ("ev",)),
    ResourceDef("coordination.k8s.io", "v1", "leases", "Lease", True, "lease"),
    ResourceDef(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        "customresourcedefinition",
        ("crd", "crds"),
        subresources=frozenset({"status"}),
    ),
)

MINIMAL_CRD: JSON = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "sandboxtasks.llmsandbox.io"},
    "spec": {
        "group": "llmsandbox.io",
        "names": {
            "kind": "SandboxTask",
            "listKind": "SandboxTaskList",
            "plural": "sandboxtasks",
            "singular": "sandboxtask",
            "shortNames": ["stask"],
        },
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}


def resources_of_crd(crd: Mapping[str, Any]) -> list[ResourceDef]:
    spec = crd.get("spec", {})
    names = spec.get("names", {})
    result = []
    for version in spec.get("versions", []):
        if not version.get("served", True):
            continue
        subresources = frozenset(version.get("subresources", {}) or {})
        result.append(
            ResourceDef(
                group=spec["group"],
                version=version["name"],
                plural=names["plural"],
                kind=names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                singular=names.get("singular", names["kind"].lower()),
                short_names=tuple(names.get("shortNames", [])),
                categories=tuple(names.get("categories", [])),
                subresources=subresources,
            )
        )
    return result


# --------------------------------------------------------------------------------------------
# Selectors


@dataclass(frozen=True)
class LabelRequirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        # "!=" and "notin" match objects without the label too, as in Kubernetes.
        return not present or value not in self.values


_LABEL_TERM = re.compile(
    r"^\s*(?:(?P<not>!)\s*(?P<nkey>[^\s=!(),]+)"
    r"|(?P<key>[^\s=!(),]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[^\s=!(),]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<set>[^)]*)\))?)\s*$"
)


def _split_selector(selector: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [term for term in terms if term.strip()]


def parse_label_selector(selector: str | Mapping[str, str] | None) -> list[LabelRequirement]:
    """Parse ``a=b,c!=d,e,!f,g in (x,y),h notin (z)``; a dict means equality on each key."""
    if not selector:
        return []
    if isinstance(selector, Mapping):
        return [LabelRequirement(k, "=", frozenset({v})) for k, v in selector.items()]
    requirements = []
    for term in _split_selector(selector):
        match = _LABEL_TERM.match(term)
        if match is None:
            raise api_error(400, "BadRequest", f"unable to parse requirement: {term!r}")
        if match["not"]:
            requirements.append(LabelRequirement(match["nkey"], "!"))
        elif match["op"]:
            op = "!=" if match["op"] == "!=" else "="
            requirements.append(LabelRequirement(match["key"], op, frozenset({match["value"]})))
        elif match["setop"]:
            values = frozenset(v.strip() for v in match["set"].split(",") if v.strip())
            requirements.append(LabelRequirement(match["key"], match["setop"], values))
        else:
            requirements.append(LabelRequirement(match["key"], "exists"))
    return requirements


def labels_match(requirements: Iterable[LabelRequirement], obj: Mapping[str, Any]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(req.matches(labels) for req in requirements)


@dataclass(frozen=True)
class FieldRequirement:
    path: str
    negate: bool
    value: str

    def matches(self, obj: Mapping[str, Any]) -> bool:
        current: Any = obj
        for part in self.path.split("."):
            current = current.get(part) if isinstance(current, Mapping) else None
        actual = "" if current is None else str(current)
        if isinstance(current, bool):
            actual = str(current).lower()
        return (actual != self.value) if self.negate else (actual == self.value)


def parse_field_selector(selector: str | Mapping[str, str] | None) -> list[FieldRequirement]:
    """Parse ``metadata.name=x,status.phase!=Running`` (any dotted path of the object)."""
    if not selector:
        return []
    if isinstance(selector, Mapping):
        return [FieldRequirement(k, False, v) for k, v in selector.items()]
    requirements = []
    for term in _split_selector(selector):
        match = re.match(r"^\s*([\w.\-/]+)\s*(==|=|!=)\s*(.*?)\s*$", term)
        if match is None:
            raise api_error(400, "BadRequest", f"invalid field selector: {term!r}")
        requirements.append(FieldRequirement(match[1], match[2] == "!=", match[3]))
    return requirements


# --------------------------------------------------------------------------------------------
# Patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge recursively, ``None`` deletes, lists replace."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = copy.deepcopy(dict(target)) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def merge_pod_conditions(old: Any, patch: Mapping[str, Any]) -> Mapping[str, Any]:
    """A pod status patch whose `status.conditions` is merged into the pod's by type, as the
    strategic merge patch a real kubelet sends is (conditions' patchMergeKey is `type`): a
    condition another writer set (Kueue's TerminationTarget) survives the kubelet's writes."""
    status = patch.get("status")
    if not isinstance(status, Mapping) or not isinstance(status.get("conditions"), list):
        return patch
    conditions = status["conditions"]
    have = ((old.get("status") or {}) if isinstance(old, Mapping) else {}).get("conditions") or []
    merged = {c.get("type"): c for c in have if isinstance(c, Mapping)}
    for cond in conditions:
        if isinstance(cond, Mapping):
            merged[cond.get("type")] = cond
    return {**patch, "status": {**status, "conditions": list(merged.values())}}


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise api_error(422, "Invalid", f"invalid JSON pointer: {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _container(doc: Any, parts: list[str]) -> Any:
    current = doc
    for part in parts:
        if isinstance(current, list):
            try:
                current = current[int(part)]
            except (ValueError, IndexError):
                raise api_error(422, "Invalid", f"path not found: /{'/'.join(parts)}") from None
        elif isinstance(current, dict) and part in current:
            current = current[part]
        else:
            raise api_error(422, "Invalid", f"path not found: /{'/'.join(parts)}")
    return current


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test); failures are HTTP 422."""
    if not isinstance(operations, list):
        raise api_error(400, "BadRequest", "a JSON patch must be a list of operations")
    result = copy.deepcopy(doc)

    def get(path: str) -> Any:
        return copy.deepcopy(_container(result, _pointer(path)))

    def remove(path: str) -> Any:
        parts = _pointer(path)
        parent = _container(result, parts[:-1])
        try:
            return parent.pop(int(parts[-1]) if isinstance(parent, list) else parts[-1])
        except (KeyError, IndexError, ValueError):
            raise api_error(422, "Invalid", f"unable to remove nonexistent key: {path}") from None

    def add(path: str, value: Any, replace: bool = False) -> None:
        nonlocal result
        parts = _pointer(path)
        if not parts:
            result = value
            return
        parent = _container(result, parts[:-1])
        last = parts[-1]
        if isinstance(parent, list):
            if last == "-":
                parent.append(value)
                return
            try:
                index = int(last)
            except ValueError:
                raise api_error(422, "Invalid", f"bad list index in {path}") from None
            if replace:
                if not 0 <= index < len(parent):
                    raise api_error(422, "Invalid", f"index out of range: {path}")
                parent[index] = value
            else:
                if not 0 <= index <= len(parent):
                    raise api_error(422, "Invalid", f"index out of range: {path}")
                parent.insert(index, value)
        elif isinstance(parent, dict):
            if replace and last not in parent:
                raise api_error(422, "Invalid", f"replace of a missing key: {path}")
            parent[last] = value
        else:
            raise api_error(422, "Invalid", f"path not found: {path}")

    for op in operations:
        kind, path = op.get("op"), op.get("path", "")
        if kind == "test":
            try:
                actual = get(path)
            except kmock.KubernetesError:
                actual = None
            if actual != op.get("value"):
                raise api_error(
                    422, "Invalid", f"the server rejected our request: test failed at {path}"
                )
        elif kind == "add":
            add(path, copy.deepcopy(op.get("value")))
        elif kind == "replace":
            add(path, copy.deepcopy(op.get("value")), replace=True)
        elif kind == "remove":
            remove(path)
        elif kind == "move":
            add(path, remove(op["from"]))
        elif kind == "copy":
            add(path, get(op["from"]))
        else:
            raise api_error(400, "BadRequest", f"unknown JSON patch operation: {kind!r}")
    return result


# --------------------------------------------------------------------------------------------
# The store


@dataclass
class _Event:
    rv: int
    res: ResKey
    type: str
    obj: JSON
    old: JSON | None


@dataclass(eq=False)
class Watcher:
    """A live watch: filters events and hands them to ``deliver`` (a thread-safe callable)."""

    res: ResKey
    namespace: str | None
    labels: list[LabelRequirement]
    fields: list[FieldRequirement]
    deliver: Callable[[JSON | None], None]

    def _matches(self, obj: JSON | None) -> bool:
        if obj is None:
            return False
        namespace = obj.get("metadata", {}).get("namespace")
        if self.namespace is not None and namespace != self.namespace:
            return False
        return labels_match(self.labels, obj) and all(f.matches(obj) for f in self.fields)

    def translate(self, event: _Event) -> JSON | None:
        if event.res != self.res:
            return None
        now, before = self._matches(event.obj), self._matches(event.old)
        if event.type == "DELETED":
            return {"type": "DELETED", "object": event.obj} if now or before else None
        if now and (before or event.type == "ADDED"):
            return {"type": event.type, "object": event.obj}
        if now:
            return {"type": "ADDED", "object": event.obj}
        if before:
            return {"type": "DELETED", "object": event.obj}
        return None


class ObjectStore:
    """The objects of the emulated cluster with Kubernetes API semantics (thread-safe).

    Stored dicts are never mutated in place: every write stores a new dict, so references
    handed to watchers stay consistent. Everything returned to callers is a deep copy.
    """

    def __init__(self, history_limit: int = 50_000) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self._rv = 0
        self._resources: dict[ResKey, ResourceDef] = {}
        self._objects: dict[ResKey, dict[tuple[str, str], JSON]] = {}
        self._uids: dict[str, ObjKey] = {}
        self._dependents: dict[str, set[ObjKey]] = collections.defaultdict(set)
        self._history: collections.deque[_Event] = collections.deque(maxlen=history_limit)
        self._watchers: set[Watcher] = set()
        self.on_register: list[Callable[[ResourceDef], None]] = []
        self.on_write: list[Callable[[ResourceDef, str, JSON], None]] = []
        # Mutating admission stand-ins: each may change a new object before it is stored, as a
        # mutating webhook does (tests/k8s/kueue.py plays Kueue's pod webhook with one).
        self.on_create: list[Callable[[ResourceDef, JSON], None]] = []

    # -- resources --------------------------------------------------------------------------

    def register(self, resource: ResourceDef) -> ResourceDef:
        with self.lock:
            self._resources[resource.key] = resource
            self._objects.setdefault(resource.key, {})
            for hook in self.on_register:
                hook(resource)
        return resource

    def resources(self) -> list[ResourceDef]:
        with self.lock:
            return list(self._resources.values())

    def resource(self, group: str, version: str, plural: str) -> ResourceDef | None:
        with self.lock:
            return self._resources.get((group, version, plural))

    def resolve(self, spec: str | ResourceDef) -> ResourceDef:
        """Find a resource by plural, kind, short name, ``plural.group``, ``group/version/plural``
        or ``version/plural`` (the core group wins ties, e.g. ``events``)."""
        if isinstance(spec, ResourceDef):
            return spec
        with self.lock:
            candidates = sorted(self._resources.values(), key=lambda r: (r.group != "", r.group))
        for res in candidates:
            names = {
                res.plural,
                res.kind.lower(),
                res.singular,
                *res.short_names,
                f"{res.plural}.{res.group}",
                f"{res.plural}.{res.version}.{res.group}",
                f"{res.group}/{res.version}/{res.plural}",
                f"{res.api_version}/{res.plural}",
            }
            if spec in names or spec.lower() in names:
                return res
        raise KeyError(f"unknown resource: {spec!r}")

    def resource_for(self, api_version: str, kind: str) -> ResourceDef:
        group, _, version = api_version.rpartition("/")
        with self.lock:
            for res in self._resources.values():
                if (res.group, res.version, res.kind) == (group, version, kind):
                    return res
        raise api_error(404, "NotFound", f"no matches for kind {kind!r} in version {api_version!r}")

    @property
    def resource_version(self) -> int:
        with self.lock:
            return self._rv

    # -- internals ---------------------------------------------------------------------------

    def _require(self, res: ResourceDef, namespace: str, name: str) -> JSON:
        obj = self._objects[res.key].get((namespace, name))
        if obj is None:
            qualified = f"{res.plural}.{res.group}" if res.group else res.plural
            raise api_error(
                404,
                "NotFound",
                f'{qualified} "{name}" not found',
                name=name,
                kind=res.plural,
                group=res.group,
            )
        return obj

    def _ns_key(self, res: ResourceDef, namespace: str | None) -> str:
        return (namespace or "") if res.namespaced else ""

    def _emit(self, res: ResourceDef, type_: str, obj: JSON, old: JSON | None) -> None:
        event = _Event(self._rv, res.key, type_, obj, old)
        self._history.append(event)
        for watcher in list(self._watchers):
            translated = watcher.translate(event)
            if translated is not None:
                watcher.deliver(translated)
        for hook in self.on_write:
            hook(res, type_, obj)
        self.changed.notify_all()

    def _index_owners(self, key: ObjKey, old: JSON | None, new: JSON | None) -> None:
        for obj, add in ((old, False), (new, True)):
            for ref in (obj or {}).get("metadata", {}).get("ownerReferences") or []:
                uid = ref.get("uid")
                if not uid:
                    continue
                if add:
                    self._dependents[uid].add(key)
                else:
                    self._dependents[uid].discard(key)

    def _store(self, res: ResourceDef, type_: str, new: JSON, old: JSON | None) -> JSON:
        meta = new["metadata"]
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        key: ObjKey = (res.key, meta.get("namespace", ""), meta["name"])
        self._objects[res.key][key[1], key[2]] = new
        self._uids[meta["uid"]] = key
        self._index_owners(key, old, new)
        self._emit(res, type_, new, old)
        return new

    def _remove(self, res: ResourceDef, obj: JSON, propagation: str) -> JSON:
        """Remove ``obj`` (the stored one, or its final updated state) and emit DELETED."""
        meta = obj["metadata"]
        key: ObjKey = (res.key, meta.get("namespace", ""), meta["name"])
        stored = self._objects[res.key].pop((key[1], key[2]))
        self._rv += 1
        final = copy.deepcopy(obj)
        final["metadata"]["resourceVersion"] = str(self._rv)
        self._uids.pop(meta["uid"], None)
        self._index_owners(key, stored, None)
        self._emit(res, "DELETED", final, stored)
        self._collect_garbage(meta["uid"], propagation)
        if res.key == ("", "v1", "namespaces"):
            for other in list(self._resources.values()):
                if other.namespaced:
                    for (ns, _name), child in list(self._objects[other.key].items()):
                        if ns == meta["name"]:
                            self._remove(other, child, "Background")
        return final

    def _collect_garbage(self, owner_uid: str, propagation: str) -> None:
        """Emulate kube-controller-manager's garbage collector for one deleted owner."""
        for res_key, namespace, name in sorted(self._dependents.pop(owner_uid, set())):
            res = self._resources[res_key]
            dependent = self._objects[res_key].get((namespace, name))
            if dependent is None:
                continue
            refs = dependent["metadata"].get("ownerReferences") or []
            remaining = [r for r in refs if r.get("uid") != owner_uid]
            if propagation == "Orphan" or any(r.get("uid") in self._uids for r in remaining):
                new = copy.deepcopy(dependent)
                new["metadata"]["ownerReferences"] = remaining or None
                if not remaining:
                    del new["metadata"]["ownerReferences"]
                self._store(res, "MODIFIED", new, dependent)
            else:
                self._delete_obj(res, dependent, propagation="Background", grace=None)

    def _delete_obj(
        self, res: ResourceDef, obj: JSON, *, propagation: str, grace: int | None
    ) -> JSON:
        meta = obj["metadata"]
        finalizers = meta.get("finalizers") or []
        if meta.get("deletionTimestamp"):
            if grace == 0 and not finalizers:
                return self._remove(res, obj, propagation)
            if grace == 0 and meta.get("deletionGracePeriodSeconds"):
                new = copy.deepcopy(obj)
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                return copy.deepcopy(self._store(res, "MODIFIED", new, obj))
            return copy.deepcopy(obj)
        if res.key == ("", "v1", "pods"):
            phase = obj.get("status", {}).get("phase")
            if not obj.get("spec", {}).get("nodeName") or phase in ("Succeeded", "Failed"):
                grace = 0
            elif grace is None:
                grace = int(obj.get("spec", {}).get("terminationGracePeriodSeconds", 30))
            if grace > 0:
                new = copy.deepcopy(obj)
                new["metadata"]["deletionTimestamp"] = now_rfc3339(grace)
                new["metadata"]["deletionGracePeriodSeconds"] = grace
                return copy.deepcopy(self._store(res, "MODIFIED", new, obj))
        if finalizers:
            new = copy.deepcopy(obj)
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            return copy.deepcopy(self._store(res, "MODIFIED", new, obj))
        return self._remove(res, obj, propagation)

    def _normalise(self, res: ResourceDef, obj: JSON) -> None:
        """Server-side conversions done on every write."""
        if res.key == ("", "v1", "secrets") and "stringData" in obj:
            data = obj.setdefault("data", {}) or {}
            for key, value in (obj.pop("stringData") or {}).items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            obj["data"] = data

    def _finish_update(self, res: ResourceDef, old: JSON, new: JSON, sub: str | None) -> JSON:
        """Apply status-subresource rules, keep immutable metadata, bump generation, store."""
        requested_rv = new.get("metadata", {}).get("resourceVersion")
        requested_uid = new.get("metadata", {}).get("uid")
        if requested_uid not in (None, old["metadata"].get("uid")):
            # A write naming another uid is meant for an object that was replaced under its
            # name (the kubelet sends its pod's uid with every status patch for this).
            raise api_error(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {requested_uid}, "
                f"UID in object meta: {old['metadata'].get('uid')}",
            )
        if res.has_status and sub == "status":
            merged = copy.deepcopy(old)
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
            new = merged
        elif res.has_status:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        meta = new.setdefault("metadata", {})
        old_meta = old["metadata"]
        if requested_rv not in (None, old_meta["resourceVersion"]):
            raise api_error(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {res.plural} "{old_meta["name"]}": the object '
                "has been modified; please apply your changes to the latest version and try again",
            )
        for key in (
            "uid",
            "name",
            "namespace",
            "creationTimestamp",
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ):
            if key in old_meta:
                meta[key] = old_meta[key]
            else:
                meta.pop(key, None)
        new["apiVersion"], new["kind"] = res.api_version, res.kind
        self._normalise(res, new)

        def body(o: JSON) -> JSON:
            return {k: v for k, v in o.items() if k not in ("metadata", "status")}

        if body(new) != body(old):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        if new == old:
            return copy.deepcopy(old)  # a no-op write: no new resourceVersion, no event
        terminating = meta.get("deletionTimestamp") and not meta.get("deletionGracePeriodSeconds")
        if terminating and not meta.get("finalizers"):
            return copy.deepcopy(self._remove(res, new, "Background"))
        return copy.deepcopy(self._store(res, "MODIFIED", new, old))

    # -- API operations ----------------------------------------------------------------------

    def create(
        self, res: ResourceDef, body: JSON, namespace: str | None = None, *, dry_run: bool = False
    ) -> JSON:
        obj = copy.deepcopy(body)
        if not isinstance(obj, dict):
            raise api_error(400, "BadRequest", "the body must be a JSON object")
        meta = obj.setdefault("metadata", {})
        with self.lock:
            if res.namespaced:
                ns = namespace or meta.get("namespace") or "default"
                if meta.get("namespace") not in (None, ns):
                    raise api_error(
                        400,
                        "BadRequest",
                        "the namespace of the provided object does not match "
                        "the namespace sent on the request",
                    )
                meta["namespace"] = ns
                if ("", ns) not in self._objects.get(("", "v1", "namespaces"), {}):
                    raise api_error(
                        404, "NotFound", f'namespaces "{ns}" not found', name=ns, kind="namespaces"
                    )
            else:
                meta.pop("namespace", None)
            ns_key = meta.get("namespace", "")
            if not meta.get("name") and meta.get("generateName"):
                for _ in range(100):
                    suffix = uuid.uuid4().hex[:5]
                    if (ns_key, meta["generateName"] + suffix) not in self._objects[res.key]:
                        meta["name"] = meta["generateName"] + suffix
                        break
            if not meta.get("name"):
                raise api_error(
                    422,
                    "Invalid",
                    "metadata.name: Required value: name or generateName is required",
                )
            if (ns_key, meta["name"]) in self._objects[res.key]:
                raise api_error(
                    409,
                    "AlreadyExists",
                    f'{res.plural} "{meta["name"]}" already exists',
                    name=meta["name"],
                    kind=res.plural,
                )
            obj["apiVersion"], obj["kind"] = res.api_version, res.kind
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now_rfc3339())
            meta["generation"] = 1
            for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
                meta.pop(key, None)
            if res.has_status:
                obj.pop("status", None)
            self._normalise(res, obj)
            self._defaults(res, obj)
            for hook in self.on_create:
                hook(res, obj)
            if dry_run:
                return obj
            created = self._store(res, "ADDED", obj, None)
            if res.key == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
                for crd_res in resources_of_crd(created):
                    self.register(crd_res)
            return copy.deepcopy(created)

    def _defaults(self, res: ResourceDef, obj: JSON) -> None:
        if res.key == ("", "v1", "pods"):
            spec = obj.setdefault("spec", {})
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("terminationGracePeriodSeconds", 30)
            spec.setdefault("schedulerName", "default-scheduler")
            spec.setdefault("dnsPolicy", "ClusterFirst")
            for container in spec.get("initContainers", []) + spec.get("containers", []):
                container.setdefault("terminationMessagePath", "/dev/termination-log")
                container.setdefault("terminationMessagePolicy", "File")
                container.setdefault("imagePullPolicy", "IfNotPresent")
            obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
        elif res.key == ("", "v1", "namespaces"):
            obj["status"] = {"phase": "Active"}
        elif res.key == ("", "v1", "secrets"):
            obj.setdefault("type", "Opaque")
        elif res.key == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            obj["status"] = {
                "acceptedNames": obj.get("spec", {}).get("names", {}),
                "storedVersions": [
                    v["name"] for v in obj.get("spec", {}).get("versions", []) if v.get("storage")
                ],
                "conditions": [
                    {
                        "type": t,
                        "status": "True",
                        "lastTransitionTime": now_rfc3339(),
                        "reason": r,
                        "message": m,
                    }
                    for t, r, m in (
                        ("NamesAccepted", "NoConflicts", "no conflicts found"),
                        (
                            "Established",
                            "InitialNamesAccepted",
                            "the initial names have been accepted",
                        ),
                    )
                ],
            }

    def get(self, res: ResourceDef, namespace: str | None, name: str) -> JSON | None:
        with self.lock:
            obj = self._objects[res.key].get((self._ns_key(res, namespace), name))
            return copy.deepcopy(obj) if obj is not None else None

    def read(self, res: ResourceDef, namespace: str | None, name: str) -> JSON:
        with self.lock:
            return copy.deepcopy(self._require(res, self._ns_key(res, namespace), name))

    def list(
        self,
        res: ResourceDef,
        namespace: str | None = None,
        *,
        label_selector: str | Mapping[str, str] | None = None,
        field_selector: str | Mapping[str, str] | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> tuple[list[JSON], str, str]:
        """Return (items, list resourceVersion, continue token or "")."""
        labels = parse_label_selector(label_selector)
        fields = parse_field_selector(field_selector)
        start: tuple[str, str] | None = None
        if continue_token:
            try:
                namespace_key, name_key = json.loads(base64.b64decode(continue_token))["start"]
                start = (str(namespace_key), str(name_key))
            except (ValueError, KeyError, TypeError):
                raise api_error(400, "BadRequest", "invalid continue token") from None
        with self.lock:
            items = []
            for key in sorted(self._objects[res.key]):
                if start is not None and key <= start:
                    continue
                obj = self._objects[res.key][key]
                if res.namespaced and namespace and key[0] != namespace:
                    continue
                if labels_match(labels, obj) and all(f.matches(obj) for f in fields):
                    items.append((key, obj))
            token = ""
            if limit and len(items) > limit:
                items = items[:limit]
                token = base64.b64encode(json.dumps({"start": items[-1][0]}).encode()).decode()
            return [copy.deepcopy(obj) for _, obj in items], str(self._rv), token

    def patch(
        self,
        res: ResourceDef,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        patch_type: str = MERGE_PATCH,
        subresource: str | None = None,
        dry_run: bool = False,
    ) -> JSON:
        with self.lock:
            old = self._require(res, self._ns_key(res, namespace), name)
            content_type = patch_type.split(";")[0].strip()
            if content_type == JSON_PATCH:
                new = json_patch(old, patch)
            elif content_type == MERGE_PATCH or content_type == "application/json":
                if not isinstance(patch, Mapping):
                    raise api_error(400, "BadRequest", "a merge patch must be a JSON object")
                if res.key == ("", "v1", "pods") and subresource == "status":
                    patch = merge_pod_conditions(old, patch)
                new = merge_patch(old, patch)
            else:
                raise api_error(
                    415,
                    "UnsupportedMediaType",
                    f"the emulator does not support the patch type {content_type!r}",
                )
            if not isinstance(new, dict):
                raise api_error(422, "Invalid", "the patched object is not a JSON object")
            if dry_run:
                return new
            return self._finish_update(res, old, new, subresource)

    def replace(
        self,
        res: ResourceDef,
        namespace: str | None,
        name: str,
        body: JSON,
        *,
        subresource: str | None = None,
    ) -> JSON:
        with self.lock:
            old = self._require(res, self._ns_key(res, namespace), name)
            new = copy.deepcopy(body)
            if new.get("metadata", {}).get("name", name) != name:
                raise api_error(400, "BadRequest", "the name of the object does not match the URL")
            return self._finish_update(res, old, new, subresource)

    def delete(
        self,
        res: ResourceDef,
        namespace: str | None,
        name: str,
        *,
        propagation: str = "Background",
        grace_seconds: int | None = None,
        preconditions: Mapping[str, str] | None = None,
        dry_run: bool = False,
    ) -> JSON:
        with self.lock:
            obj = self._require(res, self._ns_key(res, namespace), name)
            for key, value in (preconditions or {}).items():
                if value and obj["metadata"].get(key) != value:
                    raise api_error(409, "Conflict", f"Precondition failed: {key}: {value}")
            if dry_run:
                return copy.deepcopy(obj)
            return copy.deepcopy(
                self._delete_obj(res, obj, propagation=propagation, grace=grace_seconds)
            )

    def bind(self, namespace: str, name: str, node_name: str) -> JSON:
        """``pods/binding``: the scheduler's write of ``spec.nodeName``."""
        with self.lock:
            res = self._resources[("", "v1", "pods")]
            old = self._require(res, namespace, name)
            if old.get("spec", {}).get("nodeName"):
                raise api_error(
                    409,
                    "Conflict",
                    f'pod {name} is already assigned to node "{old["spec"]["nodeName"]}"',
                )
            new = copy.deepcopy(old)
            new["spec"]["nodeName"] = node_name
            return copy.deepcopy(self._store(res, "MODIFIED", new, old))

    # -- watching ----------------------------------------------------------------------------

    def watch(
        self,
        res: ResourceDef,
        namespace: str | None,
        deliver: Callable[[JSON | None], None],
        *,
        label_selector: str | Mapping[str, str] | None = None,
        field_selector: str | Mapping[str, str] | None = None,
        since: str | None = None,
    ) -> tuple[builtins.list[JSON], Watcher]:
        """Subscribe atomically; return the events to send first (the current objects as ADDED
        when ``since`` is empty or "0", else the recorded events after ``since``) and the
        watcher. A too old ``since`` yields one 410 Gone ERROR event and no subscription."""
        watcher = Watcher(
            res.key,
            namespace if res.namespaced and namespace else None,
            parse_label_selector(label_selector),
            parse_field_selector(field_selector),
            deliver,
        )
        with self.lock:
            initial: builtins.list[JSON] = []
            if not since or since == "0":
                for key in sorted(self._objects[res.key]):
                    obj = self._objects[res.key][key]
                    if watcher._matches(obj):
                        initial.append({"type": "ADDED", "object": obj})
            else:
                try:
                    since_rv = int(since)
                except ValueError:
                    raise api_error(
                        400, "BadRequest", f"invalid resourceVersion {since!r}"
                    ) from None
                oldest = self._history[0].rv if self._history else self._rv + 1
                if since_rv < oldest - 1 and since_rv < self._rv:
                    gone = {
                        "type": "ERROR",
                        "object": {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "metadata": {},
                            "status": "Failure",
                            "reason": "Expired",
                            "code": 410,
                            "message": f"too old resource version: {since_rv} ({oldest - 1})",
                        },
                    }
                    return [gone], watcher
                for event in self._history:
                    if event.rv > since_rv:
                        translated = watcher.translate(event)
                        if translated is not None:
                            initial.append(translated)
            self._watchers.add(watcher)
            return initial, watcher

    def unwatch(self, watcher: Watcher) -> None:
        with self.lock:
            self._watchers.discard(watcher)

    def close_watches(self) -> None:
        """End every watch stream (each gets ``None``), e.g. before the server stops."""
        with self.lock:
            for watcher in list(self._watchers):
                watcher.deliver(None)
            self._watchers.clear()


# --------------------------------------------------------------------------------------------
# The request log


@dataclass
class ApiRequest:
    """One HTTP request served by the emulator, in Kubernetes API terms."""

    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    resource: str  # plural, "plural/subresource", or the URL path for non-resource requests
    group: str | None
    namespace: str | None
    name: str | None
    user_agent: str
    status: int | None = None
    at: float = field(default_factory=time.monotonic)

    @property
    def is_write(self) -> bool:
        return self.verb in WRITE_VERBS


_CURRENT_REQUEST: contextvars.ContextVar[ApiRequest | None] = contextvars.ContextVar(
    "emulator_current_request", default=None
)


def current_request() -> ApiRequest | None:
    """The HTTP request being served, for an ``ObjectStore.on_write`` hook: which client (its
    User-Agent) made the write. None for the no-HTTP helpers (``api.create`` ...)."""
    return _CURRENT_REQUEST.get()


class RequestLog:
    """Counts API requests by verb and resource, for assertions and "writes per task"."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[ApiRequest] = []

    def add(self, item: ApiRequest) -> None:
        with self._lock:
            self._items.append(item)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def entries(
        self,
        *,
        verb: str | Iterable[str] | None = None,
        resource: str | None = None,
        user_agent: str | None = None,
        exclude_user_agent: str | None = None,
    ) -> list[ApiRequest]:
        """Filter by verb(s), resource ("pods" or "pods/status"), and User-Agent prefixes."""
        verbs = {verb} if isinstance(verb, str) else set(verb) if verb is not None else None
        with self._lock:
            items = list(self._items)
        return [
            r
            for r in items
            if (verbs is None or r.verb in verbs)
            and (resource is None or r.resource == resource)
            and (user_agent is None or r.user_agent.startswith(user_agent))
            and (exclude_user_agent is None or not r.user_agent.startswith(exclude_user_agent))
        ]

    def counts(self, **filters: Any) -> collections.Counter[tuple[str, str]]:
        """``Counter`` of (verb, resource) over the filtered entries."""
        return collections.Counter((r.verb, r.resource) for r in self.entries(**filters))

    def writes(self, **filters: Any) -> list[ApiRequest]:
        return [r for r in self.entries(**filters) if r.is_write]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


# --------------------------------------------------------------------------------------------
# The HTTP layer: kmock's emulator with our semantics


LogProvider = Callable[[str, str, str], bytes | None]
"""(namespace, pod name, container) -> the captured log, or None when it has not started."""


def parse_api_path(
    path: str,
) -> tuple[str | None, str | None, str | None, str | None, str | None, str | None]:
    """Split an API path into (group, version, namespace, plural, name, subresource)."""
    parts = [p for p in path.split("/") if p]
    if not parts or parts[0] not in ("api", "apis"):
        return None, None, None, None, None, None
    if parts[0] == "api":
        group: str | None = ""
        version = parts[1] if len(parts) > 1 else None
        rest = parts[2:]
    else:
        group = parts[1] if len(parts) > 1 else None
        version = parts[2] if len(parts) > 2 else None
        rest = parts[3:]
    namespace = None
    if (
        rest
        and rest[0] == "namespaces"
        and len(rest) >= 3
        and not (len(rest) == 3 and rest[2] in ("status", "finalize"))
    ):
        namespace, rest = rest[1], rest[2:]
    plural = rest[0] if rest else None
    name = rest[1] if len(rest) > 1 else None
    sub = "/".join(rest[2:]) or None
    return group, version, namespace, plural, name, sub


def _k8s_verb(method: str, name: str | None, params: Mapping[str, str]) -> str:
    if method == "GET":
        return "watch" if params.get("watch") in ("true", "1") else "get" if name else "list"
    return {
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if name else "deletecollection",
    }.get(method, method.lower())


def _kmock_action(verb: str) -> kmock.action | None:
    return {
        "list": kmock.action.LIST,
        "watch": kmock.action.WATCH,
        "get": kmock.action.FETCH,
        "create": kmock.action.CREATE,
        "patch": kmock.action.UPDATE,
        "delete": kmock.action.DELETE,
    }.get(verb)


def _is_resource_request(request: rendering.Request) -> bool:
    return request.resource is not None and request.resource.plural is not None


def _reaches(view: dsl.View, request: rendering.Request) -> bool:
    """Whether the request, the newest one, is among the requests `view` selects.

    `request in view` answers that by walking every request recorded so far through the whole
    chain, for every reaction, on every request: quadratic over a long run. A chain of only
    criteria and priorities selects a request by that request alone, so it is checked directly;
    chains that depend on other requests (slices, exclusions, groups, streams) are asked the
    slow way.
    """
    node = view
    while True:
        if isinstance(node, dsl.Root):
            return True
        if type(node) is dsl.Filter:
            if not node.criteria(request):
                return False
        elif type(node) is not dsl.Priority:
            return request in view
        node = node._source


@attrs.define(kw_only=True)
class EmulatorHandler(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with the object semantics served from an :class:`ObjectStore`.

    User reactions (``handler['patch', kmock.resource('v1/pods')] << 500``) take precedence
    over the emulation, and then nothing is stored: use them to inject API failures.
    """

    store: ObjectStore = attrs.field(factory=ObjectStore)
    request_log: RequestLog = attrs.field(factory=RequestLog)
    log_provider: LogProvider | None = None
    keep_requests: bool = True  # kmock's own request record (raw requests: memory-heavy)
    _emulation: Any = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        # Discovery (/api, /apis, ...) and the 404 fallback come from the scaffold; the emulator's
        # own object fallbacks are replaced by one marker reaction that _handle() serves itself.
        kmock.KubernetesScaffold.__attrs_post_init__(self)
        self._emulation = self.fallback[FnCriteria(_is_resource_request)] << b""
        self.store.on_register.append(self._on_register)
        self.store.on_write.append(self._on_write)
        for res in self.store.resources():
            self._on_register(res)
            for obj in self.store.list(res)[0]:
                self._on_write(res, "ADDED", obj)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        # As kmock's RawHandler._handle (user reactions by priority, then the fallbacks), except
        # that the emulation renders its own responses; KubernetesEmulator._handle is skipped
        # because it mutates kmock's own object store.
        payloads = list(self._payloads)
        priorities = [tuple(-p for p in payload.priorities) for payload in payloads]
        width = max((len(p) for p in priorities), default=0)
        order = sorted(
            range(len(payloads)), key=lambda i: priorities[i] + (0,) * (width - len(priorities[i]))
        )
        for index in order:
            payload = payloads[index]
            if payload is self._emulation:
                # The fallback's criterion, checked directly: `request in payload._source` scans
                # every recorded request (quadratic over a long run).
                if _is_resource_request(request) and not payload._disabled.is_set():
                    return await self._emulate(request)
                continue
            if payload._disabled.is_set() or not _reaches(payload._source, request):
                continue
            try:
                return await payload(request)
            except rendering.ReactionMismatchError:
                payload._disabled.set()
            except NotImplementedError:
                pass
        raise NotImplementedError("no reaction matches the request")

    def _on_register(self, res: ResourceDef) -> None:
        self._resources[kmock.resource(group=res.group, version=res.version, plural=res.plural)] = (
            kmock.ResourceInfo(
                namespaced=res.namespaced,
                kind=res.kind,
                singular=res.singular or res.kind.lower(),
                verbs=set(ALL_VERBS),
                shortnames=set(res.short_names),
                categories=set(res.categories),
                subresources=set(res.subresources),
            )
        )

    def _on_write(self, res: ResourceDef, type_: str, obj: JSON) -> None:
        # Mirror into kmock's `objects` (with history) for kmock-style assertions.
        meta = obj["metadata"]
        key = (
            kmock.resource(group=res.group, version=res.version, plural=res.plural),
            meta.get("namespace"),
            meta["name"],
        )
        if key not in self._objects:
            self._objects[key] = [None] if type_ == "DELETED" else obj
            return
        tracked: kmock.Object = self._objects[key]
        if type_ == "DELETED":
            tracked.delete()
        else:
            tracked.history.append(obj)

    def _get_resources(self) -> list[kmock.resource]:
        return [
            kmock.resource(group=r.group, version=r.version, plural=r.plural)
            for r in self.store.resources()
        ]

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        body = await raw_request.read()
        params = dict(raw_request.query)
        group, version, namespace, plural, name, sub = parse_api_path(raw_request.path)
        verb = _k8s_verb(raw_request.method, name, params)
        entry = ApiRequest(
            verb=verb if plural else "get",
            resource=(f"{plural}/{sub}" if sub else plural) if plural else raw_request.path,
            group=group,
            namespace=namespace,
            name=name,
            user_agent=raw_request.headers.get("User-Agent", ""),
        )
        self.request_log.add(entry)
        _CURRENT_REQUEST.set(entry)  # each request is served in its own task (and context)
        raw_response: aiohttp.web.StreamResponse | None = None
        request: rendering.Request | None = None
        try:
            data: Any = None
            if body:
                content_type = raw_request.headers.get("Content-Type", "")
                try:
                    data = yaml.safe_load(body) if "yaml" in content_type else json.loads(body)
                except ValueError:
                    raise api_error(400, "BadRequest", "the body is not valid JSON") from None
            resource = None
            if group is not None:
                resource = kmock.resource(group=group, version=version, plural=plural)
            request = rendering.Request(
                id=len(self._requests),
                raw_request=raw_request,
                url=raw_request.url,
                method=raw_request.method,
                params=params,
                headers=dict(raw_request.headers),
                cookies=dict(raw_request.cookies),
                body=body,
                text=body.decode("utf-8", "replace"),
                data=data,
                action=_kmock_action(verb) if plural else None,
                resource=resource,
                namespace=namespace,
                name=name,
                subresource=sub,
            )
            # kmock's reactions find their requests by identity in this record, so the request
            # is in it while it is served; keep_requests=False drops it afterwards (reactions
            # with counts, such as `[:2] << 503`, then see no earlier requests).
            self._requests.append(request)
            try:
                response = await self._handle(request)
            except rendering.StreamingError as e:
                raw_response = e.args[0]
                raise e.__cause__ or e from None
            entry.status = response.status
            return response
        except Exception as e:
            if not isinstance(e, kmock.KubernetesError) and self._errors:
                self._errors[-1].append(e)
            entry.status = e.status if isinstance(e, kmock.KubernetesError) else 500
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(e)
            await self._stream_error(e, raw_response)
            with contextlib.suppress(ConnectionError):
                await raw_response.write_eof()
            return raw_response
        finally:
            if request is not None and not self.keep_requests:
                self._forget_request(request)

    def _forget_request(self, request: rendering.Request) -> None:
        for i in range(len(self._requests) - 1, -1, -1):  # newest first: it is near the end
            if self._requests[i] is request:
                del self._requests[i]
                return

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, kmock.KubernetesError):
            return aiohttp.web.json_response(
                {
                    "apiVersion": "v1",
                    "kind": "Status",
                    "metadata": {},
                    "status": "Failure",
                    "code": exc.status,
                    "reason": exc.reason,
                    "message": exc.message,
                    "details": exc.details or {},
                },
                status=exc.status,
            )
        return aiohttp.web.json_response(
            {
                "apiVersion": "v1",
                "kind": "Status",
                "metadata": {},
                "status": "Failure",
                "code": 500,
                "reason": type(exc).__name__,
                "message": repr(exc),
                "details": {"traceback": traceback.format_exc()},
            },
            status=500,
        )

    async def _emulate(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        result = await self._serve_resource(request)
        if isinstance(result, bytes):
            return aiohttp.web.Response(body=result, content_type="text/plain")
        if isinstance(result, tuple):
            return aiohttp.web.json_response(result[1], status=result[0])
        if isinstance(result, dict):
            return aiohttp.web.json_response(result)
        assert request._raw_request is not None
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request._raw_request)
        try:
            async for event in result:
                await response.write(json.dumps(event).encode() + b"\n")
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away
        finally:
            await result.aclose()
        return response

    async def _serve_resource(self, request: rendering.Request) -> Any:
        assert request.resource is not None
        assert request.resource.plural is not None
        group, version, plural = (
            request.resource.group,
            request.resource.version,
            request.resource.plural,
        )
        res = self.store.resource(group or "", version or "", plural)
        if res is None:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        params = request.params
        method = request.method.value if hasattr(request.method, "value") else str(request.method)
        namespace, name, sub = request.namespace, request.name, request.subresource
        dry_run = bool(params.get("dryRun"))
        if sub is not None and sub not in res.subresources:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        if method == "GET" and params.get("watch") in ("true", "1"):
            fields = params.get("fieldSelector") or ""
            if name:
                fields = ",".join(filter(None, [fields, f"metadata.name={name}"]))
            return await self._watch(res, namespace, params, fields)
        if method == "GET" and name is None:
            limit = int(params["limit"]) if params.get("limit") else None
            items, rv, token = self.store.list(
                res,
                namespace,
                label_selector=params.get("labelSelector"),
                field_selector=params.get("fieldSelector"),
                limit=limit,
                continue_token=params.get("continue"),
            )
            meta: JSON = {"resourceVersion": rv}
            if token:
                meta["continue"] = token
            return {
                "apiVersion": res.api_version,
                "kind": f"{res.kind}List",
                "metadata": meta,
                "items": items,
            }
        if method == "GET" and name is not None:
            if sub == "log":
                return self._serve_log(res, namespace or "", name, params)
            return self.store.read(res, namespace, name)
        if method == "POST" and name is None:
            return 201, self.store.create(res, request.data, namespace, dry_run=dry_run)
        if method == "POST" and sub == "binding":
            target = (request.data or {}).get("target", {}).get("name")
            if not target:
                raise api_error(400, "BadRequest", "binding target name is required")
            self.store.bind(namespace or "", name or "", target)
            return 201, {"apiVersion": "v1", "kind": "Status", "status": "Success", "code": 201}
        if method == "POST" and sub == "eviction":
            self.store.delete(res, namespace, name or "")
            return 201, {"apiVersion": "v1", "kind": "Status", "status": "Success", "code": 201}
        if method == "PUT" and name is not None:
            if not isinstance(request.data, dict):
                raise api_error(400, "BadRequest", "the body must be a JSON object")
            return self.store.replace(res, namespace, name, request.data, subresource=sub)
        if method == "PATCH" and name is not None:
            content_type = request.headers.get("Content-Type", MERGE_PATCH)
            return self.store.patch(
                res,
                namespace,
                name,
                request.data,
                patch_type=content_type,
                subresource=sub,
                dry_run=dry_run,
            )
        if method == "DELETE":
            options = request.data if isinstance(request.data, dict) else {}
            propagation = (
                params.get("propagationPolicy") or options.get("propagationPolicy") or "Background"
            )
            grace_raw = params.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
            grace = int(grace_raw) if grace_raw is not None else None
            if name is not None:
                return self.store.delete(
                    res,
                    namespace,
                    name,
                    propagation=propagation,
                    grace_seconds=grace,
                    preconditions=options.get("preconditions"),
                    dry_run=dry_run,
                )
            items, _, _ = self.store.list(
                res,
                namespace,
                label_selector=params.get("labelSelector"),
                field_selector=params.get("fieldSelector"),
            )
            for item in items:
                with contextlib.suppress(kmock.KubernetesError):
                    self.store.delete(
                        res,
                        item["metadata"].get("namespace"),
                        item["metadata"]["name"],
                        propagation=propagation,
                        grace_seconds=grace,
                    )
            return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success"}
        raise api_error(405, "MethodNotAllowed", f"{method} is not supported on this URL")

    def _serve_log(
        self, res: ResourceDef, namespace: str, name: str, params: Mapping[str, str]
    ) -> bytes:
        pod = self.store.read(res, namespace, name)
        names = [
            c["name"]
            for c in pod.get("spec", {}).get("initContainers", [])
            + pod.get("spec", {}).get("containers", [])
        ]
        main = [c["name"] for c in pod.get("spec", {}).get("containers", [])]
        container = params.get("container")
        if not container:
            if len(main) != 1:
                raise api_error(
                    400,
                    "BadRequest",
                    f"a container name must be specified for pod "
                    f"{name}, choose one of: [{' '.join(main)}]",
                )
            container = main[0]
        if container not in names:
            raise api_error(400, "BadRequest", f"container {container} is not valid for pod {name}")
        content = self.log_provider(namespace, name, container) if self.log_provider else None
        if content is None:
            raise api_error(
                400,
                "BadRequest",
                f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating',
            )
        if params.get("tailLines"):
            tail = int(params["tailLines"])
            lines = content.splitlines(keepends=True)
            content = b"".join(lines[-tail:]) if tail > 0 else b""
        if params.get("limitBytes"):
            content = content[: int(params["limitBytes"])]
        return content

    async def _watch(
        self,
        res: ResourceDef,
        namespace: str | None,
        params: Mapping[str, str],
        field_selector: str,
    ) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[JSON | None] = asyncio.Queue()

        def deliver(event: JSON | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(queue.put_nowait, event)

        since = params.get("resourceVersion")
        send_initial = params.get("sendInitialEvents") == "true"
        # Validate before the response starts (errors are plain HTTP errors), subscribe lazily.
        parse_label_selector(params.get("labelSelector"))
        parse_field_selector(field_selector)
        if since and not since.isdigit():
            raise api_error(400, "BadRequest", f"invalid resourceVersion {since!r}")
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        deadline = loop.time() + timeout if timeout else None

        async def stream() -> AsyncIterator[Any]:
            initial, watcher = self.store.watch(
                res,
                namespace,
                deliver,
                label_selector=params.get("labelSelector"),
                field_selector=field_selector,
                since=None if send_initial else since,
            )
            try:
                for event in initial:
                    yield event
                if initial and initial[-1]["type"] == "ERROR":
                    return
                if send_initial:
                    yield {
                        "type": "BOOKMARK",
                        "object": {
                            "apiVersion": res.api_version,
                            "kind": res.kind,
                            "metadata": {
                                "resourceVersion": str(self.store.resource_version),
                                "annotations": {"k8s.io/initial-events-end": "true"},
                            },
                        },
                    }
                while True:
                    remaining = None if deadline is None else deadline - loop.time()
                    if remaining is not None and remaining <= 0:
                        return
                    try:
                        live = await asyncio.wait_for(queue.get(), remaining)
                    except TimeoutError:
                        return
                    if live is None:
                        return
                    yield live
            finally:
                self.store.unwatch(watcher)

        return stream()


# --------------------------------------------------------------------------------------------
# The server in a background thread, with helpers for tests


def _load_crd(path: Path | None) -> JSON:
    if path is not None and path.exists():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                return dict(doc)
    return copy.deepcopy(MINIMAL_CRD)


class EmulatedApiServer:
    """The emulated API server on 127.0.0.1 (ephemeral port) with test helpers.

    Usage::

        with EmulatedApiServer() as api:
            api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})
            api.wait_for(lambda: api.get("configmaps", "x"))

    ``crd_path``: the SandboxTask CRD to seed (``manifests/crd.yaml`` when present, else a
    minimal CRD); ``None`` seeds the minimal one. ``namespaces``: the namespaces to seed.
    ``history_limit``: how many events a watch can resume from (older: 410 Gone).
    ``keep_requests=False`` keeps only the light :class:`RequestLog`, not kmock's record of
    raw requests (for load benchmarks).
    """

    def __init__(
        self,
        *,
        crd_path: Path | None = DEFAULT_CRD_PATH,
        namespaces: Iterable[str] = ("default",),
        extra_crds: Iterable[JSON] = (),
        host: str = "127.0.0.1",
        history_limit: int = 50_000,
        keep_requests: bool = True,
    ) -> None:
        self.store = ObjectStore(history_limit=history_limit)
        for res in BUILTIN_RESOURCES:
            self.store.register(res)
        sets = [_load_crd(TASKSET_CRD_PATH)] if TASKSET_CRD_PATH.exists() else []
        self._crds = [_load_crd(crd_path), *sets, *extra_crds]
        self._namespaces = list(namespaces)
        self._host = host
        self._keep_requests = keep_requests
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._port: int | None = None
        self._kubeconfig_dir: Path | None = None
        self.handler: EmulatorHandler | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> EmulatedApiServer:
        if self._thread is not None:
            raise RuntimeError("the emulated API server is already started")
        for name in self._namespaces:
            self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        for crd in self._crds:
            self.create(crd)
        self._thread = threading.Thread(target=self._run, name="k8s-emulator", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._startup_error is not None:
            raise RuntimeError("the emulated API server failed to start") from self._startup_error
        if self._port is None:
            raise RuntimeError("the emulated API server did not start in time")
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop_event is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._stop_event.set)
        self._thread.join(timeout=30)
        self._thread = None
        if self._kubeconfig_dir is not None:
            for child in self._kubeconfig_dir.iterdir():
                child.unlink()
            self._kubeconfig_dir.rmdir()
            self._kubeconfig_dir = None

    def __enter__(self) -> EmulatedApiServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # reported to start() or lost at teardown
            self._startup_error = e
            self._ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stop_event = asyncio.Event()
        self.handler = EmulatorHandler(store=self.store, keep_requests=self._keep_requests)
        async with self.handler:
            server = aiohttp.web.Server(self.handler, handler_cancellation=True, access_log=None)
            runner = aiohttp.web.ServerRunner(server, shutdown_timeout=1.0)
            await runner.setup()
            site = aiohttp.web.TCPSite(runner, self._host, 0)
            await site.start()
            self._port = runner.addresses[0][1]
            self._ready.set()
            try:
                await self._stop_event.wait()
            finally:
                self.store.close_watches()
                await asyncio.sleep(0.05)  # let the streams end before the runner closes
                await runner.cleanup()

    # -- connection details ------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError("the emulated API server is not started")
        return f"http://{self._host}:{self._port}"

    @property
    def requests(self) -> RequestLog:
        """The request log of the HTTP API (helpers are not in it)."""
        assert self.handler is not None
        return self.handler.request_log

    def kubeconfig(self, namespace: str = "default") -> JSON:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "emulator",
                    "cluster": {"server": self.base_url, "insecure-skip-tls-verify": True},
                }
            ],
            "users": [{"name": "tester", "user": {"token": "emulator-test-token"}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "tester", "namespace": namespace},
                }
            ],
            "current-context": "emulator",
        }

    def write_kubeconfig(self, path: Path | None = None, namespace: str = "default") -> Path:
        """Write a kubeconfig for this server (a temp file removed at stop() by default)."""
        if path is None:
            if self._kubeconfig_dir is None:
                import tempfile

                self._kubeconfig_dir = Path(tempfile.mkdtemp(prefix="k8s-emulator-"))
            path = self._kubeconfig_dir / f"kubeconfig-{namespace}.yaml"
        path.write_text(yaml.safe_dump(self.kubeconfig(namespace)))
        return path

    def env(self, namespace: str = "default") -> dict[str, str]:
        """Environment for a client of this server: ``KUBECONFIG`` (what kopf's fallback login,
        ``kopf.login_with_kubeconfig``, reads) and the server URL."""
        return {
            "KUBECONFIG": str(self.write_kubeconfig(namespace=namespace)),
            "K8S_EMULATOR_URL": self.base_url,
        }

    # -- helpers (sync) ----------------------------------------------------------------------

    def register_resource(self, resource: ResourceDef) -> ResourceDef:
        return self.store.register(resource)

    def resolve(self, resource: str | ResourceDef) -> ResourceDef:
        return self.store.resolve(resource)

    def create(self, obj: JSON, namespace: str | None = None) -> JSON:
        res = self.store.resource_for(obj["apiVersion"], obj["kind"])
        return self.store.create(res, obj, namespace)

    def get(
        self, resource: str | ResourceDef, name: str, namespace: str | None = "default"
    ) -> JSON | None:
        """The object, or None when it does not exist."""
        return self.store.get(self.resolve(resource), namespace, name)

    def list(
        self,
        resource: str | ResourceDef,
        namespace: str | None = None,
        *,
        label_selector: str | Mapping[str, str] | None = None,
        field_selector: str | Mapping[str, str] | None = None,
    ) -> builtins.list[JSON]:
        items, _, _ = self.store.list(
            self.resolve(resource),
            namespace,
            label_selector=label_selector,
            field_selector=field_selector,
        )
        return items

    def patch(
        self,
        resource: str | ResourceDef,
        name: str,
        patch: Any,
        namespace: str | None = "default",
        *,
        subresource: str | None = None,
        patch_type: str = MERGE_PATCH,
    ) -> JSON:
        return self.store.patch(
            self.resolve(resource),
            namespace,
            name,
            patch,
            patch_type=patch_type,
            subresource=subresource,
        )

    def replace(
        self,
        resource: str | ResourceDef,
        name: str,
        body: JSON,
        namespace: str | None = "default",
        *,
        subresource: str | None = None,
    ) -> JSON:
        return self.store.replace(
            self.resolve(resource), namespace, name, body, subresource=subresource
        )

    def delete(
        self,
        resource: str | ResourceDef,
        name: str,
        namespace: str | None = "default",
        *,
        propagation: str = "Background",
        grace_seconds: int | None = None,
    ) -> JSON:
        return self.store.delete(
            self.resolve(resource),
            namespace,
            name,
            propagation=propagation,
            grace_seconds=grace_seconds,
        )

    def wait_for(self, predicate: Callable[[], T], timeout: float = 10.0, message: str = "") -> T:
        """Poll ``predicate`` (woken by every write) until it returns a truthy value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    message
                    or f"condition not met within {timeout}s: "
                    f"{getattr(predicate, '__name__', predicate)}"
                )
            with self.store.changed:
                self.store.changed.wait(min(remaining, 0.05))

    def events_for(self, obj: JSON) -> builtins.list[JSON]:
        """Core v1 Events whose involvedObject is ``obj`` (by uid)."""
        uid = obj["metadata"]["uid"]
        return [
            e
            for e in self.list("events", obj["metadata"].get("namespace"))
            if e.get("involvedObject", {}).get("uid") == uid
        ]

    # -- helpers (async) ---------------------------------------------------------------------

    async def acreate(self, obj: JSON, namespace: str | None = None) -> JSON:
        return self.create(obj, namespace)

    async def aget(
        self, resource: str | ResourceDef, name: str, namespace: str | None = "default"
    ) -> JSON | None:
        return self.get(resource, name, namespace)

    async def alist(
        self, resource: str | ResourceDef, namespace: str | None = None, **selectors: Any
    ) -> builtins.list[JSON]:
        return self.list(resource, namespace, **selectors)

    async def apatch(
        self,
        resource: str | ResourceDef,
        name: str,
        patch: Any,
        namespace: str | None = "default",
        **kwargs: Any,
    ) -> JSON:
        return self.patch(resource, name, patch, namespace, **kwargs)

    async def adelete(
        self,
        resource: str | ResourceDef,
        name: str,
        namespace: str | None = "default",
        **kwargs: Any,
    ) -> JSON:
        return self.delete(resource, name, namespace, **kwargs)

    async def await_for(
        self, predicate: Callable[[], T | Awaitable[T]], timeout: float = 10.0, message: str = ""
    ) -> T:
        """Async :meth:`wait_for`; ``predicate`` may be sync or async."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(message or f"condition not met within {timeout}s")
            await asyncio.sleep(0.02)

    def iter_objects(self) -> Iterator[JSON]:
        """Every stored object (a snapshot), for debugging."""
        for res in self.store.resources():
            yield from self.list(res)
