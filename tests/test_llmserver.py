"""Tests for the scripted OpenAI-compatible server, driven through the real ``openai`` client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletionMessageFunctionToolCall

from llmserver import (
    RecordedRequest,
    Reply,
    ScriptedLLMServer,
    context_length_error,
    empty_choices,
    error,
    hermes_tool_call,
    llm_server,
    malformed_json,
    reset_connection,
    slow,
    text,
    tool_call,
    tool_calls,
    xml_tool_call,
)

__all__ = ["llm_server"]  # re-exported so pytest sees the fixture here

MESSAGES: list[Any] = [
    {"role": "system", "content": "You are a test."},
    {"role": "user", "content": "Say hello."},
]


@pytest.fixture
def client(llm_server: ScriptedLLMServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=llm_server.base_url, api_key="test-key", max_retries=0) as c:
        yield c


def ask(client: OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(model="my-model", messages=MESSAGES, **kwargs)


def test_tool_call_arrives_as_native_tool_call(
    llm_server: ScriptedLLMServer, client: OpenAI
) -> None:
    llm_server.script(tool_call("bash", {"command": "ls -la"}, id="call_x", content="thinking"))
    completion = ask(client)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "thinking"
    call = choice.message.tool_calls[0]
    assert call.id == "call_x"
    assert call.type == "function"
    assert call.function.name == "bash"
    assert json.loads(call.function.arguments) == {"command": "ls -la"}


def test_tool_call_string_arguments_are_verbatim(
    llm_server: ScriptedLLMServer, client: OpenAI
) -> None:
    llm_server.script(tool_call("bash", '{"command": "ls'))
    call = ask(client).choices[0].message.tool_calls[0]
    assert call.function.arguments == '{"command": "ls'


def test_several_tool_calls(llm_server: ScriptedLLMServer, client: OpenAI) -> None:
    llm_server.script(tool_calls([("read", {"path": "a"}), ("write", {"path": "b", "text": "x"})]))
    calls = ask(client).choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["read", "write"]
    assert [c.id for c in calls] == ["call_0", "call_1"]
    assert json.loads(calls[1].function.arguments) == {"path": "b", "text": "x"}


def test_text_reply(llm_server: ScriptedLLMServer, client: OpenAI) -> None:
    llm_server.script(text("hello"), text("cut", finish_reason="length"))
    first = ask(client)
    assert first.choices[0].message.content == "hello"
    assert first.choices[0].message.tool_calls is None
    assert first.choices[0].finish_reason == "stop"
    assert first.object == "chat.completion"
    assert first.model == "my-model"
    assert first.id == "chatcmpl-1"
    assert ask(client).choices[0].finish_reason == "length"


def test_hermes_content(llm_server: ScriptedLLMServer, client: OpenAI) -> None:
    llm_server.script(hermes_tool_call("bash", {"command": "pwd"}, before="Let me look.\n"))
    message = ask(client).choices[0].message
    assert message.tool_calls is None
    content = message.content
    assert content.startswith("Let me look.\n<tool_call>\n")
    assert content.endswith("\n</tool_call>")
    payload = content.removeprefix("Let me look.\n<tool_call>\n").removesuffix("\n</tool_call>")
    assert json.loads(payload) == {"name": "bash", "arguments": {"command": "pwd"}}


def test_xml_content(llm_server: ScriptedLLMServer, client: OpenAI) -> None:
    llm_server.script(xml_tool_call("write", {"path": "/tmp/x", "text": "a\nb"}))
    message = ask(client).choices[0].message
    assert message.tool_calls is None
    assert message.content == (
        "<tool_call>\n<function=write>\n"
        "<parameter=path>\n/tmp/x\n</parameter>\n"
        "<parameter=text>\na\nb\n</parameter>\n"
        "</function>\n</tool_call>"
    )


def test_rate_limit_with_retry_after(llm_server: ScriptedLLMServer, client: OpenAI) -> None:
    llm_server.script(error(429, headers={"Retry-After": "1"}))
    with pytest.raises(openai.RateLimitError) as info:
        ask(client)
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "1"


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors(llm_server: ScriptedLLMServer, client: OpenAI, status: int) -> None:
    llm_server.script(error(status, message="boom"))
    with pytest.raises(openai.InternalServerError, match="boom") as info:
        ask(client)
    assert info.value.status_code == status


def test_error_with_raw_body(llm_server: ScriptedLLMServer, client: OpenAI) -> None:
    llm_server.script(error(502, body="<html>bad gateway</html>"))
    with pytest.raises(openai.InternalServerError) as info:
        ask(client)
    assert info.value.response.text == "<html>bad gateway</html>"


def test_context_length_error(llm_server: ScriptedLLMServer, client: OpenAI) -> None:
    llm_server.script(context_length_error(limit=4096))
    with pytest.raises(openai.BadRequestError) as info:
        ask(client)
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "messages"
    assert info.value.type == "invalid_request_error"
    assert "maximum context length is 4096 tokens" in info.value.message


def test_slow_reply_times_out_and_server_keeps_serving(
    llm_server: ScriptedLLMServer, client: OpenAI
) -> None:
    llm_server.script(slow(1.0, text("late")), text("next"))
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        ask(client, timeout=0.2)
    assert time.monotonic() - started < 0.9
    assert ask(client).choices[0].message.content == "next"


def test_slow_reply_within_timeout(llm_server: ScriptedLLMServer, client: OpenAI) -> None:
    llm_server.script(slow(0.1, text("on time")))
    assert ask(client, timeout=5).choices[0].message.content == "on time"


def test_stop_is_quick_during_slow_reply(client: OpenAI, llm_server: ScriptedLLMServer) -> None:
    llm_server.script(slow(30, text("never")))
    with pytest.raises(openai.APIConnectionError):
        ask(client, timeout=0.2)
    started = time.monotonic()
    llm_server.stop()
    assert time.monotonic() - started < 1.0


def test_malformed_json_raises_json_decode_error(
    llm_server: ScriptedLLMServer, client: OpenAI
) -> None:
    # The openai client does not wrap this one: it is a plain json.JSONDecodeError (a ValueError).
    llm_server.script(malformed_json(), text("after"))
    with pytest.raises(json.JSONDecodeError):
        ask(client)
    assert ask(client).choices[0].message.content == "after"


def test_reset_connection_raises_connection_error(
    llm_server: ScriptedLLMServer, client: OpenAI
) -> None:
    llm_server.script(reset_connection(), text("after"))
    with pytest.raises(openai.APIConnectionError) as info:
        ask(client)
    assert not isinstance(info.value, openai.APITimeoutError)
    assert info.value.__cause__ is not None  # the transport's "server disconnected" error
    assert ask(client).choices[0].message.content == "after"


def test_empty_choices(llm_server: ScriptedLLMServer, client: OpenAI) -> None:
    llm_server.script(empty_choices())
    completion = ask(client)
    assert completion.choices == []
    assert completion.usage is not None


def test_exhausted_script_is_a_500(llm_server: ScriptedLLMServer, client: OpenAI) -> None:
    llm_server.script(text("only one"))
    ask(client)
    with pytest.raises(openai.InternalServerError, match="script exhausted at request 2"):
        ask(client)


def test_default_reply_and_callable(llm_server: ScriptedLLMServer, client: OpenAI) -> None:
    def echo_last(request: dict[str, Any]) -> Reply:
        return text(f"you said: {request['messages'][-1]['content']}")

    llm_server.script(text("scripted first"))
    llm_server.set_default(echo_last)
    assert ask(client).choices[0].message.content == "scripted first"
    assert ask(client).choices[0].message.content == "you said: Say hello."
    assert ask(client).choices[0].message.content == "you said: Say hello."
    llm_server.set_default(text("fixed"))
    assert ask(client).choices[0].message.content == "fixed"
    llm_server.set_default(None)
    with pytest.raises(openai.InternalServerError, match="script exhausted at request 5"):
        ask(client)


def test_callable_in_script_and_broken_callable(
    llm_server: ScriptedLLMServer, client: OpenAI
) -> None:
    def broken(request: dict[str, Any]) -> Reply:
        raise KeyError("nope")

    llm_server.script(lambda req: text(req["model"]), broken)
    assert ask(client).choices[0].message.content == "my-model"
    with pytest.raises(openai.InternalServerError, match="reply callback failed at request 2"):
        ask(client)
    assert llm_server.pending == 0


def test_requests_are_recorded(llm_server: ScriptedLLMServer, client: OpenAI) -> None:
    llm_server.script(text("a"), text("b"))
    ask(client, temperature=0.5)
    ask(client, tools=[{"type": "function", "function": {"name": "bash", "parameters": {}}}])
    requests = llm_server.requests
    assert len(requests) == 2
    first = requests[0]
    assert isinstance(first, RecordedRequest)
    assert first.method == "POST"
    assert first.path == "/v1/chat/completions"
    assert first.headers["authorization"] == "Bearer test-key"
    assert first.headers["content-type"] == "application/json"
    assert first.json is not None
    assert first.json["model"] == "my-model"
    assert first.json["messages"] == MESSAGES
    assert first.json["temperature"] == 0.5
    assert json.loads(first.body) == first.json
    assert requests[1].json is not None
    assert requests[1].json["tools"][0]["function"]["name"] == "bash"
    assert llm_server.chat_requests == requests


def test_usage_defaults_and_override(llm_server: ScriptedLLMServer, client: OpenAI) -> None:
    llm_server.script(tool_call("bash", {"command": "ls"}), text("hi", usage=(1000, 20)))
    usage = ask(client).usage
    assert usage is not None
    assert usage.prompt_tokens == len(json.dumps(MESSAGES)) // 4
    assert usage.completion_tokens == len(json.dumps({"command": "ls"})) // 4 + 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    usage = ask(client).usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (1000, 20, 1020)


def test_models_and_unknown_path(llm_server: ScriptedLLMServer, client: OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["scripted-model"]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="x", input="y")
    response = httpx.get(llm_server.base_url + "/nope")
    assert response.status_code == 404
    assert "no route" in response.json()["error"]["message"]
    assert llm_server.chat_requests == []


async def test_async_client(llm_server: ScriptedLLMServer) -> None:
    llm_server.script(
        tool_call("bash", {"command": "echo hi"}),
        error(429, headers={"Retry-After": "1"}),
        slow(1.0, text("late")),
        text("done"),
    )
    async with AsyncOpenAI(base_url=llm_server.base_url, api_key="k", max_retries=0) as client:
        first = await client.chat.completions.create(model="m", messages=MESSAGES)
        assert first.choices[0].message.tool_calls is not None
        call = first.choices[0].message.tool_calls[0]
        assert isinstance(call, ChatCompletionMessageFunctionToolCall)
        assert call.function.name == "bash"
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES)
        assert info.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="m", messages=MESSAGES, timeout=0.2)
        last = await client.chat.completions.create(model="m", messages=MESSAGES)
        assert last.choices[0].message.content == "done"


def test_context_manager_and_stop() -> None:
    with ScriptedLLMServer() as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        assert server.base_url.endswith("/v1")
        server.script(text("x"))
        with OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as c:
            assert ask(c).choices[0].message.content == "x"
    server.stop()  # idempotent
    with (
        pytest.raises(openai.APIConnectionError),
        OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as c,
    ):
        ask(c)
