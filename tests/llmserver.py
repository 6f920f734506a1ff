"""A scripted OpenAI-compatible chat-completions HTTP server for tests: each test queues replies
(tool calls, text, HTTP errors, broken responses) that the real ``openai`` client receives."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import pytest

__all__ = [
    "MODEL_ID",
    "RecordedRequest",
    "Reply",
    "ReplyFn",
    "ScriptedLLMServer",
    "context_length_error",
    "echo_request_headers",
    "empty_choices",
    "error",
    "hermes_tool_call",
    "html_page",
    "llm_server",
    "malformed_json",
    "reset_connection",
    "slow",
    "text",
    "tool_call",
    "tool_calls",
    "xml_tool_call",
]

MODEL_ID = "scripted-model"
CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"

JSONDict = dict[str, Any]


@dataclass(frozen=True)
class Reply:
    """One scripted answer. Build it with the module-level helpers rather than by hand."""

    message: JSONDict | None = None  # assistant message of a 200 chat completion
    finish_reason: str = "stop"
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None  # sent verbatim instead of a chat completion
    content_type: str = "application/json"
    delay: float = 0.0  # seconds to wait before answering
    usage: tuple[int, int] | None = None  # (prompt_tokens, completion_tokens); None -> estimate
    no_choices: bool = False  # 200 with "choices": []
    reset: bool = False  # drop the connection without answering
    echo_headers: bool = False  # an error whose body quotes the request's headers back


ReplyFn = Callable[[JSONDict], Reply]
"""A dynamic reply: gets the request JSON (``{}`` if it was not JSON) and returns a Reply."""


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case keys
    json: JSONDict | None  # parsed body, None when absent or not a JSON object
    body: bytes


# --------------------------------------------------------------------------- reply builders


def _args_json(arguments: Mapping[str, Any] | str) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(dict(arguments))


def tool_call(
    name: str,
    arguments: Mapping[str, Any] | str,
    *,
    id: str | None = None,
    content: str | None = None,
    usage: tuple[int, int] | None = None,
) -> Reply:
    """An assistant message with one native tool call; a str ``arguments`` is sent verbatim."""
    return tool_calls(
        [(name, arguments)], ids=None if id is None else [id], content=content, usage=usage
    )


def tool_calls(
    calls: Sequence[tuple[str, Mapping[str, Any] | str]],
    *,
    ids: Sequence[str] | None = None,
    content: str | None = None,
    usage: tuple[int, int] | None = None,
) -> Reply:
    """An assistant message with several native tool calls (ids default to ``call_<n>``)."""
    if ids is not None and len(ids) != len(calls):
        raise ValueError("tool_calls: ids and calls differ in length")
    native = [
        {
            "id": ids[i] if ids is not None else f"call_{i}",
            "type": "function",
            "function": {"name": name, "arguments": _args_json(arguments)},
        }
        for i, (name, arguments) in enumerate(calls)
    ]
    message = {"role": "assistant", "content": content, "tool_calls": native}
    return Reply(message=message, finish_reason="tool_calls", usage=usage)


def text(
    content: str, finish_reason: str = "stop", *, usage: tuple[int, int] | None = None
) -> Reply:
    """A plain assistant message."""
    message = {"role": "assistant", "content": content}
    return Reply(message=message, finish_reason=finish_reason, usage=usage)


def hermes_tool_call(
    name: str,
    arguments: Mapping[str, Any],
    *,
    before: str = "",
    usage: tuple[int, int] | None = None,
) -> Reply:
    """A Hermes-style tool call written into the content, with no native tool calls."""
    payload = json.dumps({"name": name, "arguments": dict(arguments)})
    return text(f"{before}<tool_call>\n{payload}\n</tool_call>", usage=usage)


def xml_tool_call(
    name: str,
    arguments: Mapping[str, str],
    *,
    before: str = "",
    usage: tuple[int, int] | None = None,
) -> Reply:
    """A Qwen3-Coder-style XML tool call written into the content, with no native tool calls."""
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in arguments.items())
    content = f"{before}<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"
    return text(content, usage=usage)


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error(
    status: int,
    *,
    message: str | None = None,
    error_type: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
    body: bytes | str | JSONDict | None = None,
) -> Reply:
    """An HTTP error with an OpenAI-style JSON body, or ``body`` verbatim when given."""
    if body is None:
        body = {
            "error": {
                "message": message or f"scripted LLM server: HTTP {status}",
                "type": error_type or _ERROR_TYPES.get(status, "server_error"),
                "param": None,
                "code": code,
            }
        }
    raw = json.dumps(body).encode() if isinstance(body, dict) else _to_bytes(body)
    return Reply(status=status, headers=dict(headers or {}), body=raw)


def context_length_error(limit: int = 8192, requested: int | None = None) -> Reply:
    """HTTP 400 as vLLM/OpenAI send it when the prompt exceeds the context window."""
    requested = requested if requested is not None else limit + 1000
    message = (
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{requested} tokens ({requested - 256} in the messages, 256 in the completion). "
        "Please reduce the length of the messages or completion."
    )
    body = {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    return error(400, body=body)


def slow(seconds: float, reply: Reply) -> Reply:
    """``reply``, sent after waiting ``seconds`` (the client may give up meanwhile)."""
    return dataclasses.replace(reply, delay=reply.delay + seconds)


def malformed_json(body: bytes | str = b'{"id": "chatcmpl-broken", "choices": [') -> Reply:
    """HTTP 200, Content-Type application/json, with a body that is not JSON."""
    return Reply(body=_to_bytes(body))


def html_page(title: str = "Sign in") -> Reply:
    """HTTP 200 with an HTML page (a proxy's login page, a web UI on the wrong port)."""
    page = f"<!DOCTYPE html><html><head><title>{title}</title></head><body>{title}</body></html>"
    return Reply(body=page.encode(), content_type="text/html; charset=utf-8")


def empty_choices(*, usage: tuple[int, int] | None = None) -> Reply:
    """HTTP 200 with a well-formed completion whose ``choices`` is empty."""
    return Reply(no_choices=True, usage=usage)


def echo_request_headers(status: int) -> Reply:
    """HTTP ``status`` whose error message quotes every request header, Authorization included
    (as some proxies and debug endpoints do)."""
    return Reply(status=status, echo_headers=True)


def reset_connection() -> Reply:
    """Drop the connection (TCP RST) without sending any response."""
    return Reply(reset=True)


def _to_bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


def _error_body(status: int, message: str) -> bytes:
    return error(status, message=message).body or b""


# --------------------------------------------------------------------------- server


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog is 5: 32 clients connecting at once overflowed it, and each
    # dropped SYN cost its client a 1 s retransmit (an inference server's backlog is thousands).
    request_queue_size = 1024
    owner: ScriptedLLMServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    timeout = 30  # idle keep-alive connections are closed after this

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes; without this, Nagle's algorithm plus the
        # client's delayed ACK adds ~40 ms to every response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.owner._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        try:
            self._serve()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            self.close_connection = True  # the client gave up; nothing more to do

    def _serve(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        body_json = parsed if isinstance(parsed, dict) else None
        path = self.path.split("?", 1)[0].rstrip("/")
        owner._record(
            RecordedRequest(
                method=self.command,
                path=path,
                headers={k.lower(): v for k, v in self.headers.items()},
                json=body_json,
                body=raw,
            )
        )
        if self.command == "GET" and path == MODELS_PATH:
            self._models(owner.models_reply)
        elif self.command == "POST" and path == CHAT_PATH:
            self._chat(body_json or {})
        else:
            self._send(
                404, _error_body(404, f"scripted LLM server: no route {self.command} {path}")
            )

    def _models(self, reply: Reply | None) -> None:
        if reply is None:
            models = {
                "object": "list",
                "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "tests"}],
            }
            self._send(200, json.dumps(models).encode())
        elif reply.body is not None:
            self._send(reply.status, reply.body, reply.headers, reply.content_type)
        else:
            self._send(reply.status, _error_body(reply.status, "scripted /models reply"))

    def _chat(self, request: JSONDict) -> None:
        owner = self.server.owner
        busy = owner._admit()
        if busy is not None:
            self._send(busy.status, busy.body or b"", busy.headers)
            return
        try:
            self._answer(owner, request)
        finally:
            owner._done()

    def _answer(self, owner: ScriptedLLMServer, request: JSONDict) -> None:
        number, reply = owner._next_reply(request)
        if reply is None:
            msg = f"scripted LLM server: script exhausted at request {number}"
            self._send(500, _error_body(500, msg))
            return
        if not owner._sleep(reply.delay):
            self.close_connection = True  # server stopping
            return
        if reply.reset:
            # SO_LINGER with a zero timeout makes the close an abortive one (RST).
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if reply.echo_headers:
            quoted = "; ".join(f"{k}: {v}" for k, v in self.headers.items())
            self._send(reply.status, _error_body(reply.status, f"request headers: {quoted}"))
            return
        if reply.body is not None:
            self._send(reply.status, reply.body, reply.headers, reply.content_type)
            return
        completion = _completion(number, request, reply)
        self._send(reply.status, json.dumps(completion).encode(), reply.headers)

    def _send(
        self,
        status: int,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


def _completion(number: int, request: JSONDict, reply: Reply) -> JSONDict:
    message = reply.message or {"role": "assistant", "content": ""}
    if reply.usage is not None:
        prompt_tokens, completion_tokens = reply.usage
    else:
        prompt_tokens = len(json.dumps(request.get("messages", []))) // 4
        produced = message.get("content") or ""
        for call in message.get("tool_calls") or []:
            produced += call["function"]["arguments"]
        completion_tokens = len(produced) // 4 + 1
    choices = (
        []
        if reply.no_choices
        else [{"index": 0, "message": message, "finish_reason": reply.finish_reason}]
    )
    return {
        "id": f"chatcmpl-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model") or MODEL_ID,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class ScriptedLLMServer:
    """OpenAI-compatible server on 127.0.0.1; ``POST /v1/chat/completions`` consumes the script.

    Each chat request takes the next scripted reply (FIFO); once the script is empty the default
    reply is used, and with no default the request fails with HTTP 500 "script exhausted".
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[Reply | ReplyFn] = deque()
        self._default: Reply | ReplyFn | None = None
        self._requests: list[RecordedRequest] = []
        self._chat_count = 0
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""
        # What GET /v1/models answers (a body or a status); None: a list naming MODEL_ID.
        self.models_reply: Reply | None = None
        # An endpoint at capacity (`throttle`): chat requests beyond `_capacity` in flight are
        # answered 429 at once; how many were, and the most in flight at any time.
        self._capacity: int | None = None
        self._retry_after_ms = 0
        self._in_flight = 0
        self.throttled = 0
        self.peak_in_flight = 0

    # lifecycle -------------------------------------------------------------------------

    def start(self) -> ScriptedLLMServer:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="scripted-llm-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()  # wakes slow replies
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # unblock handlers idling on keep-alive connections
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ScriptedLLMServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # scripting -------------------------------------------------------------------------

    def script(self, *replies: Reply | ReplyFn) -> None:
        """Append replies to the queue; each chat-completions request consumes one."""
        with self._lock:
            self._queue.extend(replies)

    def set_default(self, reply: Reply | ReplyFn | None) -> None:
        """The reply used when the queue is empty (None: HTTP 500 "script exhausted")."""
        with self._lock:
            self._default = reply

    def throttle(self, capacity: int | None, retry_after_ms: int = 0) -> None:
        """Serve at most `capacity` chat requests at once; each one beyond is answered 429
        (with `retry-after-ms` when given) without being counted as a scripted request, as a
        busy inference server does. None: no limit."""
        with self._lock:
            self._capacity = capacity
            self._retry_after_ms = retry_after_ms

    def _admit(self) -> Reply | None:
        """A 429 for a chat request beyond the capacity, else None (and it is in flight)."""
        with self._lock:
            if self._capacity is not None and self._in_flight >= self._capacity:
                self.throttled += 1
                headers = (
                    {"retry-after-ms": str(self._retry_after_ms)} if self._retry_after_ms else {}
                )
                return error(429, message="scripted LLM server: at capacity", headers=headers)
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
            return None

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1

    @property
    def pending(self) -> int:
        """Scripted replies not consumed yet."""
        with self._lock:
            return len(self._queue)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """Only the ``POST /v1/chat/completions`` requests."""
        return [r for r in self.requests if r.method == "POST" and r.path == CHAT_PATH]

    # used by the handler ---------------------------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _next_reply(self, request: JSONDict) -> tuple[int, Reply | None]:
        with self._lock:
            self._chat_count += 1
            number = self._chat_count
            source = self._queue.popleft() if self._queue else self._default
        if source is None or isinstance(source, Reply):
            return number, source
        try:
            reply = source(request)
        except Exception as exc:  # surface a broken callback to the test as an HTTP 500
            msg = f"scripted LLM server: reply callback failed at request {number}: {exc!r}"
            return number, error(500, message=msg)
        if not isinstance(reply, Reply):
            msg = f"scripted LLM server: reply callback returned {type(reply).__name__}"
            return number, error(500, message=msg)
        return number, reply

    def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; False if the server is stopping."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._stopping.wait(min(left, 0.05)):
                return False
        return not self._stopping.is_set()


@pytest.fixture
def llm_server() -> Iterator[ScriptedLLMServer]:
    """A started ScriptedLLMServer, stopped after the test."""
    with ScriptedLLMServer() as server:
        yield server
