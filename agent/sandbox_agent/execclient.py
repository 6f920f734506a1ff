"""Async client for the exec server's HTTP API (over a unix socket or TCP).

Everything the exec server answers is untrusted: model-written code shares its sandbox and may
have replaced it. Replies are read raw (no decompression) up to a cap computed from the request,
within one overall deadline, and validated against pydantic shapes; anything else is a
SandboxError that names the request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import ssl
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .backends.base import ExecEndpoint
from .errors import ExecServerError, SandboxError

# Slack on top of a command's own timeout for the HTTP round trip and the server's kill path.
_EXEC_HTTP_SLACK = 15.0
_FILE_HTTP_TIMEOUT = 60.0
KIB = 1024
MIB = 1024 * KIB
# JSON may spell one byte of text as six characters (\u001b); room for the other fields on top.
_JSON_EXPANSION = 6
_REPLY_OVERHEAD = 64 * KIB
# Replies without a size implied by the request (errors, health, writes) are small.
DEFAULT_REPLY_BYTES = 1 * MIB
# A listing names at most max_entries paths; real ones are short, a hostile one is cut off here.
MAX_LISTING_REPLY_BYTES = 16 * MIB


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
    encoding: Literal["utf-8", "base64"]
    size: Annotated[int, Field(ge=0)]
    truncated: bool = False
    total_lines: int | None = None


class WrittenFile(_Reply):
    path: str
    size: int


class DirEntry(_Reply):
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: Annotated[int, Field(ge=0)]


class Listing(_Reply):
    path: str
    entries: list[DirEntry]
    truncated: bool = False


@dataclass(frozen=True)
class FileBytes:
    """A file's bytes as read: at most what was asked for, `size` as the server reported it."""

    data: bytes
    truncated: bool
    size: int


R = TypeVar("R", bound=_Reply)
# What the exec server returns for a text read without max_bytes (its own default).
DEFAULT_TEXT_READ_BYTES = 1 * MIB


def _too_big(path: str, limit: int) -> str:
    return f"exec server sent more than {limit} bytes for {path}; refused"


def trusting_no_certificate() -> ssl.SSLContext:
    """A TLS context that trusts no certificate, for clients that speak plain HTTP: it stands in
    for httpx's default, whose loading of the system's CA bundle costs some 20 ms a client. A TLS
    connection made through it fails verification; it is never unchecked."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class ExecClient:
    """One connection pool to one exec server; every call raises SandboxError subclasses only."""

    def __init__(self, endpoint: ExecEndpoint) -> None:
        self.endpoint = endpoint
        plain = trusting_no_certificate()
        transport = (
            httpx.AsyncHTTPTransport(uds=endpoint.uds, verify=plain) if endpoint.uds else None
        )
        self._http = httpx.AsyncClient(
            base_url=endpoint.url,
            transport=transport,
            verify=plain,
            # Straight to the sandbox: never through a proxy named in the environment.
            trust_env=False,
            # The exec server never compresses; asking for nothing else keeps bombs out.
            headers={"Authorization": f"Bearer {endpoint.token}", "Accept-Encoding": "identity"},
            timeout=_FILE_HTTP_TIMEOUT,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> ExecClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _post(
        self,
        path: str,
        body: dict[str, Any],
        reply: type[R],
        timeout: float | None = None,
        max_reply_bytes: int = DEFAULT_REPLY_BYTES,
    ) -> R:
        timeout = timeout or _FILE_HTTP_TIMEOUT
        try:
            # One deadline for the whole exchange: httpx's timeouts are per read, so a server
            # that trickles its reply a byte at a time would otherwise hold us forever.
            async with asyncio.timeout(timeout):
                status, raw = await self._exchange(path, body, timeout, max_reply_bytes)
        except TimeoutError:
            raise SandboxError(f"exec server did not answer {path} within {timeout:.0f}s") from None
        except httpx.HTTPError as exc:
            raise SandboxError(f"exec server unreachable for {path}: {exc!r}") from exc
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the stack
            raise SandboxError(f"exec server sent non-JSON for {path} (HTTP {status})") from None
        if status >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            err = err if isinstance(err, dict) else {}
            raise ExecServerError(
                str(err.get("code", "error"))[:100],
                str(err.get("message", "(no message)"))[:4000],
                status,
            )
        try:
            return reply.model_validate(data)
        except ValidationError as exc:
            raise SandboxError(
                f"exec server sent an unexpected reply for {path}: "
                f"{exc.error_count()} invalid field(s), first at "
                f"{'.'.join(map(str, exc.errors()[0]['loc'])) or '(top level)'}"
            ) from None

    async def _exchange(
        self, path: str, body: dict[str, Any], timeout: float, max_reply_bytes: int
    ) -> tuple[int, bytes]:
        """POST and read the raw reply body, refusing more than `max_reply_bytes`."""
        async with self._http.stream("POST", path, json=body, timeout=timeout) as resp:
            encoding = resp.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise SandboxError(
                    f"exec server sent a {encoding!r}-encoded reply for {path}; it never encodes"
                )
            declared = resp.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_reply_bytes:
                raise SandboxError(_too_big(path, max_reply_bytes))
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.aiter_raw():
                size += len(chunk)
                if size > max_reply_bytes:
                    raise SandboxError(_too_big(path, max_reply_bytes))
                chunks.append(chunk)
            return resp.status_code, b"".join(chunks)

    async def healthy(self) -> bool:
        try:
            # Streamed and never read: only the status line matters.
            async with asyncio.timeout(2), self._http.stream("GET", "/healthz", timeout=2) as resp:
                return resp.status_code == 200
        except (httpx.HTTPError, TimeoutError):
            return False

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not await self.healthy():
            if time.monotonic() > deadline:
                raise SandboxError(f"exec server never became ready ({timeout:.0f}s)")
            await asyncio.sleep(0.05)

    async def exec(self, command: str, timeout: float, max_output_bytes: int = 32768) -> ExecResult:
        body = {"command": command, "timeout": timeout, "max_output_bytes": max_output_bytes}
        # stdout and stderr, each within max_output_bytes (plus the truncation marker).
        cap = 2 * _JSON_EXPANSION * max_output_bytes + _REPLY_OVERHEAD
        return await self._post(
            "/exec", body, ExecResult, timeout=timeout + _EXEC_HTTP_SLACK, max_reply_bytes=cap
        )

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
        cap = _JSON_EXPANSION * (max_bytes or DEFAULT_TEXT_READ_BYTES) + _REPLY_OVERHEAD
        return await self._post("/files/read", body, FileContent, max_reply_bytes=cap)

    async def read_bytes(self, path: str, max_bytes: int) -> FileBytes:
        """At most `max_bytes` of a file; `truncated` when it holds more."""
        body = {"path": path, "encoding": "base64", "max_bytes": max_bytes}
        cap = (max_bytes + 2) // 3 * 4 + _REPLY_OVERHEAD
        reply = await self._post("/files/read", body, FileContent, max_reply_bytes=cap)
        try:
            data = base64.b64decode(reply.content, validate=True)
        except (binascii.Error, ValueError):
            raise SandboxError(f"exec server sent invalid base64 for {path!r}") from None
        if len(data) > max_bytes:
            raise SandboxError(
                f"exec server sent {len(data)} bytes of {path!r}, more than the {max_bytes} asked for"
            )
        return FileBytes(data=data, truncated=reply.truncated, size=reply.size)

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
        listing = await self._post(
            "/files/list", body, Listing, max_reply_bytes=MAX_LISTING_REPLY_BYTES
        )
        if len(listing.entries) > max_entries:
            raise SandboxError(
                f"exec server listed {len(listing.entries)} entries of {path!r}, "
                f"more than the {max_entries} asked for"
            )
        return listing

    async def shutdown(self) -> None:
        try:
            async with (
                asyncio.timeout(5),
                self._http.stream("POST", "/shutdown", json={}, timeout=5),
            ):
                pass
        except (httpx.HTTPError, TimeoutError):
            # Already gone (or not answering) is what shutdown wants.
            return
