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


class ProcessSandbox(Sandbox):
    """No isolation at all: for machines with neither bubblewrap nor Docker, chosen explicitly."""

    name = "process"

    def __init__(self, config: SandboxConfig) -> None:
        super().__init__(config)
        self.workspace = Path(tempfile.mkdtemp(prefix="llmsandbox-ws-"))
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
        with self.log_path.open("wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
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

    async def _teardown(self) -> None:
        await terminate(self._proc)
        shutil.rmtree(self.workspace, ignore_errors=True)
