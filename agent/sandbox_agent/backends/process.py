"""The `process` backend: the exec server as a plain subprocess in a temporary workspace, no isolation."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .base import (
    ExecEndpoint,
    Sandbox,
    SandboxConfig,
    execd_source,
    host_env_for_sandbox,
    terminate,
    wait_for_ready_file,
)
from .limits import Enforcement, SandboxLimits


class ProcessSandbox(Sandbox):
    """No isolation at all: for machines with neither bubblewrap nor Docker, chosen explicitly.

    Commands see and may change everything the caller may. What it does apply are the task's
    resource limits, the same way as the bwrap backend (a cgroup when possible, else rlimits), so
    a fork bomb or a memory hog cannot take the host down with it, and at stop every process it
    started is killed, even those that left the shell's process group.
    """

    name = "process"

    def __init__(self, config: SandboxConfig) -> None:
        super().__init__(config)
        self.workspace = Path(tempfile.mkdtemp(prefix="llmsandbox-ws-"))
        self.limits = SandboxLimits(config)
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> ExecEndpoint:
        sock = self.rundir / "execd.sock"
        ready = self.rundir / "ready.json"
        # The caller's PATH so the host's tools are found; nothing else of its environment (no keys).
        env = host_env_for_sandbox(
            {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workspace)}
            | self.config.env
        )
        env["EXECD_TOKEN"] = self.token
        command = [
            sys.executable,
            "-I",
            "-S",
            str(execd_source()),
            "--root",
            str(self.workspace),
            "--unix-socket",
            str(sock),
            "--ready-file",
            str(ready),
        ]
        self.enforcement = self._enforcement(self.limits.setup())
        with self.log_path.open("wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *self.limits.wrap(command),
                cwd=self.workspace,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        await wait_for_ready_file(
            ready, self._proc, self.config.start_timeout, "process sandbox", self.log_path
        )
        return ExecEndpoint(token=self.token, workspace=str(self.workspace), uds=str(sock))

    def _enforcement(self, limits: Enforcement) -> Enforcement:
        unenforced = dict(limits.unenforced)
        if self.config.disk_bytes:
            unenforced["disk"] = (
                "the workspace is a plain host directory: only single files are capped"
            )
        return Enforcement(limits.mechanism, dict(limits.enforced), unenforced)

    async def _teardown(self) -> None:
        try:
            await terminate(self._proc)
            await self.limits.release()
        finally:
            shutil.rmtree(self.workspace, ignore_errors=True)
