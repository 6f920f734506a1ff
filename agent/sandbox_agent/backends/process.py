"""The `process` backend: the exec server as a plain subprocess in a temporary workspace, no isolation."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..execd_cmdline import execd_cmdline
from .base import (
    CappedLog,
    ExecEndpoint,
    HandOff,
    Sandbox,
    SandboxConfig,
    execd_source,
    host_env_for_sandbox,
    terminate,
)
from .limits import Enforcement, SandboxLimits


class ProcessSandbox(Sandbox):
    """No isolation at all: for machines with neither bubblewrap nor Docker, chosen explicitly.

    Commands see and may change everything the caller may. What it does apply are the task's
    resource limits, the same way as the bwrap backend (a cgroup when possible, else rlimits), so
    a fork bomb or a memory hog cannot take the host down with it, and at stop every process it
    started is killed, even those that left the shell's process group. The exec server is
    non-dumpable and gets its socket and token as descriptors, but commands share its uid: they
    can kill it, or bind a server of their own at its socket path, so the host side's distrust
    of every reply is what keeps them from the host's files.
    """

    name = "process"

    def __init__(self, config: SandboxConfig) -> None:
        super().__init__(config)
        self.workspace = Path(tempfile.mkdtemp(prefix="llmsandbox-ws-"))
        self.limits = SandboxLimits(config)
        self._proc: asyncio.subprocess.Process | None = None
        self._log = CappedLog(self.log_path)
        # Our end of the exec server's --parent-fd: when this process dies, however it dies,
        # the kernel closes it and the server stops with its commands.
        self._lifeline: int | None = None

    async def start(self) -> ExecEndpoint:
        # The caller's PATH so the host's tools are found; nothing else of its environment (no keys).
        self.enforcement = self._enforcement(self.limits.setup())
        env = host_env_for_sandbox(
            {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workspace)}
            | self.limits.env()
            | self.config.env
        )
        handoff = HandOff(self.rundir, self.token)
        parent_end, self._lifeline = os.pipe()
        command = execd_cmdline(
            [str(execd_source())], str(self.workspace), handoff.descriptors(), python=sys.executable
        )
        command += ["--parent-fd", str(parent_end)]
        try:
            self._proc = await handoff.launch(
                self.limits.wrap(command),
                log=self._log,
                what="process sandbox",
                timeout=self.config.start_timeout,
                cwd=self.workspace,
                env=env,
                extra_fds=(parent_end,),
            )
        finally:
            handoff.close()
            os.close(parent_end)
        return ExecEndpoint(
            token=self.token, workspace=str(self.workspace), uds=str(handoff.socket_path)
        )

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
            if self._lifeline is not None:
                os.close(self._lifeline)
                self._lifeline = None
            await self.limits.release()
            await self._log.stop()
        finally:
            shutil.rmtree(self.workspace, ignore_errors=True)
