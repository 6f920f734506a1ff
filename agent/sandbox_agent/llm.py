"""Chat completions from an OpenAI-compatible endpoint, with bounded, jittered retries."""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import os
import random
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from . import __version__
from .errors import ContextLengthError, DeadlineError, EndpointUnreachableError, LLMError
from .events import EventSink, LLMRetrying, Notice
from .execclient import trusting_no_certificate
from .protocols import Completion, ToolCallRequest


@functools.cache
def verified_context() -> ssl.SSLContext:
    """The one TLS context that verifies https endpoints, as httpx's default does (SSL_CERT_FILE,
    SSL_CERT_DIR, else certifi's bundle), made once per process: loading the bundle costs some
    60 ms of CPU, which a batch of thousands of runs would pay per run."""
    import certifi

    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    return ssl.create_default_context(cafile=certifi.where())


_BACKOFF_BASE = 1.0
_BACKOFF_CAP = 60.0
# A server asking for a longer pause than this is treated as down rather than waited for.
_RETRY_AFTER_CAP = 600.0
_RETRYABLE_STATUS = {408, 409, 429}
# Server errors that asking again will not change: no such method here, or no such HTTP version.
_LASTING_SERVER_ERRORS = {501, 505}
# "Bearer <credential>" in text an endpoint echoed back.
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
# The endpoint check (GET /models before the first chat call) waits at most this long...
_CHECK_TIMEOUT = 10.0
# ...and asks again this many times, this far apart, when the connection is refused: a server
# that is just binding its port gets a moment; a wrong port is reported within seconds.
_REFUSED_PAUSES = (0.5, 1.0)
# A reply larger than this is not a chat completion; error texts are kept to this many characters.
_MAX_REPLY_BYTES = 64 * 1024 * 1024
_MAX_ERROR_CHARS = 2000


def _retry_after(headers: httpx.Headers) -> float | None:
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class _Refusal:
    """An HTTP error reply: its status, and what its body says (OpenAI's {"error": {...}}, vLLM's
    and llama.cpp's shapes, or plain text)."""

    status: int
    message: str
    code: str | None

    @classmethod
    def of(cls, status: int, body: bytes) -> _Refusal:
        text = body.decode("utf-8", "replace").strip()
        message, code = text[:_MAX_ERROR_CHARS], None
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            inner = data.get("error", data)
            if isinstance(inner, dict):
                found = inner.get("message", inner.get("detail"))
                if isinstance(found, str):
                    message = found[:_MAX_ERROR_CHARS]
                code = str(inner["code"]) if inner.get("code") is not None else None
            elif isinstance(inner, str):
                message = inner[:_MAX_ERROR_CHARS]
        return cls(status, message or f"HTTP {status}", code)

    @property
    def context_length(self) -> bool:
        if self.code == "context_length_exceeded":
            return True
        text = self.message.lower()
        return "context length" in text or "context_length" in text or "too many tokens" in text


def _estimate_tokens(messages: list[dict[str, Any]]) -> int:
    return len(json.dumps(messages, ensure_ascii=False)) // 4 + 1


class ChatLLM:
    """One model at one endpoint, spoken to over HTTP as the OpenAI chat-completions API is.
    `complete` returns a Completion or raises an LLMError subclass.

    The wire format is a JSON POST and a JSON reply; this client is its own (on httpx) rather
    than the openai package, whose import alone costs about 0.4 s of CPU, most of the start of
    a local run, and whose exceptions wrap the transport's in ways that change between releases.
    The tests hold the scripted server to the official client (tests/test_llmserver.py) and this
    client to the scripted server."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str,
        *,
        request_timeout: float,
        max_retries: int,
        on_event: EventSink,
        backoff_base: float = _BACKOFF_BASE,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self._on_event = on_event
        self._sleep = sleep
        self.backoff_base = backoff_base
        # Every retry this client made, whether the call then succeeded or not (usage.llmRetries).
        self.retries = 0
        # Every 429 (Too Many Requests) the endpoint answered (usage.llmThrottled): what the
        # operator's adaptive admission learns an endpoint's capacity from.
        self.throttled = 0
        self._api_key = api_key
        self._checked = False
        root = base_url.rstrip("/")
        self._chat_url = f"{root}/chat/completions"
        self._models_url = f"{root}/models"
        # Proxies from the environment (HTTPS_PROXY, NO_PROXY) apply, as they do for curl.
        self._http = httpx.AsyncClient(
            headers={
                "Authorization": f"Bearer {api_key}",
                "Accept": "application/json",
                "User-Agent": f"llm-sandbox-agent/{__version__}",
            },
            timeout=request_timeout,
            trust_env=True,
            # https:// is verified against the CA bundle; plain http:// needs none.
            verify=verified_context()
            if root.lower().startswith("https://")
            else trusting_no_certificate(),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def _redact(self, text: str) -> str:
        """Error text with the API key cut out: an endpoint may echo request headers in a body."""
        key = self._api_key
        if len(key) >= 8:
            text = text.replace(key, "[redacted]")
        return _BEARER.sub(r"\1[redacted]", text)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(_BACKOFF_CAP, self.backoff_base * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - retry jitter, not a secret

    async def complete(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None,
        max_tokens: int,
        temperature: float | None,
        top_p: float | None,
        deadline: float,
        stop: list[str] | None = None,
    ) -> Completion:
        """One completion; LLMError messages never carry the API key."""
        kwargs = self._request_args(messages, tools, max_tokens, temperature, top_p)
        if stop:
            kwargs["stop"] = stop
        try:
            if not self._checked:
                self._checked = True
                await self._check_endpoint(deadline)
            return await self._complete(kwargs, deadline)
        except LLMError as exc:
            text = str(exc)
            clean = self._redact(text)
            if clean == text:
                raise
            raise type(exc)(clean) from None

    async def _send(self, method: str, url: str, timeout: float, body: bytes | None) -> _Reply:
        """One request, its reply read to at most _MAX_REPLY_BYTES; transport errors as httpx
        raises them, a URL httpx cannot use as EndpointUnreachableError."""
        headers = {"Content-Type": "application/json"} if body is not None else None
        try:
            request = self._http.build_request(
                method, url, content=body, headers=headers, timeout=timeout
            )
            response = await self._http.send(request, stream=True)
        except httpx.InvalidURL as exc:
            raise EndpointUnreachableError(f"{self.base_url} is not a valid URL: {exc}") from None
        try:
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > _MAX_REPLY_BYTES:
                    raise _UnusableReplyError(
                        f"the reply is larger than {_MAX_REPLY_BYTES // (1024 * 1024)} MiB"
                    )
        finally:
            await response.aclose()
        return _Reply(response.status_code, bytes(data), response.headers)

    async def _complete(  # noqa: C901 - one retry loop over the ways a call fails
        self, kwargs: dict[str, Any], deadline: float
    ) -> Completion:
        """The chat call with `kwargs` (`_request_args`), retried until `deadline`."""
        messages: list[dict[str, Any]] = kwargs["messages"]
        body = json.dumps(kwargs, ensure_ascii=False).encode("utf-8")
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineError("the task deadline passed while waiting for the model")
            started = time.monotonic()
            delay: float | None = None
            try:
                reply = await self._send(
                    "POST", self._chat_url, min(self.request_timeout, remaining), body
                )
                if reply.status == 429:
                    self.throttled += 1
                if reply.status >= 400:
                    refusal = _Refusal.of(reply.status, reply.body)
                    if reply.status == 400 and refusal.context_length:
                        raise ContextLengthError(refusal.message)
                    if not _worth_retrying(reply.status):
                        raise LLMError(self._describe_refusal(refusal))
                    reason = f"HTTP {reply.status} from {self.base_url}"
                    delay = _retry_after(reply.headers)
                else:
                    data = _json_object(reply.body)
                    if data is None and not reply.says_json:
                        # A proxy, a login page, a web UI on the wrong port: asking again will
                        # not change it.
                        raise LLMError(self._not_an_api(reply.body))
                    if data is None:
                        raise _UnusableReplyError("the JSON body does not parse (cut short?)")
                    seconds = time.monotonic() - started
                    return self._completion(data, messages, seconds, attempt)
            except httpx.TimeoutException:
                if deadline - time.monotonic() <= 0:
                    raise DeadlineError(
                        "the task deadline passed while waiting for the model"
                    ) from None
                reason = f"no reply from {self.base_url} within {self.request_timeout:.0f}s"
            except httpx.TransportError as exc:
                reason = f"cannot reach {self.base_url}: {_cause(exc)}"
                if attempt >= self.max_retries:
                    raise EndpointUnreachableError(
                        f"giving up after {attempt + 1} attempts: {reason}"
                    ) from None
            except _UnusableReplyError as exc:
                reason = f"malformed reply from {self.base_url}: {exc}"
            if attempt >= self.max_retries:
                raise LLMError(f"giving up after {attempt + 1} attempts: {reason}")
            wait = min(delay, _RETRY_AFTER_CAP) if delay is not None else self._backoff(attempt)
            if time.monotonic() + wait >= deadline:
                raise DeadlineError(
                    f"the task deadline would pass before the next retry ({reason})"
                )
            attempt += 1
            self.retries += 1
            self._on_event(
                LLMRetrying(attempt=attempt, delay_seconds=wait, reason=self._redact(reason))
            )
            await self._sleep(wait)

    async def _check_endpoint(self, deadline: float) -> None:
        """Ask the endpoint for its models once, before the first chat call, so that an endpoint
        that cannot work (nothing listening, a host that does not resolve, not HTTP, a refused
        key, a web page) ends the run within seconds instead of after every retry. What the
        check cannot tell (no /models route, a 429 or 5xx, a timeout) is left to the chat call
        and its retries."""
        pauses = iter(_REFUSED_PAUSES)
        while True:
            timeout = min(_CHECK_TIMEOUT, self.request_timeout, deadline - time.monotonic())
            if timeout <= 0:
                return
            try:
                reply = await self._send("GET", self._models_url, timeout, None)
            except (httpx.TimeoutException, _UnusableReplyError):
                return
            except httpx.TransportError as exc:
                problem = _connection_problem(exc, self.base_url)
                if problem is None:
                    return  # a reset or the like: the chat call's retries deal with it
                refused, message = problem
                pause = next(pauses, None) if refused else None
                if pause is None or time.monotonic() + pause >= deadline:
                    raise EndpointUnreachableError(message) from None
                await self._sleep(pause)
                continue
            if reply.status in (401, 403):
                refusal = _Refusal.of(reply.status, reply.body)
                raise LLMError(self._describe_refusal(refusal))
            if reply.status < 400:
                self._check_models(reply.body)
            return

    def _check_models(self, body: bytes) -> None:
        """The /models reply: not JSON is not an OpenAI-compatible endpoint; a list without our
        model is worth a notice (some servers list only some of the names they accept)."""
        listing = _json_object(body)
        if listing is None:
            raise LLMError(self._not_an_api(body))
        data = listing.get("data")
        if not isinstance(data, list):
            return
        served = [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]
        if served and self.model not in served:
            shown = ", ".join(repr(name[:80]) for name in served[:5])
            more = f" and {len(served) - 5} more" if len(served) > 5 else ""
            self._on_event(
                Notice(
                    self._redact(
                        f"{self.base_url} lists the models {shown}{more}, not "
                        f"{self.model!r}; the first call will tell whether it serves it"
                    )
                )
            )

    def _request_args(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        max_tokens: int,
        temperature: float | None,
        top_p: float | None,
    ) -> dict[str, Any]:
        """The chat-completion arguments; unset sampling parameters are left to the server."""
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
        }
        if tools:
            kwargs["tools"] = tools
        if temperature is not None:
            kwargs["temperature"] = temperature
        if top_p is not None:
            kwargs["top_p"] = top_p
        return kwargs

    def _not_an_api(self, body: bytes) -> str:
        head = body[:512].decode("utf-8", "replace").lstrip().lower()
        kind = "text/html" if head.startswith(("<!doctype html", "<html")) else "a non-JSON body"
        return (
            f"the endpoint at {self.base_url} answered {kind}, not an OpenAI-compatible JSON "
            "response: check the base URL (it usually ends in /v1) and that it is the "
            "inference server, not a proxy or web page"
        )

    def _describe_refusal(self, refusal: _Refusal) -> str:
        status = refusal.status
        if status in (401, 403):
            return (
                f"the endpoint {self.base_url} refused the API key (HTTP {status}): "
                "check OPENAI_API_KEY (sandboxctl run) or, on a cluster, the Secret named by "
                "spec.model.apiKeySecretRef (or the operator's default key)"
            )
        if status == 404:
            return (
                f"HTTP 404 from {self.base_url}: is the base URL right (it usually ends in /v1) "
                f"and does the endpoint serve model {self.model!r}? ({refusal.message})"
            )
        if status == 501:
            return (
                f"HTTP 501 from {self.base_url}: the server there does not implement the chat "
                "completions API (a plain web server?): check the base URL"
            )
        return f"HTTP {status} from {self.base_url}: {refusal.message}"

    def _completion(
        self, data: dict[str, Any], messages: list[dict[str, Any]], seconds: float, retries: int
    ) -> Completion:
        """The reply read leniently, as servers send it (fields missing or null, arguments as an
        object); a reply with no choice to read is worth asking again."""
        choices = data.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            raise _UnusableReplyError("the endpoint replied with no choices")
        msg = choice.get("message")
        msg = msg if isinstance(msg, dict) else {}
        content = msg.get("content")
        content = content if isinstance(content, str) else ""
        calls = _tool_calls(msg.get("tool_calls"))
        usage = data.get("usage")
        prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if isinstance(prompt_tokens, int) and isinstance(usage, dict):
            completion_tokens = usage.get("completion_tokens")
            prompt = prompt_tokens
            completion = completion_tokens if isinstance(completion_tokens, int) else 0
            reported = True
        else:
            # Some servers omit usage; an estimate keeps the token budget enforceable.
            prompt = _estimate_tokens(messages)
            completion = len(content + "".join(c.arguments for c in calls)) // 4 + 1
            reported = False
        raw: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            raw["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in calls
            ]
        finish = choice.get("finish_reason")
        return Completion(
            content=content,
            tool_calls=calls,
            finish_reason=finish if isinstance(finish, str) else "",
            prompt_tokens=prompt,
            completion_tokens=completion,
            usage_reported=reported,
            seconds=seconds,
            retries=retries,
            raw_message=raw,
        )


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    headers: httpx.Headers

    @property
    def says_json(self) -> bool:
        """The reply's Content-Type is JSON: a body that then does not parse was cut short or
        garbled on the way, which asking again may mend."""
        kind = str(self.headers.get("content-type", "")).split(";")[0].strip().lower()
        return kind == "application/json" or kind.endswith("+json")


def _worth_retrying(status: int) -> bool:
    return status in _RETRYABLE_STATUS or (status >= 500 and status not in _LASTING_SERVER_ERRORS)


def _json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it is not one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _tool_calls(raw: object) -> list[ToolCallRequest]:
    """The function calls of a reply's message; entries without a function are skipped."""
    if not isinstance(raw, list):
        return []
    calls = []
    for i, entry in enumerate(raw):
        function = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(function, dict):
            continue
        call_id, name, arguments = entry.get("id"), function.get("name"), function.get("arguments")
        if isinstance(arguments, dict | list):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(
            ToolCallRequest(
                id=call_id if isinstance(call_id, str) and call_id else f"call_{i}",
                name=name if isinstance(name, str) else "",
                arguments=arguments if isinstance(arguments, str) else "",
            )
        )
    return calls


class _UnusableReplyError(Exception):
    """A 200 reply that is unusable (e.g. no choices); worth asking again."""


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from, outermost first."""
    found: list[BaseException] = []
    inner: BaseException | None = exc
    while inner is not None and inner not in found:
        found.append(inner)
        inner = inner.__cause__ or inner.__context__
    return found


def _cause(exc: BaseException) -> str:
    """The innermost reason a connection failed, as "Type: text"."""
    inner = _chain(exc)[-1]
    return f"{type(inner).__name__}: {inner}" if inner is not exc else str(exc)


def _connection_problem(exc: BaseException, base_url: str) -> tuple[bool, str] | None:
    """(refused?, message) when a failed connection shows the endpoint cannot work as given;
    None for failures worth retrying. Told by the exceptions the transport error was raised
    from."""
    for inner in _chain(exc):
        if isinstance(inner, ConnectionRefusedError):
            return True, (
                f"nothing is listening at {base_url} (connection refused): check the host and "
                "port of the base URL and that the inference server is running"
            )
        if isinstance(inner, socket.gaierror):
            return False, (
                f"the host of {base_url} could not be resolved ({inner.strerror or inner}): "
                "check the base URL"
            )
        if isinstance(inner, ssl.SSLError):
            return False, (
                f"TLS with {base_url} failed ({inner.reason or inner}): check http:// against "
                "https:// in the base URL, and the server's certificate"
            )
        if isinstance(inner, httpx.UnsupportedProtocol):
            return False, f"{base_url} is not an http:// or https:// URL: check the base URL"
    return None
