"""The artifact store: where a run's result, trajectory and output files are kept, named by one
URL (s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or file:///path).

Each run has a prefix of its own, `<namespace>/<task>/<attempt>/` under the URL, holding

    result.json        the result (with the whole answer), written last
    trajectory.json    every message, tool call and observation, at the end
    steps/NNNNNN.jsonl each finished step as the run goes: concatenated, they are the journal
                       (trajectory.jsonl) that a run killed outright leaves
    output/...         the files of /workspace/output, as collected (capped, confined)

A store that fails (no such bucket, wrong credentials, down, slow) never costs the run its
result: uploads retry with backoff within the time they are given, and what failed is the
result's artifactsError. The store client is obstore (object_store, the Rust crate): it signs
and retries; S3 credentials come from the environment as for boto3 and the AWS CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

from .errors import SandboxAgentError
from .events import EventSink, Notice, ignore
from .wire import JOURNAL_FILE, OUTPUT_DIR, RESULT_FILE, STEPS_DIR, TRAJECTORY_FILE

if TYPE_CHECKING:
    from obstore.store import ObjectStore

    from .result import TaskResult

SCHEMES = ("s3", "gs", "az", "file")
# Each request's own timeout; a slow store is retried, never waited on forever.
REQUEST_TIMEOUT_SECONDS = 30.0
# How long one upload keeps retrying a store that is down (within what the run has left).
DEFAULT_RETRY_SECONDS = 60.0
# What the end of a run may spend on its uploads when its deadline has already passed.
MIN_FINISH_SECONDS = 30.0
T = TypeVar("T")
_MAX_MESSAGE = 300


class ArtifactStoreError(SandboxAgentError):
    """The store refused, failed or could not be reached; the message is one line."""


@dataclass(frozen=True)
class StoreURL:
    """A parsed store URL: `root` is the bucket (s3, gs), container (az) or directory (file)."""

    scheme: str
    root: str
    prefix: str = ""

    def __str__(self) -> str:
        if self.scheme == "file":
            return "file://" + str(PurePosixPath(self.root, self.prefix))
        return f"{self.scheme}://{self.root}" + (f"/{self.prefix}" if self.prefix else "")

    def joined(self, *parts: str) -> StoreURL:
        prefix = "/".join(p for p in (self.prefix, *parts) if p)
        return StoreURL(self.scheme, self.root, prefix)


def parse_store_url(url: str, where: str) -> StoreURL:
    """`url` parsed; ArtifactStoreError naming `where` (the flag or setting) when it is not a
    store URL this project writes to."""

    def refuse(why: str) -> ArtifactStoreError:
        return ArtifactStoreError(f"{where}: {url!r} {why}")

    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        return_schemes = ", ".join(f"{s}://" for s in SCHEMES)
        raise refuse(f"is not a store URL (give one of {return_schemes})")
    if parts.query or parts.fragment:
        raise refuse("has a query or fragment; give the bucket and prefix only")
    if parts.username is not None or parts.password is not None:
        raise refuse("carries credentials; give them in the environment or a Secret")
    path = unquote(parts.path)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise refuse("names a host; a file:// URL is a path on this machine (file:///dir)")
        if not path.startswith("/"):
            raise refuse("is not an absolute path (file:///dir)")
        return StoreURL("file", str(PurePosixPath(path)), "")
    if not parts.netloc:
        raise refuse(f"names no {'container' if scheme == 'az' else 'bucket'}")
    return StoreURL(scheme, parts.netloc, _checked_prefix(path, refuse))


def _checked_prefix(path: str, refuse: Any) -> str:
    segments = [s for s in path.split("/") if s]
    for segment in segments:
        if segment in (".", "..") or any(ord(c) < 0x20 for c in segment):
            raise refuse("has a '.', '..' or control character in its path")
    return "/".join(segments)


def run_prefix(namespace: str, task: str, attempt: str, sub_prefix: str | None = None) -> str:
    """`<namespace>[/<sub-prefix>]/<task>/<attempt>`: the run's own place in the store."""
    parts = [namespace, *([sub_prefix] if sub_prefix else []), task, attempt]
    return "/".join(parts)


@dataclass(frozen=True)
class StoreOptions:
    """How to reach the store beyond its URL (S3 and S3-compatible stores: MinIO, Ceph RGW).
    Each None is left to the environment (AWS_ENDPOINT_URL, AWS_REGION, AWS_PROFILE, ...)."""

    endpoint: str | None = None
    region: str | None = None
    path_style: bool | None = None
    profile: str | None = None
    retry_seconds: float = DEFAULT_RETRY_SECONDS
    request_timeout_seconds: float = REQUEST_TIMEOUT_SECONDS


def store_options_from(args: Any) -> StoreOptions:
    """The --artifacts-* flags (cli.add_store_arguments) as StoreOptions."""
    return StoreOptions(
        endpoint=args.artifacts_endpoint,
        region=args.artifacts_region,
        path_style=True if args.artifacts_path_style else None,
        profile=args.artifacts_profile,
    )


def open_store(
    url: str, where: str, options: StoreOptions, env: Mapping[str, str]
) -> ArtifactStore:
    """A client for `url` (given as `where`: the flag or setting); nothing is sent yet.
    ArtifactStoreError for a URL that is not a store's, or a configuration obstore refuses (a
    malformed endpoint, an unknown setting)."""
    from obstore.exceptions import BaseError

    parsed = parse_store_url(url, where)
    try:
        return ArtifactStore(_obstore(parsed, options, env), parsed)
    except (BaseError, ValueError, OSError) as exc:
        raise ArtifactStoreError(f"artifact store {parsed}: {one_line(exc)}") from None


async def read_object(
    url: str, where: str, options: StoreOptions, env: Mapping[str, str], max_bytes: int
) -> bytes:
    """The one object `url` names (s3://BUCKET/KEY, file:///DIR/FILE, ...), at most `max_bytes`;
    every failure an ArtifactStoreError naming `where`."""
    from obstore.exceptions import BaseError

    parsed = parse_store_url(url, where)
    path = PurePosixPath(parsed.root if parsed.scheme == "file" else parsed.prefix or "")
    if not path.name:
        raise ArtifactStoreError(f"{where}: {url!r} names no object (give the file's whole path)")
    if parsed.scheme == "file":
        parent = StoreURL("file", str(path.parent), "")
    else:
        parent = StoreURL(parsed.scheme, parsed.root, str(path.parent).strip("./"))
    try:
        store = ArtifactStore(_obstore(parent, options, env), parent)
    except (BaseError, ValueError, OSError) as exc:
        raise ArtifactStoreError(f"{where}: {one_line(exc)}") from None
    data = await store.get(path.name)
    if len(data) > max_bytes:
        raise ArtifactStoreError(f"{where}: {url} is {len(data)} bytes, over {max_bytes}")
    return data


def _obstore(url: StoreURL, options: StoreOptions, env: Mapping[str, str]) -> ObjectStore:
    from obstore.store import AzureStore, GCSStore, LocalStore, S3Store

    if url.scheme == "file":
        return LocalStore(url.root, mkdir=True)
    retry: Any = {
        "max_retries": 1000,  # bounded by time, not count
        "retry_timeout": timedelta(seconds=options.retry_seconds),
        "backoff": {
            "init_backoff": timedelta(milliseconds=200),
            "max_backoff": timedelta(seconds=10),
        },
    }
    client: Any = {
        "timeout": timedelta(seconds=options.request_timeout_seconds),
        "connect_timeout": timedelta(seconds=min(10.0, options.request_timeout_seconds)),
    }
    prefix = url.prefix or None
    if url.scheme == "s3":
        config: Any = {
            key: env[name]
            for key, name in (
                ("access_key_id", "AWS_ACCESS_KEY_ID"),
                ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
                ("session_token", "AWS_SESSION_TOKEN"),
            )
            if env.get(name)
        }
        endpoint = options.endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            config["endpoint"] = endpoint
            client["allow_http"] = endpoint.startswith("http://")
        region = options.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region:
            config["region"] = region
        if options.path_style is not None:
            config["virtual_hosted_style_request"] = not options.path_style
        provider = _profile_credentials(options.profile or env.get("AWS_PROFILE"), env)
        return S3Store(
            url.root, prefix=prefix, config=config, client_options=client,
            retry_config=retry, credential_provider=provider,
        )  # fmt: skip
    if url.scheme == "gs":
        return GCSStore(url.root, prefix=prefix, client_options=client, retry_config=retry)
    return AzureStore(url.root, prefix=prefix, client_options=client, retry_config=retry)


def _profile_credentials(profile: str | None, env: Mapping[str, str]) -> Any:
    """Credentials of an AWS profile (~/.aws/config and credentials), through boto3 as the AWS
    CLI reads them; None when no profile is named or keys are in the environment."""
    if not profile or env.get("AWS_ACCESS_KEY_ID"):
        return None
    try:
        import boto3  # type: ignore[import-untyped]
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        raise ArtifactStoreError(
            f"the AWS profile {profile!r} is read with boto3, which is not installed "
            "(pip install boto3), or give AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from None
    try:
        return Boto3CredentialProvider(boto3.Session(profile_name=profile))
    except Exception as exc:  # botocore's profile errors share no base class
        raise ArtifactStoreError(f"the AWS profile {profile!r}: {one_line(exc)}") from None


def one_line(exc: BaseException) -> str:
    """The store's error as one short line: obstore's messages carry a debug dump and the
    server's XML, of which the error code and message are what a person needs."""
    text, _, debug = str(exc).partition("\n\nDebug source")
    kind = re.search(r"HttpError \{\s*kind: (\w+)", debug)
    if kind:  # what "error sending request" was: Timeout, Connect, ...
        text = text.rstrip() + f" ({kind.group(1)})"
    text = re.sub(r" in [0-9.]+[mµn]?s\b", "", text)
    text = re.sub(r", max_retries: \d+, retry_timeout: \S+", "", text)
    code = re.search(r"<Code>([^<]{1,100})</Code>", text)
    message = re.search(r"<Message>([^<]{1,200})</Message>", text)
    if code or message:
        head = re.split(r": <\?xml|<\?xml", text, maxsplit=1)[0].rstrip(": ")
        said = " ".join(m.group(1) for m in (code, message) if m)
        text = f"{said} ({head})"
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int


class ArtifactStore:
    """One store: put, get, list and delete under its URL, every failure an ArtifactStoreError.

    obstore's blocking calls, each in a worker thread: with its asyncio calls, 14 of 110 short
    processes aborted (SIGABRT, exit code lost) at interpreter exit; with these, none of 120."""

    def __init__(self, store: ObjectStore, url: StoreURL) -> None:
        self._store = store
        self.url = url

    async def put(self, key: str, data: bytes) -> None:
        import obstore

        await self._call(f"writing {self.url.joined(key)}", obstore.put, self._store, key, data)

    async def get(self, key: str) -> bytes:
        import obstore

        def read() -> bytes:
            return bytes(obstore.get(self._store, key).bytes())

        return await self._call(f"reading {self.url.joined(key)}", read)

    async def list_under(self, prefix: str) -> list[StoredObject]:
        import obstore

        def listing() -> list[StoredObject]:
            found = obstore.list(self._store, prefix=prefix or None).collect()
            return [StoredObject(str(o["path"]), int(o["size"])) for o in found]

        return await self._call(f"listing {self.url.joined(prefix)}", listing)

    async def delete(self, keys: list[str]) -> None:
        import obstore

        if keys:
            await self._call(f"deleting in {self.url}", obstore.delete, self._store, keys)

    async def _call(self, what: str, work: Callable[..., T], *args: Any) -> T:
        from obstore.exceptions import BaseError

        try:
            return await asyncio.to_thread(work, *args)
        except (BaseError, OSError, ValueError) as exc:
            raise ArtifactStoreError(f"{what}: {one_line(exc)}") from None


def attempt_id(now: float | None = None) -> str:
    """A local run's attempt: `YYYYmmdd-HHMMSS-mmm-XXXXXXXX` (time, then 32 random bits)."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{stamp}-{int(now * 1000) % 1000:03d}-{os.urandom(4).hex()}"


@dataclass
class ArtifactWriter:
    """Mirrors one run into the store: each finished step as it comes (in the background, in
    order), then the output files, trajectory.json and result.json at the end. The first
    failure is kept as `error`; the run goes on whatever the store does."""

    store: ArtifactStore
    prefix: str
    deadline: float | None = None  # time.monotonic() by which the run must be over
    on_event: EventSink = ignore
    error: str | None = None
    _steps: asyncio.Queue[bytes] | None = None
    _sender: asyncio.Task[None] | None = None
    _step_count: int = 0
    _step_keys: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.store.url.joined(self.prefix))

    def step(self, text: str) -> None:
        """A finished step's journal lines; sent in the background (needs a running loop)."""
        if self._steps is None:
            self._steps = asyncio.Queue()
            self._sender = asyncio.get_running_loop().create_task(self._send_steps())
        self._steps.put_nowait(text.encode("utf-8"))

    async def _send_steps(self) -> None:
        assert self._steps is not None
        while True:
            data = await self._steps.get()
            try:
                self._step_count += 1
                key = f"{STEPS_DIR}/{self._step_count:06d}.jsonl"
                if await self._put(key, data):
                    self._step_keys.append(key)
            finally:
                self._steps.task_done()

    async def finish(self, run_dir: Path, output_dir: Path | None, result: TaskResult) -> None:
        """Everything the run left in `run_dir` uploaded; `result` gets artifactsURL (and
        artifactsError when something was not stored). Bounded by the run's deadline, or
        MIN_FINISH_SECONDS when that has passed."""
        result.artifacts_url = self.url
        budget = MIN_FINISH_SECONDS
        if self.deadline is not None:
            budget = max(budget, self.deadline - time.monotonic())
        try:
            await asyncio.wait_for(self._finish(run_dir, output_dir, result), budget)
        except TimeoutError:
            self._failed(f"{self.url}: gave up after {budget:.0f} s (the store is too slow)")
        finally:
            if self._sender is not None:
                self._sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._sender
        if self.error is not None:
            result.artifacts_error = self.error

    async def _finish(self, run_dir: Path, output_dir: Path | None, result: TaskResult) -> None:
        if self._steps is not None:
            await self._steps.join()
        if output_dir is not None and output_dir.is_dir():
            for path in sorted(p for p in output_dir.rglob("*") if p.is_file()):
                rel = path.relative_to(output_dir).as_posix()
                await self._put(f"{OUTPUT_DIR}/{rel}", path.read_bytes())
        trajectory = run_dir / TRAJECTORY_FILE
        if trajectory.is_file() and await self._put(TRAJECTORY_FILE, trajectory.read_bytes()):
            # trajectory.json holds every step: the journal has done its work.
            with contextlib.suppress(ArtifactStoreError):
                await self.store.delete([f"{self.prefix}/{k}" for k in self._step_keys])
        if self.error is not None:
            result.artifacts_error = self.error
        await self._put(RESULT_FILE, (result.to_json() + "\n").encode())

    async def _put(self, key: str, data: bytes) -> bool:
        try:
            await self.store.put(f"{self.prefix}/{key}", data)
        except ArtifactStoreError as exc:
            self._failed(str(exc))
            return False
        return True

    def _failed(self, message: str) -> None:
        if self.error is None:
            self.error = message
            self.on_event(Notice(f"artifact store: {message} (the run goes on)"))


@dataclass(frozen=True)
class Fetched:
    files: int
    bytes: int
    # The run was killed before trajectory.json: its steps were joined into trajectory.jsonl.
    journal_only: bool


async def fetch_run(store: ArtifactStore, dest: Path) -> Fetched:
    """Every object under the store's URL written beneath `dest` (confined: a key that is not a
    plain relative path is refused); steps/ joined into trajectory.jsonl when trajectory.json
    is missing. ArtifactStoreError when nothing is there or the store fails."""
    from .outputs import ConfinedDir, UnsafeOutputError, checked_path

    objects = await store.list_under("")
    if not objects:
        raise ArtifactStoreError(f"{store.url}: nothing is stored there")
    keys = {o.key for o in objects}
    steps = sorted(k for k in keys if k.startswith(f"{STEPS_DIR}/"))
    journal_only = TRAJECTORY_FILE not in keys and bool(steps)
    files = total = 0
    try:
        with ConfinedDir(dest) as out:
            for obj in sorted(objects, key=lambda o: o.key):
                if journal_only and obj.key in steps:
                    continue
                data = await store.get(obj.key)
                out.write_new(checked_path(obj.key), data)
                files, total = files + 1, total + len(data)
            if journal_only:
                joined = b"".join([await store.get(k) for k in steps])
                out.write_new(checked_path(JOURNAL_FILE), joined)
                files, total = files + 1, total + len(joined)
    except UnsafeOutputError:
        raise ArtifactStoreError(
            f"{store.url}: holds a key that is not a plain relative path (or that is both a file "
            "and a directory); nothing more was fetched"
        ) from None
    return Fetched(files, total, journal_only)
