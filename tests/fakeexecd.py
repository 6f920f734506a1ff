"""A fake exec server for tests: real HTTP/1.1 on a unix socket, answering whatever a test says.

It stands in for an exec server that model-written code has replaced, to show what the host
side does with replies no honest server sends (hostile paths, oversized or trickled bodies,
encodings, malformed JSON).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox_agent.backends.base import ExecEndpoint


@dataclass
class Reply:
    """One HTTP reply: a JSON body (or raw bytes), status and extra headers; `chunks` with a
    `delay` sends the body piece by piece."""

    body: Any = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    chunks: list[bytes] | None = None
    delay: float = 0.0

    def payload(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps(self.body).encode()


Handler = Callable[[dict[str, Any]], Reply | Awaitable[Reply]]


def listing(*paths: str, size: int = 1) -> Reply:
    entries = [{"path": p, "type": "file", "size": size} for p in paths]
    return Reply({"path": "/workspace/output", "entries": entries, "truncated": False})


def file_reply(data: bytes, *, size: int | None = None, truncated: bool = False) -> Reply:
    return Reply(
        {
            "path": "/workspace/output/x",
            "content": base64.b64encode(data).decode(),
            "encoding": "base64",
            "size": len(data) if size is None else size,
            "truncated": truncated,
        }
    )


class FakeExecServer:
    """Routes by request path to handlers; records every request body it received."""

    def __init__(self, socket_path: Path, routes: dict[str, Handler]) -> None:
        self.socket_path = socket_path
        self.routes = routes
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._server: asyncio.Server | None = None

    @property
    def endpoint(self) -> ExecEndpoint:
        return ExecEndpoint(token="fake", workspace="/workspace", uds=str(self.socket_path))

    async def __aenter__(self) -> FakeExecServer:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            _, target, _ = request_line.split(" ", 2)
            headers = {
                k.strip().lower(): v.strip()
                for k, v in (line.split(":", 1) for line in header_lines if ":" in line)
            }
            raw = await reader.readexactly(int(headers.get("content-length", "0")))
            body = json.loads(raw) if raw else {}
            self.requests.append((target, body))
            handler = self.routes.get(target)
            if handler is None:
                reply = Reply({"error": {"code": "not_found", "message": target}}, status=404)
            else:
                result = handler(body)
                reply = await result if isinstance(result, Awaitable) else result
            await self._write(writer, reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, reply: Reply) -> None:
        headers = {"Content-Type": "application/json", "Connection": "close", **reply.headers}
        if reply.chunks is None:
            headers.setdefault("Content-Length", str(len(reply.payload())))
        head = f"HTTP/1.1 {reply.status} X\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        writer.write(head.encode() + b"\r\n")
        if reply.chunks is None:
            writer.write(reply.payload())
            await writer.drain()
            return
        for piece in reply.chunks:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(reply.delay)


@contextlib.asynccontextmanager
async def fake_execd(tmp_path: Path, routes: dict[str, Handler]) -> AsyncIterator[FakeExecServer]:
    async with FakeExecServer(tmp_path / "fake-execd.sock", routes) as server:
        yield server


@contextlib.contextmanager
def fake_execd_thread(socket_path: Path, routes: dict[str, Handler]) -> Iterator[FakeExecServer]:
    """The fake server on its own event loop in a thread, for code under test in another process."""
    loop = asyncio.new_event_loop()
    server = FakeExecServer(socket_path, routes)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.__aenter__(), loop).result(timeout=10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.__aexit__(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
