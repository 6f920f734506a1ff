"""A real model, served by llama.cpp on this machine's CPU: the test model (the small catalogue
one) pulled into the cache once (it survives between runs), served by `LocalModelServer` and by
`sandboxctl model serve`, and asked through the agent's own model client."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from realmodel import TEST_MODEL, port_open
from sandbox_agent.llm import ChatLLM
from sandbox_agent.local_model import LocalModelServer

pytestmark = [pytest.mark.realmodel, pytest.mark.timeout(600)]
MODEL = TEST_MODEL


def test_the_agents_client_gets_a_real_answer_at_temperature_zero(served_test_model: str) -> None:
    async def ask() -> str:
        llm = ChatLLM(
            served_test_model,
            "none",
            MODEL.name,
            request_timeout=120,
            max_retries=1,
            on_event=print,
        )
        try:
            reply = await llm.complete(
                [{"role": "user", "content": "What is 6 times 7? Answer with the number only."}],
                tools=None,
                max_tokens=16,
                temperature=0,
                top_p=None,
                deadline=time.monotonic() + 120,
            )
        finally:
            await llm.aclose()
        assert reply.usage_reported
        assert reply.prompt_tokens > 0
        return reply.content

    assert "42" in asyncio.run(ask())


def test_a_keyed_server_answers_only_with_its_key_and_stopped_leaves_nothing_running(
    test_model_file: Path, tmp_path: Path
) -> None:
    key = "k-" + "7" * 40
    server = LocalModelServer(
        test_model_file, MODEL.name, log_path=tmp_path / "log", context=2048, api_key=key
    )
    url = server.start()
    try:
        assert server._proc is not None
        assert key not in Path(f"/proc/{server._proc.pid}/cmdline").read_text()
        ask = {
            "model": MODEL.name,
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "hi"}],
        }
        with httpx.Client(timeout=60) as http:
            assert http.post(f"{url}/chat/completions", json=ask).status_code == 401
            wrong = {"Authorization": "Bearer nope"}
            assert http.post(f"{url}/chat/completions", json=ask, headers=wrong).status_code == 401
            right = {"Authorization": f"Bearer {key}"}
            assert http.post(f"{url}/chat/completions", json=ask, headers=right).status_code == 200
            slots = http.get(url.removesuffix("/v1") + "/slots", headers=right)
            assert slots.status_code != 200, slots.text[:200]
    finally:
        server.stop()
    assert not port_open(url)
    assert not server.running()


def test_model_serve_prints_the_endpoint_and_stops_on_sigterm(test_model_file: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox_agent.cli", "model", "serve", MODEL.name, "--ctx", "2048"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "LLMSANDBOX_MODELS_DIR": str(test_model_file.parent)},
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("endpoint: http://127.0.0.1:"), proc.stderr.read() if proc.stderr else ""
    url = line.split()[1]
    assert line.strip().endswith(f"model: {MODEL.name}")
    assert port_open(url)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().endswith("sandboxctl model serve: stopped")
    assert not port_open(url)
