"""Chat completions through the official async OpenAI client, with bounded, jittered retries."""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import openai
from openai.types.chat import ChatCompletion

from .errors import LLMError
from .events import EventSink, LLMRetrying, Notice

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
# Statuses of GET /models that say nothing about the chat route: the first chat call decides.
_NO_MODELS_ROUTE = {404, 405, 501}


class ContextLengthError(LLMError):
    """The request did not fit the model's context window."""


class EndpointUnreachableError(LLMError):
    """Every attempt failed to connect to the endpoint (DNS, refused, reset, TLS)."""


class DeadlineError(LLMError):
    """The task's wall-clock deadline passed while waiting for the endpoint."""


@dataclass(frozen=True)
class ToolCallRequest:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Completion:
    content: str
    tool_calls: list[ToolCallRequest]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    usage_reported: bool
    seconds: float
    retries: int
    raw_message: dict[str, Any] = field(default_factory=dict)


def _retry_after(exc: openai.APIStatusError) -> float | None:
    headers = exc.response.headers
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


def _is_context_length(exc: openai.APIStatusError) -> bool:
    if getattr(exc, "code", None) == "context_length_exceeded":
        return True
    text = str(exc).lower()
    return "context length" in text or "context_length" in text or "too many tokens" in text


def _estimate_tokens(messages: list[dict[str, Any]]) -> int:
    return len(json.dumps(messages, ensure_ascii=False)) // 4 + 1


class ChatLLM:
    """One model at one endpoint. `complete` returns a Completion or raises an LLMError subclass."""

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
        self._api_key = api_key
        self._checked = False
        # Our own retry loop decides; the client's built-in retries would hide them from events.
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, max_retries=0, timeout=request_timeout
        )

    async def aclose(self) -> None:
        await self._client.close()

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
    ) -> Completion:
        """One completion; LLMError messages never carry the API key."""
        kwargs = self._request_args(messages, tools, max_tokens, temperature, top_p)
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

    async def _complete(  # noqa: C901 - one retry loop over the error kinds the API returns
        self, kwargs: dict[str, Any], deadline: float
    ) -> Completion:
        """The chat call with `kwargs` (`_request_args`), retried until `deadline`."""
        messages: list[dict[str, Any]] = kwargs["messages"]
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineError("the task deadline passed while waiting for the model")
            started = time.monotonic()
            try:
                resp = await self._client.chat.completions.create(
                    **kwargs, timeout=min(self.request_timeout, remaining)
                )
                if not isinstance(resp, ChatCompletion):
                    # The client hands back the body as text when it is not JSON: a proxy, a
                    # login page, a web UI on the wrong port. Asking again will not change it.
                    raise LLMError(self._not_an_api(resp))
                if not resp.choices:
                    raise _UnusableReplyError("the endpoint replied with no choices")
                return self._completion(resp, messages, time.monotonic() - started, attempt)
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status == 400 and _is_context_length(exc):
                    raise ContextLengthError(str(exc.message)) from exc
                if status in _RETRYABLE_STATUS or (
                    status >= 500 and status not in _LASTING_SERVER_ERRORS
                ):
                    reason = f"HTTP {status} from {self.base_url}"
                    delay = _retry_after(exc)
                else:
                    raise LLMError(self._describe_status(exc)) from exc
            except openai.APITimeoutError:
                if deadline - time.monotonic() <= 0:
                    raise DeadlineError(
                        "the task deadline passed while waiting for the model"
                    ) from None
                reason = f"no reply from {self.base_url} within {self.request_timeout:.0f}s"
                delay = None
            except openai.APIConnectionError as exc:
                reason = f"cannot reach {self.base_url}: {_cause(exc)}"
                delay = None
                if attempt >= self.max_retries:
                    raise EndpointUnreachableError(
                        f"giving up after {attempt + 1} attempts: {reason}"
                    ) from None
            except (openai.APIResponseValidationError, _UnusableReplyError, ValueError) as exc:
                reason = f"malformed reply from {self.base_url}: {exc}"
                delay = None
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
                reply = await self._client.models.with_raw_response.list(timeout=timeout)
            except openai.APIStatusError as exc:
                if exc.status_code in (401, 403):
                    raise LLMError(self._describe_status(exc)) from None
                return
            except openai.APITimeoutError:
                return
            except openai.APIConnectionError as exc:
                problem = _connection_problem(exc, self.base_url)
                if problem is None:
                    return  # a reset or the like: the chat call's retries deal with it
                refused, message = problem
                pause = next(pauses, None) if refused else None
                if pause is None or time.monotonic() + pause >= deadline:
                    raise EndpointUnreachableError(message) from None
                await self._sleep(pause)
                continue
            self._check_models(reply.http_response.text)
            return

    def _check_models(self, body: str) -> None:
        """The /models reply: not JSON is not an OpenAI-compatible endpoint; a list without our
        model is worth a notice (some servers list only some of the names they accept)."""
        try:
            listing = json.loads(body)
        except ValueError:
            raise LLMError(self._not_an_api(body)) from None
        if not isinstance(listing, dict):
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

    def _not_an_api(self, body: object) -> str:
        text = body if isinstance(body, str) else ""
        head = text[:512].lstrip().lower()
        kind = "text/html" if head.startswith(("<!doctype html", "<html")) else "a non-JSON body"
        return (
            f"the endpoint at {self.base_url} answered {kind}, not an OpenAI-compatible JSON "
            "response: check the base URL (it usually ends in /v1) and that it is the "
            "inference server, not a proxy or web page"
        )

    def _describe_status(self, exc: openai.APIStatusError) -> str:
        status = exc.status_code
        if status in (401, 403):
            return (
                f"the endpoint {self.base_url} refused the API key (HTTP {status}): "
                "check OPENAI_API_KEY (sandboxctl run) or, on a cluster, the Secret named by "
                "spec.model.apiKeySecretRef (or the operator's default key)"
            )
        if status == 404:
            return (
                f"HTTP 404 from {self.base_url}: is the base URL right (it usually ends in /v1) "
                f"and does the endpoint serve model {self.model!r}? ({exc.message})"
            )
        if status == 501:
            return (
                f"HTTP 501 from {self.base_url}: the server there does not implement the chat "
                "completions API (a plain web server?): check the base URL"
            )
        return f"HTTP {status} from {self.base_url}: {exc.message}"

    def _completion(
        self, resp: Any, messages: list[dict[str, Any]], seconds: float, retries: int
    ) -> Completion:
        choice = resp.choices[0]
        msg = choice.message
        calls = [
            ToolCallRequest(
                id=tc.id or f"call_{i}",
                name=tc.function.name or "",
                arguments=tc.function.arguments or "",
            )
            for i, tc in enumerate(msg.tool_calls or [])
            if getattr(tc, "function", None) is not None
        ]
        content = msg.content or ""
        usage = resp.usage
        if usage is not None and usage.prompt_tokens is not None:
            prompt, completion, reported = usage.prompt_tokens, usage.completion_tokens or 0, True
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
        return Completion(
            content=content,
            tool_calls=calls,
            finish_reason=str(choice.finish_reason or ""),
            prompt_tokens=prompt,
            completion_tokens=completion,
            usage_reported=reported,
            seconds=seconds,
            retries=retries,
            raw_message=raw,
        )


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
    None for failures worth retrying. Told by the exceptions the HTTP library was raised from,
    by type, so that it does not matter which httpx the openai package brings."""
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
        if type(inner).__name__ == "UnsupportedProtocol":
            return False, f"{base_url} is not an http:// or https:// URL: check the base URL"
    return None
