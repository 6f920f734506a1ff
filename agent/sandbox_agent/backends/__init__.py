"""Local sandbox backends behind one small interface, and the choice of a default."""

from __future__ import annotations

from ..errors import BackendUnavailableError
from .base import ExecEndpoint, Sandbox, SandboxConfig
from .bwrap import BwrapSandbox, bwrap_path
from .docker import DockerSandbox, docker_reachable
from .process import ProcessSandbox

BACKENDS: dict[str, type[Sandbox]] = {
    "bwrap": BwrapSandbox,
    "docker": DockerSandbox,
    "process": ProcessSandbox,
}
BACKEND_NAMES = ("auto", *BACKENDS)


def choose_backend(name: str = "auto") -> type[Sandbox]:
    """The backend class for `name`; `auto` is bwrap if installed, else Docker if reachable."""
    if name != "auto":
        try:
            return BACKENDS[name]
        except KeyError:
            raise BackendUnavailableError(
                f"unknown backend {name!r}: choose one of {', '.join(BACKEND_NAMES)}"
            ) from None
    if bwrap_path() is not None:
        return BwrapSandbox
    if docker_reachable():
        return DockerSandbox
    raise BackendUnavailableError(
        "no sandbox backend found: install bubblewrap (`apt-get install bubblewrap`), "
        "or start a Docker engine, or run without isolation with --backend process"
    )


__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "BwrapSandbox",
    "DockerSandbox",
    "ExecEndpoint",
    "ProcessSandbox",
    "Sandbox",
    "SandboxConfig",
    "choose_backend",
]
