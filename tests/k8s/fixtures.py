"""Pytest fixtures for operator integration tests against the emulated cluster.

``k8s`` is a started :class:`EmulatedApiServer` (namespace ``default`` and the SandboxTask CRD
seeded), ``kubelet`` a started :class:`TestKubelet` on it, and ``run_operator`` /
``arun_operator`` run a kopf operator module against it::

    def test_x(k8s, kubelet, run_operator):
        with run_operator("sandbox_operator.handlers", env={"LLM_BASE_URL": ...}):
            k8s.create(task)
            k8s.wait_for(lambda: phase(k8s.get("sandboxtasks", "t")) == "Succeeded")

The login recipe: ``KUBECONFIG`` points to a kubeconfig written for the emulator (server =
``k8s.base_url``, a dummy token, insecure), set in the process environment *before* kopf's
registry is created, because kopf registers its fallback ``login_with_kubeconfig`` only if
``KUBECONFIG`` (or ``~/.kube/config``) exists when the registry is built and neither pykube nor
the kubernetes client is installed (true here); that registry is a ``SmartOperatorRegistry``
(a plain ``kopf.OperatorRegistry()`` has no fallback logins). An operator with its own
``@kopf.on.login`` or its own client should use ``kopf.login_with_service_account(...) or
kopf.login_with_kubeconfig(...)``: no service-account token exists here, so the kubeconfig wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import kopf
import pytest
from kopf._cogs.helpers import loaders
from kopf._core.intents import registries
from kopf.testing import KopfRunner

from .emulator import EmulatedApiServer
from .kubelet import TestKubelet, bwrap_usable

__all__ = [
    "arun_operator",
    "arun_operator_on",
    "k8s",
    "kubelet",
    "operator_test_settings",
    "run_operator",
    "run_operator_on",
    "wait_for_operator_watches",
]

KOPF_USER_AGENT = "kopf/"


@pytest.fixture
def k8s() -> Iterator[EmulatedApiServer]:
    """A started emulated API server, stopped (all watch streams ended) after the test."""
    with EmulatedApiServer() as api:
        yield api


@pytest.fixture
def kubelet(k8s: EmulatedApiServer) -> Iterator[TestKubelet]:
    """A started test kubelet on ``k8s``; every container process is killed after the test.
    Skips the test where bubblewrap cannot build the pod sandboxes."""
    if not bwrap_usable():
        pytest.skip("bubblewrap is not installed or cannot create sandboxes here")
    with TestKubelet(k8s) as node:
        yield node


@pytest.fixture
def run_operator(k8s: EmulatedApiServer) -> Callable[..., contextlib.AbstractContextManager[Any]]:
    """``run_operator(target, env=..., ...)``: :func:`run_operator_on` bound to ``k8s``."""
    return functools.partial(run_operator_on, k8s)


@pytest.fixture
def arun_operator(
    k8s: EmulatedApiServer,
) -> Callable[..., contextlib.AbstractAsyncContextManager[Any]]:
    """``async with arun_operator(target, ...)``: :func:`arun_operator_on` bound to ``k8s``."""
    return functools.partial(arun_operator_on, k8s)


def operator_test_settings() -> kopf.OperatorSettings:
    """kopf settings for tests: standalone (no peering), quick retries, bounded timeouts.

    The operator's own ``@kopf.on.startup`` handler still runs and may override these.
    """
    settings = kopf.OperatorSettings()
    settings.peering.standalone = True
    settings.peering.mandatory = False
    settings.watching.connect_timeout = 5
    settings.watching.reconnect_backoff = 0.1
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 5
    settings.networking.error_backoffs = [0.1, 0.2, 0.5, 1.0]
    settings.queueing.exit_timeout = 2
    settings.background.instant_exit_timeout = 1
    settings.process.ultimate_exiting_timeout = None  # never SIGKILL the test process
    return settings


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _preserved_logging() -> Iterator[None]:
    """kopf's CLI reconfigures the root and asyncio loggers (handlers bound to the runner's
    captured stderr, DEBUG level); put them back when the operator stops."""
    root, aio = logging.getLogger(), logging.getLogger("asyncio")
    saved = (list(root.handlers), root.level, list(aio.handlers), aio.propagate)
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        aio.handlers[:] = saved[2]
        aio.propagate = saved[3]


def _target_args(target: str | Path) -> tuple[list[str], list[str]]:
    """kopf CLI args and the module names to re-import for a file path or a module name."""
    text = str(target)
    if text.endswith(".py") or os.path.sep in text:
        return [text], []
    for name in list(sys.modules):  # re-execute the decorators into the fresh registry
        if name == text:
            del sys.modules[name]
    return ["-m", text], [text]


def _scope_args(namespaces: Sequence[str] | None) -> list[str]:
    if not namespaces:
        return ["--all-namespaces"]
    return [arg for ns in namespaces for arg in ("-n", ns)]


def wait_for_operator_watches(
    api: EmulatedApiServer,
    resources: Iterable[str] = (),
    *,
    since: float = 0.0,
    timeout: float = 15.0,
    alive: Callable[[], bool] = lambda: True,
) -> None:
    """Wait until kopf has opened watch streams: on each of ``resources`` (plurals), or on at
    least one resource other than CRDs when none are given; ``since``: a ``time.monotonic()``
    value, to ignore the watches of an earlier operator."""
    wanted = set(resources)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        watched = {
            r.resource
            for r in api.requests.entries(verb="watch", user_agent=KOPF_USER_AGENT)
            if r.at >= since
        }
        if (wanted and wanted <= watched) or (
            not wanted and watched - {"customresourcedefinitions"}
        ):
            return
        if not alive():
            raise RuntimeError("the operator exited before it started watching")
        time.sleep(0.02)
    raise TimeoutError(f"the operator did not start watching {sorted(wanted) or 'anything'}")


@contextlib.contextmanager
def run_operator_on(
    api: EmulatedApiServer,
    target: str | Path,
    *,
    env: Mapping[str, str] | None = None,
    namespaces: Sequence[str] | None = None,
    settings: kopf.OperatorSettings | None = None,
    registry: kopf.OperatorRegistry | None = None,
    extra_args: Sequence[str] = (),
    wait_watching: Iterable[str] | None = (),
    timeout: float = 20.0,
    verbose: bool = True,
) -> Iterator[KopfRunner]:
    """Run ``kopf run --standalone`` for a module name or a file path in a thread
    (``kopf.testing.KopfRunner``) against ``api``, with ``env`` set for the operator's life.

    A fresh ``SmartOperatorRegistry`` is used (a module target is re-imported so its decorators
    register again; a ``registry`` given must have its login handlers). The context is entered once kopf watches ``wait_watching`` (plurals; by default any
    resource; ``None`` does not wait). At exit the operator is stopped and its exceptions are
    re-raised; ``runner.output`` holds its log.
    """
    env_all = {**api.env(), **(env or {})}
    with _environment(env_all):
        fresh_registry = registry or registries.SmartOperatorRegistry()
        target_args, _ = _target_args(target)
        args = [
            "run",
            "--standalone",
            *(["--verbose"] if verbose else []),
            *_scope_args(namespaces),
            *extra_args,
            *target_args,
        ]
        since = time.monotonic()
        runner = KopfRunner(
            args,
            registry=fresh_registry,
            settings=settings or operator_test_settings(),
            timeout=timeout,
        )
        with _preserved_logging(), runner:
            if wait_watching is not None:
                wait_for_operator_watches(
                    api,
                    wait_watching,
                    since=since,
                    timeout=timeout,
                    alive=lambda: not runner.future.done(),
                )
            yield runner


@contextlib.asynccontextmanager
async def arun_operator_on(
    api: EmulatedApiServer,
    target: str | Path,
    *,
    env: Mapping[str, str] | None = None,
    namespaces: Sequence[str] | None = None,
    settings: kopf.OperatorSettings | None = None,
    registry: kopf.OperatorRegistry | None = None,
    timeout: float = 20.0,
) -> AsyncIterator[Any]:
    """Run the operator as a task of the running loop (``kopf.operator(...)``); use the async
    helpers (``acreate``, ``await_for``...) meanwhile: the sync ``wait_for`` blocks the loop."""
    env_all = {**api.env(), **(env or {})}
    with _environment(env_all):
        fresh_registry = registry or registries.SmartOperatorRegistry()
        previous = registries.get_default_registry()
        registries.set_default_registry(fresh_registry)
        try:
            paths, modules = _target_args(target)
            if modules:
                loaders.preload(paths=[], modules=modules)
            else:
                loaders.preload(paths=paths, modules=[])
        finally:
            registries.set_default_registry(previous)
        stop = asyncio.Event()
        task = asyncio.create_task(
            kopf.operator(
                registry=fresh_registry,
                settings=settings or operator_test_settings(),
                standalone=True,
                clusterwide=not namespaces,
                namespaces=list(namespaces or []),
                stop_flag=stop,
            )
        )
        try:
            yield task
        finally:
            stop.set()
            try:
                await asyncio.wait_for(task, timeout)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
