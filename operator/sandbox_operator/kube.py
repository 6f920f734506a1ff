"""A thin async client for the few Kubernetes API calls the operator makes (aiohttp, like kopf).

kopf watches; this client writes: create, replace, merge-patch, delete, and the odd read. Every call is
counted by verb and resource, so the load benchmark can report API writes per task.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import socket
import ssl
import tempfile
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import kopf
from pydantic import BaseModel, ConfigDict, Field

from sandbox_agent import __version__
from sandbox_agent.wire import API_GROUP, API_VERSION, PLURAL, SET_PLURAL

TASKS = PLURAL
TASKSETS = SET_PLURAL
# Every API call this client may make, as (verb, resource): the RBAC role is derived from it.
API_CALLS: tuple[tuple[str, str], ...] = (
    ("get", "sandboxtasks"),
    ("list", "sandboxtasks"),
    ("watch", "sandboxtasks"),
    ("patch", "sandboxtasks/status"),
    ("create", "sandboxtasks"),
    ("delete", "sandboxtasks"),
    ("get", "sandboxtasksets"),
    ("list", "sandboxtasksets"),
    ("watch", "sandboxtasksets"),
    ("patch", "sandboxtasksets/status"),
    ("delete", "sandboxtasksets"),
    ("get", "pods"),
    ("list", "pods"),
    ("watch", "pods"),
    ("create", "pods"),
    ("delete", "pods"),
    ("get", "pods/log"),
    ("create", "configmaps"),
    ("get", "configmaps"),
    ("get", "secrets"),
    ("get", "networkpolicies"),
    ("create", "networkpolicies"),
    ("update", "networkpolicies"),
)


# Asks the API server for an object's metadata only: of a Secret, never its data.
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1, application/json"


class ObjectMetadata(BaseModel):
    """The part of an object's metadata the operator reads."""

    model_config = ConfigDict(extra="ignore")

    name: str
    namespace: str | None = None
    uid: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


def user_agent() -> str:
    """`llm-sandbox-operator/<version> (<host>; pid <pid>)`: an API audit log (or the test
    emulator's request log) then says which operator process made each write - after a restart,
    which incarnation wrote a task's terminal status."""
    return f"llm-sandbox-operator/{__version__} ({socket.gethostname()}; pid {os.getpid()})"


class KubeError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"HTTP {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class ConflictError(KubeError):
    """409: the object already exists (create) or changed underneath (update)."""


def resource_path(
    resource: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The API path of a resource we use; `resource` is a plural name (pods, sandboxtasks, ...)."""
    prefix = {
        "pods": "/api/v1",
        "configmaps": "/api/v1",
        "secrets": "/api/v1",
        "networkpolicies": "/apis/networking.k8s.io/v1",
        TASKS: f"/apis/{API_GROUP}/{API_VERSION}",
        TASKSETS: f"/apis/{API_GROUP}/{API_VERSION}",
    }[resource]
    path = prefix
    if namespace is not None:
        path += f"/namespaces/{quote(namespace)}"
    path += f"/{resource}"
    if name is not None:
        path += f"/{quote(name)}"
    if subresource is not None:
        path += f"/{subresource}"
    return path


def matches_labels(obj: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _pem(data: str | bytes) -> bytes:
    """Certificate or key data as PEM bytes; kubeconfig carries it base64-encoded."""
    raw = data if isinstance(data, bytes) else data.encode()
    return raw if raw.lstrip().startswith(b"-----") else base64.b64decode(raw)


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    if not (info.ca_path or info.ca_data or info.certificate_path or info.certificate_data):
        return True
    ctx = ssl.create_default_context()
    if info.ca_path:
        ctx.load_verify_locations(cafile=str(info.ca_path))
    elif info.ca_data:
        ctx.load_verify_locations(cadata=_pem(info.ca_data).decode("ascii"))
    if info.certificate_data or info.private_key_data:
        _load_client_certificate_data(ctx, info)
    elif info.certificate_path:
        key = info.private_key_path
        ctx.load_cert_chain(certfile=str(info.certificate_path), keyfile=str(key) if key else None)
    return ctx


def _load_client_certificate_data(ctx: ssl.SSLContext, info: kopf.ConnectionInfo) -> None:
    """Load an inline client certificate and key, leaving no copy of them on disk.

    `load_cert_chain` reads only files, so the PEM data goes into a private directory (0700,
    files 0600) that is removed as soon as the context holds them, whether loading worked or not.
    """
    with tempfile.TemporaryDirectory(prefix="llmsandbox-cred-") as directory:
        cert = _private_file(directory, "client.crt", info.certificate_data)
        key = _private_file(directory, "client.key", info.private_key_data)
        cert = cert or (str(info.certificate_path) if info.certificate_path else None)
        key = key or (str(info.private_key_path) if info.private_key_path else None)
        if cert is None:
            raise KubeError(0, "NoCredentials", "a client key was given without its certificate")
        ctx.load_cert_chain(certfile=cert, keyfile=key)


def _private_file(directory: str, name: str, data: str | bytes | None) -> str | None:
    if not data:
        return None
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(_pem(data))
    return path


class KubeClient:
    """One aiohttp session against one API server, with the operator's credentials."""

    def __init__(self, info: kopf.ConnectionInfo) -> None:
        self.info = info
        self.server = info.server.rstrip("/")
        headers = {"Accept": "application/json", "User-Agent": user_agent()}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        auth = None
        if info.username and info.password:
            auth = aiohttp.BasicAuth(info.username, info.password)
        self._session = aiohttp.ClientSession(
            headers=headers,
            auth=auth,
            connector=aiohttp.TCPConnector(ssl=_ssl_context(info), limit=32),
            timeout=aiohttp.ClientTimeout(total=60),
        )
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()

    @classmethod
    def from_environment(cls) -> KubeClient:
        """In-cluster service account first, then the user's kubeconfig."""
        settings = kopf.OperatorSettings()
        info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
            settings=settings
        )
        if info is None:
            raise KubeError(0, "NoCredentials", "no service account and no kubeconfig found")
        return cls(info)

    async def close(self) -> None:
        await self._session.close()

    async def _request(
        self,
        verb: str,
        method: str,
        path: str,
        *,
        resource: str,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        text: bool = False,
    ) -> Any:
        self.calls[(verb, resource)] += 1
        url = self.server + path
        if params:
            url += "?" + urlencode(params)
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type, "Accept": accept}
        async with self._session.request(method, url, data=data, headers=headers) as resp:
            # Bytes, decoded by json itself: no charset detection per response.
            raw = await resp.read()
            if resp.status >= 400:
                text_body = raw.decode("utf-8", "replace")
                try:
                    status = json.loads(raw)
                    reason, message = status.get("reason", ""), status.get("message", text_body)
                except ValueError:
                    reason, message = resp.reason or "", text_body[:500]
                cls = ConflictError if resp.status == 409 else KubeError
                raise cls(resp.status, str(reason), str(message))
            if text:
                return raw.decode("utf-8", "replace")
            return json.loads(raw) if raw else {}

    async def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = await self._request(
                "get", "GET", resource_path(resource, namespace, name), resource=resource
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    async def get_metadata(self, resource: str, namespace: str, name: str) -> ObjectMetadata | None:
        """An object's metadata (PartialObjectMetadata), or None when it does not exist. For
        Secrets: the operator learns their labels, never their data."""
        try:
            obj = await self._request(
                "get",
                "GET",
                resource_path(resource, namespace, name),
                resource=resource,
                accept=METADATA_ONLY,
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return ObjectMetadata.model_validate(obj.get("metadata") or {})

    async def list(
        self,
        resource: str,
        namespace: str | None,
        labels: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        params = (
            {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        )
        data = await self._request(
            "list", "GET", resource_path(resource, namespace), resource=resource, params=params
        )
        items: list[dict[str, Any]] = data.get("items", [])
        # Filter here too: selectors are cheap to re-check, and some API servers ignore them.
        return [i for i in items if not labels or matches_labels(i, labels)]

    async def create(self, resource: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        obj: dict[str, Any] = await self._request(
            "create", "POST", resource_path(resource, namespace), resource=resource, body=body
        )
        return obj

    async def replace(
        self, resource: str, namespace: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """PUT the whole object; `body.metadata.resourceVersion` makes it fail with 409
        (ConflictError) when the object changed since it was read."""
        obj: dict[str, Any] = await self._request(
            "update",
            "PUT",
            resource_path(resource, namespace, name),
            resource=resource,
            body=body,
        )
        return obj

    async def patch_status(
        self, resource: str, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        obj: dict[str, Any] = await self._request(
            "patch",
            "PATCH",
            resource_path(resource, namespace, name, "status"),
            resource=f"{resource}/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )
        return obj

    async def delete(
        self, resource: str, namespace: str, name: str, *, uid: str | None = None
    ) -> bool:
        """Delete the object (only the one with `uid`, when given); False when it is gone (or
        another object has taken its name)."""
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid is not None:
            body["preconditions"] = {"uid": uid}
        try:
            await self._request(
                "delete",
                "DELETE",
                resource_path(resource, namespace, name),
                resource=resource,
                body=body,
            )
        except KubeError as exc:
            if exc.status == 404 or (uid is not None and exc.status == 409):
                return False
            raise
        return True

    async def pod_log(self, namespace: str, name: str, container: str, tail_lines: int) -> str:
        text: str = await self._request(
            "get",
            "GET",
            resource_path("pods", namespace, name, "log"),
            resource="pods/log",
            params={"container": container, "tailLines": str(tail_lines)},
            text=True,
        )
        return text
