"""`sandboxctl model list | pull [NAME] [--from FILE] | path [NAME]`: the local models' cache."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

from .cli import EXIT_OK, EXIT_TASK_FAILED
from .errors import TaskSpecError
from .local_model import DEFAULT_CONTEXT, LOCAL_EXTRA_HINT
from .models import (
    CATALOGUE,
    DEFAULT_MODEL,
    KnownModel,
    ModelCache,
    ModelError,
    cache_dir,
    human,
    known,
)


class ProgressLine:
    """A long step on `stream`: one line redrawn on a terminal, else a line every 10 %."""

    def __init__(self, stream: TextIO, quiet: bool = False) -> None:
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty()
        self.shown: tuple[str, int] = ("", -1)
        self.last_draw = 0.0

    def __call__(self, what: str, done: int, total: int) -> None:
        if self.quiet:
            return
        percent = 100 * done // total if total else 100
        if self.tty:
            now = time.monotonic()
            if percent == self.shown[1] and now - self.last_draw < 0.5:
                return
            self.last_draw = now
            end = "\n" if done >= total else ""
            print(f"\r  {what}: {percent:3d}% of {human(total)}", end=end, file=self.stream)
            self.stream.flush()
        elif (what, percent // 10) != (self.shown[0], self.shown[1] // 10):
            print(f"  {what}: {percent}% of {human(total)}", file=self.stream, flush=True)
        self.shown = (what, percent)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    model = sub.add_parser(
        "model",
        help="the local models: list them, pull one into the cache, show its path",
        description="Local GGUF models, verified by size and sha256, in the cache directory "
        "($LLMSANDBOX_MODELS_DIR, else $XDG_CACHE_HOME/llm-sandbox/models).",
    )
    actions = model.add_subparsers(
        dest="action", required=True, metavar="ACTION", help="list, pull or path"
    )
    actions.add_parser("list", help="the known models, their sizes, and which are cached")
    pull = actions.add_parser("pull", help="fetch a model into the cache and verify it")
    pull.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    pull.add_argument(
        "--from",
        dest="source",
        type=Path,
        help="a GGUF file you have: verified, then copied into the cache",
    )
    path = actions.add_parser("path", help="print a cached model's file (exit 1 if not cached)")
    path.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    serve = actions.add_parser(
        "serve",
        help="serve a model over the OpenAI API on 127.0.0.1 until Ctrl-C (pulled first if need be)",
    )
    serve.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    serve.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    serve.add_argument(
        "--ctx", type=int, default=DEFAULT_CONTEXT, help=f"context size (default {DEFAULT_CONTEXT})"
    )


def run(args: argparse.Namespace) -> int:
    cache = ModelCache(cache_dir())
    if args.action == "list":
        print(f"{'NAME':<38} {'SIZE':>8}  {'CACHED':<6}  DESCRIPTION")
        for model in CATALOGUE.values():
            cached = "yes" if cache.path(model).exists() else "no"
            mark = " (default)" if model.name == DEFAULT_MODEL else ""
            print(
                f"{model.name:<38} {human(model.size):>8}  {cached:<6}  {model.description}{mark}"
            )
        print(f"cache: {cache.directory}")
        return EXIT_OK
    try:
        model = known(args.name)
    except ModelError as exc:
        raise TaskSpecError(str(exc)) from None
    if args.action == "path":
        found = cache.cached(model, ProgressLine(sys.stderr))
        if found is None:
            print(
                f"sandboxctl model path: {model.name} is not cached; sandboxctl model pull "
                f"{model.name}",
                file=sys.stderr,
            )
            return EXIT_TASK_FAILED
        print(found)
        return EXIT_OK
    if args.action == "serve":
        return _serve(cache, model, args.port, args.ctx)
    found = pull(cache, model, args.source, "model pull")
    if found is None:
        return EXIT_TASK_FAILED
    print(found)
    return EXIT_OK


def pull(
    cache: ModelCache,
    model: KnownModel,
    source: Path | None,
    command: str,
    progress: ProgressLine | None = None,
) -> Path | None:
    """The model's verified file, pulled if need be with progress on stderr; None (the reason
    printed, naming `command`) when it cannot be had."""
    progress = progress or ProgressLine(sys.stderr)
    if source is None and (found := cache.cached(model, progress)) is not None:
        return found
    if not progress.quiet:
        print(f"pulling {model.name} ({human(model.size)}) into {cache.directory}", file=sys.stderr)
    try:
        return cache.pull(model, source, progress)
    except ModelError as exc:
        print(f"sandboxctl {command}: {exc}", file=sys.stderr)
        return None


def _serve(cache: ModelCache, model: KnownModel, port: int, context: int) -> int:
    from .local_model import LocalModelError, LocalModelServer, xllamacpp_installed

    if not xllamacpp_installed():
        raise TaskSpecError(LOCAL_EXTRA_HINT)
    found = pull(cache, model, None, "model serve")
    if found is None:
        return EXIT_TASK_FAILED
    log = cache.directory / "serve.log"
    server = LocalModelServer(found, model.name, log_path=log, context=context, port=port)
    stopped: list[int] = []

    def stop(signum: int, frame: object) -> None:
        stopped.append(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    print(f"starting {model.name} (log: {log})", file=sys.stderr)
    try:
        url = server.start()
        print(f"endpoint: {url}  model: {model.name}", flush=True)
        print(
            f"  use it with: OPENAI_BASE_URL={url} OPENAI_MODEL={model.name} sandboxctl run TASK",
            file=sys.stderr,
        )
        while not stopped and server.running():
            time.sleep(0.2)
    except LocalModelError as exc:
        print(f"sandboxctl model serve: {exc}", file=sys.stderr)
        return EXIT_TASK_FAILED
    except KeyboardInterrupt:
        stopped.append(signal.SIGINT)
    finally:
        server.stop()
    if not stopped:
        print(f"sandboxctl model serve: the server exited (see {log})", file=sys.stderr)
        return EXIT_TASK_FAILED
    print("sandboxctl model serve: stopped", file=sys.stderr)
    return 128 + stopped[0]
