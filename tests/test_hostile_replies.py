"""The host treats every exec-server reply as hostile: paths are confined, sizes capped, shapes checked.

Each case runs the real ExecClient (and the real output collector) against a fake exec server
that answers what a replaced one could: escaping paths, oversized, trickled or encoded bodies,
malformed JSON. Nothing may be written outside the output directory, and every refusal is a
SandboxError naming the request.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fakeexecd import Handler, Reply, fake_execd, file_reply, listing
from sandbox_agent.errors import ExecServerError, SandboxError
from sandbox_agent.events import Event, Notice
from sandbox_agent.execclient import ExecClient
from sandbox_agent.outputs import (
    OutputCaps,
    UnsafeOutputError,
    checked_path,
    collect_outputs,
    compromised,
)
from sandbox_agent.result import ExitReason, Phase, TaskResult


def run_with(
    tmp_path: Path, routes: dict[str, Handler], body: Callable[[ExecClient], Awaitable[Any]]
) -> Any:
    async def go() -> Any:
        async with fake_execd(tmp_path, routes) as server, ExecClient(server.endpoint) as client:
            return await body(client)

    return asyncio.run(go())


def replying(reply: Reply) -> Handler:
    """A route that answers every request with `reply` (bound now, not to a loop variable)."""
    return lambda _b: reply


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


ESCAPING = [
    "../../x/PWNED.txt",
    "../PWNED.txt",
    "a/../../PWNED.txt",
    "/tmp/PWNED.txt",
    "//etc/PWNED",
    "",
    ".",
    "a/./b",
    "a//b",
    "a/",
    "ok\x1b]52;c;aGk=\x07",
    "new\nline",
    "x" * 256,
]


@pytest.mark.parametrize("name", ESCAPING)
def test_an_escaping_or_malformed_output_path_is_refused(name: str) -> None:
    with pytest.raises(UnsafeOutputError, match="treated as compromised"):
        checked_path(name)


@pytest.mark.parametrize("name", ["answer.txt", "a/b/c.csv", "with space.txt", "ünï/cödé", "a\\b"])
def test_plain_relative_output_paths_are_accepted(name: str) -> None:
    assert str(checked_path(name)) == name


def test_a_listing_with_escaping_paths_writes_nothing_outside_the_output_dir(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "x" / "PWNED.txt"
    dest = tmp_path / "run" / "output"
    absolute = tmp_path / "abs-PWNED.txt"
    for hostile in ("../../x/PWNED.txt", str(absolute)):
        routes: dict[str, Handler] = {
            "/files/list": replying(listing("good.txt", hostile)),
            "/files/read": lambda _b: file_reply(b"pwned"),
        }
        with pytest.raises(UnsafeOutputError) as caught:
            run_with(tmp_path, routes, lambda c: collect_outputs(c, dest))
        assert repr(hostile) in str(caught.value)
        assert not outside.exists()
        assert not absolute.exists()
    # Checked before anything is read: not even the good file was written.
    assert files_under(tmp_path / "run") <= {"output"}


@pytest.mark.parametrize("names", [("a.txt", "a.txt"), ("a", "a/b")])
def test_a_path_listed_twice_or_below_a_file_is_refused(
    tmp_path: Path, names: tuple[str, str]
) -> None:
    routes: dict[str, Handler] = {
        "/files/list": lambda _b: listing(*names),
        "/files/read": lambda _b: file_reply(b"data"),
    }
    with pytest.raises(UnsafeOutputError, match="treated as compromised"):
        run_with(tmp_path, routes, lambda c: collect_outputs(c, tmp_path / "output"))


def test_a_symlink_planted_in_the_destination_is_not_followed(tmp_path: Path) -> None:
    """Even where something else made a link inside the output directory first."""
    dest = tmp_path / "output"
    dest.mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (dest / "sub").symlink_to(target)
    (dest / "f.txt").symlink_to(tmp_path / "victim.txt")
    for name in ("sub/x.txt", "f.txt"):
        routes: dict[str, Handler] = {
            "/files/list": replying(listing(name)),
            "/files/read": lambda _b: file_reply(b"pwned"),
        }
        with pytest.raises(UnsafeOutputError):
            run_with(tmp_path, routes, lambda c: collect_outputs(c, dest))
    assert list(target.iterdir()) == []
    assert not (tmp_path / "victim.txt").exists()


def test_honest_outputs_are_collected_with_their_real_sizes(tmp_path: Path) -> None:
    contents = {"output/answer.txt": b"42\n", "output/plots/a.png": b"\x89PNG" + bytes(100)}
    routes: dict[str, Handler] = {
        "/files/list": lambda _b: listing(".keep", "answer.txt", "plots/a.png", size=3),
        "/files/read": lambda b: file_reply(contents[b["path"]], size=3),
    }
    dest = tmp_path / "output"
    outputs = run_with(tmp_path, routes, lambda c: collect_outputs(c, dest))
    assert {(o.path, o.bytes) for o in outputs} == {("answer.txt", 3), ("plots/a.png", 104)}
    assert (dest / "plots" / "a.png").read_bytes() == contents["output/plots/a.png"]
    assert not (dest / ".keep").exists()


def test_output_caps_hold_whatever_the_server_claims(tmp_path: Path) -> None:
    """Count, per-file and total caps are the host's: files over them are skipped with a note,
    and the reads never ask for more than is left."""
    asked: list[int] = []

    def read(body: dict[str, Any]) -> Reply:
        asked.append(body["max_bytes"])
        # A liar: claims small, then sends as much as it was allowed, flagged as cut short.
        return file_reply(b"x" * body["max_bytes"], size=10, truncated=body["path"].endswith("big"))

    routes: dict[str, Handler] = {
        "/files/list": lambda _b: listing("big", "a", "b", "c", "d", "e", size=10),
        "/files/read": read,
    }
    events: list[Event] = []
    caps = OutputCaps(max_files=5, max_file_bytes=100, max_total_bytes=250)
    dest = tmp_path / "output"
    outputs = run_with(tmp_path, routes, lambda c: collect_outputs(c, dest, caps, events.append))
    assert [o.path for o in outputs] == ["a", "b", "c"]
    assert sum(o.bytes for o in outputs) <= caps.max_total_bytes
    assert all(n <= caps.max_file_bytes for n in asked)
    notes = [e.message for e in events if isinstance(e, Notice)]
    assert any("more than 5 files" in n for n in notes)
    assert any("output/big not collected" in n and "limit per file" in n for n in notes)
    assert any("output/d not collected" in n and "limit for all outputs" in n for n in notes)
    assert files_under(dest) == {"a", "b", "c"}


def test_more_bytes_than_asked_for_is_refused(tmp_path: Path) -> None:
    routes: dict[str, Handler] = {"/files/read": lambda b: file_reply(b"y" * (b["max_bytes"] + 1))}
    with pytest.raises(SandboxError, match="more than the 10 asked for"):
        run_with(tmp_path, routes, lambda c: c.read_bytes("output/x", 10))


def test_invalid_base64_is_refused(tmp_path: Path) -> None:
    reply = Reply(
        {"path": "x", "content": "not base64!", "encoding": "base64", "size": 3, "truncated": False}
    )
    with pytest.raises(SandboxError, match="invalid base64"):
        run_with(tmp_path, {"/files/read": lambda _b: reply}, lambda c: c.read_bytes("x", 10))


def test_a_reply_body_over_its_cap_is_refused_unread(tmp_path: Path) -> None:
    huge = b'{"exit_code": 0, "stdout": "' + b"a" * (4 * 1024 * 1024) + b'", "stderr": ""}'
    for reply in (
        Reply(raw=huge),
        # No Content-Length: the cap holds on what actually arrives.
        Reply(chunks=[huge[i : i + 65536] for i in range(0, len(huge), 65536)]),
    ):
        with pytest.raises(SandboxError, match="more than .* bytes for /exec; refused"):
            run_with(
                tmp_path,
                {"/exec": replying(reply)},
                lambda c: c.exec("true", 5, max_output_bytes=16384),
            )


def test_a_listing_with_more_entries_than_asked_is_refused(tmp_path: Path) -> None:
    routes: dict[str, Handler] = {"/files/list": lambda _b: listing(*[f"f{i}" for i in range(20)])}
    with pytest.raises(SandboxError, match="listed 20 entries"):
        run_with(tmp_path, routes, lambda c: c.list_dir("output", max_entries=10))


def test_an_encoded_reply_is_refused_and_never_decompressed(tmp_path: Path) -> None:
    bomb = gzip.compress(b'{"exit_code": 0, "stdout": "' + b"a" * 10_000_000 + b'"}')
    reply = Reply(raw=bomb, headers={"Content-Encoding": "gzip"})
    with pytest.raises(SandboxError, match="'gzip'-encoded reply for /exec"):
        run_with(tmp_path, {"/exec": lambda _b: reply}, lambda c: c.exec("true", 5))


def test_a_trickled_reply_ends_at_the_request_deadline(tmp_path: Path) -> None:
    """httpx's timeouts are per read; one byte a second must not keep a call alive."""
    reply = Reply(chunks=[b" "] * 1000, delay=0.2)
    with pytest.raises(SandboxError, match="did not answer /files/list within"):
        run_with(
            tmp_path,
            {"/files/list": lambda _b: reply},
            lambda c: c._post("/files/list", {}, type(listing_model()), timeout=1.0),
        )


def listing_model() -> Any:
    from sandbox_agent.execclient import Listing

    return Listing(path="x", entries=[])


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"<html>login</html>", "non-JSON for /exec"),
        (b"[" * 100_000 + b"]" * 100_000, "non-JSON for /exec"),
        (b'{"exit_code": "zero", "stdout": "", "stderr": ""}', "unexpected reply for /exec"),
        (b'{"stdout": ""}', "unexpected reply for /exec"),
        (b"[1, 2, 3]", "unexpected reply for /exec"),
    ],
)
def test_malformed_replies_are_a_sandbox_error_naming_the_request(
    tmp_path: Path, raw: bytes, match: str
) -> None:
    with pytest.raises(SandboxError, match=match) as caught:
        run_with(tmp_path, {"/exec": lambda _b: Reply(raw=raw)}, lambda c: c.exec("true", 5))
    assert not isinstance(caught.value, ExecServerError)


def test_invalid_listing_shapes_are_refused(tmp_path: Path) -> None:
    for entry in (
        {"path": "a", "type": "file", "size": -1},
        {"path": "a", "type": "device", "size": 1},
        {"path": 7, "type": "file", "size": 1},
    ):
        reply = Reply({"path": "output", "entries": [entry]})
        with pytest.raises(SandboxError, match="unexpected reply for /files/list"):
            run_with(tmp_path, {"/files/list": replying(reply)}, lambda c: c.list_dir("o"))


def test_error_replies_keep_a_bounded_message(tmp_path: Path) -> None:
    reply = Reply({"error": {"code": "c" * 1000, "message": "m" * 100_000}}, status=400)
    with pytest.raises(ExecServerError) as caught:
        run_with(tmp_path, {"/exec": lambda _b: reply}, lambda c: c.exec("true", 5))
    assert len(caught.value.code) <= 100
    assert len(caught.value.message) <= 4000


def test_a_compromised_sandbox_fails_the_run_whatever_it_answered() -> None:
    ok = TaskResult(phase=Phase.SUCCEEDED, exit_reason=ExitReason.SUBMITTED, answer="42")
    failed = compromised(ok, UnsafeOutputError("the exec server named '../x'"))
    assert failed.phase is Phase.FAILED
    assert failed.exit_reason is ExitReason.SANDBOX_ERROR
    assert failed.cause == "SandboxCompromised"
    assert "'../x'" in failed.message


def test_file_contents_are_written_exactly(tmp_path: Path) -> None:
    data = os.urandom(5000)
    routes: dict[str, Handler] = {
        "/files/list": lambda _b: listing("bin"),
        "/files/read": lambda _b: Reply(
            {
                "path": "bin",
                "content": base64.b64encode(data).decode(),
                "encoding": "base64",
                "size": len(data),
            }
        ),
    }
    run_with(tmp_path, routes, lambda c: collect_outputs(c, tmp_path / "o"))
    assert (tmp_path / "o" / "bin").read_bytes() == data
