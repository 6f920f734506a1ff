"""What the real-model tests share: the small test model (Qwen2.5-Coder 0.5B), obtained once into
the user's model cache so that it survives between runs (or the test skipped, saying why), one
server of it for the whole session, and a probe of whether a served endpoint's port still
answers. The fixtures reach the tests through conftest.py."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from sandbox_agent.local_model import LocalModelServer, xllamacpp_installed
from sandbox_agent.models import CATALOGUE, ModelCache, ModelError, cache_dir

# The small one: quick to pull and to load on two cores; the tests are about mechanics.
TEST_MODEL = CATALOGUE["qwen2.5-coder-0.5b-instruct-q4_k_m"]


@pytest.fixture(scope="session")
def test_model_file() -> Path:
    if not xllamacpp_installed():
        pytest.skip("xllamacpp is not installed (pip install 'llm-sandbox-operator[local]')")
    try:
        return ModelCache(cache_dir()).pull(TEST_MODEL)
    except ModelError as exc:
        pytest.skip(f"the model cannot be obtained here: {exc}")


@pytest.fixture(scope="session")
def served_test_model(
    test_model_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The test model's base URL, served until the session ends."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with LocalModelServer(test_model_file, TEST_MODEL.name, log_path=log, context=8192) as server:
        yield server.url


def port_open(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((parts.hostname or "", parts.port or 0)) == 0
