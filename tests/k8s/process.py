"""The operator as a separate process (`python -m sandbox_operator`) against the emulator.

For what the in-process runners (``run_operator``) cannot do: kill the operator abruptly
(SIGKILL: no cleanup handler, no graceful shutdown runs), restart it, and read its memory from
/proc. Used by tests/test_operator_restart.py and bench/soak.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .emulator import EmulatedApiServer
from .fixtures import wait_for_operator_watches

__all__ = ["OperatorProcess", "ProcSample", "free_port", "proc_sample"]

REPO = Path(__file__).resolve().parents[2]
WATCHED = ("sandboxtasks", "pods")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ProcSample:
    cpu_seconds: float  # user + system of the process itself
    rss_bytes: int  # VmRSS
    hwm_bytes: int  # peak RSS so far (VmHWM)


def proc_sample(pid: int) -> ProcSample:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    mem: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            mem[key] = int(value.split()[0]) * 1024
    return ProcSample((utime + stime) / CLOCK_TICKS, mem["VmRSS"], mem["VmHWM"])


class OperatorProcess:
    """One incarnation of the operator: started by ``start()``, which returns once it watches
    SandboxTasks and pods; ended by ``kill()`` (SIGKILL) or ``stop()`` (SIGTERM, then wait).

    The child gets the emulator's KUBECONFIG, ``env``, ``PYTHONPATH`` = this checkout's
    ``operator`` and ``agent`` (an editable install may point at another clone), and
    ``LLMSANDBOX_HEALTH_PORT=0`` unless ``env`` sets it (no fixed port: incarnations may overlap
    with other runs). Its output goes to ``log``.
    """

    def __init__(
        self,
        api: EmulatedApiServer,
        env: dict[str, str],
        log: IO[bytes],
        argv: list[str] | None = None,
    ) -> None:
        self.api = api
        self.env = env
        self.log = log
        self.argv = argv or [sys.executable, "-m", "sandbox_operator"]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        path = os.pathsep.join(
            [str(REPO / "operator"), str(REPO / "agent"), os.environ.get("PYTHONPATH", "")]
        )
        full_env = {
            **os.environ,
            **self.api.env(),
            "LLMSANDBOX_HEALTH_PORT": "0",
            **self.env,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": path,
        }
        since = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, env=full_env, stdout=self.log, stderr=subprocess.STDOUT
        )
        try:
            wait_for_operator_watches(
                self.api, WATCHED, since=since, timeout=timeout, alive=self.alive
            )
        except (RuntimeError, TimeoutError):
            self.kill()
            raise
        return self

    def kill(self) -> int:
        """SIGKILL and reap; returns the exit status (-9 when the kill did it)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (kopf's graceful stop), SIGKILL after ``timeout``."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def sample(self) -> ProcSample:
        return proc_sample(self.pid)
