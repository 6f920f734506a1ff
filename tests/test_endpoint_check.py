"""The endpoint check: before the first chat call the agent asks GET /models once, so that an
endpoint that cannot work ends the run at once with a message naming the URL and what to check,
while what the check cannot tell (a 429, a 5xx, no /models route) is left to the chat call and
its retries. Served by real sockets to the real openai client; waits are recorded, not timed."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import task_doc
from llmserver import ScriptedLLMServer, error, html_page, text, tool_call
from sandbox_agent.errors import EndpointUnreachableError, LLMError
from sandbox_agent.events import Event, Notice
from sandbox_agent.llm import ChatLLM
from sandbox_agent.result import ExitReason

SUBMIT = tool_call("submit", {"answer": "42"})


def unused_port() -> int:
    """A port nothing listens on (bound, read, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Client:
    """A ChatLLM whose pauses and events are recorded instead of waited for and shown."""

    def __init__(self, base_url: str, *, model: str = "scripted-model") -> None:
        self.pauses: list[float] = []
        self.events: list[Event] = []
        self.llm = ChatLLM(
            base_url,
            "test-key",
            model,
            request_timeout=5,
            max_retries=4,
            on_event=self.events.append,
            backoff_base=0.01,
            sleep=self._sleep,
        )

    async def _sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)

    def ask(self, times: int = 1) -> str:
        """Ask `times` times over one client; the last reply's text."""

        async def call() -> str:
            content = ""
            try:
                for _ in range(times):
                    reply = await self.llm.complete(
                        [{"role": "user", "content": "hi"}],
                        tools=None,
                        max_tokens=32,
                        temperature=None,
                        top_p=None,
                        deadline=time.monotonic() + 60,
                    )
                    content = reply.content
            finally:
                await self.llm.aclose()
            return content

        return asyncio.run(call())


def test_nothing_listening_is_reported_after_two_short_pauses_not_every_retry() -> None:
    url = f"http://127.0.0.1:{unused_port()}/v1"
    client = Client(url)
    with pytest.raises(EndpointUnreachableError) as caught:
        client.ask()
    assert str(caught.value) == (
        f"nothing is listening at {url} (connection refused): check the host and port of the "
        "base URL and that the inference server is running"
    )
    assert client.pauses == [0.5, 1.0]  # a server still binding its port gets a moment
    assert client.llm.retries == 0  # the chat call's backoff never started


def test_a_host_that_does_not_resolve_is_reported_at_once() -> None:
    client = Client("http://no-such-host.invalid/v1")
    with pytest.raises(EndpointUnreachableError) as caught:
        client.ask()
    message = str(caught.value)
    assert message.startswith("the host of http://no-such-host.invalid/v1 could not be resolved")
    assert message.endswith(": check the base URL")
    assert client.pauses == []


def test_a_url_that_is_not_http_is_reported_at_once() -> None:
    client = Client("ftp://example.org/v1")
    with pytest.raises(EndpointUnreachableError) as caught:
        client.ask()
    assert str(caught.value) == (
        "ftp://example.org/v1 is not an http:// or https:// URL: check the base URL"
    )
    assert client.pauses == []


def test_https_to_a_plain_http_server_is_a_tls_error_at_once(
    llm_server: ScriptedLLMServer,
) -> None:
    url = llm_server.base_url.replace("http://", "https://")
    client = Client(url)
    with pytest.raises(EndpointUnreachableError) as caught:
        client.ask()
    message = str(caught.value)
    assert message.startswith(f"TLS with {url} failed (")
    assert message.endswith(
        "check http:// against https:// in the base URL, and the server's certificate"
    )
    assert llm_server.chat_requests == []


def test_a_web_page_at_models_ends_before_any_chat_call(llm_server: ScriptedLLMServer) -> None:
    llm_server.models_reply = html_page()
    with pytest.raises(LLMError) as caught:
        Client(llm_server.base_url).ask()
    assert str(caught.value).startswith(
        f"the endpoint at {llm_server.base_url} answered text/html, not an OpenAI-compatible"
    )
    assert llm_server.chat_requests == []


def test_a_refused_key_at_models_ends_before_any_chat_call(llm_server: ScriptedLLMServer) -> None:
    llm_server.models_reply = error(401, message="bad key")
    with pytest.raises(LLMError) as caught:
        Client(llm_server.base_url).ask()
    assert "refused the API key (HTTP 401): check OPENAI_API_KEY" in str(caught.value)
    assert llm_server.chat_requests == []


@pytest.mark.parametrize("status", [404, 429, 500, 503])
def test_what_the_check_cannot_tell_is_left_to_the_chat_call(
    llm_server: ScriptedLLMServer, status: int
) -> None:
    llm_server.models_reply = error(status)
    llm_server.script(text("hello"))
    client = Client(llm_server.base_url)
    assert client.ask() == "hello"
    assert len(llm_server.chat_requests) == 1


def test_the_check_is_made_once_per_client(llm_server: ScriptedLLMServer) -> None:
    llm_server.script(text("one"), text("two"))
    assert Client(llm_server.base_url).ask(times=2) == "two"
    gets = [r for r in llm_server.requests if r.method == "GET"]
    assert [r.path for r in gets] == ["/v1/models"]
    assert len(llm_server.chat_requests) == 2


def test_a_model_the_endpoint_does_not_list_is_a_notice_not_a_failure(
    llm_server: ScriptedLLMServer,
) -> None:
    llm_server.script(text("fine"))
    client = Client(llm_server.base_url, model="other-model")
    assert client.ask() == "fine"
    assert client.events == [
        Notice(
            f"{llm_server.base_url} lists the models 'scripted-model', not 'other-model'; "
            "the first call will tell whether it serves it"
        )
    ]


class _StaticFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[str]:
    """`python3 -m http.server`: GET is a 404 for /v1/models, POST is HTTP 501."""

    def handler(*args: Any) -> _StaticFiles:
        return _StaticFiles(*args, directory=str(tmp_path))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_a_plain_web_server_ends_at_the_first_chat_call_without_retries(
    run_local: Any, file_server: str
) -> None:
    outcome = run_local(task_doc(limits={"maxLlmRetries": 5}), base_url=file_server)
    assert outcome.result.exit_reason is ExitReason.LLM_ERROR
    assert outcome.result.message.startswith(f"HTTP 501 from {file_server}")
    assert outcome.result.usage.llm_retries == 0


def test_a_run_against_nothing_ends_llm_error_with_its_record(run_local: Any) -> None:
    url = f"http://127.0.0.1:{unused_port()}/v1"
    outcome = run_local(task_doc(limits={"maxLlmRetries": 5}), base_url=url)
    assert outcome.result.exit_reason is ExitReason.LLM_ERROR
    assert outcome.result.cause == "EndpointUnreachable"
    assert outcome.result.message.startswith(f"nothing is listening at {url}")
    assert outcome.result.usage.llm_retries == 0
    assert (outcome.run_dir / "result.json").is_file()
    assert outcome.trajectory_path.is_file()


def test_a_working_endpoint_still_runs_to_the_answer(
    run_local: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.script(SUBMIT)
    outcome = run_local(task_doc())
    assert outcome.result.answer == "42"
