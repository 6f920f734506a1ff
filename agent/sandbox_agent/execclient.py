"""Async client for the exec server's HTTP API (over a unix socket or TCP)."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from .backends.base import ExecEndpoint
from .errors import ExecServerError, SandboxError

# Slack on top of a command's own timeout for the HTTP round trip and the server's kill path.
_EXEC_HTTP_SLACK = 15.0
_FILE_HTTP_TIMEOUT = 60.0


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ExecResult(_Reply):
    exit_code: int
    stdout: str
    stderr: str
    stdout_truncated_bytes: int = 0
    stderr_truncated_bytes: int = 0
    timed_out: bool = False
    duration_seconds: float = 0.0
    session_restarted: bool = False
    cwd: str = ""


class FileContent(_Reply):
    path: str
    content: str
    encoding: str
    size: int
    truncated: bool = False
    total_lines: int | None = None


class WrittenFile(_Reply):
    path: str
    size: int


class DirEntry(_Reply):
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int


class Listing(_Reply):
    path: str
    entries: list[DirEntry]
    truncated: bool = False


R = TypeVar("R", bound=_Reply)


class ExecClient:
    """One connection pool to one exec server; every call raises SandboxError subclasses only."""

    def __init__(self, endpoint: ExecEndpoint) -> None:
        self.endpoint = endpoint
        transport = httpx.AsyncHTTPTransport(uds=endpoint.uds) if endpoint.uds else None
        self._http = httpx.AsyncClient(
            base_url=endpoint.url,
            transport=transport,
            headers={"Authorization": f"Bearer {endpoint.token}"},
            timeout=_FILE_HTTP_TIMEOUT,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> ExecClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _post(
        self, path: str, body: dict[str, Any], reply: type[R], timeout: float | None = None
    ) -> R:
        try:
            resp = await self._http.post(path, json=body, timeout=timeout or _FILE_HTTP_TIMEOUT)
        except httpx.TimeoutException as exc:
            raise SandboxError(f"exec server did not answer {path} in time ({exc!r})") from exc
        except httpx.HTTPError as exc:
            raise SandboxError(f"exec server unreachable for {path}: {exc!r}") from exc
        try:
            data = resp.json()
        except ValueError:
            raise SandboxError(
                f"exec server sent non-JSON for {path} (HTTP {resp.status_code})"
            ) from None
        if resp.status_code >= 400:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            raise ExecServerError(
                str(err.get("code", "error")), str(err.get("message", data)), resp.status_code
            )
        try:
            return reply.model_validate(data)
        except ValidationError as exc:
            raise SandboxError(f"exec server sent an unexpected reply for {path}: {exc}") from None

    async def healthy(self) -> bool:
        try:
            resp = await self._http.get("/healthz", timeout=2)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not await self.healthy():
            if time.monotonic() > deadline:
                raise SandboxError(f"exec server never became ready ({timeout:.0f}s)")
            await asyncio.sleep(0.05)

    async def exec(self, command: str, timeout: float, max_output_bytes: int = 32768) -> ExecResult:
        body = {"command": command, "timeout": timeout, "max_output_bytes": max_output_bytes}
        return await self._post("/exec", body, ExecResult, timeout=timeout + _EXEC_HTTP_SLACK)

    async def read_text(
        self,
        path: str,
        start_line: int | None = None,
        end_line: int | None = None,
        max_bytes: int | None = None,
    ) -> FileContent:
        body: dict[str, Any] = {"path": path}
        if start_line is not None:
            body["start_line"] = start_line
        if end_line is not None:
            body["end_line"] = end_line
        if max_bytes is not None:
            body["max_bytes"] = max_bytes
        return await self._post("/files/read", body, FileContent)

    async def read_bytes(self, path: str, max_bytes: int) -> bytes:
        reply = await self._post(
            "/files/read", {"path": path, "encoding": "base64", "max_bytes": max_bytes}, FileContent
        )
        return base64.b64decode(reply.content)

    async def write_text(self, path: str, content: str) -> WrittenFile:
        return await self._post("/files/write", {"path": path, "content": content}, WrittenFile)

    async def write_bytes(self, path: str, data: bytes, mode: int | None = None) -> WrittenFile:
        body: dict[str, Any] = {
            "path": path,
            "content": base64.b64encode(data).decode("ascii"),
            "encoding": "base64",
        }
        if mode is not None:
            body["mode"] = mode
        return await self._post("/files/write", body, WrittenFile)

    async def list_dir(
        self, path: str, recursive: bool = False, max_entries: int = 1000
    ) -> Listing:
        body = {"path": path, "recursive": recursive, "max_entries": max_entries}
        return await self._post("/files/list", body, Listing)

    async def shutdown(self) -> None:
        try:
            await self._http.post("/shutdown", json={}, timeout=5)
        except httpx.HTTPError:
            # Already gone is what shutdown wants.
            return
