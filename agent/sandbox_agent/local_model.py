"""A local model served over the OpenAI API by llama.cpp's own server (the `xllamacpp` wheel, the
`[local]` extra), in a child process of its own: on 127.0.0.1, a free port, one thread per core,
prompt caching on. `LocalModelServer` starts it, waits until it answers, and stops it; the child
also stops when its parent dies however it dies (its stdin, a pipe from the parent, closes).
Given a key, the server answers only requests that carry it (a run's own server gets a fresh one,
so that nothing else on this machine, a sandbox with the host's network included, can use it);
the slots endpoint, which would show the conversation, is off.

    python -m sandbox_agent.local_model --model FILE --alias NAME [--ctx N] [--port N]

is the child: it prints one JSON line {"url": ...} once the server is healthy. The key, if any,
comes in the environment variable LLMSANDBOX_LOCAL_MODEL_KEY, never on the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from .errors import SandboxAgentError

LOCAL_EXTRA_HINT = (
    "the local model needs llama.cpp's server: pip install 'llm-sandbox-operator[local]'"
)
DEFAULT_CONTEXT = 16384

KEY_VARIABLE = "LLMSANDBOX_LOCAL_MODEL_KEY"
READY_TIMEOUT = 180.0
STOP_GRACE = 10.0


class LocalModelError(SandboxAgentError):
    """The local model server could not be started."""


def xllamacpp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("xllamacpp") is not None


def threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class LocalModelServer:
    """The child process serving `model_file` as model `alias`; `url` is its base URL (…/v1)."""

    def __init__(
        self,
        model_file: Path,
        alias: str,
        *,
        log_path: Path,
        context: int = DEFAULT_CONTEXT,
        port: int = 0,
        ready_timeout: float = READY_TIMEOUT,
        api_key: str = "",
    ) -> None:
        self.model_file = model_file
        self.alias = alias
        self.log_path = log_path
        self.context = context
        self.port = port
        self.ready_timeout = ready_timeout
        self.api_key = api_key
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, abandon: threading.Event | None = None) -> str:
        """Start the child and wait until it serves; `abandon` set (from another thread) gives
        up the wait: the child is stopped and LocalModelError raised."""
        if not xllamacpp_installed():
            raise LocalModelError(LOCAL_EXTRA_HINT)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != KEY_VARIABLE}
        if self.api_key:
            env[KEY_VARIABLE] = self.api_key
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "sandbox_agent.local_model", "--model",
                 str(self.model_file), "--alias", self.alias, "--ctx", str(self.context),
                 "--port", str(self.port)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                start_new_session=True,
            )  # fmt: skip
        assert self._proc.stdout is not None
        deadline = time.monotonic() + self.ready_timeout
        line = b""
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            if abandon is not None and abandon.is_set():
                self.stop()
                raise LocalModelError("the local model server's start was abandoned")
            ready, _, _ = select.select([self._proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(self._proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                line += chunk
        if not line.endswith(b"\n"):
            self.stop()
            raise LocalModelError(
                f"the local model server did not start within {self.ready_timeout:.0f}s: "
                f"{self._log_tail()}"
            )
        self.url = str(json.loads(line)["url"])
        return self.url

    def _log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        lines = [line for line in text.splitlines() if line.strip()]
        return " | ".join(lines[-3:])[-600:] or f"(see {self.log_path})"

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Stop the child and wait for it: nothing is left running."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> LocalModelServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _serve(model: Path, alias: str, context: int, port: int) -> int:
    """The child: serve until stdin closes or SIGTERM/SIGINT comes."""
    import xllamacpp

    key = os.environ.pop(KEY_VARIABLE, "")
    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    params.model_alias = {alias}  # a set of names
    params.hostnames = ["127.0.0.1"]
    params.port = port
    params.n_ctx = context
    params.n_parallel = 1
    params.cpuparams.n_threads = threads()
    params.cpuparams_batch.n_threads = threads()
    params.cache_prompt = True
    params.use_jinja = True  # the model's own chat template, tool calls included
    params.endpoint_slots = False
    if key:
        params.api_keys = [key]  # /health and /v1/models stay open, the rest needs the key
    server = xllamacpp.Server(params)
    base = str(server.listening_address).rstrip("/")
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as reply:  # noqa: S310 - our own loopback server
                if reply.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            return 1
        time.sleep(0.2)
    stop = {"now": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(json.dumps({"url": f"{base}/v1"}), flush=True)
    while not stop["now"]:
        ready, _, _ = select.select([sys.stdin], [], [], 0.5)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # the parent is gone
    del server
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox_agent.local_model")
    parser.add_argument("--model", type=Path, required=True, help="the GGUF file")
    parser.add_argument("--alias", required=True, help="the model name the API answers to")
    parser.add_argument("--ctx", type=int, default=DEFAULT_CONTEXT, help="context size, tokens")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    args = parser.parse_args(argv)
    return _serve(args.model, args.alias, args.ctx, args.port)


if __name__ == "__main__":
    sys.exit(main())
